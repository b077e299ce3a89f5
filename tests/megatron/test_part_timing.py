"""``PartTimer`` (mhc_megatron/bench/part_timing.py): every pass of megatron's PP = 1 schedule is
split into its parts, and a delay put into one layer, measured by the delay itself, shows up in that
layer's part of the pass (forward, and backward) and in no other part."""

import json
import statistics

import pytest

from conftest import run_workers

LAYERS = 3
SLOW_LAYER, DELAY = 1, 0.2  # as in part_timing_worker.py


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("part-timing") / "parts.json"
    run_workers("part_timing_worker.py", 1, "--out", str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["residual", "mhc"])
def test_every_pass_of_the_recorded_schedules_is_split_into_positive_parts(report, mode):
    passes = report[mode]["passes"]
    assert len(passes) == 2 * 3  # two recorded schedules of three micro-batches, not the unrecorded one
    for recorded in passes:
        parts = recorded["parts"]
        assert len(parts) == 5 + 2 * LAYERS
        assert all(value > 0 for value in parts.values()), parts


@pytest.mark.parametrize("mode", ["residual", "mhc"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_delay_in_one_layer_lands_in_that_layers_part(report, mode, direction):
    """With layer ``SLOW_LAYER`` sleeping in its ``direction`` only: each pass's sleep (measured
    around ``time.sleep``) lies inside the stamped part of that layer and direction, and every other
    part of the pass stays far below it (medians over the passes)."""
    delayed = report[mode][f"{direction}_delay"]
    slept = delayed["slept"]
    assert len(slept) == len(delayed["passes"]) == 3
    assert all(seconds >= DELAY for seconds in slept)
    slow_part = str((f"layer_{direction}", SLOW_LAYER))
    for recorded, seconds in zip(delayed["passes"], slept):
        assert recorded["parts"][slow_part] >= seconds, (slow_part, recorded["parts"])
    for name in delayed["passes"][0]["parts"]:
        if name != slow_part:
            median = statistics.median(recorded["parts"][name] for recorded in delayed["passes"])
            assert median < DELAY / 2, f"{name} took {median:.3f} s: the {direction} delay of layer {SLOW_LAYER} leaked"


@pytest.mark.parametrize("mode", ["residual", "mhc"])
def test_medians_give_one_entry_per_layer(report, mode):
    medians = report[mode]["medians"]
    assert len(medians["layer_forward"]) == len(medians["layer_backward"]) == LAYERS
    assert set(medians) == {"layer_forward", "layer_backward", "prologue", "embedding_forward",
                            "embedding_backward", "head_forward", "head_backward"}
