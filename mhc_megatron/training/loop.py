"""The training loop: a training engine (``megatron_engine``: megatron-core's DDP, optimizer and
pipeline schedules; or ``deepspeed_engine``: DeepSpeed ZeRO) driven step by step with megatron's LR
schedule, with evaluation, checkpoints, exact resume and metrics.

``train(run)`` runs in every process of a ``torchrun`` job (or alone). Exact resume holds because
nothing in a step depends on the past except the weights, the optimizer and the schedule (all
checkpointed): the batch is a function of the consumed sample count (``data.batches``) and the
random state is re-seeded from ``(seed, step)`` before every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel

from mhc_megatron.data import StepBatches, check_indexed_dataset
from mhc_megatron.megatron import destroy_parallel, initialize_parallel, parallel_layout
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.megatron.parallel import local_device
from mhc_megatron.megatron.pipeline.exchange_timing import P2PTimer
from mhc_megatron.megatron.pipeline.step import mean_loss
from mhc_megatron.modules.diagnostics import record_mappings
from mhc_megatron.training.amax import pipeline_amax_gain, pipeline_gain_profile
from mhc_megatron.training.builders import build_data, build_model, data_parallel_size, parameter_counts
from mhc_megatron.training.checkpoint_files import (
    checkpoint_engine,
    has_checkpoints,
    holds_checkpoint,
    resolve_checkpoint,
    unfinished_saves,
)
from mhc_megatron.training.checkpoints import load_weights
from mhc_megatron.training.config import RunConfig
from mhc_megatron.training.exit_requests import ExitRequests
from mhc_megatron.training.metrics import MetricsLogger, format_bytes


@dataclass
class TrainResult:
    """Where the run stopped, what it wrote, and why it stopped before its last step (a signal or
    the time budget, ``exit_requests``; ``None``: it reached ``last_step``)."""

    last_step: int
    run_dir: Path
    checkpoint: Path | None
    interrupted_by: str | None = None


class TrainingDiverged(RuntimeError):
    """The loss or gradients were non-finite for ``max_consecutive_skips`` steps in a row."""


def _is_logging_rank() -> bool:
    """The last rank: it holds the last pipeline stage, where the loss is."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _say(message: str) -> None:
    if _is_logging_rank():
        print(message, flush=True)


