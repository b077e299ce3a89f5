"""The files of a ``save`` directory, read without torch: which iteration the tracker names, what an
interrupted save left, and which checkpoint ``load`` stands for (``checkpoints`` writes and loads them).

Layout (Megatron-LM's)::

    SAVE/iter_0000100/          a dist_checkpointing checkpoint (its metadata.json marks one), or with
                                engine=deepspeed DeepSpeed's checkpoint (deepspeed.json marks one)
    SAVE/iter_0000100.partial/  a save in progress, or one that was interrupted
    SAVE/latest_checkpointed_iteration.txt    "100", written last, once the save completed on every rank
    SAVE/latest                 engine=deepspeed: "iter_0000100", DeepSpeed's tracker, written with ours
"""

from __future__ import annotations

from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_TRACKER = "latest"
PARTIAL = ".partial"

# The file that marks a checkpoint directory of each engine (megatron's: dist_checkpointing's metadata).
ENGINE_MARKERS = {"megatron": "metadata.json", "deepspeed": "deepspeed.json"}
DEEPSPEED_RECORD = ENGINE_MARKERS["deepspeed"]


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


def checkpoint_engine(directory: str | Path) -> str | None:
    """The engine whose checkpoint ``directory`` is (``"megatron"``, ``"deepspeed"``), else ``None``."""
    for engine, marker in ENGINE_MARKERS.items():
        if (Path(directory) / marker).is_file():
            return engine
    return None


def holds_checkpoint(directory: str | Path) -> bool:
    """Whether ``load=directory`` has something to load: a save directory or one checkpoint."""
    return has_checkpoints(directory) or checkpoint_engine(directory) is not None


def resolve_checkpoint(load_dir: str | Path) -> Path:
    """The checkpoint directory ``load_dir`` stands for: itself, or the tracker's latest iteration."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise ValueError(f"checkpoint directory {str(load_dir)!r} (load) does not exist")
    if checkpoint_engine(load_dir) is not None:
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
