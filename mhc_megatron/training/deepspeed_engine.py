"""The ``deepspeed`` training engine: the same megatron-core GPT (TP = PP = 1) trained by
``deepspeed.initialize`` with ZeRO stage 1, 2 or 3 (``zero_stage``), DeepSpeed's own checkpoints.

What stays as in the ``megatron`` engine (``megatron_engine.py``, whose docstring lists what an
engine offers), so that the two train the same run the same way:

- the optimizer: torch's AdamW (DeepSpeed's ``AdamW`` with ``torch_adam``; megatron-core uses the
  same class on machines without Apex / Transformer Engine), over megatron-core's own parameter
  groups: no weight decay on biases and one-dimensional parameters (``wd_mult`` 0), which in the
  hyper-connections are ``alpha`` and ``bias`` (``phi`` and the HC weights decay);
- the LR and weight-decay schedule: megatron's ``OptimizerParamScheduler``, stepped by the trainer;
- the loss: the masked mean per micro-batch, averaged over micro-batches (DeepSpeed's gradient
  accumulation) and data-parallel ranks; gradients clipped to ``clip_grad`` by their global norm;
- bf16: the model is built in bf16 and ``Float16Module``-wrapped as in the megatron path, DeepSpeed
  keeps the fp32 master weights.

Non-finite steps: DeepSpeed's ZeRO optimizers skip a step whose gradient norm is not finite (bf16:
with ``check_grad_overflow``, which we set); the engine reports such a step as skipped, naming the
loss when it was non-finite on any rank.

Checkpoints: ``SAVE/iter_0000100/`` is DeepSpeed's checkpoint of tag ``iter_0000100`` (model states,
ZeRO partitions per data-parallel rank) plus ``deepspeed.json`` (this module's record: the
architecture, the ZeRO stage and the data-parallel size). It is written as
``iter_0000100.partial`` and renamed once every rank saved, then ``latest`` (DeepSpeed's tracker, for
its tools such as ``zero_to_fp32.py``) and ``latest_checkpointed_iteration.txt`` (ours) name it:
the same guarantees as the megatron engine's checkpoints (``checkpoints.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from pathlib import Path

import torch
from megatron.core.optimizer import OptimizerConfig, _get_param_groups, get_standard_config_overrides

from mhc_megatron.megatron.model.checkpointing import architecture_record, check_architecture
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.megatron.pipeline.exchange_timing import P2PTimer
from mhc_megatron.megatron.pipeline.step import MicroBatch, StepOutcome, gpt_loss, mean_loss
from mhc_megatron.training.builders import build_lr_scheduler
from mhc_megatron.training.checkpoint_files import DEEPSPEED_RECORD, DEEPSPEED_TRACKER, iteration_directory
from mhc_megatron.training.checkpoints import save_iteration
from mhc_megatron.training.config import RunConfig

_NEVER_PRINT = 1 << 30  # DeepSpeed's own progress line (steps_per_print): the trainer logs every step


def deepspeed_config(run: RunConfig, config: MhcTransformerConfig, data_parallel: int) -> dict:
    """The DeepSpeed configuration of ``run`` (written to ``run_dir/deepspeed_config.json``)."""
    args = run.training
    return {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.global_batch_size // (args.micro_batch_size * data_parallel),
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.deepspeed_zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": args.lr,
                "betas": [args.adam_beta1, args.adam_beta2],
                "eps": args.adam_eps,
                "weight_decay": args.weight_decay,
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": bool(config.bf16), "check_grad_overflow": True},
        "data_types": {"grad_accum_dtype": "fp32"},  # megatron's DDP accumulates and reduces in fp32 too
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }


def _put_ninja_on_path() -> None:
    """On CPU, DeepSpeed compiles its shared-memory all-reduce at its first start (cached in
    ``~/.cache/torch_extensions``) with ninja, which it looks up on ``PATH``: when no ninja is there,
    use the one the ``deepspeed`` extra installed beside this interpreter (a venv that is not
    activated is not on ``PATH``)."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts) is not None:
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])


