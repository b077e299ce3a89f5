"""``mhc-bench memory``: the saved bytes against the analytic model, the step's high-water marks and
the interleaved timing (docs/memory.md)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mhc_megatron.bench import memory
from mhc_megatron.plan import costs
from mhc_megatron.plan.model import Layout, ModelSpec

HIDDEN, LAYERS, SEQ, MICRO_BATCH = 48, 4, 40, 3
REPEATS = 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    command = [
        sys.executable, "-m", "mhc_megatron.bench.cli", "memory", "--layers", str(LAYERS), "--hidden", str(HIDDEN),
        "--ffn", "80", "--heads", "3", "--seq", str(SEQ), "--micro-batch", str(MICRO_BATCH), "--streams", "4",
        "--block-sizes", "1", "8", "--rebuilds", "sublayer", "block", "--repeats", str(REPEATS), "--json", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": "29537"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def saved(numbers, moment):
    return numbers["saved_bytes_per_token_layer"][moment]


def test_the_model_predicts_every_measurement(report):
    for variant, numbers in report["results"].items():
        end, top = saved(numbers, "end_of_forward"), saved(numbers, "max_sampled")
        assert end["model"] == pytest.approx(end["measured"], rel=0.02), variant
        assert top["model"] == pytest.approx(top["measured"], rel=0.05), variant


def test_block_recompute_keeps_fewer_bytes_the_longer_the_blocks(report):
    kept = {name: saved(numbers, "end_of_forward")["measured"] for name, numbers in report["results"].items()}
    # L_r = 1 keeps every state but rebuilds the sub-layer inputs; longer blocks also rebuild states
    assert kept["residual"] < kept["mhc + block recompute L_r=8"] < kept["mhc + block recompute L_r=1"] < kept["mhc"]


def largest_extra(numbers):
    return saved(numbers, "max_sampled")["measured"] - saved(numbers, "end_of_forward")["measured"]


def test_backward_holds_one_rebuilt_state_and_input_at_a_time(report):
    # one sub-layer at a time: the largest sample exceeds the end of forward by at most n C + C values
    # per token (float32), spread over the slice's 4 layers, however long the block
    bound = (4 + 1) * HIDDEN * 4 / LAYERS
    block_variants = [name for name in report["results"] if "block recompute" in name and "block rebuild" not in name]
    assert len(block_variants) == 3  # L_r = 1, 8 and the default
    for name in block_variants:
        extra = largest_extra(report["results"][name])
        assert 0 <= extra <= bound, (name, extra)


def test_the_block_rebuild_holds_the_last_blocks_states_at_once(report):
    # L_r = 8 over the slice's 8 sub-layers: one block, whose 7 freed states are all rebuilt when
    # backward begins, with the last sub-layer's input; by then the final norm's backward has released
    # its input, normalised input and 1/rms. L_r = 1 frees no state, so both schemes agree
    results = report["results"]
    final_norm = 2 * HIDDEN * 4 + 4
    assert largest_extra(results["mhc + block recompute L_r=8, block rebuild"]) == pytest.approx(
        ((7 * 4 + 1) * HIDDEN * 4 - final_norm) / LAYERS)
    assert largest_extra(results["mhc + block recompute L_r=1, block rebuild"]) == pytest.approx(
        largest_extra(results["mhc + block recompute L_r=1"]))


def test_the_step_high_water_marks_hold_at_least_what_autograd_saved(report):
    """Every tensor autograd holds at a sampling moment was allocated during the step, except the
    slice's input (C float32 values per token), so torch's allocator must have handed out at least
    that much at its peak; and the resident set must have grown by about as much (its pages were
    written), whatever else the process held."""
    input_bytes = HIDDEN * 4 / LAYERS
    assert set(report["methods"]) == {"saved_bytes", "resident_set", "cpu_allocator"}
    for variant, numbers in report["results"].items():
        high_water = numbers["step_high_water_bytes_per_token_layer"]
        assert high_water["cpu_allocator"] >= saved(numbers, "max_sampled")["measured"] - input_bytes, variant
        assert numbers["parameter_gradient_bytes_per_token_layer"] > 0
    if not all("resident_set" in numbers["step_high_water_bytes_per_token_layer"] for numbers in report["results"].values()):
        pytest.skip(f"no resident-set figure: {report['methods']['resident_set']}")
    for variant, numbers in report["results"].items():
        high_water = numbers["step_high_water_bytes_per_token_layer"]
        assert high_water["resident_set"] >= 0.9 * high_water["cpu_allocator"], variant
        assert high_water["resident_set"] == max(high_water["resident_set_per_step"]), variant


def test_times_are_compared_round_by_round(report):
    results = report["results"]
    for comparison in report["comparisons"]:
        times, baseline = (results[comparison[key]]["step_ms_per_round"] for key in ("variant", "baseline"))
        assert len(times) == len(baseline) == REPEATS
        assert comparison["ratio_of_minimums"] == pytest.approx(min(times) / min(baseline))
        per_round = [t / b for t, b in zip(times, baseline)]
        assert (comparison["per_round_min"], comparison["per_round_max"]) == pytest.approx((min(per_round), max(per_round)))
    assert {(c["variant"], c["baseline"]) for c in report["comparisons"]} >= {
        ("mhc", "residual"), ("mhc + block recompute L_r=8", "mhc")}


@pytest.mark.parametrize("hc_mode, recompute", [("residual", "none"), ("mhc", "none"), ("mhc", "block")])
def test_the_model_without_scores_is_the_planners(hc_mode, recompute):
    """The bench's count for attention without s x s scores is mhc-plan's per-layer activation count
    (docs/planner.md) plus what the planner leaves out: the rotary tables of the local layer and the
    slice's final norm."""
    shape = memory.SliceShape(layers=12, hidden=768, ffn=3072, heads=12, seq=512, micro_batch=2, streams=4,
                              dtype=torch.float32)
    spec = ModelSpec(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=512, micro_batch_size=2,
                     global_batch_size=2, ffn_hidden_size=3072, num_streams=4, hc_mode=hc_mode, bf16=False)
    block = memory.default_block_size(4, 24) if recompute == "block" else None
    planner = costs.activation_bytes_per_token_layer(spec, Layout(recompute=recompute), layers_per_chunk=12)
    rotary_tables = 4 * (768 // 12) * 4 / 2
    final_norm = (2 * 768 * 4 + 4) / 12
    ours = memory.activation_bytes_per_token_layer(shape, hc_mode, block, scores=False)
    assert ours == pytest.approx(planner + rotary_tables + final_norm, rel=1e-12)
    with_scores = memory.activation_bytes_per_token_layer(shape, hc_mode, block)
    assert with_scores - ours == pytest.approx(12 * 512 * 4 + 512 / 2)  # softmax output and the bool mask
