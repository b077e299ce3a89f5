"""A run stopped by its exit signal or its time budget saves, exits with status 75, and resumes to
the losses of the uninterrupted run, bit for bit."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from mhc_megatron.training.exit_requests import EXIT_STATUS

from .conftest import TINY, read_metrics, run_command, run_train


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(dataset, tmp_path):
    """DP = 2; SIGTERM reaches rank 1's process only, during step 1 (once the model is built, the
    handler is in place): both ranks finish the step, save, and exit with 75; resumed, the run
    gives the losses of the uninterrupted one exactly."""
    common = [*TINY, f"data_path={dataset}", "train_iters=6", "hidden_dropout=0.1", f"data_dir={tmp_path / 'data'}"]
    save = tmp_path / "checkpoints"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "mhc_megatron.train", *common, f"run_dir={tmp_path / 'parts'}", f"save={save}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = []
    for line in agent.stdout:  # the last rank says "model: ..." once every rank has built it
        output.append(line)
        if line.startswith("model: "):
            break
    workers = children(agent.pid)
    assert len(workers) == 2, "".join(output)
    os.kill(max(workers), signal.SIGTERM)  # the later-started worker: rank 1
    output = "".join(output) + agent.communicate(timeout=120)[0]
    assert "stopping after step 1: SIGTERM received" in output, output
    assert output.count(f"exitcode  : {EXIT_STATUS}") == 1, output  # torchrun's report: the first worker to exit
    assert [r["step"] for r in read_metrics(tmp_path / "parts")] == [1]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1\n"

    run_train(*common, "exit_interval=3", f"run_dir={tmp_path / 'parts'}", f"save={save}", f"load={save}", nproc=2)
    run_train(*common, "exit_interval=3", f"run_dir={tmp_path / 'whole'}", nproc=2)
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in parts] == [r[key] for r in whole], key


def test_the_time_budget_stops_the_run_after_saving(dataset, tmp_path):
    save = tmp_path / "checkpoints"
    result = run_command([sys.executable, "-m", "mhc_megatron.train", *TINY, f"data_path={dataset}", "train_iters=50",
                          "exit_duration_in_mins=0.0001", f"save={save}", f"run_dir={tmp_path / 'run'}",
                          f"data_dir={tmp_path / 'data'}"], expect_success=False)
    assert result.returncode == EXIT_STATUS, result.stdout + result.stderr
    assert "stopping after step 1: the time budget exit_duration_in_mins=0.0001 ran out" in result.stdout
    assert ("mhc-train: interrupted after step 1 (the time budget exit_duration_in_mins=0.0001 ran out); resume "
            "with load=<the save directory> (exit status 75)") in result.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1\n"
