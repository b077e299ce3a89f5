"""A study's numbers: each run's series and summary, and the spread of the final losses over seeds.

The gain is the Amax gain of the composite stream mixing on the fixed probe batch, max over its
tokens (``gain_profile`` in metrics.jsonl; ``modules/diagnostics.py``): ``gain_forward`` /
``gain_backward`` are the whole model's over steps, ``profiles`` the per-depth values at each
measured step. A loss spike is a step whose training loss is above ``spike_ratio`` times the median
of the previous ``spike_window`` finite losses; consecutive such steps count as one spike (its first
step is listed). Non-finite steps (skipped by the trainer) are counted apart.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mhc_megatron.compare.report import load_metrics
from mhc_megatron.study.config import StudyConfig, StudyRun
from mhc_megatron.study.runner import read_outcome, run_dir

FINAL_TRAIN_STEPS = 10  # the final training loss: the mean of the last this many finite losses


def spike_steps(steps: list[int], losses: list[float | None], ratio: float, window: int) -> list[int]:
    """The first step of every loss spike (module docstring); ``None`` losses are skipped."""
    spikes: list[int] = []
    history: list[float] = []
    in_spike = False
    for step, loss in zip(steps, losses):
        if loss is None:
            continue
        spiking = len(history) >= window and loss > ratio * statistics.median(history[-window:])
        if spiking and not in_spike:
            spikes.append(step)
        in_spike = spiking
        history.append(loss)
    return spikes


@dataclass
class RunResult:
    """One run of the study: what it is, how it ended, its series and its summary numbers."""

    name: str
    mode: str
    seed: int
    lr: float
    part: str
    status: str  # completed | diverged | not run (no outcome yet)
    steps: list[int] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    gain_steps: list[int] = field(default_factory=list)
    gain_forward: list[float] = field(default_factory=list)
    gain_backward: list[float] = field(default_factory=list)
    profiles: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    final_eval_loss: float | None = None
    final_train_loss: float | None = None
    spikes: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    max_gain_forward: float | None = None
    max_gain_backward: float | None = None
    max_grad_norm: float | None = None

    def to_dict(self) -> dict:
        values = asdict(self)
        values["profiles"] = {str(step): profile for step, profile in self.profiles.items()}
        return values


def analyse_run(out: Path, run: StudyRun, spike_ratio: float, spike_window: int) -> RunResult:
    """The ``RunResult`` of ``run`` from ``OUT/runs/NAME`` (status "not run" and no series when it has not ended)."""
    outcome = read_outcome(out, run)
    result = RunResult(run.name, run.mode, run.seed, run.lr, run.part, "not run" if outcome is None else outcome["status"])
    if outcome is None:
        return result
    for record in load_metrics(run_dir(out, run)):
        step = record["step"]
        result.steps.append(step)
        result.loss.append(record["loss"])
        result.grad_norm.append(record["grad_norm"])
        if "skipped" in record:
            result.skipped_steps.append(step)
        if record.get("eval_loss") is not None:
            result.eval_steps.append(step)
            result.eval_loss.append(record["eval_loss"])
        if "gain_profile" in record:
            result.gain_steps.append(step)
            result.gain_forward.append(record["gain_forward_max"])
            result.gain_backward.append(record["gain_backward_max"])
            result.profiles[step] = record["gain_profile"]
    finite = [loss for loss in result.loss if loss is not None]
    result.final_train_loss = statistics.fmean(finite[-FINAL_TRAIN_STEPS:]) if finite else None
    result.final_eval_loss = result.eval_loss[-1] if result.eval_loss else None
    result.spikes = spike_steps(result.steps, result.loss, spike_ratio, spike_window)
    norms = [norm for norm in result.grad_norm if norm is not None]
    result.max_grad_norm = max(norms) if norms else None
    if result.gain_steps:
        result.max_gain_forward, result.max_gain_backward = max(result.gain_forward), max(result.gain_backward)
    return result


def analyse_study(config: StudyConfig, out: Path) -> list[RunResult]:
    return [analyse_run(out, run, config.spike_ratio, config.spike_window) for run in config.runs()]


def seed_spread(results: list[RunResult], mode: str) -> dict | None:
    """Final eval losses of ``mode``'s completed base-rate runs: mean, sample std, min, max, count."""
    finals = [r.final_eval_loss for r in results
              if r.mode == mode and r.part == "seeds" and r.status == "completed" and r.final_eval_loss is not None]
    if not finals:
        return None
    return {
        "mean": statistics.fmean(finals),
        "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "min": min(finals),
        "max": max(finals),
        "count": len(finals),
    }
