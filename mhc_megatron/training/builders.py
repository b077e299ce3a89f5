"""What a run is made of, built from its ``RunConfig`` in every process of the job: the checked
layout, the data (tokenizer, datasets, step batches), the model chunks, megatron's optimizer and the
LR schedule (the training engines, ``megatron_engine`` and ``deepspeed_engine``, put them together)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mhc_megatron.data import StepBatches, build_gpt_datasets, build_tokenizer, check_indexed_dataset, ensure_default_corpus
from mhc_megatron.megatron import build_model_chunks
from mhc_megatron.megatron.model.transformer_config import MhcTransformerConfig
from mhc_megatron.megatron.parallel import local_device
from mhc_megatron.megatron.pipeline.step import build_optimizer
from mhc_megatron.training.config import RunConfig


def data_parallel_size(run: RunConfig, config: MhcTransformerConfig, world_size: int) -> int:
    """Data-parallel size of a world of ``world_size`` processes, after checking every size of
    ``run`` that depends on the world or on the training keys (the model's own sizes are checked by
    ``MhcTransformerConfig``); errors name the keys and values that do not fit. ``train`` calls it
    before any process group starts."""
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(
            f"{world_size} processes cannot hold tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size "
            f"({pp}) = {tp * pp}: launch a multiple of it, or change the sizes"
        )
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size
    if world_size % (etp * ep * pp):
        raise ValueError(
            f"{world_size} processes cannot hold expert_tensor_parallel_size ({etp}) x expert_model_parallel_size "
            f"({ep}) x pipeline_model_parallel_size ({pp}) = {etp * ep * pp}: launch a multiple of it, or change the sizes"
        )
    data_parallel = world_size // (tp * pp)
    args = run.training
    if args.engine == "deepspeed":
        _check_deepspeed_layout(config)
    if args.global_batch_size % (args.micro_batch_size * data_parallel):
        raise ValueError(
            f"global_batch_size ({args.global_batch_size}) must be a multiple of micro_batch_size "
            f"({args.micro_batch_size}) x data-parallel size ({data_parallel} = {world_size} processes / "
            f"(tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp}))"
        )
    if config.sequence_parallel and args.seq_length % tp:
        raise ValueError(
            f"seq_length ({args.seq_length}) must be divisible by tensor_model_parallel_size ({tp}) with "
            "sequence_parallel=true: each rank holds an equal slice of the sequence"
        )
    positions = args.max_position_embeddings or args.seq_length
    if args.position_embedding_type == "learned_absolute" and positions < args.seq_length:
        raise ValueError(
            f"max_position_embeddings ({positions}) must be at least seq_length ({args.seq_length}) with "
            "position_embedding_type='learned_absolute': it is the number of positions with an embedding"
        )
    if args.position_embedding_type == "rope" and config.kv_channels % 2:
        raise ValueError(
            f"rotary position embeddings rotate pairs of channels, so the channels per head must be even; got "
            f"kv_channels {config.kv_channels} (hidden_size {config.hidden_size} / num_attention_heads "
            f"{config.num_attention_heads} unless set): change hidden_size, num_attention_heads or kv_channels"
        )
    return data_parallel


def _check_deepspeed_layout(config: MhcTransformerConfig) -> None:
    """DeepSpeed's ZeRO shards over data-parallel ranks only: no tensor, pipeline or expert parallelism."""
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(config, key) != 1:
            raise ValueError(
                f"engine=deepspeed trains data-parallel only (ZeRO shards across the data-parallel ranks), "
                f"but {key}={getattr(config, key)}: set it to 1, or use engine=megatron"
            )
    if config.virtual_pipeline_model_parallel_size is not None:
        raise ValueError("engine=deepspeed has no pipeline: unset virtual_pipeline_model_parallel_size")


@dataclass
class RunData:
    """The vocabulary size of the model (padded) and this rank's training and validation batches."""

    vocab_size: int
    train: StepBatches
    valid: StepBatches | None


def build_data(run: RunConfig, config: MhcTransformerConfig, data_parallel: int) -> RunData:
    """Tokenizer, datasets (the default corpus is built once, by rank 0) and step batches."""
    args = run.training
    tokenizer = build_tokenizer(args.tokenizer)
    if args.data_path is not None:
        check_indexed_dataset(args.data_path, tokenizer.vocab_size)
        prefix = Path(args.data_path)
    else:
        if torch.distributed.get_rank() == 0:
            ensure_default_corpus(args.data_dir, args.tokenizer)
        torch.distributed.barrier()
        prefix = ensure_default_corpus(args.data_dir, args.tokenizer)
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

    def batches(dataset) -> StepBatches:
        return StepBatches(
            dataset,
            args.global_batch_size,
            args.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            data_parallel,
            local_device(),
        )

    multiple = args.make_vocab_size_divisible_by * config.tensor_model_parallel_size
    vocab_size = -(-tokenizer.vocab_size // multiple) * multiple
    return RunData(vocab_size, batches(train_set), batches(valid_set) if evaluating else None)


def build_model(run: RunConfig, config: MhcTransformerConfig, vocab_size: int) -> list[torch.nn.Module]:
    """This rank's GPT chunks, on the GPU when there is one, wrapped in ``Float16Module`` for bf16.
    Their initial weights depend on the run's ``seed`` only, not on the layout."""
    args = run.training
    chunks = build_model_chunks(
        config,
        vocab_size,
        args.max_position_embeddings or args.seq_length,
        backend=config.transformer_impl,
        seed=args.seed,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    if torch.cuda.is_available():
        chunks = [chunk.cuda() for chunk in chunks]
    if config.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    return chunks


def parameter_counts(chunks: list[torch.nn.Module]) -> tuple[int, int]:
    """(all parameters, hyper-connection parameters) of the whole model, summed over the
    model-parallel ranks (tensor-parallel replicas of hyper-connection parameters counted once)."""
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
    counts = torch.tensor([total - hyper + hyper / tp, hyper / tp], dtype=torch.float64, device=local_device())
    torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return round(counts[0].item()), round(counts[1].item())


def build_training_optimizer(run: RunConfig, config: MhcTransformerConfig, model: list[torch.nn.Module]):
    """megatron's Adam over the DDP-wrapped ``model`` (``engine=megatron``)."""
    args = run.training
    return build_optimizer(
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


def build_lr_scheduler(run: RunConfig, optimizer) -> OptimizerParamScheduler:
    """megatron's warm-up + decay schedule of the learning rate and weight decay, over the
    ``param_groups`` of ``optimizer`` (megatron's or DeepSpeed's): each step sets every group's
    ``lr`` and its ``weight_decay`` times the group's ``wd_mult``."""
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
