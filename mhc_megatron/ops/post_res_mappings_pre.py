"""``mhc_post_res_mappings_pre``: the stream state between two sub-layers, in one op.

    streams = mhc_post_res(x, f, h_post, h_res)                              this sub-layer's write
    layer_input, next_h_pre, next_h_post, next_h_res = mhc_mappings_pre(streams, phi, alpha, bias, iters, eps)

exactly (same values, gradients in every argument): ``phi``, ``alpha``, ``bias`` are the next
sub-layer's mapping parameters. It exists for the fused kernels. A layer runs the two ops back to
back (the attention's post_res, then the MLP's mappings and input), and so does their backward: in
forward the kernel computes the streams a block of tokens at a time and the mappings read them from
the cache; in backward the gradient of ``streams`` goes straight from the mappings' backward into
post_res's, a group of tokens at a time, and is never written to memory. Per token that saves a read
of the streams in forward and a write and a read of their gradient in backward (docs/kernels.md,
"Bytes moved").
"""

from __future__ import annotations

import functools

import torch

from mhc_megatron.method import EPS, SINKHORN_ITERS
from mhc_megatron.ops import backends, fused
from mhc_megatron.ops.mappings import check_mapping_arguments
from mhc_megatron.ops.mappings_pre import mappings_pre_reference
from mhc_megatron.ops.post_res import check_post_res_arguments, post_res_reference


def mhc_post_res_mappings_pre(
    x: torch.Tensor,
    f: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    iters: int = SINKHORN_ITERS,
    eps: float = EPS,
    stream_gradient: fused.StreamGradient | None = None,
    next_stream_gradient: fused.StreamGradient | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This sub-layer's post_res and the next sub-layer's mappings and input.

    Args:
        x, f, h_post, h_res: as ``mhc_post_res`` (this sub-layer's streams ``[..., n, C]``, output
            ``[..., C]`` and coefficients).
        phi, alpha, bias, iters, eps: the next sub-layer's, as ``mhc_mappings``.
        stream_gradient: this sub-layer's hand-off, shared with the ``mhc_mappings_pre`` (or this op)
            that computed ``h_post``, ``h_res`` and the sub-layer input (see ``mhc_post_res``).
        next_stream_gradient: the next sub-layer's hand-off, to share with its ``mhc_post_res`` (see
            ``mhc_mappings_pre``). Other backends than ``fused`` ignore both.

    Returns:
        ``(streams [..., n, C], layer_input [..., C], next_h_pre [..., n], next_h_post [..., n],
        next_h_res [..., n, n])``: the streams and the next sub-layer's input in the dtype of ``x``,
        the coefficients as ``mhc_mappings`` returns them.
    """
    check_post_res_arguments(x, f, h_post, h_res)
    iters, eps = check_mapping_arguments(x, phi, alpha, bias, iters, eps)
    fused_op = functools.partial(fused.post_res_mappings_pre, stream_gradient=stream_gradient,
                                 next_stream_gradient=next_stream_gradient)
    return backends.run("post_res_mappings_pre", post_res_mappings_pre_reference, fused_op, x, f, h_post, h_res,
                        phi, alpha, bias, iters, eps)


def post_res_mappings_pre_reference(
    x: torch.Tensor, f: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, phi: torch.Tensor,
    alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of ``mhc_post_res_mappings_pre``, without argument checks."""
    streams = post_res_reference(x, f, h_post, h_res)
    return (streams, *mappings_pre_reference(streams, phi, alpha, bias, iters, eps))
