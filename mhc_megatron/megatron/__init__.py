"""The megatron-core integration, in two halves: building the model and running the pipeline.

* ``model/``: the config, the layer specs, the hyper-connected layer and its modules, the GPT model
  chunks, their initial weights, checkpoints and mHC's block recomputation;
* ``pipeline/``: the pipeline buffers, the schedules, the stage-to-stage exchange (its thread and
  its timing) and one training step;
* ``parallel``: process groups, seeds and the local device; between ``initialize_parallel`` and
  ``destroy_parallel`` megatron-core runs with ``fixes`` (on every device) and, without CUDA, the
  CPU layer of ``cpu`` and gloo; ``patching`` is how both are applied and undone.

Importing this package imports megatron-core. ``cpu`` is imported only by ``initialize_parallel``
when CUDA is absent.
"""

from mhc_megatron.megatron.model.gpt import build_gpt_model, build_model_chunks
from mhc_megatron.megatron.model.layer import HyperConnectionTransformerLayer
from mhc_megatron.megatron.model.specs import get_hyper_connection_block_spec, get_hyper_connection_layer_spec
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.megatron.parallel import destroy_parallel, initialize_parallel, parallel_layout
from mhc_megatron.megatron.pipeline.buffers import stream_micro_batch_size

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
