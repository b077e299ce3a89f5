"""When a run should save and stop before its last step: a signal (Slurm sends one before the time
limit with ``sbatch --signal``, ``scancel --signal`` sends one now, a preempting scheduler sends
SIGTERM) or its time budget (``exit_duration_in_mins``, counted from the start of ``train``).

The signal may reach one rank, some or all, at any moment of a step; the handler only notes it.
``ExitRequests.reason()``, called by every rank after every step, all-reduces the notes, so every
rank stops after the same step and the checkpoint it saves is one step of one run.
"""

from __future__ import annotations

import signal
import time

import torch

from mhc_megatron.megatron.parallel import local_device

# What mhc-train exits with after saving because of a signal or its time budget: EX_TEMPFAIL, the
# BSD convention for "try again later"; the run resumes from the checkpoint it saved (load=).
EXIT_STATUS = 75


def signal_number(name: str) -> signal.Signals:
    """The signal ``name`` (``"SIGTERM"``, ``"SIGUSR1"``, ...) names; an error names the allowed ones."""
    uncatchable = ("SIGKILL", "SIGSTOP")
    if name not in signal.Signals.__members__ or name in uncatchable:
        allowed = sorted(set(signal.Signals.__members__) - set(uncatchable))
        raise ValueError(f"exit_signal must name a signal that can be caught ({', '.join(allowed)}), got {name!r}")
    return signal.Signals[name]


class ExitRequests:
    """Notes ``exit_signal`` (a signal name, or ``None``: none is handled) while the run is inside the
    ``with`` block, and the time budget of ``duration_mins`` (``None``: none) from ``started``
    (``time.monotonic()``)."""

    def __init__(self, exit_signal: str | None, duration_mins: float | None, started: float) -> None:
        self.signal = signal_number(exit_signal) if exit_signal else None
        self.deadline = started + 60.0 * duration_mins if duration_mins is not None else None
        self.duration_mins = duration_mins
        self.received = False
        self._previous_handler = None

    def __enter__(self) -> ExitRequests:
        if self.signal is not None:
            self._previous_handler = signal.signal(self.signal, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self.signal is not None:
            signal.signal(self.signal, self._previous_handler)

    def _note(self, signum, frame) -> None:
        self.received = True

    def reason(self) -> str | None:
        """Why every rank should stop now (the same answer on every rank), or ``None``: a collective."""
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        flags = torch.tensor([float(self.received), float(out_of_time)], device=local_device())
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, timed_out = flags.tolist()
        if signalled:
            return f"{self.signal.name} received"
        if timed_out:
            return f"the time budget exit_duration_in_mins={self.duration_mins} ran out"
        return None
