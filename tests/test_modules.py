"""HyperConnection and the stream ends: equivalence with the residual network at init, conventions, bad config."""

import pytest
import torch
from torch import nn

from mhc_megatron.modules import HyperConnection, StreamCollapse, collapse_streams, expand_streams

HIDDEN, N, LAYERS = 16, 4, 6


class PreNormSublayer(nn.Module):
    """A scale-invariant pre-norm sub-layer: F(x) = MLP(RMSNorm(x)), so F(c x) = F(x) for c > 0."""

    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-12)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        nn.init.normal_(self.norm.weight, mean=1.0, std=0.2)

    def forward(self, x):
        return self.mlp(self.norm(x))


def residual_stack(sublayers, hidden):
    for sublayer in sublayers:
        hidden = hidden + sublayer(hidden)
    return hidden


def hyper_connected_stack(connections, sublayers, hidden, collapse):
    streams = expand_streams(hidden, N)
    for connection, sublayer in zip(connections, sublayers):
        streams = connection(streams, sublayer)
    return collapse(streams)


@pytest.fixture
def sublayers():
    torch.manual_seed(0)
    return [PreNormSublayer(HIDDEN) for _ in range(LAYERS)]


def test_mhc_with_zero_alpha_equals_the_residual_stack(sublayers):
    connections = [HyperConnection(HIDDEN, N, "mhc", layer_index=k) for k in range(LAYERS)]
    for connection in connections:
        nn.init.zeros_(connection.alpha)
    hidden = torch.randn(5, 3, HIDDEN)
    expected = residual_stack(sublayers, hidden)
    got = hyper_connected_stack(connections, sublayers, hidden, lambda s: collapse_streams(s, N))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the weighted collapse is n/2 times the mean at init: the same after a scale-invariant norm
    weighted = StreamCollapse(HIDDEN, N, "weighted", alpha_init=0.0)
    norm = nn.RMSNorm(HIDDEN, eps=1e-12)
    torch.testing.assert_close(
        norm(hyper_connected_stack(connections, sublayers, hidden, weighted)), norm(expected), rtol=0, atol=1e-5
    )


def test_mhc_at_default_init_stays_close_to_the_residual_stack(sublayers):
    torch.manual_seed(1)
    connections = [HyperConnection(HIDDEN, N, "mhc", layer_index=k) for k in range(LAYERS)]
    hidden = torch.randn(5, 3, HIDDEN)
    expected = residual_stack(sublayers, hidden)
    got = hyper_connected_stack(connections, sublayers, hidden, lambda s: collapse_streams(s, N))
    difference = (got - expected).abs().max() / expected.abs().max()
    assert 0 < difference < 0.05


def test_hc_at_init_equals_the_pre_norm_stack(sublayers):
    connections = [HyperConnection(HIDDEN, N, "hc", layer_index=k) for k in range(LAYERS)]
    hidden = torch.randn(5, 3, HIDDEN)
    got = hyper_connected_stack(connections, sublayers, hidden, lambda s: collapse_streams(s, N))
    torch.testing.assert_close(got, residual_stack(sublayers, hidden), rtol=0, atol=1e-5)


def test_residual_mode_is_x_plus_f():
    connection = HyperConnection(HIDDEN, 1, "residual")
    x = torch.randn(4, HIDDEN)
    torch.testing.assert_close(connection(x, torch.tanh), x + torch.tanh(x))
    assert list(connection.parameters()) == []


def test_hc_static_parts_at_init():
    connection = HyperConnection(HIDDEN, N, "hc", layer_index=6)
    h_pre, h_post, h_res = connection.mappings(torch.randn(2, N, HIDDEN))
    torch.testing.assert_close(h_pre, torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(2, N))  # 6 mod 4
    torch.testing.assert_close(h_post, torch.ones(2, N))
    torch.testing.assert_close(h_res, torch.eye(N).expand(2, N, N))


