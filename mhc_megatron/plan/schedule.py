"""Pipeline schedules as ordered task lists, one list per stage.

The model is cut into ``stages x chunks`` consecutive model chunks; global chunk ``g`` lives on stage
``g % stages`` (megatron's interleaved layout: stage r holds chunks r, r + stages, ...). A task is the
forward (``F``) or backward (``B``) pass of one micro-batch through one chunk. The orders follow
megatron-core's ``forward_backward_pipelining_without_interleaving`` (1F1B: ``stages - rank - 1``
warm-up forwards, then one forward one backward, then the cool-down backwards) and
``..._with_interleaving`` (warm-up of ``(stages - rank - 1) * 2 + (chunks - 1) * stages`` forwards,
micro-batches taken in groups of ``stages`` per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """The forward (``kind='F'``) or backward (``kind='B'``) of ``micro_batch`` through global chunk ``chunk``."""

    kind: str
    micro_batch: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}.{self.chunk}"


@dataclass(frozen=True)
class Schedule:
    """Per-stage task orders of one training step; ``orders[r]`` is stage r's list."""

    stages: int
    chunks: int
    micro_batches: int
    orders: tuple[tuple[Task, ...], ...]

    @property
    def total_chunks(self) -> int:
        return self.stages * self.chunks

    def stage_of(self, chunk: int) -> int:
        return chunk % self.stages

    def dependencies(self, task: Task) -> list[Task]:
        """The tasks whose output ``task`` consumes: the previous chunk's forward, the next chunk's
        backward, or, for the last chunk's backward, its own forward."""
        if task.kind == "F":
            return [Task("F", task.micro_batch, task.chunk - 1)] if task.chunk > 0 else []
        if task.chunk == self.total_chunks - 1:
            return [Task("F", task.micro_batch, task.chunk)]
        return [Task("B", task.micro_batch, task.chunk + 1)]


def one_f_one_b(stages: int, micro_batches: int) -> Schedule:
    """Megatron's non-interleaved 1F1B schedule."""
    _check(stages, 1, micro_batches)
    orders = []
    for rank in range(stages):
        warmup = min(stages - rank - 1, micro_batches)
        order = [Task("F", i, rank) for i in range(warmup)]
        for i in range(micro_batches - warmup):
            order += [Task("F", warmup + i, rank), Task("B", i, rank)]
        order += [Task("B", i, rank) for i in range(micro_batches - warmup, micro_batches)]
        orders.append(tuple(order))
    return Schedule(stages, 1, micro_batches, tuple(orders))


def interleaved(stages: int, chunks: int, micro_batches: int) -> Schedule:
    """Megatron's interleaved 1F1B with ``chunks`` virtual stages per stage (micro-batches a multiple
    of ``stages``, as megatron requires)."""
    _check(stages, chunks, micro_batches)
    if chunks == 1:
        return one_f_one_b(stages, micro_batches)
    if micro_batches % stages:
        raise ValueError(
            f"interleaved schedule: micro-batches ({micro_batches}) must be a multiple of the pipeline stages ({stages})"
        )
    total = micro_batches * chunks

    def forward(k: int, rank: int) -> Task:
        group, within = divmod(k, stages * chunks)
        local = within // stages
        return Task("F", group * stages + within % stages, local * stages + rank)

    def backward(k: int, rank: int) -> Task:
        group, within = divmod(k, stages * chunks)
        local = chunks - 1 - within // stages
        return Task("B", group * stages + within % stages, local * stages + rank)

    orders = []
    for rank in range(stages):
        warmup = min((stages - rank - 1) * 2 + (chunks - 1) * stages, total)
        order = [forward(k, rank) for k in range(warmup)]
        for k in range(total - warmup):
            order += [forward(warmup + k, rank), backward(k, rank)]
        order += [backward(k, rank) for k in range(total - warmup, total)]
        orders.append(tuple(order))
    return Schedule(stages, chunks, micro_batches, tuple(orders))


def build(stages: int, chunks: int, micro_batches: int) -> Schedule:
    """1F1B for one chunk per stage, interleaved for more."""
    return one_f_one_b(stages, micro_batches) if chunks == 1 else interleaved(stages, chunks, micro_batches)


def _check(stages: int, chunks: int, micro_batches: int) -> None:
    for name, value in (("pipeline stages", stages), ("virtual stages per stage", chunks), ("micro-batches", micro_batches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
