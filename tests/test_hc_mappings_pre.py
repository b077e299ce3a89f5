"""``hc_mappings_pre`` (HC's mappings and the sub-layer input in one op): its fused CPU kernels over
the shapes that reach every code path, at each instruction-set level, and its argument checks.

test_fused.py runs it with the other ops (loop reference, chunked weight gradient, leading
dimensions, the 2x rule in float32 and bfloat16, bit-identical backward, the stream gradient
hand-off, torch.compile); here: every n in 1..8 with ragged token counts (1, 7, 33, 130: a single
token, a partial parallel block, several blocks and a tail) and hidden sizes that are not multiples
of any vector width (1, 5, 17) or are (64), gradients of every input against float64, low precision
within the tolerances below, and the errors bad arguments raise. Tolerances, as the largest absolute
error relative to the largest magnitude of each result:
* float64: 1e-10 (the fused kernels against the PyTorch reference, both in float64);
* float32 and bfloat16: ``LOW_PRECISION_TOLERANCE`` against the float64 reference on the same
  rounded inputs (float32: a few units of the last place, summed over C = 129 (measured at most
  1.1e-6 at any level); bfloat16: the sub-layer input and every gradient in bfloat16 are rounded to
  8 bits, 2^-8 relative, so twice that (measured at most 4.1e-3)).
"""

import pytest
import torch

from fused_kernels import require_fused
from mhc_megatron.modules import HyperConnection
from mhc_megatron.ops import backends, fused, hc_mappings_pre

FLOAT64_TOLERANCE = 1e-10
LOW_PRECISION_TOLERANCE = {torch.float32: 4e-6, torch.bfloat16: 8e-3}
SHAPES = [(1, 1), (7, 5), (33, 17), (130, 64)]  # (tokens, hidden)


@pytest.fixture(params=fused.CPU_ISA_LEVELS)
def level(request):
    """Each CPU level active in turn (a level this CPU cannot run skips, naming those it runs)."""
    require_fused("cpu")
    runnable = fused.cpu_isa_levels()
    if request.param not in runnable:
        pytest.skip(f"this CPU does not run {request.param} (it runs: {', '.join(runnable)})")
    with fused.use_cpu_isa(request.param):
        yield request.param


