"""``mhc-train`` (one process) that kills itself with SIGKILL inside the save of one iteration.

Usage: ``python crash_during_save.py --iteration 2 --at {writing,renaming,tracking} key=value...``:
``writing`` dies with the checkpoint's files half written (the writer's output truncated to half its
size: the writer may work in another process, so the kill comes after it), ``renaming`` just before
the finished ``iter_N.partial`` is renamed, ``tracking`` just before the tracker names iteration N.
"""

import argparse
import os
import signal
import sys

from pathlib import Path

from mhc_megatron.training import checkpoint_files, checkpoints, megatron_engine
from mhc_megatron.training.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save(iteration: int, at: str) -> None:
    directory = checkpoint_files.iteration_directory("", iteration).name
    saving = False
    save_training_checkpoint, replace, save_checkpoint = megatron_engine.save_training_checkpoint, os.replace, checkpoints.save_checkpoint

    def watched_save_training_checkpoint(save_dir, number, *args, **kwargs):
        nonlocal saving
        saving = number == iteration
        return save_training_checkpoint(save_dir, number, *args, **kwargs)

    def watched_replace(source, target):
        if saving and at == "renaming" and str(source).endswith(directory + checkpoint_files.PARTIAL):
            die()
        if saving and at == "tracking" and str(target).endswith(checkpoint_files.TRACKER):
            die()
        return replace(source, target)

    def watched_save_checkpoint(model_chunks, config, directory, **kwargs):
        save_checkpoint(model_chunks, config, directory, **kwargs)
        if saving and at == "writing":
            for path in Path(directory).iterdir():
                os.truncate(path, path.stat().st_size // 2)
            die()

    megatron_engine.save_training_checkpoint = watched_save_training_checkpoint
    checkpoints.save_checkpoint = watched_save_checkpoint
    os.replace = watched_replace


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--at", choices=("writing", "renaming", "tracking"), required=True)
    args, overrides = parser.parse_known_args()
    kill_during_save(args.iteration, args.at)
    main(overrides)
    sys.exit(0)
