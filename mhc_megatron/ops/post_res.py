"""``mhc_post_res``: mix the streams and write the sub-layer output into each of them.

    out[i] = sum_j h_res[i, j] * x[j] + h_post[i] * f

``h_res`` multiplies the streams from the left: row i of ``h_res`` produces output stream i.
"""

from __future__ import annotations

import functools

import torch

from mhc_megatron.ops import backends, fused
from mhc_megatron.ops.checks import check_floating, check_same_device, check_shape, coefficient_dtype
from mhc_megatron.ops.mappings import check_streams


def mhc_post_res(
    x: torch.Tensor,
    f: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    stream_gradient: fused.StreamGradient | None = None,
) -> torch.Tensor:
    """Next stream state from the current streams and the sub-layer output.

    Args:
        x: ``[..., n, C]`` streams entering the sub-layer.
        f: ``[..., C]`` sub-layer output.
        h_post: ``[..., n]`` write weights.
        h_res: ``[..., n, n]`` mixing matrices, ``h_res[..., i, j]`` = weight of input stream j in
            output stream i.
        stream_gradient: the one ``mhc_mappings_pre`` (or ``hc_mappings_pre``) of this connection got
            (see there).

    Returns:
        ``[..., n, C]`` in the dtype of ``x``, accumulated in float32 (float64 for float64 ``x``).
    """
    check_post_res_arguments(x, f, h_post, h_res)
    fused_op = functools.partial(fused.post_res, stream_gradient=stream_gradient)
    return backends.run("post_res", post_res_reference, fused_op, x, f, h_post, h_res)


def check_post_res_arguments(x: object, f: object, h_post: object, h_res: object) -> None:
    """Validate the arguments of ``mhc_post_res`` (shapes as documented there, one device)."""
    n, hidden = check_streams("x", x)
    lead = tuple(x.shape[:-2])
    check_floating("f", f)
    check_floating("h_post", h_post)
    check_floating("h_res", h_res)
    check_shape("f", f, (*lead, hidden), "[..., C] with the leading dimensions of x")
    check_shape("h_post", h_post, (*lead, n), "[..., n] with the leading dimensions of x")
    check_shape("h_res", h_res, (*lead, n, n), "[..., n, n] with the leading dimensions of x")
    check_same_device(x=x, f=f, h_post=h_post, h_res=h_res)


def post_res_reference(
    x: torch.Tensor, f: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """The PyTorch implementation of ``mhc_post_res``, without argument checks."""
    dtype = coefficient_dtype(x.dtype)
    mixed = torch.einsum("...ij,...jc->...ic", h_res.to(dtype), x.to(dtype))
    written = h_post.to(dtype).unsqueeze(-1) * f.to(dtype).unsqueeze(-2)
    return (mixed + written).to(x.dtype)
