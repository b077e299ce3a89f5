"""``MhcTransformerConfig``: megatron-core's ``TransformerConfig`` plus the hyper-connection fields.

Everything is validated in ``__post_init__``, before any model is built, with errors that name the
field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from mhc_megatron.method import (
    ALPHA_INIT,
    COLLAPSE_MODES,
    EPS,
    HC_MODES,
    NUM_STREAMS,
    REBUILD_SCHEMES,
    RECOMPUTE_MODES,
    SINKHORN_ITERS,
    stream_count,
)


# Sizes megatron-core divides by or allocates with; the optional ones have a derived default when unset.
_REQUIRED_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "tensor_model_parallel_size",
                   "pipeline_model_parallel_size", "expert_model_parallel_size")
_OPTIONAL_SIZES = ("ffn_hidden_size", "kv_channels", "num_query_groups", "virtual_pipeline_model_parallel_size",
                   "expert_tensor_parallel_size", "num_moe_experts", "moe_ffn_hidden_size")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class MhcTransformerConfig(TransformerConfig):
    """Transformer config for residual, HC and mHC models.

    Fields (besides megatron-core's):
        hc_mode: ``residual`` (the plain residual baseline), ``hc`` (Hyper-Connections) or ``mhc``.
        num_streams: n, the number of residual streams of ``hc``/``mhc`` (ignored by ``residual``,
            which always has one; see ``stream_count``).
        sinkhorn_iters: Sinkhorn-Knopp iterations of ``mhc``.
        hc_alpha_init: initial value of the dynamic scales ``alpha``.
        hc_eps: epsilon of the hyper-connection RMS norms.
        hc_collapse: how the streams become one before the final norm: ``mean`` or ``weighted``.
        mhc_recompute: ``none`` or ``block``: keep the stream state only at the start of every
            ``mhc_recompute_block`` sub-layers of a pipeline chunk and rebuild the rest in backward
            (mHC paper, section 4.3; see ``recompute.py``).
        mhc_recompute_block: ``L_r``, sub-layers per block; ``None``: ``sqrt(n L / (n + 2))`` for
            the ``L`` sub-layers of each chunk (``method.default_block_size``).
        mhc_recompute_rebuild: how backward rebuilds a block's states: ``sublayer`` (default) one
            at a time, each replayed from the block start (at most one rebuilt state held, ``L_r
            (L_r - 1) / 2`` post_res replays per block), or ``block``, the paper's scheme: all at
            once when the block's backward begins (``L_r - 1`` replays, up to ``L_r - 1`` rebuilt
            states held). Gradients are bitwise the same.
        pipeline_extra_warmup: with ``overlap_p2p_comm`` and no virtual pipeline, warm-up forwards
            that every stage but the last runs ahead of 1F1B's, so that the exchange can hide behind
            them (``pipeline/schedules.py``); each holds one more micro-batch of activations. 0: plain 1F1B.
        pipeline_bf16_transfer: in a float32 run, send the stream state and its gradient between
            pipeline stages in bf16 (half the bytes; ``pipeline_dtype`` must be ``torch.bfloat16``):
            the last layer of a sending chunk rounds its output to bf16, the first layer of a
            receiving chunk casts it back. Off by default; docs/pipeline.md has its loss curves.
        pipeline_exchange_thread: with ``overlap_p2p_comm`` over gloo (CPU), post the exchange from a
            communication thread, so that gloo's copy into the socket does not stall the stage
            (``pipeline/exchange_thread.py``); no effect with NCCL, whose sends are asynchronous already.
        mhc_post_res_high_priority_stream: run the MLP sub-layer's post/residual mixing on a
            high-priority CUDA stream (paper, section 4.3), so that it is scheduled ahead of other
            work queued on the device; CUDA only.

    Pipeline exchange: megatron's ``overlap_p2p_comm`` overlaps the stage-to-stage sends and
    receives with computation, in the interleaved schedule (megatron's) and in 1F1B
    (``schedules.forward_backward_pipelining_overlapped``); it needs ``batch_p2p_comm=False``. The
    stream state crosses stages in ``pipeline_dtype``, which must be the training dtype (bf16 when
    ``bf16``), or bf16 in a float32 run with ``pipeline_bf16_transfer``.
    """

    hc_mode: str = "mhc"
    num_streams: int = NUM_STREAMS
    sinkhorn_iters: int = SINKHORN_ITERS
    hc_alpha_init: float = ALPHA_INIT
    hc_eps: float = EPS
    hc_collapse: str = "mean"
    mhc_recompute: str = "none"
    mhc_recompute_block: int | None = None
    mhc_recompute_rebuild: str = "sublayer"
    mhc_post_res_high_priority_stream: bool = False
    pipeline_extra_warmup: int = 0
    pipeline_bf16_transfer: bool = False
    pipeline_exchange_thread: bool = True

    def __post_init__(self) -> None:
        self._validate_hyper_connection_fields()
        self._validate_sizes()
        self._validate_parallel_fit()
        if self.batched_exchange_crosses_directions or not torch.cuda.is_available():
            # Without CUDA, gloo runs a batch as separate operations anyway and the overlapped
            # exchange needs it off; for the other case see batched_exchange_crosses_directions.
            self.batch_p2p_comm = False
        self._validate_pipeline_exchange()
        super().__post_init__()
        self._validate_supported_combinations()

    @property
    def batched_exchange_crosses_directions(self) -> bool:
        """Whether ``batch_p2p_comm`` would swap activations and gradients: at pipeline size 2 with
        a virtual pipeline the previous and the next stage are the same peer, and the interleaved
        schedule's batched exchange sends it a gradient (to the previous stage) and an activation
        (to the next) in one group, while the peer posts its receives from the previous stage (the
        activation) first. NCCL, like gloo, pairs a pair's sends and receives in issue order, so each
        lands in the other's buffer and the loss silently changes (Megatron-LM issue #750; shown by
        tests/megatron/test_nccl_ordering.py). The config turns batching off there, on every backend."""
        return self.pipeline_model_parallel_size == 2 and self.virtual_pipeline_model_parallel_size is not None

    @property
    def stream_count(self) -> int:
        """Streams in the model state: ``num_streams`` for ``hc``/``mhc``, 1 for ``residual``."""
        return stream_count(self.hc_mode, self.num_streams)

    def _validate_hyper_connection_fields(self) -> None:
        for name, allowed in (
            ("hc_mode", HC_MODES),
            ("hc_collapse", COLLAPSE_MODES),
            ("mhc_recompute", RECOMPUTE_MODES),
            ("mhc_recompute_rebuild", REBUILD_SCHEMES),
        ):
            value = getattr(self, name)
            _require(value in allowed, f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        for name, minimum in (("num_streams", 1), ("sinkhorn_iters", 0)):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                f"{name} must be an int >= {minimum}, got {value!r}",
            )
        _require(self.hc_eps > 0, f"hc_eps must be > 0, got {self.hc_eps!r}")
        block = self.mhc_recompute_block
        _require(
            block is None or (isinstance(block, int) and not isinstance(block, bool) and block >= 1),
            f"mhc_recompute_block (L_r) must be an int >= 1 or None (the default size), got {block!r}",
        )
        _require(
            self.mhc_recompute == "none" or self.hc_mode != "residual",
            f"mhc_recompute={self.mhc_recompute!r} recomputes hyper-connection states; hc_mode='residual' has none",
        )

    def _validate_sizes(self) -> None:
        """The model's and the parallel layout's sizes, before megatron divides by them (where a bad
        one would surface as a ZeroDivisionError, "math domain error" or a failed reshape)."""
        for names, optional in ((_REQUIRED_SIZES, False), (_OPTIONAL_SIZES, True)):
            for name in names:
                value = getattr(self, name)
                _require(
                    (optional and value is None) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                    f"{name} must be an int >= 1{' or unset' if optional else ''}, got {value!r}",
                )
        groups = self.num_query_groups
        _require(
            groups is None or self.num_attention_heads % groups == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_query_groups ({groups}): "
            "each query group shares one key/value head",
        )
        tp = self.tensor_model_parallel_size
        ffn = self.ffn_hidden_size
        _require(
            ffn is None or ffn % tp == 0,  # its default, 4 x hidden_size, divides when hidden_size does
            f"ffn_hidden_size ({ffn}) must be divisible by tensor_model_parallel_size ({tp})",
        )
        _require(self.init_method_std >= 0, f"init_method_std must be >= 0, got {self.init_method_std!r}")
        experts = self.num_moe_experts
        if experts is None:
            return
        ep = self.expert_model_parallel_size
        _require(
            experts % ep == 0,
            f"num_moe_experts ({experts}) must be divisible by expert_model_parallel_size ({ep})",
        )
        _require(
            1 <= self.moe_router_topk <= experts,
            f"moe_router_topk must be from 1 to num_moe_experts ({experts}), got {self.moe_router_topk!r}",
        )
        etp = self.expert_tensor_parallel_size or tp
        expert_ffn = self.moe_ffn_hidden_size or ffn or 4 * self.hidden_size
        _require(
            expert_ffn % etp == 0,
            f"moe_ffn_hidden_size ({expert_ffn}) must be divisible by expert_tensor_parallel_size ({etp}, "
            "which defaults to tensor_model_parallel_size)",
        )

    def _validate_pipeline_exchange(self) -> None:
        """The overlapped exchange, its options, and the dtype the stream state crosses stages in."""
        _require(
            not (self.overlap_p2p_comm and self.batch_p2p_comm),
            "overlap_p2p_comm=True needs batch_p2p_comm=False: a batched exchange is waited for inside the "
            "call, so it cannot overlap with computation",
        )
        extra = self.pipeline_extra_warmup
        _require(
            isinstance(extra, int) and not isinstance(extra, bool) and extra >= 0,
            f"pipeline_extra_warmup must be an int >= 0, got {extra!r}",
        )
        _require(
            extra == 0 or (self.overlap_p2p_comm and self.virtual_pipeline_model_parallel_size is None),
            f"pipeline_extra_warmup={extra} applies to the overlapped 1F1B schedule only: it needs "
            "overlap_p2p_comm=True and no virtual pipeline",
        )
        _require(
            isinstance(self.pipeline_exchange_thread, bool),
            f"pipeline_exchange_thread must be true or false, got {self.pipeline_exchange_thread!r}",
        )
        _require(
            not self.overlap_p2p_comm_warmup_flush,
            "overlap_p2p_comm_warmup_flush=True is not supported: with megatron-core 0.19.2 its forward-only "
            "(evaluation) pass at pipeline_model_parallel_size=4 with a virtual pipeline leaves stages waiting "
            "for a message that no stage sends; overlap_p2p_comm=True alone overlaps the steady phase",
        )
        _require(
            isinstance(self.pipeline_bf16_transfer, bool),
            f"pipeline_bf16_transfer must be true or false, got {self.pipeline_bf16_transfer!r}",
        )
        if self.pipeline_bf16_transfer:
            _require(
                not (self.bf16 or self.fp16) and self.params_dtype == torch.float32,
                "pipeline_bf16_transfer=True rounds a float32 run's stage-to-stage transfer to bf16; this run "
                f"trains in {'bf16' if self.bf16 else 'fp16' if self.fp16 else self.params_dtype}, whose transfer "
                "is in its own dtype already",
            )
            _require(
                self.pipeline_dtype == torch.bfloat16,
                "pipeline_bf16_transfer=True receives the stream state in bf16 buffers, so pipeline_dtype must be "
                f"torch.bfloat16, got {self.pipeline_dtype}",
            )
        _require(
            not (self.bf16 and self.pipeline_model_parallel_size > 1 and not self.fp32_residual_connection)
            or self.pipeline_dtype in (None, torch.bfloat16),
            f"bf16=True sends the stream state between pipeline stages in bf16, so pipeline_dtype must be "
            f"torch.bfloat16, got {self.pipeline_dtype}",
        )
        _require(
            not self.mhc_post_res_high_priority_stream or torch.cuda.is_available(),
            "mhc_post_res_high_priority_stream=True needs CUDA (it runs the MLP post/residual on a "
            "high-priority CUDA stream); set it to False on CPU",
        )

    def _validate_parallel_fit(self) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _require(
            self.hidden_size % tp == 0,
            f"hidden_size ({self.hidden_size}) must be divisible by tensor_model_parallel_size ({tp})",
        )
        uneven = (
            self.num_layers_in_first_pipeline_stage is not None
            or self.num_layers_in_last_pipeline_stage is not None
            or self.pipeline_model_parallel_layout is not None
        )
        if not uneven:
            stages = pp * (self.virtual_pipeline_model_parallel_size or 1)
            _require(
                self.num_layers % stages == 0,
                f"num_layers ({self.num_layers}) must be divisible among the pipeline stages: "
                f"pipeline_model_parallel_size ({pp}) x virtual_pipeline_model_parallel_size "
                f"({self.virtual_pipeline_model_parallel_size or 1}) = {stages}",
            )

    def _validate_supported_combinations(self) -> None:
        if self.hc_mode == "residual":
            return
        unsupported = {
            "mtp_num_layers": (
                self.mtp_num_layers,
                "multi-token-prediction layers would need the n-stream state, which they do not carry",
            ),
            "cuda_graph_impl": (
                self.cuda_graph_impl not in (None, "none") and self.cuda_graph_impl,
                "the hyper-connection layer is not captured in CUDA graphs yet",
            ),
            "fp32_residual_connection": (
                self.fp32_residual_connection,
                "the stream state keeps the model dtype; mixing coefficients are already float32",
            ),
        }
        for field, (value, why) in unsupported.items():
            _require(not value, f"{field}={value!r} is not supported with hc_mode={self.hc_mode!r}: {why}")
