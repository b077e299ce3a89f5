"""Exposed pipeline communication: the wall time a rank spends blocked in stage-to-stage exchanges,
and how much of it is the transfer itself rather than waiting for a neighbour to compute.

``TimedP2PCommunicator`` is megatron-core's ``P2PCommunicator`` with every exchange timed: the time
inside each call (posting the sends and receives and, in a blocking schedule, waiting for them) and
the time inside every ``wait()`` of the request handles that a non-blocking call returns (waited
later, by megatron's interleaved schedule with ``overlap_p2p_comm`` or by
``schedules.forward_backward_pipelining_overlapped``). ``P2PTimer.seconds`` adds these blocked
intervals up: the communication that the schedule did not hide, the pipeline bubble included.

A blocked interval also contains the wait for data that the neighbour has not produced yet (the
bubble, and imbalance between stages), which no overlap can remove. To separate the two, every
message is stamped when each side posts it (the k-th send on a channel matches the k-th receive);
``exposed_transfer_seconds`` gathers the stamps of all pipeline ranks and counts, of each blocked
interval, only the part after both sides of all its messages were posted: the transfer the rank
waited for. The stamps use ``time.perf_counter`` (the monotonic clock, shared by the processes of
one machine), so this split is meaningful only with all pipeline ranks on one host.

What a rank waits for is not necessarily what the step waits for: a stage that is faster than its
neighbour waits for the neighbour's computation and then for the transfer, but that transfer delays
nothing if the stage is idle anyway. ``critical_path`` follows the step's critical path backwards
from the rank that ended its part of the schedule last (the end of its last computation, before the
gradients are finalised): along one rank's timeline while that rank was computing or waiting for a
transfer both sides had posted, and across to the neighbour where the rank waited for the neighbour
to post. The transfers on that path are the pipeline communication that lengthened the step.
"""

from __future__ import annotations

import bisect
import dataclasses
import time

import torch
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

# what a request key of megatron's exchange means: (sends?, toward the next stage?)
_REQUESTS = {
    "send_next": (True, True), "recv_prev": (False, False), "send_prev": (True, False), "recv_next": (False, True),
}


def requested(exchange: dict) -> list[str]:
    """The request keys that megatron's exchange returns for the arguments ``exchange`` of
    ``P2PCommunicator._communicate`` (``tensor_send_next``, ``tensor_send_prev``, ``recv_prev``,
    ``recv_next``), in ``_REQUESTS`` order."""
    present = {
        "send_next": exchange.get("tensor_send_next") is not None,
        "recv_prev": bool(exchange.get("recv_prev")),
        "send_prev": exchange.get("tensor_send_prev") is not None,
        "recv_next": bool(exchange.get("recv_next")),
    }
    return [name for name in _REQUESTS if present[name]]


class P2PTimer:
    """Blocked time in pipeline exchanges since ``reset``: ``seconds`` in all, ``calls`` and
    ``waits`` counted, and the intervals and message stamps behind ``exposed_transfer_seconds``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None  # the end of this rank's last computation in the schedule
        self.seconds = 0.0
        self.calls = 0
        self.waits = 0
        self.intervals: list[tuple[float, float, tuple]] = []  # (start, end, message keys)
        self.posts: dict[tuple, float] = {}  # message key -> when this rank posted its side
        self._sequence: dict[tuple, int] = {}

    def add(self, seconds: float, wait: bool) -> None:
        self.seconds += seconds
        if wait:
            self.waits += 1
        else:
            self.calls += 1

    def post(self, channel: tuple, when: float) -> tuple:
        """Stamp this rank's side of the next message on ``channel`` (sender, receiver, direction)."""
        sequence = self._sequence.get(channel, 0)
        self._sequence[channel] = sequence + 1
        key = (*channel, sequence)
        self.posts[key] = when
        return key

    def blocked(self, start: float, end: float, messages: tuple) -> None:
        self.intervals.append((start, end, messages))

    def ending(self, finalize):
        """``finalize`` (the schedule's ``finalize_model_grads_func``) that first stamps ``ended``."""

        def stamped(*args, **kwargs):
            self.ended = time.perf_counter()
            return finalize(*args, **kwargs)

        return stamped


@dataclasses.dataclass(frozen=True)
class Timeline:
    """One rank's record of one schedule run: ``started`` and ``ended`` (the end of its last
    computation), its blocked ``intervals`` ``(start, end, message keys)`` and ``posts`` (message
    key -> when this rank posted its side). A message key is ``(sender, receiver, toward next, k)``."""

    rank: int
    started: float
    ended: float
    intervals: list
    posts: dict


@dataclasses.dataclass(frozen=True)
class CriticalPath:
    """The step's critical path through a pipeline schedule: its length in ``seconds``, of which
    ``transfer_seconds`` were transfers that nothing on the path computed over, and the number of
    ``hops`` between ranks."""

    seconds: float
    transfer_seconds: float
    hops: int


