"""Sinkhorn-Knopp projection of logits onto (approximately) doubly stochastic matrices.

Contract (mHC paper, eq. 9): ``M0 = exp(L - max(L))`` with one max per matrix, then ``iters`` times:
divide every column by its sum, then every row by its sum. After the last step the rows sum to 1
to rounding and the columns approximately.

The iterations run in the log domain: dividing column j by its sum is subtracting
``logsumexp`` over that column from the log-matrix. That is the same arithmetic on paper, but it
stays finite and exact where ``exp`` underflows: with logits spread by more than ~87 (float32) a
whole column of ``M0`` becomes 0 and the literal division would give 0/0.

The backward pass does not keep the ``2 * iters`` intermediate matrices. Only the logits are saved;
backward recomputes the iterations and then runs them in reverse (``SinkhornFunction``).
"""

from __future__ import annotations

import torch

from mhc_megatron.method import SINKHORN_ITERS
from mhc_megatron.ops import backends, fused
from mhc_megatron.ops.checks import (
    check_floating,
    check_int,
    check_min_rank,
    check_num_streams,
    coefficient_dtype,
)

_COLUMNS, _ROWS = -2, -1


def _log_sinkhorn_states(logits: torch.Tensor, iters: int) -> list[torch.Tensor]:
    """Log-matrices after each half-step: ``[log M0, after cols 1, after rows 1, ...]``."""
    log_m = logits - logits.amax(dim=(-2, -1), keepdim=True)
    states = [log_m]
    for _ in range(iters):
        for axis in (_COLUMNS, _ROWS):
            log_m = log_m - torch.logsumexp(log_m, dim=axis, keepdim=True)
            states.append(log_m)
    return states


def _sinkhorn_backward(logits: torch.Tensor, grad_out: torch.Tensor, iters: int) -> torch.Tensor:
    """Gradient of ``sinkhorn`` w.r.t. its logits, by recomputing the forward iterations.

    A half-step ``l' = l - logsumexp_axis(l)`` has the vector-Jacobian product
    ``g = g' - exp(l') * sum_axis(g')`` (``exp(l')`` is the softmax of ``l`` along the axis).
    The max subtracted from ``M0`` is differentiated like ``amax`` (split evenly among ties); for
    ``iters >= 1`` its term is zero up to rounding, since the result does not depend on a shift.
    """
    states = _log_sinkhorn_states(logits, iters)
    grad = grad_out * states[-1].exp()
    half_steps = [_COLUMNS, _ROWS] * iters
    for state, axis in zip(reversed(states[1:]), reversed(half_steps)):
        grad = grad - state.exp() * grad.sum(dim=axis, keepdim=True)
    is_max = logits == logits.amax(dim=(-2, -1), keepdim=True)
    tie_share = is_max / is_max.sum(dim=(-2, -1), keepdim=True)
    return grad - grad.sum(dim=(-2, -1), keepdim=True) * tie_share


class SinkhornFunction(torch.autograd.Function):
    """Autograd for ``sinkhorn`` that saves only the logits (float32 or float64)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.iters = iters
        ctx.save_for_backward(logits)
        return _log_sinkhorn_states(logits, iters)[-1].exp()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return _sinkhorn_backward(logits, grad_out, ctx.iters), None


def sinkhorn(logits: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Project ``logits`` ``[..., n, n]`` onto doubly stochastic matrices ``[..., n, n]``.

    Args:
        logits: ``[..., n, n]`` floating tensor, any leading dimensions (tokens), n >= 1.
        iters: number of Sinkhorn-Knopp iterations (each: columns, then rows), >= 0.
            ``iters = 0`` returns ``exp(logits - max)`` unnormalised.

    Returns:
        ``[..., n, n]`` in float64 for float64 logits, float32 otherwise (coefficient math is
        never done in half precision). Finite for any finite logits. Rows sum to 1 to rounding;
        columns to within the Sinkhorn residual (about 1e-3 or better after 20 iterations for
        moderate logits).
    """
    logits = check_floating("logits", logits)
    iters = check_int("iters", iters, minimum=0)
    check_min_rank("logits", logits, 2, "[..., n, n]")
    n = logits.shape[-1]
    if logits.shape[-2] != n:
        raise ValueError(
            f"logits must be square in its last two dimensions [..., n, n], "
            f"got shape {tuple(logits.shape)}"
        )
    check_num_streams("logits.shape[-1]", n)
    return backends.run("sinkhorn", sinkhorn_reference, fused.sinkhorn, logits, iters)


def sinkhorn_reference(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The PyTorch implementation of ``sinkhorn``, without argument checks."""
    return SinkhornFunction.apply(logits.to(coefficient_dtype(logits.dtype)), iters)
