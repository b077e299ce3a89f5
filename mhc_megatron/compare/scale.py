"""What mHC's step-time overhead is at model scale, for the comparison report beside a small run's figure.

Two sources, both read or computed when the report is written, never copied into code:

- **Measured**: the JSON files ``mhc-bench step`` wrote (``mhc_megatron/bench/step.py``) for the
  125M-class (12 x 768) and 350M-class (24 x 1024) shapes, committed as ``docs/bench-step-*-after.json``
  next to the package. Per variant their ``summary`` holds ``vs_residual``: ``ratio_of_minimums``
  (fastest round over the residual model's fastest round) and ``per_round_ratio`` (median, min,
  max of the rounds' ratios).
- **Predicted**: the planner (``mhc_megatron/plan``, docs/planner.md) for the settings of
  ``PLANNER_SETTINGS``, given as ``mhc-plan`` arguments and run through its own argument parser, so
  that ``mhc-plan ARGUMENTS`` prints the same overheads.

Every overhead is in percent: ``(ratio - 1) * 100``. A benchmark file that is missing or does not
hold what ``mhc-bench step`` writes, or a setting the planner cannot evaluate, does not stop the
report: it comes back as an ``Unavailable`` entry naming the file or setting and the reason.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from mhc_megatron.plan.cli import build_parser, inputs
from mhc_megatron.plan.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]  # the checkout holding mhc_megatron/, docs/ and configs/
BENCH_FILES = (REPO / "docs" / "bench-step-125m-after.json", REPO / "docs" / "bench-step-350m-after.json")
BENCH_BASELINE = "residual"
# variant (named as mhc-bench step names them) -> (hc_mode, recompute, rebuild) in the planner
PLANNER_VARIANTS = {"hc": ("hc", "none", "sublayer"), "mhc": ("mhc", "none", "sublayer"),
                    "mhc+recompute": ("mhc", "block", "sublayer"), "mhc+recompute-block": ("mhc", "block", "block")}


@dataclass(frozen=True)
class PlannerSetting:
    """A model on a cluster to predict: a name for the report and ``mhc-plan``'s arguments, with
    config paths relative to the repository and no ``--recompute`` (each variant sets its own)."""

    name: str
    arguments: str


PLANNER_SETTINGS = (
    PlannerSetting(
        "the paper's setting: 27B-class MoE, 30 layers x 2560, seq 4096, on 4 x 8 H800, PP 2, EP 8, overlapped",
        "--num-layers 30 --hidden-size 2560 --num-attention-heads 20 --num-moe-experts 72 --moe-router-topk 6 "
        "--moe-ffn-hidden-size 1536 --moe-shared-expert-intermediate-size 3072 --swiglu true --vocab-size 129280 "
        "--seq-length 4096 --micro-batch-size 1 --global-batch-size 1280 --gpu H800 --nodes 4 --pp 2 --ep 8 --overlap",
    ),
    PlannerSetting(
        "GPT-1.3B (`configs/gpt-1.3b.yaml`, 24 layers x 2048, seq 2048) on 2 x 8 H100, TP 2, PP 2",
        "configs/gpt-1.3b.yaml --gpu H100 --nodes 2 --tp 2 --pp 2",
    ),
)


@dataclass(frozen=True)
class MeasuredOverhead:
    """One variant's measured step-time overhead over the residual model at one shape, in percent."""

    variant: str
    of_minimums: float  # from the ratio of the fastest rounds
    round_median: float  # from the per-round ratios: their median, minimum and maximum
    round_min: float
    round_max: float


@dataclass(frozen=True)
class MeasuredShape:
    """One ``mhc-bench step`` file: the shape it timed, how, where, and each variant's overhead.

    ``source`` is the file's path relative to the repository (as given when outside it). The fields
    that may be ``None`` are the ones the file does not record.
    """

    source: str
    layers: int
    hidden: int
    seq: int
    rounds: int
    overheads: tuple[MeasuredOverhead, ...]
    dtype: str | None
    cpu: str | None
    cores: int | None
    threads: int | None
    date: str | None
    command: str | None


@dataclass(frozen=True)
class PlannedOverheads:
    """The planner's predicted step-time overhead over the residual model for one setting, in percent
    per variant (``PLANNER_VARIANTS``), with the efficiencies it assumed."""

    setting: PlannerSetting
    overheads: dict[str, float]
    mfu: float
    hbm_efficiency: float


@dataclass(frozen=True)
class Unavailable:
    """A benchmark file or planner setting that gave no figures: what it is (Markdown), and why."""

    what: str
    reason: str


