"""Amax gain magnitude (token means, per-depth profiles) and H_res statistics."""

import itertools

import pytest
import torch

from mhc_megatron.modules.diagnostics import (
    amax_gain,
    composite_mapping,
    gain_profile,
    hres_statistics,
    record_mappings,
    token_gains,
)
from mhc_megatron.modules import HyperConnection, expand_streams
from mhc_megatron.ops import mhc_post_res, sinkhorn


def test_identity_matrices_have_gain_one():
    gain = amax_gain([torch.eye(4).expand(10, 4, 4)] * 7)
    assert gain.forward == 1.0 and gain.backward == 1.0


def test_known_product_in_forward_order():
    first = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    second = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    # P = second @ first = [[2, -1], [0, 1]]: row sums |.| 3, 1; column sums 2, 2
    torch.testing.assert_close(composite_mapping([first, second]), torch.tensor([[2.0, -1.0], [0.0, 1.0]], dtype=torch.float64))
    gain = amax_gain([first, second])
    assert (gain.forward, gain.backward) == (3.0, 2.0)
    # the other order, P = first @ second = [[2, -2], [0, 1]]: rows 4, 1; columns 2, 3
    gain = amax_gain([second, first])
    assert (gain.forward, gain.backward) == (4.0, 3.0)


def test_gain_is_averaged_over_tokens():
    tokens = torch.stack([torch.eye(2), 3 * torch.eye(2)])  # gains 1 and 3
    gain = amax_gain([tokens])
    assert (gain.forward, gain.backward) == (2.0, 2.0)


def test_mhc_forward_gain_is_one_by_construction_so_the_backward_gain_is_the_check():
    """Sinkhorn normalises the rows last, so every ``H_res`` and every product of them has rows that
    sum to 1: mHC's forward gain is 1 after any number of iterations and tells nothing. The columns
    reach 1 only as the iterations converge: the backward gain measures how far the composite mapping
    is from doubly stochastic."""
    torch.manual_seed(0)
    logits = [torch.randn(5, 4, 4, dtype=torch.float64) * 0.5 for _ in range(30)]
    one_iteration = amax_gain([sinkhorn(x, iters=1) for x in logits])
    converged = amax_gain([sinkhorn(x, iters=200) for x in logits])
    assert one_iteration.forward == pytest.approx(1, abs=1e-12) and converged.forward == pytest.approx(1, abs=1e-12)
    assert one_iteration.backward > 1.01
    assert converged.backward == pytest.approx(1, abs=1e-9)


def test_statistics_of_the_uniform_matrix():
    stats = hres_statistics(torch.full((6, 4, 4), 0.25), layer_index=3)
    assert stats.layer_index == 3
    assert stats.forward_gain == 1.0 and stats.backward_gain == 1.0
    assert stats.max_row_sum_error == 0.0 and stats.max_col_sum_error == 0.0
    assert stats.min_entry == 0.25 and stats.mean_diagonal == 0.25


def test_recorder_follows_the_forward_pass_and_is_off_by_default():
    torch.manual_seed(0)
    connections = torch.nn.ModuleList(HyperConnection(8, 4, "mhc", layer_index=k, alpha_init=1.0) for k in range(5))
    streams = expand_streams(torch.randn(6, 8), 4)

    def run():
        state = streams
        for connection in connections:
            state = connection(state, torch.tanh)
        return state

    with record_mappings(connections) as recorder:
        run()
    assert recorder.layer_indices == [0, 1, 2, 3, 4]
    assert len(recorder.h_res) == 5 and recorder.h_res[0].shape == (6, 4, 4)
    assert not recorder.h_res[0].requires_grad
    assert abs(recorder.amax_gain().backward - 1) < 1e-3  # mHC: the forward gain is 1 by construction
    assert [s.layer_index for s in recorder.layer_statistics()] == [0, 1, 2, 3, 4]
    run()
    assert len(recorder.h_res) == 5
    assert all(c.mapping_observer is None for c in connections)


def test_unconstrained_hc_mixing_can_grow():
    torch.manual_seed(0)
    connections = [HyperConnection(8, 4, "hc", layer_index=k, alpha_init=1.0) for k in range(12)]
    for connection in connections:
        torch.nn.init.normal_(connection.weight, std=2.0)
    streams = expand_streams(torch.randn(6, 8), 4)
    with record_mappings(torch.nn.ModuleList(connections)) as recorder:
        for connection in connections:
            streams = connection(streams, torch.tanh)
    assert recorder.amax_gain().forward > 10


