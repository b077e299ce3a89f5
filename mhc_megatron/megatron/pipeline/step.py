"""One training step of GPT model chunks with megatron-core's DDP, optimizer and pipeline schedules.

The pieces a training loop needs around ``build_model_chunks``: ``wrap_with_ddp`` (megatron's DDP,
optionally for the distributed optimizer), ``build_optimizer``, ``forward_backward``, which runs
``get_forward_backward_func()`` over the micro-batches of one global batch (1F1B or interleaved
under pipeline parallelism, with the stream-sized pipeline buffers), and ``train_step``: that and
the optimizer step, skipped on every rank when a loss or gradient is non-finite on one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.megatron.parallel import local_device
from mhc_megatron.megatron.pipeline.buffers import stream_micro_batch_size
from mhc_megatron.megatron.pipeline.exchange_thread import pipeline_communicator
from mhc_megatron.megatron.pipeline.exchange_timing import P2PTimer
from mhc_megatron.megatron.pipeline.schedules import default_pg_collection, forward_backward_pipelining_overlapped


@dataclass
class MicroBatch:
    """Token ids ``[b, s]``, next-token labels ``[b, s]`` and the loss mask ``[b, s]``."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)


def wrap_with_ddp(
    model_chunks: list[torch.nn.Module], config: MhcTransformerConfig, use_distributed_optimizer: bool = False
) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(model_chunks)
    ]


def build_optimizer(model_chunks, lr: float, use_distributed_optimizer: bool = False, clip_grad: float = 1.0, **kwargs):
    """megatron's Adam (``OptimizerConfig`` fields may be passed in ``kwargs``)."""
    config = OptimizerConfig(
        optimizer="adam", lr=lr, clip_grad=clip_grad, use_distributed_optimizer=use_distributed_optimizer, **kwargs
    )
    return get_megatron_optimizer(config, model_chunks)


def _masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.float()
    loss = (per_token_loss.float() * mask).sum() / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def _per_token_loss(model, batch: MicroBatch) -> torch.Tensor:
    return model(batch.tokens, batch.position_ids, None, labels=batch.labels)


def gpt_forward_step(data_iterator, model):
    """``forward_step_func`` for megatron's schedules: per-token loss and its masked mean."""
    batch = next(data_iterator)
    return _per_token_loss(model, batch), partial(_masked_mean_loss, batch.loss_mask)


def gpt_loss(model, batch: MicroBatch) -> tuple[torch.Tensor, dict]:
    """Without a schedule (one stage, e.g. under DeepSpeed): the masked mean loss of ``batch``
    through the whole ``model`` and its record ``{"lm loss": detached copy}``, as the schedules give."""
    return _masked_mean_loss(batch.loss_mask, _per_token_loss(model, batch))


def forward_backward_function(config: MhcTransformerConfig):
    """The schedule for ``config``: megatron's (no pipelining, 1F1B, interleaved with or without
    ``overlap_p2p_comm``), or the overlapped 1F1B of ``schedules.py`` when ``overlap_p2p_comm`` is
    set without a virtual pipeline (megatron's 1F1B refuses the option)."""
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    if pipelined and config.overlap_p2p_comm and parallel_state.get_virtual_pipeline_model_parallel_world_size() is None:
        return forward_backward_pipelining_overlapped
    return get_forward_backward_func()


def run_schedule(
    model_chunks: list[torch.nn.Module],
    config: MhcTransformerConfig,
    micro_batches: list[MicroBatch],
    forward_step_func=gpt_forward_step,
    p2p_timer: P2PTimer | None = None,
    **schedule_kwargs,
) -> list:
    """Run the pipeline schedule of ``forward_backward_function(config)`` over ``micro_batches``,
    with one data iterator per model chunk and the stream-sized pipeline buffers. ``p2p_timer``, if
    given, records the time this rank spends blocked in stage-to-stage exchanges and when its last
    computation of the schedule ended (``exchange_timing.py``). Unless ``schedule_kwargs`` names a
    ``p2p_communicator``, the exchange goes through ``exchange_thread.pipeline_communicator``.
    ``schedule_kwargs`` (``forward_only``, ``collect_non_loss_data``, ...) go to the schedule."""
    iterators = [iter(micro_batches) for _ in model_chunks]
    micro_batch_size, seq_length = micro_batches[0].tokens.shape
    finalize = config.finalize_model_grads_func
    if parallel_state.get_pipeline_model_parallel_world_size() > 1 and "p2p_communicator" not in schedule_kwargs:
        communicator = pipeline_communicator(parallel_state.get_pipeline_model_parallel_group(), config, p2p_timer)
        if communicator is not None:
            schedule_kwargs.update(p2p_communicator=communicator, pg_collection=default_pg_collection())
        if p2p_timer is not None and finalize is not None:
            config.finalize_model_grads_func = p2p_timer.ending(finalize)
    try:
        return forward_backward_function(config)(
            forward_step_func=forward_step_func,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=stream_micro_batch_size(config, micro_batch_size),
            **schedule_kwargs,
        )
    finally:
        config.finalize_model_grads_func = finalize


