"""NCCL's ordering of point-to-point operations, emulated over gloo: a schedule that would hang on
GPUs hangs on CPU too, and says where.

gloo runs every ``isend``/``irecv`` on its own, so a pipeline schedule whose exchanges cannot be
matched in order passes on CPU and deadlocks on its first step under NCCL. ``nccl_ordering()``
replaces ``torch.distributed``'s ``isend``, ``irecv``, ``batch_isend_irecv`` and ``P2POp`` (what
megatron's ``p2p_communication`` and ``exchange_thread.py`` call) by operations that follow the
strict reading of NCCL's rules (../shared/docs/nccl-semantics.md has the sources):

1. **One queue per peer.** On each rank, the operations with one peer start in the order they were
   issued, each once the one before it has finished: ProcessGroupNCCL runs a pair's point-to-point
   operations on one communicator and one stream. Operations issued on different process groups
   (megatron sends one direction on the world group at pipeline size 2) share the queue too, since
   two streams give no guarantee of progressing independently.
2. **A receive holds its queue until its data has arrived.**
3. **A send holds its queue until the peer has started the matching receive** (NCCL may block a
   send so; small messages often complete without it, which is how such schedules pass small tests
   and hang at scale).
4. **A batched group (``batch_isend_irecv``, ncclGroupStart/End) is one operation:** it starts when it
   has reached the head of the queue of every peer it involves, its sends and receives progress
   together, and it holds those queues until all of them have finished.

The data travels over gloo (a process group of its own, with tags for the data and for the "receive
started" notices of rule 3), so results are bitwise those of the plain exchange.

An operation that holds its queue, or a wait that lasts, longer than ``timeout`` seconds is taken
for a deadlock: the rank prints what each of its queues holds (the operation at the head and what it
waits for, and what is queued behind it) and the wait raises ``PipelineDeadlock`` naming the
operation. Every rank of a deadlock reports, so the failure names all the ranks and operations
involved.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_READY_TAG, _DATA_TAG = 71, 72  # gloo tags: rule 3's "receive started" notices, and the tensors


class PipelineDeadlock(RuntimeError):
    """A point-to-point operation did not complete within the emulation's timeout."""


@dataclass(eq=False)
class _Transfer:
    """One send or receive of this rank with ``peer``: the ``index``-th operation issued towards it."""

    kind: str  # "send" or "recv"
    tensor: torch.Tensor
    peer: int
    index: int
    batch: int | None  # the batched group it belongs to
    issuer: str  # where in the caller's code it was issued
    waiting_for: str = "its turn in the queue"
    started_at: float | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> str:
        direction = "to" if self.kind == "send" else "from"
        batch = "" if self.batch is None else f" in batched group {self.batch}"
        return (f"#{self.index} {self.kind} {direction} rank {self.peer} {list(self.tensor.shape)} "
                f"{self.tensor.dtype}{batch} (issued by {self.issuer})")

    def status(self, now: float) -> str:
        if self.done.is_set():
            return "done"
        if self.started_at is None:
            return "queued"
        return f"holds the queue for {now - self.started_at:.1f} s, waiting for {self.waiting_for}"


class _Batch:
    """A batched group's rendezvous of its per-peer parts: all start together, all finish together."""

    def __init__(self, parts: int) -> None:
        self._started = threading.Barrier(parts)
        self._finished = threading.Barrier(parts)

    def start(self) -> None:
        self._started.wait()

    def finish(self) -> None:
        self._finished.wait()


