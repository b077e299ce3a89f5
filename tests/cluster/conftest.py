"""Fixtures of the multi-node tests: a Slurm cluster on this machine, and the training job that the
multi-node launches run, with the per-step metrics of its one-process run to match.

The cluster (``tools/slurm-cluster.sh``: munged, slurmctld and two slurmd, fake nodes n1 and n2 at
127.0.0.1) starts once per test run, for the first test that asks for it, and stops at the end.
Where it cannot start because this user is not root, or the packages are missing and apt-get is
not there to install them, its tests are skipped with that reason; unless the environment variable
CI is set (CI machines are root with apt-get): then, as on any other failure to start, they fail.
"""

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# `dataset` is a session fixture of tests/training, imported so that this package's tests can use it
# (pytest builds it once more for them: a few seconds).
from training.conftest import TINY, dataset, read_metrics, run_train  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tools/slurm-cluster.sh"
# The exit status of `tools/slurm-cluster.sh start` when this machine cannot run a cluster.
UNABLE = 3
# The environment of every launch, as tests/training/conftest.py runs its commands.
QUIET = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cluster(*args: str | Path) -> subprocess.CompletedProcess:
    """``tools/slurm-cluster.sh`` with ``args``; a start may install packages, hence the timeout."""
    return subprocess.run(["bash", str(CLUSTER), *map(str, args)], capture_output=True, text=True, timeout=600)


def exported(printed: str) -> dict[str, str]:
    """The variables of ``export NAME=VALUE`` lines (``tools/slurm-cluster.sh env``)."""
    variables = {}
    for line in printed.splitlines():
        words = shlex.split(line)
        assert len(words) == 2 and words[0] == "export" and "=" in words[1], f"not an export line: {line!r}"
        name, value = words[1].split("=", 1)
        variables[name] = value
    return variables


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """This process's environment plus what ``tools/slurm-cluster.sh env`` exports (SLURM_CONF) for a
    cluster of 2 nodes started in a temporary directory; sbatch, srun and scontrol use it."""
    directory = tmp_path_factory.mktemp("slurm")
    started = cluster("start", directory, 2)
    if started.returncode == UNABLE:
        reason = started.stderr.strip()
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the Slurm cluster must start here, and it cannot: {reason}")
        pytest.skip(reason)
    if started.returncode != 0:
        pytest.fail(f"tools/slurm-cluster.sh start {directory} failed (exit status {started.returncode}):\n"
                    f"{started.stderr[-8000:]}")
    try:
        printed = cluster("env", directory)
        assert printed.returncode == 0, printed.stderr
        yield {**os.environ, **exported(printed.stdout)}
    finally:
        stopped = cluster("stop", directory)
        if stopped.returncode != 0:
            pytest.fail(f"tools/slurm-cluster.sh stop {directory} failed:\n{stopped.stderr}")


@dataclass(frozen=True)
class Job:
    """The job of the multi-node tests: the tiny model on the ``dataset`` fixture's corpus, 3 steps of
    a global batch of 8; ``config`` is the file the launchers get as CONFIG."""

    config: Path
    overrides: tuple[str, ...]

    def arguments(self, run_dir: Path) -> list[str]:
        """The overrides of a run that writes its metrics (and dataset index cache) under ``run_dir``."""
        return [*self.overrides, f"run_dir={run_dir}", f"data_dir={run_dir / 'data'}"]


@pytest.fixture(scope="session")
def job(dataset, tmp_path_factory) -> Job:
    config = tmp_path_factory.mktemp("job") / "job.yaml"
    config.write_text("train_iters: 3\n")
    return Job(config, (*TINY, f"data_path={dataset}"))


@pytest.fixture(scope="session")
def one_process(job, tmp_path_factory) -> list[dict]:
    """The per-step metrics of ``job`` in one process: the data-parallel runs' reference."""
    run_dir = tmp_path_factory.mktemp("one-process")
    run_train("--config", str(job.config), *job.arguments(run_dir))
    return read_metrics(run_dir)


def assert_matches_one_process(metrics: list[dict], one_process: list[dict]) -> None:
    """Each step's loss and gradient norm equal the one-process run's, to the tolerances that
    tests/training/test_train_job.py holds the parallel layouts to."""
    assert [r["step"] for r in metrics] == [r["step"] for r in one_process] == [1, 2, 3]
    for one, many in zip(one_process, metrics):
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-5), (one, many)
        assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), (one, many)
    assert one_process[-1]["loss"] < one_process[0]["loss"]
