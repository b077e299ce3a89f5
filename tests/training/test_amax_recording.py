"""Recording the Amax gain costs the recorded step only: the steps after it run what the steps
before it ran. Counted, not timed: the collectives each step calls and the process's threads.

The defect this guards against: the gain's gather of the recorded mappings (about 1 MB) over gloo,
on a pipeline of one rank, made gloo copy the message on its worker thread with ATen's parallel
loop, which started a second OpenMP team; libgomp then managed more threads than CPUs, throttled
its spin-waits, and every later step of the 2-thread default job ran ~50 % slower. The team shows
as one more OS thread, so the thread count must not grow after the recorded step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY

WORKER = Path(__file__).with_name("amax_recording_worker.py")


@pytest.fixture(scope="module")
def steps(dataset, tmp_path_factory):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(WORKER),
               "--data", str(dataset), "--run-dir", str(tmp_path_factory.mktemp("amax") / "run"),
               "--steps", "7", "--recorded-step", "3", "--", *TINY]
    # Two intra-op threads, as the default single-process job runs: with one, ATen never starts a team.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"step"')]


def test_only_the_log_step_records_the_gain(steps):
    assert [s["step"] for s in steps if s["recorded"]] == [3, 6]


def test_a_recorded_step_calls_the_collectives_of_any_other_step(steps):
    """On a pipeline of one rank the gain needs no exchange: the steps between the first (which sets
    things up) and the last (which evaluates) call the same collectives, recorded or not."""
    middle = steps[1:-1]
    assert any(s["recorded"] for s in middle)
    assert all(s["collectives"] == middle[0]["collectives"] for s in middle), [s["collectives"] for s in steps]


def test_no_thread_appears_after_a_recorded_step(steps):
    threads = [s["threads"] for s in steps]
    assert threads[2:] == [threads[1]] * (len(threads) - 2), threads
