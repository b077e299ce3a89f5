"""The fused C++/CUDA operators against the float64 references: forward and every input gradient.

Each test runs on every target: the CPU kernels at each instruction-set level (``scalar``, ``avx2``,
``avx512``; a level this CPU cannot run skips, naming the CPU's levels) and CUDA (skips without a
GPU). Missing kernels fail the test, unless ``MHC_BUILD`` asked for none (``none``, or ``cpu`` for
CUDA), when it skips saying so. Sizes reach every code path of the kernels: token counts fill
several register blocks and SIMD groups and leave a ragged tail, hidden sizes leave partial
vectors, n covers the compile-time paths (1, 2, 4, 8, 16) and the run-time one (3), and the
weight-gradient reduction of mappings runs over several token chunks. Tolerances:
* float64: within 1e-10 of the reference, relative to the largest magnitude of each result;
* float32, bfloat16 (flash-attention's rule): the fused error against the float64 reference is at
  most 2x the error of the reference op run in the same dtype, plus a floor of a few units of the
  last place (``FLOOR``) for results where both errors are pure rounding.
"""

import collections
import contextlib
import functools
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loop_reference
from fused_kernels import require_fused
from mhc_megatron.modules import HyperConnection
from mhc_megatron.ops import (
    backends,
    fused,
    hc_mappings_pre,
    mhc_mappings,
    mhc_mappings_pre,
    mhc_post_res,
    mhc_post_res_mappings_pre,
    mhc_pre,
    num_mapping_columns,
    sinkhorn,
)

TARGETS = [f"cpu-{level}" for level in fused.CPU_ISA_LEVELS] + ["cuda"]
STREAMS = [1, 2, 3, 4, 8, 16]
FLOAT64_TOLERANCE = 1e-10
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3}
OPS = {"sinkhorn": sinkhorn, "mappings": mhc_mappings, "mappings_pre": mhc_mappings_pre, "pre": mhc_pre,
       "post_res": mhc_post_res, "hc_mappings_pre": hc_mappings_pre,
       "post_res_mappings_pre": mhc_post_res_mappings_pre}
# The ops whose first input is the streams and whose other inputs are parameters (not per token).
MAPPING_OPS = ("mappings", "mappings_pre", "hc_mappings_pre")
# The op that reads the sub-layer input and takes post_res's stream gradient, per mode.
TAKERS = {"mhc": "mappings_pre", "hc": "hc_mappings_pre"}
# 29 tokens: 3 full projection blocks of 8 tokens (mappings), dx blocks of up to 4 in 3 to 14 float64
# SIMD groups of Sinkhorn (8, 4 or 2 lanes by level), each with a ragged tail; hidden 13: one to six
# full float64 vectors and a partial one, and n*13 values per token leave partial dx and dphi blocks
# for every n.
VALUE_TOKENS, HIDDEN = 29, 13
# 600 tokens: the dphi reduction of mappings (dW of hc_mappings_pre) runs over 3 token chunks (256
# tokens each at most).
CHUNKED_TOKENS = 600


@pytest.fixture(params=TARGETS)
def target(request):
    """The device of the target; for a CPU level, that level is active during the test."""
    name = request.param
    if name == "cuda":
        yield require_fused("cuda")
        return
    device = require_fused("cpu")
    level = name.removeprefix("cpu-")
    runnable = fused.cpu_isa_levels()
    if level not in runnable:
        pytest.skip(f"this CPU does not run {level} (it runs: {', '.join(runnable)})")
    with fused.use_cpu_isa(level):
        yield device


