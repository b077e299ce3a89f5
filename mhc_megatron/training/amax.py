"""The Amax gain of the whole model's stream mixing, measured during a training step or on a probe batch.

Each pipeline rank records the ``h_res`` of its own sub-layers (the first micro-batch's, the one
every stage processes first); the ranks of one pipeline exchange them and the products run over
all sub-layers in global order, as ``diagnostics.amax_gain`` and ``diagnostics.gain_profile`` define them.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from mhc_megatron.modules.diagnostics import AmaxGain, GainProfile, MappingRecorder, amax_gain, gain_profile


def first_micro_batch_mappings(recorder: MappingRecorder, max_tokens: int) -> dict[int, torch.Tensor]:
    """``{sub-layer index: h_res [tokens, n, n]}`` of the first call of each sub-layer, at most
    ``max_tokens`` tokens, float32 on the CPU."""
    mappings: dict[int, torch.Tensor] = {}
    for h_res, index in zip(recorder.h_res, recorder.layer_indices):
        if index not in mappings:
            n = h_res.shape[-1]
            mappings[index] = h_res.reshape(-1, n, n)[:max_tokens].float().cpu()
    return mappings


def pipeline_mappings(recorder: MappingRecorder, max_tokens: int = 4096) -> list[torch.Tensor]:
    """Every sub-layer's ``h_res [tokens, n, n]`` of the whole pipeline in global order (collective
    over the pipeline group when it has more than one rank; none without pipelining); empty when no
    hyper-connection recorded anything (the residual model).

    Why no collective on a pipeline of one: gloo copies a large message (more than ATen's 32768
    elements per task) on its own worker thread with ``at::parallel_for``, which starts a second
    OpenMP team in the process. From then on libgomp manages more threads than there are CPUs and
    cuts the spin-wait of every team to a few hundred iterations, so each parallel region of every
    later step waits on a futex: after the first recorded step, every step of a 2-thread run was
    ~50 % slower (tests/training/test_amax_recording.py; docs/performance.md).
    """
    local = first_micro_batch_mappings(recorder, max_tokens)
    group = parallel_state.get_pipeline_model_parallel_group()
    gathered: list[dict[int, torch.Tensor]] = [local]
    if torch.distributed.get_world_size(group) > 1:
        gathered = [{} for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather_object(gathered, local, group=group)
    merged = {index: h_res for part in gathered for index, h_res in part.items()}
    return [merged[index] for index in sorted(merged)]


def pipeline_amax_gain(recorder: MappingRecorder, max_tokens: int = 4096) -> AmaxGain | None:
    """``amax_gain`` of ``pipeline_mappings`` (token means); ``None`` for the residual model."""
    mappings = pipeline_mappings(recorder, max_tokens)
    return amax_gain(mappings) if mappings else None


def pipeline_gain_profile(recorder: MappingRecorder, max_tokens: int = 4096) -> GainProfile | None:
    """``gain_profile`` of ``pipeline_mappings`` (per depth, max and mean over tokens); ``None`` for
    the residual model."""
    mappings = pipeline_mappings(recorder, max_tokens)
    return gain_profile(mappings) if mappings else None
