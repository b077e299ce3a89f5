"""Exposed pipeline communication: blocking vs overlapped stage-to-stage exchange (PP = 2).

For each schedule (``1f1b``: megatron's 1F1B vs ``schedules.forward_backward_pipelining_overlapped``,
also with ``--extra-warmup`` forwards ahead; ``interleaved``: megatron's interleaved schedule, VPP = 2,
without and with its ``overlap_p2p_comm``; the overlapped variants with the exchange posted from the
caller's thread and, on gloo, from the communication thread of ``exchange_thread.py``) it starts 2
processes (``torch.multiprocessing``, gloo on CPU, NCCL on GPUs), builds one model per
variant from the same initial weights, and trains them on the same batches, the variants in turn
step by step (their order alternating, so that a change of load shifts both alike). Per step and
rank it records the step time, the time blocked in pipeline exchanges (``exchange_timing.py``: the
exchange calls and the waits on their handles, bubble included) and, of that, the exposed transfer
(blocked after both sides of the awaited messages had posted); per step, the transfer time on the
schedule's critical path (``exchange_timing.critical_path``: the communication that lengthened the step).
It reports their medians after ``--warmup`` steps, the overlapped/blocking ratios, and whether the
losses and gradient norms of the variants are identical at every step.

The default shape makes the exchange as large a share of the step as a CPU allows: few, narrow layers
(little computation per token, a short sequence) and many tokens per micro-batch, so that each
exchange carries 8 MiB (float32) of the n = 4 stream state ``[s, b, n*C]``; results in docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mhc_megatron.method import NUM_STREAMS, stream_count, stream_state_bytes

PIPELINE = 2
SCHEDULES = {"1f1b": None, "interleaved": 2}  # virtual pipeline size
MEASURES = ("step_s", "p2p_s", "exposed_s", "path_s", "critical_s")


def _variants(args, schedule: str) -> dict[str, tuple[bool, int, bool]]:
    """name -> (overlap_p2p_comm, pipeline_extra_warmup, pipeline_exchange_thread): blocking first,
    then the overlapped ones (posting from the caller's thread, then from the communication thread)."""
    variants = {"blocking": (False, 0, False), "overlapped, no thread": (True, 0, False), "overlapped": (True, 0, True)}
    if schedule == "1f1b" and args.extra_warmup:
        variants[f"overlapped, {args.extra_warmup} ahead"] = (True, args.extra_warmup, True)
    return variants


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--layers", type=int, default=4, help="in all stages (a multiple of 4 for interleaved)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=None, help="default: hidden")
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--hc-mode", choices=["mhc", "hc", "residual"], default="mhc")
    parser.add_argument("--streams", type=int, default=NUM_STREAMS)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--extra-warmup", type=int, default=1,
                        help="pipeline_extra_warmup of a third 1F1B variant (0: no third variant)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--port", type=int, default=29541)
    parser.add_argument("--json", default="mhc-bench-exchange.json", help="where to write the results")


def _config(args, virtual: int | None, overlap: bool, extra: int, thread: bool):
    from mhc_megatron.megatron import MhcTransformerConfig

    dtype = getattr(torch, args.dtype)
    return MhcTransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn or args.hidden,
        num_attention_heads=args.heads, hc_mode=args.hc_mode, num_streams=args.streams,
        pipeline_model_parallel_size=PIPELINE, virtual_pipeline_model_parallel_size=virtual,
        overlap_p2p_comm=overlap, batch_p2p_comm=not overlap and torch.cuda.is_available(),
        pipeline_extra_warmup=extra, pipeline_exchange_thread=thread,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )


def _batches(args, step: int, device):
    from mhc_megatron.megatron.pipeline.step import MicroBatch

    generator = torch.Generator().manual_seed(10_000 + step)
    rows = torch.randint(0, args.vocab, (args.micro_batches * args.micro_batch, args.seq + 1), generator=generator)
    rows = rows.to(device)
    ones = torch.ones(args.micro_batch, args.seq, device=device)
    return [MicroBatch(tokens=r[:, :-1], labels=r[:, 1:], loss_mask=ones) for r in rows.split(args.micro_batch)]


