"""A run stopped by its exit signal or its time budget saves, exits with status 75, and resumes to
the losses of the uninterrupted run, bit for bit; a rank killed outright ends the job at once, with
torchrun's report naming it, and the rerun with ``load`` reproduces the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhc_megatron.training.exit_requests import EXIT_STATUS

from .conftest import TINY, read_metrics, run_command, run_train


def worker_of_rank(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (from the RANK in its environment)."""
    children = [int(child) for task in Path(f"/proc/{agent.pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    for child in children:
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return child
    raise AssertionError(f"no worker of rank {rank} among torchrun's children {children}")


def job(dataset, data_dir: Path) -> list[str]:
    """A 6-step schedule on 2 data-parallel ranks with the distributed optimizer (its sharded state
    must resume), dropout (so must the random state) and an evaluation every 2 steps."""
    return [*TINY, f"data_path={dataset}", "train_iters=6", "hidden_dropout=0.1", "use_distributed_optimizer=true",
            "eval_interval=2", "eval_iters=1", f"data_dir={data_dir}"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> list[dict]:
    """The first 3 steps of ``job`` without interruption."""
    run_dir = tmp_path_factory.mktemp("whole")
    run_train(*job(dataset, run_dir / "data"), "exit_interval=3", f"run_dir={run_dir}", nproc=2)
    return read_metrics(run_dir)


def start_job(arguments: list[str], status_file: Path) -> tuple[subprocess.Popen, list[str]]:
    """``mhc-train`` under torchrun with 2 processes, its ranks writing their exit status to
    ``status_file`` (as under the launch scripts), read up to the line the last rank prints once
    every rank has built the model (the exit-signal handler is in place by then); returns the agent
    and the output read so far."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "mhc_megatron.train", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MHC_EXIT_STATUS_FILE": str(status_file)}
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = []
    for line in agent.stdout:
        output.append(line)
        if line.startswith("model: "):
            return agent, output
    raise AssertionError("the job ended before building its model:\n" + "".join(output))


def resumed_matches(arguments: list[str], save: Path, run_dir: Path, uninterrupted: list[dict]) -> None:
    run_train(*arguments, "exit_interval=3", f"run_dir={run_dir}", f"save={save}", f"load={save}", nproc=2)
    parts = read_metrics(run_dir)
    latest = {r["step"]: r for r in parts}  # a step logged before a kill and run again counts once
    assert sorted(latest) == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr", "eval_loss", "amax_gain_backward"):
        assert [latest[step].get(key) for step in (1, 2, 3)] == [r.get(key) for r in uninterrupted], key


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(dataset, uninterrupted, tmp_path):
    """DP = 2; SIGTERM reaches rank 1's process only, during step 1: both ranks finish the step,
    save, and exit with 75, the status the launch scripts read, whichever rank exits first (torchrun
    terminates the other then); resumed, the run gives the losses of the uninterrupted one exactly."""
    common, save, status_file = job(dataset, tmp_path / "data"), tmp_path / "checkpoints", tmp_path / "status"
    agent, output = start_job([*common, f"run_dir={tmp_path / 'parts'}", f"save={save}"], status_file)
    os.kill(worker_of_rank(agent, 1), signal.SIGTERM)
    output = "".join(output) + agent.communicate(timeout=120)[0]
    assert "stopping after step 1: SIGTERM received" in output, output
    assert f"exitcode  : {EXIT_STATUS}" in output, output  # torchrun's report: the first worker to exit
    assert status_file.read_text() == f"{EXIT_STATUS}\n"
    assert [r["step"] for r in read_metrics(tmp_path / "parts")] == [1]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1\n"
    resumed_matches(common, save, tmp_path / "parts", uninterrupted)


def test_a_killed_rank_ends_the_job_at_once_and_the_rerun_resumes(dataset, uninterrupted, tmp_path):
    """DP = 2, a checkpoint every step; rank 1 is killed with SIGKILL once step 1 is saved: the
    job ends within seconds (the survivor's collective fails as the peer's connection closes;
    distributed_timeout_minutes bounds a silent node), torchrun's report names the rank, and the
    rerun with load= reproduces the uninterrupted run from the last checkpoint."""
    common, save = job(dataset, tmp_path / "data"), tmp_path / "checkpoints"
    agent, output = start_job([*common, "save_interval=1", "distributed_timeout_minutes=1",
                               f"run_dir={tmp_path / 'parts'}", f"save={save}"], tmp_path / "status")
    while not (save / "latest_checkpointed_iteration.txt").is_file():
        assert agent.poll() is None, "".join(output) + agent.communicate()[0]
        time.sleep(0.05)
    rank1 = worker_of_rank(agent, 1)
    group = os.getpgid(rank1)
    assert group != os.getpgid(agent.pid)  # torchrun starts each worker in a session of its own
    os.killpg(group, signal.SIGKILL)  # the rank, and the helper processes of its checkpoint writer
    killed = time.monotonic()
    output = "".join(output) + agent.communicate(timeout=120)[0]
    assert time.monotonic() - killed < 60, output
    assert agent.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in output and f"exitcode  : -9 (pid: {rank1})" in output, output
    resumed_matches(common, save, tmp_path / "parts", uninterrupted)


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


def test_a_budget_that_runs_out_on_the_last_step_leaves_the_run_finished(dataset, tmp_path):
    """The 6 ms budget is gone before step 1 ends, and step 1 is the last: the run is done (exit 0,
    no "interrupted"), not stopped for the budget."""
    save = tmp_path / "checkpoints"
    result = run_command([sys.executable, "-m", "mhc_megatron.train", *TINY, f"data_path={dataset}", "train_iters=1",
                          "lr_warmup_iters=0", "exit_duration_in_mins=0.0001", f"save={save}",
                          f"run_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}"])
    assert "interrupted" not in result.stderr and "stopping after" not in result.stdout, result.stdout + result.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1\n"
