"""Keep glibc's heap from handing memory back to the kernel between training steps on CPU.

A training step allocates and frees the same tensors every time. With glibc's defaults the top of
the heap is trimmed (``brk`` down) whenever more than ``M_TRIM_THRESHOLD`` of it lies free, and
grown again by the next step, whose first touch of each returned page is a page fault that zeroes
it. How often that happens depends on the order of frees at the heap's top, not on how much a
model allocates: on the 125M-class slice (``mhc-bench step``, fp32, 2 threads) the residual step
faulted 0 pages while the mHC step faulted 35,000 to 40,000 4 KiB pages per step (~150 MB, tens of
milliseconds of the kernel zeroing pages). A GPU run has the same need met by PyTorch's caching
allocator.

``keep_freed_heap()`` sets, once per process, through glibc's ``mallopt``:

* ``M_TRIM_THRESHOLD = -1``: the heap is never trimmed; what a step frees serves the next step.
* ``M_MMAP_MAX = 0``: no block is mapped on its own, whatever its size; by default blocks above
  the mmap threshold (128 KiB growing to at most 32 MiB) are, and each is unmapped when freed and
  faulted in again when next allocated: a 64 MB stream state (T 4096, C 1024, n 4, fp32) costs a
  few milliseconds of page faults per allocation even in huge pages. (Where the heap cannot grow,
  glibc still maps memory: nothing fails for want of it.)

The cost: the resident set stays at the largest heap the process has used, which a training loop
reaches again every step anyway; memory a run frees for good (a checkpoint loaded into CPU tensors
and copied into the model) stays with the process, for its later steps to reuse.

``initialize_parallel`` calls it in a process without CUDA, so residual, HC and mHC runs in the
same process, or run one after another, get the same allocator. It changes nothing where the C
library is not glibc, or where the environment already tunes glibc's malloc (any of
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``,
or ``glibc.malloc`` in ``GLIBC_TUNABLES``): that setting is the user's choice and stays in force.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameter numbers (<malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

NEVER_TRIM = -1
NO_MAPPED_BLOCKS = 0

MALLOC_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_state: str | None = None  # what the first call decided; later calls return it unchanged


def _user_tuned_malloc(environment: dict[str, str]) -> bool:
    return (any(name in environment for name in MALLOC_ENVIRONMENT)
            or "glibc.malloc" in environment.get("GLIBC_TUNABLES", ""))


def keep_freed_heap() -> str:
    """Apply the settings above once in this process; what holds, in words: ``"kept"`` (applied
    now or by an earlier call), ``"user"`` (the environment tunes malloc: left alone),
    ``"not glibc"``."""
    global _state
    if _state is not None:
        return _state
    if platform.libc_ver()[0] != "glibc":
        _state = "not glibc"
    elif _user_tuned_malloc(dict(os.environ)):
        _state = "user"
    else:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        for parameter, value in ((M_MMAP_MAX, NO_MAPPED_BLOCKS), (M_TRIM_THRESHOLD, NEVER_TRIM)):
            if libc.mallopt(parameter, value) != 1:
                raise RuntimeError(f"glibc's mallopt({parameter}, {value}) failed")
        _state = "kept"
    return _state
