"""Make megatron-core 0.19 train on CPU over gloo. Applied only where CUDA is absent.

megatron-core assumes a GPU in a handful of places (measured with 0.19.2, see
``shared/docs/megatron-on-cpu.md``); each is mended here, nowhere else:

* ``torch.cuda.current_device()`` (p2p buffers, the global memory buffer) -> the CPU device;
  ``torch.cuda.synchronize()`` (p2p) -> nothing to wait for; ``torch.cuda.current_stream()``
  (DDP's gradient reduction, ``param_and_grad_buffer.py:632``, not in the shared doc's list) -> a
  stream whose waits return at once, since CPU work is ordered already.
* The RNG tracker keeps CUDA generator states -> ``CpuRngStatesTracker`` keeps CPU generator
  states with the same API (``add``, ``fork``, ``get_states``, ``set_states``), and
  ``torch.cuda.manual_seed`` seeds the CPU generator, so dropout in tensor-parallel regions forks
  the RNG exactly as on GPU. Activation recomputation saves and restores "the CUDA generator"
  (``random._get_cuda_rng_state`` / ``_set_cuda_rng_state``) -> the CPU generator, the one that
  drew the random numbers on CPU.
* Tensors created with ``device="cuda"`` (schedules, optimizer, grad clipping) and type checks
  against ``"torch.cuda.FloatTensor"`` (grad clipping, distributed optimizer) -> a
  ``TorchFunctionMode`` that maps CUDA device arguments to the CPU and reports CPU tensors under
  their CUDA type names; it sees only torch calls, so nothing else changes. Torch function modes
  are not active inside autograd's backward, where megatron's activation recomputation reruns
  forward code (``get_default_causal_mask`` creates its mask with ``device="cuda"``), so the
  recompute entry points (``CheckpointFunction.backward``,
  ``CheckpointWithoutOutputFunction.backward``, ``CheckpointWithoutOutput._recompute``) enter the
  mode again.
* ``CheckpointWithoutOutput`` leaves its ``fp8`` flag wrong when fp8 is ``None`` (selective
  recompute of ``layernorm``) -> the flag is ``bool(fp8)``.

Call ``apply_cpu_compat()`` once per process before building models; it does nothing when CUDA
is available, so it can never change a GPU run, and this module is imported only on that call.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a CUDA ordinal, as returned by torch.cuda.current_device()
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaArgumentsOnCpu(TorchFunctionMode):
    """Run torch calls that name a CUDA device on the CPU; name CPU tensor types as CUDA ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _CpuStream:
    """What megatron asks of ``torch.cuda.current_stream()`` on the CPU: waits that return at once."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as megatron_random

    class CpuRngStatesTracker(megatron_random.CudaRNGStatesTracker):
        """megatron's RNG tracker with CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} is already tracked")
            if name in self.states_:
                raise ValueError(f"RNG state {name!r} is already tracked")
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"RNG state {name!r} is not tracked")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    return CpuRngStatesTracker


def _under_cpu_mode(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with CudaArgumentsOnCpu():
            return function(*args, **kwargs)

    return wrapper


def apply_cpu_compat() -> bool:
    """Apply the CPU fixes once in this process when CUDA is absent; return whether they apply."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.manual_seed = torch.manual_seed
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    megatron_random.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    megatron_random.initialize_rng_tracker(force_reset=True)

    original_init = megatron_random.CheckpointWithoutOutput.__init__

    @functools.wraps(original_init)
    def init_with_fp8_flag(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = bool(fp8)

    megatron_random.CheckpointWithoutOutput.__init__ = init_with_fp8_flag
    for function_class in (megatron_random.CheckpointFunction, megatron_random.CheckpointWithoutOutputFunction):
        function_class.backward = staticmethod(_under_cpu_mode(function_class.backward))
    recompute = megatron_random.CheckpointWithoutOutput._recompute
    megatron_random.CheckpointWithoutOutput._recompute = _under_cpu_mode(recompute)
    CudaArgumentsOnCpu().__enter__()
    _applied = True
    return True
