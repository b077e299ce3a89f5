"""sinkhorn: agreement with the loop reference, invariants, gradients, memory and bad input."""

import pytest
import torch

from loop_reference import per_token, sinkhorn_matrix
from mhc_megatron.ops import sinkhorn

# Every test runs on each backend of the operators (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("op_backend")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("iters", [0, 1, 5, 20])
def test_matches_loop_reference_in_float64(n, iters):
    logits = torch.randn(2, 3, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 3
    expected = per_token(lambda m: sinkhorn_matrix(m, iters), logits, token_dims=2)
    torch.testing.assert_close(sinkhorn(logits, iters), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_rows_sum_to_one_and_columns_nearly(n):
    """Moderate logits: standard deviation 0.5 (mHC's logits start near 0.01 and stay small)."""
    logits = torch.randn(4096, n, n, generator=torch.Generator().manual_seed(0)) * 0.5
    h = sinkhorn(logits)
    assert h.dtype == torch.float32
    assert (h >= 0).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(4096, n), rtol=0, atol=1e-6)
    torch.testing.assert_close(h.sum(-2), torch.ones(4096, n), rtol=0, atol=1e-3)


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_finite_for_large_logits_in_float32(scale):
    logits = (torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(1)) * scale).requires_grad_()
    h = sinkhorn(logits)
    assert torch.isfinite(h).all()
    assert ((h >= 0) & (h <= 1)).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(64, 4), rtol=0, atol=1e-5)
    h.pow(2).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_invariant_to_a_shift_of_the_logits():
    logits = torch.randn(8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(logits + 123.0), sinkhorn(logits), rtol=0, atol=1e-12)


def test_zero_logits_give_the_uniform_matrix():
    torch.testing.assert_close(sinkhorn(torch.zeros(3, 5, 5)), torch.full((3, 5, 5), 0.2))


@pytest.mark.parametrize("n, iters", [(1, 20), (3, 0), (3, 1), (4, 20), (5, 7)])
def test_gradcheck_in_float64(n, iters):
    logits = torch.randn(3, n, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, iters), (logits,))


def test_backward_keeps_only_the_logits():
    """The 2*iters intermediate matrices are recomputed in backward, not saved in forward."""
    logits = torch.randn(1000, 4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        h = sinkhorn(logits, iters=20)
    assert sum(saved) == logits.numel()
    (gradient,) = torch.autograd.grad(h[:, 0, 1].sum(), logits)
    expected_logits = logits.detach().double().requires_grad_()
    reference = torch.exp(expected_logits - expected_logits.amax((-2, -1), keepdim=True))
    for _ in range(20):
        reference = reference / reference.sum(-2, keepdim=True)
        reference = reference / reference.sum(-1, keepdim=True)
    (expected,) = torch.autograd.grad(reference[:, 0, 1].sum(), expected_logits)
    torch.testing.assert_close(gradient.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, out_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64),
])
def test_output_dtype(dtype, out_dtype):
    assert sinkhorn(torch.randn(2, 4, 4).to(dtype)).dtype == out_dtype


@pytest.mark.parametrize("logits, iters, error, words", [
    (torch.randn(4, 4, 3), 20, ValueError, "square"),
    (torch.randn(4), 20, ValueError, "at least 2 dimensions"),
    (torch.zeros(2, 4, 4, dtype=torch.int64), 20, TypeError, "floating-point"),
    (torch.randn(2, 0, 0), 20, ValueError, "n"),
    (torch.randn(2, 4, 4), -1, ValueError, "iters must be >= 0, got -1"),
    (torch.randn(2, 4, 4), 2.0, TypeError, "iters must be an int"),
    ([[1.0]], 20, TypeError, "logits must be a torch.Tensor"),
])
def test_bad_input_raises(logits, iters, error, words):
    with pytest.raises(error, match=words):
        sinkhorn(logits, iters)
