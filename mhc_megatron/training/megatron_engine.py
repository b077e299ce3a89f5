"""The ``megatron`` training engine: megatron-core's DDP (or distributed optimizer), Adam and pipeline
schedules over the run's model chunks, with dist-checkpointing checkpoints (``checkpoints.py``).

An engine is what ``loop.Trainer`` drives; ``deepspeed_engine.DeepSpeedEngine`` is the other one.
Both offer: ``name``, ``description`` (for the start-up line), ``chunks`` (the model's modules, for
evaluation mode and the mapping recorder), ``optimizer`` and ``scheduler`` (megatron's LR schedule
over the optimizer's parameter groups), ``train_step(micro_batches, p2p_timer) -> StepOutcome``,
``forward_only(micro_batches)`` (the loss records of a forward pass), ``save(save_dir, iteration,
train_state)`` and ``load(directory)`` (a full resume: weights, optimizer, saved train state).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mhc_megatron.megatron.model.checkpointing import load_checkpoint
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.megatron.pipeline.exchange_timing import P2PTimer
from mhc_megatron.megatron.pipeline.step import MicroBatch, StepOutcome, run_schedule, train_step, wrap_with_ddp
from mhc_megatron.training.builders import build_lr_scheduler, build_training_optimizer
from mhc_megatron.training.checkpoints import save_training_checkpoint
from mhc_megatron.training.config import RunConfig


class MegatronEngine:
    name = "megatron"

    def __init__(self, run: RunConfig, config: MhcTransformerConfig, chunks: list[torch.nn.Module]) -> None:
        self.config = config
        self.chunks = wrap_with_ddp(chunks, config, run.training.use_distributed_optimizer)
        self.optimizer = build_training_optimizer(run, config, self.chunks)
        self.scheduler = build_lr_scheduler(run, self.optimizer)
        self.description = "megatron" + (" (distributed optimizer)" if run.training.use_distributed_optimizer else "")

    def train_step(self, micro_batches: list[MicroBatch], p2p_timer: P2PTimer | None = None) -> StepOutcome:
        return train_step(self.chunks, self.optimizer, self.config, micro_batches, p2p_timer)

    def forward_only(self, micro_batches: list[MicroBatch]) -> list:
        return run_schedule(self.chunks, self.config, micro_batches, forward_only=True)

    def save(self, save_dir: str | Path, iteration: int, train_state: dict) -> Path:
        return save_training_checkpoint(save_dir, iteration, self.chunks, self.optimizer, self.config, train_state)

    def load(self, directory: Path) -> dict:
        return load_checkpoint(self.chunks, self.config, directory, optimizer=self.optimizer)
