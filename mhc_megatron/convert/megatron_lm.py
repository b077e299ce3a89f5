"""``mhc-convert from-megatron-lm``: a checkpoint of Megatron-LM's own mHC layers to this project's.

Megatron-LM main (``megatron/core/transformer/hyper_connection.py``, ``HyperConnectionModule``, read
in its August 2026 version) builds a GPT whose layers carry ``self_attention_hyper_connection`` and
``mlp_hyper_connection``; everything else has megatron-core's names, as here. Per layer ``l`` its
distributed checkpoint holds (layers stacked on a leading axis of ``num_layers``):

    decoder.layers.self_attention_hyper_connection.mapping_proj.weight   [L, n*n + 2n, n*C]
    decoder.layers.self_attention_hyper_connection.alpha_pre             [L, 1]   (alpha_post, alpha_res alike)
    decoder.layers.self_attention_hyper_connection.bias                  [L, n*n + 2n]
    (the same under mlp_hyper_connection)

and this project's ``HyperConnection`` (``mhc``) holds ``phi [n*C, n*n + 2n]``, ``alpha [3]``,
``bias [n*n + 2n]``. The mapping: ``phi = weight^T``, ``alpha = (alpha_pre, alpha_post,
alpha_res)``, ``bias`` as is; both order the projection's columns ``pre (n) | post (n) | res (n*n,
row-major)``, apply ``h_res`` as ``out[i] = sum_j h_res[i, j] x[j]``, copy the embedding into the
streams and average them before the final norm (``hc_collapse=mean``).

What differs, and stays different after conversion (``megatron_lm_conventions`` switches this
project's reference operators to Megatron-LM's, so the difference can be measured):

* the RMS of the flattened streams: Megatron-LM divides by ``||v|| / sqrt(n*C) + 1e-6`` (eps outside
  the root, fixed), this project by ``sqrt(mean(v^2) + hc_eps)``;
* Sinkhorn-Knopp: Megatron-LM normalises rows, then columns (columns exact after the last
  iteration), clamping every sum at 1e-6; this project columns, then rows (rows exact: the forward
  Amax gain is 1), without clamps. Both shift the logits by a maximum first, which changes nothing.

``from_megatron_lm`` measures the logit difference these cause on a probe batch and returns it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mhc_megatron.convert import session
from mhc_megatron.ops import backends
from mhc_megatron.ops import mappings as mapping_ops
from mhc_megatron.ops.checks import coefficient_dtype
from mhc_megatron.training.config import RunConfig

# Megatron-LM's module name for each of this project's hyper-connections in a layer.
MODULE_NAMES = {"attention_hyper_connection": "self_attention_hyper_connection",
                "mlp_hyper_connection": "mlp_hyper_connection"}
ALPHAS = ("alpha_pre", "alpha_post", "alpha_res")
MEGATRON_LM_EPS = 1e-6  # HyperConnectionModule.norm_eps and SinkhornKnopp.eps, both fixed


def megatron_lm_rms_projection(x: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """Megatron-LM's ``(v @ phi) / (||v|| / sqrt(n*C) + 1e-6)`` for ``x [..., n, C]`` (``eps`` unused:
    Megatron-LM's is fixed)."""
    dtype = coefficient_dtype(x.dtype)
    v = x.flatten(-2).to(dtype)
    rms = v.norm(dim=-1, keepdim=True) / v.shape[-1] ** 0.5
    return (v @ phi.to(dtype)) / (rms + MEGATRON_LM_EPS)


def megatron_lm_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Megatron-LM's Sinkhorn-Knopp of ``logits [..., n, n]``: rows, then columns, sums clamped at 1e-6."""
    matrix = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    for _ in range(iters):
        matrix = matrix / matrix.sum(dim=-1, keepdim=True).clamp(min=MEGATRON_LM_EPS)
        matrix = matrix / matrix.sum(dim=-2, keepdim=True).clamp(min=MEGATRON_LM_EPS)
    return matrix


@contextlib.contextmanager
def megatron_lm_conventions() -> Iterator[None]:
    """Within the block, mHC mappings follow Megatron-LM's RMS and Sinkhorn conventions: the ops run
    their reference backend, whose mappings use ``megatron_lm_rms_projection`` and
    ``megatron_lm_sinkhorn``. For measuring, not training (no fused kernels)."""
    saved = mapping_ops.rms_projection, mapping_ops.sinkhorn_reference
    mapping_ops.rms_projection, mapping_ops.sinkhorn_reference = megatron_lm_rms_projection, megatron_lm_sinkhorn
    try:
        with backends.use_backend("reference"):
            yield
    finally:
        mapping_ops.rms_projection, mapping_ops.sinkhorn_reference = saved


