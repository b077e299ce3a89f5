"""Stage-to-stage exchanges posted from a communication thread (gloo, i.e. CPU training).

On GPUs, NCCL's non-blocking send returns at once: the copy engines and the NIC move the data while
the stage computes. gloo's send instead writes what the socket takes into the kernel's buffer in
the calling thread (docs/pipeline.md measures how long that takes) and only the rest goes on in
gloo's own thread. In an overlapped schedule that copy sits between two computations of the stage,
so the transfer is only partly hidden.

``ThreadedP2PCommunicator`` is megatron-core's ``P2PCommunicator`` whose exchanges are all posted,
in call order, by one communication thread per process: the CPU counterpart of posting on a
communication stream. A non-blocking call allocates its receive buffers in the caller's thread,
hands the posting to the thread and returns at once with handles whose ``wait`` waits for the post
and then for the transfer; a blocking call waits for both before it returns. One thread posting
everything in call order keeps the order of the messages on each channel, which is how gloo pairs
sends with receives. The data sent and received is the same, so results are bitwise unchanged.

It carries the exchange of fixed-shape tensors posted one by one (megatron's ``_p2p_ops``): not
``batch_p2p_comm``, ``use_ring_exchange_p2p`` or the shape exchange of ``variable_seq_lengths`` /
``mtp_standalone`` (refused at construction).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator, _p2p_ops

from mhc_megatron.megatron.pipeline.exchange_timing import P2PTimer, TimedP2PCommunicator, requested

_UNSUPPORTED = ("batch_p2p_comm", "use_ring_exchange_p2p", "variable_seq_lengths", "mtp_standalone")


def _posting_thread() -> ThreadPoolExecutor:
    """This process's one communication thread (posts run in submission order); a forked child
    gets its own, since threads do not survive a fork."""
    return _thread_of_process(os.getpid())


@functools.cache
def _thread_of_process(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mhc-p2p-{pid}")


class _PostedRequest:
    """The request ``name`` of an exchange the communication thread posts: ``wait`` waits for the
    post, then for the transfer."""

    def __init__(self, posted: Future, name: str) -> None:
        self._posted, self._name = posted, name

    def wait(self, *args, **kwargs):
        return self._posted.result()[self._name].wait(*args, **kwargs)

    def is_completed(self) -> bool:
        return self._posted.done() and self._posted.result()[self._name].is_completed()


class ThreadedP2PCommunicator(P2PCommunicator):
    """``P2PCommunicator`` whose sends and receives are posted by a communication thread (see the
    module docstring). Same methods, arguments and results."""

    def __init__(self, pp_group, config) -> None:
        super().__init__(pp_group=pp_group, config=config)
        for field in _UNSUPPORTED:
            if getattr(config, field, False):
                raise ValueError(f"the threaded pipeline exchange does not support {field}=True")

    def _buffer(self, shape) -> torch.Tensor:
        if self.config.pipeline_dtype is None:
            raise RuntimeError("pipeline_dtype must be set to receive pipeline tensors")
        if shape is None:
            raise RuntimeError("tensor_shape must be given to receive pipeline tensors")
        return torch.empty(shape, requires_grad=True, device=torch.cuda.current_device(),
                           dtype=self.config.pipeline_dtype)

    def _communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev: bool, recv_next: bool,
                     tensor_shape, wait_on_reqs: bool = True):
        tensor_recv_prev = self._buffer(tensor_shape) if recv_prev else None
        tensor_recv_next = self._buffer(tensor_shape) if recv_next else None
        posted = _posting_thread().submit(
            _p2p_ops, tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
            tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next, group=self.pp_group,
            prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank,
        )
        names = requested(dict(tensor_send_next=tensor_send_next, tensor_send_prev=tensor_send_prev,
                               recv_prev=recv_prev, recv_next=recv_next))
        requests = {name: _PostedRequest(posted, name) for name in names}
        if wait_on_reqs:
            for request in requests.values():
                request.wait()
            requests = None
        return tensor_recv_prev, tensor_recv_next, requests


class TimedThreadedP2PCommunicator(TimedP2PCommunicator, ThreadedP2PCommunicator):
    """The threaded exchange, timed as ``TimedP2PCommunicator`` times megatron's (``exchange_timing.py``):
    the calls return once the posting is handed over, and the waits include the posting."""


def pipeline_communicator(pp_group, config, timer: P2PTimer | None = None) -> P2PCommunicator | None:
    """The communicator for a pipeline schedule: threaded for an overlapped exchange over gloo when
    ``config.pipeline_exchange_thread`` (see the module docstring), timed when ``timer`` is given;
    ``None`` (megatron's default) when neither applies."""
    threaded = (config.overlap_p2p_comm and getattr(config, "pipeline_exchange_thread", False)
                and torch.distributed.get_backend(pp_group) == "gloo")
    if timer is not None:
        return (TimedThreadedP2PCommunicator if threaded else TimedP2PCommunicator)(pp_group, config, timer)
    return ThreadedP2PCommunicator(pp_group, config) if threaded else None