def test_profile_of_identities_permutations_and_scaled_matrices():
    permutation = torch.eye(4)[[2, 0, 3, 1]]
    assert gain_profile([torch.eye(4)] * 3).forward_max == [1.0, 1.0, 1.0]
    profile = gain_profile([permutation, permutation.T, permutation])
    assert profile.forward_max == profile.backward_max == [1.0, 1.0, 1.0]
    profile = gain_profile([3 * torch.eye(4), permutation, 0.5 * torch.eye(4)])  # depth l: 3, 3, 1.5
    assert profile.forward_max == profile.backward_max == profile.forward_mean == [3.0, 3.0, 1.5]


def test_products_of_doubly_stochastic_matrices_keep_gain_one():
    """Convex combinations of permutations (Birkhoff) are doubly stochastic, and so is any product."""
    torch.manual_seed(0)
    permutations = torch.stack([torch.eye(4)[list(p)] for p in itertools.permutations(range(4))]).double()
    weights = torch.rand(40, 16, len(permutations), dtype=torch.float64).softmax(dim=-1)  # 40 layers, 16 tokens
    layers = list(torch.einsum("ltk,kij->ltij", weights, permutations))
    profile = gain_profile(layers)
    for values in profile.to_dict().values():
        assert values == pytest.approx([1.0] * 40, abs=1e-12)


def test_profile_takes_the_max_and_the_mean_over_tokens():
    tokens = torch.stack([torch.eye(2), 3 * torch.eye(2), 2 * torch.eye(2)])  # per-token gains 1, 3, 2
    profile = gain_profile([tokens, tokens])  # depth 2: 1, 9, 4
    assert profile.forward_max == profile.backward_max == [3.0, 9.0]
    assert profile.forward_mean == profile.backward_mean == [2.0, pytest.approx(14 / 3)]
    assert amax_gain([tokens, tokens]).forward == profile.forward_mean[-1]


def test_forward_gain_is_the_row_sum_of_the_mixing_as_the_streams_apply_it():
    """The axes pinned against the op that mixes the streams (``mhc_post_res`` with a zero sub-layer
    output: ``out = h_res x``): the input ``x_j = sign(P[i*, j])`` makes stream ``i*`` reach the forward
    gain (max row sum), and the gradient ``g_i = sign(P[i, j*])`` reaches stream ``j*`` as the backward
    gain (max column sum). This matrix's two gains differ, so swapped axes fail."""
    mixing = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, 0.3], [1.5, 0.0, -0.5]], dtype=torch.float64)
    forward, backward = (g.item() for g in token_gains(mixing))
    assert (forward, backward) == (pytest.approx(3.5), pytest.approx(2.2))  # rows 3.5, 0.6, 2.0; columns 2.1, 2.2, 1.8
    width = 5
    streams = mixing[0].sign()[:, None].expand(3, width).clone().requires_grad_()
    out = mhc_post_res(streams, torch.zeros(width, dtype=torch.float64), torch.ones(3, dtype=torch.float64), mixing)
    assert out.abs().max().item() == pytest.approx(forward)
    out.backward(mixing[:, 1].sign()[:, None].expand(3, width))
    assert streams.grad.abs().max().item() == pytest.approx(backward)


def test_depth_profile_of_a_three_layer_toy_model_by_hand():
    """Three HC sub-layers whose mixing is their static part alone (alpha = 0), around a linear
    sub-layer. HC's ``static_res`` is the paper's ``A_r``, indexed [input, output]: the mixing is its
    transpose (``ops/hc_mappings_pre.py``). By hand, P_1 = H1, P_2 = H2 H1 = [[1, 1], [1, 2]], P_3 = H3 P_2 = [[2, 2], [0.5, 1]]:
    row sums (2, 1), (2, 3), (4, 1.5); column sums (1, 2), (2, 3), (2.5, 3)."""
    mixings = [[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.5]]]
    connections = torch.nn.ModuleList(HyperConnection(8, 2, "hc", layer_index=k) for k in range(3))
    sublayer = torch.nn.Linear(8, 8)
    with torch.no_grad():
        for connection, mixing in zip(connections, mixings):
            connection.alpha.zero_()
            connection.static_res.copy_(torch.tensor(mixing).T)
    torch.manual_seed(0)
    streams = torch.randn(4, 5, 16)  # [s, b, n*C]: 20 tokens
    with record_mappings(connections) as recorder:
        for connection in connections:
            streams = connection(streams, sublayer)
    profile = gain_profile(recorder.h_res)
    assert profile.forward_max == profile.forward_mean == [2.0, 3.0, 4.0]
    assert profile.backward_max == profile.backward_mean == [2.0, 3.0, 3.0]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="at least one"):
        amax_gain([])
    with pytest.raises(ValueError, match=r"h_res\[1\] must have the square shape of h_res\[0\] \(3, 3\)"):
        amax_gain([torch.eye(3), torch.eye(2)])
    with pytest.raises(ValueError, match="square"):
        hres_statistics(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        amax_gain([torch.eye(3, dtype=torch.int64)])
