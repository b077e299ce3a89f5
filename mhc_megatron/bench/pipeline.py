"""Pipeline step time on this CPU: measured runs against the planner's simulator fed with measurements.

Steps, for one training config and its overrides (e.g. ``configs/tiny-cpu.yaml micro_batch_size=2``):

1. **Calibration**, in one process with one thread (what torchrun gives each rank), the model
   built as ``mhc-train`` builds it at PP = 1 (megatron's DDP, optimizer and schedule), timed
   round-robin so that a change of the machine's load shifts every timing alike (medians):
   - the schedule of the step's ``m`` micro-batches, with every part of every pass stamped inside
     it (``part_timing.PartTimer``): each layer's forward and backward, the embedding, the head
     (final norm, output layer, loss) and the forward step's prologue, which every pipeline chunk
     pays again; what the schedule spends beyond its passes is kept as ``schedule_overhead``;
   - the optimizer step (the per-step tail; the stages step their own parameters side by side);
   - gloo point-to-point latency (4-byte message) and bandwidth (16 MiB message) between two local
     processes, fastest of the repeats (other users' load only ever slows it).
2. **Runs**: ``torchrun --nproc-per-node P -m mhc_megatron.train`` at each PP (and VPP), median
   ``step_time_s`` after the warm-up steps.
3. **Prediction**: the simulator (blocking transfers in megatron's order, the P ranks sharing the
   machine by processor sharing over the *effective cores* measured for P ranks: P processes each
   running one stage's passes, with an exchange with its neighbours after each, alone and side by
   side, in turn) with those durations, against the measured median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

import torch
import yaml

from mhc_megatron.method import FLOAT32_BYTES, NUM_STREAMS, stream_count, stream_state_bytes
from mhc_megatron.plan.schedule import Task, build
from mhc_megatron.plan.simulator import Costs, simulate

VOCAB = 512  # byte-level tokenizer, padded to 128
# what the simulator takes from part_timing.PartTimer.parts
PARTS = ("layer_forward", "layer_backward", "prologue", "embedding_forward", "embedding_backward",
         "head_forward", "head_backward")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings of the config (as mhc-train takes them)")
    parser.add_argument("--layouts", nargs="+", default=["2x1", "4x1"], help="PPxVPP pipeline layouts to run")
    parser.add_argument("--modes", nargs="+", default=["residual", "mhc"])
    parser.add_argument("--train-iters", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of the calibration benchmarks")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each layout, at different moments, pooled")
    parser.add_argument("--json", default="mhc-bench-pipeline.json")


def shape_of(config: str, overrides: list[str]) -> dict:
    """The config's keys with ``key=value`` overrides applied (values parsed as YAML)."""
    with open(config) as stream:
        values = yaml.safe_load(stream)
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    return values


class _SinglePipeline:
    """The config's model at PP = 1 in this process, built as mhc-train builds it (megatron's DDP and
    optimizer), with timers for its schedule and its optimizer step."""

    def __init__(self, config: str, overrides: list[str], micro_batches: int) -> None:
        from mhc_megatron.megatron.pipeline.step import MicroBatch, wrap_with_ddp
        from mhc_megatron.training.builders import build_model, build_training_optimizer
        from mhc_megatron.training.config import RunConfig
        from megatron.core.distributed import finalize_model_grads

        run = RunConfig.load(config, [*overrides, "pipeline_model_parallel_size=1"])
        self.config = run.transformer_config()
        self.config.finalize_model_grads_func = finalize_model_grads
        args = run.training
        self.model = wrap_with_ddp(build_model(run, self.config, VOCAB), self.config, args.use_distributed_optimizer)
        self.config.no_sync_func = self.model[0].no_sync
        self.optimizer = build_training_optimizer(run, self.config, self.model)
        tokens = torch.randint(0, VOCAB, (args.micro_batch_size, args.seq_length))
        batch = MicroBatch(tokens, torch.roll(tokens, -1, 1), torch.ones_like(tokens, dtype=torch.float32))
        self.batches = [batch] * micro_batches

    def schedule(self, micro_batches: int) -> float:
        from mhc_megatron.megatron.pipeline.step import run_schedule

        self.model[0].zero_grad_buffer()
        started = time.perf_counter()
        run_schedule(self.model, self.config, self.batches[:micro_batches])
        return time.perf_counter() - started

    def optimizer_step(self) -> float:
        started = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return time.perf_counter() - started


