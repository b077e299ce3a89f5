"""Every settable key of the run configuration is consumed or refused; the tests walk all of them.

A key is consumed when it reaches:

- megatron's process groups, if it is one of ``parallel_state.initialize_model_parallel``'s sizes
  (``mhc-train`` must hand it over, or megatron's groups and its config disagree);
- megatron-core's ``TransformerConfig``, for megatron-core's own fields, and megatron-core's source
  reads it (a field that nothing reads would do nothing);
- our code, for our fields and the training settings: ``CONSUMERS`` names the function that reads
  each one, and the test parses that function to see it do so.

Otherwise it is in ``training.config.REFUSED_KEYS``: any value but its default is an error that
names the key, the value and the reason. A key added later (to our config, to ``TrainingArguments``
or by a megatron-core upgrade) that is none of these fails ``test_every_key_has_a_destination``.
"""

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import megatron.core
import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

import mhc_megatron
from mhc_megatron.training import config as run_config
from mhc_megatron.training.config import ALL_KEYS, MODEL_KEYS, REFUSED_KEYS, TRAINING_KEYS, RunConfig

MEGATRON_FIELDS = {field.name for field in dataclasses.fields(TransformerConfig)}
OUR_KEYS = (set(MODEL_KEYS) - MEGATRON_FIELDS) | set(TRAINING_KEYS)

# Where each of our keys is read: "module:qualified name" of the function (or property) that uses it.
CONSUMERS = {
    "hc_mode": "mhc_megatron.megatron.model.adapters:MegatronHyperConnection.__init__",
    "num_streams": "mhc_megatron.megatron.model.transformer_config:MhcTransformerConfig.stream_count",
    "sinkhorn_iters": "mhc_megatron.megatron.model.adapters:MegatronHyperConnection.__init__",
    "hc_alpha_init": "mhc_megatron.megatron.model.adapters:MegatronHyperConnection.__init__",
    "hc_eps": "mhc_megatron.megatron.model.adapters:MegatronHyperConnection.__init__",
    "hc_collapse": "mhc_megatron.megatron.model.adapters:MegatronStreamCollapse.__init__",
    "mhc_recompute": "mhc_megatron.megatron.model.specs:get_hyper_connection_block_spec",
    "mhc_recompute_block": "mhc_megatron.megatron.model.specs:get_hyper_connection_block_spec",
    "mhc_recompute_rebuild": "mhc_megatron.megatron.model.specs:get_hyper_connection_block_spec",
    "mhc_post_res_high_priority_stream": "mhc_megatron.megatron.model.layer:HyperConnectionTransformerLayer.__init__",
    "pipeline_extra_warmup": "mhc_megatron.megatron.pipeline.schedules:forward_backward_pipelining_overlapped",
    "pipeline_bf16_transfer": "mhc_megatron.megatron.model.layer:HyperConnectionTransformerLayer.forward",
    "pipeline_exchange_thread": "mhc_megatron.megatron.pipeline.exchange_thread:pipeline_communicator",
    "train_iters": "mhc_megatron.training.builders:build_data",
    "exit_interval": "mhc_megatron.training.arguments:TrainingArguments.last_step",
    "exit_signal": "mhc_megatron.training.loop:train",
    "exit_duration_in_mins": "mhc_megatron.training.loop:train",
    "max_consecutive_skips": "mhc_megatron.training.loop:Trainer._check_divergence",
    "distributed_timeout_minutes": "mhc_megatron.training.loop:train",
    "micro_batch_size": "mhc_megatron.training.builders:build_data",
    "global_batch_size": "mhc_megatron.training.builders:build_data",
    "seq_length": "mhc_megatron.training.builders:build_model",
    "max_position_embeddings": "mhc_megatron.training.builders:build_model",
    "seed": "mhc_megatron.training.loop:Trainer.step",
    "data_path": "mhc_megatron.training.builders:build_data",
    "data_dir": "mhc_megatron.training.builders:build_data",
    "split": "mhc_megatron.training.builders:build_data",
    "tokenizer": "mhc_megatron.training.builders:build_data",
    "lr": "mhc_megatron.training.builders:build_training_optimizer",
    "min_lr": "mhc_megatron.training.builders:build_training_optimizer",
    "lr_warmup_iters": "mhc_megatron.training.builders:build_lr_scheduler",
    "lr_decay_iters": "mhc_megatron.training.arguments:TrainingArguments.decay_iters",
    "lr_decay_style": "mhc_megatron.training.builders:build_lr_scheduler",
    "weight_decay": "mhc_megatron.training.builders:build_training_optimizer",
    "adam_beta1": "mhc_megatron.training.builders:build_training_optimizer",
    "adam_beta2": "mhc_megatron.training.builders:build_training_optimizer",
    "adam_eps": "mhc_megatron.training.builders:build_training_optimizer",
    "clip_grad": "mhc_megatron.training.builders:build_training_optimizer",
    "use_distributed_optimizer": "mhc_megatron.training.builders:build_training_optimizer",
    "eval_interval": "mhc_megatron.training.builders:build_data",
    "eval_iters": "mhc_megatron.training.loop:Trainer.step",
    "log_interval": "mhc_megatron.training.loop:Trainer.step",
    "gain_profile_interval": "mhc_megatron.training.loop:Trainer.step",
    "save": "mhc_megatron.training.loop:Trainer.run",
    "save_interval": "mhc_megatron.training.loop:Trainer.run",
    "load": "mhc_megatron.training.loop:Trainer._checkpoint_to_load",
    "finetune": "mhc_megatron.training.loop:Trainer._checkpoint_to_load",
    "run_dir": "mhc_megatron.training.loop:Trainer.__init__",
    "wandb": "mhc_megatron.training.loop:Trainer.run",
    "wandb_project": "mhc_megatron.training.loop:Trainer.run",
    "position_embedding_type": "mhc_megatron.training.builders:build_model",
    "untie_embeddings_and_output_weights": "mhc_megatron.training.builders:build_model",
    "swiglu": "mhc_megatron.training.config:RunConfig.transformer_config",
    "make_vocab_size_divisible_by": "mhc_megatron.training.builders:build_data",
    "engine": "mhc_megatron.training.loop:build_engine",
    "zero_stage": "mhc_megatron.training.arguments:TrainingArguments.deepspeed_zero_stage",
}

