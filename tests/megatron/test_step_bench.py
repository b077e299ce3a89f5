"""``mhc-bench step`` (mhc_megatron/bench/step.py) and its decomposition (bench/step_parts.py).

The statistics on given numbers; the command on a tiny shape (its JSON and its refusals); the
decomposition's parts: the ones each variant must have, adding up to the step's wall time, and a
delay injected into one op (measured by the delay itself) landing in that op's part and phase and
in no other. Nothing here asserts speed."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import run_workers
from mhc_megatron.bench import cli, step
from mhc_megatron.bench.step_parts import PARTS

TINY = ["--layers", "2", "--hidden", "32", "--ffn", "64", "--heads", "4", "--seq", "16", "--vocab", "128"]
ROUNDS, STEPS = 3, 2
DELAY = 0.2  # as in step_parts_worker.py
# |sum of the parts - the step's wall time measured around the recording|: the install and removal
# of the wrappers lie outside the parts, and nothing else
SUM_TOLERANCE_S = 0.002


def test_compare_on_given_numbers():
    times, baseline = [2.0, 1.5, 1.8], [1.0, 1.25, 2.0]  # per-round ratios 2.0, 1.2, 0.9
    result = step.compare(times, baseline)
    assert result["ratio_of_minimums"] == pytest.approx(1.5)  # 1.5 / 1.0, from different rounds
    assert result["per_round_ratio"] == pytest.approx({"median": 1.2, "min": 0.9, "max": 2.0})
    assert result["extra_s"] == pytest.approx({"of_minimums": 0.5, "per_round_median": 0.25,
                                               "per_round_min": -0.2, "per_round_max": 1.0})
    with pytest.raises(ValueError, match="same rounds"):
        step.compare([1.0, 2.0], [1.0])


def test_summarize_compares_every_variant_with_residual_and_recompute_with_mhc():
    rounds = [{"round_s": {"residual": 1.0, "mhc": 1.3, "mhc+recompute": 1.4}},
              {"round_s": {"residual": 2.0, "mhc": 2.2, "mhc+recompute": 2.1}},
              {"round_s": {"residual": 1.1, "mhc": 1.2, "mhc+recompute": 1.5}}]
    summary = step.summarize(rounds, ["residual", "mhc", "mhc+recompute"])
    assert summary["residual"] == {"min_s": 1.0, "median_s": 1.1}
    assert summary["mhc"]["vs_residual"]["ratio_of_minimums"] == pytest.approx(1.2)
    assert summary["mhc"]["vs_residual"]["per_round_ratio"]["median"] == pytest.approx(2.2 / 2.0)  # of 1.3, 1.1, 1.09
    assert summary["mhc+recompute"]["vs_mhc"]["ratio_of_minimums"] == pytest.approx(1.4 / 1.2)
    assert "vs_mhc" not in summary["mhc"]


def test_explain_subtracts_part_by_part():
    decomposition = {
        "residual": {"parts_ms": {"layer": {"total": 100.0}, "head": {"total": 10.0}}, "wall_ms": 112.0},
        "mhc": {"parts_ms": {"layer": {"total": 104.0}, "head": {"total": 9.0}, "mappings": {"total": 20.0},
                             "post_res": {"total": 6.0}}, "wall_ms": 141.0},
    }
    summary = {"mhc": {"vs_residual": step.compare([1.140, 1.150, 1.200], [1.100, 1.110, 1.120])}}
    explained = step.explain(decomposition, summary)["mhc"]
    assert explained["extra_ms"] == pytest.approx({"mappings": 20.0, "post_res": 6.0, "layer": 4.0, "head": -1.0})
    assert explained["connection_ops_extra_ms"] == pytest.approx(26.0)
    assert explained["explained_ms"] == pytest.approx(29.0)
    assert explained["measured_extra_ms"] == pytest.approx(40.0)
    assert explained["fraction_explained"] == pytest.approx(29.0 / 40.0)
    assert explained["recorded_extra_ms"] == pytest.approx(29.0)


def test_rotation_puts_every_variant_in_every_position():
    names = list(step.VARIANTS)
    orders = [step.rotated(names, index) for index in range(3 * len(names))]
    for position in range(len(names)):
        assert sorted(order[position] for order in orders) == sorted(names * 3)


@pytest.mark.parametrize("arguments, message", [
    (["--rounds", "2"], "--rounds: must be at least 3"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--variants", "hc", "mhc"], "must include 'residual'"),
    (["--hidden", "100", "--heads", "3"], "must be a multiple of --heads 3"),
])
def test_bad_arguments_are_refused_with_the_reason(arguments, message, capsys):
    with pytest.raises(SystemExit) as refusal:
        cli.main(["step", *arguments])
    assert refusal.value.code != 0
    assert message in str(refusal.value.code) + capsys.readouterr().err


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("step") / "step.json"
    command = [sys.executable, "-m", "mhc_megatron.bench.cli", "step", *TINY, "--rounds", str(ROUNDS),
               "--steps", str(STEPS), "--warmup", "1", "--part-rounds", "1", "--optimizer", "--threads", "1",
               "--json", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 3/3" in result.stdout and "ratio of min" in result.stdout
    return json.loads(out.read_text())


def test_the_json_says_what_ran_where(report):
    assert report["command"].startswith("mhc-bench step --layers 2 --hidden 32")
    assert "--optimizer" in report["command"]
    assert report["date"] <= report["finished"]
    assert report["machine"]["threads"] == 1
    assert report["machine"]["cpu"] and report["machine"]["fused_cpu_isa"]
    assert report["shape"] == {"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "seq": 16, "micro_batch": 1,
                               "streams": 4, "vocab": 128, "dtype": "float32"}
    assert report["settings"]["block_size"] == step.default_block_size(4, 4)


def test_the_rounds_are_rotated_and_kept_raw(report):
    names = list(step.VARIANTS)
    assert len(report["rounds"]) == ROUNDS
    for index, record in enumerate(report["rounds"]):
        assert record["order"] == step.rotated(names, index)
        assert len(record["load_average"]) == 2
        for name in names:
            assert len(record["step_s"][name]) == STEPS
            assert record["round_s"][name] == pytest.approx(statistics.median(record["step_s"][name]))


def test_the_summary_is_computed_from_the_raw_rounds(report):
    per_variant = {name: [r["round_s"][name] for r in report["rounds"]] for name in step.VARIANTS}
    others = set(step.VARIANTS) - {"residual"}
    for name in others:
        vs = report["summary"][name]["vs_residual"]
        assert vs["ratio_of_minimums"] == pytest.approx(min(per_variant[name]) / min(per_variant["residual"]))
        ratios = [t / b for t, b in zip(per_variant[name], per_variant["residual"])]
        assert vs["per_round_ratio"] == pytest.approx(
            {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)})
    assert set(report["explained"]) == others
    for name in step.RECOMPUTE_VARIANTS:
        vs = report["summary"][name]["vs_mhc"]
        assert vs["ratio_of_minimums"] == pytest.approx(min(per_variant[name]) / min(per_variant["mhc"]))
    for name, decomposition in report["decomposition"].items():
        assert decomposition["parts_ms"]["optimizer"]["total"] > 0, name
        assert len(decomposition["steps"]) == 1


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("step-parts") / "parts.json"
    run_workers("step_parts_worker.py", 1, "--out", str(out))
    return json.loads(out.read_text())


BASE_PARTS = {"embedding", "post_res", "layer", "head", "optimizer", "other"}
EXPECTED_PARTS = {"residual": BASE_PARTS,  # hc, mhc: the read of the sub-layer input is in the mappings' op
                  "hc": BASE_PARTS | {"expand_collapse", "mappings"},
                  "mhc": BASE_PARTS | {"expand_collapse", "mappings", "post_res_mappings"},
                  "mhc+recompute": BASE_PARTS | {"expand_collapse", "mappings", "recompute"}}


@pytest.mark.parametrize("variant", list(EXPECTED_PARTS))
def test_each_variant_has_its_parts_in_forward_and_backward(parts, variant):
    for recorded in parts["plain"][variant]:
        found = recorded["parts_s"]
        assert set(found) == EXPECTED_PARTS[variant]
        assert set(found) <= set(PARTS)
        for part in EXPECTED_PARTS[variant] - {"optimizer", "other"}:
            assert set(found[part]) == {"forward", "backward"}, (part, found[part])
            assert all(seconds > 0 for seconds in found[part].values())
        assert set(found["optimizer"]) == {"step"}


@pytest.mark.parametrize("variant", list(EXPECTED_PARTS))
def test_the_parts_add_up_to_the_step(parts, variant):
    for recorded in parts["plain"][variant]:
        total = sum(seconds for phases in recorded["parts_s"].values() for seconds in phases.values())
        assert total <= recorded["wall_s"]
        assert recorded["wall_s"] - total <= SUM_TOLERANCE_S, (total, recorded["wall_s"])


@pytest.mark.parametrize("case", ["post_res forward", "post_res forward, replayed", "mappings and pre backward",
                                  "post_res and the next mappings backward", "hc mappings and pre backward", "expand forward", "mlp backward",
                                  "residual mlp backward"])
def test_a_delay_lands_in_its_part_and_nowhere_else(parts, case):
    """Each sleep of the case lies in the part and phase it was put in (with autograd on: in
    forward; off: in backward or block recompute's replays), and no other part and phase of the
    step grew by half a sleep or more over the same variant's plain steps."""
    record = parts["cases"][case]
    plain = parts["plain"][record["variant"]]
    expected = set()
    for mode, sleeps in record["sleeps"].items():
        if sleeps["expected"] is None:
            assert not sleeps["seconds"], f"{case}: slept {mode.replace('_', ' ')} where no sleep was put"
            continue
        part, phase = sleeps["expected"]
        expected.add((part, phase))
        assert sleeps["seconds"] and all(seconds >= DELAY for seconds in sleeps["seconds"])
        assert record["parts_s"][part][phase] >= sum(sleeps["seconds"]), (part, phase, record["parts_s"])
    for part, phases in record["parts_s"].items():
        for phase, seconds in phases.items():
            if (part, phase) not in expected:
                usual = max(step["parts_s"].get(part, {}).get(phase, 0.0) for step in plain)
                assert seconds < usual + DELAY / 2, f"{case}: {part} {phase}: {seconds:.3f} s, usually {usual:.3f} s"
