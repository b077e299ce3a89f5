"""One flat configuration for a run: a YAML file plus ``key=value`` overrides.

Keys are megatron-core's ``TransformerConfig`` field names (``num_layers``, ``hidden_size``,
``tensor_model_parallel_size``, ``bf16``, ...), the hyper-connection fields of
``MhcTransformerConfig`` (``hc_mode``, ``num_streams``, ...) and the run's own settings
(``TrainingArguments``: ``train_iters``, ``lr``, ``save``, ...). An unknown key, or a value of the
wrong type, is an error that names it (and the closest valid key). ``RunConfig.to_yaml`` writes the
resolved configuration, which loads back as a config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mhc_megatron.megatron.model.specs import resolve_backend
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.training.arguments import TrainingArguments

# Set by the trainer from other keys (bf16, the device); not settable in a config.
_DERIVED_MODEL_FIELDS = {"params_dtype", "pipeline_dtype", "autocast_dtype"}


# Written to every resolved config, set or not: what a reader of a run directory asks first.
SUMMARY_MODEL_FIELDS = (
    "hc_mode", "num_streams", "sinkhorn_iters", "hc_alpha_init", "hc_eps", "hc_collapse",
    "mhc_recompute", "mhc_recompute_block", "mhc_recompute_rebuild", "overlap_p2p_comm", "pipeline_extra_warmup",
    "pipeline_exchange_thread", "pipeline_bf16_transfer", "mhc_post_res_high_priority_stream",
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_moe_experts", "bf16",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size", "sequence_parallel", "recompute_granularity", "transformer_impl",
)

_CONTEXT_PARALLEL = (
    "megatron-core 0.19.2 runs context parallelism only inside Transformer Engine's attention (its local "
    "DotProductAttention asserts context_parallel_size == 1), and mhc-train neither builds context-parallel "
    "process groups nor splits its batches along the sequence"
)
_WEIGHT_SHARDING = (
    "generalized tensor parallelism (weights sharded beyond tensor_model_parallel_size and gathered again "
    "in every pass) needs its own process groups, which mhc-train does not build"
)
_UNREAD = (
    "megatron-core 0.19.2 reads it nowhere (Megatron-LM's training script does, which mhc-train replaces), "
    "so it would do nothing"
)
_UNREAD_MEGATRON_FIELDS = (
    "apply_residual_connection_post_layernorm", "cuda_graph_use_single_mempool", "inference_rng_tracker",
    "moe_deepep_num_sms", "moe_hybridep_num_sms", "moe_per_layer_logging", "moe_token_dropping",
    "mtp_hybrid_override_pattern", "tp_comm_bootstrap_backend", "use_grouped_gemm_for_dense_mlp",
    "use_inference_optimized_layers", "use_te_rng_tracker",
)

# Settable keys that mhc-train cannot honour, with the reason: any value but the field's default is
# an error (tests/training/test_config_keys.py walks every key: each is consumed or refused here).
REFUSED_KEYS: dict[str, str] = {
    "fp16": "fp16 needs loss scaling, which mhc-train does not do; use bf16: true",
    **dict.fromkeys(
        ("context_parallel_size", "hierarchical_context_parallel_sizes", "hybrid_context_parallel",
         "cp_comm_type", "max_seqlen_per_dp_cp_rank"),
        _CONTEXT_PARALLEL,
    ),
    **dict.fromkeys(
        ("tensor_parallel_num_weight_shards", "gtp_weight_remat_size", "expert_tensor_parallel_num_weight_shards",
         "expert_gtp_weight_remat_size"),
        _WEIGHT_SHARDING,
    ),
    **dict.fromkeys(_UNREAD_MEGATRON_FIELDS, _UNREAD),
}

# Keys that configs once had, with what to do instead (a run directory's config.yaml may hold them).
REMOVED_KEYS: dict[str, str] = {
    "hc_expand": "the embedding is always copied into the n streams (the key's only value was 'copy'); "
    "delete the key",
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; configs mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _is_settable(annotation) -> bool:
    """Whether a config field of this type can be written in YAML (scalars, lists, literals)."""
    origin = typing.get_origin(annotation)
    if annotation in (int, float, str, bool, type(None), list):
        return True
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType, list, tuple):
        return all(_is_settable(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)
    return False


def _accepts(annotation, value) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list:
        return isinstance(value, list)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
        return isinstance(value, list) and all(any(_accepts(a, item) for a in args) for item in value)
    return False


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


MODEL_KEYS: dict[str, Any] = {
    name: annotation
    for name, annotation in _field_types(MhcTransformerConfig).items()
    if name not in _DERIVED_MODEL_FIELDS and _is_settable(annotation)
}
TRAINING_KEYS: dict[str, Any] = _field_types(TrainingArguments)
ALL_KEYS: dict[str, Any] = {**MODEL_KEYS, **TRAINING_KEYS}


def _unknown_key_error(key: str, where: str) -> ValueError:
    if key in REMOVED_KEYS:
        return ValueError(f"config key {key!r} in {where} was removed: {REMOVED_KEYS[key]}")
    close = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else " (see docs/training.md for the keys)"
    return ValueError(f"unknown config key {key!r} in {where}{hint}")


def _field_default(key: str):
    """The default of the model config field ``key``."""
    (field_,) = (f for f in dataclasses.fields(MhcTransformerConfig) if f.name == key)
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default


def _check_not_refused(key: str, value, where: str) -> None:
    """A key of ``REFUSED_KEYS`` may only be set to its default."""
    if key in REFUSED_KEYS and value != _field_default(key):
        raise ValueError(
            f"config key {key}={value!r} in {where} is refused: {REFUSED_KEYS[key]} "
            f"(leave it at its default, {_field_default(key)!r})"
        )


def _typed(key: str, value, where: str):
    annotation = ALL_KEYS[key]
    if not _accepts(annotation, value):
        expected = getattr(annotation, "__name__", str(annotation).replace("typing.", ""))
        raise ValueError(f"config key {key!r} in {where} must be {expected}, got {value!r}")
    if annotation is float and isinstance(value, int):
        return float(value)
    return value


def parse_override(text: str):
    """``key=value`` -> ``(key, value)``, the value read as YAML (``true``, ``1e-3``, ``[a, b]``, ``null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} must have the form key=value")
    return key.strip(), yaml.load(raw, Loader=_Loader) if raw.strip() else ""


