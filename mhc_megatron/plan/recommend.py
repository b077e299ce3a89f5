"""The search: every pipeline layout (PP, VPP, micro-batch size, recompute) that divides the model;
those that fit in HBM are simulated and the fastest wins."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mhc_megatron.plan import costs
from mhc_megatron.plan.evaluate import Evaluation, evaluate
from mhc_megatron.plan.hardware import ClusterSpec
from mhc_megatron.plan.model import Layout, ModelSpec


@dataclass(frozen=True)
class Search:
    """``best``: the fastest layout that fits, compared with residual (``None`` if none fits);
    ``fitting``: every layout that fits, fastest first; ``tried``: valid layouts considered."""

    best: Evaluation | None
    fitting: list[Evaluation]
    tried: int


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


def peak_memory(model: ModelSpec, layout: Layout, cluster: ClusterSpec) -> float:
    """The largest stage's bytes per GPU (raises ``ValueError`` for a layout that does not divide)."""
    micro_batches = costs.check_layout(model, layout, cluster)
    return max(costs.stage_memory(model, layout, cluster, micro_batches, stage)["total"] for stage in range(layout.pp))


def recommend(model: ModelSpec, base: Layout, cluster: ClusterSpec) -> Search:
    """Simulate every candidate that fits in ``cluster.device.hbm_bytes``; pick the fastest (ties:
    the smaller footprint)."""
    tried, fitting = 0, []
    for candidate_model, layout in candidates(model, base, cluster):
        try:
            fits = peak_memory(candidate_model, layout, cluster) <= cluster.device.hbm_bytes
        except ValueError:
            continue  # batch or experts not divisible for this layout
        tried += 1
        if fits:
            fitting.append(evaluate(candidate_model, layout, cluster, compare=False))
    fitting.sort(key=lambda e: (round(e.step_time, 9), e.peak_memory))
    best = evaluate(fitting[0].model, fitting[0].layout, cluster) if fitting else None
    return Search(best, fitting, tried)