def gather_timelines(timer: P2PTimer, group=None) -> list[Timeline]:
    """Every rank's ``Timeline`` of the run ``timer`` recorded since ``reset`` (a collective over
    ``group``, default all ranks: every rank must call it)."""
    mine = Timeline(
        rank=torch.distributed.get_rank(), started=timer.started,
        ended=timer.ended if timer.ended is not None else time.perf_counter(),
        intervals=list(timer.intervals), posts=dict(timer.posts),
    )
    everyone: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, mine, group=group)
    return everyone


def _last_posts(timelines: list[Timeline]) -> dict[tuple, tuple[float, int]]:
    """message key -> (when its last side was posted, by which rank), for messages both sides posted."""
    sides: dict[tuple, dict[int, float]] = {}
    for timeline in timelines:
        for key, when in timeline.posts.items():
            sides.setdefault(key, {})[timeline.rank] = when
    return {
        key: max((when, rank) for rank, when in posted.items())
        for key, posted in sides.items()
        if set(posted) == {key[0], key[1]}
    }


def exposed_transfer_seconds(timelines: list[Timeline], rank: int) -> float:
    """Of ``rank``'s blocked time, the part spent after both sides of the awaited messages were posted."""
    ready = _last_posts(timelines)
    (timeline,) = [t for t in timelines if t.rank == rank]
    exposed = 0.0
    for start, end, messages in timeline.intervals:
        posted = [ready[key][0] for key in messages if key in ready]
        exposed += max(0.0, end - max([start, *posted]))
    return exposed


def critical_path(timelines: list[Timeline]) -> CriticalPath:
    """Walk the critical path back from the rank that ended last (see the module docstring).

    In a blocked interval the path takes, of the messages both sides had posted before it ended,
    the one posted last (an interval with none only posted receives or sends: overhead, no
    transfer). If the other side posted it after the interval began, this rank was waiting for the
    neighbour: the transfer after that post is on the path, which continues on the neighbour from
    the moment it posted. Otherwise the rank waited for a transfer already under way: the rest of the
    wait is on the path (what an instant transfer would have saved), which continues on this rank
    before the interval."""
    ready = _last_posts(timelines)
    by_rank = {t.rank: sorted(t.intervals, key=lambda interval: interval[1]) for t in timelines}
    starts = {t.rank: t.started for t in timelines}
    last = max(timelines, key=lambda t: t.ended)
    rank, index = last.rank, len(by_rank[last.rank]) - 1
    transfer, hops = 0.0, 0
    while index >= 0 and by_rank[rank][index][0] >= starts[rank]:
        start, end, messages = by_rank[rank][index]
        posts = [ready[key] for key in messages if key in ready and ready[key][0] <= end]
        if not posts:
            index -= 1
            continue
        posted, poster = max(posts)
        if poster != rank and posted > start:
            transfer += max(0.0, end - posted)
            ends = [interval[1] for interval in by_rank[poster]]
            rank, index, hops = poster, bisect.bisect_right(ends, posted) - 1, hops + 1
        else:
            transfer += end - max(start, posted)
            index -= 1
    return CriticalPath(seconds=last.ended - starts[rank], transfer_seconds=transfer, hops=hops)


class _TimedRequest:
    """A request handle of ``torch.distributed`` whose ``wait`` is added to a ``P2PTimer``."""

    def __init__(self, request, timer: P2PTimer, messages: tuple) -> None:
        self._request, self._timer, self._messages = request, timer, messages

    def wait(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._request.wait(*args, **kwargs)
        finally:
            ended = time.perf_counter()
            self._timer.add(ended - started, wait=True)
            self._timer.blocked(started, ended, self._messages)

    def is_completed(self) -> bool:
        return self._request.is_completed()


class TimedP2PCommunicator(P2PCommunicator):
    """``P2PCommunicator`` whose exchanges, and the later waits on their handles, are timed."""

    def __init__(self, pp_group, config, timer: P2PTimer) -> None:
        super().__init__(pp_group=pp_group, config=config)
        self.timer = timer
        self.rank = torch.distributed.get_rank()

    def _stamp(self, kwargs: dict, when: float) -> dict[str, tuple]:
        messages = {}
        for name in requested(kwargs):
            sends, forward = _REQUESTS[name]
            peer = self.next_rank if forward else self.prev_rank
            # a channel is named by its sender, its receiver and the sender's direction
            channel = (self.rank, peer, forward) if sends else (peer, self.rank, not forward)
            messages[name] = self.timer.post(channel, when)
        return messages

    def _communicate(self, **kwargs):
        started = time.perf_counter()
        messages = self._stamp(kwargs, started)
        try:
            recv_prev, recv_next, requests = super()._communicate(**kwargs)
        finally:
            ended = time.perf_counter()
            self.timer.add(ended - started, wait=False)
            self.timer.blocked(started, ended, tuple(messages.values()))
        if isinstance(requests, dict):
            requests = {
                name: _TimedRequest(request, self.timer, (messages[name],) if name in messages else ())
                for name, request in requests.items()
            }
        elif isinstance(requests, list):
            requests = [_TimedRequest(request, self.timer, tuple(messages.values())) for request in requests]
        return recv_prev, recv_next, requests
