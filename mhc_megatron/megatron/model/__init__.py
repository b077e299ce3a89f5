"""Building the model: a hyper-connected GPT out of megatron-core's own parts.

``transformer_config`` (``MhcTransformerConfig``), ``specs`` (layer and block specs, local or
Transformer Engine), ``layer`` (``HyperConnectionTransformerLayer``), ``adapters`` (the
hyper-connection modules as megatron sees them), ``norm`` (a norm usable under sequence
parallelism), ``gpt`` (``GPTModel`` chunks), ``initialization`` (layout-independent initial
weights), ``recompute`` (mHC's block recomputation), ``checkpointing`` (distributed checkpoints)
and ``cuda_streams`` (the high-priority stream of the MLP's post/residual mixing).
"""