def _single_pipeline_times(payload: dict) -> dict:
    """Median seconds, measured round-robin (so that a change of load shifts all alike): the
    schedule of ``m`` micro-batches, the parts of its passes (``PartTimer.parts``), and the
    optimizer step."""
    from mhc_megatron.bench.part_timing import PartTimer

    m = payload["micro_batches"]
    full = _SinglePipeline(payload["config"], payload["overrides"], m)
    timer = PartTimer(full.model[0].module)
    schedule, optimizer = [], []
    for repeat in range(payload["repeats"] + 1):
        if repeat == 1:  # the first round warms up
            timer.passes.clear()
        with timer.recording():
            schedule.append(full.schedule(m))
        optimizer.append((full.schedule(1), full.optimizer_step())[1])
    passes = [sum(timer.durations(stamps)) for stamps in timer.passes]
    return {"schedule": statistics.median(schedule[1:]), "optimizer": statistics.median(optimizer[1:]),
            "pass": statistics.median(passes), **timer.parts()}


def _worker(kind: str, rank: int, world: int, port: int, payload: dict, queue) -> None:
    """A child process: one gloo endpoint of the p2p test, one stage of the effective-cores probe,
    or the PP = 1 timings."""
    torch.set_num_threads(1)
    if kind == "p2p":
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        results = {}
        for size in payload["sizes"]:
            buffer, times = torch.zeros(size // 4), []
            for _ in range(payload["repeats"] + 2):
                torch.distributed.barrier()
                started = time.perf_counter()
                if rank == 0:
                    torch.distributed.send(buffer, 1)
                    torch.distributed.recv(buffer, 1)
                else:
                    torch.distributed.recv(buffer, 0)
                    torch.distributed.send(buffer, 0)
                times.append((time.perf_counter() - started) / 2)
            results[size] = min(times[2:])
        torch.distributed.destroy_process_group()
        if rank == 0:
            queue.put(results)
    else:
        from mhc_megatron.megatron import destroy_parallel, initialize_parallel

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port + 1 + rank), RANK="0", WORLD_SIZE="1")
        initialize_parallel()
        try:
            if kind == "stage":  # a one-process megatron world each, and a gloo group of the stages
                store = torch.distributed.TCPStore("127.0.0.1", port, world, rank == 0)
                neighbours = torch.distributed.ProcessGroupGloo(store, rank, world)
                queue.put(_stage_time(payload, neighbours, rank, world))
            else:
                queue.put(_single_pipeline_times(payload))
        finally:
            destroy_parallel()


