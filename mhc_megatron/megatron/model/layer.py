"""``HyperConnectionTransformerLayer``: megatron-core's transformer layer with each sub-layer hyper-connected.

Data flow through one layer (``x`` is the stream state ``[s, b, n*C]``)::

    u, mix = attention_hyper_connection.pre(x)          u: [s, b, C]
    f = dropout(attention(input_layernorm(u)) + bias)    megatron's _forward_attention, unchanged
    x = attention_hyper_connection.post_res(x, f, mix)   } one op (post_res_then_pre), unless block
    u, mix = mlp_hyper_connection.pre(x)                 } recomputation tracks the layer
    f = dropout(mlp(pre_mlp_layernorm(u)) + bias)        megatron's _forward_mlp (dense or MoE)
    x = mlp_hyper_connection.post_res(x, f, mix)         } one op with the next layer's attention pre
                                                         } (post_res_then_pre), see chain_layers

The residual add of megatron's bias-dropout-add is the hyper-connection's job here, so the spec puts
``get_bias_dropout`` (bias and dropout, no add) in the ``*_bda`` slots; everything else (attention,
MLP, MoE, norms, selective recompute of norms and MLP) runs through megatron's own code.

The two ends of the network live in its first and last layers, so that ``TransformerBlock`` and
``GPTModel`` stay stock: global layer 1 expands the embedding ``[s, b, C]`` into the streams, and the
last layer collapses them to ``[s, b, C]`` before the block's final norm. The first layer of any
other pipeline chunk receives the stream state through megatron's pipeline buffer, allocated as
``[s, b*n, C]`` when the schedule is given ``micro_batch_size * n`` (see
``mhc_megatron.megatron.pipeline.buffers``); it views it back as ``[s, b, n*C]``, and the last
layer of a chunk that sends to another stage hands its streams out in that buffer shape. With
``pipeline_bf16_transfer`` these two layers also round the transfer to bf16 and cast it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import get_pg_rank, make_viewless_tensor

from mhc_megatron.megatron.model.adapters import MegatronStreamCollapse
from mhc_megatron.megatron.model.cuda_streams import high_priority_stream, run_on_stream
from mhc_megatron.megatron.model.recompute import BlockRecompute
from mhc_megatron.modules import expand_streams
from mhc_megatron.modules.hyper_connection import Mixing


def get_bias_dropout(training: bool, fused: bool):
    """Drop-in for megatron's ``get_bias_dropout_add`` that leaves the residual add out.

    Returns ``f(x_with_bias, residual, prob) = dropout(x + bias)``; ``residual`` is ignored (the
    hyper-connection adds it). ``fused`` is accepted for the same signature; the unfused ops are
    used, which is what megatron's fused path computes.
    """

    def bias_dropout(x_with_bias, residual, prob):
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return torch.nn.functional.dropout(x, p=prob, training=training)

    return bias_dropout


@dataclass
class HyperConnectionLayerSubmodules(TransformerLayerSubmodules):
    """``TransformerLayerSubmodules`` plus one hyper-connection per sub-layer."""

    attention_hyper_connection: Union[ModuleSpec, type] = IdentityOp
    mlp_hyper_connection: Union[ModuleSpec, type] = IdentityOp


class _HandedPre(NamedTuple):
    """What a layer computed for the next one's attention with its MLP's post_res: the next layer's
    input ``hidden_states`` (the key: used only when the next layer gets exactly this tensor), the
    attention's input ``[s, b, C]`` and its ``Mixing``."""

    hidden_states: torch.Tensor
    layer_input: torch.Tensor
    mixing: Mixing


def chain_layers(layers) -> None:
    """Let each of ``layers`` (one chunk's ``TransformerBlock.layers``, in order) run its MLP's post_res
    and the next layer's attention pre as one op, where ``hands_pre_to_following`` allows it."""
    layers = list(layers)
    for layer, following in zip(layers, layers[1:]):
        # A plain attribute, outside nn.Module's registry: the next layer is not a submodule.
        object.__setattr__(layer, "_following_layer", following)


def _recomputed_by_megatron(config, local_layer_number: int) -> bool:
    """Whether megatron's full recomputation reruns this layer (it then keeps only its chunk input)."""
    if config.recompute_granularity != "full":
        return False
    return config.recompute_method == "uniform" or local_layer_number <= (config.recompute_num_layers or 0)


