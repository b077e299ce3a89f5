"""The hyper-connection around one sub-layer (attention or MLP), in three modes.

A sub-layer ``F`` (which includes its own pre-norm) turns the stream state of a token into the next:

    residual:  x' = x + F(x)                                   streams [..., C] (n = 1)
    hc, mhc:   x' = h_res x + h_post^T F(h_pre x)              streams [..., n*C], viewed [..., n, C]

``hc`` is ByteDance's dynamic Hyper-Connections (Zhu et al., 2409.19606, eq. 10-13), through
``mhc_megatron.ops.hc_mappings_pre``: per-stream RMS norm, ``tanh`` dynamic part scaled by ``alpha``,
static part initialised to Pre-Norm (stream ``layer_index mod n`` is read, every stream is
written, identity mixing). Unconstrained.

``mhc`` is DeepSeek's manifold-constrained version (Xie et al., 2512.24880, eq. 7-9), through
``mhc_megatron.ops.mhc_mappings``: ``h_res`` is projected onto doubly stochastic matrices.

Use it in three calls, so that a Megatron layer can run its sub-layer in between::

    layer_input, mixing = hc.pre(streams)        # [..., C], plus what post_res needs
    output = sublayer(layer_input)               # [..., C]
    streams = hc.post_res(streams, output, mixing)

or as ``hc(streams, sublayer)``. Between two sub-layers, ``post_res_then_pre`` does one's
``post_res`` and the next one's ``pre`` together (one fused op when both are mHC).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from mhc_megatron.method import ALPHA_INIT, EPS, HC_MODES, NUM_STREAMS, SINKHORN_ITERS
from mhc_megatron.modules.streams import as_stream_matrix
from mhc_megatron.ops import (
    hc_mappings_pre,
    mhc_mappings,
    mhc_mappings_pre,
    mhc_post_res,
    mhc_post_res_mappings_pre,
    mhc_pre,
    num_mapping_columns,
)
from mhc_megatron.ops.checks import check_choice, check_int, check_positive_float
from mhc_megatron.ops.fused import StreamGradient


class Mixing(NamedTuple):
    """What ``pre`` computed for ``post_res``: the coefficients ``h_post [..., n]`` and ``h_res
    [..., n, n]``; ``h_pre [..., n]``, with which ``read`` recomputes the sub-layer input; and the
    hand-off of the stream gradient from post_res's backward to the mappings' (``StreamGradient``)."""

    h_post: torch.Tensor
    h_res: torch.Tensor
    h_pre: torch.Tensor
    stream_gradient: StreamGradient | None = None


class HyperConnection(nn.Module):
    """Hyper-connection of one sub-layer.

    Args:
        hidden_size: C, the width of the sub-layer.
        num_streams: n; must be 1 in ``residual`` mode.
        mode: ``residual`` | ``hc`` | ``mhc``.
        layer_index: index of this sub-layer in the network (attention and MLP sub-layers counted
            separately, from 0). Only ``hc`` uses it: at init it reads stream ``layer_index mod n``.
        sinkhorn_iters: Sinkhorn-Knopp iterations of ``mhc``.
        alpha_init: initial value of the three dynamic scales ``alpha = (pre, post, res)``.
        phi_init_std: std of the normal init of ``phi`` (``mhc``); default ``1/sqrt(n*C)``, which gives
            the normalised projection ``m / r`` unit scale, so that ``alpha`` alone sets the size of
            the dynamic part (0.01 at init).
        eps: of the RMS norms.

    Parameters (``mhc``): ``phi [n*C, n*n + 2n]`` (normal, std ``phi_init_std``), ``alpha [3]``, ``bias [n*n + 2n]`` (zeros, so
    ``h_pre = 0.5``, ``h_post = 1``, ``h_res = J/n`` up to the alpha terms). With streams expanded
    by copy and a scale-invariant pre-norm in the sub-layer, this initialisation makes the layer the
    plain pre-norm residual layer (exactly so when ``alpha = 0``).

    Parameters (``hc``): ``weight [C, n + 2]`` (dynamic, zeros; columns pre | post | res n),
    ``alpha [3]``, ``static_pre [n]`` (one-hot), ``static_post [n]`` (ones), ``static_res [n, n]``
    (identity, indexed ``[input stream, output stream]`` as in the HC paper's ``A_r``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_streams: int = NUM_STREAMS,
        mode: str = "mhc",
        layer_index: int = 0,
        sinkhorn_iters: int = SINKHORN_ITERS,
        alpha_init: float = ALPHA_INIT,
        phi_init_std: float | None = None,
        eps: float = EPS,
    ) -> None:
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        self.num_streams = n = check_int("num_streams", num_streams, minimum=1)
        self.mode = check_choice("mode", mode, HC_MODES)
        self.layer_index = check_int("layer_index", layer_index, minimum=0)
        self.sinkhorn_iters = check_int("sinkhorn_iters", sinkhorn_iters, minimum=0)
        self.eps = check_positive_float("eps", eps)
        self.mapping_observer: Callable[[HyperConnection, torch.Tensor], None] | None = None
        if mode == "residual":
            if n != 1:
                raise ValueError(f"num_streams must be 1 in mode 'residual', got {n}")
            return
        alpha = torch.full((3,), float(alpha_init))
        if mode == "mhc":
            width = n * hidden_size
            self.phi_init_std = 1.0 / math.sqrt(width) if phi_init_std is None else phi_init_std
            self.phi = nn.Parameter(torch.randn(width, num_mapping_columns(n)) * self.phi_init_std)
            self.alpha = nn.Parameter(alpha)
            self.bias = nn.Parameter(torch.zeros(num_mapping_columns(n)))
        else:
            self.weight = nn.Parameter(torch.zeros(hidden_size, n + 2))
            self.alpha = nn.Parameter(alpha)
            self.static_pre = nn.Parameter(nn.functional.one_hot(torch.tensor(layer_index % n), n).float())
            self.static_post = nn.Parameter(torch.ones(n))
            self.static_res = nn.Parameter(torch.eye(n))

    def mappings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` for streams ``x [..., n, C]``."""
        if self.mode == "mhc":
            return mhc_mappings(x, self.phi, self.alpha, self.bias, self.sinkhorn_iters, self.eps)
        if self.mode == "hc":
            return self._hc_mappings_pre(x)[1:]
        raise RuntimeError("mode 'residual' has no mappings")

    def _hc_mappings_pre(
        self, x: torch.Tensor, stream_gradient: StreamGradient | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return hc_mappings_pre(x, self.weight, self.alpha, self.static_pre, self.static_post, self.static_res, self.eps,
                               stream_gradient)

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, Mixing | None]:
        """Sub-layer input ``[..., C]`` from ``streams [..., n*C]``, and the mixing for ``post_res``."""
        if self.mode == "residual":
            as_stream_matrix(streams, 1, self.hidden_size)
            return streams, None
        stream_gradient = StreamGradient()
        layer_input, h_pre, h_post, h_res = self.mappings_and_read(streams, stream_gradient)
        return layer_input, self._mixing(h_pre, h_post, h_res, stream_gradient)

    def _mixing(self, h_pre, h_post, h_res, stream_gradient: StreamGradient) -> Mixing:
        """The ``Mixing`` of freshly computed mappings, shown to ``mapping_observer`` first."""
        if self.mapping_observer is not None:
            self.mapping_observer(self, h_res.detach())
        return Mixing(h_post, h_res, h_pre, stream_gradient)

    def mappings_and_read(
        self, streams: torch.Tensor, stream_gradient: StreamGradient | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(layer_input [..., C], h_pre, h_post, h_res)`` from ``streams [..., n*C]`` in one op
        (``mhc_mappings_pre`` or ``hc_mappings_pre``: the fused kernels read the streams once;
        ``stream_gradient`` as there)."""
        x = as_stream_matrix(streams, self.num_streams, self.hidden_size)
        if self.mode == "mhc":
            return mhc_mappings_pre(x, self.phi, self.alpha, self.bias, self.sinkhorn_iters, self.eps, stream_gradient)
        if self.mode == "hc":
            return self._hc_mappings_pre(x, stream_gradient)
        raise RuntimeError("mode 'residual' has no mappings")

    def read(self, streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        """The sub-layer input ``h_pre x [..., C]`` from ``streams [..., n*C]`` and ``h_pre [..., n]``."""
        return mhc_pre(as_stream_matrix(streams, self.num_streams, self.hidden_size), h_pre)

    def post_res(
        self, streams: torch.Tensor, output: torch.Tensor, mixing: Mixing | None
    ) -> torch.Tensor:
        """Next ``streams [..., n*C]`` from the current ones and the sub-layer ``output [..., C]``."""
        if self.mode == "residual":
            as_stream_matrix(streams, 1, self.hidden_size)
            if output.shape != streams.shape:
                raise ValueError(
                    f"output must have the shape of streams {tuple(streams.shape)}, "
                    f"got {tuple(output.shape)}"
                )
            return streams + output
        if mixing is None:
            raise ValueError(f"mode {self.mode!r} needs the mixing returned by pre(), got None")
        x = as_stream_matrix(streams, self.num_streams, self.hidden_size)
        return mhc_post_res(x, output, mixing.h_post, mixing.h_res, mixing.stream_gradient).flatten(-2)

    def fuses_with(self, following: HyperConnection) -> bool:
        """Whether ``post_res_then_pre`` into ``following`` runs as one op: both mHC, of one shape."""
        return (self.mode == following.mode == "mhc" and self.num_streams == following.num_streams
                and self.hidden_size == following.hidden_size)

    def post_res_then_pre(
        self, streams: torch.Tensor, output: torch.Tensor, mixing: Mixing | None, following: HyperConnection
    ) -> tuple[torch.Tensor, torch.Tensor, Mixing | None]:
        """``next_streams = self.post_res(streams, output, mixing)``, then ``following.pre(next_streams)``:
        ``(next_streams [..., n*C], layer_input [..., C], following's mixing)``, the same values.

        When ``fuses_with(following)``, one op computes both (``mhc_post_res_mappings_pre``): its
        fused kernels read the next streams from the cache in forward and never write their gradient
        in backward.
        """
        if not self.fuses_with(following):
            next_streams = self.post_res(streams, output, mixing)
            return next_streams, *following.pre(next_streams)
        if mixing is None:
            raise ValueError(f"mode {self.mode!r} needs the mixing returned by pre(), got None")
        next_gradient = StreamGradient()
        next_streams, layer_input, h_pre, h_post, h_res = mhc_post_res_mappings_pre(
            as_stream_matrix(streams, self.num_streams, self.hidden_size), output, mixing.h_post, mixing.h_res,
            following.phi, following.alpha, following.bias, following.sinkhorn_iters, following.eps,
            mixing.stream_gradient, next_gradient,
        )
        return next_streams.flatten(-2), layer_input, following._mixing(h_pre, h_post, h_res, next_gradient)

    def forward(
        self, streams: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        layer_input, mixing = self.pre(streams)
        return self.post_res(streams, sublayer(layer_input), mixing)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, hidden_size={self.hidden_size}, num_streams={self.num_streams}, "
            f"sinkhorn_iters={self.sinkhorn_iters}"
        )