class _PeerQueue:
    """The queue of this rank's operations with one peer, run in issue order by one thread."""

    def __init__(self, peer: int, group) -> None:
        self.peer, self.group = peer, group
        self.transfers: list[_Transfer] = []  # issued and not yet done, for reports
        self._entries: queue.SimpleQueue = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"nccl-ordering-peer-{peer}", daemon=True)
        self._thread.start()

    def put(self, transfers: list[_Transfer], batch: _Batch | None) -> None:
        self.transfers.extend(transfers)
        self._entries.put((transfers, batch))

    def close(self) -> None:
        self._entries.put(None)

    def _run(self) -> None:
        while (entry := self._entries.get()) is not None:
            transfers, batch = entry
            try:
                if self._failure is not None:
                    raise RuntimeError(f"an earlier operation with rank {self.peer} failed") from self._failure
                if batch is not None:
                    batch.start()
                self._exchange(transfers)
                if batch is not None:
                    batch.finish()
            except BaseException as error:  # reported to the waiter of each transfer
                self._failure = self._failure or error
                for transfer in transfers:
                    transfer.error = error
            for transfer in transfers:
                transfer.done.set()
                self.transfers.remove(transfer)

    def _exchange(self, transfers: list[_Transfer]) -> None:
        """Run ``transfers`` together: notices for the receives first, then each send once its
        matching receive has started, then the receives' data."""
        now = time.monotonic()
        for transfer in transfers:
            transfer.started_at = now
            transfer.waiting_for = (f"rank {self.peer} to start the matching receive" if transfer.kind == "send"
                                    else f"the data from rank {self.peer}")
        notice = torch.zeros(1, dtype=torch.uint8)
        works = [_isend(notice, self.peer, group=self.group, tag=_READY_TAG)
                 for transfer in transfers if transfer.kind == "recv"]
        for transfer in transfers:
            if transfer.kind == "send":
                _irecv(torch.empty(1, dtype=torch.uint8), self.peer, group=self.group, tag=_READY_TAG).wait()
                transfer.waiting_for = f"rank {self.peer} to take the data"
                works.append(_isend(transfer.tensor, self.peer, group=self.group, tag=_DATA_TAG))
        works += [_irecv(transfer.tensor, self.peer, group=self.group, tag=_DATA_TAG)
                  for transfer in transfers if transfer.kind == "recv"]
        for work in works:
            work.wait()


class _Request:
    """What ``isend``/``irecv``/``batch_isend_irecv`` return: ``wait`` waits for the transfer, within
    the emulation's timeout."""

    def __init__(self, transfer: _Transfer, ordering: "NcclOrdering") -> None:
        self._transfer, self._ordering = transfer, ordering

    def wait(self, timeout=None) -> bool:
        self._ordering.wait_for(self._transfer)
        return True

    def is_completed(self) -> bool:
        return self._transfer.done.is_set()


class _P2POp:
    """``torch.distributed.P2POp`` under the emulation: the same fields, for ``batch_isend_irecv``."""

    def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None) -> None:
        self.op, self.tensor, self.peer, self.group, self.tag, self.group_peer = op, tensor, peer, group, tag, group_peer


_isend, _irecv = dist.isend, dist.irecv  # the real (gloo) operations that carry the data

# Frames that only pass an operation on (torch, megatron's communicator and its decorators, ours,
# thread pools): the issuer named in reports is the first frame outside them.
_PASSING_ON = (__file__, os.path.dirname(dist.__file__), os.path.join("megatron", "core", "utils.py"),
               "p2p_communication.py", "exchange_thread.py", "exchange_timing.py", "concurrent", "threading.py")


def _issuer() -> str:
    frame = sys._getframe(1)
    while frame is not None and any(part in frame.f_code.co_filename for part in _PASSING_ON):
        frame = frame.f_back
    if frame is None:
        return f"thread {threading.current_thread().name}"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


def _global_rank(rank, group, group_rank) -> int:
    if (rank is None) == (group_rank is None):
        raise ValueError("give exactly one of the peer's global rank and its rank in the group")
    return rank if rank is not None else dist.get_global_rank(group, group_rank)


