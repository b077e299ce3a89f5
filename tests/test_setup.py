"""The set-up script's answer when no Python 3.12 can be found, the demonstration module, and the CUDA arch list."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_setup_in_copy(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run tools/ensure-venv.sh in a copy of the files it reads, so the real .venv is untouched."""
    for name in ("tools/ensure-venv.sh", "constraints.txt", "setup.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return subprocess.run(
        [shutil.which("bash"), str(tmp_path / "tools/ensure-venv.sh")], env=env, capture_output=True, text=True, timeout=60
    )


def test_no_python312_stops_with_what_to_install(tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("cat", "sha256sum", "cut", "dirname", "ls", "sort"):
        (tools / tool).symlink_to(shutil.which(tool))
    result = run_setup_in_copy(tmp_path / "repo", {"PATH": str(tools)})
    assert result.returncode == 1
    assert "no working Python 3.12 found" in result.stderr
    assert "pyenv install 3.12" in result.stderr and "PYTHON=/path/to/python3.12" in result.stderr
    assert not (tmp_path / "repo/.venv").exists()


def test_a_wrong_python_override_is_named(tmp_path):
    result = run_setup_in_copy(tmp_path, {**os.environ, "PYTHON": "/bin/false"})
    assert result.returncode == 1
    assert "PYTHON=/bin/false is not a working Python 3.12" in result.stderr


def test_demo_prints_the_three_modes():
    result = subprocess.run(
        [sys.executable, "-m", "mhc_megatron.demo", "--steps", "3", "--layers", "2", "--batch", "16"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for words in ("Sinkhorn-Knopp", "row sums    1.000000", "residual", "hc", "mhc", "1.000 / 1.000"):
        assert words in result.stdout


def load_extension_module():
    """kernels/extension.py, as setup.py imports it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernels_extension", ROOT / "kernels" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("toolkit, archs", [
    ((13, 0), "8.0;9.0a;10.0"), ((12, 8), "8.0;9.0a;10.0"), ((12, 4), "8.0;9.0a"), ((11, 8), "8.0"),
])
def test_cuda_builds_cover_the_planners_gpus_the_toolkit_supports(toolkit, archs):
    assert load_extension_module().default_cuda_archs(toolkit) == archs
