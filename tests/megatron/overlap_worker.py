"""One process of an overlapped-pipeline test, started by torchrun (see conftest.run_workers).

For each ``--hc-modes`` entry, builds a tiny GPT under the given pipeline layout, then trains the
same initial weights for a few Adam steps once per schedule variant (``blocking``:
``overlap_p2p_comm`` off; ``blocking-batched``: also ``batch_p2p_comm`` on, which needs
``--nccl-ordering``; ``overlapped``: on, posted by the communication thread of ``exchange_thread.py``;
``overlapped+ahead``, 1F1B only: also 2 extra warm-up forwards; ``overlapped-unthreaded``: posted by
the schedule's own thread; ``bf16-transfer``: blocking, the float32 run's transfer rounded to bf16;
``bf16-transfer+overlapped``: the same, overlapped), recording per variant the losses, the gradient
norms, the losses of a forward-only pass, the dtype and shape of every tensor that pass exchanged,
a SHA-256 of this rank's parameters after the steps, and the dtype and shape of every tensor
exchanged by one more forward and backward pass (no optimizer step), by direction: ``forward``
(the stream state) and ``backward`` (its gradient). Exchanges are recorded on the communicator the
schedule would use (threaded or megatron's). Every rank writes ``<out>.rank<R>.json``:
``{hc_mode: {variant: record}}``. With ``--nccl-ordering TIMEOUT`` every exchange follows NCCL's
ordering (``pipeline/nccl_ordering.py``); a deadlock ends the process with exit code 3 after the
emulation's report.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os

import torch
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, destroy_parallel, initialize_parallel
from mhc_megatron.megatron.pipeline.exchange_thread import pipeline_communicator
from mhc_megatron.megatron.pipeline.nccl_ordering import PipelineDeadlock, nccl_ordering
from mhc_megatron.megatron.pipeline.schedules import default_pg_collection
from mhc_megatron.megatron.pipeline.step import (
    MicroBatch, build_optimizer, forward_backward_function, run_schedule, train_step, wrap_with_ddp,
)

VOCAB, SEQ, MICRO_BATCH, STEPS = 64, 8, 2, 2


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hc-modes", nargs="+", default=["mhc", "residual"])
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=["blocking", "overlapped"])
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="per step; default twice the pipeline size (a steady 1F1B phase on every stage)")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (Float16Module) and record the exchange dtypes")
    parser.add_argument("--nccl-ordering", type=float, default=None, metavar="TIMEOUT",
                        help="exchange under the NCCL ordering emulation; a wait past TIMEOUT s is a deadlock")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


VARIANTS = {
    "blocking": dict(overlap_p2p_comm=False),
    "blocking-batched": dict(overlap_p2p_comm=False, batch_p2p_comm=True),  # with --nccl-ordering only
    "overlapped": dict(overlap_p2p_comm=True),
    "overlapped+ahead": dict(overlap_p2p_comm=True, pipeline_extra_warmup=2),  # 1F1B only
    "overlapped-unthreaded": dict(overlap_p2p_comm=True, pipeline_exchange_thread=False),
    "bf16-transfer": dict(pipeline_bf16_transfer=True, pipeline_dtype=torch.bfloat16),  # float32 runs only
    "bf16-transfer+overlapped": dict(pipeline_bf16_transfer=True, pipeline_dtype=torch.bfloat16, overlap_p2p_comm=True),
}


def make_config(args, hc_mode: str) -> MhcTransformerConfig:
    stages = args.pp * (args.vpp or 1)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return MhcTransformerConfig(
        num_layers=stages, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
        hc_mode=hc_mode, num_streams=4, hc_alpha_init=0.3, sinkhorn_iters=5,
        pipeline_model_parallel_size=args.pp, virtual_pipeline_model_parallel_size=args.vpp,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, pipeline_dtype=dtype, params_dtype=dtype, bf16=args.bf16,
    )


def micro_batches(step: int, count: int) -> list[MicroBatch]:
    generator = torch.Generator().manual_seed(500 + step)
    start = torch.randint(0, VOCAB, (count * MICRO_BATCH, 1), generator=generator)
    stride = torch.randint(1, 4, (count * MICRO_BATCH, 1), generator=generator)
    rows = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return [
        MicroBatch(tokens=chunk[:, :-1], labels=chunk[:, 1:], loss_mask=torch.ones(chunk.shape[0], SEQ))
        for chunk in rows.split(MICRO_BATCH)
    ]


def parameter_digest(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        for name, parameter in chunk.named_parameters():
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recording_communicator(config, log: dict) -> P2PCommunicator:
    """The communicator ``run_schedule`` would use for ``config`` (threaded or megatron's), also
    appending ``[dtype, shape]`` of every tensor it sends or receives to ``log["forward"]`` (sent to
    the next stage, received from the previous) or ``log["backward"]`` (the other way: gradients)."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    base = type(pipeline_communicator(group, config) or P2PCommunicator(group, config))

    class Recording(base):
        def _communicate(self, **kwargs):
            received = super()._communicate(**kwargs)
            for direction, tensors in (("forward", (kwargs.get("tensor_send_next"), received[0])),
                                       ("backward", (kwargs.get("tensor_send_prev"), received[1]))):
                log[direction] += [[str(t.dtype), list(t.shape)] for t in tensors if t is not None]
            return received

    return Recording(group, config)


def kinds(exchanged: list) -> list:
    """The distinct ``[dtype, shape]`` of a log, sorted."""
    return sorted({(dtype, tuple(shape)) for dtype, shape in exchanged})


def exchanged_in_a_training_pass(model, config, batches) -> dict:
    """``{"forward": kinds, "backward": kinds}`` of the tensors one forward and backward pass of the
    schedule over ``batches`` exchanges (gradients accumulate; no optimizer step)."""
    log = {"forward": [], "backward": []}
    for chunk in model:
        chunk.zero_grad_buffer()
    run_schedule(model, config, batches, forward_only=False, p2p_communicator=recording_communicator(config, log),
                 pg_collection=default_pg_collection())
    return {direction: kinds(exchanged) for direction, exchanged in log.items()}


def run_variant(base: MhcTransformerConfig, overrides: dict, initial: list[dict], count: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    batched = overrides.pop("batch_p2p_comm", False)
    config = dataclasses.replace(base, **overrides)
    # Without CUDA the config turns batching off (gloo pairs a batched exchange's messages out of
    # order); the NCCL ordering emulation pairs them in issue order, as NCCL does.
    config.batch_p2p_comm = batched
    chunks = build_model_chunks(config, VOCAB, SEQ, backend="local")
    for chunk, state in zip(chunks, initial):
        chunk.load_state_dict(state)
    if config.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    model = wrap_with_ddp(chunks, config)
    optimizer = build_optimizer(model, lr=1e-2, bf16=config.bf16, params_dtype=config.params_dtype)
    losses, grad_norms = [], []
    for step in range(STEPS):
        loss, grad_norm, _ = train_step(model, optimizer, config, micro_batches(step, count))
        losses.append(loss)
        grad_norms.append(float(grad_norm))
    exchanged = {"forward": [], "backward": []}
    with torch.no_grad():
        outputs = run_schedule(model, config, micro_batches(STEPS, count), forward_only=True,
                               p2p_communicator=recording_communicator(config, exchanged),
                               pg_collection=default_pg_collection())
    eval_losses = [entry["lm loss"].item() for entry in outputs]
    return {
        "losses": losses, "grad_norms": grad_norms, "eval_losses": eval_losses,
        "parameters": parameter_digest(chunks),
        "exchanged": kinds(exchanged["forward"] + exchanged["backward"]),
        "exchanged_in_training": exchanged_in_a_training_pass(model, config, micro_batches(STEPS + 1, count)),
        "schedule": forward_backward_function(config).__name__,
        "last_stage": parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    }


def main():
    args = parse_args()
    torch.set_num_threads(1)
    initialize_parallel(1, args.pp, args.vpp, seed=7)
    if "blocking-batched" in args.variants and args.nccl_ordering is None:
        raise SystemExit("blocking-batched needs --nccl-ordering: plain gloo pairs batched exchanges out of order")
    count = args.micro_batches or 2 * args.pp
    exchange = contextlib.nullcontext() if args.nccl_ordering is None else nccl_ordering(args.nccl_ordering)
    record = {}
    try:
        with exchange:
            for hc_mode in args.hc_modes:
                base = make_config(args, hc_mode)
                chunks = build_model_chunks(base, VOCAB, SEQ, backend="local")
                initial = [copy.deepcopy(chunk.state_dict()) for chunk in chunks]
                record[hc_mode] = {name: run_variant(base, dict(VARIANTS[name]), initial, count)
                                   for name in args.variants}
    except PipelineDeadlock as deadlock:
        print(f"PipelineDeadlock: {deadlock}", flush=True)
        os._exit(3)  # the emulation's threads stay blocked in the exchange that deadlocked
    with open(f"{args.out}.rank{torch.distributed.get_rank()}.json", "w") as out:
        json.dump(record, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
