"""Training checkpoints: one directory per saved iteration, and a tracker naming the latest.

Layout of a ``save`` directory (Megatron-LM's)::

    SAVE/iter_0000100/          a dist_checkpointing checkpoint: model chunks, optimizer, train state
    SAVE/latest_checkpointed_iteration.txt    "100", written after the save completed on every rank

A save is written to ``SAVE/iter_0000100.partial``, renamed to ``iter_0000100`` once every rank has
finished, and only then named by the tracker (itself replaced atomically). A job killed at any
moment of a save therefore leaves the tracker naming a complete checkpoint; what the save left
behind (``unfinished_saves``) is ignored on resume, with a message, and replaced by the next save
of that iteration.

``load`` may name such a directory (its latest iteration is loaded) or one ``iter_*`` directory;
``checkpoint_files`` reads the layout (without torch) and resolves ``load``. These functions write
the megatron engine's checkpoints (``deepspeed_engine`` writes DeepSpeed's in the same layout,
``megatron_engine`` loads with ``checkpointing.load_checkpoint``); ``load_weights`` reads the weights
of either.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mhc_megatron.megatron.model.checkpointing import load_checkpoint, save_checkpoint
from mhc_megatron.training.checkpoint_files import (
    PARTIAL,
    TRACKER,
    checkpoint_engine,
    iteration_directory,
    tracked_iteration,
)


def save_iteration(save_dir, iteration: int, write: Callable[[Path], None],
                   other_trackers: dict[str, str] | None = None) -> Path:
    """Save iteration ``iteration`` under ``save_dir`` on every rank, as every engine does (module
    docstring): ``write(partial)`` writes this rank's part into ``iter_N.partial``, which is renamed
    ``iter_N`` once every rank has written, then ``other_trackers`` (file name -> text) and last the
    tracker are replaced atomically."""
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
    write(partial)
    torch.distributed.barrier()
    if rank0:
        os.replace(partial, directory)
        for name, text in {**(other_trackers or {}), TRACKER: f"{iteration}\n"}.items():
            written = Path(save_dir) / f".{name}{PARTIAL}"
            written.write_text(text)
            os.replace(written, Path(save_dir) / name)
    torch.distributed.barrier()
    return directory


def save_training_checkpoint(save_dir, iteration: int, model_chunks, optimizer, config, train_state: dict) -> Path:
    """Save the megatron engine's ``model_chunks``, ``optimizer`` and ``train_state`` as iteration
    ``iteration`` under ``save_dir`` (``save_iteration``)."""

    def write(partial: Path) -> None:
        save_checkpoint(model_chunks, config, partial, optimizer=optimizer, train_state=train_state)

    return save_iteration(save_dir, iteration, write)


def load_weights(model_chunks, config, directory: Path) -> None:
    """Load only the weights of checkpoint ``directory``, written by either engine, into the
    unwrapped ``model_chunks`` (before an engine wraps them: ``finetune``)."""
    if checkpoint_engine(directory) == "deepspeed":
        from mhc_megatron.training.deepspeed_engine import load_deepspeed_weights

        load_deepspeed_weights(model_chunks, config, directory)
    else:
        load_checkpoint(model_chunks, config, directory)
