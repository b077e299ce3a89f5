"""Layout-independent initial weights: one seed gives one model, whatever the parallel layout.

megatron-core draws a parameter's initial values from the random state of the process that holds
it, in the order that process builds its modules: a pipeline stage, an expert rank or (without
``use_cpu_initialization``) a tensor rank draws other values than a single process would. This
module draws every parameter again, after megatron has built the chunk, from the run's seed and
the parameter's global identity alone, so that a single process and every TP / SP / PP / VPP / EP /
DP layout start from the same model.

Convention (tests/megatron/test_initialization.py holds every layout to it):

identity  the parameter's name in the single-process model (PP = 1, EP = 1): in ``decoder.layers.<i>``,
          ``i`` is the global layer index (``layer_number - 1``, across pipeline stages and virtual
          chunks); in ``experts.local_experts.<j>``, ``j`` is the global expert index; the output
          layer that a later pipeline stage keeps tied to the word embeddings (megatron marks both
          copies ``shared_embedding``) is ``embedding.word_embeddings.weight``.
values    the full (unsharded) tensor, made in float32 and cast to the parameter's dtype: normal
          ``(mean, std)`` of the init method megatron gives that parameter (``config.init_method``,
          ``output_layer_init_method``, ``embedding_init_method``: megatron's ``init_method_normal``
          family) or of our modules (``phi_init_std``); the constant megatron sets (zeros for biases,
          ones for norm weights, zeros with ``layernorm_zero_centered_gamma``). The hyper-connection
          parameters other than ``phi`` are left as their constructor set them: constants and, in
          ``hc`` mode, static parts computed from the global sub-layer index, so the same everywhere.
blocks    a drawn tensor is cut along its block axis (its ``partition_dim`` if megatron marks it
          tensor-parallel, which it does at TP = 1 too; else 0) into blocks of ``rows`` slices,
          ``rows = max(1, BLOCK_ELEMENTS // elements of one slice)``; block ``k`` is drawn as one
          contiguous ``[rows, other axes in order]`` tensor by a CPU ``torch.Generator`` seeded with
          the first 8 bytes (little-endian) of ``blake2b("<seed>/<identity>/<k>")``.
shard     along the block axis the full tensor is split into ``size * stride`` equal parts and
          tensor rank ``r`` of ``size`` holds parts ``r, r + size, ...`` (megatron's
          ``partition_stride``), in the tensor-parallel group (the expert tensor-parallel group for
          routed experts); a replicated parameter is the full tensor.

Cost: a rank draws only the blocks that overlap its shard, so about the parameters it holds (plus
one block per shard edge), on the CPU whatever the device (the values do not depend on the
device), in pieces of at most ``BLOCK_ELEMENTS`` floats, about as fast as megatron's own CPU init.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.modules import HyperConnection, StreamCollapse

BLOCK_ELEMENTS = 1 << 22  # values per drawn block (16 MiB of float32)

TIED_EMBEDDING = "embedding.word_embeddings.weight"

# (module slot, parameter) -> the config field holding megatron's init method for it.
_DRAWN = {
    ("word_embeddings", "weight"): "embedding_init_method",
    ("position_embeddings", "weight"): "embedding_init_method",
    ("linear_qkv", "weight"): "init_method",
    ("linear_fc1", "weight"): "init_method",
    ("router", "weight"): "init_method",
    ("router", "bias"): "init_method",
    ("shared_experts", "gate_weight"): "init_method",
    ("linear_proj", "weight"): "output_layer_init_method",
    ("linear_fc2", "weight"): "output_layer_init_method",
}
_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
# Transformer Engine's linears with a fused input norm carry the norm's parameters.
_FUSED_NORM = {"layer_norm_weight": "weight", "layer_norm_bias": "bias"}
_BUILT_HYPER_CONNECTION = ("alpha", "bias", "weight", "static_pre", "static_post", "static_res")


@dataclass(frozen=True)
class Normal:
    """Values drawn from ``normal(mean, std)``."""

    std: float
    mean: float = 0.0


@dataclass(frozen=True)
class Constant:
    """Every value ``value``."""

    value: float


@dataclass(frozen=True)
class Located:
    """One parameter of a chunk: its local name, global identity, owning module, and whether it
    belongs to a routed expert (sharded over the expert tensor-parallel group)."""

    name: str
    identity: str
    parameter: nn.Parameter
    owner: nn.Module
    expert: bool


def initialize_parameters(chunk: nn.Module, config: MhcTransformerConfig, seed: int) -> None:
    """Set every parameter of ``chunk`` (one model chunk of this rank) to its initial values under
    ``seed`` (module docstring). A parameter without a rule, or on the meta device, raises
    ``ValueError`` before any parameter changes."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    rules = [(located, initial_rule(located, config)) for located in locate_parameters(chunk)]
    for located, _ in rules:
        if located.parameter.is_meta:
            raise ValueError(f"{located.name} is on the meta device: it has no values to initialise")
    with torch.no_grad():
        for located, rule in rules:
            if rule is not None:
                located.parameter.copy_(shard_values(located, rule, seed))