def optimizer_param_groups(chunks: list[torch.nn.Module], run: RunConfig) -> list[dict]:
    """megatron-core's parameter groups of ``chunks`` for the run's optimizer settings: the same
    groups, ``wd_mult`` (0 for biases and 1-D parameters) and LR bounds as megatron's optimizer."""
    args = run.training
    optimizer_config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay)
    groups = _get_param_groups(chunks, optimizer_config, get_standard_config_overrides(optimizer_config))
    return [group for group in groups if group["params"]]


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, run: RunConfig, config: MhcTransformerConfig, chunks: list[torch.nn.Module],
                 data_parallel: int) -> None:
        _put_ninja_on_path()
        import deepspeed

        (chunk,) = chunks
        self.config, self.data_parallel = config, data_parallel
        self.zero_stage = run.training.deepspeed_zero_stage
        self.description = f"deepspeed (ZeRO stage {self.zero_stage})"
        self.settings = deepspeed_config(run, config, data_parallel)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=chunk,
            model_parameters=optimizer_param_groups(chunks, run),
            config=self.settings,
            dist_init_required=False,
        )
        self.chunks = [self.engine.module]
        self.scheduler = build_lr_scheduler(run, self.optimizer)

    def train_step(self, micro_batches: list[MicroBatch], p2p_timer: P2PTimer | None = None) -> StepOutcome:
        """Forward and backward of every micro-batch, DeepSpeed's step at the last (the gradient
        accumulation boundary). ``p2p_timer`` is unused (no pipeline)."""
        records = []
        for micro_batch in micro_batches:
            loss, record = gpt_loss(self.engine, micro_batch)
            self.engine.backward(loss)
            self.engine.step()
            records.append(record)
        if self.engine.was_step_applied():  # the same on every rank: ZeRO all-reduces its overflow check
            return StepOutcome(mean_loss(records), self.engine.get_global_grad_norm(), ())
        nonfinite_loss = torch.stack([~torch.isfinite(record["lm loss"]) for record in records]).any().float()
        torch.distributed.all_reduce(nonfinite_loss, op=torch.distributed.ReduceOp.MAX)
        return StepOutcome(mean_loss(records), None, ("loss", "gradients") if nonfinite_loss.item() else ("gradients",))

    def forward_only(self, micro_batches: list[MicroBatch]) -> list:
        return [gpt_loss(self.engine, micro_batch)[1] for micro_batch in micro_batches]

    def save(self, save_dir: str | Path, iteration: int, train_state: dict) -> Path:
        """DeepSpeed's checkpoint of every rank, with this module's record, saved as iteration
        ``iteration`` (``checkpoints.save_iteration``); DeepSpeed's ``latest`` is advanced with ours."""

        def write(partial: Path) -> None:
            self.engine.save_checkpoint(str(save_dir), tag=partial.name, client_state={"train_state": train_state},
                                        save_latest=False)  # ends with a barrier: every rank has written
            if torch.distributed.get_rank() == 0:
                record = {"mhc": architecture_record(self.config), "zero_stage": self.zero_stage,
                          "data_parallel_size": self.data_parallel, "iteration": iteration}
                (partial / DEEPSPEED_RECORD).write_text(json.dumps(record, indent=1) + "\n")

        name = iteration_directory(save_dir, iteration).name
        return save_iteration(save_dir, iteration, write, other_trackers={DEEPSPEED_TRACKER: name})

    def load(self, directory: Path) -> dict:
        """Resume from DeepSpeed checkpoint ``directory`` (weights, ZeRO optimizer state, train
        state), after checking it was saved by this architecture, ZeRO stage and data-parallel size."""
        record = read_deepspeed_record(directory, self.config)
        for key, value in (("zero_stage", self.zero_stage), ("data_parallel_size", self.data_parallel)):
            if record.get(key) != value:
                raise ValueError(
                    f"checkpoint {str(directory)!r} was saved with {key}={record.get(key)!r}, this run has "
                    f"{key}={value}: DeepSpeed resumes ZeRO's optimizer partitions only with the same ones "
                    "(finetune=true loads the weights alone)"
                )
        loaded, client_state = self.engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {str(directory)!r}")
        return client_state["train_state"]


def read_deepspeed_record(directory: Path, config: MhcTransformerConfig) -> dict:
    """The record ``DeepSpeedEngine.save`` wrote into ``directory``, after checking its architecture
    against ``config`` (a ``ValueError`` names the field that differs)."""
    try:
        record = json.loads((Path(directory) / DEEPSPEED_RECORD).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint {str(directory)!r}: cannot read its {DEEPSPEED_RECORD}: {error}") from error
    check_architecture(record.get("mhc"), config, directory)
    return record


def load_deepspeed_weights(chunks: list[torch.nn.Module], config: MhcTransformerConfig, directory: Path) -> None:
    """Load the weights of DeepSpeed checkpoint ``directory`` (any ZeRO stage, consolidated in fp32 by
    DeepSpeed's ``zero_to_fp32``) into the unwrapped model ``chunks``; every parameter must be there
    with its shape."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    read_deepspeed_record(directory, config)
    if len(chunks) != 1 or config.tensor_model_parallel_size != 1:
        raise ValueError(
            f"checkpoint {str(directory)!r} holds whole DeepSpeed weights, which load into one model without tensor "
            "or pipeline parallelism: set tensor_model_parallel_size and pipeline_model_parallel_size to 1"
        )
    state = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
    (chunk,) = chunks
    parameters = dict(chunk.named_parameters())
    for name, parameter in parameters.items():
        saved = state.get(name)
        if saved is None:
            raise ValueError(f"checkpoint {str(directory)!r} has no tensor {name!r}")
        if tuple(saved.shape) != tuple(parameter.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(saved.shape)}, the model expects {tuple(parameter.shape)}"
            )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])
