"""What a stability study trains: its YAML file and the list of runs it means.

A study file has two sections::

    study:
      modes: [residual, hc, mhc]        # every mode runs every seed at the base rate
      seeds: [1234, 2345, 3456]
      sweep_lrs: [6.0e-4, 6.0e-3]       # more peak rates, each run with the first seed in every mode
      spike_ratio: 1.2                  # a loss spike: a loss above 1.2 x the median of the
      spike_window: 20                  #   previous 20 steps' (see analysis.count_spikes)
    training:                           # an mhc-train config: the model, data and schedule
      num_layers: 24
      lr: 2.0e-3
      ...

Every run gets the ``training`` section, its mode, seed and peak rate; ``min_lr`` is scaled with
the rate (the schedule's shape is the same at every rate). A seed sets the initial weights, the
sample order and dropout, so the modes of one seed see the same tokens in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mhc_megatron.method import HC_MODES

PER_RUN_KEYS = ("hc_mode", "seed", "lr", "min_lr", "run_dir", "save", "load")  # set by the study for each run


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study. ``part``: ``"seeds"`` (the base rate) or ``"sweep"``."""

    mode: str
    seed: int
    lr: float
    min_lr: float
    part: str

    @property
    def name(self) -> str:
        return f"{self.mode}-lr{self.lr:.1e}-seed{self.seed}"

    def overrides(self) -> list[str]:
        return [f"seed={self.seed}", f"lr={self.lr!r}", f"min_lr={self.min_lr!r}"]


@dataclass(frozen=True)
class StudyConfig:
    modes: list[str]
    seeds: list[int]
    training: dict[str, Any]
    sweep_lrs: list[float] = field(default_factory=list)
    spike_ratio: float = 1.2
    spike_window: int = 20

    @property
    def base_lr(self) -> float:
        return float(self.training["lr"])

    def runs(self) -> list[StudyRun]:
        """Seed-major over the base rate (a stopped study has whole seeds done first), then the sweep."""
        runs = [self._run(mode, seed, self.base_lr, "seeds") for seed in self.seeds for mode in self.modes]
        runs += [self._run(mode, self.seeds[0], lr, "sweep") for lr in self.sweep_lrs for mode in self.modes]
        return runs

    def _run(self, mode: str, seed: int, lr: float, part: str) -> StudyRun:
        min_lr = float(self.training.get("min_lr", 0.0)) * lr / self.base_lr
        return StudyRun(mode, seed, lr, min_lr, part)

    @classmethod
    def load(cls, path: str | Path) -> StudyConfig:
        """Read and check a study file; errors name the file, the key and what was expected."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study config {path} is not a file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(values, dict) or set(values) != {"study", "training"}:
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"{path} must be a mapping with exactly the sections 'study' and 'training', got {got}")
        study, training = values["study"], values["training"]
        if not isinstance(study, dict) or not isinstance(training, dict):
            raise ValueError(f"{path}: 'study' and 'training' must both be mappings")
        unknown = set(study) - {"modes", "seeds", "sweep_lrs", "spike_ratio", "spike_window"}
        if unknown:
            raise ValueError(f"{path}: unknown study key(s) {sorted(unknown)}; expected modes, seeds, sweep_lrs, "
                             "spike_ratio, spike_window")
        per_run = sorted(set(training) & set(PER_RUN_KEYS) - {"lr", "min_lr"})
        if per_run:
            raise ValueError(f"{path}: training key(s) {per_run} are set by the study for each run; remove them")
        if not isinstance(training.get("lr"), (int, float)) or isinstance(training.get("lr"), bool) or training["lr"] <= 0:
            raise ValueError(f"{path}: training.lr must be a number > 0 (the base peak rate), got {training.get('lr')!r}")
        config = cls(
            modes=_modes(path, study.get("modes", list(HC_MODES))),
            seeds=_numbers(path, "seeds", study.get("seeds"), int, minimum=0),
            training=training,
            sweep_lrs=_numbers(path, "sweep_lrs", study.get("sweep_lrs", []), float, minimum=0, allow_empty=True),
            spike_ratio=_number(path, "spike_ratio", study.get("spike_ratio", 1.2), float, minimum=1.0),
            spike_window=_number(path, "spike_window", study.get("spike_window", 20), int, minimum=1),
        )
        if config.base_lr in config.sweep_lrs:
            raise ValueError(f"{path}: sweep_lrs repeats the base rate training.lr={config.base_lr}; "
                             "its runs are the seeds' already")
        return config


def _modes(path: Path, modes) -> list[str]:
    if not isinstance(modes, list) or not modes or any(mode not in HC_MODES for mode in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"{path}: study.modes must be a list of distinct modes from {list(HC_MODES)}, got {modes!r}")
    return modes


def _number(path: Path, key: str, value, kind: type, minimum: float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{path}: study.{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{path}: study.{key} must be >= {minimum}, got {value!r}")
    return kind(value)


def _numbers(path: Path, key: str, values, kind: type, minimum: float, allow_empty: bool = False) -> list:
    if not isinstance(values, list) or (not values and not allow_empty):
        raise ValueError(f"{path}: study.{key} must be a {'' if allow_empty else 'non-empty '}list, got {values!r}")
    numbers = [_number(path, key, value, kind, minimum) for value in values]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{path}: study.{key} repeats a value: {values!r}")
    if kind is float and any(value <= 0 for value in numbers):
        raise ValueError(f"{path}: study.{key} must hold rates > 0, got {values!r}")
    return numbers
