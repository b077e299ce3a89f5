"""kernels/gpu_checks.py and gpu-validate.sh, as far as a machine without a GPU runs them: the
training-step check on CPU (gloo, the CPU kernels against the reference ops); the stream check
needs CUDA streams and runs on the first GPU only."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_training_step_check_runs_the_fused_kernels_and_matches_the_reference():
    result = subprocess.run([sys.executable, str(ROOT / "kernels" / "gpu_checks.py"), "step", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["passed"] and record["process_group"] == "gloo"
    assert record["fused_kernel_calls"]["fused"] > 0 and record["fused_kernel_calls"]["reference"] == 0


def test_gpu_validate_script_parses():
    result = subprocess.run([shutil.which("bash"), "-n", str(ROOT / "kernels" / "gpu-validate.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
