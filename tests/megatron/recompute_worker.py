"""One process of the block-recompute tests, started by torchrun (see conftest.run_workers).

Builds the same tiny float64 GPT (same seed) once per ``mhc_recompute`` variant, runs forward and
backward over fixed micro-batches with megatron's schedule (1F1B or interleaved under PP), and
writes, per variant (``block`` recompute: each ``L_r`` with each rebuild scheme), every parameter
gradient's largest absolute difference from the ``none`` variant (0.0 means bitwise equal), the
loss, how many stream states and sub-layer inputs the block recomputation freed in forward and
rebuilt in backward, and how many post_res it replayed. Rank 0 of every pipeline stage writes its part.
"""

import argparse
import itertools
import json

import torch

from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, destroy_parallel, initialize_parallel
from mhc_megatron.megatron.pipeline.step import MicroBatch, run_schedule
from mhc_megatron.method import REBUILD_SCHEMES

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES = 64, 16, 2, 4

RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["layernorm", "core_attn", "mlp"]),
}


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--megatron-recompute", choices=sorted(RECOMPUTE), default="none")
    parser.add_argument("--block-sizes", default="1,2,3,100", help="L_r values compared with none")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def make_config(args, mhc_recompute: str, block: int | None, rebuild: str = "sublayer") -> MhcTransformerConfig:
    return MhcTransformerConfig(
        **RECOMPUTE[args.megatron_recompute],
        num_layers=args.layers, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
        hc_mode="mhc", num_streams=4, hc_alpha_init=0.3, mhc_recompute=mhc_recompute, mhc_recompute_block=block,
        mhc_recompute_rebuild=rebuild,
        pipeline_model_parallel_size=args.pp, virtual_pipeline_model_parallel_size=args.vpp,
        num_moe_experts=args.experts, moe_router_topk=2, moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="allgather",
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float64, pipeline_dtype=torch.float64,
    )


def micro_batches() -> list[MicroBatch]:
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(0, VOCAB, (MICRO_BATCH * MICRO_BATCHES, SEQ + 1), generator=generator)
    return [
        MicroBatch(tokens=chunk[:, :-1], labels=chunk[:, 1:], loss_mask=torch.ones(MICRO_BATCH, SEQ))
        for chunk in rows.split(MICRO_BATCH)
    ]


def gradients(args, mhc_recompute: str, block: int | None, rebuild: str = "sublayer"):
    """(loss or None, {parameter name: gradient}, the trackers' counters) of one forward-backward pass."""
    torch.manual_seed(11)
    config = make_config(args, mhc_recompute, block, rebuild)
    chunks = build_model_chunks(config, VOCAB, SEQ, backend="local")
    losses = run_schedule(chunks, config, micro_batches(), forward_only=False)
    loss = torch.stack([entry["lm loss"] for entry in losses]).mean().item() if losses else None
    trackers = {id(t): t for chunk in chunks for layer in chunk.decoder.layers if (t := layer.block_recompute)}
    counters = {
        name: sum(getattr(t, name) for t in trackers.values())
        for name in ("freed_states", "rebuilt_states", "freed_inputs", "rebuilt_inputs", "replayed_post_res")
    }
    grads = {
        f"{index}.{name}": param.grad.clone()
        for index, chunk in enumerate(chunks)
        for name, param in chunk.named_parameters()
        if param.grad is not None
    }
    return loss, grads, counters


def main():
    args = parse_args()
    torch.set_num_threads(1)
    initialize_parallel(pipeline_model_parallel_size=args.pp, virtual_pipeline_model_parallel_size=args.vpp, seed=3)
    from megatron.core import parallel_state

    reference_loss, reference, _ = gradients(args, "none", None)
    record = {"none": {"loss": reference_loss, "parameters": len(reference)}}
    for block, rebuild in itertools.product([None, *map(int, args.block_sizes.split(","))], REBUILD_SCHEMES):
        loss, grads, counters = gradients(args, "block", block, rebuild)
        assert grads.keys() == reference.keys()
        record[f"{rebuild}-{block}"] = {
            "loss": loss,
            **counters,
            "max_grad_difference": max((grads[k] - reference[k]).abs().max().item() for k in reference),
        }
    with open(f"{args.out}.stage{parallel_state.get_pipeline_model_parallel_rank()}", "w") as out:
        json.dump(record, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