def test_hc_applies_the_transpose_of_its_a_r_matrix():
    """HC's A_r is indexed [input, output]; our h_res [output, input], so h_res = A_r^T."""
    connection = HyperConnection(2, 2, "hc")
    with torch.no_grad():
        connection.static_res.copy_(torch.tensor([[1.0, 0.25], [0.0, 0.75]]))  # out1 = .25 x0 + .75 x1
        connection.static_post.zero_()
    streams = torch.tensor([[1.0, 1.0, 10.0, 10.0]])
    torch.testing.assert_close(connection(streams, torch.zeros_like), torch.tensor([[1.0, 1.0, 7.75, 7.75]]))


@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(0)
    connection = HyperConnection(HIDDEN, N, mode, alpha_init=0.5)
    with torch.no_grad():
        for parameter in connection.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    streams = torch.randn(3, 2, N * HIDDEN, requires_grad=True)
    connection(streams, torch.sin).pow(2).sum().backward()
    for name, parameter in [("streams", streams), *connection.named_parameters()]:
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_bf16_streams_stay_bf16():
    connection = HyperConnection(HIDDEN, N, "mhc")
    streams = torch.randn(3, N * HIDDEN).bfloat16()
    assert connection(streams, lambda t: t).dtype == torch.bfloat16


def test_expand_copies_and_collapse_averages():
    hidden = torch.randn(2, 3, HIDDEN)
    streams = expand_streams(hidden, N)
    assert streams.shape == (2, 3, N * HIDDEN)
    for i in range(N):
        torch.testing.assert_close(streams[..., i * HIDDEN:(i + 1) * HIDDEN], hidden)
    distinct = torch.randn(2, N * HIDDEN)
    torch.testing.assert_close(collapse_streams(distinct, N), distinct.view(2, N, HIDDEN).mean(1))


def test_weighted_collapse_is_a_sigmoid_weighted_sum():
    torch.manual_seed(0)
    collapse = StreamCollapse(HIDDEN, N, "weighted", alpha_init=0.7)
    streams = torch.randn(3, N * HIDDEN, dtype=torch.float64)
    x = streams.view(3, N, HIDDEN)
    v = streams
    logits = collapse.alpha.double() * (v @ collapse.phi.double()) / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    expected = (torch.sigmoid(logits + collapse.bias.double()).unsqueeze(-1) * x).sum(1)
    torch.testing.assert_close(collapse(streams), expected)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"num_streams": 4, "mode": "residual"}, ValueError, "num_streams must be 1 in mode 'residual', got 4"),
    ({"mode": "dense"}, ValueError, "mode must be one of 'residual', 'hc', 'mhc', got 'dense'"),
    ({"num_streams": 0}, ValueError, "num_streams must be >= 1, got 0"),
    ({"num_streams": 2.0}, TypeError, "num_streams must be an int"),
    ({"sinkhorn_iters": -1}, ValueError, "sinkhorn_iters must be >= 0"),
    ({"layer_index": -1}, ValueError, "layer_index must be >= 0"),
    ({"eps": -1e-6}, ValueError, "eps must be > 0"),
])
def test_bad_configuration_raises(kwargs, error, words):
    with pytest.raises(error, match=words):
        HyperConnection(HIDDEN, **kwargs)


def test_bad_streams_raise():
    connection = HyperConnection(HIDDEN, N, "mhc")
    with pytest.raises(ValueError, match=r"streams must have shape \[..., n\*C\] = \[..., 64\].*got \(3, 16\)"):
        connection(torch.randn(3, HIDDEN), torch.sin)
    with pytest.raises(TypeError, match="streams must have a floating-point dtype"):
        connection(torch.ones(3, N * HIDDEN, dtype=torch.int32), torch.sin)
    with pytest.raises(ValueError, match=r"f must have shape \(3, 16\)"):
        connection(torch.randn(3, N * HIDDEN), lambda t: t[..., :8])
    with pytest.raises(ValueError, match="collapse mode must be one of 'mean', 'weighted'"):
        StreamCollapse(HIDDEN, N, "sum")
    with pytest.raises(ValueError, match=r"n=3, got \(2, 16\)"):
        collapse_streams(torch.randn(2, 16), 3)
    with pytest.raises(ValueError, match="num_streams must be >= 1, got 0"):
        expand_streams(torch.randn(2, 16), 0)
