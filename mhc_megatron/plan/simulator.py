"""Discrete-event simulation of one pipeline-parallel training step.

Resources: each stage has one compute timeline that runs its tasks in the schedule's order; each
directed stage-to-stage link carries one transfer at a time (first come, first served). A task
starts when its stage is free and its inputs are there; a transfer of ``task``'s output to the stage
of its consumer takes ``Costs.transfer`` seconds. Two communication models:

- ``overlap=False``, blocking (megatron's 1F1B on one stream): a transfer starts only when the
  sender has produced the output *and* the receiver has reached the consuming task (finished the
  task before it), and both stages wait until it is done: the sender cannot start its next task
  before its sends complete, the receiver cannot start the consumer before the data is in. A
  stage's sends and receives between two tasks run at the same time (megatron batches them into
  one ``send_forward_recv_backward``). The interleaved schedule posts the receives of the next
  forward and the next backward together, so there the receiver is ready for either of its next
  two tasks.
- ``overlap=True``: a transfer starts as soon as the output exists and its link is free; compute
  continues, and only the consumer waits for the arrival.

``shared_cores`` models stages that share processors (CPU ranks on one machine): while k stages
compute at once, each progresses at ``min(1, shared_cores / k)`` of its own speed (processor
sharing). ``None``: every stage has its own device.

Accounting per stage over the pipeline part of the step (time 0 to the last task's end):
``busy`` = time spent computing; ``exposed_comm`` = the part of each wait before a task that is due
to communication beyond the pure data dependency, i.e. ``start - max(previous end, inputs produced)``;
``bubble`` = the rest of the idle time (waiting for inputs still being computed, warm-up and
cool-down). ``step_time`` = pipeline time + ``Costs.step_tail`` (optimizer and the like).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mhc_megatron.plan.schedule import Schedule, Task

_EPS = 1e-12


@dataclass(frozen=True)
class Costs:
    """Durations in seconds. ``compute(task, stage)``: the task's time with the stage to itself;
    ``transfer(task, src, dst)``: the time to move ``task``'s output from stage ``src`` to ``dst``
    (latency included); ``step_tail``: time after the last backward (optimizer step, gradient
    reduction), added to the step."""

    compute: Callable[[Task, int], float]
    transfer: Callable[[Task, int, int], float]
    step_tail: float = 0.0


@dataclass
class StageStats:
    busy: float = 0.0
    exposed_comm: float = 0.0
    bubble: float = 0.0


@dataclass
class Result:
    """What one simulated step gives: ``timeline`` holds (stage, task, start, end) of each task."""

    step_time: float
    pipeline_time: float
    stages: list[StageStats]
    timeline: list[tuple[int, Task, float, float]] = field(repr=False)

    @property
    def bubble_fraction(self) -> float:
        """Mean over stages of the bubble's share of the pipeline time."""
        return sum(s.bubble for s in self.stages) / (len(self.stages) * self.pipeline_time)

    @property
    def exposed_comm(self) -> float:
        """The largest per-stage exposed communication (s)."""
        return max(s.exposed_comm for s in self.stages)


@dataclass
class _Transfer:
    producer: Task
    consumer: Task
    src: int
    dst: int
    start: float | None = None
    end: float | None = None