def make_inputs(op: str, n: int, hidden: int, tokens: int, logit_scale: float = 1.0, seed: int = 0):
    """Float64 inputs of ``op`` (``h_res`` doubly stochastic, ``h_*`` in their ranges)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    if op == "sinkhorn":
        return [randn(tokens, n, n, scale=logit_scale), 20]
    if op in ("mappings", "mappings_pre"):
        width = num_mapping_columns(n)
        alpha = torch.tensor([0.7, 1.1, 1.5], dtype=torch.float64) * logit_scale
        return [randn(tokens, n, hidden), randn(n * hidden, width, scale=(n * hidden) ** -0.5), alpha,
                randn(width, scale=0.5), 20, 1e-6]
    if op == "hc_mappings_pre":  # weight at the scale that puts tanh's argument near 1
        alpha = torch.tensor([0.7, 1.1, 1.5], dtype=torch.float64)
        return [randn(tokens, n, hidden), randn(hidden, n + 2, scale=hidden ** -0.5), alpha, randn(n), randn(n),
                randn(n, n), 1e-6]
    x = randn(tokens, n, hidden)
    h_pre = torch.rand(tokens, n, dtype=torch.float64, generator=generator)
    if op == "pre":
        return [x, h_pre]
    h_res = sinkhorn(randn(tokens, n, n)).detach()
    post_res_inputs = [x, randn(tokens, hidden), 2 * h_pre, h_res]
    if op == "post_res":
        return post_res_inputs
    return [*post_res_inputs, *make_inputs("mappings", n, hidden, tokens, logit_scale, seed + 1)[1:]]


def require_kernel(op: str, device: torch.device) -> None:
    """Skip ``op`` on a device it has no fused kernel for (``fused.CPU_ONLY_OPS`` on CUDA: the reference runs)."""
    if device.type == "cuda" and op in fused.CPU_ONLY_OPS:
        pytest.skip(f"no CUDA kernel for {op}: the reference runs")


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


@functools.lru_cache(maxsize=None)
def loop_reference_outputs(op: str, n: int) -> tuple:
    """The loop reference's float64 outputs for ``make_inputs(op, n, HIDDEN, VALUE_TOKENS)``,
    computed once and shared by every target."""
    return loop_reference.op_outputs(op, make_inputs(op, n, hidden=HIDDEN, tokens=VALUE_TOKENS))


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("op", list(OPS))
def test_float64_values_match_the_loop_reference(op, n, target):
    """Forward values against the independent loop reference (plain Python floats, one token at a time)."""
    require_kernel(op, target)
    inputs = [t.to(target) if isinstance(t, torch.Tensor) else t
              for t in make_inputs(op, n, hidden=HIDDEN, tokens=VALUE_TOKENS)]
    with backends.use_backend("fused"):
        got = OPS[op](*inputs)
    got = got if isinstance(got, tuple) else (got,)
    want = loop_reference_outputs(op, n)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error([g.cpu() for g in got], want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("op", list(OPS))
def test_float64_values_and_gradients_match_the_reference_over_several_chunks(op, n, target):
    """Outputs and every input gradient against the PyTorch reference in float64, at a token count
    that splits the weight-gradient reduction into several chunks."""
    require_kernel(op, target)
    inputs = make_inputs(op, n, hidden=HIDDEN, tokens=CHUNKED_TOKENS)
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", target, torch.float64)
    assert [g.dtype for g in got] == [w.dtype for w in want]
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error(got, want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("op", list(OPS))
def test_no_tokens_give_empty_outputs_and_zero_weight_gradients(op, target):
    """T = 0: the fused op returns what the reference returns, empty per-token tensors and all-zero
    gradients of the parameters (the weight-gradient reductions still have one, empty, chunk)."""
    require_kernel(op, target)
    inputs = make_inputs(op, n=4, hidden=HIDDEN, tokens=0)
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", target, torch.float64)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("lead", [(), (2, 3)])
@pytest.mark.parametrize("op", [*MAPPING_OPS, "pre", "post_res", "post_res_mappings_pre"])
def test_streams_with_any_leading_dimensions(op, lead, target):
    """x [n, C] or [s, b, n, C] reaches the kernels as it is (no reshape); results as the reference."""
    require_kernel(op, target)
    inputs = make_inputs(op, n=3, hidden=5, tokens=math.prod(lead))
    per_token_inputs = 1 if op in MAPPING_OPS else 4 if op == "post_res_mappings_pre" else len(inputs)
    # the per-token inputs first: x, then f / h_pre / h_post / h_res
    inputs[:per_token_inputs] = [t.reshape(*lead, *t.shape[1:]) for t in inputs[:per_token_inputs]]
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", target, torch.float64)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error(got, want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
def test_low_precision_within_twice_the_reference_error(op, dtype, target):
    """40 tokens: several float32 SIMD groups (16, 8 or 4 lanes by level) and a ragged tail (at
    AVX-512, two projection blocks of 8 in each 16-token block of mappings); hidden 129: full float32
    vectors and one value."""
    require_kernel(op, target)
    rounded = [t.to(dtype).double() if isinstance(t, torch.Tensor) else t
               for t in make_inputs(op, n=4, hidden=129, tokens=40)]
    gold = run(op, rounded, "reference", torch.device("cpu"), torch.float64)
    reference_error = relative_error(run(op, rounded, "reference", target, dtype), gold)
    fused_error = relative_error(run(op, rounded, "fused", target, dtype), gold)
    assert fused_error <= 2 * reference_error + FLOOR[dtype], (
        f"{op} {dtype}: fused {fused_error:.3g} vs reference {reference_error:.3g}"
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["sinkhorn", "mappings", "mappings_pre"])
def test_large_logits_stay_finite_and_match(op, dtype, target):
    """Logits spread by ~100s: exp underflows for whole columns; the log domain must hold."""
    inputs = make_inputs(op, n=4, hidden=16, tokens=8, logit_scale=300.0)
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", target, dtype)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["sinkhorn", "mappings"])
def test_scale_and_log_domain_matrices_side_by_side(op, dtype, target):
    """Spreads on both sides of the scale-domain limit in one batch (one SIMD group on the CPU)."""
    limit = SCALE_DOMAIN_SPREAD[dtype]
    inputs = make_inputs(op, n=4, hidden=16, tokens=37, logit_scale=limit / 5)
    if op == "sinkhorn":  # per-token scales from well inside the scale domain to far past it
        inputs[0] = inputs[0] * torch.tensor([0.05, 0.5, 1.0, 1.5, 3.0])[torch.arange(37) % 5, None, None].double()
    logits = sinkhorn_logits(op, inputs)
    spread = logits.amax((-2, -1)) - logits.amin((-2, -1))
    assert (spread <= limit).any() and (spread > limit).any()
    want = run(op, inputs, "reference", torch.device("cpu"), torch.float64)
    got = run(op, inputs, "fused", target, dtype)
    assert all(torch.isfinite(g).all() for g in got)
    assert relative_error(got, want) <= (FLOAT64_TOLERANCE if dtype == torch.float64 else 1e-4)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("op", list(OPS))
def test_backward_is_bit_identical_run_to_run_and_at_any_thread_count(op, target, restore_threads):
    """No float atomics, weight gradients reduced in a fixed order that depends on the shapes only:
    the same bits every run, with 1 thread and with 2 (CPU)."""
    require_kernel(op, target)
    inputs = make_inputs(op, n=4, hidden=96, tokens=700)  # several token chunks of the dphi reduction
    thread_counts = [1, 2] if target.type == "cpu" else [torch.get_num_threads()]
    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        runs += [run(op, inputs, "fused", target, torch.float32) for _ in range(2)]
    assert all(torch.equal(a, b) for other in runs[1:] for a, b in zip(runs[0], other))


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_module_with_fused_ops_matches_eager_reference(device, mode):
    """torch.compile(fullgraph=True) traces the fused ops (fake + autograd registrations) into its graph."""
    from torch._inductor.compile_fx import compile_fx

    target = require_fused(device)
    taker = TAKERS[mode]
    require_kernel(taker, target)
    torch.manual_seed(0)
    module = HyperConnection(hidden_size=12, num_streams=4, mode=mode, alpha_init=0.5).to(target)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    streams = torch.randn(3, 2, 4 * 12, device=target)
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
    assert any(f"mhc_megatron.{taker}_fwd" in code and "mhc_megatron.post_res_fwd" in code for code in graphs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


class OpCounts(TorchDispatchMode):
    """Counts the ops that run, by name, and the stream-shaped additions among them."""

    def __init__(self, stream_shape):
        super().__init__()
        self.stream_shape = tuple(stream_shape)
        self.calls = collections.Counter()
        self.stream_additions = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._opname] += 1
        if func._opname in ("add", "add_") and any(
                isinstance(a, torch.Tensor) and a.numel() == math.prod(self.stream_shape) for a in args):
            self.stream_additions += 1
        return func(*args, **(kwargs or {}))


def connection_gradients(module, streams, backend, hand_off=True, fused_op=None):
    """Gradients of a fixed loss of ``module(streams, tanh)`` w.r.t. the streams and the parameters,
    and the ops its backward ran; ``hand_off=False`` runs the layer's ops without the stream gradient
    hand-off (``Mixing.stream_gradient`` dropped); ``fused_op``: that op on the fused backend."""
    x = streams.clone().requires_grad_()
    one_op = backends.use_backend("fused", op=fused_op) if fused_op else contextlib.nullcontext()
    with backends.use_backend(backend), one_op:
        layer_input, mixing = module.pre(x)
        if not hand_off:
            mixing = mixing._replace(stream_gradient=None)
        out = module.post_res(x, torch.tanh(layer_input), mixing)
        counts = OpCounts(streams.shape)
        with counts:
            grads = torch.autograd.grad(out.square().sum(), (x, *module.parameters()))
    return [g.cpu() for g in grads], counts


def connection(mode: str, n: int, device: torch.device) -> HyperConnection:
    """A float64 connection of ``mode`` with every parameter moved off its initial value."""
    torch.manual_seed(0)
    module = HyperConnection(hidden_size=13, num_streams=n, mode=mode, alpha_init=0.5).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module.to(device)


@pytest.mark.parametrize("mode", list(TAKERS))
def test_the_stream_gradient_is_written_once_and_matches_the_reference(mode, target):
    """post_res hands its gradient of the streams to the backward of the op that read the sub-layer
    input (mappings_pre, hc_mappings_pre), which writes the sum: no addition of stream-sized tensors
    in backward (without the hand-off autograd makes one), and the gradients of the streams and every
    parameter as the reference's in float64."""
    require_kernel(TAKERS[mode], target)
    module = connection(mode, 4, target)
    streams = torch.randn(7, 3, 4 * 13, dtype=torch.float64, device=target)
    want, _ = connection_gradients(module, streams, "reference")
    got, counts = connection_gradients(module, streams, "fused")
    assert counts.calls[f"{TAKERS[mode]}_bwd"] == 1 and counts.calls["post_res_bwd"] == 1
    assert counts.stream_additions == 0, counts.calls
    assert relative_error(got, want) <= FLOAT64_TOLERANCE
    unhanded, counts = connection_gradients(module, streams, "fused", hand_off=False)
    assert counts.stream_additions == 1, counts.calls
    assert relative_error(unhanded, want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("mode, fused_op", [("mhc", "mappings_pre"), ("mhc", "post_res"),
                                           ("hc", "hc_mappings_pre"), ("hc", "post_res")])
def test_the_hand_off_needs_both_ops_fused(mode, fused_op, target):
    """With only one of the two ops on the fused backend, no gradient is handed off, none is lost."""
    require_kernel(fused_op, target)
    module = connection(mode, 3, target)
    streams = torch.randn(5, 3 * 13, dtype=torch.float64, device=target)
    want, _ = connection_gradients(module, streams, "reference")
    got, counts = connection_gradients(module, streams, "reference", fused_op=fused_op)
    assert counts.calls[f"{fused_op}_bwd"] == 1
    assert relative_error(got, want) <= FLOAT64_TOLERANCE


def two_connections_gradients(first, second, streams, backend, fused_pair=True, read_streams=False):
    """Gradients of a fixed loss of two mHC connections in a row (as a layer runs its attention's and
    its MLP's) w.r.t. the streams and both connections' parameters, and the ops their backward ran.
    ``fused_pair``: the first's post_res and the second's pre through ``post_res_then_pre`` (else
    one after the other); ``read_streams``: the loss also reads the state between them (a consumer
    of it that hands nothing off)."""
    x = streams.clone().requires_grad_()
    with backends.use_backend(backend):
        layer_input, mixing = first.pre(x)
        output = torch.tanh(layer_input)
        if fused_pair:
            middle, layer_input, second_mixing = first.post_res_then_pre(x, output, mixing, second)
        else:
            middle = first.post_res(x, output, mixing)
            layer_input, second_mixing = second.pre(middle)
        out = second.post_res(middle, torch.sin(layer_input), second_mixing)
        loss = out.square().sum() + (middle.cos().sum() if read_streams else 0)
        counts = OpCounts(streams.shape)
        with counts:
            grads = torch.autograd.grad(loss, (x, *first.parameters(), *second.parameters()))
    return [out.detach().cpu(), *(g.cpu() for g in grads)], counts


@pytest.mark.parametrize("read_streams", [False, True])
def test_post_res_then_pre_fuses_two_connections_and_writes_no_stream_gradient_between(read_streams, target):
    """Two mHC connections in a row: the first's post_res and the second's mappings and input run as
    one op (post_res_mappings_pre), which takes the second post_res's stream gradient and hands its
    own to the first mappings_pre: no addition of stream-sized tensors in backward (unless the state
    between them has a consumer of its own, whose gradient autograd sums), values and every gradient
    as the reference's in float64, and (without that consumer, whose gradient is then added in
    another order) bitwise those of the two ops one after the other in float32."""
    first, second = connection("mhc", 4, target), connection("mhc", 4, target)
    with torch.no_grad():
        second.phi.mul_(1.5)
        second.bias.add_(0.2)
    streams = torch.randn(7, 3, 4 * 13, dtype=torch.float64, device=target)
    want, _ = two_connections_gradients(first, second, streams, "reference", read_streams=read_streams)
    got, counts = two_connections_gradients(first, second, streams, "fused", read_streams=read_streams)
    assert counts.calls["post_res_mappings_pre_bwd"] == (0 if target.type == "cuda" else 1), counts.calls
    assert counts.stream_additions == (1 if read_streams else 0), counts.calls
    assert relative_error(got, want) <= FLOAT64_TOLERANCE
    if read_streams:
        return
    first, second, streams = first.float(), second.float(), streams.float()
    fused_pair, _ = two_connections_gradients(first, second, streams, "fused")
    one_by_one, _ = two_connections_gradients(first, second, streams, "fused", fused_pair=False)
    assert all(torch.equal(a, b) for a, b in zip(fused_pair, one_by_one))


@pytest.mark.parametrize("modes, sizes", [(("hc", "hc"), (4, 4)), (("mhc", "hc"), (4, 4)), (("mhc", "mhc"), (4, 2))])
def test_post_res_then_pre_of_other_connections_runs_the_two_ops(modes, sizes, target):
    """Not two mHC connections of one shape: post_res, then pre, as the reference computes them."""
    require_kernel("hc_mappings_pre", target)
    first = connection(modes[0], sizes[0], target)
    second = connection(modes[1], sizes[1], target)
    if sizes[0] != sizes[1]:  # another width of the same stream state: C = 26 with 2 streams
        second = HyperConnection(hidden_size=26, num_streams=2, mode="mhc").double().to(target)
    streams = torch.randn(5, 4 * 13, dtype=torch.float64, device=target)
    want, _ = two_connections_gradients(first, second, streams, "reference")
    got, counts = two_connections_gradients(first, second, streams, "fused")
    assert counts.calls["post_res_mappings_pre_bwd"] == 0
    assert relative_error(got, want) <= FLOAT64_TOLERANCE


# ---------------------------------------------------------------- choosing the CPU level


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them in /proc/cpuinfo (Linux)."""
    text = Path("/proc/cpuinfo").read_text()
    return set(re.search(r"^flags\s*:(.*)$", text, re.MULTILINE).group(1).split())


def expected_levels(flags: set[str]) -> list[str]:
    levels = ["scalar"]
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            levels.append("avx512")
    return levels


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the level is chosen once per process), without MHC_CPU_ISA
    unless given."""
    environment = {key: value for key, value in os.environ.items() if key != fused.CPU_ISA_VARIABLE}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environment, **env})


