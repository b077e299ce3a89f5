"""mhc_pre and mhc_post_res: loop reference, the H_res convention, gradients, dtypes, bad input."""

import pytest
import torch

from loop_reference import per_token, post_res_token, pre_token
from mhc_megatron.ops import mhc_post_res, mhc_pre, sinkhorn

# Every test runs on each backend of the operators (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("op_backend")


def streams_and_weights(n=4, hidden=6, lead=(3, 2), dtype=torch.float64):
    generator = torch.Generator().manual_seed(n * hidden)
    x = torch.randn(*lead, n, hidden, dtype=dtype, generator=generator)
    f = torch.randn(*lead, hidden, dtype=dtype, generator=generator)
    h_pre = torch.rand(*lead, n, dtype=dtype, generator=generator)
    h_post = 2 * torch.rand(*lead, n, dtype=dtype, generator=generator)
    h_res = sinkhorn(torch.randn(*lead, n, n, dtype=dtype, generator=generator))
    return x, f, h_pre, h_post, h_res


@pytest.mark.parametrize("n, hidden", [(1, 4), (3, 5), (4, 8)])
def test_pre_matches_loop_reference(n, hidden):
    x, _, h_pre, _, _ = streams_and_weights(n, hidden)
    torch.testing.assert_close(mhc_pre(x, h_pre), per_token(pre_token, x, h_pre, token_dims=2), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n, hidden", [(1, 4), (3, 5), (4, 8)])
def test_post_res_matches_loop_reference(n, hidden):
    x, f, _, h_post, h_res = streams_and_weights(n, hidden)
    expected = per_token(post_res_token, x, f, h_post, h_res, token_dims=2)
    torch.testing.assert_close(mhc_post_res(x, f, h_post, h_res), expected, rtol=0, atol=1e-10)


def test_h_res_multiplies_the_streams_from_the_left():
    """Row i of h_res produces stream i. The transposed convention gives other numbers."""
    x = torch.tensor([[[1.0, 1.0], [10.0, 10.0]]])  # stream 0 = 1, stream 1 = 10
    h_res = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])  # out0 = x0, out1 = 0.25 x0 + 0.75 x1
    zero_write = torch.zeros(1, 2)
    out = mhc_post_res(x, torch.zeros(1, 2), zero_write, h_res)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 1.0], [7.75, 7.75]]]))
    transposed = mhc_post_res(x, torch.zeros(1, 2), zero_write, h_res.transpose(-1, -2))
    assert not torch.allclose(out, transposed)


def test_post_writes_the_output_into_each_stream_with_its_weight():
    x = torch.zeros(1, 3, 2)
    out = mhc_post_res(x, torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0, 2.0]]), torch.eye(3)[None])
    torch.testing.assert_close(out, torch.tensor([[[0.5, 1.0], [1.0, 2.0], [2.0, 4.0]]]))


def test_gradcheck_pre_and_post_res():
    x, f, h_pre, h_post, h_res = (t.requires_grad_() for t in streams_and_weights(3, 4, lead=(2,)))
    assert torch.autograd.gradcheck(mhc_pre, (x, h_pre))
    assert torch.autograd.gradcheck(mhc_post_res, (x, f, h_post, h_res))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_outputs_keep_the_stream_dtype(dtype):
    x, f, h_pre, h_post, h_res = streams_and_weights(dtype=torch.float32)
    assert mhc_pre(x.to(dtype), h_pre).dtype == dtype
    assert mhc_post_res(x.to(dtype), f.to(dtype), h_post, h_res).dtype == dtype


def test_pre_bad_input_raises():
    x, _, h_pre, _, _ = streams_and_weights()
    with pytest.raises(ValueError, match=r"h_pre must have shape \(3, 2, 4\).*got \(1, 2, 4\)"):
        mhc_pre(x, h_pre[:1])  # would broadcast silently
    with pytest.raises(ValueError, match=r"h_pre must have shape \(3, 2, 4\).*got \(3, 2, 3\)"):
        mhc_pre(x, h_pre[..., :3])
    with pytest.raises(TypeError, match="h_pre must have a floating-point dtype"):
        mhc_pre(x, h_pre.long())
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        mhc_pre(x[0, 0, 0], h_pre)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mhc_pre(x.tolist(), h_pre)


def test_post_res_bad_input_raises():
    x, f, _, h_post, h_res = streams_and_weights()
    with pytest.raises(ValueError, match=r"f must have shape \(3, 2, 6\).*got \(3, 2, 5\)"):
        mhc_post_res(x, f[..., :5], h_post, h_res)
    with pytest.raises(ValueError, match=r"f must have shape \(3, 2, 6\).*got \(6,\)"):
        mhc_post_res(x, f[0, 0], h_post, h_res)
    with pytest.raises(ValueError, match=r"h_post must have shape \(3, 2, 4\)"):
        mhc_post_res(x, f, h_post[..., None], h_res)
    with pytest.raises(ValueError, match=r"h_res must have shape \(3, 2, 4, 4\).*got \(3, 2, 4, 3\)"):
        mhc_post_res(x, f, h_post, h_res[..., :3])
    with pytest.raises(TypeError, match="f must have a floating-point dtype"):
        mhc_post_res(x, f.int(), h_post, h_res)
