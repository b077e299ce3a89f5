"""mHC GPT under every parallelism, against the single-process run (gloo, float32, CPU).

A single process saves its initial weights as a distributed checkpoint and records the logits of a
fixed batch and the losses of 3 training steps; each parallel layout loads that checkpoint (so the
weights are the same, resharded) and must reproduce both. Measured: every layout below matches the
losses exactly (relative difference 0) and the logits to ~4e-9; the tolerances stated here are
``LOSS_RTOL`` and ``LOGITS_ATOL``.
"""

import pytest
import torch
from conftest import run_parallel_case

LOSS_RTOL = 1e-6  # relative, float32
LOGITS_ATOL = 1e-5

DENSE_LAYOUTS = {
    "TP=2": (2, ["--tp", "2"]),
    "TP=2+SP": (2, ["--tp", "2", "--sp"]),
    "PP=2 (1F1B)": (2, ["--pp", "2"]),
    "PP=2 x VPP=2 (interleaved)": (2, ["--pp", "2", "--vpp", "2"]),
    "DP=2 (DDP)": (2, []),
    "DP=2 (distributed optimizer)": (2, ["--distributed-optimizer"]),
    "full recompute": (1, ["--recompute", "full"]),
    "selective recompute (layernorm, core_attn, mlp)": (1, ["--recompute", "selective"]),
}


def assert_same_run(got: dict, want: dict) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(want["logits"]), rtol=0, atol=LOGITS_ATOL)


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    record = run_parallel_case(1, tmp / "reference.json", "--save", str(tmp / "checkpoint"))
    assert record["losses"][-1] < record["losses"][0], "the reference run should learn"
    return tmp / "checkpoint", record


@pytest.mark.parametrize("layout", list(DENSE_LAYOUTS))
def test_dense_layout_matches_single_process(layout, dense_reference, tmp_path):
    checkpoint, reference = dense_reference
    nproc, args = DENSE_LAYOUTS[layout]
    assert_same_run(run_parallel_case(nproc, tmp_path / "run.json", *args, "--load", str(checkpoint)), reference)


def test_moe_with_expert_parallelism_matches_single_process(tmp_path):
    moe = ["--experts", "4"]
    reference = run_parallel_case(1, tmp_path / "reference.json", *moe, "--save", str(tmp_path / "checkpoint"))
    got = run_parallel_case(2, tmp_path / "ep2.json", *moe, "--ep", "2", "--load", str(tmp_path / "checkpoint"))
    assert_same_run(got, reference)


def test_checkpoint_from_tp2_pp2_loads_at_tp1_pp1_and_back(dense_reference, tmp_path):
    """One TP=2 x PP=2 run both saves (first: its initial weights, which every layout draws equal to
    the single process's, tests/megatron/test_initialization.py) and loads (then: the single process's
    checkpoint); a single process loading the sharded save must then run as the reference too."""
    checkpoint, reference = dense_reference
    back = run_parallel_case(4, tmp_path / "back.json", "--tp", "2", "--pp", "2", "--save", str(tmp_path / "tp2pp2"),
                             "--load", str(checkpoint))
    assert_same_run(back, reference)
    single = run_parallel_case(1, tmp_path / "single.json", "--load", str(tmp_path / "tp2pp2"))
    assert_same_run(single, reference)


def test_hc_mode_under_sequence_and_interleaved_pipeline_parallelism(tmp_path):
    """HC's parameters (dynamic weight, static parts) travel the same paths as mHC's."""
    hc = ["--hc-mode", "hc"]
    reference = run_parallel_case(1, tmp_path / "reference.json", *hc, "--save", str(tmp_path / "checkpoint"))
    for name, args in {"sp": ["--tp", "2", "--sp"], "vpp": ["--pp", "2", "--vpp", "2"]}.items():
        got = run_parallel_case(2, tmp_path / f"{name}.json", *hc, *args, "--load", str(tmp_path / "checkpoint"))
        assert_same_run(got, reference)
