#!/usr/bin/env bash
# The GPU path on the first GPU, in one run of under 8 minutes on one H100/H200 with nothing fetched
# (python3 with a CUDA build of torch >= 2.11, nvcc, ninja and pytest; megatron-core optional):
#   1. build mhc_megatron._C with CUDA for this GPU's architecture only (TORCH_CUDA_ARCH_LIST set
#      from the device unless given; the default build covers 8.0, 9.0a and 10.0), timed;
#   2. tests/test_fused.py: the CUDA kernels (and the CPU ones) against the float64 reference, every
#      gradient, fp64/fp32/bf16, n in 1..16, bit-identical backward, torch.compile fullgraph;
#   3. kernels/gpu_checks.py stream: the fused post_res on the high-priority stream vs the default one;
#   4. mhc-bench kernels on the GPU: bf16, tokens 16384, C 4096, n 4, all backends, with the copy
#      bandwidth and matrix-product rate measured in the same run;
#   5. where megatron-core is importable: tests/megatron/test_cuda_streams.py (the layer on the
#      high-priority stream) and kernels/gpu_checks.py step (a training step, NCCL, world size 1,
#      fused ops against the reference ops).
#
# Usage: kernels/gpu-validate.sh OUTDIR [extra mhc-bench kernels arguments]
# Writes to OUTDIR: gpu-validate.json (device, versions, each step's status, seconds and output
# summary, the benchmark's results: for docs/performance.md), and each step's log.
# Environment: PYTHON (default python3), MAX_JOBS (default 8), TORCH_CUDA_ARCH_LIST.
set -uo pipefail

out=${1:?usage: kernels/gpu-validate.sh OUTDIR [mhc-bench kernels arguments]}
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
steps="$out/steps.tsv"
: >"$steps"

# step NAME LOG COMMAND...: run COMMAND with its output in OUTDIR/LOG (and on the terminal), and
# record its exit status and duration.
step() {
    local name=$1 log=$2 start status
    shift 2
    echo "== $name"
    start=$(date +%s%N)
    "$@" 2>&1 | tee "$out/$log"
    status=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((($(date +%s%N) - start) / 1000000))" "$log" >>"$steps"
    return "$status"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$out/nvidia-smi.txt"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    # This device's architecture only ("9.0a" on Hopper: the arch-specific features are built there).
    TORCH_CUDA_ARCH_LIST=$("$python" -c 'import torch; major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}" + ("a" if major == 9 else ""))') || { echo "no CUDA device visible to torch"; exit 1; }
fi
export TORCH_CUDA_ARCH_LIST

status=0
if step build build.log env MHC_BUILD=cuda MAX_JOBS="${MAX_JOBS:-8}" "$python" setup.py build_ext --inplace \
    && "$python" -c 'from mhc_megatron import _C; assert _C.with_cuda, "built without CUDA"'; then
    step "test_fused" pytest.txt "$python" -m pytest tests/test_fused.py -q -p no:cacheprovider || status=1
    step "stream switch" stream.json "$python" kernels/gpu_checks.py stream || status=1
    step "mhc-bench kernels" bench.txt "$python" -m mhc_megatron.bench.kernels --device cuda --dtype bfloat16 \
        --tokens 16384 --hidden 4096 --streams 4 --json "$out/bench-kernels.json" "$@" || status=1
    if "$python" -c 'import megatron.core' >/dev/null 2>&1; then
        step "megatron GPU tests" megatron-pytest.txt "$python" -m pytest tests/megatron/test_cuda_streams.py -q \
            -p no:cacheprovider || status=1
        step "training step" step.json "$python" kernels/gpu_checks.py step || status=1
    else
        printf 'megatron-core\tskipped\t0\tnot importable\n' >>"$steps"
    fi
else
    tail -n 40 "$out/build.log"
    status=1
fi

"$python" kernels/gpu_checks.py report "$out" || status=1
exit $status
