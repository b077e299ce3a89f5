"""The two ends of the n-stream residual: expand the embedding into n streams, collapse them back.

Layout: the stream state of a token is stored flat as ``[..., n*C]`` (stream 0 first), which is
``[s, b, n*C]`` in Megatron's sequence-first layout; ``as_stream_matrix`` views it as ``[..., n, C]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mhc_megatron.method import ALPHA_INIT, COLLAPSE_MODES, EPS
from mhc_megatron.ops import mhc_pre, rms_projection
from mhc_megatron.ops.checks import check_choice, check_floating, check_int


def as_stream_matrix(streams: torch.Tensor, num_streams: int, hidden_size: int) -> torch.Tensor:
    """View ``[..., n*C]`` streams as ``[..., n, C]``, checking the last dimension."""
    streams = check_floating("streams", streams)
    width = num_streams * hidden_size
    if streams.dim() < 1 or streams.shape[-1] != width:
        raise ValueError(
            f"streams must have shape [..., n*C] = [..., {width}] for n={num_streams}, "
            f"C={hidden_size}, got {tuple(streams.shape)}"
        )
    return streams.unflatten(-1, (num_streams, hidden_size))


def expand_streams(hidden: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Copy ``hidden`` ``[..., C]`` into ``num_streams`` identical streams ``[..., n*C]``."""
    hidden = check_floating("hidden", hidden)
    check_int("num_streams", num_streams, minimum=1)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., C], got {tuple(hidden.shape)}")
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], num_streams, hidden.shape[-1]).flatten(-2)


def collapse_streams(streams: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Mean of the streams: ``[..., n*C] -> [..., C]``."""
    check_int("num_streams", num_streams, minimum=1)
    streams = check_floating("streams", streams)
    if streams.dim() < 1 or streams.shape[-1] % num_streams:
        raise ValueError(
            f"streams must have shape [..., n*C] with n={num_streams}, got {tuple(streams.shape)}"
        )
    hidden_size = streams.shape[-1] // num_streams
    return as_stream_matrix(streams, num_streams, hidden_size).mean(dim=-2)


class StreamCollapse(nn.Module):
    """Collapse ``[..., n*C]`` streams to ``[..., C]`` before the final norm.

    Modes:
        ``mean``: the average of the streams (no parameters). With streams expanded by copy, a
            network whose streams stay identical collapses to exactly the residual network.
        ``weighted``: a learned, per-token sigmoid-weighted sum (DeepSeek-V4's head), computed like
            mHC's ``h_pre``: ``w = sigmoid(alpha * (v @ phi) / rms(v) + bias)``, ``out = sum_i w_i x_i``.
            At init (``alpha`` = ``alpha_init``, ``bias`` = 0) every weight is about 0.5, i.e.
            ``n/2`` times the mean, which a scale-invariant final norm does not see.
    """

    def __init__(
        self,
        hidden_size: int,
        num_streams: int,
        mode: str = "mean",
        alpha_init: float = ALPHA_INIT,
        eps: float = EPS,
    ) -> None:
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        self.num_streams = check_int("num_streams", num_streams, minimum=1)
        self.mode = check_choice("collapse mode", mode, COLLAPSE_MODES)
        self.eps = eps
        if mode == "weighted":
            width = num_streams * hidden_size
            self.phi_init_std = 1.0 / math.sqrt(width)
            self.phi = nn.Parameter(torch.randn(width, num_streams) * self.phi_init_std)
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
            self.bias = nn.Parameter(torch.zeros(num_streams))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        x = as_stream_matrix(streams, self.num_streams, self.hidden_size)
        if self.mode == "mean":
            return x.mean(dim=-2)
        weights = torch.sigmoid(self.alpha * rms_projection(x, self.phi, self.eps) + self.bias)
        return mhc_pre(x, weights)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_streams={self.num_streams}, mode={self.mode}"
