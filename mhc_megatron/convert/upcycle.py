"""``mhc-convert upcycle``: a residual checkpoint to an HC or mHC model that starts as the same function.

Every weight of the residual model is copied; the hyper-connections start as the residual
connection. The streams start as copies of the embedding and stay copies as long as every
sub-layer writes the same output into every stream and the mixing keeps equal streams equal:

* ``mhc``: ``alpha = 0`` (the dynamic part is zero for every token), so ``h_post = 2 sigmoid(0) = 1``
  and ``h_res = J/n`` (zero ``res`` bias): each stream becomes ``x + F(read)``. The read is
  ``sum_i h_pre_i x = (n h_pre) x``, set by the ``pre`` bias (``pre_bias``):

  - ``mean`` (default): ``bias_pre = -log(n - 1)``, so ``h_pre = 1/n`` and the sub-layer reads ``x``
    itself: the residual layer exactly (up to float rounding of ``sigmoid``);
  - ``zero``: the paper's initialisation, ``h_pre = 1/2``: the sub-layer reads ``(n/2) x``. **Norm
    condition**: that is the residual layer only when the sub-layer's pre-norm is scale-invariant.
    RMSNorm gives ``(c x) / sqrt(c^2 ms + eps) = x / sqrt(ms + eps / c^2)`` (``ms`` the mean square
    of ``x``, ``c = n/2``): equal up to ``eps`` against ``ms``, a relative change of up to
    ``eps (1 - 1/c^2) / (2 ms)`` per norm (LayerNorm likewise with the variance). Early in training
    ``ms`` is small (embeddings drawn with std 0.02 have ``ms = 4e-4``, next to ``eps = 1e-5``), so
    the difference is not negligible there; the converter prints it.

  ``phi`` keeps its random initialisation: with ``alpha = 0`` it changes nothing at the start, and
  ``alpha``'s gradient (``phi``'s projection) is non-zero, so the dynamic part trains.
* ``hc``: its own initialisation is the residual network exactly (read stream ``l mod n`` with
  weight 1, write to every stream, identity mixing, dynamic weights zero; ``alpha`` keeps
  ``hc_alpha_init`` so the dynamic weights get gradients).
* ``hc_collapse=weighted`` starts at ``alpha = 0`` with the same bias as ``h_pre``: the mean of the
  streams (``mean``), or ``n/2`` times it under the norm condition of the final norm (``zero``).

The converter measures what it promises: the converted model's logits against the residual model's
on a probe batch, printed and returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mhc_megatron.convert import PRE_BIASES
from mhc_megatron.convert.session import (
    LogitDifference,
    SourceCheckpoint,
    build_single_model,
    check_output_directory,
    copy_all_but,
    hyper_connection_parameters,
    megatron_process,
    probe_logits,
    save_converted,
    single_process_run,
)
from mhc_megatron.megatron.model.checkpointing import load_checkpoint
from mhc_megatron.method import HC_MODES
from mhc_megatron.modules import HyperConnection, StreamCollapse
from mhc_megatron.training.config import RunConfig


@dataclass(frozen=True)
class Upcycled:
    """The converted checkpoint, its config file and how far its probe logits are from the source's."""

    checkpoint: Path
    config: Path
    logits: LogitDifference


def start_as_residual(model: torch.nn.Module, pre_bias: str = "mean") -> None:
    """Set every hyper-connection and stream collapse of ``model`` to its residual-equivalent start
    (module docstring); ``pre_bias`` one of ``PRE_BIASES``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HyperConnection) and module.mode == "mhc":
                module.alpha.zero_()
                module.bias.zero_()
                module.bias[: module.num_streams] = _read_bias(module.num_streams, pre_bias)
            elif isinstance(module, HyperConnection) and module.mode == "hc":
                module.weight.zero_()
            elif isinstance(module, StreamCollapse) and module.mode == "weighted":
                module.alpha.zero_()
                module.bias.fill_(_read_bias(module.num_streams, pre_bias))


def _read_bias(num_streams: int, pre_bias: str) -> float:
    """The bias of a sigmoid read weight: ``1/n`` for ``mean``, ``1/2`` for ``zero``."""
    return -math.log(num_streams - 1) if pre_bias == "mean" else 0.0


def upcycle(config: str | Path | None, overrides: list[str], load: str | Path, output: str | Path,
            hc_mode: str, num_streams: int, pre_bias: str = "mean") -> Upcycled:
    """Convert the residual checkpoint ``load`` of the run ``config`` + ``overrides`` to ``hc_mode``
    with ``num_streams`` streams (``pre_bias`` as in the module docstring), saved as the save
    directory ``output`` (iteration 0) with ``output/config.yaml``."""
    if hc_mode not in HC_MODES or hc_mode == "residual":
        raise ValueError(f"upcycle converts to hc_mode 'hc' or 'mhc', got {hc_mode!r}")
    if pre_bias not in PRE_BIASES:
        raise ValueError(f"pre_bias must be one of {', '.join(map(repr, PRE_BIASES))}, got {pre_bias!r}")
    if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 2:
        raise ValueError(f"upcycle needs num_streams >= 2 (one stream is the residual model), got {num_streams!r}")
    source_run = single_process_run(config, overrides)
    source_mode = source_run.transformer_config().hc_mode
    if source_mode != "residual":
        raise ValueError(f"upcycle takes a residual model; the config has hc_mode={source_mode!r}")
    architecture = [f"hc_mode={hc_mode}", f"num_streams={num_streams}"]
    target_run = single_process_run(config, [*overrides, *architecture])
    user_target = RunConfig.load(config, [*overrides, *architecture])
    output = check_output_directory(output)
    source = SourceCheckpoint.open(load)
    saved = source.common.get("mhc", {})
    if saved.get("hc_mode", "residual") != "residual":
        raise ValueError(f"checkpoint {str(source.directory)!r} holds an hc_mode={saved['hc_mode']!r} model; "
                         "upcycle takes a residual one")
    vocab_size = source.padded_vocab_size
    with megatron_process(source_run):
        residual = build_single_model(source_run, vocab_size)
        load_checkpoint([residual], source_run.transformer_config(), source.directory)
        converted = build_single_model(target_run, vocab_size)
        copy_all_but(converted, residual, hyper_connection_parameters(converted))  # the checkpoint is read once
        start_as_residual(converted, pre_bias)
        length = source_run.training.seq_length
        difference = LogitDifference.between(probe_logits(converted, vocab_size, length),
                                              probe_logits(residual, vocab_size, length))
        checkpoint = save_converted(output, converted, target_run, user_target,
                                    {"command": "upcycle", "source": str(source.directory), "hc_mode": hc_mode,
                                     "num_streams": num_streams, "pre_bias": pre_bias})
    return Upcycled(checkpoint, output / "config.yaml", difference)
