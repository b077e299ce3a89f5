"""One process of a multi-process test, started by torchrun (see conftest.run_workers).

Builds a tiny hyper-connected GPT under the parallel layout given on the command line, saves the
initial weights as a distributed checkpoint (``--save``) or loads them (``--load``, from a run with
any other layout), then records the logits of a fixed batch and the losses of three training steps
on fixed data. The rank that holds the last pipeline stage, tensor rank 0, data rank 0 writes them
to ``--out`` as JSON.
"""

import argparse
import json
import os

import torch

from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, destroy_parallel, initialize_parallel
from mhc_megatron.megatron.model.checkpointing import load_checkpoint, save_checkpoint
from mhc_megatron.megatron.pipeline.step import MicroBatch, build_optimizer, run_schedule, train_step, wrap_with_ddp

VOCAB, SEQ, MICRO_BATCH, GLOBAL_BATCH, STEPS = 64, 16, 2, 8, 3


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hc-mode", default="mhc")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--recompute", choices=["full", "selective"])
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


RECOMPUTE = {
    None: {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["layernorm", "core_attn", "mlp"]),
}


def make_config(args) -> MhcTransformerConfig:
    return MhcTransformerConfig(
        **RECOMPUTE[args.recompute],
        num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        hc_mode=args.hc_mode, num_streams=4, hc_alpha_init=0.3,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep,
        sequence_parallel=args.sp, num_moe_experts=args.experts, moe_router_topk=2,
        moe_router_load_balancing_type="none",
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, pipeline_dtype=torch.float32, params_dtype=torch.float32,
    )


def global_batch(step: int) -> torch.Tensor:
    """Arithmetic sequences modulo the vocabulary: learnable, so the loss falls within 3 steps."""
    generator = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=generator)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=generator)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def micro_batches(step: int, data_parallel: bool = True) -> list[MicroBatch]:
    """The micro-batches of this data-parallel rank's share of step ``step`` (all of them if not
    ``data_parallel``)."""
    from megatron.core import parallel_state

    rows = global_batch(step)
    if data_parallel:
        rows = rows.chunk(parallel_state.get_data_parallel_world_size())[parallel_state.get_data_parallel_rank()]
    return [
        MicroBatch(tokens=chunk[:, :-1], labels=chunk[:, 1:], loss_mask=torch.ones(chunk.shape[0], SEQ))
        for chunk in rows.split(MICRO_BATCH)
    ]


def collect_logits(chunks, config, micro_batches):
    from megatron.core import tensor_parallel

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch.tokens, batch.position_ids, None)  # logits [s, b, vocab / tp] on the last stage
        if model.post_process:
            output = tensor_parallel.gather_from_tensor_model_parallel_region(output)
        return output, lambda output, non_loss_data=True: output.detach().clone()

    outputs = run_schedule(
        chunks, config, micro_batches, forward_step, forward_only=True, collect_non_loss_data=True
    )
    return torch.cat(outputs, dim=1) if outputs else None  # [s, b, vocab]


def main():
    args = parse_args()
    torch.set_num_threads(1)
    initialize_parallel(args.tp, args.pp, args.vpp, args.ep, seed=7)
    from megatron.core import parallel_state

    config = make_config(args)
    chunks = build_model_chunks(config, VOCAB, SEQ, backend="local")
    if args.save:
        save_checkpoint(chunks, config, args.save)
    if args.load:
        load_checkpoint(chunks, config, args.load)

    for chunk in chunks:
        chunk.eval()
    logits = collect_logits(chunks, config, micro_batches(0, data_parallel=False))
    for chunk in chunks:
        chunk.train()

    model = wrap_with_ddp(chunks, config, args.distributed_optimizer)
    optimizer = build_optimizer(model, lr=1e-2, use_distributed_optimizer=args.distributed_optimizer)
    losses = [train_step(model, optimizer, config, micro_batches(step))[0] for step in range(STEPS)]

    writer = (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    if writer:
        with open(args.out, "w") as out:
            json.dump({"losses": losses, "logits": logits.tolist()}, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
