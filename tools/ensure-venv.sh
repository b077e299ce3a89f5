#!/usr/bin/env bash
# Create or refresh .venv (Python 3.12, packages pinned by constraints.txt, mhc_megatron editable).
#
# Run by `make run` and `make test`. A stamp inside .venv records a hash of the files that decide
# the environment; when it matches, this script returns at once. Override the interpreter with
# PYTHON=/path/to/python3.12.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.mhc-setup-stamp"
cd "$root"

# The kernel sources and MHC_BUILD decide the compiled extension (kernels/extension.py): a change
# rebuilds it through the editable install below.
shopt -s nullglob
kernel_sources=(kernels/*.h kernels/*.cpp kernels/*.cu kernels/*.py)
wanted=$( (cat constraints.txt setup.py tools/ensure-venv.sh "${kernel_sources[@]}"; echo "MHC_BUILD=${MHC_BUILD:-auto}") \
    | sha256sum | cut -d' ' -f1)
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    exit 0
fi

is_python312() {
    "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

find_python312() {
    local candidate
    if [[ -n "${PYTHON:-}" ]]; then
        if is_python312 "$PYTHON"; then echo "$PYTHON"; return 0; fi
        echo "PYTHON=$PYTHON is not a working Python 3.12 with the venv module." >&2
        return 1
    fi
    # A python3.12 on PATH may be a pyenv shim that fails unless a version is selected: run it.
    if command -v python3.12 >/dev/null 2>&1 && is_python312 python3.12; then
        command -v python3.12; return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        for candidate in $(ls -d "$(pyenv root)"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r); do
            if is_python312 "$candidate"; then echo "$candidate"; return 0; fi
        done
    fi
    return 1
}

if ! python312=$(find_python312); then
    cat >&2 <<'EOF'
error: no working Python 3.12 found (megatron-core 0.19 requires Python 3.12).
Install one, then run the command again, for example:
  pyenv install 3.12            (then it is found automatically)
  apt-get install python3.12 python3.12-venv
or point to an interpreter:    make test PYTHON=/path/to/python3.12
EOF
    exit 1
fi

if [[ -x "$venv/bin/python" ]] && ! is_python312 "$venv/bin/python"; then
    echo "setup: $venv is not a Python 3.12 environment; recreating it"
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating $venv with $python312 ($("$python312" -V 2>&1))"
    "$python312" -m venv "$venv"
fi

echo "setup: installing pinned packages (constraints.txt); the first time downloads torch (~2.6 GB)"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
"${pip[@]}" install --quiet -c constraints.txt pip setuptools wheel
"${pip[@]}" install --quiet -c constraints.txt torch
# --no-build-isolation: the build must see the pinned torch, never resolve another one. The
# optional extras are installed too, so that the tests run their paths.
"${pip[@]}" install --quiet -c constraints.txt --no-build-isolation --use-pep517 -e ".[test,wandb,deepspeed]"
echo "$wanted" >"$stamp"
versions=$("$venv/bin/python" -c 'from importlib.metadata import version as v; print("torch", v("torch") + ", megatron-core", v("megatron-core"))')
echo "setup: done ($versions)"