# initialize_model_parallel arguments named otherwise than the config field they stand for (its
# docstring: "Maps to the dataclass field ModelParallelConfig.gtp_weight_remat_size", ...).
RENAMED_GROUP_ARGUMENTS = {"gtp_weight_remat_size": "gtp_remat_size", "expert_gtp_weight_remat_size": "expert_gtp_remat_size"}

# A value other than the default for each refused key.
REFUSED_SAMPLES = {
    "fp16": True,
    "context_parallel_size": 2,
    "hierarchical_context_parallel_sizes": [2, 1],
    "hybrid_context_parallel": True,
    "cp_comm_type": "p2p",
    "max_seqlen_per_dp_cp_rank": 64,
    "tensor_parallel_num_weight_shards": 2,
    "gtp_weight_remat_size": 2,
    "expert_tensor_parallel_num_weight_shards": 2,
    "expert_gtp_weight_remat_size": 2,
    "apply_residual_connection_post_layernorm": True,
    "cuda_graph_use_single_mempool": False,
    "inference_rng_tracker": True,
    "moe_deepep_num_sms": 8,
    "moe_hybridep_num_sms": 8,
    "moe_per_layer_logging": True,
    "moe_token_dropping": True,
    "mtp_hybrid_override_pattern": "M*",
    "tp_comm_bootstrap_backend": "mpi",
    "use_grouped_gemm_for_dense_mlp": True,
    "use_inference_optimized_layers": True,
    "use_te_rng_tracker": True,
}

SMALL = ["num_layers=4", "hidden_size=32", "num_attention_heads=4", "seq_length=16", "micro_batch_size=1"]


def group_keys() -> dict[str, str]:
    """Settable keys that size megatron's process groups -> their ``initialize_model_parallel`` argument."""
    arguments = inspect.signature(parallel_state.initialize_model_parallel).parameters
    keys = {name: name for name in arguments if name in ALL_KEYS}
    keys.update({key: argument for key, argument in RENAMED_GROUP_ARGUMENTS.items() if argument in arguments})
    return keys


@pytest.fixture(scope="module")
def names_read() -> set[str]:
    """Every attribute name that megatron-core's or our source reads (``x.name``, ``getattr(x, "name")``)."""
    names = set()
    for root in (Path(megatron.core.__file__).parent, Path(mhc_megatron.__file__).parent):
        for path in root.rglob("*.py"):
            text = path.read_text()
            names.update(re.findall(r"\.([A-Za-z_]\w*)", text))
            names.update(re.findall(r"""getattr\(\s*[\w.]+\s*,\s*["']([A-Za-z_]\w*)["']""", text))
    return names


def _resolve(consumer: str):
    module, _, qualified = consumer.partition(":")
    target = importlib.import_module(module)
    for part in qualified.split("."):
        target = getattr(target, part)
    return target.fget if isinstance(target, property) else target


