"""One layout's verdict: simulate its step for the model's connection and for the plain residual
model, and put step time, mHC overhead, bubble, exposed communication and memory side by side."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mhc_megatron.plan import costs, schedule
from mhc_megatron.plan.hardware import ClusterSpec
from mhc_megatron.plan.model import Layout, ModelSpec
from mhc_megatron.plan.simulator import Result, communication_cost, simulate


@dataclass(frozen=True)
class Evaluation:
    """Times in seconds, memory in bytes per GPU; ``overhead`` = step / residual step - 1."""

    model: ModelSpec
    layout: Layout
    micro_batches: int
    result: Result
    residual_step: float | None
    comm_cost: float | None
    layer: costs.LayerTime
    memory: list[dict]

    @property
    def step_time(self) -> float:
        return self.result.step_time

    @property
    def overhead(self) -> float | None:
        return None if self.residual_step is None else self.step_time / self.residual_step - 1

    @property
    def peak_memory(self) -> float:
        return max(stage["total"] for stage in self.memory)


def evaluate(model: ModelSpec, layout: Layout, cluster: ClusterSpec, compare: bool = True) -> Evaluation:
    """Simulate ``model`` laid out as ``layout``; with ``compare`` also its residual twin (without
    recompute unless ``full``) and the same step with instant transfers (for ``comm_cost``)."""
    micro_batches = costs.check_layout(model, layout, cluster)
    plan = schedule.build(layout.pp, layout.vpp, micro_batches)
    step_costs = costs.simulator_costs(model, layout, cluster, plan)
    result = simulate(plan, step_costs, layout.overlap)
    residual_step = comm_cost = None
    if compare:
        residual = model.with_mode("residual")
        residual_layout = layout if layout.recompute == "full" else replace(layout, recompute="none")
        residual_costs = costs.simulator_costs(residual, residual_layout, cluster, plan)
        residual_step = simulate(plan, residual_costs, layout.overlap).step_time
        comm_cost = communication_cost(plan, step_costs, layout.overlap)
    layers = model.num_layers // (layout.pp * layout.vpp)
    return Evaluation(
        model=model,
        layout=layout,
        micro_batches=micro_batches,
        result=result,
        residual_step=residual_step,
        comm_cost=comm_cost,
        layer=costs.layer_time(model, layout, cluster, layers),
        memory=[costs.stage_memory(model, layout, cluster, micro_batches, stage) for stage in range(layout.pp)],
    )
