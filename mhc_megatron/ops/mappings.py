"""The mHC mappings H_pre, H_post, H_res of one sub-layer, computed per token (mHC eq. 7-9).

``v = vec(x)`` flattens the n x C streams of a token (stream 0 first). With the reordered RMS norm
(mHC eq. 14-18) one read of ``v`` gives both the projection ``m = v @ phi`` and
``r = sqrt(mean(v^2) + eps)``; the norm is applied after the projection as ``m / r``. The RMS norm has
no weight of its own: it is absorbed into ``phi``.

    h_pre  = sigmoid(alpha[0] * m_pre / r + bias_pre)                  [..., n]
    h_post = 2 * sigmoid(alpha[1] * m_post / r + bias_post)            [..., n]
    h_res  = sinkhorn(alpha[2] * mat(m_res) / r + bias_res, iters)     [..., n, n]

Columns of ``phi`` (and entries of ``bias``): ``[pre (n) | post (n) | res (n*n, row-major)]``.
"""

from __future__ import annotations

import torch

from mhc_megatron.method import EPS, SINKHORN_ITERS, num_mapping_columns
from mhc_megatron.ops import backends, fused
from mhc_megatron.ops.checks import (
    check_floating,
    check_int,
    check_min_rank,
    check_num_streams,
    check_positive_float,
    check_same_device,
    check_shape,
    coefficient_dtype,
)
from mhc_megatron.ops.sinkhorn import sinkhorn_reference


def rms_projection(x: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """``(v @ phi) / sqrt(mean(v^2) + eps)`` for ``v = x`` flattened to ``[..., n*C]``.

    Args:
        x: ``[..., n, C]`` streams, any floating dtype.
        phi: ``[n*C, K]`` projection.
    Returns:
        ``[..., K]`` in the coefficient dtype (float32, or float64 for float64 ``x``).
    """
    dtype = coefficient_dtype(x.dtype)
    v = x.flatten(-2).to(dtype)
    inv_rms = torch.rsqrt(v.square().mean(dim=-1, keepdim=True) + eps)
    return (v @ phi.to(dtype)) * inv_rms


def check_streams(name: str, x: object) -> tuple[int, int]:
    """Validate a ``[..., n, C]`` stream tensor and return ``(n, C)``."""
    x = check_floating(name, x)
    check_min_rank(name, x, 2, "[..., n, C]")
    n, hidden = x.shape[-2], x.shape[-1]
    check_num_streams(f"{name}.shape[-2]", n)
    if hidden < 1:
        raise ValueError(f"{name} must have a hidden size C >= 1 in [..., n, C], got shape {tuple(x.shape)}")
    return n, hidden


def mhc_mappings(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    iters: int = SINKHORN_ITERS,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token mHC mappings from the streams ``x``.

    Args:
        x: ``[..., n, C]`` streams of each token.
        phi: ``[n*C, n*n + 2*n]`` projection, columns ``[pre | post | res (row-major)]``.
        alpha: ``[3]`` scales ``(pre, post, res)`` of the dynamic part.
        bias: ``[n*n + 2*n]`` static part, same order as the columns of ``phi``.
        iters: Sinkhorn-Knopp iterations for ``h_res``.
        eps: added to ``mean(v^2)`` inside the square root.

    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` in float32 (float64 when ``x`` is
        float64). ``h_res[..., i, j]`` is the weight of input stream j in output stream i.
    """
    iters, eps = check_mapping_arguments(x, phi, alpha, bias, iters, eps)
    return backends.run("mappings", mappings_reference, fused.mappings, x, phi, alpha, bias, iters, eps)


def check_mapping_arguments(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float
) -> tuple[int, float]:
    """Validate the arguments of ``mhc_mappings`` (and ``mhc_mappings_pre``); ``(iters, eps)`` as numbers."""
    n, hidden = check_streams("x", x)
    phi = check_floating("phi", phi)
    alpha = check_floating("alpha", alpha)
    bias = check_floating("bias", bias)
    iters = check_int("iters", iters, minimum=0)
    eps = check_positive_float("eps", eps)
    width = num_mapping_columns(n)
    layout = f"(n*C, n*n + 2*n) for n={n}, C={hidden}"
    check_shape("phi", phi, (n * hidden, width), layout)
    check_shape("alpha", alpha, (3,), "(pre, post, res)")
    check_shape("bias", bias, (width,), f"(n*n + 2*n) for n={n}")
    check_same_device(x=x, phi=phi, alpha=alpha, bias=bias)
    return iters, eps


def mappings_reference(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of ``mhc_mappings``, without argument checks."""
    n = x.shape[-2]
    dtype = coefficient_dtype(x.dtype)
    logits = rms_projection(x, phi, eps)
    alpha, bias = alpha.to(dtype), bias.to(dtype)
    scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    logits = logits * scale + bias
    pre, post, res = logits.split([n, n, n * n], dim=-1)
    h_pre = torch.sigmoid(pre)
    h_post = 2.0 * torch.sigmoid(post)
    h_res = sinkhorn_reference(res.unflatten(-1, (n, n)), iters)
    return h_pre, h_post, h_res
