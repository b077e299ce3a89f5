"""Where a run's numbers go: ``metrics.jsonl`` (every step), TensorBoard (always), Weights & Biases
(``wandb=true``: the same records and the resolved config; offline without an API key, see
``wandb_run.py``) and the console (a line per ``log_interval``, or a progress bar when the
output is a terminal).

Per-step record keys: ``step``, ``loss``, ``lr``, ``grad_norm``, ``step_time_s``, ``tokens_per_s``,
``peak_mem_bytes``, ``consumed_samples``; ``skipped`` (steps whose loss or gradients were non-finite:
which of them; ``loss`` is then ``null`` when it was the loss, ``grad_norm`` always); ``amax_gain_forward`` / ``amax_gain_backward`` (HC and mHC,
every ``log_interval``: token means over the step's first micro-batch); ``gain_profile`` (HC and mHC, when
``gain_profile_interval`` is set: ``{forward_max, backward_max, forward_mean, backward_mean}``, a list over
depth each, on a fixed probe batch, and the whole model's ``gain_forward_max`` / ``gain_backward_max``); ``eval_loss`` (evaluation steps). A resumed run appends to the same file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mhc_megatron.training.wandb_run import start_wandb_run, where_logged


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def console_line(record: dict, train_iters: int) -> str:
    parts = [f"step {record['step']}/{train_iters}", f"loss {record['loss']:.4f}"]
    if "eval_loss" in record:
        parts.append(f"eval {record['eval_loss']:.4f}")
    parts += [
        f"lr {record['lr']:.3e}",
        f"grad {record['grad_norm']:.3f}",
        f"{record['step_time_s']:.3f} s/step",
        f"{record['tokens_per_s']:.0f} tok/s",
        f"mem {format_bytes(record['peak_mem_bytes'])}",
    ]
    if "amax_gain_forward" in record:
        parts.append(f"amax fwd {record['amax_gain_forward']:.3f} bwd {record['amax_gain_backward']:.3f}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes the records of one run (only the logging rank creates one)."""

    def __init__(
        self,
        run_dir: str | Path,
        train_iters: int,
        log_interval: int,
        start_step: int = 0,
        config: dict | None = None,
        use_wandb: bool = False,
        wandb_project: str = "mhc-megatron",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.first_step = self.first_loss = self.last_loss = None
        self.jsonl = (self.run_dir / "metrics.jsonl").open("a")
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        self.wandb_run = (
            start_wandb_run(self.run_dir, wandb_project, config or {}, resuming=start_step > 0) if use_wandb else None
        )
        self.wandb_location = where_logged(self.wandb_run) if self.wandb_run is not None else None
        self.bar = (
            tqdm(total=train_iters, initial=start_step, unit="step", dynamic_ncols=True)
            if sys.stdout.isatty()
            else None
        )

    def log(self, record: dict) -> None:
        step = record["step"]
        if record["loss"] is not None:
            if self.first_loss is None:
                self.first_step, self.first_loss = step, record["loss"]
            self.last_loss = record["loss"]
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str("skipped" if record["loss"] is None else f"loss {record['loss']:.4f}")
        if "skipped" in record:
            return  # the trainer says so on every skipped step
        if step % self.log_interval == 0 or step == self.train_iters or "eval_loss" in record:
            line = console_line(record, self.train_iters)
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