class NcclOrdering:
    """The emulation (see the module docstring); use it through ``nccl_ordering()``."""

    def __init__(self, timeout: float, grace: float) -> None:
        self.timeout, self.grace = timeout, grace
        self.rank = dist.get_rank()
        self._group = dist.new_group(backend="gloo")  # collective: every rank installs at the same point
        self._queues: dict[int, _PeerQueue] = {}
        self._issued: dict[int, itertools.count] = {}  # per peer: the index of the next operation
        self._batches = itertools.count()
        self._lock = threading.Lock()
        self._reported = False
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="nccl-ordering-watchdog", daemon=True)
        self._watchdog.start()

    # -- the replaced torch.distributed functions (NCCL has no tags: they are ignored) -------------
    def isend(self, tensor, dst=None, group=None, tag=0, group_dst=None) -> _Request:
        return self._issue([("send", tensor, _global_rank(dst, group, group_dst))])[0]

    def irecv(self, tensor, src=None, group=None, tag=0, group_src=None) -> _Request:
        return self._issue([("recv", tensor, _global_rank(src, group, group_src))])[0]

    def batch_isend_irecv(self, p2p_op_list) -> list[_Request]:
        kinds = {self.isend: "send", _isend: "send", self.irecv: "recv", _irecv: "recv"}
        operations = []
        for op in p2p_op_list:
            if op.op not in kinds:
                raise ValueError(f"batch_isend_irecv takes isend and irecv operations, got {op.op!r}")
            operations.append((kinds[op.op], op.tensor, _global_rank(op.peer, op.group, op.group_peer)))
        return self._issue(operations, batched=True)

    def _issue(self, operations, batched: bool = False) -> list[_Request]:
        with self._lock:
            for kind, tensor, peer in operations:
                if peer == self.rank:
                    raise ValueError(f"rank {self.rank} cannot {kind} to itself")
                if tensor.device.type != "cpu":
                    raise ValueError(f"the NCCL ordering emulation exchanges CPU tensors, got one on {tensor.device}")
            batch_number = next(self._batches) if batched else None
            issuer = _issuer()
            transfers = [_Transfer(kind, tensor, peer, self._next_index(peer), batch_number, issuer)
                         for kind, tensor, peer in operations]
            by_peer: dict[int, list[_Transfer]] = {}
            for transfer in transfers:
                by_peer.setdefault(transfer.peer, []).append(transfer)
            batch = _Batch(len(by_peer)) if batched else None
            for peer, peer_transfers in by_peer.items():
                self._queue(peer).put(peer_transfers, batch)
        return [_Request(transfer, self) for transfer in transfers]

    def _next_index(self, peer: int) -> int:
        return next(self._issued.setdefault(peer, itertools.count()))

    def _queue(self, peer: int) -> _PeerQueue:
        if peer not in self._queues:
            self._queues[peer] = _PeerQueue(peer, self._group)
        return self._queues[peer]

    # -- waiting and reporting ---------------------------------------------------------------------
    def wait_for(self, transfer: _Transfer) -> None:
        if not transfer.done.wait(self.timeout):
            self.report(f"waits for {transfer.describe()}")
            time.sleep(self.grace)  # the other ranks of the deadlock report theirs meanwhile
            raise PipelineDeadlock(
                f"rank {self.rank}: {transfer.describe()} did not complete within {self.timeout:g} s: under "
                f"NCCL's ordering this exchange deadlocks; rank {self.rank}'s queues:\n{self.queues_report()}"
            )
        if transfer.error is not None:
            raise RuntimeError(f"rank {self.rank}: {transfer.describe()} failed") from transfer.error

    def queues_report(self) -> str:
        now = time.monotonic()
        lines = []
        for peer, peer_queue in sorted(self._queues.items()):
            pending = list(peer_queue.transfers)
            lines.append(f"  with rank {peer}:" + ("" if pending else " nothing pending"))
            lines += [f"    {transfer.describe()}: {transfer.status(now)}" for transfer in pending]
        return "\n".join(lines)

    def report(self, what: str) -> None:
        """Print, once, that this rank is stuck (``what``) and what its queues hold."""
        with self._lock:
            if self._reported:
                return
            self._reported = True
        sys.stderr.write(f"NCCL ordering: rank {self.rank} is stuck: it {what}; its queues:\n{self.queues_report()}\n")
        sys.stderr.flush()

    def _watch(self) -> None:
        """Report an operation that has held its queue longer than the timeout, even when no wait is
        on it (the rank may be stuck elsewhere, in a collective)."""
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            now = time.monotonic()
            for peer_queue in list(self._queues.values()):
                for transfer in list(peer_queue.transfers):
                    if transfer.started_at is not None and now - transfer.started_at > self.timeout:
                        self.report(f"has {transfer.describe()} at the head of its queue with rank {transfer.peer}")

    def close(self) -> None:
        """Stop the queues' threads once what they hold is done (a wait raised before, if it is not)."""
        self._stop.set()
        for peer_queue in self._queues.values():
            peer_queue.close()


@contextlib.contextmanager
def nccl_ordering(timeout: float = 30.0, grace: float = 2.0):
    """Within the block, point-to-point operations follow NCCL's ordering (module docstring). All
    ranks must enter together (it creates a process group). ``timeout``: seconds after which an
    operation that has not completed is a deadlock; ``grace``: seconds a rank that detected one waits
    before raising, so that the other ranks report theirs."""
    ordering = NcclOrdering(timeout, grace)
    replaced = {name: getattr(dist, name) for name in ("isend", "irecv", "batch_isend_irecv", "P2POp")}
    dist.isend, dist.irecv, dist.batch_isend_irecv, dist.P2POp = (
        ordering.isend, ordering.irecv, ordering.batch_isend_irecv, _P2POp)
    try:
        yield ordering
    finally:
        for name, function in replaced.items():
            setattr(dist, name, function)
        ordering.close()
