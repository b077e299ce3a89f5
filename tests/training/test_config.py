"""The run configuration: keys, types, overrides, the resolved YAML, and the shipped configs."""

from pathlib import Path

import pytest

from mhc_megatron.training.config import RunConfig, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", ["residual", "hc", "mhc"])
def test_shipped_configs_build_their_model_config(path, mode):
    config = RunConfig.load(path, [f"hc_mode={mode}"]).transformer_config()
    assert config.hc_mode == mode


def test_the_shipped_configs_are_the_ones_documented():
    assert [p.stem for p in CONFIGS] == ["gpt-1.3b", "gpt-125m", "moe-3b", "tiny-cpu"]


def test_overrides_are_read_as_yaml_values():
    assert parse_override("lr=1e-3") == ("lr", 1e-3)
    assert parse_override("bf16=true") == ("bf16", True)
    assert parse_override("save=null") == ("save", None)
    assert parse_override("recompute_modules=[core_attn, mlp]") == ("recompute_modules", ["core_attn", "mlp"])
    with pytest.raises(ValueError, match="must have the form key=value"):
        parse_override("lr")


def test_overrides_replace_the_file_and_ints_become_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nnum_layers: 2\n")
    run = RunConfig.load(path, ["num_layers=6", "lr=1"])
    assert run.training.lr == 1.0 and isinstance(run.training.lr, float)
    assert run.model["num_layers"] == 6


@pytest.mark.parametrize(
    "override, message",
    [
        ("hiden_size=64", "unknown config key 'hiden_size' in override 'hiden_size=64'; did you mean 'hidden_size'?"),
        ("zzz=1", "unknown config key 'zzz'"),
        ("num_layers=2.5", "config key 'num_layers' in the overrides must be int, got 2.5"),
        ("bf16=yes please", "config key 'bf16' in the overrides must be bool"),
        ("hc_mode=mhx", "hc_mode must be one of 'residual', 'hc', 'mhc', got 'mhx'"),
        ("lr_decay_style=step", "lr_decay_style must be one of"),
        ("global_batch_size=7", "global_batch_size 7 must be a multiple of micro_batch_size 2"),
        ("params_dtype=bf16", "unknown config key 'params_dtype'"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        RunConfig.load(None, ["micro_batch_size=2", override]).transformer_config()


def test_a_removed_key_says_what_to_do():
    with pytest.raises(ValueError, match=r"config key 'hc_expand' in override 'hc_expand=copy' was removed: the "
                                         r"embedding is always copied into the n streams .*; delete the key"):
        RunConfig.load(None, ["hc_expand=copy"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RunConfig.load(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping of keys, got list"):
        RunConfig.load(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        RunConfig.load(tmp_path / "bad.yaml")


def test_the_resolved_config_loads_back_as_the_same_config(tmp_path):
    run = RunConfig.load(CONFIGS[-1], ["recompute_granularity=selective", "recompute_modules=[core_attn]"])
    run.to_yaml(tmp_path / "config.yaml")
    again = RunConfig.load(tmp_path / "config.yaml")
    assert again.to_mapping() == run.to_mapping()
    assert again.to_mapping()["tensor_model_parallel_size"] == 1  # written though the file does not set it
