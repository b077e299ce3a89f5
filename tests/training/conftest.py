"""Fixtures of the training-job tests: a small dataset and a way to run ``mhc-train``."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

# A model small enough for a torchrun launch of a few seconds; 4 layers so PP = 2 splits it. One
# Sinkhorn iteration leaves mHC's backward Amax gain (the informative one: the forward gain is 1 by
# construction) about 2 % above 1, where a wrong measurement shows; with 20 it is 1 to float32 rounding.
TINY = [
    "num_layers=4", "hidden_size=32", "ffn_hidden_size=64", "num_attention_heads=4", "normalization=RMSNorm",
    "add_bias_linear=false", "hidden_dropout=0.0", "attention_dropout=0.0", "hc_mode=mhc", "num_streams=4",
    "hc_alpha_init=0.3", "sinkhorn_iters=1", "seq_length=32", "micro_batch_size=2", "global_batch_size=8", "lr=5e-3",
    "lr_warmup_iters=2", "log_interval=2", "tokenizer=byte-level",
]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """An indexed dataset of 40 standard-library files, written by the mhc-preprocess command."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(root.glob("*.py"))[:40]
    prefix = tmp_path_factory.mktemp("data") / "stdlib40"
    run_command([sys.executable, "-m", "mhc_megatron.data.preprocess", "--input", *map(str, sources),
                 "--output-prefix", str(prefix)])
    return prefix


@pytest.fixture(scope="module")
def initial_weights(dataset, tmp_path_factory) -> Path:
    """The initial weights of the tiny model (the default seed, one process), saved by a zero-step run."""
    save = tmp_path_factory.mktemp("init") / "checkpoints"
    run_train(*TINY, f"data_path={dataset}", "train_iters=0", "lr_warmup_iters=0", f"save={save}", f"run_dir={save.parent / 'run'}")
    return save


def run_command(command: list[str], expect_success: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if expect_success:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-6000:]}"
    return result


def run_train(*overrides: str, nproc: int = 1, expect_success: bool = True) -> subprocess.CompletedProcess:
    """``mhc-train`` with ``overrides`` in one process, or ``nproc`` under torchrun."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return run_command([*launcher, "-m", "mhc_megatron.train", *overrides], expect_success)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_four_steps(dataset: Path, run_dir: Path, *overrides: str, nproc: int = 1) -> list[dict]:
    """The tiny model trained 4 steps (evaluated, and its gain profile probed, every 2); its metrics."""
    run_train(*TINY, f"data_path={dataset}", "train_iters=4", "eval_interval=2", "eval_iters=1", "gain_profile_interval=2",
              f"data_dir={run_dir / 'data'}", f"run_dir={run_dir}", *overrides, nproc=nproc)
    return read_metrics(run_dir)


def assert_same_training(runs: list[dict], reference: list[dict]) -> None:
    """``runs`` (metrics records) trained as ``reference`` did, up to float32 rounding: rel 1e-5 on
    the losses, 1e-4 on the gradient norms, the Amax gain and the probe's gain profile (Adam turns
    rounding differences into weight differences that the gain, 2 % above 1 here, shows more than
    the loss: measured 1.6e-5 apart at TP = 2)."""
    assert [r["step"] for r in runs] == [r["step"] for r in reference]
    for ours, expected in zip(runs, reference):
        assert ours["lr"] == expected["lr"]
        assert ours["loss"] == pytest.approx(expected["loss"], rel=1e-5), (ours, expected)
        assert ours["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), (ours, expected)
        assert ours.get("eval_loss") == pytest.approx(expected.get("eval_loss"), rel=1e-5)
        assert ours.get("amax_gain_backward") == pytest.approx(expected.get("amax_gain_backward"), rel=1e-4)
        for key, values in expected.get("gain_profile", {}).items():
            assert ours["gain_profile"][key] == pytest.approx(values, rel=1e-4), key
