"""``nn.Module`` building blocks: the hyper-connection of one sub-layer (``hyper_connection``), stream
expand and collapse (``streams``), and the stability diagnostics of the stream mixing
(``diagnostics``: the Amax gain and per-layer H_res statistics, recorded on request)."""

from mhc_megatron.modules.hyper_connection import HyperConnection, Mixing
from mhc_megatron.modules.streams import StreamCollapse, as_stream_matrix, collapse_streams, expand_streams

__all__ = [
    "HyperConnection",
    "Mixing",
    "StreamCollapse",
    "as_stream_matrix",
    "collapse_streams",
    "expand_streams",
]