def _seed_step(seed: int, step: int) -> None:
    """The RNG state of ``step`` (0-based) is a function of the seed, the step and the pipeline rank."""
    step_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank() + 1_000_003 * (step + 1)
    torch.manual_seed(step_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(step_seed)


def _peak_memory_bytes() -> int:
    """This rank's peak since the last reset: the CUDA allocator's, or on CPU the process's peak
    resident set size (which never resets)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=local_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


@contextlib.contextmanager
def _forward_only(model):
    """The model's chunks in eval mode, without autograd, while inside."""
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk in model:
            chunk.train()


def evaluate(engine, batches: StepBatches, eval_iters: int) -> float | None:
    """Mean loss over the first ``eval_iters`` global batches of ``batches`` (last stage; else None)."""
    losses = []
    with _forward_only(engine.chunks):
        for step in range(eval_iters):
            losses += engine.forward_only(batches.global_batch(step * batches.global_batch_size))
    return mean_loss(losses)


def probe_gain_profile(engine, batches: StepBatches) -> dict[str, list[float]] | None:
    """The ``GainProfile`` (as a dict) of the model's stream mixing on the fixed probe batch: the
    first micro-batch of ``batches``' first global batch, forward only, in eval mode (collective
    over the pipeline group). ``None`` for the residual model."""
    with _forward_only(engine.chunks), record_mappings(torch.nn.ModuleList(engine.chunks)) as recorder:
        engine.forward_only(batches.global_batch(0))
    profile = pipeline_gain_profile(recorder)
    return None if profile is None else profile.to_dict()


def build_engine(run: RunConfig, config: MhcTransformerConfig, chunks: list[torch.nn.Module], data_parallel: int):
    """The run's training engine (``engine``) over the model ``chunks``."""
    if run.training.engine == "deepspeed":
        from mhc_megatron.training.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(run, config, chunks, data_parallel)
    from mhc_megatron.training.megatron_engine import MegatronEngine

    return MegatronEngine(run, config, chunks)


def _check_output_directories(args) -> None:
    """Refuse, before anything runs, to write over another run's checkpoints or metrics."""
    resuming = bool(args.load) and holds_checkpoint(args.load) and not args.finetune
    if args.save and has_checkpoints(args.save) and not args.load:
        raise ValueError(
            f"save directory {args.save!r} already holds checkpoints of another run; resume it with "
            f"load={args.save}, or choose another save directory (nothing was overwritten)"
        )
    metrics = Path(args.run_dir) / "metrics.jsonl"
    if not resuming and metrics.is_file() and metrics.stat().st_size > 0:
        raise ValueError(
            f"run_dir {args.run_dir!r} already holds the metrics of another run; choose another run_dir, "
            "or resume that run with load=<its save directory> (nothing was overwritten)"
        )


class Trainer:
    """One process's share of a run: built from ``run`` in ``__init__`` (after the process groups),
    resumed from ``load`` if set, then ``run()`` trains to ``last_step``. ``finetune`` loads the
    weights of a checkpoint of either engine into the model before the engine wraps it; a resume
    loads a checkpoint of the run's own engine (weights, optimizer, schedule, position)."""

    def __init__(self, run: RunConfig, config: MhcTransformerConfig) -> None:
        self.run_config, self.args, self.config = run, run.training, config
        data_parallel = data_parallel_size(run, config, torch.distributed.get_world_size())
        self.run_dir = Path(self.args.run_dir)
        if _is_logging_rank():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run.to_yaml(self.run_dir / "config.yaml")
        self.data = build_data(run, config, data_parallel)
        chunks = build_model(run, config, self.data.vocab_size)
        total_params, hc_params = parameter_counts(chunks)
        self.iteration = self.consumed_samples = 0
        self.skipped_steps: list[int] = []  # the current run of consecutive non-finite steps
        self.saved_iteration: int | None = None  # the step whose checkpoint exists (saved or loaded)
        # time blocked in pipeline exchanges (pipeline/exchange_timing.py), logged per step when pipelined
        self.p2p_timer = P2PTimer() if config.pipeline_model_parallel_size > 1 else None
        checkpoint = self._checkpoint_to_load()
        if checkpoint is not None and self.args.finetune:
            load_weights(chunks, config, checkpoint)
            _say(f"loaded weights of {checkpoint}")
        self.engine = build_engine(run, config, chunks, data_parallel)
        self.optimizer, self.scheduler = self.engine.optimizer, self.engine.scheduler
        if checkpoint is not None and not self.args.finetune:
            self._resume(checkpoint)
        if _is_logging_rank() and self.engine.name == "deepspeed":
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.engine.settings, indent=1) + "\n")
        _say(
            f"model: {config.num_layers} layers, hidden {config.hidden_size}, hc_mode {config.hc_mode} "
            f"(n = {config.stream_count}), {total_params:,} parameters ({hc_params:,} in hyper-connections); "
            f"world {torch.distributed.get_world_size()} = TP {config.tensor_model_parallel_size} x "
            f"PP {config.pipeline_model_parallel_size} x DP {data_parallel}; engine {self.engine.description}"
        )

    def _checkpoint_to_load(self) -> Path | None:
        """The checkpoint directory ``load`` stands for, ``None`` when there is nothing to load yet
        (``load`` = ``save`` names where a run resumes once it has saved)."""
        args = self.args
        if args.load:
            for left in unfinished_saves(args.load):
                _say(f"ignoring {left}: a save that did not finish (the job stopped during it)")
        if not args.load or (args.load == args.save and not has_checkpoints(args.load)):
            return None
        directory = resolve_checkpoint(args.load)
        saved_by = checkpoint_engine(directory)  # None: unreadable, which the engine's loader says
        if not args.finetune and saved_by not in (None, args.engine):
            raise ValueError(
                f"checkpoint {str(directory)!r} (load) was saved by engine={saved_by}; a run resumes with the "
                f"engine that saved it: set engine={saved_by}, or finetune=true to start from its weights alone"
            )
        return directory

    def _resume(self, directory: Path) -> None:
        state = self.engine.load(directory)
        self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.saved_iteration = self.iteration
        _say(f"loaded {directory} (resuming after step {self.iteration})")

    def save(self) -> Path:
        state = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "scheduler": self.scheduler.state_dict(),
        }
        directory = self.engine.save(self.args.save, self.iteration, state)
        self.saved_iteration = self.iteration
        _say(f"saved checkpoint {directory}")
        return directory

    def step(self) -> dict:
        """One optimizer step over the next global batch; returns its metrics record."""
        args = self.args
        _seed_step(args.seed, self.iteration)
        self.scheduler.step(1)
        lr = self.optimizer.param_groups[0]["lr"]
        micro_batches = self.data.train.global_batch(self.consumed_samples)
        log_gain = self.config.hc_mode != "residual" and (self.iteration + 1) % args.log_interval == 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        recording = record_mappings(torch.nn.ModuleList(self.engine.chunks)) if log_gain else contextlib.nullcontext()
        with recording as recorder:
            if self.p2p_timer is not None:
                self.p2p_timer.reset()
            loss, grad_norm, nonfinite = self.engine.train_step(micro_batches, self.p2p_timer)
        if nonfinite:
            self.scheduler.step(-1)  # a skipped step leaves the LR schedule where it was
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_time = time.perf_counter() - started
        self.iteration += 1
        self.consumed_samples += args.global_batch_size
        record = {
            "step": self.iteration,
            "loss": None if "loss" in nonfinite else loss,
            "lr": lr,
            "grad_norm": None if nonfinite else float(grad_norm),
            "step_time_s": step_time,
            "tokens_per_s": args.global_batch_size * args.seq_length / step_time,
            "peak_mem_bytes": int(_max_over_ranks(_peak_memory_bytes())),
            "consumed_samples": self.consumed_samples,
        }
        if nonfinite:
            record["skipped"] = list(nonfinite)
        if self.p2p_timer is not None:
            record["p2p_blocked_s"] = _max_over_ranks(self.p2p_timer.seconds)  # the most blocked rank
        if log_gain:
            gain = pipeline_amax_gain(recorder)
            record.update(amax_gain_forward=gain.forward, amax_gain_backward=gain.backward)
        if self.data.valid is not None and (
            self.iteration % args.eval_interval == 0 or self.iteration == args.train_iters
        ):
            record["eval_loss"] = evaluate(self.engine, self.data.valid, args.eval_iters)
        if args.gain_profile_interval and self.config.hc_mode != "residual" and (
            self.iteration == 1 or self.iteration % args.gain_profile_interval == 0 or self.iteration == args.train_iters
        ):
            probe = self.data.valid if self.data.valid is not None else self.data.train
            profile = probe_gain_profile(self.engine, probe)
            record.update(gain_forward_max=profile["forward_max"][-1], gain_backward_max=profile["backward_max"][-1],
                          gain_profile=profile)
        return record

    def _check_divergence(self, record: dict) -> None:
        """Say that a step was skipped; stop the run after ``max_consecutive_skips`` in a row."""
        if "skipped" not in record:
            self.skipped_steps = []
            return
        self.skipped_steps.append(record["step"])
        _say(f"step {record['step']}: skipped: non-finite {' and '.join(record['skipped'])} (no update; "
             f"{len(self.skipped_steps)} in a row, the run stops at {self.args.max_consecutive_skips})")
        if len(self.skipped_steps) >= self.args.max_consecutive_skips:
            first, last = self.skipped_steps[0], self.skipped_steps[-1]
            kept = f"step {self.saved_iteration}" if self.saved_iteration is not None else "none"
            raise TrainingDiverged(
                f"the run diverged: the loss or gradients were non-finite at steps {first} to {last} "
                f"({len(self.skipped_steps)} in a row, max_consecutive_skips={self.args.max_consecutive_skips}); "
                f"no update was applied from them and no checkpoint holds them (last checkpoint: {kept}). "
                "Resume from it with a lower lr, a longer lr_warmup_iters or a smaller clip_grad"
            )

    def run(self, exit_requests: ExitRequests) -> TrainResult:
        args = self.args
        metrics = (
            MetricsLogger(self.run_dir, args.train_iters, args.log_interval, self.iteration, self.run_config.to_mapping(),
                          args.wandb, args.wandb_project)
            if _is_logging_rank()
            else None
        )
        checkpoint = interrupted_by = None
        try:
            while self.iteration < args.last_step:
                record = self.step()
                if metrics is not None:
                    metrics.log(record)
                self._check_divergence(record)
                if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                    checkpoint = self.save()
                if self.iteration < args.last_step:  # a run that has reached its end is not interrupted
                    interrupted_by = exit_requests.reason()
                if interrupted_by is not None:
                    _say(f"stopping after step {self.iteration}: {interrupted_by}")
                    break
            if args.save and self.saved_iteration != self.iteration:
                checkpoint = self.save()
        finally:
            if metrics is not None:
                metrics.close()
        if metrics is not None:
            if metrics.first_loss is not None:
                _say(f"loss: {metrics.first_loss:.4f} at step {metrics.first_step} -> {metrics.last_loss:.4f} "
                     f"at step {self.iteration}")
            _say(f"metrics: {self.run_dir / 'metrics.jsonl'} (TensorBoard: {self.run_dir / 'tensorboard'}); "
                 f"peak memory {format_bytes(_peak_memory_bytes())}")
            if metrics.wandb_location is not None:
                _say(metrics.wandb_location)
        return TrainResult(self.iteration, self.run_dir, checkpoint, interrupted_by)


def train(run: RunConfig) -> TrainResult:
    """Train as ``run`` says, in this process of the job; see the module docstring."""
    started = time.monotonic()
    args = run.training
    config = run.transformer_config()
    _check_output_directories(args)
    data_parallel_size(run, config, int(os.environ.get("WORLD_SIZE", "1")))  # every size, before any process group
    if args.data_path is not None:
        check_indexed_dataset(args.data_path)
    initialize_parallel(**parallel_layout(config), seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    try:
        with ExitRequests(args.exit_signal, args.exit_duration_in_mins, started) as exit_requests:
            return Trainer(run, config).run(exit_requests)
    finally:
        destroy_parallel()