def inputs(n: int, hidden: int, tokens: int, seed: int = 0) -> list:
    """Float64 arguments: x, weight (tanh's argument near 1), alpha, static_pre, static_post, static_res, eps."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    return [randn(tokens, n, hidden), randn(hidden, n + 2, scale=hidden ** -0.5),
            torch.tensor([0.7, 1.1, 1.5], dtype=torch.float64), randn(n), randn(n), randn(n, n), 1e-6]


def outputs_and_gradients(args, backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """The four outputs and the gradients of a fixed random projection of them w.r.t. the six tensors."""
    leaves = [a.to(dtype).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with backends.use_backend(backend):
        outputs = hc_mappings_pre(*leaves)
    generator = torch.Generator().manual_seed(1)
    loss = sum((out.double() * torch.randn(out.shape, dtype=torch.float64, generator=generator)).sum()
               for out in outputs)
    grads = torch.autograd.grad(loss, [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)])
    return [t.detach() for t in (*outputs, *grads)]


def relative_errors(got, want) -> list[float]:
    return [((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-300)).item() for g, w in zip(got, want)]


@pytest.mark.parametrize("tokens, hidden", SHAPES)
@pytest.mark.parametrize("n", range(1, 9))
def test_float64_outputs_and_every_gradient_match_the_reference(n, tokens, hidden, level):
    args = inputs(n, hidden, tokens)
    want = outputs_and_gradients(args, "reference", torch.float64)
    got = outputs_and_gradients(args, "fused", torch.float64)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert [g.dtype for g in got] == [torch.float64] * 10
    assert max(relative_errors(got, want)) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_TOLERANCE))
@pytest.mark.parametrize("n", [3, 4])
def test_low_precision_within_the_tolerance_of_float64(n, dtype, level):
    """Streams and the sub-layer input in ``dtype``; coefficients and parameter gradients in float32."""
    rounded = [a.to(dtype).double() if isinstance(a, torch.Tensor) else a for a in inputs(n, 129, 130)]
    want = outputs_and_gradients(rounded, "reference", torch.float64)
    got = outputs_and_gradients(rounded, "fused", dtype)
    assert [g.dtype for g in got] == [dtype, *[torch.float32] * 3, dtype, *[dtype] * 5]
    errors = relative_errors(got, want)
    assert max(errors) <= LOW_PRECISION_TOLERANCE[dtype], errors


def test_the_module_runs_the_op_and_keeps_its_parameter_names(level):
    """Mode hc: ``pre`` is ``hc_mappings_pre`` of its parameters (checkpoints keep their keys)."""
    torch.manual_seed(0)
    module = HyperConnection(hidden_size=9, num_streams=3, mode="hc", layer_index=4, alpha_init=0.3).double()
    assert [name for name, _ in module.named_parameters()] == [
        "weight", "alpha", "static_pre", "static_post", "static_res"]
    with torch.no_grad():
        module.weight.normal_()
    streams = torch.randn(5, 2, 3 * 9, dtype=torch.float64)
    with backends.use_backend("fused"):
        layer_input, mixing = module.pre(streams)
        coefficients = module.mappings(streams.unflatten(-1, (3, 9)))
    with backends.use_backend("reference"):
        want = hc_mappings_pre(streams.unflatten(-1, (3, 9)), module.weight, module.alpha, module.static_pre,
                               module.static_post, module.static_res, module.eps)
    got = [layer_input, mixing.h_pre, mixing.h_post, mixing.h_res]
    assert max(relative_errors(got, want)) <= FLOAT64_TOLERANCE
    assert max(relative_errors(coefficients, want[1:])) <= FLOAT64_TOLERANCE


def replace(args: list, index: int, value) -> list:
    args = list(args)
    args[index] = value
    return args


GOOD = inputs(n=3, hidden=5, tokens=4)
BAD_ARGUMENTS = [
    (replace(GOOD, 0, torch.zeros(4, 3, 5, dtype=torch.int64)), TypeError, "x must have a floating-point dtype"),
    (replace(GOOD, 0, torch.zeros(5)), ValueError, r"x must have at least 2 dimensions \[..., n, C\], got shape \(5,\)"),
    (replace(GOOD, 1, torch.zeros(5, 4)), ValueError,
     r"weight must have shape \(5, 5\) \(C, n \+ 2\) for n=3, C=5, got \(5, 4\)"),
    (replace(GOOD, 1, torch.zeros(3, 5)), ValueError, r"weight must have shape \(5, 5\)"),
    (replace(GOOD, 2, torch.zeros(2)), ValueError, r"alpha must have shape \(3,\) \(pre, post, res\), got \(2,\)"),
    (replace(GOOD, 3, torch.zeros(4)), ValueError, r"static_pre must have shape \(3,\) \(n,\) for n=3, got \(4,\)"),
    (replace(GOOD, 4, torch.zeros(3, 1)), ValueError, r"static_post must have shape \(3,\) \(n,\) for n=3, got \(3, 1\)"),
    (replace(GOOD, 5, torch.zeros(3)), ValueError,
     r"static_res must have shape \(3, 3\) \(n, n\) \[input, output\] for n=3, got \(3,\)"),
    (replace(GOOD, 5, torch.zeros(3, 3, dtype=torch.int32)), TypeError, "static_res must have a floating-point dtype"),
    (replace(GOOD, 3, [1.0, 0.0, 0.0]), TypeError, "static_pre must be a torch.Tensor, got list"),
    (replace(GOOD, 6, 0.0), ValueError, "eps must be > 0, got 0.0"),
    (replace(GOOD, 6, "1e-6"), TypeError, "eps must be a float, got str"),
    (replace(GOOD, 1, torch.zeros(5, 5, device="meta")), ValueError,
     "all tensors must be on one device, got x on cpu, weight on meta"),
]


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("args, error, message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_naming_the_value_and_what_was_expected(args, error, message, backend):
    with backends.use_backend(backend), pytest.raises(error, match=message):
        hc_mappings_pre(*args)


def test_the_kernels_refuse_what_the_op_would_not_pass():
    """The registered ops check their arguments too, when called directly."""
    require_fused("cpu")
    x, weight, alpha, static_pre, static_post, static_res, eps = [
        a.float() if isinstance(a, torch.Tensor) else a for a in GOOD]
    with pytest.raises(RuntimeError, match=r"weight must have shape \[5, 5\], got \[5, 4\]"):
        torch.ops.mhc_megatron.hc_mappings_pre_fwd(x, weight[:, :4].contiguous(), alpha, static_pre, static_post,
                                                   static_res, eps)
    with pytest.raises(RuntimeError, match="static_res must have dtype Float, got Double"):
        torch.ops.mhc_megatron.hc_mappings_pre_fwd(x, weight, alpha, static_pre, static_post, static_res.double(), eps)
    layer_input, h_pre, h_post, h_res, saved = torch.ops.mhc_megatron.hc_mappings_pre_fwd(
        x, weight, alpha, static_pre, static_post, static_res, eps)
    assert saved.shape == (4, 3, 6)
    with pytest.raises(RuntimeError, match=r"saved must have shape \[4, 3, 6\], got \[4, 3, 5\]"):
        torch.ops.mhc_megatron.hc_mappings_pre_bwd(
            torch.ones_like(layer_input), h_pre, h_post, h_res, None, x, weight, alpha, h_pre,
            saved[..., :5].contiguous())
