"""kernels/gpu_checks.py and gpu-validate.sh, as far as a machine without a GPU runs them: the
training-step check on CPU (gloo, the CPU kernels against the reference ops) and the report of a
run; the stream check needs CUDA streams and runs on the first GPU only."""

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


def test_report_gathers_every_step_with_its_result(tmp_path):
    (tmp_path / "steps.tsv").write_text(
        "build\t0\t61500\tbuild.log\n" "test_fused\t0\t95000\tpytest.txt\n" "stream switch\t1\t8000\tstream.json\n"
        "megatron-core\tskipped\t0\tnot importable\n")
    (tmp_path / "build.log").write_text("building\n")
    (tmp_path / "pytest.txt").write_text("....\n400 passed, 12 skipped in 90.1s\n")
    (tmp_path / "stream.json").write_text('a warning\n{"check": "stream", "passed": false}\n')
    (tmp_path / "bench-kernels.json").write_text('{"results": [{"op": "hc"}]}')
    result = subprocess.run([sys.executable, str(ROOT / "kernels" / "gpu_checks.py"), "report", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-3000:]  # the stream switch failed
    record = json.loads((tmp_path / "gpu-validate.json").read_text())
    assert [(step["step"], step["status"], step["seconds"]) for step in record["steps"]] == [
        ("build", "passed", 61.5), ("test_fused", "passed", 95.0), ("stream switch", "failed", 8.0),
        ("megatron-core", "skipped", 0.0)]
    assert record["steps"][1]["last_line"] == "400 passed, 12 skipped in 90.1s"
    assert record["steps"][2]["result"] == {"check": "stream", "passed": False}
    assert record["passed"] is False and record["bench_kernels"] == {"results": [{"op": "hc"}]}
