"""``cpu_heap.keep_freed_heap``: freed tensors serve the next step without page faults, counted.

Each case runs in a fresh interpreter (the setting is process-wide and cannot be undone): it frees
a few stream-sized tensors, as a training step does at its end, allocates and fills them again, and
counts the minor page faults of the refill (``getrusage``), the median of 7 steps: with the heap
kept, a step may still grow it once where a small allocation has split the freed space (one block
faulted in one of the 7, seen in CI), and the steps after it fault nothing. Two sizes: 8 MiB blocks, which glibc
may map per use or take from its heap and trim, depending on the thresholds it has moved to by
then (so the defaults' control is not asserted for them: whether they fault depends on what the
interpreter allocated before), and 48 MiB blocks, above any mmap threshold glibc picks, always
mapped and unmapped per use. With a malloc setting in the environment (thresholds fixed) both fault
every page, every step. Counting pages, not timing, so the test is deterministic on a noisy host.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mhc_megatron.world import free_port

ROOT = Path(__file__).resolve().parents[2]
CPU_HEAP = ROOT / "mhc_megatron" / "megatron" / "cpu_heap.py"
BLOCKS = 3
MIB_FLOATS = 1024 * 1024 // 4
BLOCK_FLOATS = {"heap": 8 * MIB_FLOATS, "mapped": 48 * MIB_FLOATS}


def pages_per_refill(size: str) -> int:
    return BLOCKS * BLOCK_FLOATS[size] * 4 // 4096


# cpu_heap.py loaded from its file: it needs neither megatron-core nor the package's other modules,
# and an interpreter that imports torch alone starts in a third of the time.
REFILL = f"""
import importlib.util, resource, sys, torch
spec = importlib.util.spec_from_file_location("cpu_heap", sys.argv[3])
cpu_heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_heap)
state = cpu_heap.keep_freed_heap() if sys.argv[1] == "keep" else "default"
block_floats = int(sys.argv[2])
def step():
    blocks = [torch.ones(block_floats) for _ in range({BLOCKS})]
    del blocks
for _ in range(3):  # glibc's defaults settle their thresholds on the first frees
    step()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(state, sorted(faults)[len(faults) // 2])
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without any malloc tuning, the package importable, plus ``extra``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def _refill(mode: str, size: str, **environment: str) -> tuple[str, int]:
    command = [sys.executable, "-c", REFILL, mode, str(BLOCK_FLOATS[size]), str(CPU_HEAP)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_environment(**environment))
    assert result.returncode == 0, result.stderr
    state, faults = result.stdout.split()
    return state, int(faults)


@glibc_only
def test_glibc_defaults_map_large_blocks_per_use():
    """The control: without the setting a 48 MiB refill faults its pages in again, every step."""
    state, faults = _refill("default", "mapped")
    assert state == "default"
    assert faults > pages_per_refill("mapped") // 2, faults


@glibc_only
@pytest.mark.parametrize("size", BLOCK_FLOATS)
def test_kept_heap_refills_without_page_faults(size):
    state, faults = _refill("keep", size)
    assert state == "kept"
    assert faults < pages_per_refill(size) // 100, faults


@glibc_only
@pytest.mark.parametrize("size", BLOCK_FLOATS)
@pytest.mark.parametrize("environment", [{"MALLOC_TRIM_THRESHOLD_": "1048576"},
                                         {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                         {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}])
def test_a_malloc_setting_in_the_environment_is_left_alone(environment, size):
    state, faults = _refill("keep", size, **environment)
    assert state == "user"
    assert faults > pages_per_refill(size) // 2, faults


def test_initialize_parallel_keeps_the_heap_on_cpu():
    code = ("from mhc_megatron.megatron import initialize_parallel, destroy_parallel, cpu_heap\n"
            "initialize_parallel()\n"
            "print(cpu_heap.keep_freed_heap())\n"
            "destroy_parallel()\n")
    env = _environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    expected = "kept" if platform.libc_ver()[0] == "glibc" else "not glibc"
    assert result.stdout.split()[-1] == expected
