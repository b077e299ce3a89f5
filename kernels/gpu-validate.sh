#!/usr/bin/env bash
# GPU validation of the fused kernels, end to end, on a machine with one NVIDIA GPU:
#   1. build mhc_megatron._C with CUDA against this machine's torch (MHC_BUILD=cuda, in place);
#   2. run tests/test_fused.py (CPU and CUDA cases: fused vs reference, every gradient, fp64/fp32/bf16,
#      n in 1..16, large logits, bit-identical backward, torch.compile fullgraph);
#   3. run `mhc-bench kernels` at the GPU defaults (tokens 16384, C 4096, n 4, bf16), all backends.
# Needs python3 with torch >= 2.11 (a CUDA build), nvcc, ninja and pytest; not megatron-core.
#
# Usage: kernels/gpu-validate.sh OUTDIR [extra mhc-bench kernels arguments]
# Writes to OUTDIR: nvidia-smi.txt, build.log, pytest.txt, bench.txt, bench-kernels.json.
# Environment: PYTHON (default python3), MAX_JOBS (default 8), TORCH_CUDA_ARCH_LIST (default 9.0a).
set -euo pipefail

out=${1:?usage: kernels/gpu-validate.sh OUTDIR [mhc-bench kernels arguments]}
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$out/nvidia-smi.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
    | tee -a "$out/nvidia-smi.txt"

echo "== build (MHC_BUILD=cuda)"
if ! MHC_BUILD=cuda MAX_JOBS=${MAX_JOBS:-8} "$python" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log"
    exit 1
fi
"$python" -c 'import torch; from mhc_megatron import _C; assert _C.with_cuda, "built without CUDA"'

echo "== tests"
status=0
"$python" -m pytest tests/test_fused.py -q -p no:cacheprovider 2>&1 | tee "$out/pytest.txt" || status=1

echo "== benchmark"
"$python" -m mhc_megatron.bench.cli kernels --device cuda --json "$out/bench-kernels.json" "$@" 2>&1 \
    | tee "$out/bench.txt" || status=1
exit $status
