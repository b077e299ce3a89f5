"""Bad sizes are refused before any process group starts, with messages that name the keys.

Each case was one that reached megatron-core or PyTorch before and came back as a traceback or an
unrelated message ("math domain error", a failed reshape, an index error, world_size from
megatron's rank generator)."""

import pytest

from mhc_megatron.training import loop
from mhc_megatron.training.builders import data_parallel_size
from mhc_megatron.training.config import RunConfig

BASE = ["num_layers=4", "hidden_size=32", "num_attention_heads=4", "micro_batch_size=2", "global_batch_size=8",
        "seq_length=32"]


def check(overrides: list[str], world_size: int) -> int:
    run = RunConfig.load(None, [*BASE, *overrides])
    return data_parallel_size(run, run.transformer_config(), world_size)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["num_layers=-1"], 1, "num_layers must be an int >= 1, got -1"),
        (["num_layers=0"], 1, "num_layers must be an int >= 1, got 0"),
        (["hidden_size=0"], 1, "hidden_size must be an int >= 1, got 0"),
        (["num_attention_heads=0"], 1, "num_attention_heads must be an int >= 1, got 0"),
        (["ffn_hidden_size=0"], 1, "ffn_hidden_size must be an int >= 1 or unset, got 0"),
        (["tensor_model_parallel_size=0"], 1, "tensor_model_parallel_size must be an int >= 1, got 0"),
        (["virtual_pipeline_model_parallel_size=0"], 1, "virtual_pipeline_model_parallel_size must be an int >= 1"),
        (["num_query_groups=3"], 1, r"num_attention_heads \(4\) must be a multiple of num_query_groups \(3\)"),
        (["tensor_model_parallel_size=4", "ffn_hidden_size=30"], 4,
         r"ffn_hidden_size \(30\) must be divisible by tensor_model_parallel_size \(4\)"),
        (["init_method_std=-1"], 1, "init_method_std must be >= 0, got -1"),
        (["num_moe_experts=3", "moe_router_topk=4"], 1, r"moe_router_topk must be from 1 to num_moe_experts \(3\), got 4"),
        (["num_moe_experts=3", "expert_model_parallel_size=2"], 2,
         r"num_moe_experts \(3\) must be divisible by expert_model_parallel_size \(2\)"),
        (["tensor_model_parallel_size=3", "hidden_size=48", "num_attention_heads=3"], 2,
         r"2 processes cannot hold tensor_model_parallel_size \(3\) x pipeline_model_parallel_size \(1\) = 3"),
        (["pipeline_model_parallel_size=4"], 2, r"pipeline_model_parallel_size \(4\) = 4: launch a multiple"),
        (["num_moe_experts=4", "expert_model_parallel_size=4"], 2,
         r"2 processes cannot hold expert_tensor_parallel_size \(1\) x expert_model_parallel_size \(4\)"),
        (["pipeline_model_parallel_size=2", "num_layers=3"], 2, r"num_layers \(3\) must be divisible among the pipeline"),
        (["micro_batch_size=4"], 4, r"global_batch_size \(8\) must be a multiple of micro_batch_size \(4\) x "
                                    r"data-parallel size \(4 = 4 processes"),
        (["tensor_model_parallel_size=2", "sequence_parallel=true", "seq_length=33"], 2,
         r"seq_length \(33\) must be divisible by tensor_model_parallel_size \(2\) with sequence_parallel"),
        (["position_embedding_type=learned_absolute", "max_position_embeddings=16"], 1,
         r"max_position_embeddings \(16\) must be at least seq_length \(32\)"),
        (["hidden_size=36"], 1, r"kv_channels 9 \(hidden_size 36 / num_attention_heads 4 unless set\)"),
    ],
)
def test_bad_sizes_name_the_keys(overrides, world_size, message):
    with pytest.raises(ValueError, match=message):
        check(overrides, world_size)


@pytest.mark.parametrize(
    "overrides, world_size, data_parallel",
    [([], 1, 1), ([], 4, 4), (["tensor_model_parallel_size=2"], 4, 2), (["pipeline_model_parallel_size=2"], 2, 1),
     (["num_moe_experts=4", "expert_model_parallel_size=2"], 2, 2), (["hidden_size=36", "position_embedding_type=none"], 1, 1)],
)
def test_sizes_that_fit_give_the_data_parallel_size(overrides, world_size, data_parallel):
    assert check(overrides, world_size) == data_parallel


def test_the_sizes_are_checked_before_any_process_group(monkeypatch, tmp_path):
    def no_process_groups(**_):
        raise AssertionError("initialize_parallel ran before the sizes were checked")

    monkeypatch.setattr(loop, "initialize_parallel", no_process_groups)
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = RunConfig.load(None, [*BASE, "tensor_model_parallel_size=4", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"2 processes cannot hold tensor_model_parallel_size \(4\)"):
        loop.train(run)


def test_a_warmup_longer_than_a_shortened_run_is_scaled_with_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train_iters: 150\nlr_warmup_iters: 15\n")
    run = RunConfig.load(config, ["train_iters=6"])
    assert run.training.lr_warmup_iters == 0
    assert run.notices == [f"lr_warmup_iters 15 of {config} does not fit the 6-step LR schedule of the command "
                           "line: using 0 (15/150 of it, the config's ratio); set lr_warmup_iters=N to choose"]
    assert RunConfig.load(config, ["lr_decay_iters=12"]).training.lr_warmup_iters == 1
    assert RunConfig.load(config, ["train_iters=40"]).notices == []  # 15 < 40: kept
    with pytest.raises(ValueError, match="lr_warmup_iters 15 must be less than lr_decay_iters 6 .*: set "
                                         "lr_warmup_iters below it, or lr_decay_iters above it"):
        RunConfig.load(config, ["train_iters=6", "lr_warmup_iters=15"])  # the command line's own: refused
