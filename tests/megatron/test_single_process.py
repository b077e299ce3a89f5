"""Residual equals stock megatron GPT; mHC/HC at identity equal residual; bad checkpoints are refused.

The checks need megatron's process groups, so they run in one torchrun process
(single_process_worker.py, which states each check and raises on any failure).
"""

from conftest import run_workers


def test_equivalences_and_checkpoint_errors(tmp_path):
    output = run_workers("single_process_worker.py", 1, "--tmp", str(tmp_path))
    assert "ALL CHECKS PASSED" in output
