"""Training checkpoints: one directory per saved iteration, and a tracker naming the latest.

Layout of a ``save`` directory (Megatron-LM's)::

    SAVE/iter_0000100/          a dist_checkpointing checkpoint: model chunks, optimizer, train state
    SAVE/latest_checkpointed_iteration.txt    "100", written after the save completed on every rank

``load`` may name such a directory (its latest iteration is loaded) or one ``iter_*`` directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mhc_megatron.megatron.model.checkpointing import load_checkpoint, save_checkpoint

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_directory(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


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
    tracker = load_dir / TRACKER
    if not tracker.is_file():
        raise ValueError(
            f"{str(load_dir)!r} (load) is neither a checkpoint nor a save directory: it has no {TRACKER}"
        )
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} must hold an iteration number, got {text!r}")
    directory = iteration_directory(load_dir, int(text))
    if not directory.is_dir():
        raise ValueError(f"{tracker} names iteration {text}, but {directory} does not exist")
    return directory


def save_training_checkpoint(save_dir, iteration: int, model_chunks, optimizer, config, train_state: dict) -> Path:
    """Save iteration ``iteration`` under ``save_dir`` on every rank, then advance the tracker."""
    directory = iteration_directory(save_dir, iteration)
    save_checkpoint(model_chunks, config, directory, optimizer=optimizer, train_state=train_state)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        partial = Path(save_dir) / f".{TRACKER}.partial"
        partial.write_text(f"{iteration}\n")
        os.replace(partial, Path(save_dir) / TRACKER)
    torch.distributed.barrier()
    return directory


def load_training_checkpoint(load_dir, model_chunks, config, optimizer=None) -> tuple[Path, dict]:
    """Load the checkpoint ``load_dir`` stands for into the model (and ``optimizer``, unless
    ``None``: weights only); returns its directory and saved train state."""
    directory = resolve_checkpoint(load_dir)
    return directory, load_checkpoint(model_chunks, config, directory, optimizer=optimizer)
