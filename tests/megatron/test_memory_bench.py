"""``mhc-bench memory``: the measured activation bytes against the analytic model (docs/memory.md)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    command = [
        sys.executable, "-m", "mhc_megatron.bench.cli", "memory", "--layers", "4", "--hidden", "48", "--ffn", "80",
        "--heads", "3", "--seq", "40", "--micro-batch", "3", "--streams", "4", "--block-sizes", "1", "8",
        "--repeats", "1", "--json", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": "29537"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())["results"]


def test_the_model_predicts_every_measurement(report):
    for variant, numbers in report.items():
        assert numbers["model_bytes_per_token_layer"] == pytest.approx(
            numbers["measured_bytes_per_token_layer"], rel=0.02
        ), variant
        assert numbers["model_peak_bytes_per_token_layer"] == pytest.approx(
            numbers["measured_peak_bytes_per_token_layer"], rel=0.05
        ), variant


def test_block_recompute_keeps_fewer_bytes_the_longer_the_blocks(report):
    kept = {name: numbers["measured_bytes_per_token_layer"] for name, numbers in report.items()}
    # L_r = 1 keeps every state but rebuilds the sub-layer inputs; longer blocks also rebuild states
    assert kept["residual"] < kept["mhc + block recompute L_r=8"] < kept["mhc + block recompute L_r=1"] < kept["mhc"]


def test_backward_holds_one_rebuilt_state_and_input_at_a_time(report):
    # one sub-layer at a time: the peak exceeds the end of forward by at most n C + C values per token
    # (float32), spread over the slice's 4 layers, however long the block
    bound = (4 + 1) * 48 * 4 / 4
    block_variants = [name for name in report if "block recompute" in name]
    assert len(block_variants) == 3  # L_r = 1, 8 and the default
    for name in block_variants:
        numbers = report[name]
        extra = numbers["measured_peak_bytes_per_token_layer"] - numbers["measured_bytes_per_token_layer"]
        assert 0 <= extra <= bound, (name, extra)
