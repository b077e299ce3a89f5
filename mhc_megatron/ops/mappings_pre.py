"""``mhc_mappings_pre``: the mappings of a sub-layer and its input, in one op.

    h_pre, h_post, h_res = mhc_mappings(x, phi, alpha, bias, iters, eps)
    layer_input = mhc_pre(x, h_pre)

exactly (same values, gradients in every argument). It exists for the fused kernels: in forward
they read the streams once for both (the paper's fused ``F_pre``), and in backward they write the
stream gradient of both at once instead of two gradients that autograd then adds.
"""

from __future__ import annotations

import functools

import torch

from mhc_megatron.method import EPS, SINKHORN_ITERS
from mhc_megatron.ops import backends, fused
from mhc_megatron.ops.mappings import check_mapping_arguments, mappings_reference
from mhc_megatron.ops.pre import pre_reference


def mhc_mappings_pre(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    iters: int = SINKHORN_ITERS,
    eps: float = EPS,
    stream_gradient: fused.StreamGradient | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sub-layer input and the mappings of streams ``x``.

    Args: as ``mhc_mappings``, and ``stream_gradient``: shared with the ``mhc_post_res`` of the same
        connection, it lets the fused kernels write the gradient of ``x`` once (``fused.StreamGradient``;
        other backends ignore it and autograd adds the two gradients).

    Returns:
        ``(layer_input [..., C], h_pre [..., n], h_post [..., n], h_res [..., n, n])``: the input in
        the dtype of ``x`` (accumulated in float32, float64 for float64 ``x``), the coefficients as
        ``mhc_mappings`` returns them.
    """
    iters, eps = check_mapping_arguments(x, phi, alpha, bias, iters, eps)
    fused_op = functools.partial(fused.mappings_pre, stream_gradient=stream_gradient)
    return backends.run("mappings_pre", mappings_pre_reference, fused_op, x, phi, alpha, bias, iters, eps)


def mappings_pre_reference(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of ``mhc_mappings_pre``, without argument checks."""
    h_pre, h_post, h_res = mappings_reference(x, phi, alpha, bias, iters, eps)
    return pre_reference(x, h_pre), h_pre, h_post, h_res
