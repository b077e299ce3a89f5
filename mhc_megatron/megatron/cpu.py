"""The CPU layer: what megatron-core 0.19 needs to train on CPU over gloo, applied and undone as one.

``initialize_parallel`` applies ``CpuLayer`` in a process without CUDA and ``destroy_parallel``
undoes it; ``with CpuLayer(): ...`` scopes it anywhere else. docs/megatron-on-cpu.md lists each
place where megatron-core 0.19.2 assumes a GPU. While the layer is applied:

* ``torch.cuda.current_device()`` (p2p buffers, the global memory buffer) is the CPU device,
  ``torch.cuda.synchronize()`` (p2p) waits for nothing, ``torch.cuda.current_stream()`` (DDP's
  gradient reduction) is a stream whose waits return at once, since CPU work is ordered already,
  and ``torch.cuda.manual_seed`` seeds the CPU generator;
* megatron's RNG tracker keeps CPU generator states (``CpuRngStatesTracker``, same API), so dropout
  in tensor-parallel regions forks the RNG as on GPU, and activation recomputation saves and
  restores the CPU generator, the one that drew the random numbers;
* the torch function mode ``CudaArgumentsOnCpu`` runs torch calls that name a CUDA device
  (schedules, optimizer, grad clipping) on the CPU and reports CPU tensors under their CUDA type
  names (type checks in grad clipping and the distributed optimizer). Torch function modes are not
  active inside autograd's backward, where megatron's activation recomputation reruns forward code,
  so the recompute entry points (``CheckpointFunction.backward``,
  ``CheckpointWithoutOutputFunction.backward``, ``CheckpointWithoutOutput._recompute``) enter the
  mode again.

``undo`` puts back every replaced function and class attribute and megatron's RNG tracker as it
was, and leaves the mode. Torch keeps function modes per thread, so ``apply`` and ``undo`` belong on
the same thread; ``undo`` refuses while a mode entered after the layer's is still active.

Not in this layer:

* ``fixes.MegatronFixes``: ``CheckpointWithoutOutput``'s fp8 flag, wrong on any device without
  Transformer Engine, so ``initialize_parallel`` applies it on GPUs too.
* CPU-only choices made where the object they concern is built: ``initialize_parallel`` uses gloo
  and selects no CUDA device; ``MhcTransformerConfig`` sets ``batch_p2p_comm=False`` without CUDA
  (and at PP = 2 with a virtual pipeline everywhere: ``batched_exchange_crosses_directions``) and
  refuses ``mhc_post_res_high_priority_stream``; ``pipeline.exchange_thread`` posts an overlapped exchange
  over gloo from a communication thread; ``RunConfig.transformer_config`` sets
  ``use_cpu_initialization`` without CUDA; ``local_device`` is the CPU, and the training loop reports
  the resident set as the peak memory.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

from mhc_megatron.megatron.patching import Adaptation, keep, replace


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


def _cpu_rng_tracker_class(megatron_random):
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


class CpuLayer(Adaptation):
    """Every CPU/gloo adaptation of megatron-core in this module's docstring, applied by ``apply``
    (or entering the context) and removed by ``undo`` (or leaving it)."""

    def __init__(self) -> None:
        super().__init__()
        self._mode: CudaArgumentsOnCpu | None = None

    def undo(self) -> None:
        """Put torch and megatron-core back; refused, with nothing undone, while a torch function
        mode entered after the layer's is active (or on another thread than ``apply``'s)."""
        if self.applied and torch.overrides._get_current_function_mode() is not self._mode:
            raise RuntimeError(
                "cannot undo the CPU layer: a torch function mode entered after it is still active, "
                "or this is not the thread that applied it"
            )
        super().undo()

    def _adapt(self, stack: contextlib.ExitStack) -> None:
        from megatron.core.tensor_parallel import random as megatron_random

        replace(stack, torch.cuda, "current_device", lambda: torch.device("cpu"))
        replace(stack, torch.cuda, "synchronize", lambda device=None: None)
        replace(stack, torch.cuda, "current_stream", lambda device=None: _CpuStream())
        replace(stack, torch.cuda, "manual_seed", torch.manual_seed)
        replace(stack, megatron_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
        replace(stack, megatron_random, "_set_cuda_rng_state",
                lambda state, *args, **kwargs: torch.set_rng_state(state))
        replace(stack, megatron_random, "CudaRNGStatesTracker", _cpu_rng_tracker_class(megatron_random))
        keep(stack, megatron_random, "_CUDA_RNG_STATE_TRACKER")
        keep(stack, megatron_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
        megatron_random.initialize_rng_tracker(force_reset=True)
        for function_class in (megatron_random.CheckpointFunction, megatron_random.CheckpointWithoutOutputFunction):
            replace(stack, function_class, "backward", staticmethod(_under_cpu_mode(function_class.backward)))
        checkpoint = megatron_random.CheckpointWithoutOutput
        replace(stack, checkpoint, "_recompute", _under_cpu_mode(checkpoint._recompute))
        self._mode = stack.enter_context(CudaArgumentsOnCpu())