def simulate(schedule: Schedule, costs: Costs, overlap: bool, shared_cores: float | None = None) -> Result:
    """Run ``schedule`` with ``costs``; see the module docstring for the model."""
    if shared_cores is not None and not shared_cores > 0:
        raise ValueError(f"shared_cores must be positive or None, got {shared_cores}")
    stages = schedule.stages
    position = [0] * stages  # index of each stage's next task
    running: dict[int, list] = {}  # stage -> [task, remaining work (s at full speed), start]
    last_end = [0.0] * stages
    produced: dict[Task, float] = {}  # task -> end time
    arrived: dict[Task, float] = {}  # consumer task -> arrival of its input
    pending: list[_Transfer] = []  # created, not started (blocking mode waits for the receiver)
    in_flight: list[_Transfer] = []
    link_free: dict[tuple[int, int], float] = {}
    sends_open = [0] * stages  # blocking: transfers the stage is still sending
    timeline, stats = [], [StageStats() for _ in range(stages)]
    consumer_of = _consumers(schedule)
    now = 0.0

    def at_task(stage: int) -> Task | None:
        order = schedule.orders[stage]
        return order[position[stage]] if position[stage] < len(order) and stage not in running else None

    window = 1 if schedule.chunks == 1 else 2

    def receiving(stage: int, task: Task) -> bool:
        """Blocking mode: the stage is between tasks and ``task`` is among the next ones it has posted
        receives for (the next task in 1F1B; the next forward and backward when interleaved)."""
        upcoming = schedule.orders[stage][position[stage]:position[stage] + window]
        return stage not in running and task in upcoming

    while True:
        progressed = True
        while progressed:  # start every transfer and task that can start now
            progressed = False
            for transfer in list(pending):
                if overlap or receiving(transfer.dst, transfer.consumer):
                    link = (transfer.src, transfer.dst)
                    transfer.start = max(now, link_free.get(link, 0.0))
                    transfer.end = transfer.start + costs.transfer(transfer.producer, transfer.src, transfer.dst)
                    link_free[link] = transfer.end
                    pending.remove(transfer)
                    in_flight.append(transfer)
                    progressed = True
            for transfer in [t for t in in_flight if t.end <= now + _EPS]:  # instant ones
                in_flight.remove(transfer)
                arrived[transfer.consumer] = transfer.end
                if not overlap:
                    sends_open[transfer.src] -= 1
                progressed = True
            for stage in range(stages):
                task = at_task(stage)
                if task is None or sends_open[stage] or not _inputs_ready(schedule, task, produced, arrived, now):
                    continue
                inputs = max((produced[d] for d in schedule.dependencies(task)), default=0.0)
                stats[stage].exposed_comm += max(0.0, now - max(last_end[stage], inputs))
                running[stage] = [task, costs.compute(task, stage), now]
                progressed = True
        rate = 1.0 if shared_cores is None else min(1.0, shared_cores / max(1, len(running)))
        events = [t.end for t in in_flight if t.end > now] + [now + r[1] / rate for r in running.values()]
        if not events:
            if any(position[s] < len(schedule.orders[s]) for s in range(stages)) or pending or in_flight:
                raise RuntimeError("the schedule deadlocks: no task or transfer can start")
            break
        step = min(events) - now
        now += step
        for stage, entry in list(running.items()):
            entry[1] -= step * rate
            if entry[1] > _EPS * max(1.0, now):
                continue
            task, _, start = running.pop(stage)
            produced[task] = last_end[stage] = now
            stats[stage].busy += now - start
            timeline.append((stage, task, start, now))
            position[stage] += 1
            for consumer in consumer_of.get(task, []):
                dst = schedule.stage_of(consumer.chunk)
                if dst != stage:
                    pending.append(_Transfer(task, consumer, stage, dst))
                    if not overlap:
                        sends_open[stage] += 1
    pipeline_time = now
    for stage in range(stages):
        stats[stage].bubble = pipeline_time - stats[stage].busy - stats[stage].exposed_comm
    return Result(pipeline_time + costs.step_tail, pipeline_time, stats, timeline)


def communication_cost(schedule: Schedule, costs: Costs, overlap: bool, shared_cores: float | None = None) -> float:
    """How much longer the step is than the same schedule with free, instant transfers (s)."""
    free = Costs(costs.compute, lambda task, src, dst: 0.0, costs.step_tail)
    return (simulate(schedule, costs, overlap, shared_cores).step_time
            - simulate(schedule, free, overlap, shared_cores).step_time)


def _consumers(schedule: Schedule) -> dict[Task, list[Task]]:
    consumers: dict[Task, list[Task]] = {}
    for order in schedule.orders:
        for task in order:
            for dependency in schedule.dependencies(task):
                consumers.setdefault(dependency, []).append(task)
    return consumers


def _inputs_ready(schedule: Schedule, task: Task, produced: dict, arrived: dict, now: float) -> bool:
    for dependency in schedule.dependencies(task):
        if dependency not in produced:
            return False
        same_stage = schedule.stage_of(dependency.chunk) == schedule.stage_of(task.chunk)
        if not same_stage and arrived.get(task, float("inf")) > now + _EPS:
            return False
    return True
