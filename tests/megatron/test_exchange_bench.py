"""``mhc-bench exchange`` on a tiny shape: it runs every schedule and variant, and they agree."""

import json
import os
import subprocess
import sys


def test_exchange_bench_runs_and_the_variants_agree(tmp_path):
    out = tmp_path / "exchange.json"
    command = [
        sys.executable, "-m", "mhc_megatron.bench.cli", "exchange", "--layers", "4", "--hidden", "16", "--heads", "2",
        "--seq", "8", "--micro-batch", "4", "--micro-batches", "4", "--vocab", "64", "--steps", "1", "--warmup", "1",
        "--port", "29563", "--json", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"1f1b", "interleaved"}
    assert set(results["1f1b"]["ranks"]["0"]) == {"blocking", "overlapped, no thread", "overlapped", "overlapped, 1 ahead"}
    assert set(results["interleaved"]["ranks"]["0"]) == {"blocking", "overlapped, no thread", "overlapped"}
    for summary in results.values():
        assert summary["identical"]
        for row in summary["ranks"].values():
            for variant in row.values():
                assert variant["step_s"] > 0 and 0 <= variant["exposed_s"] <= variant["p2p_s"] < variant["step_s"]
                assert 0 <= variant["critical_s"] < variant["path_s"] <= variant["step_s"]
