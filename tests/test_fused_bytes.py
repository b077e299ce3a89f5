"""The byte account of the fused kernels (``method.fused_op_bytes``) against the tensors each kernel
actually takes and returns, counted at the dispatcher in forward and backward; and the FLOP account
of their contractions (``method.fused_op_product_flops``) against the matrix products the
reference runs, counted by torch's FLOP counter.

A kernel that starts to read or write another tensor (a saved intermediate, an extra output) or
the account drifting from the code makes this fail; ``mhc-bench kernels`` divides by the account
and computes each op's floor from it.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fused_kernels import require_fused
from mhc_megatron.bench.kernels import combined, op_works
from mhc_megatron.method import FUSED_OPS, fused_op_bytes, fused_op_product_flops
from mhc_megatron.ops import (
    backends,
    hc_mappings_pre,
    mhc_mappings,
    mhc_mappings_pre,
    mhc_post_res,
    mhc_post_res_mappings_pre,
    mhc_pre,
    num_mapping_columns,
    sinkhorn,
)


class BytesPerOp(TorchDispatchMode):
    """Sums, per ``mhc_megatron`` op (``pre_fwd``, ...), the bytes of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.namespace == "mhc_megatron":
            results = result if isinstance(result, tuple) else (result,)
            self.bytes[func._opname] += sum(t.nbytes for t in (*args, *results) if isinstance(t, torch.Tensor))
        return result


def op_inputs(op, tokens, n, hidden, dtype):
    def leaf(*shape, dt=torch.float32):
        return torch.rand(*shape, dtype=torch.float32).to(dt).requires_grad_()

    if op == "sinkhorn":
        return sinkhorn, [leaf(tokens, n, n)]
    x = leaf(tokens, n, hidden, dt=dtype)
    if op in ("mappings", "mappings_pre"):
        function = mhc_mappings if op == "mappings" else mhc_mappings_pre
        return function, [x, leaf(n * hidden, num_mapping_columns(n)), leaf(3), leaf(num_mapping_columns(n))]
    if op == "hc_mappings_pre":
        return hc_mappings_pre, [x, leaf(hidden, n + 2), leaf(3), leaf(n), leaf(n), leaf(n, n)]
    if op == "pre":
        return mhc_pre, [x, leaf(tokens, n)]
    post_res_inputs = [x, leaf(tokens, hidden, dt=dtype), leaf(tokens, n), leaf(tokens, n, n)]
    if op == "post_res":
        return mhc_post_res, post_res_inputs
    return mhc_post_res_mappings_pre, [*post_res_inputs, leaf(n * hidden, num_mapping_columns(n)), leaf(3),
                                       leaf(num_mapping_columns(n))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("op", FUSED_OPS)
def test_each_kernel_moves_what_the_account_says(op, n, dtype):
    require_fused("cpu")
    tokens, hidden = 37, 24
    function, inputs = op_inputs(op, tokens, n, hidden, dtype)
    counter = BytesPerOp()
    with backends.use_backend("fused"), counter:
        outputs = function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
    account = fused_op_bytes(op, n, hidden, stream_bytes=torch.finfo(dtype).bits // 8)
    assert counter.bytes == {f"{op}_fwd": account.forward(tokens), f"{op}_bwd": account.backward(tokens)}


@pytest.mark.parametrize("n", [2, 4, 8])  # at n = 1 torch runs one-term contractions as products the counter skips
@pytest.mark.parametrize("op", FUSED_OPS)
def test_the_flop_account_counts_the_references_products(op, n):
    tokens, hidden = 5, 24
    function, inputs = op_inputs(op, tokens, n, hidden, torch.float64)
    with backends.use_backend("reference"):
        with FlopCounterMode(display=False) as forward:
            outputs = function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        with FlopCounterMode(display=False) as backward:
            torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
    per_token = fused_op_product_flops(op, n, hidden)
    assert (forward.get_total_flops(), backward.get_total_flops()) == (tokens * per_token[0], tokens * per_token[1])


@pytest.mark.parametrize("account", [lambda op: fused_op_bytes(op, 4, 8, 4), lambda op: fused_op_product_flops(op, 4, 8)])
def test_the_account_refuses_an_unknown_op(account):
    with pytest.raises(ValueError, match="op must be one of 'sinkhorn', 'mappings', 'mappings_pre', 'pre', 'post_res', "
                                         "'hc_mappings_pre', 'post_res_mappings_pre', got 'hc'"):
        account("hc")


def test_a_composites_floors_add_its_ops_or_pool_them():
    """``mhc-bench kernels``: a connection's ops floor is its ops' floors added, its pooled floor the
    roofline of all their bytes and FLOPs; they agree when every op is bound by its bytes and differ
    by the overlap the pooled one assumes when mappings_pre is bound by its products and post_res by
    its bytes."""
    tokens, hidden, n = 64, 32, 4
    works = op_works("hc", tokens, hidden, n, stream_bytes=4, coefficient_bytes=4)
    mappings_pre, post_res = works
    assert works == [op_works(name, tokens, hidden, n, 4, 4)[0] for name in ("mappings_pre", "post_res")]
    pooled = combined(works)
    assert pooled.bytes_backward == mappings_pre.bytes_backward + post_res.bytes_backward
    assert pooled.flops_forward == mappings_pre.flops_forward + post_res.flops_forward

    copy_gbps = 10.0
    all_bytes_bound = 1e12  # GFLOP/s
    assert sum(w.floor_ms(copy_gbps, all_bytes_bound) for w in works) == pytest.approx(
        pooled.floor_ms(copy_gbps, all_bytes_bound))

    def intensities(w):  # FLOPs per byte, forward and backward
        return w.flops_forward / w.bytes_forward, w.flops_backward / w.bytes_backward

    low, high = max(intensities(post_res)) * copy_gbps, min(intensities(mappings_pre)) * copy_gbps
    assert low < high
    gemm = (low * high) ** 0.5  # mappings_pre bound by its products, post_res by its bytes, each pass
    ops_floor = ((mappings_pre.flops_forward + mappings_pre.flops_backward) / (gemm * 1e6)
                 + (post_res.bytes_forward + post_res.bytes_backward) / (copy_gbps * 1e6))
    assert sum(w.floor_ms(copy_gbps, gemm) for w in works) == pytest.approx(ops_floor)
    pooled_floor = sum(max(moved / (copy_gbps * 1e6), flops / (gemm * 1e6)) for moved, flops in (
        (pooled.bytes_forward, pooled.flops_forward), (pooled.bytes_backward, pooled.flops_backward)))
    assert pooled.floor_ms(copy_gbps, gemm) == pytest.approx(pooled_floor)
    assert pooled_floor < ops_floor

    layer = op_works("layer", tokens, hidden, n, 4, 4)
    handed = tokens * n * hidden * 4  # the stream gradient mappings_pre's backward reads in a layer
    assert layer[0].bytes_backward == mappings_pre.bytes_backward + handed
    assert layer[1:] == [op_works(name, tokens, hidden, n, 4, 4)[0] for name in ("post_res_mappings_pre", "post_res")]
