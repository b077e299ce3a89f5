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
"""

from __future__ import annotations

import time

import torch
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

# what a request key of megatron's exchange means: (sends?, toward the next stage?)
_REQUESTS = {
    "send_next": (True, True), "recv_prev": (False, False), "send_prev": (True, False), "recv_next": (False, True),
}


class P2PTimer:
    """Blocked time in pipeline exchanges since ``reset``: ``seconds`` in all, ``calls`` and
    ``waits`` counted, and the intervals and message stamps behind ``exposed_transfer_seconds``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
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


def exposed_transfer_seconds(timer: P2PTimer, group=None) -> float:
    """Of this rank's blocked time, the part spent after both sides of the awaited messages were
    posted (a collective over ``group``, default all ranks: every rank must call it)."""
    everyone: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, timer.posts, group=group)
    posted: dict[tuple, list[float]] = {}
    for posts in everyone:
        for key, when in posts.items():
            posted.setdefault(key, []).append(when)
    exposed = 0.0
    for start, end, messages in timer.intervals:
        ready = [max(posted[key]) for key in messages if len(posted.get(key, ())) == 2]
        exposed += max(0.0, end - max([start, *ready]))
    return exposed


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
        present = {
            "send_next": kwargs.get("tensor_send_next") is not None,
            "send_prev": kwargs.get("tensor_send_prev") is not None,
            "recv_prev": bool(kwargs.get("recv_prev")),
            "recv_next": bool(kwargs.get("recv_next")),
        }
        messages = {}
        for name, (sends, forward) in _REQUESTS.items():
            if present[name]:
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