def megatron_lm_keys(num_layers: int) -> dict[str, tuple[str, int | None]]:
    """Megatron-LM's checkpoint key of each of this project's hyper-connection parameters of layer 0..L-1
    (``decoder.layers.{l}.{module}.{phi|alpha|bias}``): ``(key, None)``, or for ``alpha`` the key of
    each of its three entries."""
    keys = {}
    for layer in range(num_layers):
        for ours, theirs in MODULE_NAMES.items():
            prefix, stacked = f"decoder.layers.{layer}.{ours}", f"decoder.layers.{theirs}"
            keys[f"{prefix}.phi"] = (f"{stacked}.mapping_proj.weight",)
            keys[f"{prefix}.alpha"] = tuple(f"{stacked}.{alpha}" for alpha in ALPHAS)
            keys[f"{prefix}.bias"] = (f"{stacked}.bias",)
    return keys


@dataclass(frozen=True)
class Converted:
    """The converted checkpoint, its config file, and the logit difference Megatron-LM's conventions
    make on the probe batch (this project's forward against Megatron-LM's, same weights)."""

    checkpoint: Path
    config: Path
    logits: session.LogitDifference


def _check_megatron_lm_args(source: session.SourceCheckpoint, run: RunConfig) -> None:
    """When the checkpoint holds Megatron-LM's ``args``, its sizes must be the config's."""
    args = source.common.get("args")
    if args is None:
        return
    config = run.transformer_config()
    pairs = (("num_layers", "num_layers", config.num_layers), ("hidden_size", "hidden_size", config.hidden_size),
             ("num_attention_heads", "num_attention_heads", config.num_attention_heads),
             ("mhc_num_residual_streams", "num_streams", config.stream_count),
             ("mhc_sinkhorn_iterations", "sinkhorn_iters", config.sinkhorn_iters))
    for theirs, ours, value in pairs:
        saved = getattr(args, theirs, None)
        if saved is not None and saved != value:
            raise ValueError(f"checkpoint {str(source.directory)!r} was saved by Megatron-LM with {theirs}={saved!r}, "
                             f"but the config has {ours}={value!r}")


def from_megatron_lm(config: str | Path | None, overrides: list[str], load: str | Path,
                     output: str | Path) -> Converted:
    """Convert Megatron-LM's mHC checkpoint ``load`` into the model of the run ``config`` + ``overrides``
    (``hc_mode=mhc``, ``hc_collapse=mean``, the sizes Megatron-LM trained), saved as the save directory
    ``output`` (iteration 0) with ``output/config.yaml``."""
    run = session.single_process_run(config, overrides)
    model_config = run.transformer_config()
    if model_config.hc_mode != "mhc" or model_config.hc_collapse != "mean":
        raise ValueError("Megatron-LM's mHC converts to hc_mode=mhc with hc_collapse=mean; the config has "
                         f"hc_mode={model_config.hc_mode!r}, hc_collapse={model_config.hc_collapse!r}")
    if model_config.virtual_pipeline_model_parallel_size is not None:
        raise ValueError("from-megatron-lm builds one model chunk; unset virtual_pipeline_model_parallel_size")
    output = session.check_output_directory(output)
    source = session.SourceCheckpoint.open(load)
    _check_megatron_lm_args(source, run)
    vocab_size = source.padded_vocab_size
    keys = megatron_lm_keys(model_config.num_layers)
    for key in sorted({key for entry in keys.values() for key in entry}):
        if key not in source.tensors:
            raise ValueError(f"checkpoint {str(source.directory)!r} has no tensor {key!r}: not a checkpoint of "
                             "Megatron-LM's mHC layers")
    with session.megatron_process(run):
        model = session.build_single_model(run, vocab_size)
        hyper_connections = session.hyper_connection_parameters(model)
        unmapped = hyper_connections - set(keys)
        if unmapped:
            raise ValueError(f"parameters with no Megatron-LM counterpart: {sorted(unmapped)}")
        session.load_all_but(model, source, hyper_connections)
        _load_hyper_connections(model, source, keys)
        with backends.use_backend("reference"):  # the same operators as under Megatron-LM's conventions
            ours = session.probe_logits(model, vocab_size, run.training.seq_length)
        with megatron_lm_conventions():
            theirs = session.probe_logits(model, vocab_size, run.training.seq_length)
        checkpoint = session.save_converted(output, model, run, RunConfig.load(config, overrides),
                                    {"command": "from-megatron-lm", "source": str(source.directory)})
    return Converted(checkpoint, output / "config.yaml", session.LogitDifference.between(ours, theirs))


def _load_hyper_connections(model: torch.nn.Module, source: session.SourceCheckpoint, keys: dict) -> None:
    """Fill every ``HyperConnection`` of ``model`` from Megatron-LM's stacked tensors (module docstring)."""
    stacked = source.read(sorted({key for entry in keys.values() for key in entry}))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, entry in keys.items():
            layer = int(name.split(".")[2])
            parts = [stacked[key][layer] for key in entry]
            parameter = parameters[name]
            value = parts[0].transpose(0, 1) if name.endswith(".phi") else torch.cat(parts)
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(f"Megatron-LM tensor {entry[0]!r} of layer {layer} gives shape {tuple(value.shape)} "
                                 f"for {name!r}, which has shape {tuple(parameter.shape)}")
            parameter.copy_(value.to(parameter.dtype))