# float32: the avx2 and avx512 levels round a product-sum once (FMA) where the reference rounds twice,
# so a sum that nearly cancels differs by about an ulp of its products: up to 4.8e-7 over 300 random
# draws, which broke allclose's default atol of 1e-8 once in 300 (a CI run failed on it).
SHOW_LEVEL = """
import torch
from mhc_megatron.ops import backends, fused, mhc_pre
torch.manual_seed(0)
x, h = torch.randn(5, 2, 7), torch.rand(5, 2)
with backends.use_backend("fused"):
    torch.testing.assert_close(mhc_pre(x, h), (h.unsqueeze(-1) * x).sum(-2), rtol=1e-5, atol=1e-6)
print(fused.cpu_isa())
print(" ".join(sorted({line.split()[-1] for line in open("/proc/self/maps") if "/_cpu_" in line})))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_the_levels_this_cpu_runs_follow_its_feature_flags():
    require_fused("cpu")
    if os.uname().machine != "x86_64":
        assert fused.cpu_isa_levels() == ["scalar"]
    else:
        assert fused.cpu_isa_levels() == expected_levels(cpu_flags())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_highest_level_by_default_and_only_the_chosen_level_is_loaded():
    """A forced lower level never loads a higher level's library: what a machine with fewer vector
    extensions would run from the same build."""
    require_fused("cpu")
    levels = fused.cpu_isa_levels()
    for forced in [None, *levels]:
        result = run_python(SHOW_LEVEL, **({fused.CPU_ISA_VARIABLE: forced} if forced else {}))
        assert result.returncode == 0, result.stderr[-3000:]
        active, loaded = result.stdout.split("\n")[:2]
        assert active == (forced or levels[-1])
        assert [Path(path).name.split(".")[0] for path in loaded.split()] == [f"_cpu_{active}"]


def test_bad_levels_are_refused_with_the_value_and_the_choices():
    require_fused("cpu")
    result = run_python("import mhc_megatron.ops", **{fused.CPU_ISA_VARIABLE: "avx9000"})
    assert result.returncode != 0
    assert "MHC_CPU_ISA must be one of 'scalar', 'avx2', 'avx512', 'auto', got 'avx9000'" in result.stderr
    with pytest.raises(ValueError, match="level must be one of 'scalar', 'avx2', 'avx512', 'auto', got 'sse'"):
        fused.set_cpu_isa("sse")
    unrunnable = [level for level in fused.CPU_ISA_LEVELS if level not in fused.cpu_isa_levels()]
    for level in unrunnable:  # only on a CPU without AVX2 or AVX-512
        with pytest.raises(ValueError, match=f"level='{level}': this CPU cannot run it"):
            fused.set_cpu_isa(level)


# An AVX or AVX-512 mnemonic (all start with v, but the old verr/verw); AVX-512's own registers.
AVX_INSTRUCTION = r":\s+v(?!er[rw]\b)[a-z0-9]+\s"
AVX512_REGISTER = r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b"


@pytest.mark.parametrize("level, forbidden", [("scalar", AVX_INSTRUCTION), ("avx2", AVX512_REGISTER)])
def test_lower_level_libraries_hold_no_wider_instructions(level, forbidden):
    """Built for the level, not for the build machine: the scalar library holds no AVX instruction,
    the AVX2 library no AVX-512 register (no -march=native anywhere)."""
    require_fused("cpu")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    [library] = Path(fused._C.__file__).parent.glob(f"_cpu_{level}.*")
    disassembly = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True,
                                 text=True, check=True).stdout
    assert "vfmadd" in disassembly or level == "scalar"
    offending = [line for line in disassembly.splitlines() if re.search(forbidden, line)]
    assert not offending, f"{library.name}: {len(offending)} instructions beyond {level}, e.g. {offending[:3]}"


# ---------------------------------------------------------------- backends


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
