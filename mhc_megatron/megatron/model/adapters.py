"""The hyper-connection modules as megatron-core sees them: built from the config, SP-aware, checkpointable.

Their parameters are replicated across tensor-parallel ranks. Without sequence parallelism every
tensor rank sees all tokens and computes identical gradients; with it each rank sees its own slice
of the sequence, so the parameters are marked ``sequence_parallel`` and megatron's
``finalize_model_grads`` sums their gradients over the tensor group (as for norm weights).
"""

from __future__ import annotations

from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.modules import HyperConnection, StreamCollapse


class ReplicatedOverTensorRanks:
    """Megatron conventions for a module whose parameters are replicated over tensor ranks: the
    config's ``params_dtype``, the ``sequence_parallel`` mark, and a replicated ``sharded_state_dict``."""

    def adopt_megatron_conventions(self: nn.Module, config: MhcTransformerConfig) -> None:
        self.to(config.params_dtype)
        for parameter in self.parameters():
            parameter.sequence_parallel = config.sequence_parallel

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)


class MegatronHyperConnection(ReplicatedOverTensorRanks, HyperConnection):
    """``HyperConnection`` of one sub-layer, configured by ``MhcTransformerConfig``.

    Args:
        config: the model config (``hc_mode``, ``num_streams``, ``sinkhorn_iters``, ...).
        layer_index: global index of the sub-layer, from 0 (attention and MLP counted separately).
    """

    def __init__(self, config: MhcTransformerConfig, layer_index: int) -> None:
        super().__init__(
            hidden_size=config.hidden_size,
            num_streams=config.stream_count,
            mode=config.hc_mode,
            layer_index=layer_index,
            sinkhorn_iters=config.sinkhorn_iters,
            alpha_init=config.hc_alpha_init,
            eps=config.hc_eps,
        )
        self.adopt_megatron_conventions(config)


class MegatronStreamCollapse(ReplicatedOverTensorRanks, StreamCollapse):
    """``StreamCollapse`` configured by ``MhcTransformerConfig`` (``hc_collapse``)."""

    def __init__(self, config: MhcTransformerConfig) -> None:
        super().__init__(
            hidden_size=config.hidden_size,
            num_streams=config.stream_count,
            mode=config.hc_collapse,
            alpha_init=config.hc_alpha_init,
            eps=config.hc_eps,
        )
        self.adopt_megatron_conventions(config)
