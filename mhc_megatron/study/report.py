"""The study's report: ``OUT/report/study.json`` (every number and series), the plots drawn from it,
and ``report.md`` (tables and plots). Runs that have not ended yet are listed as "not run".

Plots: ``loss.png`` (training loss, mean over seeds with the min-max band), ``gain_steps.png``
(whole-model forward and backward gain over steps, each seed), ``gain_depth.png`` (gain over depth
at the first, a middle and the last measured step of the first seed, and the last step of every
seed), ``grad_norm.png`` (gradient norm, mean over seeds), ``lr_sweep.png`` (final eval loss and
largest gain against the peak rate, first seed; a diverged run is marked x at its last eval loss).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from mhc_megatron.study.analysis import FINAL_TRAIN_STEPS, analyse_study, seed_spread
from mhc_megatron.study.config import StudyConfig

REPORT_DIR = "report"
JSON_FILE = "study.json"
COLORS = {"residual": "tab:gray", "hc": "tab:red", "mhc": "tab:blue"}
MODE_NAMES = {"residual": "residual", "hc": "HC", "mhc": "mHC"}


def study_summary(config: StudyConfig, out: Path) -> dict:
    """Everything the report shows, as JSON-ready data."""
    results = analyse_study(config, out)
    return {
        "study": {"modes": config.modes, "seeds": config.seeds, "base_lr": config.base_lr,
                  "sweep_lrs": config.sweep_lrs, "spike_ratio": config.spike_ratio,
                  "spike_window": config.spike_window},
        "training": config.training,
        "seed_spread": {mode: seed_spread(results, mode) for mode in config.modes},
        "runs": [result.to_dict() for result in results],
    }


def write_report(config: StudyConfig, out: Path) -> Path:
    """Write ``OUT/report/`` and return the path of its ``report.md``."""
    summary = study_summary(config, out)
    if all(run["status"] == "not run" for run in summary["runs"]):
        raise ValueError(f"no run of the study in {out} has ended yet; run mhc-study without --report-only first")
    directory = out / REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / JSON_FILE).write_text(json.dumps(summary) + "\n")
    summary = json.loads((directory / JSON_FILE).read_text())  # the plots are drawn from the file's data
    _plot_loss(directory / "loss.png", summary)
    _plot_gain_steps(directory / "gain_steps.png", summary)
    _plot_gain_depth(directory / "gain_depth.png", summary)
    _plot_grad_norm(directory / "grad_norm.png", summary)
    if summary["study"]["sweep_lrs"]:
        _plot_sweep(directory / "lr_sweep.png", summary)
    path = directory / "report.md"
    path.write_text("\n".join(report_lines(summary)) + "\n")
    return path


def report_lines(summary: dict) -> list[str]:
    study, runs = summary["study"], summary["runs"]
    training = summary["training"]
    lines = [
        f"# Stability study: {', '.join(MODE_NAMES[mode] for mode in study['modes'])}",
        "",
        f"{training.get('num_layers')} layers ({2 * training.get('num_layers', 0)} sub-layers), hidden "
        f"{training.get('hidden_size')}, n = {training.get('num_streams', 4)} streams, {training.get('train_iters')} "
        f"steps of {training.get('global_batch_size')} x {training.get('seq_length')} tokens; base peak rate "
        f"{study['base_lr']:g}, seeds {', '.join(map(str, study['seeds']))}. Gain: Amax gain of the composite "
        "stream mixing on the fixed probe batch, max over its tokens (forward: max absolute row sum, backward: "
        f"max absolute column sum). Spike: a loss above {study['spike_ratio']:g} x the median of the previous "
        f"{study['spike_window']} steps. Final train loss: mean of the last {FINAL_TRAIN_STEPS} steps.",
        "",
        "## Seeds at the base rate",
        "",
        "| mode | final eval loss: mean | std | min | max | runs | spikes (all seeds) | skipped steps | "
        "largest gain fwd | largest gain bwd | largest grad norm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in study["modes"]:
        spread = summary["seed_spread"][mode]
        mine = [r for r in runs if r["mode"] == mode and r["part"] == "seeds" and r["status"] != "not run"]
        cells = ["-"] * 5 if spread is None else [
            _number(spread["mean"]), _number(spread["std"]), _number(spread["min"]), _number(spread["max"]),
            str(spread["count"])]
        lines.append(
            f"| {MODE_NAMES[mode]} | {' | '.join(cells)} | {sum(len(r['spikes']) for r in mine)} | "
            f"{sum(len(r['skipped_steps']) for r in mine)} | {_largest(mine, 'max_gain_forward')} | "
            f"{_largest(mine, 'max_gain_backward')} | {_largest(mine, 'max_grad_norm')} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| run | status | final eval loss | final train loss | spikes at steps | skipped | gain fwd: last / largest | "
        "gain bwd: last / largest | largest grad norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        last_forward = run["gain_forward"][-1] if run["gain_forward"] else None
        last_backward = run["gain_backward"][-1] if run["gain_backward"] else None
        lines.append(
            f"| {run['name']} | {run['status']} | {_number(run['final_eval_loss'])} | {_number(run['final_train_loss'])} | "
            f"{', '.join(map(str, run['spikes'])) or '-'} | {len(run['skipped_steps'])} | "
            f"{_number(last_forward)} / {_number(run['max_gain_forward'])} | "
            f"{_number(last_backward)} / {_number(run['max_gain_backward'])} | {_number(run['max_grad_norm'])} |"
        )
    lines += [
        "",
        "![Training loss](loss.png)",
        "",
        "![Whole-model gain over steps](gain_steps.png)",
        "",
        "![Gain over depth](gain_depth.png)",
        "",
        "![Gradient norm](grad_norm.png)",
    ]
    if study["sweep_lrs"]:
        lines += ["", "![Learning-rate sweep](lr_sweep.png)"]
    lines += ["", f"Every number and series above is in `{JSON_FILE}`."]
    return lines


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def _largest(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if r[key] is not None]
    return _number(max(values)) if values else "-"


def _base_runs(summary: dict, mode: str) -> list[dict]:
    return [r for r in summary["runs"] if r["mode"] == mode and r["part"] == "seeds" and r["status"] != "not run"]


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _plot_loss(path: Path, summary: dict) -> None:
    figure = Figure(figsize=(7, 4.2))
    axes = figure.add_subplot()
    for mode in summary["study"]["modes"]:
        runs = _base_runs(summary, mode)
        if not runs:
            continue
        by_step: dict[int, list[float]] = {}
        for run in runs:
            for step, loss in zip(run["steps"], run["loss"]):
                if loss is not None:
                    by_step.setdefault(step, []).append(loss)
        steps = sorted(by_step)
        axes.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], color=COLORS[mode], lw=1,
                  label=f"{MODE_NAMES[mode]} (mean of {len(runs)} seeds)")
        axes.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                          color=COLORS[mode], alpha=0.2, lw=0)
    finals = [loss for run in summary["runs"] for loss in run["loss"][-50:] if loss is not None]
    if finals:
        axes.set_ylim(min(finals) - 0.2, max(finals) + 1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.legend()
    axes.grid(alpha=0.3)
    _save(figure, path)


def _direction_panels(path: Path, xlabel: str, ylabel: str, draw) -> None:
    """Forward (left) and backward (right) gain panels, log scale; ``draw(axes, direction)`` plots."""
    figure = Figure(figsize=(10, 4))
    for column, direction in enumerate(("forward", "backward")):
        axes = figure.add_subplot(1, 2, column + 1)
        draw(axes, direction)
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel.format(direction=direction))
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=7)
    _save(figure, path)


def _plot_gain_steps(path: Path, summary: dict) -> None:
    def draw(axes, direction: str) -> None:
        for mode in summary["study"]["modes"]:
            for index, run in enumerate(_base_runs(summary, mode)):
                if run["gain_steps"]:
                    axes.plot(run["gain_steps"], run[f"gain_{direction}"], color=COLORS[mode], lw=1,
                              label=MODE_NAMES[mode] if index == 0 else None)

    _direction_panels(path, "step", "{direction} gain (whole model, max over tokens)", draw)


def _plot_gain_depth(path: Path, summary: dict) -> None:
    def draw(axes, direction: str) -> None:
        for mode in summary["study"]["modes"]:
            runs = [r for r in _base_runs(summary, mode) if r["profiles"]]
            for index, run in enumerate(runs):
                steps = sorted(run["profiles"], key=int)
                shown = [steps[0], steps[len(steps) // 2], steps[-1]] if index == 0 else [steps[-1]]
                for step in shown:
                    values = run["profiles"][step][f"{direction}_max"]
                    last = step == steps[-1]
                    axes.plot(range(1, len(values) + 1), values, color=COLORS[mode], lw=1,
                              ls="-" if last else ":" if step == steps[0] else "--",
                              label=f"{MODE_NAMES[mode]} step {step}" if index == 0 else None)

    _direction_panels(path, "depth (sub-layers)", "{direction} gain of the product up to depth", draw)


def _plot_grad_norm(path: Path, summary: dict) -> None:
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for mode in summary["study"]["modes"]:
        for index, run in enumerate(_base_runs(summary, mode)):
            steps = [s for s, g in zip(run["steps"], run["grad_norm"]) if g is not None]
            norms = [g for g in run["grad_norm"] if g is not None]
            axes.plot(steps, norms, color=COLORS[mode], lw=0.7, alpha=0.7,
                      label=MODE_NAMES[mode] if index == 0 else None)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("gradient norm (before clipping)")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    _save(figure, path)


def _plot_sweep(path: Path, summary: dict) -> None:
    figure = Figure(figsize=(10, 4))
    loss_axes, gain_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    first_seed = summary["study"]["seeds"][0]
    for mode in summary["study"]["modes"]:
        runs = sorted((r for r in summary["runs"] if r["mode"] == mode and r["seed"] == first_seed
                       and r["status"] != "not run"), key=lambda r: r["lr"])
        if not runs:
            continue
        losses = [(r["lr"], r["eval_loss"][-1]) for r in runs if r["eval_loss"]]
        loss_axes.plot(*zip(*losses), color=COLORS[mode], marker="o", label=MODE_NAMES[mode])
        for run in runs:
            if run["status"] == "diverged" and run["eval_loss"]:
                loss_axes.plot(run["lr"], run["eval_loss"][-1], color=COLORS[mode], marker="x", ms=12)
        gains = [(r["lr"], r["max_gain_forward"]) for r in runs if r["max_gain_forward"] is not None]
        if gains:
            gain_axes.plot(*zip(*gains), color=COLORS[mode], marker="o", label=MODE_NAMES[mode])
    rates = sorted([summary["study"]["base_lr"], *summary["study"]["sweep_lrs"]])
    for axes, label in ((loss_axes, "final eval loss"), (gain_axes, "largest forward gain (whole model)")):
        axes.set_xscale("log")
        axes.set_xticks(rates, [f"{rate:g}" for rate in rates])
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("peak learning rate")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3, which="both")
        axes.legend()
    gain_axes.set_yscale("log")
    _save(figure, path)