class HyperConnectionTransformerLayer(TransformerLayer):
    """A transformer layer whose attention and MLP sub-layers each sit in a hyper-connection.

    Input: ``[s, b, C]`` for global layer 1 (the embedding), ``[s, b*n, C]`` for the first layer of
    another pipeline chunk (the pipeline buffer), ``[s, b, n*C]`` otherwise. Output: ``[s, b, C]``
    from the last layer of the model, ``[s, b*n, C]`` from the last layer of any other pipeline
    chunk (the shape of the buffers, so that the gradient coming back matches), ``[s, b, n*C]``
    otherwise.
    """

    def __init__(
        self,
        config,
        submodules: HyperConnectionLayerSubmodules,
        layer_number: int = 1,
        block_recompute: BlockRecompute | None = None,
        **kwargs,
    ):
        super().__init__(config, submodules, layer_number, **kwargs)
        # mHC block recomputation (recompute.py), unless megatron recomputes this whole layer anyway.
        self.block_recompute = None if _recomputed_by_megatron(config, layer_number) else block_recompute
        self.first_chunk_sublayer = 2 * (layer_number - 1)
        self.num_streams = config.stream_count
        self.stream_width = config.stream_count * config.hidden_size
        self.expands_embedding = self.layer_number == 1
        self.receives_pipeline_buffer = layer_number == 1 and not self.expands_embedding
        first_sublayer = 2 * (self.layer_number - 1)
        self.attention_hyper_connection = build_module(
            submodules.attention_hyper_connection, config=config, layer_index=first_sublayer
        )
        self.mlp_hyper_connection = build_module(
            submodules.mlp_hyper_connection, config=config, layer_index=first_sublayer + 1
        )
        is_last_layer = self.layer_number == config.num_layers
        self.stream_collapse = (
            MegatronStreamCollapse(config) if is_last_layer and self.num_streams > 1 else None
        )
        chunk_layers = get_num_layers_to_build(
            config, vp_stage=kwargs.get("vp_stage"), pp_rank=get_pg_rank(self.pg_collection.pp)
        )
        self.sends_pipeline_buffer = layer_number == chunk_layers and not is_last_layer
        self.post_res_stream = high_priority_stream() if config.mhc_post_res_high_priority_stream else None
        object.__setattr__(self, "_following_layer", None)  # set by chain_layers
        self._handed_pre: _HandedPre | None = None

    def _stream_state(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.receives_pipeline_buffer and self.config.pipeline_bf16_transfer:
            hidden_states = hidden_states.to(self.config.params_dtype)
        if self.num_streams == 1:
            return hidden_states
        s, b, width = hidden_states.shape
        if self.expands_embedding:
            if width != self.config.hidden_size:
                raise ValueError(
                    f"layer 1 expects the embedding [s, b, C] with C={self.config.hidden_size}, "
                    f"got {tuple(hidden_states.shape)}"
                )
            return expand_streams(hidden_states, self.num_streams)
        if self.receives_pipeline_buffer:
            if width != self.config.hidden_size or b % self.num_streams:
                raise ValueError(
                    f"layer {self.layer_number} starts a pipeline chunk and expects the stream state "
                    f"in megatron's buffer [s, b*n, C] with n={self.num_streams}, "
                    f"C={self.config.hidden_size}, got {tuple(hidden_states.shape)}: pass "
                    f"micro_batch_size * num_streams to the schedule "
                    f"(mhc_megatron.megatron.pipeline.buffers.stream_micro_batch_size)"
                )
            return hidden_states.view(s, b // self.num_streams, self.stream_width)
        if width != self.stream_width:
            raise ValueError(
                f"layer {self.layer_number} expects the stream state [s, b, n*C] = "
                f"[s, b, {self.stream_width}], got {tuple(hidden_states.shape)}"
            )
        return hidden_states

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        streams = self._stream_state(hidden_states)

        attention_input, attention_mixing = self._attention_pre(hidden_states, streams)
        attention_output, context = self._forward_attention(attention_input, **kwargs)
        next_streams, layer_input, mixing = self._attention_post_res_then_mlp_pre(
            streams, attention_output, attention_mixing
        )
        self._track(0, self.attention_hyper_connection, streams, attention_input, attention_mixing, attention_output,
                    next_streams)
        streams = next_streams

        mlp_output = self._forward_mlp(
            layer_input,
            kwargs.get("inference_context"),
            padding_mask=kwargs.get("padding_mask"),
            packed_seq_params=kwargs.get("packed_seq_params"),
        )
        if self.hands_pre_to_following:
            return self._mlp_post_res_then_following_pre(streams, mlp_output, mixing), context
        next_streams = self._mlp_post_res(streams, mlp_output, mixing)
        self._track(1, self.mlp_hyper_connection, streams, layer_input, mixing, mlp_output, next_streams)
        streams = next_streams

        if self.stream_collapse is not None:
            streams = self.stream_collapse(streams)
        elif self.sends_pipeline_buffer and self.num_streams > 1:
            s, b, _ = streams.shape
            streams = streams.view(s, b * self.num_streams, self.config.hidden_size)
        if self.sends_pipeline_buffer and self.config.pipeline_bf16_transfer:
            streams = streams.to(torch.bfloat16)
        output = make_viewless_tensor(inp=streams, requires_grad=streams.requires_grad, keep_graph=True)
        return output, context

    @property
    def fuses_attention_post_res_with_mlp_pre(self) -> bool:
        """Whether the attention's post_res and the MLP's pre run as one op (``post_res_then_pre``):
        with mHC connections, unless block recomputation tracks this layer (its hooks on the gradient
        of each stream state free and rebuild around the ops that read that state, and the fused op
        reads the MLP's input state after that gradient is formed; ``recompute.py``)."""
        return self.block_recompute is None and self.attention_hyper_connection.fuses_with(self.mlp_hyper_connection)

    @property
    def hands_pre_to_following(self) -> bool:
        """Whether this layer's MLP post_res and the next layer's attention pre run as one op
        (``post_res_then_pre``), the next layer taking its attention's input from this one: for two
        layers linked by ``chain_layers`` (one chunk: never across a pipeline hand-off or the
        collapse) whose connections fuse, unless a recomputation reruns layers (megatron's full
        recompute, mHC block recompute: the rerun forward would not hand over again), activations
        are offloaded (megatron swaps the tensor between layers), or the MLP's post_res has its own
        stream (``mhc_post_res_high_priority_stream``)."""
        following = self._following_layer
        return (
            following is not None
            and self.block_recompute is None
            and following.block_recompute is None
            and self.config.recompute_granularity != "full"
            and not self.config.cpu_offloading
            and self.post_res_stream is None
            and self.mlp_hyper_connection.fuses_with(following.attention_hyper_connection)
        )

    def _attention_pre(self, hidden_states, streams):
        """The attention's ``(input, mixing)``: handed over by the layer before (``hands_pre_to_following``)
        when this forward gets the tensor that layer returned, else computed here."""
        handed, self._handed_pre = self._handed_pre, None
        if handed is not None and handed.hidden_states is hidden_states:
            return handed.layer_input, handed.mixing
        return self.attention_hyper_connection.pre(streams)

    def _mlp_post_res_then_following_pre(self, streams, mlp_output, mixing) -> torch.Tensor:
        """The next stream state, the MLP's post_res computed in one op with the next layer's attention
        pre, whose results wait in the next layer. The state goes out as the op's view: a viewless copy
        (``make_viewless_tensor``) would be a second reader of it whose backward materialises a zero
        gradient when the next layer's post_res hands its gradient straight to the op."""
        following = self._following_layer
        next_streams, layer_input, following_mixing = self.mlp_hyper_connection.post_res_then_pre(
            streams, mlp_output, mixing, following.attention_hyper_connection
        )
        following._handed_pre = _HandedPre(next_streams, layer_input, following_mixing)
        return next_streams

    def _attention_post_res_then_mlp_pre(self, streams, attention_output, mixing):
        """The attention's post_res and the MLP's pre: ``(next_streams, mlp_input, mlp_mixing)``."""
        if self.block_recompute is None:  # one op where the connections allow it
            return self.attention_hyper_connection.post_res_then_pre(
                streams, attention_output, mixing, self.mlp_hyper_connection
            )
        next_streams = self.attention_hyper_connection.post_res(streams, attention_output, mixing)
        return next_streams, *self.mlp_hyper_connection.pre(next_streams)

    def _mlp_post_res(self, streams, mlp_output, mixing) -> torch.Tensor:
        """The MLP's post/residual mixing, on the high-priority stream if the config asks for it."""
        if self.post_res_stream is None:
            return self.mlp_hyper_connection.post_res(streams, mlp_output, mixing)
        return run_on_stream(self.post_res_stream, self.mlp_hyper_connection.post_res, streams, mlp_output, mixing)

    def _track(self, which: int, connection, streams, layer_input, mixing, output, next_streams) -> None:
        """Hand sub-layer ``which`` (0 attention, 1 MLP) to the block recomputation, if on."""
        if self.block_recompute is not None and self.num_streams > 1:
            self.block_recompute.after_sublayer(
                self.first_chunk_sublayer + which,
                streams,
                layer_input,
                next_streams,
                read=lambda state: connection.read(state, mixing.h_pre),
                advance=lambda state: connection.post_res(state, output, mixing),
            )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Per-layer tensors are stacked along the layer axis by ``sharded_offsets``; the collapse,
        which exists in the last layer only, is saved under its own key without that axis."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.stream_collapse is not None:
            collapse_prefix = f"{prefix}stream_collapse."
            for key in [k for k in state if k.startswith(collapse_prefix)]:
                del state[key]
            state.update(self.stream_collapse.sharded_state_dict(collapse_prefix, (), metadata))
        return state
