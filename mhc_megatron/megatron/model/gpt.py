"""Hyper-connected GPT models on megatron-core's ``GPTModel``: one model chunk per virtual stage.

The initial weights are a function of the run's seed and the parameters' global identities only
(``initialization.py``): the same seed builds the same model under every parallel layout.
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel

from mhc_megatron.megatron.model.initialization import initialize_parameters
from mhc_megatron.megatron.model.layer import chain_layers
from mhc_megatron.megatron.model.specs import get_hyper_connection_block_spec
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.megatron.parallel import run_seed


def build_gpt_model(
    config: MhcTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    vp_stage: int | None = None,
    backend: str = "auto",
    seed: int | None = None,
    **gpt_kwargs,
) -> GPTModel:
    """The ``GPTModel`` of this pipeline rank (and virtual stage ``vp_stage``) with mHC layers.

    ``gpt_kwargs`` go to ``GPTModel`` (``position_embedding_type``, ``parallel_output``,
    ``share_embeddings_and_output_weights``, ...). The first stage expands the embedding into the
    streams, the last collapses them before the final norm. Unless ``config.perform_initialization``
    is off, the parameters are drawn from ``seed`` (default: the seed given to
    ``initialize_parallel``) and their global identities, whatever the layout (``initialization.py``).
    """
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    spec = get_hyper_connection_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank, backend=backend)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        **gpt_kwargs,
    )
    chain_layers(model.decoder.layers)
    if config.perform_initialization:
        initialize_parameters(model, config, run_seed() if seed is None else seed)
    return model


def build_model_chunks(
    config: MhcTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    backend: str = "auto",
    seed: int | None = None,
    **gpt_kwargs,
) -> list[GPTModel]:
    """One ``GPTModel`` per virtual pipeline stage of this rank (a single one without VPP), its
    initial weights drawn from ``seed`` as ``build_gpt_model`` says."""
    virtual_stages = config.virtual_pipeline_model_parallel_size
    stages = [None] if virtual_stages is None else list(range(virtual_stages))
    return [
        build_gpt_model(
            config, vocab_size, max_sequence_length, vp_stage=stage, backend=backend, seed=seed, **gpt_kwargs
        )
        for stage in stages
    ]