def _fit_warmup_to_shortened_run(values: dict[str, Any], from_file: dict[str, Any], overridden: set[str],
                                 path) -> str | None:
    """When the command line shortened the LR schedule (``train_iters`` or ``lr_decay_iters``) below
    the warm-up that the config file sets, scale the warm-up with the schedule (the file's ratio of
    warm-up to decay, kept below the new decay length) instead of refusing the run; returns the
    notice that says so, else ``None``. A warm-up set on the command line is never changed."""
    warmup = from_file.get("lr_warmup_iters")
    if "lr_warmup_iters" in overridden or not {"train_iters", "lr_decay_iters"} & overridden:
        return None

    def decay_iters(mapping) -> Any:
        decay = mapping.get("lr_decay_iters")
        return decay if decay is not None else mapping.get("train_iters", TrainingArguments.train_iters)

    decay, file_decay = decay_iters(values), decay_iters(from_file)
    if not all(isinstance(x, int) for x in (warmup, decay, file_decay)) or not 1 <= decay <= warmup < file_decay:
        return None
    fitted = min(warmup * decay // file_decay, decay - 1)
    values["lr_warmup_iters"] = fitted
    return (
        f"lr_warmup_iters {warmup} of {path} does not fit the {decay}-step LR schedule of the command line: "
        f"using {fitted} ({warmup}/{file_decay} of it, the config's ratio); set lr_warmup_iters=N to choose"
    )


@dataclass
class RunConfig:
    """The run's settings (``training``), the model config's fields set by the user (``model``) and
    the adjustments ``load`` made to them, one line each (``notices``, for the job to print)."""

    training: TrainingArguments
    model: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "the config") -> RunConfig:
        training, model = {}, {}
        for key, value in values.items():
            if key not in ALL_KEYS:
                raise _unknown_key_error(key, where)
            value = _typed(key, value, where)
            _check_not_refused(key, value, where)
            (training if key in TRAINING_KEYS else model)[key] = value
        return cls(TrainingArguments(**training), model)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
        """The config of ``path`` (YAML mapping; ``None``: defaults only) with ``overrides`` applied."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"config file {str(path)!r} does not exist")
            try:
                loaded = yaml.load(path.read_text(), Loader=_Loader)
            except yaml.YAMLError as error:
                raise ValueError(f"config file {str(path)!r} is not valid YAML: {error}") from error
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}")
            values.update(loaded or {})
        from_file, overridden = dict(values), set()
        for text in overrides:
            key, value = parse_override(text)
            if key not in ALL_KEYS:
                raise _unknown_key_error(key, f"override {text!r}")
            values[key] = value
            overridden.add(key)
        notice = _fit_warmup_to_shortened_run(values, from_file, overridden, path)
        run = cls.from_mapping(values, where=str(path) if path is not None else "the overrides")
        run.notices += [notice] if notice else []
        return run

    def transformer_config(self) -> MhcTransformerConfig:
        """``MhcTransformerConfig`` of the model: dtypes from ``bf16`` (the pipeline's also from
        ``pipeline_bf16_transfer``), CPU initialisation without CUDA,
        ``transformer_impl`` Transformer Engine when importable (else ``local``) unless set."""
        model = dict(self.model)
        model.setdefault("transformer_impl", resolve_backend("auto"))
        dtype = torch.bfloat16 if model.get("bf16") else torch.float32
        model.setdefault("use_cpu_initialization", not torch.cuda.is_available())
        if self.training.swiglu:
            model.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu, bias_activation_fusion=False)
        transfer = torch.bfloat16 if model.get("pipeline_bf16_transfer") else dtype
        return MhcTransformerConfig(**model, params_dtype=dtype, pipeline_dtype=transfer)

    def to_mapping(self) -> dict[str, Any]:
        """Every training setting, plus the model fields the config sets and ``SUMMARY_MODEL_FIELDS``,
        as the model config resolved them (a mapping that loads back as the same config)."""
        config = self.transformer_config()
        model = {}
        for name in (*SUMMARY_MODEL_FIELDS, *self.model):
            value = getattr(config, name)
            model[name] = list(value) if isinstance(value, tuple) else value
        return {**model, **dataclasses.asdict(self.training)}

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_mapping(), sort_keys=True))
