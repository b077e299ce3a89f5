"""The fused C++/CUDA operators against the PyTorch reference: forward and every input gradient.

Each test runs on "cpu" and on "cuda"; a device whose kernels are not available skips with the
reason (extension not built, built without CUDA, no GPU). Tolerances:
* float64: fused vs reference within 1e-10 (relative to the largest magnitude of each result);
* float32, bfloat16 (flash-attention's rule): the fused error against the float64 reference is at
  most 2x the error of the reference op run in the same dtype, plus a floor of a few units of the
  last place (``FLOOR``) for results where both errors are pure rounding.
"""

import math

import pytest
import torch

from mhc_megatron.modules import HyperConnection
from mhc_megatron.ops import backends, fused, mhc_mappings, mhc_post_res, mhc_pre, num_mapping_columns, sinkhorn

DEVICES = ["cpu", "cuda"]
STREAMS = [1, 2, 3, 4, 8, 16]
FLOAT64_TOLERANCE = 1e-10
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3}
OPS = {"sinkhorn": sinkhorn, "mappings": mhc_mappings, "pre": mhc_pre, "post_res": mhc_post_res}


def require_fused(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = fused.unavailable_reason(torch.device(device))
    if reason is not None:
        pytest.skip(f"fused kernels unavailable on {device}: {reason}")
    return torch.device(device)


def make_inputs(op: str, n: int, hidden: int, tokens: int, logit_scale: float = 1.0, seed: int = 0):
    """Float64 inputs of ``op`` (``h_res`` doubly stochastic, ``h_*`` in their ranges)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    if op == "sinkhorn":
        return [randn(tokens, n, n, scale=logit_scale), 20]
    if op == "mappings":
        width = num_mapping_columns(n)
        alpha = torch.tensor([0.7, 1.1, 1.5], dtype=torch.float64) * logit_scale
        return [randn(tokens, n, hidden), randn(n * hidden, width, scale=(n * hidden) ** -0.5), alpha,
                randn(width, scale=0.5), 20, 1e-6]
    x = randn(tokens, n, hidden)
    h_pre = torch.rand(tokens, n, dtype=torch.float64, generator=generator)
    if op == "pre":
        return [x, h_pre]
    h_res = sinkhorn(randn(tokens, n, n)).detach()
    return [x, randn(tokens, hidden), 2 * h_pre, h_res]


def run(op: str, inputs, backend: str, device: torch.device, dtype: torch.dtype):
    """Outputs of ``op`` and the gradients of a fixed random projection of them w.r.t. every tensor input."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    with backends.use_backend(backend):
        outputs = OPS[op](*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(1)
    loss = sum((out.double() * torch.randn(out.shape, dtype=torch.float64, generator=generator).to(device)).sum()
               for out in outputs)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(loss, tensors)
    return [t.detach().cpu() for t in (*outputs, *grads)]


def relative_error(got, want) -> float:
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-300)).item()
               for g, w in zip(got, want))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("op", list(OPS))
