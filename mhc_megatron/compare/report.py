"""Summaries, overheads and the written report of runs of one config in several hyper-connection modes.

A run directory is what ``python -m mhc_megatron.train`` writes: ``config.yaml`` (the resolved flat
config) and ``metrics.jsonl`` (one JSON object per training step). A key missing from a step, or
``null``, means "not measured at this step". A resumed run appends to the file, so a step can appear
twice; the last occurrence wins.

The timing and memory figures of a run are medians over the steps numbered above ``warmup_steps``
(the first steps pay for allocator growth, caches and compilation). The baseline is always the
``residual`` run, and a mode's overhead over it is, in percent::

    overhead = (mode / residual - 1) * 100

After the results table the report sets the overheads at model scale beside the run's
(``scale.overheads_at_scale``): what ``mhc-bench step`` measured at the 125M- and 350M-class shapes
and what the planner predicts on GPU clusters.

``write_report`` puts ``report.md`` and its plots ``loss.png``, ``step_time.png``, ``memory.png`` and
``amax_gain.png`` (only when some run logged Amax gains) into one directory. The plots are drawn on
``matplotlib.figure.Figure`` objects, which render through Agg without pyplot or a display.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from mhc_megatron.compare.scale import BENCH_FILES, MeasuredShape, ScaleOverheads, overheads_at_scale
from mhc_megatron.jsonl import read_jsonl

BASELINE = "residual"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
AMAX_GAIN_PLOT = "amax_gain.png"
PER_MODE_KEYS = ("hc_mode", "run_dir")  # set per run by mhc-compare; every other key is shared
_NUMERIC_KEYS = (
    "loss", "step_time_s", "tokens_per_s", "peak_mem_bytes", "eval_loss", "amax_gain_forward", "amax_gain_backward"
)
_MIB = 2**20


@dataclass(frozen=True)
class RunSummary:
    """One run: medians over the steps after the warm-up; losses and gains over all its steps."""

    steps: int  # distinct steps logged
    measured_steps: int  # steps after the warm-up, the ones the medians are taken over
    median_step_time_s: float
    median_tokens_per_s: float
    median_peak_mem_bytes: float
    first_loss: float
    last_loss: float
    last_eval_loss: float | None  # None when the run never evaluated
    amax_gain_forward: float | None  # None when the run never logged gains (residual runs)
    amax_gain_backward: float | None


@dataclass(frozen=True)
class Overhead:
    """A mode's cost over the residual run, in percent: ``(mode / residual - 1) * 100``."""

    step_time_percent: float
    memory_percent: float


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The steps of ``run_dir/metrics.jsonl`` as dicts sorted by ``step``, a repeated step's last line kept.

    Blank lines are skipped. Raises ``FileNotFoundError`` when the file is missing and ``ValueError``
    naming the file and line when a line is not a JSON object with an integer ``step >= 1``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}: is {run_dir} a run directory of mhc_megatron.train?")
    by_step: dict[int, dict] = {}
    for number, record in read_jsonl(path):
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(
                f"{path}:{number} must be a JSON object with an integer 'step' >= 1, got {json.dumps(record)[:120]!r}"
            )
        by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def load_config(run_dir: str | Path) -> dict:
    """The resolved flat config ``run_dir/config.yaml`` as a dict.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when it is not a YAML
    mapping.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}: is {run_dir} a run directory of mhc_megatron.train?")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of config keys to values, got {type(config).__name__}")
    return config


def summarize(run_dir: str | Path, warmup_steps: int) -> RunSummary:
    """Summarize the run in ``run_dir``, taking medians over the steps numbered above ``warmup_steps``.

    Raises ``ValueError`` when ``warmup_steps`` is negative, when no step is left after the warm-up,
    or when a metric the summary needs is never logged.
    """
    return _summarize(load_metrics(run_dir), warmup_steps, Path(run_dir) / METRICS_FILE)


def overheads(summaries: Mapping[str, RunSummary]) -> dict[str, Overhead]:
    """The overhead of every mode in ``summaries`` (``{mode: summary}``) over its ``residual`` entry.

    The residual entry itself gets 0 %. Raises ``ValueError`` when ``residual`` is missing or its
    median step time or peak memory is not positive.
    """
    _require_baseline(summaries)
    base = summaries[BASELINE]
    return {
        mode: Overhead(
            step_time_percent=_percent_over(summary.median_step_time_s, base.median_step_time_s, "step_time_s"),
            memory_percent=_percent_over(summary.median_peak_mem_bytes, base.median_peak_mem_bytes, "peak_mem_bytes"),
        )
        for mode, summary in summaries.items()
    }


def write_report(
    run_dirs: Mapping[str, Path], out_dir: Path, warmup_steps: int, bench_files: Sequence[Path] = BENCH_FILES
) -> Path:
    """Compare the runs ``{mode: run_dir}`` and write ``out_dir/report.md`` with its PNG plots.

    ``run_dirs`` must hold the baseline mode ``residual``; the table rows follow its order. Medians
    skip the steps numbered ``1..warmup_steps``. The model-scale section reads the ``mhc-bench step``
    JSON files ``bench_files``; one that is missing or unusable is named in the report, not raised.
    Returns the path of ``report.md``. Raises
    ``ValueError`` when ``residual`` is missing and the errors of ``load_metrics``, ``load_config``
    and ``summarize`` for a bad run directory.
    """
    _require_baseline(run_dirs)
    run_dirs = {mode: Path(run_dir) for mode, run_dir in run_dirs.items()}
    metrics = {mode: load_metrics(run_dir) for mode, run_dir in run_dirs.items()}
    configs = {mode: load_config(run_dir) for mode, run_dir in run_dirs.items()}
    summaries = {
        mode: _summarize(records, warmup_steps, run_dirs[mode] / METRICS_FILE) for mode, records in metrics.items()
    }
    costs = overheads(summaries)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {mode: f"C{index}" for index, mode in enumerate(run_dirs)}
    _plot_loss(out_dir / "loss.png", metrics, colors)
    _plot_metric(out_dir / "step_time.png", metrics, colors, "step_time_s", 1.0, "step time (s)", warmup_steps)
    _plot_metric(out_dir / "memory.png", metrics, colors, "peak_mem_bytes", 1 / _MIB, "peak memory (MiB)", warmup_steps)
    gain_plot = out_dir / AMAX_GAIN_PLOT
    has_gains = _plot_amax_gain(gain_plot, metrics, colors)
    if not has_gains:
        gain_plot.unlink(missing_ok=True)  # from an earlier report into the same directory

    lines = [
        f"# Hyper-connection comparison: {' vs '.join(run_dirs)}",
        "",
        "## Runs",
        "",
        *(f"- `{mode}`: `{run_dir}`" for mode, run_dir in run_dirs.items()),
        "",
        f"## Config (from `{run_dirs[BASELINE] / CONFIG_FILE}`)",
        "",
        *_config_essentials(configs[BASELINE]),
        "",
        _config_differences(configs),
        "",
        "## Results",
        "",
        *_results_table(summaries, costs),
        "",
        f"Step time, tokens/s and peak memory are medians over the steps after the first {warmup_steps} "
        "(warm-up); the overheads are `(mode / residual - 1) * 100` of those medians. Losses and Amax "
        "gains are the first or last logged values. Peak memory is the training job's `peak_mem_bytes`; "
        "on CPU it is the process's peak resident set size, which also counts the interpreter and its "
        "libraries.",
        "",
        *_scale_section(overheads_at_scale(bench_files), configs[BASELINE]),
        "",
        "## Plots",
        "",
        "![Training loss per step](loss.png)",
        "",
        "![Step time per step](step_time.png)",
        "",
        "![Peak memory per step](memory.png)",
        "",
        f"![Amax gain per step]({AMAX_GAIN_PLOT})"
        if has_gains
        else f"No run logged Amax gains (only `hc` and `mhc` runs do), so there is no `{AMAX_GAIN_PLOT}`.",
        "",
    ]
    report = out_dir / REPORT_FILE
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def _require_baseline(modes: Mapping[str, object]) -> None:
    if BASELINE not in modes:
        raise ValueError(
            f"the baseline mode {BASELINE!r} is missing: got modes {list(modes)}; every overhead is "
            f"relative to a {BASELINE!r} run of the same config"
        )


def _summarize(records: list[dict], warmup_steps: int, path: Path) -> RunSummary:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not records:
        raise ValueError(f"{path} holds no training steps")
    for key in _NUMERIC_KEYS:  # check every step, warm-up included, before the plots use them
        _values(records, key, path)
    measured = [record for record in records if record["step"] > warmup_steps]
    if not measured:
        last_step = records[-1]["step"]
        raise ValueError(
            f"warmup_steps={warmup_steps} leaves no step to measure in {path}, which logged {len(records)} "
            f"steps up to step {last_step}; warmup_steps must be below {last_step}"
        )
    losses = _values(records, "loss", path)
    if not losses:
        raise ValueError(f"{path} logs no 'loss' at any step")
    return RunSummary(
        steps=len(records),
        measured_steps=len(measured),
        median_step_time_s=_median(measured, "step_time_s", path, warmup_steps),
        median_tokens_per_s=_median(measured, "tokens_per_s", path, warmup_steps),
        median_peak_mem_bytes=_median(measured, "peak_mem_bytes", path, warmup_steps),
        first_loss=losses[0],
        last_loss=losses[-1],
        last_eval_loss=_last(records, "eval_loss", path),
        amax_gain_forward=_last(records, "amax_gain_forward", path),
        amax_gain_backward=_last(records, "amax_gain_backward", path),
    )


def _values(records: list[dict], key: str, path: Path) -> list[float]:
    """The logged values of ``key`` in step order, skipping steps that did not measure it."""
    values = []
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: step {record['step']} has {key}={value!r}, expected a number")
        values.append(float(value))
    return values


def _median(records: list[dict], key: str, path: Path, warmup_steps: int) -> float:
    values = _values(records, key, path)
    if not values:
        raise ValueError(f"no step after the warm-up of {warmup_steps} steps in {path} logs {key!r}")
    return statistics.median(values)


def _last(records: list[dict], key: str, path: Path) -> float | None:
    values = _values(records, key, path)
    return values[-1] if values else None


def _percent_over(value: float, baseline: float, key: str) -> float:
    if not baseline > 0:
        raise ValueError(f"the {BASELINE!r} run's median {key} is {baseline}; an overhead needs a positive baseline")
    return (value / baseline - 1) * 100


def _config_value(config: dict, key: str) -> str:
    return str(config[key]) if config.get(key) is not None else "n/a"


def _dtype(config: dict) -> str:
    if config.get("bf16"):
        return "bf16"
    if config.get("fp16"):
        return "fp16"
    return "fp32" if "bf16" in config or "fp16" in config else "n/a"


def _config_essentials(config: dict) -> list[str]:
    value = functools.partial(_config_value, config)
    return [
        f"- Model: {value('num_layers')} layers, hidden size {value('hidden_size')}",
        f"- Streams n: {value('num_streams')}",
        f"- Training steps: {value('train_iters')}",
        f"- Batch: micro {value('micro_batch_size')}, global {value('global_batch_size')}",
        f"- Sequence length: {value('seq_length')}",
        f"- Parallelism: TP {value('tensor_model_parallel_size')}, PP {value('pipeline_model_parallel_size')}",
        f"- Precision: {_dtype(config)}",
    ]


def _config_differences(configs: dict[str, dict]) -> str:
    """One line naming the config keys on which a run differs from the residual run."""
    baseline = configs[BASELINE]
    differences = []
    for mode, config in configs.items():
        for key in sorted(set(config) | set(baseline)):
            if key not in PER_MODE_KEYS and config.get(key) != baseline.get(key):
                differences.append(f"`{mode}` has {key}={config.get(key)!r} ({BASELINE}: {baseline.get(key)!r})")
    if not differences:
        return f"All runs share this config; only {' and '.join(PER_MODE_KEYS)} differ."
    return f"The configs differ beyond {' and '.join(PER_MODE_KEYS)}: " + "; ".join(differences) + "."


def _results_table(summaries: dict[str, RunSummary], costs: dict[str, Overhead]) -> list[str]:
    header = (
        "| Mode | Steps (measured) | Step time (ms) | Tokens/s | Time overhead | Peak memory (MiB) "
        "| Memory overhead | First loss | Last loss | Last eval loss | Amax gain fwd | Amax gain bwd |"
    )
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, summary in summaries.items():
        baseline = mode == BASELINE
        cells = [
            f"`{mode}`",
            f"{summary.steps} ({summary.measured_steps})",
            f"{summary.median_step_time_s * 1000:.1f}",
            f"{summary.median_tokens_per_s:,.0f}",
            "baseline" if baseline else f"{costs[mode].step_time_percent:+.1f} %",
            f"{summary.median_peak_mem_bytes / _MIB:,.1f}",
            "baseline" if baseline else f"{costs[mode].memory_percent:+.1f} %",
            _number(summary.first_loss),
            _number(summary.last_loss),
            _number(summary.last_eval_loss),
            _number(summary.amax_gain_forward),
            _number(summary.amax_gain_backward),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _scale_section(scale: ScaleOverheads, config: dict) -> list[str]:
    """The overheads at model scale: the step benchmark's table, the planner's, and what is missing."""
    value = functools.partial(_config_value, config)
    lines = [
        "## What the overhead is at model scale",
        "",
        f"The step times above are measured at this comparison's shape ({value('num_layers')} layers, hidden size "
        f"{value('hidden_size')}, sequence {value('seq_length')}). At a small width the fixed cost of each op "
        "(dispatch, small kernels, the Sinkhorn iterations) weighs as much as the layer's own work; the overhead "
        "falls with width, because a layer's matrix products grow as C^2 per token while the connection grows as C. "
        "At the shapes that matter (`mhc+recompute` is mHC with block recompute, its states rebuilt sub-layer by "
        "sub-layer; `mhc+recompute-block`, where measured, rebuilds each block at once, the paper's scheme):",
    ]
    if scale.measured:
        lines += ["", "### Measured: `mhc-bench step` (CPU)", "",
                  "| Shape | Variant | Step overhead (fastest rounds) | Per-round median | Per-round range |",
                  "|---|---|---:|---:|---:|"]
        for shape in scale.measured:
            for cost in shape.overheads:
                lines.append(
                    f"| {shape.layers} x {shape.hidden}, seq {shape.seq} | `{cost.variant}` "
                    f"| {cost.of_minimums:+.1f} % | {cost.round_median:+.1f} % "
                    f"| {cost.round_min:+.1f} to {cost.round_max:+.1f} % |"
                )
        lines += ["", "Each variant and the residual model run in rotated rounds in one process; the overhead is "
                  "`(variant / residual - 1) * 100` of the fastest rounds (noise only slows a run), beside it the "
                  "median and range of the rounds' own ratios (docs/performance.md). From:", ""]
        lines += [f"- {shape.layers} x {shape.hidden}: {_measured_where(shape)}" for shape in scale.measured]
    if scale.planned:
        variants = list(scale.planned[0].overheads)
        lines += ["", "### Predicted: `mhc-plan` (GPU clusters)", "",
                  "| Setting | " + " | ".join(f"`{variant}`" for variant in variants)
                  + " | Assumed mfu, HBM efficiency |",
                  "|---|" + "---:|" * len(variants) + "---|"]
        for plan in scale.planned:
            cells = [plan.setting.name, *(f"{plan.overheads[variant]:+.1f} %" for variant in variants),
                     f"{plan.mfu}, {plan.hbm_efficiency}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "The planner's cost model (docs/planner.md), run when this report was written; these commands, "
                  "in the table's order, print the same overheads:", ""]
        lines += [f"- `mhc-plan {plan.setting.arguments}`" for plan in scale.planned]
    if scale.unavailable:
        lines += ["", "**Left out, not available when this report was written:**", ""]
        lines += [f"- {missing.what}: {missing.reason}" for missing in scale.unavailable]
    return lines


def _measured_where(shape: MeasuredShape) -> str:
    """The file a benchmark shape came from, then what it records of when, where and how it ran."""
    machine = ", ".join(filter(None, [
        shape.cpu,
        None if shape.cores is None else f"{shape.cores} cores",
        None if shape.threads is None else f"{shape.threads} threads",
    ]))
    conditions = "; ".join(filter(None, [shape.date, machine, shape.dtype, f"{shape.rounds} rounds"]))
    command = f": `{shape.command}`" if shape.command else ""
    return f"`{shape.source}` ({conditions}){command}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """The steps that logged ``key`` and its values there, multiplied by ``scale``."""
    points = [(record["step"], record[key] * scale) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _save(figure: Figure, path: Path) -> None:
    """Grid and legend on every axes, "step" under the bottom one, then write the PNG."""
    for axes in figure.axes:
        axes.grid(alpha=0.3)
        axes.legend()
    figure.axes[-1].set_xlabel("step")
    figure.savefig(path, dpi=100)


def _plot_loss(path: Path, metrics: dict[str, list[dict]], colors: dict[str, str]) -> None:
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for mode, records in metrics.items():
        axes.plot(*_series(records, "loss"), color=colors[mode], label=f"{mode} train")
        eval_steps, eval_losses = _series(records, "eval_loss")
        if eval_steps:
            axes.plot(eval_steps, eval_losses, "o", color=colors[mode], label=f"{mode} eval")
    axes.set(title="Loss", ylabel="loss")
    _save(figure, path)


def _plot_metric(
    path: Path,
    metrics: dict[str, list[dict]],
    colors: dict[str, str],
    key: str,
    scale: float,
    label: str,
    warmup_steps: int,
) -> None:
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for mode, records in metrics.items():
        axes.plot(*_series(records, key, scale), color=colors[mode], label=mode)
    if warmup_steps > 0:
        axes.axvline(warmup_steps + 0.5, color="grey", linestyle=":", label=f"end of warm-up ({warmup_steps} steps)")
    axes.set(title=label[0].upper() + label[1:], ylabel=label)
    _save(figure, path)


def _plot_amax_gain(path: Path, metrics: dict[str, list[dict]], colors: dict[str, str]) -> bool:
    """Plot the forward and backward gains of the modes that logged them; False (no file) if none did."""
    gains = {
        mode: (_series(records, "amax_gain_forward"), _series(records, "amax_gain_backward"))
        for mode, records in metrics.items()
        if any(record.get("amax_gain_forward") is not None for record in records)
    }
    if not gains:
        return False
    figure = Figure(figsize=(8, 7), layout="constrained")
    forward_axes, backward_axes = figure.subplots(2, 1, sharex=True)
    for mode, (forward, backward) in gains.items():
        forward_axes.plot(*forward, color=colors[mode], label=mode)
        backward_axes.plot(*backward, color=colors[mode], label=mode)
    forward_axes.set(title="Amax gain of the composite H_res", ylabel="forward gain (max row sum)", yscale="log")
    backward_axes.set(ylabel="backward gain (max column sum)", yscale="log")
    _save(figure, path)
    return True