def mean_loss(losses: list) -> float | None:
    """The loss of a schedule's run: the mean over its micro-batches (``losses``, what the schedule
    returned) and over the data-parallel ranks, on the last pipeline stage; ``None`` elsewhere."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    loss = torch.stack([entry["lm loss"] for entry in losses]).mean()
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return (loss / parallel_state.get_data_parallel_world_size()).item()


def forward_backward(
    model_chunks: list[torch.nn.Module],
    config: MhcTransformerConfig,
    micro_batches: list[MicroBatch],
    p2p_timer: P2PTimer | None = None,
) -> list:
    """A training step without its optimizer step: megatron's gradient buffers zeroed, then forward
    and backward over ``micro_batches`` with megatron's ``finalize_model_grads`` (``p2p_timer``: see
    ``run_schedule``). Returns what the schedule returned (one loss record per micro-batch)."""
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in model_chunks]
    if len(model_chunks) == 1:
        config.no_sync_func = config.no_sync_func[0]
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    return run_schedule(model_chunks, config, micro_batches, p2p_timer=p2p_timer, forward_only=False)


class StepOutcome(NamedTuple):
    """What ``train_step`` did: ``loss`` (the last pipeline stage's mean, else ``None``),
    ``grad_norm`` (the norm the optimizer clipped; ``None`` when skipped) and ``nonfinite``, the parts
    found non-finite on any rank (``"loss"``, ``"gradients"``); when it is not empty, every rank
    skipped the optimizer step."""

    loss: float | None
    grad_norm: float | None
    nonfinite: tuple[str, ...]


def nonfinite_parts(model_chunks: list[torch.nn.Module], losses: list) -> tuple[str, ...]:
    """Which of this step's loss (``losses``: the schedule's records, on the last stage) and reduced
    gradients (megatron's DDP gradient buffers) hold a NaN or infinity on any rank: one flag pair,
    all-reduced over the world, so that every rank decides the same."""
    def any_nonfinite(tensors) -> torch.Tensor:  # on the device: no synchronisation before the all-reduce
        finite = [torch.isfinite(tensor).all() for tensor in tensors]
        return ~torch.stack(finite).all() if finite else torch.tensor(False, device=local_device())

    buffers = [buffer.grad_data for chunk in model_chunks for buffer in (*chunk.buffers, *chunk.expert_parallel_buffers)]
    flags = torch.stack([any_nonfinite(entry["lm loss"] for entry in losses), any_nonfinite(buffers)]).float()
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return tuple(part for part, flag in zip(("loss", "gradients"), flags.tolist()) if flag)


def train_step(
    model_chunks: list[torch.nn.Module],
    optimizer,
    config: MhcTransformerConfig,
    micro_batches: list[MicroBatch],
    p2p_timer: P2PTimer | None = None,
) -> StepOutcome:
    """Forward and backward over ``micro_batches`` (this data-parallel rank's share), then the
    optimizer step unless the loss or a gradient is non-finite on any rank (``nonfinite_parts``):
    then no parameter or optimizer state changes (``forward_backward``; ``p2p_timer``: see
    ``run_schedule``). The loss is averaged over micro-batches and data-parallel ranks."""
    optimizer.zero_grad()
    losses = forward_backward(model_chunks, config, micro_batches, p2p_timer)
    nonfinite = nonfinite_parts(model_chunks, losses)
    grad_norm = None if nonfinite else optimizer.step()[1]
    return StepOutcome(mean_loss(losses), grad_norm, nonfinite)
