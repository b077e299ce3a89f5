"""The pure parts of ``mhc-bench pipeline``: the prediction from a calibration and the config reading."""

from __future__ import annotations

from mhc_megatron.bench.pipeline import hop_bytes, predict, shape_of


def test_prediction_from_measured_durations_is_the_hand_computed_schedule():
    """Two layers on PP = 2 (one per stage), two micro-batches, forward 1 s and backward 2 s per
    layer, no head, a hop of 0.5 s (latency only): the blocking 1F1B case of test_simulator, 10.5 s,
    plus a tail of 0.25 s."""
    shape = {"num_layers": 2, "global_batch_size": 4, "micro_batch_size": 2}
    calibration = {"forward": 1.0, "backward": 2.0, "head_forward": 0.0, "head_backward": 0.0, "embedding": 0.0,
                   "pass_overhead": 0.0, "latency": 0.5, "hop_bytes": 1, "bandwidth": float("inf"), "tail": 0.25}
    assert predict(calibration, shape, pp=2, vpp=1, cores=None) == 10.75
    # one core for both ranks: the pipeline is the total work, 2 x 2 x 3 = 12 s
    assert predict({**calibration, "latency": 0.0}, shape, pp=2, vpp=1, cores=1) == 12.25
    # a per-pass overhead of 0.5 s: f = 1.25, b = 2.25, so (m + p - 1)(f + b) = 3 x 3.5 without hops
    assert predict({**calibration, "latency": 0.0, "pass_overhead": 0.5}, shape, pp=2, vpp=1, cores=None) == 10.75


def test_config_overrides_and_hop_size():
    shape = shape_of("configs/tiny-cpu.yaml", ["micro_batch_size=2", "hc_mode=residual"])
    assert (shape["micro_batch_size"], shape["hc_mode"], shape["num_layers"]) == (2, "residual", 4)
    assert hop_bytes(shape, "residual") == 128 * 2 * 128 * 4
    assert hop_bytes(shape, "mhc") == 4 * hop_bytes(shape, "residual")
