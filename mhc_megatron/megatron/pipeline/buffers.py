"""Carrying the n-stream state ``[s, b, n*C]`` between pipeline stages.

megatron-core's schedules allocate the receive buffers as ``(seq_length, micro_batch_size,
hidden_size)`` and use ``micro_batch_size`` for nothing else. Passing ``micro_batch_size * n``
makes every buffer exactly the size of the stream state, for the 1F1B and the interleaved
schedule alike, without touching megatron-core: the first layer of the receiving chunk views
``[s, b*n, C]`` as ``[s, b, n*C]`` (``HyperConnectionTransformerLayer``). Every stage-to-stage
transfer is then n times that of a residual model.
"""

from __future__ import annotations

from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig


def stream_micro_batch_size(config: MhcTransformerConfig, micro_batch_size: int) -> int:
    """The ``micro_batch_size`` to give megatron's ``forward_backward_func``."""
    return micro_batch_size * config.stream_count
