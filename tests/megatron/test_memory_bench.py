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


def test_block_recompute_keeps_fewer_bytes_and_l_r_1_is_none(report):
    none = report["mhc"]["measured_bytes_per_token_layer"]
    assert report["mhc + block recompute L_r=1"]["measured_bytes_per_token_layer"] == none
    longest = report["mhc + block recompute L_r=8"]["measured_bytes_per_token_layer"]
    residual = report["residual"]["measured_bytes_per_token_layer"]
    assert residual < longest < none
    # a long block frees more states but rebuilds more of them at once: its peak exceeds its end of forward
    assert report["mhc + block recompute L_r=8"]["measured_peak_bytes_per_token_layer"] > longest
