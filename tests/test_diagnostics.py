"""Amax gain magnitude and H_res statistics."""

import pytest
import torch

from mhc_megatron.modules.diagnostics import amax_gain, composite_mapping, hres_statistics, record_mappings
from mhc_megatron.modules import HyperConnection, expand_streams
from mhc_megatron.ops import sinkhorn


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


def test_bad_input_raises():
    with pytest.raises(ValueError, match="at least one"):
        amax_gain([])
    with pytest.raises(ValueError, match=r"h_res\[1\] must have the square shape of h_res\[0\] \(3, 3\)"):
        amax_gain([torch.eye(3), torch.eye(2)])
    with pytest.raises(ValueError, match="square"):
        hres_statistics(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        amax_gain([torch.eye(3, dtype=torch.int64)])
