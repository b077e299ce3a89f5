"""Which implementation runs each operator: ``reference``, ``compile`` or ``fused``.

* ``reference``: the plain PyTorch code of ``mhc_megatron.ops`` (the contract);
* ``compile``: ``torch.compile`` of that same code (compiled once per op, on first use);
* ``fused``: the C++/CUDA kernels of ``kernels/`` (``torch.ops.mhc_megatron.*``, see ``fused.py``).

The default is ``fused``, or the value of ``MHC_BACKEND`` read at import; ``set_backend`` and
``use_backend`` change it for all ops or one op. Where ``fused`` cannot run (extension not built,
built without CUDA for a CUDA tensor, or an op of ``fused.CPU_ONLY_OPS`` on a CUDA tensor) the op
runs the reference and says so once, in one line.
Argument validation happens before any backend is chosen, so every backend sees valid arguments.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch

from mhc_megatron.ops import fused
from mhc_megatron.ops.checks import check_choice

OPS = ("sinkhorn", "mappings", "mappings_pre", "pre", "post_res", "hc_mappings_pre", "post_res_mappings_pre")
BACKENDS = ("reference", "compile", "fused")
ENV_VAR = "MHC_BACKEND"

_default = check_choice(ENV_VAR, os.environ.get(ENV_VAR, "fused"), BACKENDS)
_per_op: dict[str, str] = {}
_compiled: dict[str, Callable] = {}
_noticed: set[str] = set()


def get_backend(op: str) -> str:
    """The backend chosen for ``op`` (one of ``OPS``), before any fallback."""
    return _per_op.get(check_choice("op", op, OPS), _default)


def set_backend(backend: str, op: str | None = None) -> None:
    """Choose ``backend`` for ``op``, or for every op (clearing per-op choices) when ``op`` is None."""
    global _default
    backend = check_choice("backend", backend, BACKENDS)
    if op is None:
        _default = backend
        _per_op.clear()
    else:
        _per_op[check_choice("op", op, OPS)] = backend


@contextlib.contextmanager
def use_backend(backend: str, op: str | None = None) -> Iterator[None]:
    """``set_backend`` for the duration of a ``with`` block."""
    global _default
    saved_default, saved_per_op = _default, dict(_per_op)
    set_backend(backend, op)
    try:
        yield
    finally:
        _default = saved_default
        _per_op.clear()
        _per_op.update(saved_per_op)


def resolve(op: str, device: torch.device) -> str:
    """The backend that will run ``op`` on ``device``: the chosen one, or ``reference`` as fallback."""
    backend = get_backend(op)
    if backend != "fused":
        return backend
    reason = fused.unavailable_reason(device, op)
    if reason is None:
        return "fused"
    if reason not in _noticed:
        _noticed.add(reason)
        warnings.warn(f"mhc_megatron: fused kernels unavailable ({reason}); running the reference ops", stacklevel=3)
    return "reference"


def run(op: str, reference: Callable, fused_op: Callable, *args):
    """Run ``op`` on validated ``args`` (the first a tensor) with the backend ``resolve`` picks."""
    backend = resolve(op, args[0].device)
    if backend == "fused":
        return fused_op(*args)
    if backend == "compile" and not torch.compiler.is_compiling():
        if op not in _compiled:
            _compiled[op] = torch.compile(reference)
        return _compiled[op](*args)
    return reference(*args)
