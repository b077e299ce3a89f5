"""The training job: megatron-core's model chunks, DDP, optimizer, LR schedule and pipeline
schedules, driven step by step with evaluation, checkpoints, exact resume and metrics.

``train(run)`` runs in every process of a ``torchrun`` job (or alone). Exact resume holds because
nothing in a step depends on the past except the weights, the optimizer and the schedule (all
checkpointed): the batch is a function of the consumed sample count (``data.batches``) and the
random state is re-seeded from ``(seed, step)`` before every step.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mhc_megatron.data import StepBatches, build_gpt_datasets, build_tokenizer, check_indexed_dataset, ensure_default_corpus
from mhc_megatron.diagnostics import record_mappings
from mhc_megatron.megatron import build_model_chunks, destroy_parallel, initialize_parallel
from mhc_megatron.megatron.config import MhcTransformerConfig
from mhc_megatron.megatron.step import build_optimizer, run_schedule, train_step, wrap_with_ddp
from mhc_megatron.training.amax import pipeline_amax_gain
from mhc_megatron.training.checkpoints import (
    has_checkpoints,
    holds_checkpoint,
    iteration_directory,
    load_training_checkpoint,
    save_training_checkpoint,
)
from mhc_megatron.training.config import RunConfig
from mhc_megatron.training.metrics import MetricsLogger, format_bytes


@dataclass
class TrainResult:
    """What the logging rank saw (``None`` fields on other ranks)."""

    last_step: int
    run_dir: Path
    checkpoint: Path | None


def _is_logging_rank() -> bool:
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
    tensor = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


def _padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def _check_layout(run: RunConfig, config: MhcTransformerConfig) -> int:
    """Data-parallel size of the launched world; errors name the sizes that do not fit."""
    world = torch.distributed.get_world_size()
    model_parallel = (
        config.tensor_model_parallel_size * config.pipeline_model_parallel_size * config.context_parallel_size
    )
    if world % model_parallel:
        raise ValueError(
            f"{world} processes cannot hold tensor_model_parallel_size x pipeline_model_parallel_size x "
            f"context_parallel_size = {model_parallel}: launch a multiple of it"
        )
    data_parallel = world // model_parallel
    args = run.training
    if args.global_batch_size % (args.micro_batch_size * data_parallel):
        raise ValueError(
            f"global_batch_size {args.global_batch_size} must be a multiple of micro_batch_size "
            f"{args.micro_batch_size} x data-parallel size {data_parallel}"
        )
    return data_parallel


def _prepare_data(run: RunConfig):
    """Tokenizer and dataset prefix; the default corpus is built once, by rank 0."""
    args = run.training
    tokenizer = build_tokenizer(args.tokenizer)
    if args.data_path is not None:
        check_indexed_dataset(args.data_path, tokenizer.vocab_size)
        return tokenizer, Path(args.data_path)
    if torch.distributed.get_rank() == 0:
        ensure_default_corpus(args.data_dir, args.tokenizer)
    torch.distributed.barrier()
    return tokenizer, ensure_default_corpus(args.data_dir, args.tokenizer)


def _build_model(run: RunConfig, config: MhcTransformerConfig, vocab_size: int):
    args = run.training
    chunks = build_model_chunks(
        config,
        vocab_size,
        args.max_position_embeddings or args.seq_length,
        backend=config.transformer_impl,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    if torch.cuda.is_available():
        chunks = [chunk.cuda() for chunk in chunks]
    if config.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    return chunks


def _parameter_counts(chunks) -> tuple[int, int]:
    """(all parameters, hyper-connection parameters) of the whole model, summed over the model-parallel
    ranks (tensor-parallel replicas of hyper-connection parameters counted once)."""
    from mhc_megatron.modules import HyperConnection, StreamCollapse

    total = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    hyper = sum(
        p.numel()
        for chunk in chunks
        for module in chunk.modules()
        if isinstance(module, (HyperConnection, StreamCollapse))
        for p in module.parameters(recurse=False)
    )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    counts = torch.tensor([total - hyper + hyper / tp, hyper / tp], dtype=torch.float64)
    if torch.cuda.is_available():
        counts = counts.cuda()
    torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return round(counts[0].item()), round(counts[1].item())


def _build_scheduler(run: RunConfig, optimizer) -> OptimizerParamScheduler:
    args = run.training
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=max(args.decay_iters, 1),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=max(args.train_iters, 1),
        wd_incr_style="constant",
    )


def evaluate(model, config: MhcTransformerConfig, batches: StepBatches, eval_iters: int) -> float | None:
    """Mean loss over the first ``eval_iters`` global batches of ``batches`` (last stage; else None)."""
    for chunk in model:
        chunk.eval()
    losses = []
    with torch.no_grad():
        for step in range(eval_iters):
            micro_batches = batches.global_batch(step * batches.global_batch_size)
            losses += run_schedule(model, config, micro_batches, forward_only=True)
    for chunk in model:
        chunk.train()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    loss = torch.stack([entry["lm loss"] for entry in losses]).mean()
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return (loss / parallel_state.get_data_parallel_world_size()).item()


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


def train(run: RunConfig) -> TrainResult:
    """Train as ``run`` says, in this process of the job; see the module docstring."""
    args = run.training
    config = run.transformer_config()
    _check_output_directories(args)
    if args.data_path is not None:
        check_indexed_dataset(args.data_path)
    initialize_parallel(
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        config.virtual_pipeline_model_parallel_size,
        config.expert_model_parallel_size,
        seed=args.seed,
    )
    try:
        return _train(run, config)
    finally:
        destroy_parallel()


def _train(run: RunConfig, config: MhcTransformerConfig) -> TrainResult:
    args = run.training
    data_parallel = _check_layout(run, config)
    run_dir = Path(args.run_dir)
    if _is_logging_rank():
        run_dir.mkdir(parents=True, exist_ok=True)
        run.to_yaml(run_dir / "config.yaml")

    tokenizer, prefix = _prepare_data(run)
    evaluating = args.eval_interval > 0
    train_set, valid_set = build_gpt_datasets(
        prefix,
        tokenizer,
        args.seq_length,
        args.seed,
        args.split,
        train_samples=args.train_iters * args.global_batch_size,
        valid_samples=args.eval_iters * args.global_batch_size if evaluating else 0,
        cache_dir=Path(args.data_dir) / "index-cache",
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dp_rank = parallel_state.get_data_parallel_rank()
    train_batches = StepBatches(train_set, args.global_batch_size, args.micro_batch_size, dp_rank, data_parallel, device)
    valid_batches = (
        StepBatches(valid_set, args.global_batch_size, args.micro_batch_size, dp_rank, data_parallel, device)
        if evaluating
        else None
    )

    vocab_size = _padded_vocab_size(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by * config.tensor_model_parallel_size
    )
    chunks = _build_model(run, config, vocab_size)
    total_params, hc_params = _parameter_counts(chunks)
    model = wrap_with_ddp(chunks, config, args.use_distributed_optimizer)
    optimizer = build_optimizer(
        model,
        lr=args.lr,
        min_lr=args.min_lr,
        use_distributed_optimizer=args.use_distributed_optimizer,
        clip_grad=args.clip_grad,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
    )
    scheduler = _build_scheduler(run, optimizer)

    iteration, consumed_samples = 0, 0
    if args.load and not (args.load == args.save and not has_checkpoints(args.load)):
        directory, state = load_training_checkpoint(
            args.load, model, config, optimizer=None if args.finetune else optimizer
        )
        if not args.finetune:
            iteration, consumed_samples = state["iteration"], state["consumed_samples"]
            scheduler.load_state_dict(state["scheduler"])
        _say(f"loaded {'weights of ' if args.finetune else ''}{directory} (resuming after step {iteration})")

    _say(
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, hc_mode {config.hc_mode} "
        f"(n = {config.stream_count}), {total_params:,} parameters ({hc_params:,} in hyper-connections); "
        f"world {torch.distributed.get_world_size()} = TP {config.tensor_model_parallel_size} x "
        f"PP {config.pipeline_model_parallel_size} x DP {data_parallel}"
    )
    metrics = (
        MetricsLogger(run_dir, args.train_iters, args.log_interval, iteration, run.to_mapping(), args.wandb,
                      args.wandb_project)
        if _is_logging_rank()
        else None
    )
    def save(iteration: int, consumed_samples: int) -> Path:
        state = {"iteration": iteration, "consumed_samples": consumed_samples, "scheduler": scheduler.state_dict()}
        directory = save_training_checkpoint(args.save, iteration, model, optimizer, config, state)
        _say(f"saved checkpoint {directory}")
        return directory

    checkpoint = None
    tokens_per_step = args.global_batch_size * args.seq_length
    measures_gain = config.hc_mode != "residual"
    while iteration < args.last_step:
        _seed_step(args.seed, iteration)
        scheduler.step(1)
        lr = optimizer.param_groups[0]["lr"]
        micro_batches = train_batches.global_batch(consumed_samples)
        log_gain = measures_gain and (iteration + 1) % args.log_interval == 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        recording = record_mappings(torch.nn.ModuleList(model)) if log_gain else contextlib.nullcontext()
        with recording as recorder:
            loss, grad_norm = train_step(model, optimizer, config, micro_batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_time = time.perf_counter() - started
        iteration += 1
        consumed_samples += args.global_batch_size
        record = {
            "step": iteration,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_step / step_time,
            "peak_mem_bytes": int(_max_over_ranks(_peak_memory_bytes())),
            "consumed_samples": consumed_samples,
        }
        if log_gain:
            gain = pipeline_amax_gain(recorder)
            record.update(amax_gain_forward=gain.forward, amax_gain_backward=gain.backward)
        if evaluating and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
            record["eval_loss"] = evaluate(model, config, valid_batches, args.eval_iters)
        if metrics is not None:
            metrics.log(record)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            checkpoint = save(iteration, consumed_samples)
    if args.save and not iteration_directory(args.save, iteration).exists():
        checkpoint = save(iteration, consumed_samples)
    if metrics is not None:
        metrics.close()
        if metrics.first_loss is not None:
            _say(f"loss: {metrics.first_loss:.4f} at step {metrics.first_step} -> {metrics.last_loss:.4f} "
                 f"at step {iteration}")
        _say(f"metrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'}); peak memory "
             f"{format_bytes(_peak_memory_bytes())}")
    return TrainResult(last_step=iteration, run_dir=run_dir, checkpoint=checkpoint)
