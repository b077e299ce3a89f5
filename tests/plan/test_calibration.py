"""The pure parts of ``mhc-bench pipeline``: the prediction from a calibration and the config reading."""

from __future__ import annotations

from mhc_megatron.bench.pipeline import hop_bytes, predict, shape_of

UNIFORM = {"layer_forward": [1.0, 1.0], "layer_backward": [2.0, 2.0], "prologue": 0.0, "embedding_forward": 0.0,
           "embedding_backward": 0.0, "head_forward": 0.0, "head_backward": 0.0, "latency": 0.5, "hop_bytes": 1,
           "bandwidth": float("inf"), "tail": 0.5}
SHAPE = {"num_layers": 2, "global_batch_size": 4, "micro_batch_size": 2}


def test_prediction_from_measured_durations_is_the_hand_computed_schedule():
    """Two layers on PP = 2 (one per stage), two micro-batches, forward 1 s and backward 2 s per
    layer, no head, a hop of 0.5 s (latency only): the blocking 1F1B case of test_simulator, 10.5 s,
    plus the optimizer's 0.5 s shared by the two stages."""
    assert predict(UNIFORM, SHAPE, pp=2, vpp=1, cores=None) == 10.75
    # one core for both ranks: the pipeline is the total work, 2 x 2 x 3 = 12 s, and one core steps
    # both stages' parameters
    assert predict({**UNIFORM, "latency": 0.0}, SHAPE, pp=2, vpp=1, cores=1) == 12.5
    # a prologue of 0.5 s in every forward: f = 1.5, b = 2, so (m + p - 1)(f + b) = 3 x 3.5 without hops
    assert predict({**UNIFORM, "latency": 0.0, "prologue": 0.5}, SHAPE, pp=2, vpp=1, cores=None) == 10.75


def test_ends_of_the_model_load_only_their_chunks():
    """The embedding on stage 0 (forward 0.5 s, backward 0.3 s), the head on stage 1 (0.75 s, 1 s),
    instant hops, blocking 1F1B over 2 micro-batches. Stage 0: F1 [0, 1.5], F2 [1.5, 3]; stage 1:
    F1 [1.5, 3.25], B1 [3.25, 6.25]; stage 0's send of F2 waits for stage 1 to reach F2 (6.25),
    then B1 [6.25, 8.55]; stage 1: F2 [6.25, 8], B2 [8, 11]; stage 0: B2 [11, 13.3]; plus the tail
    0.25 s. At PP = 1 the two passes are the sum of everything: 2 x (3.25 + 5.3) + 0.5."""
    ends = {**UNIFORM, "latency": 0.0, "embedding_forward": 0.5, "embedding_backward": 0.3, "head_forward": 0.75,
            "head_backward": 1.0}
    assert abs(predict(ends, SHAPE, pp=2, vpp=1, cores=None) - 13.55) < 1e-9
    assert abs(predict(ends, SHAPE, pp=1, vpp=1, cores=None) - 17.6) < 1e-9


def test_config_overrides_and_hop_size():
    shape = shape_of("configs/tiny-cpu.yaml", ["micro_batch_size=2", "hc_mode=residual"])
    assert (shape["micro_batch_size"], shape["hc_mode"], shape["num_layers"]) == (2, "residual", 4)
    assert hop_bytes(shape, "residual") == 128 * 2 * 128 * 4
    assert hop_bytes(shape, "mhc") == 4 * hop_bytes(shape, "residual")
