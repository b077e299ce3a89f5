"""Non-finite loss or gradients: every rank skips the step together, and a run that keeps diverging
stops with a message naming the steps."""

import json
import math
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from .conftest import TINY, read_metrics, run_command

WORKER = Path(__file__).with_name("nonfinite_worker.py")


def test_a_nonfinite_step_on_one_rank_is_skipped_on_every_rank(dataset, tmp_path):
    """DP = 2; rank 1 alone sees a NaN loss at step 2 and an infinite gradient at steps 4, 5, 6
    (after the data-parallel reduction): steps 2, 4, 5 and 6 are skipped on both ranks, with the LR
    schedule held, and the third skip in a row stops the run, naming the steps."""
    save = tmp_path / "checkpoints"
    result = run_command([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
        f"--data={dataset}", f"--run-dir={tmp_path / 'run'}", f"--report-dir={tmp_path}", "--fault-rank=1", "--nan-loss-steps=2",
        "--nan-grad-steps=4,5,6", "--", *TINY, "train_iters=10", "lr_warmup_iters=0", "lr_decay_style=linear",
        "max_consecutive_skips=3", f"save={save}", "save_interval=1", f"data_dir={tmp_path / 'data'}",
    ])  # fmt: skip
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["optimizer_steps"] == 2, report  # steps 1 and 3
        assert report["error"].startswith("the run diverged: the loss or gradients were non-finite at steps 4 to 6 "
                                          "(3 in a row, max_consecutive_skips=3)"), report
        assert "last checkpoint: step 5" in report["error"]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped") for r in records] == [None, ["loss"], None, ["gradients"], ["gradients"],
                                                   ["gradients"]]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert math.isfinite(records[3]["loss"]) and records[3]["grad_norm"] is None
    # the schedule advances only on updates: step 3 runs at step 2's LR, steps 4 to 6 at the LR after it
    lrs = [r["lr"] for r in records]
    assert lrs[2] == lrs[1] and lrs[1] < lrs[0] and lrs[3] == lrs[4] == lrs[5] < lrs[2]
    assert "step 2: skipped: non-finite loss (no update; 1 in a row, the run stops at 3)" in result.stdout
    # no checkpoint holds a non-finite value: the last one (step 5) holds the weights after step 3
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "5\n"
    dcp_to_torch_save(save / "iter_0000005", tmp_path / "step5.pt")
    tensors = [t for t in _tensors(torch.load(tmp_path / "step5.pt", weights_only=False)) if t.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_deepspeed_skips_a_step_whose_loss_is_nonfinite_on_one_rank(dataset, tmp_path):
    """ZeRO-2, DP = 2; rank 1 alone sees a NaN loss at steps 2, 4 and 5: DeepSpeed's overflow check
    (on the reduced gradients) skips them on both ranks, the LR schedule holds, and the second skip
    in a row stops the run."""
    result = run_command([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
        f"--data={dataset}", f"--run-dir={tmp_path / 'run'}", f"--report-dir={tmp_path}", "--fault-rank=1",
        "--nan-loss-steps=2,4,5", "--", *TINY, "engine=deepspeed", "zero_stage=2", "train_iters=10", "lr_warmup_iters=0",
        "lr_decay_style=linear", "max_consecutive_skips=2", f"data_dir={tmp_path / 'data'}",
    ])  # fmt: skip
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["optimizer_steps"] == 2, report  # steps 1 and 3
        assert report["error"].startswith("the run diverged: the loss or gradients were non-finite at steps 4 to 5 "), report
    records = read_metrics(tmp_path / "run")
    assert [r.get("skipped") for r in records] == [None, ["loss", "gradients"], None, ["loss", "gradients"],
                                                   ["loss", "gradients"]]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None and math.isfinite(records[2]["loss"])
    lrs = [r["lr"] for r in records]
    assert lrs[2] == lrs[1] < lrs[0] and lrs[3] == lrs[4] < lrs[2]
    assert "step 2: skipped: non-finite loss and gradients" in result.stdout


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
