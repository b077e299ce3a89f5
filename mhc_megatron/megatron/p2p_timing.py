"""Exposed pipeline communication: the wall time a rank spends blocked in stage-to-stage exchanges.

``TimedP2PCommunicator`` is megatron-core's ``P2PCommunicator`` with every exchange timed: the time
inside each call (posting the sends and receives and, in a blocking schedule, waiting for them) and
the time inside every ``wait()`` of the request handles that a non-blocking call returns (waited
later, by megatron's interleaved schedule with ``overlap_p2p_comm`` or by
``schedules.forward_backward_pipelining_overlapped``). What it adds up is the communication the
schedule did not hide behind computation, including the wait for a neighbour that is still
computing (the pipeline bubble), for the blocking and the overlapped schedules alike.
"""

from __future__ import annotations

import time

from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator


class P2PTimer:
    """Seconds spent blocked in pipeline exchanges, and how many calls and waits, since ``reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.waits = 0

    def add(self, seconds: float, wait: bool) -> None:
        self.seconds += seconds
        if wait:
            self.waits += 1
        else:
            self.calls += 1


class _TimedRequest:
    """A request handle of ``torch.distributed`` whose ``wait`` is added to a ``P2PTimer``."""

    def __init__(self, request, timer: P2PTimer) -> None:
        self._request, self._timer = request, timer

    def wait(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._request.wait(*args, **kwargs)
        finally:
            self._timer.add(time.perf_counter() - started, wait=True)

    def is_completed(self) -> bool:
        return self._request.is_completed()


class TimedP2PCommunicator(P2PCommunicator):
    """``P2PCommunicator`` whose exchanges, and the later waits on their handles, are timed."""

    def __init__(self, pp_group, config, timer: P2PTimer) -> None:
        super().__init__(pp_group=pp_group, config=config)
        self.timer = timer

    def _communicate(self, **kwargs):
        started = time.perf_counter()
        try:
            recv_prev, recv_next, requests = super()._communicate(**kwargs)
        finally:
            self.timer.add(time.perf_counter() - started, wait=False)
        if isinstance(requests, dict):
            requests = {key: _TimedRequest(request, self.timer) for key, request in requests.items()}
        elif isinstance(requests, list):
            requests = [_TimedRequest(request, self.timer) for request in requests]
        return recv_prev, recv_next, requests
