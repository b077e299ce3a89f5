"""The CUDA kernels (kernels/mhc_cuda.cu) executed on the CPU, against the float64 reference.

``mhc_megatron._cuda_on_cpu`` is mhc_cuda.cu compiled as C++ for the execution model of
kernels/cuda_on_cpu.h: blocks one after another, a block's threads as fibers that switch at
``__syncthreads`` and warp shuffles, in a chosen order (forward, reverse, or shuffled between every
two barriers), dynamic shared memory filled with NaN bytes before each block, and an error for a
barrier or shuffle that part of a block or warp skips. ``cuda_kernels_on_cpu()`` routes the CPU
calls of the ten ops with a CUDA kernel to it, so the ops' Python wrappers, autograd included, run
the CUDA code. Sizes: every n in 1..16 (the compile-time paths 1, 2, 4, 8, 16 and the run-time one),
29 tokens (ragged blocks and tiles for every kernel), hidden 45 (n * 45 values per token: the
forward's 32-value stages never divide them; the per-token reductions span two warps), and 600
tokens for a weight-gradient reduction over 3 chunks. Tolerances as tests/test_fused.py: float64
within 1e-10 of the reference, relative to each result's largest magnitude; float32 and bfloat16
within twice the reference op's own error in that dtype plus a few units of the last place.
"""

import contextlib
import importlib.util
import os

import pytest
import torch

from fused_kernels import require_fused
from test_fused import FLOAT64_TOLERANCE, FLOOR, make_inputs, relative_error, run

CUDA_OPS = ["sinkhorn", "mappings", "mappings_pre", "pre", "post_res"]  # the ops with CUDA kernels
KERNELS = ["sinkhorn_fwd", "sinkhorn_bwd", "mappings_fwd", "mappings_bwd", "mappings_pre_fwd", "mappings_pre_bwd",
           "pre_fwd", "pre_bwd", "post_res_fwd", "post_res_bwd"]  # MHC_FOR_EACH_KERNEL (kernels/dispatch.h)
TOKENS, HIDDEN, CHUNKED_TOKENS = 29, 45, 600
CPU = torch.device("cpu")


def load_cuda_on_cpu():
    """torch.ops.mhc_cuda_on_cpu, loaded once; a missing library fails unless MHC_BUILD=none."""
    require_fused("cpu")
    if not hasattr(load_cuda_on_cpu, "ops"):
        spec = importlib.util.find_spec("mhc_megatron._cuda_on_cpu")
        if spec is None:
            build = os.environ.get("MHC_BUILD", "auto")
            if build == "none":
                pytest.skip("MHC_BUILD=none: the CUDA kernels were not built for the CPU")
            pytest.fail(f"mhc_megatron._cuda_on_cpu is missing (MHC_BUILD={build}): rebuild the kernels")
        torch.ops.load_library(spec.origin)
        load_cuda_on_cpu.ops = torch.ops.mhc_cuda_on_cpu
    return load_cuda_on_cpu.ops


@contextlib.contextmanager
def cuda_kernels_on_cpu(order: str = "forward", seed: int = 0):
    """Within the block, the CPU calls of ``KERNELS`` run mhc_cuda.cu's kernels, their threads in
    ``order`` (``shuffled``: a new permutation from ``seed`` between every two barriers)."""
    ops = load_cuda_on_cpu()
    override = torch.library.Library("mhc_megatron", "IMPL")
    for name in KERNELS:
        override.impl(name, getattr(ops, name).default, "CPU")
    ops.set_thread_order(order, seed)
    try:
        yield
    finally:
        ops.set_thread_order("forward", 0)
        override._destroy()


def run_cuda_kernels(op, inputs, dtype, order="forward", seed=0):
    with cuda_kernels_on_cpu(order, seed):
        return run(op, inputs, "fused", CPU, dtype)