def _worker(rank: int, args, schedule: str, out_dir: str) -> None:
    from megatron.core import parallel_state

    from mhc_megatron.megatron import build_model_chunks, destroy_parallel, initialize_parallel
    from mhc_megatron.megatron.parallel import local_device
    from mhc_megatron.megatron.pipeline.exchange_timing import (
        P2PTimer,
        critical_path,
        exposed_transfer_seconds,
        gather_timelines,
    )
    from mhc_megatron.megatron.pipeline.step import build_optimizer, train_step, wrap_with_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank),
                      WORLD_SIZE=str(PIPELINE), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    virtual = SCHEDULES[schedule]
    initialize_parallel(1, PIPELINE, virtual, seed=1)
    device = local_device()
    models, initial = {}, None
    variants = _variants(args, schedule)
    for name, (overlap, extra, thread) in variants.items():
        config = _config(args, virtual, overlap, extra, thread)
        chunks = build_model_chunks(config, args.vocab, args.seq, backend="local")
        if initial is None:
            initial = [copy.deepcopy(chunk.state_dict()) for chunk in chunks]
        for chunk, state in zip(chunks, initial):
            chunk.load_state_dict(state)
            chunk.to(device)
        model = wrap_with_ddp(chunks, config)
        models[name] = (model, build_optimizer(model, lr=1e-3), config)
    records = {name: [] for name in variants}
    timer = P2PTimer()
    for step in range(args.warmup + args.steps):
        batches = _batches(args, step, device)
        order = list(variants) if step % 2 == 0 else list(reversed(variants))
        for name in order:
            model, optimizer, config = models[name]
            torch.distributed.barrier()
            timer.reset()
            started = time.perf_counter()
            loss, grad_norm, _ = train_step(model, optimizer, config, batches, p2p_timer=timer)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_s = time.perf_counter() - started
            timelines = gather_timelines(timer)
            path = critical_path(timelines)
            records[name].append({"step_s": step_s, "p2p_s": timer.seconds,
                                  "exposed_s": exposed_transfer_seconds(timelines, torch.distributed.get_rank()),
                                  "path_s": path.seconds, "critical_s": path.transfer_seconds,
                                  "loss": loss, "grad_norm": float(grad_norm)})
    stage = parallel_state.get_pipeline_model_parallel_rank()
    Path(out_dir, f"rank{stage}.json").write_text(json.dumps(records))
    destroy_parallel()


def _summarise(per_rank: dict[int, dict], warmup: int) -> dict:
    summary = {"ranks": {}}
    for rank, records in sorted(per_rank.items()):
        row = {}
        for name, steps in records.items():
            measured = steps[warmup:]
            row[name] = {key: statistics.median(s[key] for s in measured) for key in MEASURES}
        for name in records:
            for key in MEASURES:
                row[name][key.replace("_s", "_ratio")] = row[name][key] / max(row["blocking"][key], 1e-12)
        summary["ranks"][rank] = row
    summary["identical"] = all(
        [(s["loss"], s["grad_norm"]) for s in steps] == [(s["loss"], s["grad_norm"]) for s in records["blocking"]]
        for records in per_rank.values()
        for steps in records.values()
    )
    last = per_rank[max(per_rank)]["blocking"]
    summary["losses"] = [s["loss"] for s in last]
    return summary


def _load() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def run(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    if args.layers % (PIPELINE * 2) and "interleaved" in args.schedules:
        raise SystemExit(f"--layers ({args.layers}) must be a multiple of {PIPELINE * 2} for the interleaved schedule")
    results = {}
    for schedule in args.schedules:
        load_before = _load()
        with tempfile.TemporaryDirectory() as out_dir:
            mp.spawn(_worker, args=(args, schedule, out_dir), nprocs=PIPELINE, join=True)
            per_rank = {int(p.stem[4:]): json.loads(p.read_text()) for p in Path(out_dir).glob("rank*.json")}
        results[schedule] = _summarise(per_rank, args.warmup) | {"load_before": load_before, "load_after": _load()}
        print(f"measured {schedule}", flush=True)
    _print_table(args, results)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo, "
        f"{args.threads} thread(s) per process")
    report = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
              "arguments": {k: v for k, v in vars(args).items() if k not in ("func",)}, "results": results}
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.json}")


def _print_table(args, results: dict) -> None:
    element_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    state = stream_state_bytes(stream_count(args.hc_mode, args.streams), args.hidden, element_bytes)
    megabytes = args.seq * args.micro_batch * state / 2**20
    print(f"\nPP = {PIPELINE}: {args.layers} layers, hidden {args.hidden}, hc_mode {args.hc_mode}, n = {args.streams}, "
          f"seq {args.seq}, micro-batch {args.micro_batch} x {args.micro_batches}, {args.dtype}; "
          f"{megabytes:.1f} MiB per exchange; medians of {args.steps} steps after {args.warmup}")
    print("ms per step (median); p2p: blocked in exchanges; exposed: of that, after both sides had posted; "
          "critical: transfer on the step's critical path (the same on every rank); ratios to blocking")
    print(f"{'schedule':12} {'rank':>4} {'variant':22} | {'step':>7} {'p2p':>7} {'exposed':>7} {'critical':>8} | "
          f"{'step':>6} {'p2p':>6} {'exposed':>7} {'critical':>8} | identical | load (1/5/15 min)")
    for schedule, summary in results.items():
        for rank, row in summary["ranks"].items():
            for name, r in row.items():
                print(f"{schedule:12} {rank:>4} {name:22} | {1000 * r['step_s']:7.1f} {1000 * r['p2p_s']:7.1f} "
                      f"{1000 * r['exposed_s']:7.1f} {1000 * r['critical_s']:8.1f} | {r['step_ratio']:6.3f} "
                      f"{r['p2p_ratio']:6.3f} {r['exposed_ratio']:7.3f} {r['critical_ratio']:8.3f} "
                      f"| {str(summary['identical']):9} | {summary['load_before']} -> {summary['load_after']}")
