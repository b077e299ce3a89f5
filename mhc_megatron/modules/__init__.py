"""``nn.Module`` building blocks: the hyper-connection of one sub-layer, stream expand and collapse."""

from mhc_megatron.modules.hyper_connection import HC_MODES, HyperConnection, Mixing
from mhc_megatron.modules.streams import (
    COLLAPSE_MODES,
    StreamCollapse,
    as_stream_matrix,
    collapse_streams,
    expand_streams,
)

__all__ = [
    "COLLAPSE_MODES",
    "HC_MODES",
    "HyperConnection",
    "Mixing",
    "StreamCollapse",
    "as_stream_matrix",
    "collapse_streams",
    "expand_streams",
]