def _stage_time(payload: dict, neighbours, rank: int, world: int) -> float:
    """Median seconds of one stage's work over the step's micro-batches: each a pass (forward and
    backward) of a model of ``layers`` layers followed, when ``world`` > 1, by a blocking exchange
    of the hop's message with each neighbouring process over the gloo group ``neighbours``, as a
    pipeline rank meets its neighbours after every pass."""
    stage = _SinglePipeline(payload["config"], [*payload["overrides"], f"num_layers={payload['layers']}"], 1)
    outgoing = torch.zeros(payload["hop_bytes"] // 4)
    incoming = torch.empty_like(outgoing)
    peers = [peer for peer in (rank - 1, rank + 1) if 0 <= peer < world]

    def micro_batches() -> float:
        started = time.perf_counter()
        for _ in range(payload["micro_batches"]):
            stage.schedule(1)
            exchanges = [work for peer in peers
                         for work in (neighbours.send([outgoing], peer, 0), neighbours.recv([incoming], peer, 0))]
            for work in exchanges:
                work.wait()
        return time.perf_counter() - started

    times = [micro_batches() for _ in range(payload["repeats"] + 1)]
    return statistics.median(times[1:])


def effective_cores(args: argparse.Namespace, shape: dict, mode: str, processes: int) -> float:
    """How many of this machine's cores ``processes`` single-threaded pipeline ranks get together:
    each runs one stage's work (``L / processes`` layers, a pass per micro-batch, an exchange of the
    hop's message with its neighbours after each pass), alone (no exchanges) and then all at once,
    twice in turn; ``processes`` x (time alone / time side by side), at most ``processes``. It folds
    in what processor sharing leaves out: context switches, shared caches, a rank that waits for a
    neighbour the operating system has not scheduled, other users' load at the time."""
    payload = {"config": args.config, "overrides": [*args.overrides, f"hc_mode={mode}"],
               "layers": max(1, shape["num_layers"] // processes),
               "micro_batches": shape["global_batch_size"] // shape["micro_batch_size"], "repeats": args.repeats,
               "hop_bytes": hop_bytes(shape, mode)}
    alone, together = [], []
    for _ in range(2):
        alone += _spawn("stage", 1, payload)
        together += _spawn("stage", processes, payload)
    return min(float(processes), processes * statistics.median(alone) / statistics.median(together))


def _spawn(kind: str, world: int, payload: dict) -> list:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = 29600 + os.getpid() % 300
    processes = [context.Process(target=_worker, args=(kind, rank, world, port, payload, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    results = []
    while len(results) < (1 if kind == "p2p" else world):
        try:
            results.append(queue.get(timeout=5))
        except Empty:
            if any(process.exitcode not in (None, 0) for process in processes):
                for process in processes:
                    process.kill()
                raise RuntimeError(f"a {kind} benchmark process failed (its traceback is above)") from None
    for process in processes:
        process.join()
    return results


def p2p_link(repeats: int, size: int = 1 << 24) -> dict:
    """gloo one-way latency (s, 4-byte message) and bandwidth (bytes/s, from a ``size`` message),
    each from the fastest of ``repeats`` round trips."""
    times = _spawn("p2p", 2, {"sizes": [4, size], "repeats": repeats})[0]
    return {"latency": times[4], "bandwidth": size / (times[size] - times[4])}


def train(config: str, overrides: list[str], pp: int, vpp: int, iters: int, warmup: int) -> dict:
    """One ``mhc-train`` run under torchrun; median step time (s) after ``warmup`` steps."""
    with tempfile.TemporaryDirectory() as run_dir:
        # metrics.jsonl has every step; a log interval beyond the run keeps the Amax-gain recording
        # (extra work the calibration does not time) out of the timed steps
        settings = [*overrides, f"pipeline_model_parallel_size={pp}", f"train_iters={iters}", "eval_interval=100000",
                    "lr_warmup_iters=1", f"log_interval={iters + 1}", f"run_dir={run_dir}", "save=null", "load=null"]
        if vpp > 1:
            settings.append(f"virtual_pipeline_model_parallel_size={vpp}")
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--nproc-per-node", str(pp), "-m", "mhc_megatron.train", "--config", config, *settings]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(Path(run_dir) / "metrics.jsonl") as stream:
            steps = [json.loads(line)["step_time_s"] for line in stream if "step_time_s" in line]
    return {"median": statistics.median(steps[warmup:]), "steps": steps, "command": " ".join(command[1:])}


def predict(calibration: dict, shape: dict, pp: int, vpp: int, cores: float | None) -> float:
    """The simulator's step time (s) for a PP x VPP run from the calibration's measured durations.

    A pass of chunk ``g`` (global layers ``g k .. g k + k - 1``, ``k = layers / (pp vpp)``) costs
    its layers' measured forward (backward), the forward prologue, and on the first chunk the
    embedding, on the last the head (``part_timing``). Hops carry ``n s b C`` float32 values at the
    measured gloo latency and bandwidth, blocking (megatron on CPU). The tail is the whole model's
    optimizer step spread over the ``pp`` stages, which step their own parameters side by side on
    ``min(pp, cores)`` processors (``cores=None``: one per stage). The schedule's own work beyond
    its passes (``schedule_overhead``, at most 2 % of a pass at PP = 1 in docs/planner.md) is left
    out."""
    per_chunk = shape["num_layers"] // (pp * vpp)
    micro_batches = shape["global_batch_size"] // shape["micro_batch_size"]
    plan = build(pp, vpp, micro_batches)
    last = plan.total_chunks - 1

    def compute(task: Task, stage: int) -> float:
        layers = slice(task.chunk * per_chunk, (task.chunk + 1) * per_chunk)
        if task.kind == "F":
            return (sum(calibration["layer_forward"][layers]) + calibration["prologue"]
                    + (calibration["embedding_forward"] if task.chunk == 0 else 0.0)
                    + (calibration["head_forward"] if task.chunk == last else 0.0))
        return (sum(calibration["layer_backward"][layers])
                + (calibration["embedding_backward"] if task.chunk == 0 else 0.0)
                + (calibration["head_backward"] if task.chunk == last else 0.0))

    def transfer(task: Task, src: int, dst: int) -> float:
        return calibration["latency"] + calibration["hop_bytes"] / calibration["bandwidth"]

    tail = calibration["tail"] / min(pp, cores or pp)
    return simulate(plan, Costs(compute, transfer, tail), overlap=False, shared_cores=cores).step_time


def hop_bytes(shape: dict, hc_mode: str) -> int:
    """Bytes of one stage-to-stage hop per micro-batch: every token's stream state in float32."""
    streams = stream_count(hc_mode, shape.get("num_streams", NUM_STREAMS))
    tokens = shape["seq_length"] * shape["micro_batch_size"]
    return tokens * stream_state_bytes(streams, shape["hidden_size"], FLOAT32_BYTES)


def calibrate(args: argparse.Namespace, shape: dict, mode: str) -> dict:
    """Per-pass durations (s) for ``mode`` from the PP = 1 timings (see the module docstring)."""
    m = shape["global_batch_size"] // shape["micro_batch_size"]
    payload = {"config": args.config, "overrides": [*args.overrides, f"hc_mode={mode}"],
               "micro_batches": m, "repeats": args.repeats}
    t = _spawn("single", 1, payload)[0]
    calibration = {
        **{key: t[key] for key in PARTS},
        "schedule_overhead": t["schedule"] / m - t["pass"],
        "tail": t["optimizer"],
        "hop_bytes": hop_bytes(shape, mode),
        "timings": {"schedule": t["schedule"], "pass": t["pass"], "optimizer": t["optimizer"]},
    }
    calibration.update(p2p_link(4 * args.repeats))
    return calibration


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    shape = shape_of(args.config, args.overrides)
    layouts = [tuple(int(v) for v in layout.split("x")) for layout in args.layouts]
    cores = os.cpu_count()
    report = {"config": args.config, "overrides": args.overrides, "date": time.strftime("%Y-%m-%d %H:%M"),
              "cores": cores, "modes": {}}
    for mode in args.modes:
        mode_shape = {**shape, "hc_mode": mode}
        calibration = calibrate(args, mode_shape, mode)
        calibration["effective_cores"] = {pp: effective_cores(args, mode_shape, mode, pp) for pp in sorted({pp for pp, _ in layouts})}
        runs = {layout: [] for layout in layouts}
        for _ in range(args.rounds):  # rounds at different moments, pooled
            for pp, vpp in layouts:
                load = os.getloadavg()[0]
                runs[(pp, vpp)].append({**train(args.config, [*args.overrides, f"hc_mode={mode}"], pp, vpp,
                                                args.train_iters, args.warmup), "load_average": load})
        rows = []
        for (pp, vpp), measured in runs.items():
            median = statistics.median(step for r in measured for step in r["steps"][args.warmup:])
            predicted = predict(calibration, mode_shape, pp, vpp, calibration["effective_cores"][pp])
            loads = [r["load_average"] for r in measured]
            rows.append({"pp": pp, "vpp": vpp, "measured": median, "predicted": predicted,
                         "error": predicted / median - 1, "runs": measured})
            print(f"{mode:8} PP {pp} VPP {vpp}: measured {median * 1e3:7.1f} ms, predicted {predicted * 1e3:7.1f} ms "
                  f"({100 * rows[-1]['error']:+.1f} %), effective cores {calibration['effective_cores'][pp]:.2f}, "
                  f"load {', '.join(f'{x:.1f}' for x in loads)}", flush=True)
        report["modes"][mode] = {"calibration": calibration, "runs": rows}
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.json}")
