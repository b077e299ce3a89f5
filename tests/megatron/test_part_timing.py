"""``PartTimer`` (mhc_megatron/bench/part_timing.py): the parts of every pass of megatron's PP = 1
schedule are stamped in order and add up to the pass."""

import json

import pytest

from conftest import run_workers

LAYERS = 3


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
        forward = sum(v for k, v in parts.items() if "forward" in k or k == "prologue")
        backward = sum(v for k, v in parts.items() if "backward" in k)
        assert forward == pytest.approx(recorded["forward"], rel=1e-9)
        assert backward == pytest.approx(recorded["backward"], rel=1e-9)


@pytest.mark.parametrize("mode", ["residual", "mhc"])
def test_medians_give_one_entry_per_layer(report, mode):
    medians = report[mode]["medians"]
    assert len(medians["layer_forward"]) == len(medians["layer_backward"]) == LAYERS
    assert set(medians) == {"layer_forward", "layer_backward", "prologue", "embedding_forward",
                            "embedding_backward", "head_forward", "head_backward"}
