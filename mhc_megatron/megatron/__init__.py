"""megatron-core integration: config, layer specs, layer, GPT model, pipeline transport, checkpoints.

Importing this package imports megatron-core. The CPU/gloo compatibility module (``cpu_compat``) is
imported only by ``initialize_parallel`` when CUDA is absent.
"""

from mhc_megatron.megatron.config import MhcTransformerConfig
from mhc_megatron.megatron.layer import HyperConnectionTransformerLayer
from mhc_megatron.megatron.model import build_gpt_model, build_model_chunks
from mhc_megatron.megatron.parallel import destroy_parallel, initialize_parallel, parallel_layout
from mhc_megatron.megatron.pipeline import stream_micro_batch_size
from mhc_megatron.megatron.specs import get_hyper_connection_block_spec, get_hyper_connection_layer_spec

__all__ = [
    "HyperConnectionTransformerLayer",
    "MhcTransformerConfig",
    "build_gpt_model",
    "build_model_chunks",
    "destroy_parallel",
    "get_hyper_connection_block_spec",
    "get_hyper_connection_layer_spec",
    "initialize_parallel",
    "parallel_layout",
    "stream_micro_batch_size",
]
