"""The planner's inputs besides the cluster: the model (read from the repo's YAML configs or given
field by field) and the parallel layout to evaluate."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

import yaml

from mhc_megatron.method import HC_MODES, NUM_STREAMS, REBUILD_SCHEMES, RECOMPUTE_MODES, stream_count

RECOMPUTE = (*RECOMPUTE_MODES, "full")  # mHC's block recompute, or megatron's full-layer one


@dataclass(frozen=True)
class ModelSpec:
    """A GPT's shape (megatron-core's names). ``ffn_hidden_size`` defaults to 4 x hidden;
    ``num_query_groups`` to the head count (no grouped-query attention); with ``num_moe_experts`` set
    the MLP is a mixture of experts (``moe_ffn_hidden_size`` per expert, ``moe_router_topk`` of them
    per token, plus a shared expert of ``moe_shared_expert_intermediate_size``). ``bf16`` chooses 2
    bytes per activation element, else 4."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    swiglu: bool = False
    vocab_size: int = 50304
    num_streams: int = NUM_STREAMS
    hc_mode: str = "mhc"
    bf16: bool = True

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                     "global_batch_size", "vocab_size", "num_streams", "moe_router_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hc_mode not in HC_MODES:
            raise ValueError(f"hc_mode must be one of {HC_MODES}, got {self.hc_mode!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def moe(self) -> bool:
        return bool(self.num_moe_experts)

    @property
    def streams(self) -> int:
        """n: the residual streams carried between layers (1 for the plain residual model)."""
        return stream_count(self.hc_mode, self.num_streams)

    @property
    def element_bytes(self) -> int:
        return 2 if self.bf16 else 4

    def with_mode(self, hc_mode: str) -> ModelSpec:
        return replace(self, hc_mode=hc_mode)


def model_from_yaml(path: str | Path, **overrides) -> ModelSpec:
    """A ``ModelSpec`` from a training config (``configs/*.yaml``): the keys ``ModelSpec`` knows are
    read, the rest (optimizer, data, parallel sizes) ignored; ``overrides`` (not ``None``) win."""
    with open(path) as stream:
        config = yaml.safe_load(stream) or {}
    known = {f.name for f in fields(ModelSpec)}
    values = {key: value for key, value in config.items() if key in known}
    values.update({key: value for key, value in overrides.items() if value is not None})
    missing = [f.name for f in fields(ModelSpec) if f.default is MISSING and f.name not in values]
    if missing:
        raise ValueError(f"{path}: the model needs {missing} (in the file or as flags)")
    return ModelSpec(**values)


@dataclass(frozen=True)
class Layout:
    """How the job is split: tensor (``tp``), pipeline (``pp``, ``vpp`` chunks per stage), expert
    (``ep``) parallel sizes; the rest of the GPUs is data parallel. ``recompute``: ``none``,
    ``block`` (mHC block recompute of the stream states, ``L_r`` = the paper's optimum) or ``full``
    (megatron's full-layer recompute); ``rebuild``: how ``block`` rebuilds a block's states in
    backward, ``sublayer`` (one at a time, each replayed from the block start) or ``block`` (the
    paper's: all at once, one replay per state, up to ``L_r - 1`` held). ``overlap``: communication (pipeline p2p, TP/EP collectives,
    the data-parallel gradient reduction) runs beside compute, DualPipe-like; otherwise it blocks."""

    pp: int = 1
    vpp: int = 1
    tp: int = 1
    ep: int = 1
    recompute: str = "none"
    rebuild: str = "sublayer"
    overlap: bool = False
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("pp", "vpp", "tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.rebuild not in REBUILD_SCHEMES:
            raise ValueError(f"rebuild must be one of {REBUILD_SCHEMES}, got {self.rebuild!r}")
