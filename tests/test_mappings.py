"""mhc_mappings: agreement with the loop reference, the zero-parameter point, dtypes, gradients, bad input."""

import pytest
import torch

from loop_reference import mappings_token, per_token
from mhc_megatron.ops import mhc_mappings, num_mapping_columns

# Every test runs on each backend of the operators (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("op_backend")


def random_arguments(n, hidden, lead=(2, 3), dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = num_mapping_columns(n)
    x = torch.randn(*lead, n, hidden, dtype=dtype, generator=generator)
    phi = torch.randn(n * hidden, width, dtype=dtype, generator=generator) / (n * hidden) ** 0.5
    alpha = torch.tensor([0.7, -1.3, 2.1], dtype=dtype)
    bias = torch.randn(width, dtype=dtype, generator=generator) * 0.5
    return x, phi, alpha, bias


@pytest.mark.parametrize("n, hidden", [(1, 5), (2, 3), (4, 8), (5, 2)])
@pytest.mark.parametrize("iters", [0, 20])
def test_matches_loop_reference_in_float64(n, hidden, iters):
    x, phi, alpha, bias = random_arguments(n, hidden, seed=n)
    args = (phi.tolist(), alpha.tolist(), bias.tolist(), iters, 1e-6)
    expected = per_token(lambda token: mappings_token(token, *args), x, token_dims=2)
    for got, want in zip(mhc_mappings(x, phi, alpha, bias, iters=iters), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 3, 4])
def test_zero_phi_and_bias_give_half_one_and_uniform(n):
    x = torch.randn(7, n, 16)
    width = num_mapping_columns(n)
    h_pre, h_post, h_res = mhc_mappings(x, torch.zeros(n * 16, width), torch.ones(3), torch.zeros(width))
    torch.testing.assert_close(h_pre, torch.full((7, n), 0.5), rtol=0, atol=0)
    torch.testing.assert_close(h_post, torch.ones(7, n), rtol=0, atol=0)
    torch.testing.assert_close(h_res, torch.full((7, n, n), 1.0 / n), rtol=0, atol=1e-7)


def test_eps_sits_inside_the_square_root():
    """An all-zero token has r = sqrt(eps): finite mappings, not a division by zero."""
    x, phi, alpha, bias = random_arguments(4, 8)
    x = torch.zeros_like(x)
    for h in mhc_mappings(x, phi, alpha, bias):
        assert torch.isfinite(h).all()


@pytest.mark.parametrize("dtype, out_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64),
])
def test_coefficients_are_float32_at_least(dtype, out_dtype):
    x, phi, alpha, bias = random_arguments(4, 8, dtype=torch.float32)
    for h in mhc_mappings(x.to(dtype), phi, alpha, bias):
        assert h.dtype == out_dtype


def test_gradcheck_in_every_argument():
    x, phi, alpha, bias = (t.requires_grad_() for t in random_arguments(3, 4, lead=(2,)))
    assert torch.autograd.gradcheck(
        lambda *a: mhc_mappings(*a, iters=6), (x, phi, alpha, bias)
    )


def test_gradient_reaches_bf16_streams_in_their_dtype():
    x, phi, alpha, bias = random_arguments(4, 8, dtype=torch.float32)
    x = x.to(torch.bfloat16).requires_grad_()
    sum(h.sum() for h in mhc_mappings(x, phi, alpha, bias)).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def bad_cases():
    x, phi, alpha, bias = random_arguments(4, 8, dtype=torch.float32)
    meta_phi = torch.empty_like(phi, device="meta")
    return [
        ((x[0, 0, 0], phi, alpha, bias), {}, ValueError, r"x must have at least 2 dimensions"),
        ((x.long(), phi, alpha, bias), {}, TypeError, "x must have a floating-point dtype"),
        ((torch.randn(2, 0, 8), phi, alpha, bias), {}, ValueError, "n .* must be >= 1, got 0"),
        ((torch.randn(2, 4, 0), phi, alpha, bias), {}, ValueError, "hidden size C >= 1"),
        ((x, phi[:-1], alpha, bias), {}, ValueError, r"phi must have shape \(32, 24\)"),
        ((x, phi.T, alpha, bias), {}, ValueError, r"phi must have shape \(32, 24\).*got \(24, 32\)"),
        ((x, phi, alpha[:2], bias), {}, ValueError, r"alpha must have shape \(3,\)"),
        ((x, phi, alpha, bias[:-1]), {}, ValueError, r"bias must have shape \(24,\)"),
        ((x, phi, alpha, bias.reshape(1, 24)), {}, ValueError, r"bias must have shape \(24,\)"),
        ((x, phi.int(), alpha, bias), {}, TypeError, "phi must have a floating-point dtype"),
        ((x, phi, alpha, bias), {"iters": -2}, ValueError, "iters must be >= 0"),
        ((x, phi, alpha, bias), {"eps": 0.0}, ValueError, "eps must be > 0"),
        ((x, meta_phi, alpha, bias), {}, ValueError, "one device"),
    ]


@pytest.mark.parametrize("args, kwargs, error, words", bad_cases())
def test_bad_input_raises(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        mhc_mappings(*args, **kwargs)