def locate_parameters(chunk: nn.Module) -> list[Located]:
    """Every parameter of ``chunk`` once, with its global identity (module docstring)."""
    found, seen = [], set()

    def visit(module: nn.Module, local: str, identity: str, expert: bool) -> None:
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                tied = getattr(parameter, "shared_embedding", False)
                global_name = TIED_EMBEDDING if tied else identity + name
                found.append(Located(local + name, global_name, parameter, module, expert))
        for local_name, global_name, child, is_expert in _children(module):
            visit(child, f"{local}{local_name}.", f"{identity}{global_name}.", expert or is_expert)

    visit(chunk, "", "", False)
    return found


def _children(module: nn.Module) -> Iterator[tuple[str, str, nn.Module, bool]]:
    """``(local name, global name, child, is a routed expert)`` of each child; the local experts of
    a ``SequentialMLP`` are listed directly, under their global expert index."""
    for name, child in module.named_children():
        if isinstance(module, SequentialMLP) and name == "local_experts":
            offset = module.ep_group.rank() * module.num_local_experts
            for index, expert in enumerate(child):
                yield f"{name}.{index}", f"{name}.{offset + index}", expert, True
        elif isinstance(child, TransformerLayer):
            yield name, str(child.layer_number - 1), child, False
        else:
            yield name, name, child, False


def initial_rule(located: Located, config: MhcTransformerConfig) -> Normal | Constant | None:
    """How ``located``'s full tensor starts; ``None``: as its hyper-connection module built it."""
    if isinstance(located.owner, (HyperConnection, StreamCollapse)):
        return _hyper_connection_rule(located)
    return megatron_rule(located.identity, config)


def _hyper_connection_rule(located: Located) -> Normal | None:
    name = located.name.rsplit(".", 1)[-1]
    if name == "phi":
        return Normal(located.owner.phi_init_std)
    if name in _BUILT_HYPER_CONNECTION:
        return None
    raise ValueError(f"no initial-value rule for hyper-connection parameter {located.identity!r}")


def megatron_rule(identity: str, config: MhcTransformerConfig) -> Normal | Constant:
    """The initial values megatron-core gives the GPT parameter named ``identity``, from its slot
    and name (the same under the local and the Transformer Engine specs)."""
    parts = identity.split(".")
    slot, name = (parts[-2], parts[-1]) if len(parts) > 1 else ("", parts[-1])
    if (slot, name) in _DRAWN:
        return normal_of(config, _DRAWN[slot, name])
    if (slot, name) == ("output_layer", "weight"):
        return normal_of(config, "embedding_init_method" if config.use_mup else "init_method")
    if slot.endswith("layernorm") and name in ("weight", "bias"):
        return _norm_rule(name, config)
    if slot in _LINEARS and name in _FUSED_NORM:
        return _norm_rule(_FUSED_NORM[name], config)
    if slot in _LINEARS and name == "bias":
        return Constant(0.0)
    raise ValueError(
        f"no initial-value rule for parameter {identity!r}: layout-independent initialisation knows "
        "megatron-core's GPT parameters (embeddings, attention, MLP, routed experts through SequentialMLP, "
        "norms, output layer) and the hyper-connection modules"
    )


def _norm_rule(name: str, config: MhcTransformerConfig) -> Constant:
    if name == "bias" or config.layernorm_zero_centered_gamma:
        return Constant(0.0)
    return Constant(1.0)


