"""``mhc_pre``: read the n streams into the sub-layer input, ``F_in = sum_i h_pre[i] * x[i]``."""

from __future__ import annotations

import torch

from mhc_megatron.ops import backends, fused
from mhc_megatron.ops.checks import check_floating, check_same_device, check_shape, coefficient_dtype
from mhc_megatron.ops.mappings import check_streams


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the streams of each token.

    Args:
        x: ``[..., n, C]`` streams.
        h_pre: ``[..., n]`` weights, same leading dimensions as ``x`` (no broadcasting).

    Returns:
        ``[..., C]`` in the dtype of ``x``, accumulated in float32 (float64 for float64 ``x``).
    """
    n, _ = check_streams("x", x)
    h_pre = check_floating("h_pre", h_pre)
    check_shape("h_pre", h_pre, (*x.shape[:-2], n), "[..., n] with the leading dimensions of x")
    check_same_device(x=x, h_pre=h_pre)
    return backends.run("pre", pre_reference, fused.pre, x, h_pre)


def pre_reference(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """The PyTorch implementation of ``mhc_pre``, without argument checks."""
    dtype = coefficient_dtype(x.dtype)
    out = torch.einsum("...i,...ic->...c", h_pre.to(dtype), x.to(dtype))
    return out.to(x.dtype)