@pytest.mark.parametrize("n", range(1, 17))
@pytest.mark.parametrize("op", CUDA_OPS)
def test_float64_values_and_gradients_match_the_reference(op, n):
    inputs = make_inputs(op, n, hidden=HIDDEN, tokens=TOKENS)
    want = run(op, inputs, "reference", CPU, torch.float64)
    got = run_cuda_kernels(op, inputs, torch.float64)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error(got, want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("op", CUDA_OPS)
def test_many_blocks_and_weight_gradients_over_several_chunks(op, n):
    """600 tokens: three blocks of the kernels with a thread per matrix or token (256 a block, the
    last one ragged), and the weight-gradient reduction of mappings over 3 token chunks."""
    inputs = make_inputs(op, n, hidden=HIDDEN, tokens=CHUNKED_TOKENS)
    want = run(op, inputs, "reference", CPU, torch.float64)
    assert relative_error(run_cuda_kernels(op, inputs, torch.float64), want) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("op", CUDA_OPS)
def test_no_tokens_give_empty_outputs_and_zero_weight_gradients(op):
    inputs = make_inputs(op, n=4, hidden=HIDDEN, tokens=0)
    want = run(op, inputs, "reference", CPU, torch.float64)
    got = run_cuda_kernels(op, inputs, torch.float64)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", CUDA_OPS)
def test_low_precision_loads_and_stores_within_twice_the_reference_error(op, dtype):
    """bf16 streams are loaded and stored as bf16 by the kernels, the arithmetic in float32."""
    rounded = [t.to(dtype).double() if isinstance(t, torch.Tensor) else t
               for t in make_inputs(op, n=4, hidden=129, tokens=40)]
    gold = run(op, rounded, "reference", CPU, torch.float64)
    reference_error = relative_error(run(op, rounded, "reference", CPU, dtype), gold)
    fused_error = relative_error(run_cuda_kernels(op, rounded, dtype), gold)
    assert fused_error <= 2 * reference_error + FLOOR[dtype], (
        f"{op} {dtype}: CUDA kernels {fused_error:.3g} vs reference {reference_error:.3g}"
    )


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("op", CUDA_OPS)
def test_any_order_of_a_blocks_threads_gives_the_same_bits(op, n):
    """Between two barriers a block's threads may run in any order on a GPU: a missing barrier or
    a race on shared memory shows as results that depend on it."""
    inputs = make_inputs(op, n, hidden=HIDDEN, tokens=TOKENS)
    forward = run_cuda_kernels(op, inputs, torch.float32)
    for order, seed in [("reverse", 0), ("shuffled", 1), ("shuffled", 2)]:
        other = run_cuda_kernels(op, inputs, torch.float32, order, seed)
        assert all(torch.equal(a, b) for a, b in zip(forward, other)), f"{order} (seed {seed})"


# ---------------------------------------------------------------- the execution model itself

def model_case(name: str, order: str = "forward") -> torch.Tensor:
    ops = load_cuda_on_cpu()
    ops.set_thread_order(order, 0)
    try:
        return ops.model_case(name)
    finally:
        ops.set_thread_order("forward", 0)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_a_barrier_orders_shared_memory_and_its_absence_shows(order):
    neighbours = ((torch.arange(256) + 1) % 256).float().expand(2, 256)
    assert torch.equal(model_case("neighbour", order), neighbours)
    assert not torch.equal(model_case("neighbour without barrier", order), neighbours)


def test_a_barrier_reached_by_part_of_a_block_fails_the_launch():
    with pytest.raises(RuntimeError, match=r"block \(0, 0, 0\): divergent __syncthreads: threads 0-127 wait at "
                                           r"barrier 1 while threads 128-255 have returned"):
        model_case("divergent barrier")


def test_warp_shuffles_and_a_lane_that_skips_one():
    sums = model_case("warp sum")
    assert torch.equal(sums[:, ::32], torch.full((2, 8), 496.0))  # lane 0 holds 0 + 1 + ... + 31
    with pytest.raises(RuntimeError, match=r"warp 0: threads 0-4, 6-31 wait at a warp shuffle that threads 5 "
                                           r"returned before"):
        model_case("warp sum, a lane returned")
