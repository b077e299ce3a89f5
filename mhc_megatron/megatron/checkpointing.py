"""Distributed checkpoints of hyper-connected models with megatron-core's ``dist_checkpointing``.

A checkpoint holds the sharded state of every model chunk plus a small ``mhc`` record of the
architecture (``hc_mode``, ``num_streams``, ``hidden_size``, ``num_layers``, ...). Because tensors are
saved by their global keys and shapes, a checkpoint saved under one TP/PP/VPP layout loads under
another. ``load_checkpoint`` checks the record and every tensor's key and global shape against the
model before it reads any weight, so a mismatched checkpoint raises and leaves the model untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from mhc_megatron.megatron.config import MhcTransformerConfig

ARCHITECTURE_FIELDS = ("hc_mode", "num_streams", "hc_collapse", "hidden_size", "num_layers", "num_moe_experts")


def architecture_record(config: MhcTransformerConfig) -> dict:
    record = {field: getattr(config, field) for field in ARCHITECTURE_FIELDS}
    record["num_streams"] = config.stream_count
    return record


def _chunk_keys(model_chunks: list[torch.nn.Module]) -> list[str]:
    """megatron's naming: ``model`` for one chunk, ``model0``, ``model1``, ... for virtual stages."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_state(model_chunks: list[torch.nn.Module]) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_chunk_keys(model_chunks), model_chunks)}


def save_checkpoint(model_chunks: list[torch.nn.Module], config: MhcTransformerConfig, directory: str | Path) -> None:
    """Save ``model_chunks`` (this rank's chunks) to ``directory``, collectively over all ranks."""
    directory = Path(directory)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = _sharded_state(model_chunks)
    state["mhc"] = architecture_record(config)
    dist_checkpointing.save(state, str(directory))


def _flat_tensors(state: dict):
    for value in state.values():
        if isinstance(value, dict):
            yield from _flat_tensors(value)
        elif isinstance(value, ShardedTensor):
            yield value


def check_checkpoint(model_chunks: list[torch.nn.Module], config: MhcTransformerConfig, directory: str | Path) -> None:
    """Raise ``ValueError`` naming the difference if ``directory`` cannot be loaded into the model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {str(directory)!r} does not exist")
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
        saved_tensors = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as error:  # a missing or corrupt metadata file, of whatever kind
        raise ValueError(f"{str(directory)!r} is not a readable distributed checkpoint: {error}") from error
    saved = common.get("mhc")
    if saved is None:
        raise ValueError(f"checkpoint {str(directory)!r} has no 'mhc' architecture record")
    expected = architecture_record(config)
    for field, value in expected.items():
        if saved.get(field) != value:
            raise ValueError(
                f"checkpoint {str(directory)!r} was saved with {field}={saved.get(field)!r}, "
                f"but the config has {field}={value!r}"
            )
    for tensor in _flat_tensors(_sharded_state(model_chunks)):
        if tensor.key not in saved_tensors:
            raise ValueError(f"checkpoint {str(directory)!r} has no tensor {tensor.key!r}")
        saved_shape = tuple(saved_tensors[tensor.key].global_shape)
        if saved_shape != tuple(tensor.global_shape):
            raise ValueError(
                f"checkpoint tensor {tensor.key!r} has global shape {saved_shape}, "
                f"the model expects {tuple(tensor.global_shape)}"
            )


def load_checkpoint(model_chunks: list[torch.nn.Module], config: MhcTransformerConfig, directory: str | Path) -> None:
    """Load ``directory`` into ``model_chunks`` (any TP/PP/VPP layout), after ``check_checkpoint``."""
    check_checkpoint(model_chunks, config, directory)
    loaded = dist_checkpointing.load(_sharded_state(model_chunks), str(directory))
    for key, chunk in zip(_chunk_keys(model_chunks), model_chunks):
        chunk.load_state_dict(loaded[key], strict=True)
