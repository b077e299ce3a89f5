"""Training checkpoints: one directory per saved iteration, and a tracker naming the latest.

Layout of a ``save`` directory (Megatron-LM's)::

    SAVE/iter_0000100/          a dist_checkpointing checkpoint: model chunks, optimizer, train state
    SAVE/latest_checkpointed_iteration.txt    "100", written after the save completed on every rank

A save is written to ``SAVE/iter_0000100.partial``, renamed to ``iter_0000100`` once every rank has
finished, and only then named by the tracker (itself replaced atomically). A job killed at any
moment of a save therefore leaves the tracker naming a complete checkpoint; what the save left
behind (``unfinished_saves``) is ignored on resume, with a message, and replaced by the next save
of that iteration.

``load`` may name such a directory (its latest iteration is loaded) or one ``iter_*`` directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mhc_megatron.megatron.model.checkpointing import load_checkpoint, save_checkpoint

TRACKER = "latest_checkpointed_iteration.txt"


PARTIAL = ".partial"


def iteration_directory(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def tracked_iteration(save_dir: str | Path) -> int | None:
    """The iteration the tracker of ``save_dir`` names (``None``: no tracker); an error if unreadable."""
    tracker = Path(save_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} must hold an iteration number, got {text!r}")
    return int(text)


def unfinished_saves(save_dir: str | Path) -> list[Path]:
    """What interrupted saves left in ``save_dir``: ``iter_*.partial`` directories, and checkpoint
    directories of iterations after the tracked one (renamed, but the tracker was not yet advanced)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    tracked = tracked_iteration(save_dir)
    left = []
    for path in sorted(save_dir.glob("iter_*")):
        number = path.name.removeprefix("iter_").removesuffix(PARTIAL)
        if path.name.endswith(PARTIAL) or (number.isdigit() and (tracked is None or int(number) > tracked)):
            left.append(path)
    return left


def has_checkpoints(directory: str | Path) -> bool:
    """Whether ``directory`` is a save directory with at least one completed checkpoint."""
    return (Path(directory) / TRACKER).is_file()


def holds_checkpoint(directory: str | Path) -> bool:
    """Whether ``load=directory`` has something to load: a save directory or one checkpoint."""
    return has_checkpoints(directory) or (Path(directory) / "metadata.json").is_file()


def resolve_checkpoint(load_dir: str | Path) -> Path:
    """The checkpoint directory ``load_dir`` stands for: itself, or the tracker's latest iteration."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise ValueError(f"checkpoint directory {str(load_dir)!r} (load) does not exist")
    if (load_dir / "metadata.json").is_file():
        return load_dir
    iteration = tracked_iteration(load_dir)
    if iteration is None:
        raise ValueError(
            f"{str(load_dir)!r} (load) is neither a checkpoint nor a save directory: it has no {TRACKER}"
        )
    directory = iteration_directory(load_dir, iteration)
    if not directory.is_dir():
        raise ValueError(f"{load_dir / TRACKER} names iteration {iteration}, but {directory} does not exist")
    return directory


def save_training_checkpoint(save_dir, iteration: int, model_chunks, optimizer, config, train_state: dict) -> Path:
    """Save iteration ``iteration`` under ``save_dir`` on every rank: into ``iter_N.partial``, renamed
    ``iter_N`` once every rank has written its part, then the tracker advanced (module docstring)."""
    directory = iteration_directory(save_dir, iteration)
    partial = directory.with_name(directory.name + PARTIAL)
    if tracked_iteration(save_dir) == iteration:
        raise ValueError(f"refusing to save over {directory}: it is the checkpoint {Path(save_dir) / TRACKER} names")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        for stale in (partial, directory):  # an earlier save of this iteration that did not finish
            if stale.exists():
                shutil.rmtree(stale)
    torch.distributed.barrier()
    save_checkpoint(model_chunks, config, partial, optimizer=optimizer, train_state=train_state)
    torch.distributed.barrier()
    if rank0:
        os.replace(partial, directory)
        tracker = Path(save_dir) / f".{TRACKER}{PARTIAL}"
        tracker.write_text(f"{iteration}\n")
        os.replace(tracker, Path(save_dir) / TRACKER)
    torch.distributed.barrier()
    return directory


def load_training_checkpoint(load_dir, model_chunks, config, optimizer=None) -> tuple[Path, dict]:
    """Load the checkpoint ``load_dir`` stands for into the model (and ``optimizer``, unless
    ``None``: weights only); returns its directory and saved train state."""
    directory = resolve_checkpoint(load_dir)
    return directory, load_checkpoint(model_chunks, config, directory, optimizer=optimizer)
