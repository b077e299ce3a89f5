"""The method's constants and formulas, in one place; no torch, no megatron.

The operators, the modules, the megatron integration, the benchmarks' analytic models and the
planner (which runs without torch) all take these from here, so that each is written once:

* the choices: ``HC_MODES`` (the connection of a sub-layer), ``COLLAPSE_MODES`` (how the n streams
  become one before the final norm), ``RECOMPUTE_MODES`` (mHC's own recomputation of the streams);
* the defaults (docs/method.md): n = ``NUM_STREAMS`` streams, ``SINKHORN_ITERS`` Sinkhorn-Knopp
  iterations, the dynamic scales' initial ``ALPHA_INIT`` and the ``EPS`` inside the RMS norms' root;
* ``num_mapping_columns``: the width of ``phi`` (pre, post, res);
* ``default_block_size``: ``L_r*``, the block length of block recomputation (paper, section 4.3);
* per token, what one sub-layer keeps for backward and moves through memory (docs/memory.md and
  docs/planner.md derive them; ``mhc-bench memory`` checks the kept bytes against autograd's), and
  ``fused_op_bytes``: what each fused kernel reads plus writes (``mhc-bench kernels`` divides by it).

Sizes: ``n`` streams, ``C`` hidden, ``F`` MLP hidden, ``e`` bytes per element of the model dtype;
the mixing coefficients are float32 (``FLOAT32_BYTES``) whatever the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HC_MODES = ("residual", "hc", "mhc")
COLLAPSE_MODES = ("mean", "weighted")
RECOMPUTE_MODES = ("none", "block")
REBUILD_SCHEMES = ("sublayer", "block")  # how block recompute rebuilds a block's states in backward

NUM_STREAMS = 4
SINKHORN_ITERS = 20
ALPHA_INIT = 0.01
EPS = 1e-6

FLOAT32_BYTES = 4


def stream_count(hc_mode: str, num_streams: int) -> int:
    """Streams in the model state: ``num_streams`` for ``hc`` / ``mhc``, 1 for ``residual``."""
    return 1 if hc_mode == "residual" else num_streams


def num_mapping_columns(n: int) -> int:
    """Width of ``phi`` and ``bias`` for n streams: n (pre) + n (post) + n*n (res)."""
    return n * n + 2 * n


def default_block_size(num_streams: int, sublayers: int) -> int:
    """``L_r* = sqrt(n L / (n + 2))`` rounded (the paper's optimum) for ``L`` hyper-connected
    sub-layers in a chunk, kept within ``[1, L]``."""
    return min(sublayers, max(1, round(math.sqrt(num_streams * sublayers / (num_streams + 2)))))


def kept_state_fraction(sublayers: int, block_size: int) -> float:
    """Share of the ``sublayers`` input states block recomputation keeps: the block starts."""
    return math.ceil(sublayers / block_size) / sublayers


def coefficient_bytes(n: int) -> int:
    """The float32 coefficients one mHC sub-layer keeps per token: ``h_res`` (n^2), ``h_pre`` and
    ``h_post`` (2n), the projection and its rms (n^2 + 2n + 1)."""
    return (2 * n * n + 4 * n + 1) * FLOAT32_BYTES


def connection_kept_bytes(n: int, hidden: int, element_bytes: int, state_fraction: float | None = None) -> float:
    """Bytes one hyper-connection keeps per token for backward beyond the residual sub-layer: the
    coefficients and, without block recomputation (``state_fraction`` None), its input state
    (``n C``) and the sub-layer output (``C``, for the gradient of ``h_post``). With it, the states
    at block starts only (``state_fraction`` of them); the sub-layer input the norm would keep
    (``C``, counted with the residual sub-layer) is rebuilt too, which the kept output offsets."""
    if state_fraction is None:
        return n * hidden * element_bytes + hidden * element_bytes + coefficient_bytes(n)
    return state_fraction * n * hidden * element_bytes + coefficient_bytes(n)




@dataclass(frozen=True)
class OpBytes:
    """What one fused op reads plus writes, by construction: the tensors it takes and returns.
    ``*_per_token`` scales with the tokens (streams, rows, per-token coefficients); ``*_per_call``
    does not (``phi``, ``alpha``, ``bias`` and their gradients)."""

    forward_per_token: int
    backward_per_token: int
    forward_per_call: int = 0
    backward_per_call: int = 0

    def forward(self, tokens: int) -> int:
        return tokens * self.forward_per_token + self.forward_per_call

    def backward(self, tokens: int) -> int:
        return tokens * self.backward_per_token + self.backward_per_call


FUSED_OPS = ("sinkhorn", "mappings", "mappings_pre", "pre", "post_res", "hc_mappings_pre", "post_res_mappings_pre")


def fused_op_bytes(op: str, n: int, hidden: int, stream_bytes: int, coefficient_bytes: int = FLOAT32_BYTES) -> OpBytes:
    """Bytes the fused kernel of ``op`` (one of ``FUSED_OPS``) moves, for ``n`` streams of ``hidden``
    values of ``stream_bytes`` each and coefficients of ``coefficient_bytes`` (docs/kernels.md,
    "Bytes moved"; tests/test_fused_bytes.py counts the tensors each kernel touches). With
    ``S = n C s`` and ``R = C s`` per token, ``a`` a coefficient, ``K = n^2 + 2n``:

    * sinkhorn: ``2 n^2 a`` forward, ``3 n^2 a`` backward (it recomputes the iterations);
    * mappings: ``S + K a + (K+1) a`` forward (``h_pre``, ``h_post``, ``h_res``, the saved projection
      and 1/r), ``2S + (2K+1) a`` backward, plus ``phi``, ``alpha``, ``bias`` per call (and their
      gradients in backward);
    * mappings_pre (mappings and pre in one op, the one mHC layers run): ``S + R + (2K+1) a``
      forward, ``2S + R + (2K+1+n) a`` backward (plus ``S`` when it adds a given stream gradient),
      and the parameters as mappings;
    * pre: ``S + R + n a`` forward, ``2S + R + 2 n a`` backward;
    * post_res: ``2S + R + (n + n^2) a`` forward, ``3S + 2R + 2 (n + n^2) a`` backward;
    * hc_mappings_pre (HC's mappings and pre in one op, the one HC layers run, CPU only):
      ``S + R + (2n^2 + 5n) a`` forward (the coefficients and the saved ``n (n + 3)``: per stream
      the projection and its 1/r), ``2S + R + (2n^2 + 6n) a`` backward (plus ``S`` when it adds a
      given stream gradient), plus ``weight [C, n + 2]``, ``alpha`` and the static parts per call
      (backward: ``weight`` and ``alpha`` read, the gradients of all five written);
    * post_res_mappings_pre (post_res, then the next sub-layer's mappings_pre on its output, CPU
      only): ``2S + 2R + (n + n^2 + 2K + 1) a`` forward (the streams it writes are read from the
      cache), ``4S + 3R + (2K + 1 + 3n + 2n^2) a`` backward (the gradient of its streams, which the
      next post_res always hands it, read; the sum never written), and the parameters as mappings.
      Against the two ops it replaces: ``S`` less in forward, ``2S`` less in backward.
    """
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {', '.join(map(repr, FUSED_OPS))}, got {op!r}")
    streams, row, a = n * hidden * stream_bytes, hidden * stream_bytes, coefficient_bytes
    k = num_mapping_columns(n)
    if op == "sinkhorn":
        return OpBytes(2 * n * n * a, 3 * n * n * a)
    parameters = (n * hidden * k + k + 3) * a
    if op == "mappings":
        return OpBytes(streams + (2 * k + 1) * a, 2 * streams + (2 * k + 1) * a, parameters, 2 * parameters)
    if op == "mappings_pre":
        return OpBytes(streams + row + (2 * k + 1) * a, 2 * streams + row + (2 * k + 1 + n) * a, parameters,
                       2 * parameters)
    if op == "pre":
        return OpBytes(streams + row + n * a, 2 * streams + row + 2 * n * a)
    if op == "post_res_mappings_pre":
        return OpBytes(2 * streams + 2 * row + (n + n * n + 2 * k + 1) * a,
                       4 * streams + 3 * row + (2 * k + 1 + 3 * n + 2 * n * n) * a, parameters, 2 * parameters)
    if op == "hc_mappings_pre":
        weight_alpha, statics = (hidden * (n + 2) + 3) * a, (2 * n + n * n) * a
        return OpBytes(streams + row + (2 * n * n + 5 * n) * a, 2 * streams + row + (2 * n * n + 6 * n) * a,
                       weight_alpha + statics, 2 * weight_alpha + statics)
    return OpBytes(2 * streams + row + (n + n * n) * a, 3 * streams + 2 * row + 2 * (n + n * n) * a)


def fused_op_product_flops(op: str, n: int, hidden: int) -> tuple[int, int]:
    """FLOPs per token of the contractions in ``op`` (one of ``FUSED_OPS``), ``(forward, backward)``,
    a multiply-add counted as 2, as the reference writes them (tests/test_fused_bytes.py counts the
    reference's matrix products): the projection of the flattened streams (mappings and
    mappings_pre ``2 n C K``, ``K = n^2 + 2n``; hc_mappings_pre one ``[C] x [C, n + 2]`` per stream,
    ``2 n C (n + 2)``), the read of the streams (pre, and inside mappings_pre and hc_mappings_pre,
    ``2 n C``) and the stream mixing ``h_res x`` (post_res, ``2 n^2 C``); post_res_mappings_pre
    has those of post_res and mappings_pre. Backward does each product twice (the gradients of both
    factors). Sinkhorn holds none."""
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {', '.join(map(repr, FUSED_OPS))}, got {op!r}")
    read = 2 * n * hidden
    forward = {"sinkhorn": 0, "pre": read, "post_res": 2 * n * n * hidden,
               "mappings": 2 * n * hidden * num_mapping_columns(n),
               "mappings_pre": 2 * n * hidden * num_mapping_columns(n) + read,
               "hc_mappings_pre": 2 * n * hidden * (n + 2) + read,
               "post_res_mappings_pre": 2 * n * n * hidden + 2 * n * hidden * num_mapping_columns(n) + read}[op]
    return forward, 2 * forward


def connection_bytes_moved(hc_mode: str, n: int, hidden: int, stream_bytes: int,
                           coefficient_bytes: int = FLOAT32_BYTES) -> tuple[int, int]:
    """Bytes one sub-layer's connection reads plus writes per token, ``(forward, backward)``, as a
    layer runs it (``R = C e``, ``S = n R``):

    * residual: the add ``x + f`` (``3R``); in backward, autograd's sum of the two gradients of
      ``x`` (through the sub-layer and the skip): ``3R``;
    * mhc: the fused kernels ``mappings_pre`` and ``post_res`` (``fused_op_bytes``), post_res's
      stream gradient handed to mappings_pre's backward, which reads it (``S``) and writes the
      sum: no autograd sum;
    * hc (eager PyTorch, method doc section 4.3; on a GPU, where hc_mappings_pre has no kernel): reads ``(5n+1) C + n^2 + 2n`` and writes
      ``(3n+1) C + n^2 + 2n`` elements in forward, twice as many in backward.
    """
    row = hidden * stream_bytes
    if hc_mode == "residual":
        return 3 * row, 3 * row
    if hc_mode == "hc":
        forward = ((8 * n + 2) * hidden + 2 * num_mapping_columns(n)) * stream_bytes
        return forward, 2 * forward
    ops = [fused_op_bytes(op, n, hidden, stream_bytes, coefficient_bytes) for op in ("mappings_pre", "post_res")]
    return (sum(op.forward_per_token for op in ops),
            sum(op.backward_per_token for op in ops) + n * row)


def norm_and_attention_kept_bytes(hidden: int, element_bytes: int) -> float:
    """Bytes a layer's two RMS norms and its attention keep per token, without ``s x s`` scores:
    each norm its input, its normalised input and the float32 1/rms, and the linear after it the
    norm's output (``2 (3 C e + 4)``); attention q and k, the fused qkv and the context (``6 C e``)."""
    return 2 * (3 * hidden * element_bytes + FLOAT32_BYTES) + 6 * hidden * element_bytes


def mlp_kept_bytes(ffn: int, element_bytes: int, gated: bool = False) -> float:
    """Bytes a dense MLP keeps per token: fc1's output and the activation (``2 F e``), ``3 F e``
    with a gated unit (SwiGLU)."""
    return (3 if gated else 2) * ffn * element_bytes


def stream_state_bytes(streams: int, hidden: int, element_bytes: int) -> int:
    """Bytes of a token's stream state, what one stage-to-stage hop carries: ``n C e``."""
    return streams * hidden * element_bytes
