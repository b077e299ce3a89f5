"""``engine=deepspeed``: ZeRO stages 1-3 at two processes train as megatron's data-parallel run of the
same global batch, stop-and-resume equals the uninterrupted run, the parameter groups are megatron's,
and checkpoints move between the engines as weights (``finetune``), never as a resume.

Tolerance against megatron: ``assert_same_training``'s (rel 1e-5 on the loss, 1e-4 on the gradient
norm and the Amax gain, as between megatron's own layouts in test_train_job.py): both engines run torch's AdamW in float32 on the
same micro-batches; they differ in the order of the gradient reductions (megatron's DDP buckets,
ZeRO's partitions), i.e. in float32 rounding, which Adam turns into small weight differences.
"""

import json
import sys
from pathlib import Path

import pytest

from mhc_megatron.training.builders import data_parallel_size
from mhc_megatron.training.config import RunConfig

from .conftest import TINY, assert_same_training, read_metrics, run_command, run_train, train_four_steps

WORKER = Path(__file__).with_name("deepspeed_groups_worker.py")


@pytest.fixture(scope="module")
def megatron_dp2(dataset, tmp_path_factory):
    """megatron's data-parallel run at two processes (global batch 8: 2 micro-batches of 2 per rank)."""
    return train_four_steps(dataset, tmp_path_factory.mktemp("megatron"), nproc=2)


@pytest.fixture(scope="module")
def zero2(dataset, tmp_path_factory):
    """ZeRO-2 at two processes, from the seed, saved at the end."""
    run_dir = tmp_path_factory.mktemp("zero2")
    metrics = train_four_steps(dataset, run_dir, "engine=deepspeed", "zero_stage=2", f"save={run_dir / 'checkpoints'}",
                               nproc=2)
    return run_dir, metrics


def test_zero1_from_megatron_weights_matches_megatron(megatron_dp2, initial_weights, dataset, tmp_path):
    """ZeRO-1 starting from megatron's checkpoint of the initial weights (``finetune``): the same run."""
    runs = train_four_steps(dataset, tmp_path, "engine=deepspeed", "zero_stage=1", f"load={initial_weights}",
                            "finetune=true", nproc=2)
    assert_same_training(runs, megatron_dp2)
    settings = json.loads((tmp_path / "deepspeed_config.json").read_text())
    assert settings["zero_optimization"]["stage"] == 1
    assert settings["gradient_accumulation_steps"] == 2 and settings["train_batch_size"] == 8


