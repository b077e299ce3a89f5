"""Process groups and seeds for a megatron-core run, on GPUs (NCCL) or on CPUs (gloo).

``initialize_parallel`` is what a training script or a multi-process test calls first, in every
process started by ``torchrun`` (it reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
``destroy_parallel`` is the last call. Between the two, megatron-core runs with the project's
adaptations: ``fixes.MegatronFixes`` on every device and, without CUDA, the CPU layer
(``cpu.CpuLayer``) and gloo. ``destroy_parallel`` undoes them, as does an ``initialize_parallel``
that fails. Without CUDA it also keeps glibc's heap from being trimmed between steps
(``cpu_heap.keep_freed_heap``, for the rest of the process).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

from mhc_megatron.megatron.cpu_heap import keep_freed_heap
from mhc_megatron.megatron.fixes import MegatronFixes
from mhc_megatron.megatron.patching import Adaptation

_run_seed: int | None = None
_adaptations: list[Adaptation] = []  # applied by initialize_parallel, undone by destroy_parallel


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    seed: int = 1234,
    *,
    expert_tensor_parallel_size: int | None = None,
    pipeline_model_parallel_comm_backend: str | None = None,
    timeout_minutes: float = 10.0,
) -> None:
    """Start ``torch.distributed`` (if needed), build megatron's process groups and seed the RNGs.

    The sizes and the pipeline's backend are ``parallel_state.initialize_model_parallel``'s;
    ``parallel_layout(config)`` gives those of a model config. ``seed`` is also the run's seed that
    the model builders draw the initial weights from (``run_seed``, ``model/initialization.py``).
    ``timeout_minutes``: how long a collective of any process group waits for a rank that does not
    come (a node that died without closing its connections) before it raises.
    """
    global _run_seed
    on_gpu = torch.cuda.is_available()
    fresh = not _adaptations
    try:
        if fresh:
            _apply_adaptations(on_gpu)
        if not on_gpu:
            keep_freed_heap()
        if not torch.distributed.is_initialized():
            if on_gpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group(backend="nccl" if on_gpu else "gloo",
                                                 timeout=timedelta(minutes=timeout_minutes))
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            pipeline_model_parallel_comm_backend=pipeline_model_parallel_comm_backend,
            distributed_timeout_minutes=timeout_minutes,
        )
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    except BaseException:
        if fresh:
            _undo_adaptations()
        raise
    _run_seed = seed


def _apply_adaptations(on_gpu: bool) -> None:
    _adaptations.append(MegatronFixes().apply())
    if not on_gpu:
        from mhc_megatron.megatron.cpu import CpuLayer  # a GPU run never imports the CPU layer

        _adaptations.append(CpuLayer().apply())


def _undo_adaptations() -> None:
    while _adaptations:
        _adaptations.pop().undo()


def local_device() -> torch.device:
    """This process's device: the CUDA device ``initialize_parallel`` selected, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_seed() -> int:
    """The seed given to ``initialize_parallel`` in this process."""
    if _run_seed is None:
        raise RuntimeError("no run seed: call initialize_parallel(..., seed=...) before building the model")
    return _run_seed


def parallel_layout(config: ModelParallelConfig) -> dict:
    """``initialize_parallel``'s keyword arguments for the process groups ``config`` is written for,
    so that megatron's groups and the config agree (a size left out here would be the config's
    alone)."""
    return dict(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size,
        pipeline_model_parallel_comm_backend=config.pipeline_model_parallel_comm_backend,
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (a process must call it to exit),
    and undo the adaptations ``initialize_parallel`` applied."""
    global _run_seed
    _run_seed = None
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _undo_adaptations()
