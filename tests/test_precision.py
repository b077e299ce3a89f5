"""Per-dtype accuracy of every backend of the operators, with the tolerances written down once.

The float64 values come from the independent loop reference (tests/loop_reference.py: plain
Python floats, one token at a time), never from the op under test. Two rules for every backend
(``reference``, ``compile``, ``fused``), op and dtype, on the same inputs rounded to that dtype:
1. flash-attention's rule: the error of the op against float64 is at most 2x the error of the
   naive eager PyTorch computation done entirely in that dtype (``naive_*`` below);
2. the error is at most the tolerance in ``TOLERANCES`` (max absolute error relative to the
   largest magnitude of the float64 result).
"""

import functools

import pytest
import torch

import loop_reference
from fused_kernels import require_fused
from mhc_megatron.ops import backends, mhc_mappings, mhc_post_res, mhc_pre, num_mapping_columns, sinkhorn

#  op:            float32   bfloat16  float16
TOLERANCES = {
    "sinkhorn":   {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6},
    "mappings":   {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6},
    "pre":        {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4},
    "post_res":   {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4},
}
N, HIDDEN, TOKENS = 4, 64, 512


def naive_sinkhorn(logits, iters=20):
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def naive_mappings(x, phi, alpha, bias, eps=1e-6):
    v = x.flatten(-2)
    r = torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    m = v @ phi
    pre, post, res = m.split([N, N, N * N], dim=-1)
    b_pre, b_post, b_res = bias.split([N, N, N * N])
    return (
        torch.sigmoid(alpha[0] * pre / r + b_pre),
        2 * torch.sigmoid(alpha[1] * post / r + b_post),
        naive_sinkhorn((alpha[2] * res / r + b_res).unflatten(-1, (N, N))),
    )


def naive_pre(x, h_pre):
    return (h_pre.unsqueeze(-1) * x).sum(-2)


def naive_post_res(x, f, h_post, h_res):
    return h_res @ x + h_post.unsqueeze(-1) * f.unsqueeze(-2)


def inputs(op):
    generator = torch.Generator().manual_seed(0)
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
    if op == "sinkhorn":
        return (randn(TOKENS, N, N),)
    if op == "mappings":
        width = num_mapping_columns(N)
        return (randn(TOKENS, N, HIDDEN), randn(N * HIDDEN, width, scale=(N * HIDDEN) ** -0.5),
                torch.tensor([0.5, 0.8, 1.5], dtype=torch.float64), randn(width, scale=0.5))
    h_pre, h_post = torch.rand(TOKENS, N, generator=generator, dtype=torch.float64), 2 * torch.rand(TOKENS, N, generator=generator, dtype=torch.float64)
    h_res = sinkhorn(randn(TOKENS, N, N))
    if op == "pre":
        return randn(TOKENS, N, HIDDEN), h_pre
    return randn(TOKENS, N, HIDDEN), randn(TOKENS, HIDDEN), h_post, h_res


OPS = {
    "sinkhorn": (sinkhorn, naive_sinkhorn),
    "mappings": (mhc_mappings, naive_mappings),
    "pre": (mhc_pre, naive_pre),
    "post_res": (mhc_post_res, naive_post_res),
}


def relative_error(got, want):
    outputs = zip(got, want) if isinstance(got, tuple) else [(got, want[0])]
    return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in outputs)


@functools.lru_cache(maxsize=None)
def exact_outputs(op: str, dtype: torch.dtype) -> tuple:
    """The loop reference's float64 outputs for ``inputs(op)`` rounded to ``dtype``."""
    rounded = [t.to(dtype).double() for t in inputs(op)]
    if op == "sinkhorn":
        rounded.append(20)
    elif op == "mappings":
        rounded += [20, 1e-6]
    return loop_reference.op_outputs(op, rounded)


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", list(OPS))
def test_error_against_float64(op, dtype, backend):
    if backend == "fused":
        require_fused("cpu")
    ours, naive = OPS[op]
    rounded = [t.to(dtype) for t in inputs(op)]
    exact = exact_outputs(op, dtype)
    with backends.use_backend(backend):
        our_error = relative_error(ours(*rounded), exact)
    naive_error = relative_error(naive(*rounded), exact)
    assert our_error <= 2 * naive_error, f"{op} {dtype} {backend}: ours {our_error:.3g} vs naive {naive_error:.3g}"
    assert our_error <= TOLERANCES[op][dtype], f"{op} {dtype} {backend}: error {our_error:.3g}"
