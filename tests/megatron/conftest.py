"""Helpers for the megatron-core tests: each multi-process case runs under torchrun on gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_workers(script: str, nproc: int, *args: str, timeout: int = 300) -> str:
    """Run ``script`` in ``nproc`` processes with torchrun; fail with the end of its output."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(HERE / script), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command[3:])} failed:\n{output[-6000:]}"
    return output


def run_parallel_case(nproc: int, out: Path, *args: str) -> dict:
    """Run parallel_worker.py and return its JSON record (losses of 3 steps, logits)."""
    run_workers("parallel_worker.py", nproc, *args, "--out", str(out))
    return json.loads(out.read_text())
