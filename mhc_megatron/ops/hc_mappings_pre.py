"""``hc_mappings_pre``: the mappings of a sub-layer under HC and its input, in one op.

ByteDance's dynamic Hyper-Connections (Zhu et al., 2409.19606, eq. 10-13), per token with streams
``x_i`` (``i < n``, rows of ``x [..., n, C]``):

    norm(x_i) = x_i / sqrt(mean(x_i^2) + eps)                 (per stream, over C; no weight)
    d_i       = tanh(norm(x_i) @ weight)                      [n + 2], columns pre | post | res (n)
    h_pre[i]  = alpha[0] * d_i[0] + static_pre[i]
    h_post[i] = alpha[1] * d_i[1] + static_post[i]
    A_r[i, j] = alpha[2] * d_i[2 + j] + static_res[i, j]      (input stream i -> output stream j)
    h_res     = A_r^T                                         (h_res[o, i]: input i in output o)
    layer_input = sum_i h_pre[i] * x_i                        (= mhc_pre(x, h_pre))

Unconstrained: no sigmoid, no Sinkhorn. ``static_res`` is indexed ``[input, output]`` as the HC
paper's ``A_r``; the returned ``h_res`` follows this package's convention (rows are outputs, see
``mhc_megatron.ops``), so ``mhc_post_res`` applies it as it applies mHC's.

One op for the fused kernels: in forward they read each token's streams once for the norms, the
projections and the sub-layer input, and in backward they write the stream gradient once.
"""

from __future__ import annotations

import functools

import torch

from mhc_megatron.method import EPS
from mhc_megatron.ops import backends, fused
from mhc_megatron.ops.checks import (
    check_floating,
    check_positive_float,
    check_same_device,
    check_shape,
    coefficient_dtype,
)
from mhc_megatron.ops.mappings import check_streams
from mhc_megatron.ops.pre import pre_reference


def hc_mappings_pre(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    static_pre: torch.Tensor,
    static_post: torch.Tensor,
    static_res: torch.Tensor,
    eps: float = EPS,
    stream_gradient: fused.StreamGradient | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sub-layer input and the HC mappings of streams ``x``.

    Args:
        x: ``[..., n, C]`` streams of each token.
        weight: ``[C, n + 2]`` dynamic projection, columns ``[pre | post | res (n)]``.
        alpha: ``[3]`` scales ``(pre, post, res)`` of the dynamic part.
        static_pre: ``[n]``; static_post: ``[n]``; static_res: ``[n, n]`` indexed ``[input, output]``.
        eps: added to ``mean(x_i^2)`` inside the square root of each stream's norm.
        stream_gradient: shared with the ``mhc_post_res`` of the same connection, it lets the fused
            kernels write the gradient of ``x`` once (``fused.StreamGradient``; other backends ignore it).

    Returns:
        ``(layer_input [..., C], h_pre [..., n], h_post [..., n], h_res [..., n, n])``: the input in
        the dtype of ``x``, the coefficients in float32 (float64 when ``x`` is float64);
        ``h_res[..., o, i]`` is the weight of input stream i in output stream o.
    """
    eps = check_hc_mapping_arguments(x, weight, alpha, static_pre, static_post, static_res, eps)
    fused_op = functools.partial(fused.hc_mappings_pre, stream_gradient=stream_gradient)
    return backends.run("hc_mappings_pre", hc_mappings_pre_reference, fused_op, x, weight, alpha, static_pre,
                        static_post, static_res, eps)


def check_hc_mapping_arguments(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    static_pre: torch.Tensor,
    static_post: torch.Tensor,
    static_res: torch.Tensor,
    eps: float,
) -> float:
    """Validate the arguments of ``hc_mappings_pre``; ``eps`` as a float."""
    n, hidden = check_streams("x", x)
    parameters = {"weight": weight, "alpha": alpha, "static_pre": static_pre, "static_post": static_post,
                  "static_res": static_res}
    for name, value in parameters.items():
        check_floating(name, value)
    eps = check_positive_float("eps", eps)
    check_shape("weight", weight, (hidden, n + 2), f"(C, n + 2) for n={n}, C={hidden}")
    check_shape("alpha", alpha, (3,), "(pre, post, res)")
    check_shape("static_pre", static_pre, (n,), f"(n,) for n={n}")
    check_shape("static_post", static_post, (n,), f"(n,) for n={n}")
    check_shape("static_res", static_res, (n, n), f"(n, n) [input, output] for n={n}")
    check_same_device(x=x, **parameters)
    return eps


def hc_mappings_pre_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    static_pre: torch.Tensor,
    static_post: torch.Tensor,
    static_res: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of ``hc_mappings_pre``, without argument checks."""
    dtype = coefficient_dtype(x.dtype)
    xs = x.to(dtype)
    normed = xs * torch.rsqrt(xs.square().mean(dim=-1, keepdim=True) + eps)
    dynamic = torch.tanh(normed @ weight.to(dtype))  # [..., n, n + 2], row = stream
    alpha = alpha.to(dtype)
    h_pre = alpha[0] * dynamic[..., 0] + static_pre.to(dtype)
    h_post = alpha[1] * dynamic[..., 1] + static_post.to(dtype)
    a_res = alpha[2] * dynamic[..., 2:] + static_res.to(dtype)  # [..., input, output]
    return pre_reference(x, h_pre), h_pre, h_post, a_res.transpose(-1, -2)
