"""Distributed checkpoints of hyper-connected models with megatron-core's ``dist_checkpointing``.

A checkpoint holds the sharded state of every model chunk plus a small ``mhc`` record of the
architecture (``hc_mode``, ``num_streams``, ``hidden_size``, ``num_layers``, ...), and optionally the
optimizer's sharded state and a picklable ``train_state`` (iteration, scheduler, ...). Because
tensors are saved by their global keys and shapes, a checkpoint saved under one TP/PP/VPP layout
loads under another (the distributed optimizer's state too: it is saved fully reshardable).
``load_checkpoint`` checks the record and every tensor's key and global shape against the model
before it reads any weight, so a mismatched checkpoint raises and leaves the model untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.utils import unwrap_model

from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig

# The distributed optimizer's state in a layout-independent form (plain optimizers ignore it).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

ARCHITECTURE_FIELDS = ("hc_mode", "num_streams", "hc_collapse", "hidden_size", "num_layers", "num_moe_experts")


def architecture_record(config: MhcTransformerConfig) -> dict:
    record = {field: getattr(config, field) for field in ARCHITECTURE_FIELDS}
    record["num_streams"] = config.stream_count
    return record


def check_architecture(saved: dict | None, config: MhcTransformerConfig, directory: str | Path) -> None:
    """Raise ``ValueError`` naming the first field of ``architecture_record(config)`` that the record
    ``saved`` with checkpoint ``directory`` (``None``: it has none) holds with another value."""
    if saved is None:
        raise ValueError(f"checkpoint {str(directory)!r} has no 'mhc' architecture record")
    for field, value in architecture_record(config).items():
        if saved.get(field) != value:
            raise ValueError(
                f"checkpoint {str(directory)!r} was saved with {field}={saved.get(field)!r}, "
                f"but the config has {field}={value!r}"
            )


def _chunk_keys(model_chunks: list[torch.nn.Module]) -> list[str]:
    """megatron's naming: ``model`` for one chunk, ``model0``, ``model1``, ... for virtual stages."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_state(model_chunks: list[torch.nn.Module]) -> dict:
    """The chunks' sharded state under their own keys (DDP / Float16Module wrappers add none)."""
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_chunk_keys(model_chunks), unwrap_model(model_chunks))}


def save_checkpoint(
    model_chunks: list[torch.nn.Module],
    config: MhcTransformerConfig,
    directory: str | Path,
    optimizer=None,
    train_state: dict | None = None,
) -> None:
    """Save ``model_chunks`` (this rank's chunks), and ``optimizer``'s state and ``train_state`` when
    given, to ``directory``, collectively over all ranks."""
    directory = Path(directory)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = _sharded_state(model_chunks)
    state["mhc"] = architecture_record(config)
    if train_state is not None:
        state["train_state"] = train_state
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_OPTIMIZER_METADATA)
    dist_checkpointing.save(state, str(directory))


def _flat_tensors(state: dict):
    for value in state.values():
        if isinstance(value, dict):
            yield from _flat_tensors(value)
        elif isinstance(value, ShardedTensor):
            yield value


def read_checkpoint_metadata(directory: str | Path) -> tuple[dict, dict]:
    """``(common state, tensor metadata)`` of the checkpoint ``directory``; a ``ValueError`` when its
    metadata is missing or unreadable."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
        saved_tensors = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as error:  # a missing or corrupt metadata file, of whatever kind
        raise ValueError(f"{str(directory)!r} is not a readable distributed checkpoint: {error}") from error
    return common, saved_tensors


def check_saved_tensors(tensors, saved_tensors: dict, directory: str | Path) -> None:
    """Raise ``ValueError`` naming the first of ``tensors`` (``ShardedTensor``s) that the checkpoint
    ``directory``, whose tensor metadata is ``saved_tensors``, lacks or holds with another global shape."""
    for tensor in tensors:
        if tensor.key not in saved_tensors:
            raise ValueError(f"checkpoint {str(directory)!r} has no tensor {tensor.key!r}")
        saved_shape = tuple(saved_tensors[tensor.key].global_shape)
        if saved_shape != tuple(tensor.global_shape):
            raise ValueError(
                f"checkpoint tensor {tensor.key!r} has global shape {saved_shape}, "
                f"the model expects {tuple(tensor.global_shape)}"
            )


def check_checkpoint(
    model_chunks: list[torch.nn.Module], config: MhcTransformerConfig, directory: str | Path, with_optimizer: bool = False
) -> dict:
    """Raise ``ValueError`` naming the difference if ``directory`` cannot be loaded into the model
    (and, ``with_optimizer``, holds no optimizer state); return the saved ``train_state`` (or ``{}``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {str(directory)!r} does not exist")
    common, saved_tensors = read_checkpoint_metadata(directory)
    check_architecture(common.get("mhc"), config, directory)
    check_saved_tensors(_flat_tensors(_sharded_state(model_chunks)), saved_tensors, directory)
    if with_optimizer and not any(key.startswith("optimizer.") for key in saved_tensors):
        raise ValueError(
            f"checkpoint {str(directory)!r} holds no optimizer state; load only its weights (finetune=true) "
            "or give a checkpoint saved by a training run"
        )
    return common.get("train_state") or {}


class _NoneWhenMissing(dict):
    def __missing__(self, key):
        return None


def _prepare_torch_adam_for_loading(optimizer) -> None:
    """Let megatron's distributed optimizer load into torch's Adam (no Apex / Transformer Engine).

    megatron-core 0.19.2 has three gaps on that path, all about Adam's per-parameter ``step``:
    building the loading state dict of an optimizer that has not stepped yet asserts that every
    parameter has a ``step`` (we create the zero state first; the checkpoint replaces it);
    restoring the parameter state indexes the loaded tensors by every state key, ``step``
    included, which the checkpoint keeps elsewhere (we answer ``None`` for it, which megatron
    skips); and the restored ``step`` is one tensor shared by every parameter, which torch's Adam
    then increments once per parameter (``_unshare_adam_steps`` gives each its own copy).
    """
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam) or not hasattr(part, "_set_main_param_and_optimizer_states"):
            continue
        part.init_state_fn(inner, part.config)
        for state in inner.state.values():
            state.setdefault("step", torch.tensor(0.0))
        set_states = part._set_main_param_and_optimizer_states
        part._set_main_param_and_optimizer_states = lambda param, tensors, set_states=set_states: set_states(
            param, _NoneWhenMissing(tensors)
        )


def _unshare_adam_steps(optimizer) -> None:
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def load_checkpoint(
    model_chunks: list[torch.nn.Module], config: MhcTransformerConfig, directory: str | Path, optimizer=None
) -> dict:
    """Load ``directory`` into ``model_chunks`` (any TP/PP/VPP layout), and into ``optimizer`` when
    given, after ``check_checkpoint``; return the saved ``train_state`` (``{}`` if none)."""
    train_state = check_checkpoint(model_chunks, config, directory, with_optimizer=optimizer is not None)
    state = _sharded_state(model_chunks)
    if optimizer is not None:
        _prepare_torch_adam_for_loading(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(state, str(directory))
    for key, chunk in zip(_chunk_keys(model_chunks), unwrap_model(model_chunks)):
        chunk.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    return train_state
