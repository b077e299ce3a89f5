"""Running a study's runs one after the other, so that a stopped study resumes where it stopped.

Layout of the output directory ``OUT``::

    OUT/training.yaml            the study's training section, the config file of every run
    OUT/runs/NAME/               each run's run_dir (config.yaml, metrics.jsonl, tensorboard/)
    OUT/runs/NAME/outcome.json   written when the run has ended: {"status": "completed" | "diverged", ...}
    OUT/checkpoints/NAME/        the run's checkpoints while it runs (removed once it has ended)

A run with an ``outcome.json`` is done and skipped. Any other run (re)starts with ``save`` and
``load`` both set to its checkpoint directory, so it continues after its last checkpoint
(``save_interval`` of the training section); a run stopped before its first checkpoint starts
again from step 0 (its partial run directory is cleared first). A run that diverges (mhc-train's
exit status 3: non-finite steps in a row) is a result of the study, not a failure: it is recorded
and the study goes on. SIGTERM to the study is passed to the running training, which saves and
exits 75; the study then stops with 75, to be run again to resume.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from mhc_megatron.compare.cli import training_command
from mhc_megatron.study.config import StudyConfig, StudyRun
from mhc_megatron.training.checkpoint_files import holds_checkpoint

TRAINING_FILE = "training.yaml"
OUTCOME_FILE = "outcome.json"
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 75


class StudyStopped(SystemExit):
    """A run failed or was interrupted; ``code`` is the study's exit status."""


def run_dir(out: Path, run: StudyRun) -> Path:
    return out / "runs" / run.name


def read_outcome(out: Path, run: StudyRun) -> dict | None:
    """The run's ``outcome.json`` as a dict, ``None`` while the run has not ended."""
    path = run_dir(out, run) / OUTCOME_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_training_file(config: StudyConfig, out: Path) -> Path:
    """``OUT/training.yaml``; refuses an ``OUT`` whose runs were trained with another training section."""
    path = out / TRAINING_FILE
    if path.is_file():
        existing = yaml.safe_load(path.read_text())
        if existing != config.training:
            changed = sorted(key for key in set(existing) | set(config.training)
                             if existing.get(key) != config.training.get(key))
            raise StudyStopped(
                f"mhc-study: {out} holds a study trained with other settings (training keys {changed} differ); "
                "choose another --out, or restore those settings to resume it"
            )
        return path
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.training, sort_keys=False))
    return path


def run_study(config: StudyConfig, out: Path, overrides: Sequence[str] = (), nproc_per_node: int = 1,
              dry_run: bool = False) -> None:
    """Train every run of ``config`` that has not ended, in order, into ``out``; each run in one
    process, or ``nproc_per_node`` under ``torch.distributed.run``."""
    training_file = write_training_file(config, out) if not dry_run else out / TRAINING_FILE
    runs = config.runs()
    started = time.monotonic()
    for index, run in enumerate(runs, start=1):
        outcome = read_outcome(out, run)
        if outcome is not None:
            print(f"# run {index}/{len(runs)} {run.name}: {outcome['status']} earlier, skipped", flush=True)
            continue
        checkpoints = out / "checkpoints" / run.name
        command = training_command(
            training_file, [*overrides, *run.overrides(), f"save={checkpoints}", f"load={checkpoints}"],
            run.mode, run_dir(out, run), nproc_per_node,
        )
        resuming = holds_checkpoint(checkpoints)
        print(f"# run {index}/{len(runs)} {run.name} ({'resuming' if resuming else 'starting'}; "
              f"study time so far {_minutes(time.monotonic() - started)})", flush=True)
        print(shlex.join(command), flush=True)
        if dry_run:
            continue
        if not resuming and run_dir(out, run).exists():
            shutil.rmtree(run_dir(out, run))  # stopped before its first checkpoint: nothing to continue
        run_started = time.monotonic()
        status = _run_forwarding_sigterm(command)
        if status == EXIT_INTERRUPTED:
            raise StudyStopped(EXIT_INTERRUPTED)
        if status not in (0, EXIT_DIVERGED):
            how = f"was killed by signal {-status}" if status < 0 else f"failed with exit code {status}"
            raise StudyStopped(f"mhc-study: run {run.name} {how} (its output is above); fix it and run the same "
                               "command again to resume")
        outcome = {"status": "completed" if status == 0 else "diverged", "exit_status": status,
                   "seconds": round(time.monotonic() - run_started, 1)}
        (run_dir(out, run) / OUTCOME_FILE).write_text(json.dumps(outcome) + "\n")
        shutil.rmtree(checkpoints, ignore_errors=True)
        print(f"# run {run.name}: {outcome['status']} in {_minutes(outcome['seconds'])}", flush=True)


def _run_forwarding_sigterm(command: list[str]) -> int:
    """Run ``command``; a SIGTERM to this process goes to it (it saves and exits 75)."""
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"