def normal_of(config: MhcTransformerConfig, field: str) -> Normal:
    """The ``Normal`` of ``config.<field>``, which must be megatron's ``init_method_normal`` kind
    (``functools.partial(torch.nn.init.normal_, mean=..., std=...)``)."""
    method = getattr(config, field)
    if not (
        isinstance(method, functools.partial)
        and method.func is torch.nn.init.normal_
        and not method.args
        and set(method.keywords) <= {"mean", "std"}
    ):
        raise ValueError(
            f"config.{field} must be a normal init (megatron.core.utils.init_method_normal or "
            f"scaled_init_method_normal) for layout-independent initialisation, got {method!r}"
        )
    return Normal(std=float(method.keywords.get("std", 1.0)), mean=float(method.keywords.get("mean", 0.0)))


def block_seed(seed: int, identity: str, block: int) -> int:
    """The generator seed of block ``block`` of the tensor ``identity`` under the run's ``seed``."""
    digest = hashlib.blake2b(f"{seed}/{identity}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Sharding:
    """Where a rank's tensor sits in the full one: ``axis`` (the block axis), the full tensor's
    ``shape``, and the ``[start, stop)`` ranges along ``axis`` that the rank holds, in order."""

    axis: int
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]


def sharding_of(located: Located) -> Sharding:
    """The full tensor and this rank's part of it, from megatron's tensor-parallel attributes
    (``located`` has at least one axis)."""
    local = tuple(located.parameter.shape)
    if not getattr(located.parameter, "tensor_model_parallel", False):
        return Sharding(0, local, ((0, local[0]),))
    axis = located.parameter.partition_dim
    stride = getattr(located.parameter, "partition_stride", 1)
    if located.expert:
        size = parallel_state.get_expert_tensor_parallel_world_size()
        rank = parallel_state.get_expert_tensor_parallel_rank()
    else:
        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
    if local[axis] % stride:
        raise ValueError(
            f"{located.name}: {local[axis]} slices along axis {axis} do not split into partition_stride {stride}"
        )
    shape = local[:axis] + (local[axis] * size,) + local[axis + 1 :]
    part = local[axis] // stride
    ranges = tuple((index * part, (index + 1) * part) for index in range(rank, size * stride, size))
    return Sharding(axis, shape, ranges)


def shard_values(located: Located, rule: Normal | Constant, seed: int) -> torch.Tensor:
    """This rank's part of the full tensor of ``located`` under ``rule`` and ``seed``, float32,
    shaped like the parameter."""
    if isinstance(rule, Constant):
        return torch.full(located.parameter.shape, rule.value)
    if located.parameter.dim() == 0:
        return _draw_block(seed, located.identity, 0, (), rule)
    sharding = sharding_of(located)
    axis = sharding.axis
    block_axis_first = (sharding.shape[axis],) + sharding.shape[:axis] + sharding.shape[axis + 1 :]
    return _drawn_ranges(seed, located.identity, block_axis_first, sharding.ranges, rule).movedim(0, axis)


def _drawn_ranges(
    seed: int, identity: str, shape: tuple[int, ...], ranges: tuple[tuple[int, int], ...], rule: Normal
) -> torch.Tensor:
    """Slices ``ranges`` (ascending) along axis 0 of the full tensor ``shape`` (block axis first),
    drawing only the blocks that overlap them, each once."""
    slice_elements = 1
    for size in shape[1:]:
        slice_elements *= size
    rows = max(1, BLOCK_ELEMENTS // max(slice_elements, 1))
    pieces, drawn = [], (None, None)
    for start, stop in ranges:
        for block in range(start // rows, (stop - 1) // rows + 1):
            if drawn[0] != block:
                block_shape = (min(rows, shape[0] - block * rows),) + shape[1:]
                drawn = (block, _draw_block(seed, identity, block, block_shape, rule))
            first = block * rows
            pieces.append(drawn[1][max(start, first) - first : min(stop, first + rows) - first])
    return torch.cat(pieces)


def _draw_block(seed: int, identity: str, block: int, shape: tuple[int, ...], rule: Normal) -> torch.Tensor:
    generator = torch.Generator().manual_seed(block_seed(seed, identity, block))
    return torch.empty(shape, dtype=torch.float32).normal_(rule.mean, rule.std, generator=generator)