@dataclass(frozen=True)
class ScaleOverheads:
    """Everything ``overheads_at_scale`` found, in the order of its inputs."""

    measured: tuple[MeasuredShape, ...]
    planned: tuple[PlannedOverheads, ...]
    unavailable: tuple[Unavailable, ...]


def overheads_at_scale(
    bench_files: Sequence[Path] = BENCH_FILES, planner_settings: Sequence[PlannerSetting] = PLANNER_SETTINGS
) -> ScaleOverheads:
    """Read the ``mhc-bench step`` JSON files ``bench_files`` and run the planner on ``planner_settings``.

    Never raises for a bad file or setting: those come back in ``unavailable`` with the reason.
    """
    measured, planned, unavailable = [], [], []
    for path in bench_files:
        try:
            measured.append(read_step_bench(path))
        except FileNotFoundError:
            unavailable.append(Unavailable(f"`{_shown(Path(path))}`", "the file is missing"))
        except (OSError, ValueError) as error:
            unavailable.append(Unavailable(f"`{_shown(Path(path))}`", f"the file cannot be used: {error}"))
    for setting in planner_settings:
        try:
            planned.append(predict(setting))
        except (OSError, ValueError, yaml.YAMLError) as error:
            unavailable.append(Unavailable(f"the planner's prediction for {setting.name}", str(error)))
    return ScaleOverheads(tuple(measured), tuple(planned), tuple(unavailable))


def read_step_bench(path: Path) -> MeasuredShape:
    """The shape, conditions and per-variant overheads in one ``mhc-bench step`` JSON file.

    Raises ``OSError`` when the file cannot be read and ``ValueError`` when it is not JSON or lacks
    the shape, the rounds or any variant's ``vs_residual`` figures.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error})") from None
    summary = _field(data, "summary", dict)
    overheads = []
    for variant, numbers in summary.items():
        if variant == BENCH_BASELINE:
            continue
        versus = _field(numbers, "vs_residual", dict, f"summary.{variant}")
        where = f"summary.{variant}.vs_residual"
        per_round = _field(versus, "per_round_ratio", dict, where)
        overheads.append(MeasuredOverhead(
            variant=variant,
            of_minimums=_percent(_field(versus, "ratio_of_minimums", float, where)),
            round_median=_percent(_field(per_round, "median", float, f"{where}.per_round_ratio")),
            round_min=_percent(_field(per_round, "min", float, f"{where}.per_round_ratio")),
            round_max=_percent(_field(per_round, "max", float, f"{where}.per_round_ratio")),
        ))
    if not overheads:
        raise ValueError("its summary holds no variant's overhead over residual")
    shape = _field(data, "shape", dict)
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    return MeasuredShape(
        source=_shown(path),
        layers=_field(shape, "layers", int, "shape"),
        hidden=_field(shape, "hidden", int, "shape"),
        seq=_field(shape, "seq", int, "shape"),
        rounds=len(_field(data, "rounds", list)),
        overheads=tuple(overheads),
        dtype=_recorded(shape, "dtype", str),
        cpu=_recorded(machine, "cpu", str),
        cores=_recorded(machine, "cores", int),
        threads=_recorded(machine, "threads", int),
        date=_recorded(data, "date", str),
        command=_recorded(data, "command", str),
    )


def predict(setting: PlannerSetting) -> PlannedOverheads:
    """The planner's overhead of each ``PLANNER_VARIANTS`` entry over the residual model in ``setting``.

    Raises ``OSError`` for a config file it cannot read and ``ValueError`` for a setting the planner
    refuses (``mhc-plan``'s own checks).
    """
    args = build_parser().parse_args(shlex.split(setting.arguments))
    if args.config:
        args.config = str(REPO / args.config)
    model, layout, machine = inputs(args)
    overheads = {
        variant: 100 * evaluate(model.with_mode(hc_mode), replace(layout, recompute=recompute, rebuild=rebuild),
                                machine).overhead
        for variant, (hc_mode, recompute, rebuild) in PLANNER_VARIANTS.items()
    }
    return PlannedOverheads(setting, overheads, machine.mfu, machine.hbm_efficiency)


def _field(data: object, key: str, kind: type, where: str = ""):
    """``data[key]`` checked to be of ``kind`` (an int counts as a float; a bool as neither)."""
    name = f"{where}.{key}" if where else key
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"it has no {name}")
    value = data[key]
    kinds = (int, float) if kind is float else kind
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"its {name} is {value!r}, expected a {kind.__name__}")
    return float(value) if kind is float else value


def _recorded(data: dict, key: str, kind: type):
    """``data[key]`` when the file records it with the right type, else ``None``."""
    value = data.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _percent(ratio: float) -> float:
    return (ratio - 1) * 100


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)

