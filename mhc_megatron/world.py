"""The environment ``torch.distributed`` reads, for a process started without torchrun: a world of
one process on a free local port (no torch imported here)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_to_world_of_one() -> None:
    """Set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` where the
    launcher (torchrun, Slurm) did not: rank 0 of 1 on 127.0.0.1 and a free port."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
