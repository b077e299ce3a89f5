"""The search: every pipeline layout (PP, VPP, micro-batch size, recompute) that divides the model
and fits in HBM, simulated; the fastest wins."""

from __future__ import annotations

from dataclasses import replace

from mhc_megatron.plan.evaluate import Evaluation, evaluate
from mhc_megatron.plan.hardware import ClusterSpec
from mhc_megatron.plan.model import Layout, ModelSpec


def candidates(model: ModelSpec, base: Layout, cluster: ClusterSpec, micro_batch_sizes=(1, 2, 4, 8)) -> list[tuple[ModelSpec, Layout]]:
    """Layouts to try: ``base``'s tp, ep and overlap with every pp dividing the GPUs and layers, vpp
    in 1, 2, 4 (layers permitting), the micro-batch sizes, and the recompute modes that apply."""
    recompute = ("none", "block", "full") if model.hc_mode == "mhc" else ("none", "full")
    found = []
    for pp in range(1, cluster.world_size + 1):
        if cluster.world_size % (pp * base.tp) or model.num_layers % pp:
            continue
        for vpp in (1, 2, 4):
            if model.num_layers % (pp * vpp) or (vpp > 1 and pp == 1):
                continue
            for micro in micro_batch_sizes:
                for mode in recompute:
                    found.append((replace(model, micro_batch_size=micro), replace(base, pp=pp, vpp=vpp, recompute=mode)))
    return found


def recommend(model: ModelSpec, base: Layout, cluster: ClusterSpec) -> tuple[Evaluation | None, list[Evaluation]]:
    """(the fastest layout whose every stage fits in HBM, compared with residual, or ``None``; all
    valid layouts evaluated, fastest first)."""
    evaluated = []
    for candidate_model, layout in candidates(model, base, cluster):
        try:
            evaluated.append(evaluate(candidate_model, layout, cluster, compare=False))
        except ValueError:
            continue  # batch or experts not divisible for this layout
    evaluated.sort(key=lambda e: (round(e.step_time, 9), e.peak_memory))  # ties: the smaller footprint
    fitting = [e for e in evaluated if e.peak_memory <= cluster.device.hbm_bytes]
    best = evaluate(fitting[0].model, fitting[0].layout, cluster) if fitting else None
    return best, evaluated