def reads(consumer: str, key: str) -> bool:
    """Whether the function ``consumer`` reads the attribute ``key`` (``x.key`` not called as a
    method, or ``getattr(x, "key", ...)``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(_resolve(consumer))))
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == key and isinstance(node.ctx, ast.Load):
            if id(node) not in called:
                return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value == key):
            return True
    return False


def test_every_key_has_a_destination():
    """Each key is refused, sizes megatron's groups, is megatron-core's, or has a consumer of ours."""
    homeless = sorted(
        key for key in ALL_KEYS
        if key not in REFUSED_KEYS and key not in group_keys() and key not in MEGATRON_FIELDS and key not in CONSUMERS
    )
    assert not homeless, f"keys that reach no code and are not refused (wire them or refuse them): {homeless}"


def test_consumers_name_settable_keys_that_are_not_refused():
    assert not set(CONSUMERS) - OUR_KEYS, f"consumers of keys that are not settable: {set(CONSUMERS) - OUR_KEYS}"
    assert not set(CONSUMERS) & set(REFUSED_KEYS)


@pytest.mark.parametrize("key", sorted(CONSUMERS))
def test_each_consumer_reads_its_key(key):
    consumer = CONSUMERS[key]
    function_name = consumer.rpartition(".")[2].rpartition(":")[2]
    assert not function_name.startswith("_validate") and function_name != "__post_init__", (
        f"{consumer} only validates {key!r}: name where it is used"
    )
    assert reads(consumer, key), f"{consumer} does not read {key!r}"


def test_megatron_keys_are_read_by_megatron_core_or_refused(names_read):
    unread = sorted(
        key for key in MODEL_KEYS
        if key in MEGATRON_FIELDS and key not in REFUSED_KEYS and key not in names_read
    )
    assert not unread, f"megatron-core fields that nothing reads (refuse them in REFUSED_KEYS): {unread}"


def test_keys_refused_as_unread_are_still_unread(names_read):
    """A megatron-core upgrade that starts reading a refused key makes its refusal stale."""
    stale = sorted(key for key, why in REFUSED_KEYS.items() if "reads it nowhere" in why and key in names_read)
    assert not stale, f"refused as unread, but read now: {stale}"


def test_model_keys_reach_the_transformer_config(monkeypatch):
    """Every model key that is not refused goes to ``MhcTransformerConfig`` with the value set."""
    values = {key: object() for key in MODEL_KEYS if key not in REFUSED_KEYS}
    received = {}
    monkeypatch.setattr(run_config, "MhcTransformerConfig", lambda **fields: received.update(fields))
    RunConfig(run_config.TrainingArguments(), dict(values)).transformer_config()
    lost = sorted(key for key, value in values.items() if received.get(key) is not value)
    assert not lost, f"model keys that do not reach MhcTransformerConfig as set: {lost}"


def test_group_sizes_reach_megatrons_process_groups(monkeypatch, tmp_path):
    """``train`` hands every process-group key that is not refused to ``initialize_model_parallel``."""
    from mhc_megatron.training.loop import train

    values = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
              "virtual_pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2,
              "expert_tensor_parallel_size": 1, "pipeline_model_parallel_comm_backend": "ucc",
              "distributed_timeout_minutes": 2.0}
    wired = {key: argument for key, argument in group_keys().items() if key not in REFUSED_KEYS}
    assert set(values) == set(wired), "give every process-group key that is not refused a value here"
    run = RunConfig.load(None, [*SMALL, "num_moe_experts=2", "sequence_parallel=true", f"run_dir={tmp_path}",
                                *(f"{key}={value}" for key, value in values.items())])
    calls = []

    class Stop(Exception):
        pass

    def initialize_model_parallel(**arguments):
        calls.append(arguments)
        raise Stop

    monkeypatch.setattr(parallel_state, "initialize_model_parallel", initialize_model_parallel)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "8")  # the sizes are checked against it first: TP 2 x PP 2 x DP 2
    with pytest.raises(Stop):
        train(run)
    (arguments,) = calls
    assert {key: arguments.get(argument) for key, argument in wired.items()} == values


def test_refused_keys_have_samples():
    assert set(REFUSED_SAMPLES) == set(REFUSED_KEYS)


@pytest.mark.parametrize("key", sorted(REFUSED_KEYS))
def test_refused_keys_name_the_key_the_value_and_the_reason(key):
    value = REFUSED_SAMPLES[key]
    with pytest.raises(ValueError) as error:
        RunConfig.from_mapping({key: value}, where="the test")
    assert f"config key {key}={value!r} in the test is refused: {REFUSED_KEYS[key]}" in str(error.value)


@pytest.mark.parametrize("key", sorted(REFUSED_KEYS))
def test_refused_keys_may_keep_their_default(key):
    default = TransformerConfig.__dataclass_fields__[key].default
    assert RunConfig.from_mapping({key: default}).model == {key: default}


def test_context_parallelism_is_refused_because_it_needs_transformer_engine():
    with pytest.raises(ValueError, match=r"context_parallel_size=2 in the overrides is refused: megatron-core "
                                         r"0.19.2 runs context parallelism only inside Transformer Engine's attention"):
        RunConfig.load(None, ["context_parallel_size=2"])