def test_zero2_matches_megatron(megatron_dp2, zero2):
    run_dir, runs = zero2
    assert_same_training(runs, megatron_dp2)
    save = run_dir / "checkpoints"
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4\n"
    assert (save / "latest").read_text() == "iter_0000004"
    record = json.loads((save / "iter_0000004" / "deepspeed.json").read_text())
    assert record["zero_stage"] == 2 and record["data_parallel_size"] == 2 and record["mhc"]["hc_mode"] == "mhc"
    assert sorted(path.name for path in save.glob("iter_0000004/*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_zero3_matches_megatron(megatron_dp2, dataset, tmp_path):
    assert_same_training(train_four_steps(dataset, tmp_path, "engine=deepspeed", "zero_stage=3", nproc=2), megatron_dp2)


def test_stop_and_resume_equals_the_uninterrupted_run(zero2, dataset, tmp_path):
    """ZeRO-2, stopped after step 2 (saved), resumed to step 4: exactly the uninterrupted losses."""
    _, whole = zero2
    save = tmp_path / "checkpoints"
    common = ["engine=deepspeed", "zero_stage=2", f"save={save}"]
    train_four_steps(dataset, tmp_path, *common, "exit_interval=2", nproc=2)
    train_four_steps(dataset, tmp_path, *common, f"load={save}", nproc=2)
    parts = read_metrics(tmp_path)
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr", "eval_loss", "amax_gain_backward"):
        assert [r.get(key) for r in parts] == [r.get(key) for r in whole], key


def test_megatron_finetunes_from_deepspeed_weights(zero2, dataset, tmp_path):
    """The ZeRO-2 checkpoint's weights (consolidated by DeepSpeed's zero_to_fp32) loaded by the
    megatron engine in one process: with lr = 0, its evaluation is the ZeRO-2 run's last."""
    run_dir, runs = zero2
    run_train(*TINY, f"data_path={dataset}", "train_iters=1", "lr=0", "lr_warmup_iters=0", "eval_interval=1",
              "eval_iters=1", f"load={run_dir / 'checkpoints'}", "finetune=true", f"run_dir={tmp_path}")
    (finetuned,) = read_metrics(tmp_path)
    assert finetuned["eval_loss"] == pytest.approx(runs[-1]["eval_loss"], rel=1e-6)


def test_a_checkpoint_resumes_only_under_its_engine(initial_weights, dataset, tmp_path):
    result = run_train(*TINY, f"data_path={dataset}", "engine=deepspeed", f"load={initial_weights}",
                       f"run_dir={tmp_path}", expect_success=False)
    assert result.returncode == 2
    assert "was saved by engine=megatron" in result.stderr and "set engine=megatron" in result.stderr


def test_resuming_with_another_zero_stage_is_refused(zero2, dataset, tmp_path):
    run_dir, _ = zero2
    result = run_train(*TINY, f"data_path={dataset}", "engine=deepspeed", "zero_stage=1",
                       f"load={run_dir / 'checkpoints'}", f"run_dir={tmp_path}", expect_success=False)
    assert result.returncode == 2
    assert "was saved with zero_stage=2, this run has zero_stage=1" in result.stderr


def test_parameter_groups_are_megatrons():
    """No weight decay on alpha, bias and the norms (wd_mult 0), decay on phi and the matrices, in
    megatron's optimizer and in the groups given to DeepSpeed alike; the schedule sets each group's
    weight decay to weight_decay x wd_mult."""
    result = run_command([sys.executable, str(WORKER), *TINY, "engine=deepspeed", "weight_decay=0.1"])
    groups = json.loads(result.stdout.strip().splitlines()[-1])
    assert groups["ours"] == groups["megatron"]
    hyper = {name: mult for name, mult in groups["ours"].items() if "hyper_connection" in name or "collapse" in name}
    assert hyper and all(mult == 0.0 for name, mult in hyper.items() if name.endswith((".alpha", ".bias")))
    assert all(mult == 1.0 for name, mult in hyper.items() if name.endswith(".phi"))
    assert sorted(groups["deepspeed_groups"]) == [[0.0, 0.0], [1.0, pytest.approx(0.1)]]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["zero_stage=2"], "zero_stage=2 applies to engine=deepspeed"),
        (["engine=deepspeed", "zero_stage=4"], "zero_stage must be one of 1, 2, 3, got 4"),
        (["engine=deepspeed", "use_distributed_optimizer=true"], "with engine=deepspeed ZeRO shards it"),
        (["engine=zero"], "engine must be one of 'megatron', 'deepspeed', got 'zero'"),
    ],
)
def test_bad_engine_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.load(None, overrides)


@pytest.mark.parametrize("key", ["tensor_model_parallel_size", "pipeline_model_parallel_size"])
def test_deepspeed_refuses_model_parallelism(key):
    run = RunConfig.load(None, [*TINY, "engine=deepspeed", f"{key}=2"])
    with pytest.raises(ValueError, match=f"engine=deepspeed trains data-parallel only .* but {key}=2"):
        data_parallel_size(run, run.transformer_config(), world_size=4)


def test_bf16_trains_from_the_same_bf16_model(dataset, tmp_path):
    """bf16 (one process, ZeRO-1): the first step's loss is megatron's (the same bf16 weights and
    forward); then the engines round differently (measured at 2 processes after 6 steps: losses 7e-5
    apart relatively, ZeRO 1/2/3 alike)."""
    bf16 = [*TINY, f"data_path={dataset}", "bf16=true", "train_iters=2", "lr_warmup_iters=0", f"data_dir={tmp_path / 'data'}"]
    run_train(*bf16, f"run_dir={tmp_path / 'megatron'}")
    run_train(*bf16, "engine=deepspeed", f"run_dir={tmp_path / 'deepspeed'}")
    megatron, deepspeed = read_metrics(tmp_path / "megatron"), read_metrics(tmp_path / "deepspeed")
    assert deepspeed[0]["loss"] == pytest.approx(megatron[0]["loss"], rel=1e-6)
    assert deepspeed[1]["loss"] == pytest.approx(megatron[1]["loss"], rel=1e-3)
    assert deepspeed[1]["loss"] < deepspeed[0]["loss"]
