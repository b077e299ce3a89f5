"""A job killed at any moment of a checkpoint save: the tracker still names a complete checkpoint,
what the save left is ignored with a message, and the resumed run gives the uninterrupted losses."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from mhc_megatron.training.checkpoint_files import TRACKER, resolve_checkpoint, unfinished_saves

from .conftest import TINY, read_metrics, run_train

CRASH = Path(__file__).with_name("crash_during_save.py")


def run_killed(arguments: list[str], log: Path) -> None:
    """``crash_during_save.py`` with ``arguments``; it must die by SIGKILL. It runs in a process group
    of its own, killed after it, since the checkpoint writer's helper processes (multiprocessing's)
    outlive it; its output goes to a file, not a pipe, which they would hold open."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with log.open("w") as output:
        killed = subprocess.Popen([sys.executable, str(CRASH), *arguments], stdout=output, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
        try:
            killed.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):  # none of them left
                os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -9, log.read_text()


def test_saves_killed_at_each_moment_leave_a_loadable_checkpoint(dataset, tmp_path):
    """Four launches of one 4-step run: killed while writing the files of iteration 2, before renaming
    iteration 3's finished directory, before the tracker names iteration 4, then to the end. Each
    launch resumes from the checkpoint the tracker names, ignoring (with a message) what the killed
    save left; the losses are those of the run without interruptions."""
    save = tmp_path / "checkpoints"
    common = [*TINY, f"data_path={dataset}", "train_iters=4", f"data_dir={tmp_path / 'data'}", "save_interval=1"]
    run_train(*common, f"run_dir={tmp_path / 'whole'}")
    parts = [*common, f"save={save}", f"run_dir={tmp_path / 'parts'}"]
    left_before = None
    for iteration, at, left in ((2, "writing", "iter_0000002.partial"), (3, "renaming", "iter_0000003.partial"),
                                (4, "tracking", "iter_0000004")):
        log = tmp_path / f"killed-{at}.log"
        run_killed([f"--iteration={iteration}", f"--at={at}", *parts, *([f"load={save}"] if left_before else [])], log)
        if left_before:
            assert f"ignoring {save / left_before}: a save that did not finish" in log.read_text()
            assert f"resuming after step {iteration - 2}" in log.read_text()
        assert (save / TRACKER).read_text() == f"{iteration - 1}\n"
        assert resolve_checkpoint(save) == save / f"iter_{iteration - 1:07d}"
        assert unfinished_saves(save) == [save / left]
        left_before = left
    resumed = run_train(*parts, f"load={save}")
    assert f"ignoring {save / left_before}: a save that did not finish" in resumed.stdout
    assert (save / TRACKER).read_text() == "4\n" and unfinished_saves(save) == []
    assert sorted(p.name for p in save.iterdir()) == [f"iter_{i:07d}" for i in range(1, 5)] + [TRACKER]
    records = read_metrics(tmp_path / "parts")
    # each killed launch logged the step whose save it died in; the next launch ran that step again
    assert [r["step"] for r in records] == [1, 2, 2, 3, 3, 4, 4]
    latest = {r["step"]: r["loss"] for r in records}
    assert [latest[step] for step in (1, 2, 3, 4)] == [r["loss"] for r in read_metrics(tmp_path / "whole")]