def test_float64_matches_reference(op, n, device):
    device = require_fused(device)
    inputs = make_inputs(op, n, hidden=7, tokens=5)
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", device, torch.float64)
    assert [g.dtype for g in got] == [w.dtype for w in want]
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error(got, want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(), (2, 3)])
@pytest.mark.parametrize("op", ["mappings", "pre", "post_res"])
def test_streams_with_any_leading_dimensions(op, lead, device):
    """x [n, C] or [s, b, n, C] reaches the kernels as it is (no reshape); results as the reference."""
    device = require_fused(device)
    inputs = make_inputs(op, n=3, hidden=5, tokens=math.prod(lead))
    if op == "mappings":
        inputs[0] = inputs[0].reshape(*lead, 3, 5)
    else:  # every input is per token: x, then f / h_pre / h_post / h_res
        inputs = [t.reshape(*lead, *t.shape[1:]) for t in inputs]
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", device, torch.float64)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error(got, want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
def test_low_precision_within_twice_the_reference_error(op, dtype, device):
    device = require_fused(device)
    rounded = [t.to(dtype).double() if isinstance(t, torch.Tensor) else t
               for t in make_inputs(op, n=4, hidden=129, tokens=40)]
    gold = run(op, rounded, "reference", torch.device("cpu"), torch.float64)
    reference_error = relative_error(run(op, rounded, "reference", device, dtype), gold)
    fused_error = relative_error(run(op, rounded, "fused", device, dtype), gold)
    assert fused_error <= 2 * reference_error + FLOOR[dtype], (
        f"{op} {dtype}: fused {fused_error:.3g} vs reference {reference_error:.3g}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["sinkhorn", "mappings"])
def test_large_logits_stay_finite_and_match(op, dtype, device):
    """Logits spread by ~100s: exp underflows for whole columns; the log domain must hold."""
    device = require_fused(device)
    inputs = make_inputs(op, n=4, hidden=16, tokens=8, logit_scale=300.0)
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", device, dtype)
    assert all(torch.isfinite(g).all() for g in got)
    assert relative_error(got, want) <= (FLOAT64_TOLERANCE if dtype == torch.float64 else 1e-4)


# The Sinkhorn kernels run a matrix in the scale domain when its logit spread (max - min) is at
# most this, else in the log domain (mhc_math.h, scale_domain_spread).
SCALE_DOMAIN_SPREAD = {torch.float64: 512.0, torch.float32: 64.0}


def sinkhorn_logits(op: str, inputs) -> torch.Tensor:
    """The logits [T, n, n] that ``op`` runs Sinkhorn on (``mappings``: the res part of z)."""
    if op == "sinkhorn":
        return inputs[0]
    x, phi, alpha, bias, _, eps = inputs
    n = x.shape[-2]
    flat = x.reshape(x.shape[0], -1)
    u = flat @ phi / (flat.square().mean(-1, keepdim=True) + eps).sqrt()
    return (alpha[2] * u[:, 2 * n:] + bias[2 * n:]).reshape(-1, n, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["sinkhorn", "mappings"])
def test_scale_and_log_domain_matrices_side_by_side(op, dtype, device):
    """Spreads on both sides of the scale-domain limit in one batch (one SIMD group on the CPU)."""
    device = require_fused(device)
    limit = SCALE_DOMAIN_SPREAD[dtype]
    inputs = make_inputs(op, n=4, hidden=16, tokens=37, logit_scale=limit / 5)
    if op == "sinkhorn":  # per-token scales from well inside the scale domain to far past it
        inputs[0] = inputs[0] * torch.tensor([0.05, 0.5, 1.0, 1.5, 3.0])[torch.arange(37) % 5, None, None].double()
    logits = sinkhorn_logits(op, inputs)
    spread = logits.amax((-2, -1)) - logits.amin((-2, -1))
    assert (spread <= limit).any() and (spread > limit).any()
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", device, dtype)
    assert all(torch.isfinite(g).all() for g in got)
    assert relative_error(got, want) <= (FLOAT64_TOLERANCE if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
def test_backward_is_bit_identical_run_to_run(op, device):
    """No float atomics, weight gradients reduced in a fixed order: same bits every run."""
    device = require_fused(device)
    inputs = make_inputs(op, n=4, hidden=96, tokens=700)  # several token chunks of the dphi reduction
    first = run(op, inputs, "fused", device, torch.float32)
    second = run(op, inputs, "fused", device, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_module_with_fused_ops_matches_eager_reference(device):
    """torch.compile(fullgraph=True) traces the fused ops (fake + autograd registrations) into its graph."""
    from torch._inductor.compile_fx import compile_fx

    device = require_fused(device)
    torch.manual_seed(0)
    module = HyperConnection(hidden_size=12, num_streams=4, mode="mhc", alpha_init=0.5).to(device)
    streams = torch.randn(3, 2, 4 * 12, device=device)
    graphs = []

    def recording_inductor(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return compile_fx(graph_module, example_inputs)

    def out_and_grads(forward, backend):
        x = streams.clone().requires_grad_()
        with backends.use_backend(backend):
            out = forward(x, torch.tanh)
        return [out, *torch.autograd.grad(out.square().sum(), (x, *module.parameters()))]

    want = out_and_grads(module, "reference")
    got = out_and_grads(torch.compile(module, fullgraph=True, backend=recording_inductor), "fused")
    assert any("mhc_megatron.mappings_fwd" in code and "mhc_megatron.post_res_fwd" in code for code in graphs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_without_the_extension_ops_fall_back_to_the_reference_with_one_notice(monkeypatch):
    monkeypatch.setattr(fused, "_C", None)
    monkeypatch.setattr(fused, "_IMPORT_ERROR", "No module named 'mhc_megatron._C'")
    monkeypatch.setattr(backends, "_noticed", set())
    x, h_pre = make_inputs("pre", n=3, hidden=5, tokens=4)
    with pytest.warns(UserWarning, match="fused kernels unavailable .*running the reference ops") as notices:
        with backends.use_backend("fused"):
            got = [mhc_pre(x, h_pre), mhc_pre(x, h_pre)]
    assert len(notices) == 1
    with backends.use_backend("reference"):
        assert all(torch.equal(g, mhc_pre(x, h_pre)) for g in got)


def test_backend_choice_per_op_and_bad_names():
    x, h_pre = make_inputs("pre", n=3, hidden=5, tokens=4)
    with backends.use_backend("reference"):
        want = mhc_pre(x, h_pre)
        with backends.use_backend("compile", op="pre"):
            assert backends.get_backend("pre") == "compile" and backends.get_backend("mappings") == "reference"
            torch.testing.assert_close(mhc_pre(x, h_pre), want, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="backend must be one of 'reference', 'compile', 'fused', got 'fast'"):
        backends.set_backend("fast")
    with pytest.raises(ValueError, match="op must be one of"):
        backends.get_backend("sinkhorn_fwd")
