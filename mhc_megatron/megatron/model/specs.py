"""Layer and block specs for hyper-connected GPT models, local or Transformer Engine backend.

The specs start from megatron-core's own GPT layer submodules for the chosen backend (attention,
dense MLP or MoE, norms and linears unchanged) and change three things: the layer class
(``HyperConnectionTransformerLayer``), the bias-dropout-add slots (``get_bias_dropout``: the
hyper-connection does the add) and one hyper-connection per sub-layer. Under sequence parallelism
without TE the norms become ``SequenceParallelNorm``, since megatron's plain-torch norm refuses SP.
"""

from __future__ import annotations

import dataclasses

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from mhc_megatron.megatron.model.adapters import MegatronHyperConnection
from mhc_megatron.megatron.model.layer import (
    HyperConnectionLayerSubmodules,
    HyperConnectionTransformerLayer,
    get_bias_dropout,
)
from mhc_megatron.megatron.model.norm import SequenceParallelNorm
from mhc_megatron.megatron.model.recompute import BlockRecompute
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.method import default_block_size

LAYER_BACKENDS = ("auto", "local", "transformer_engine")


def resolve_backend(backend: str) -> str:
    """``auto`` is Transformer Engine where it is importable, else the local backend."""
    if backend not in LAYER_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, LAYER_BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return "transformer_engine" if HAVE_TE else "local"
    if backend == "transformer_engine" and not HAVE_TE:
        raise ValueError("backend 'transformer_engine' was asked for, but Transformer Engine is not importable")
    return backend


def _base_submodules(config: MhcTransformerConfig, backend: str):
    common = dict(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
    )
    if backend == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_submodules(**common)
    return get_gpt_layer_local_submodules(**common, normalization=config.normalization)


def final_norm_builder(config: MhcTransformerConfig, backend: str = "auto"):
    """The norm class of the block's final norm (it follows the last layer's collapse)."""
    backend = resolve_backend(backend)
    if backend == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    if config.sequence_parallel:
        return SequenceParallelNorm
    return LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm")


def get_hyper_connection_layer_spec(config: MhcTransformerConfig, backend: str = "auto") -> ModuleSpec:
    """ModuleSpec of one ``HyperConnectionTransformerLayer`` for ``config`` (dense or MoE)."""
    backend = resolve_backend(backend)
    base = _base_submodules(config, backend)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    if backend == "local" and config.sequence_parallel:
        if config.qk_layernorm:
            raise ValueError(
                "qk_layernorm=True with sequence_parallel=True needs Transformer Engine: "
                "megatron-core's local query/key norm does not support sequence parallelism"
            )
        for slot in ("input_layernorm", "pre_mlp_layernorm"):
            if fields[slot] is not IdentityOp:
                fields[slot] = SequenceParallelNorm
    fields.update(
        self_attn_bda=get_bias_dropout,
        mlp_bda=get_bias_dropout,
        attention_hyper_connection=MegatronHyperConnection,
        mlp_hyper_connection=MegatronHyperConnection,
    )
    return ModuleSpec(module=HyperConnectionTransformerLayer, submodules=HyperConnectionLayerSubmodules(**fields))


def get_hyper_connection_block_spec(
    config: MhcTransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None, backend: str = "auto"
) -> TransformerBlockSubmodules:
    """Block submodules for the layers of one pipeline stage (and virtual stage)."""
    layer = get_hyper_connection_layer_spec(config, backend)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if config.mhc_recompute == "block":
        # One tracker per chunk: blocks are cut within the chunk's 2 * count sub-layers.
        sublayers = 2 * count
        size = config.mhc_recompute_block or default_block_size(config.stream_count, sublayers)
        tracker = BlockRecompute(sublayers, size, config.mhc_recompute_rebuild)
        layer = dataclasses.replace(layer, params={**layer.params, "block_recompute": tracker})
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=final_norm_builder(config, backend))
