"""Pipeline step time on this CPU: measured runs against the planner's simulator fed with measurements.

Steps, for one training config and its overrides (e.g. ``configs/tiny-cpu.yaml micro_batch_size=2``):

1. **Calibration**, with one thread per process (what torchrun gives each rank):
   - three ``mhc-train`` runs at PP = 1 (median step times after warm-up): the config as it is
     (``m`` micro-batches, ``L`` layers), with ``2 m`` micro-batches, and with ``L / 2`` layers. The
     second minus the first over ``m`` is one micro-batch's time; the first minus the third over
     ``m L / 2`` is one layer's forward + backward; what a micro-batch takes beyond its layers, the
     output layer and the embedding is the schedule's own per-pass work (``pass_overhead``: the
     forward-step wrapper, the loss, autograd's entry; each pipeline chunk pays it again); what the
     step takes beyond its micro-batches is the per-step tail (optimizer, gradient norm);
   - one process: the forward / backward split of a layer (a slice of ``L`` layers), and the output
     layer + cross-entropy and the embedding (plain torch ops of the same shapes);
   - gloo point-to-point latency (4-byte message) and bandwidth (one hop's bytes) between two local
     processes, fastest of the repeats (other users' load only ever slows it).
2. **Runs**: ``torchrun --nproc-per-node P -m mhc_megatron.train`` at each PP (and VPP), median
   ``step_time_s`` after the warm-up steps.
3. **Prediction**: the simulator (blocking transfers in megatron's order, the P ranks sharing this
   machine's cores by processor sharing) with those durations, against the measured median.
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

import torch
import yaml

from mhc_megatron.plan.schedule import Task, build
from mhc_megatron.plan.simulator import Costs, simulate

VOCAB = 512  # byte-level tokenizer, padded to 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings of the config (as mhc-train takes them)")
    parser.add_argument("--layouts", nargs="+", default=["2x1", "4x1"], help="PPxVPP pipeline layouts to run")
    parser.add_argument("--modes", nargs="+", default=["residual", "mhc"])
    parser.add_argument("--train-iters", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of the calibration benchmarks")
    parser.add_argument("--json", default="mhc-bench-pipeline.json")


def shape_of(config: str, overrides: list[str]) -> dict:
    """The config's keys with ``key=value`` overrides applied (values parsed as YAML)."""
    with open(config) as stream:
        values = yaml.safe_load(stream)
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    return values


def _layer_times(shape: dict, hc_mode: str, repeats: int) -> dict:
    """Seconds per micro-batch: one layer's forward and backward, the output layer + loss, the embedding."""
    from mhc_megatron.bench.memory import SliceShape, _build_decoder

    s, b, c = shape["seq_length"], shape["micro_batch_size"], shape["hidden_size"]
    slice_shape = SliceShape(layers=shape["num_layers"], hidden=c, ffn=shape.get("ffn_hidden_size") or 4 * c,
                             heads=shape["num_attention_heads"], seq=s, micro_batch=b,
                             streams=shape.get("num_streams", 4), dtype=torch.float32)
    model = _build_decoder(slice_shape, hc_mode, None, torch.device("cpu"))
    hidden = torch.randn(s, b, c, requires_grad=True)
    rotary = model.rotary_pos_emb(s)
    forward, backward = [], []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        output = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
        middle = time.perf_counter()
        output.float().square().mean().backward()
        forward.append(middle - started)
        backward.append(time.perf_counter() - middle)
        model.zero_grad(set_to_none=True)
    layers = shape["num_layers"]
    weight = torch.randn(VOCAB, c, requires_grad=True)
    table = torch.nn.Embedding(VOCAB, c)
    tokens = torch.randint(0, VOCAB, (b, s))
    head_forward, head_backward, embedding = [], [], []
    for _ in range(repeats + 1):
        x = torch.randn(s * b, c, requires_grad=True)
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(x @ weight.t(), tokens.reshape(-1))
        middle = time.perf_counter()
        loss.backward()
        head_forward.append(middle - started)
        head_backward.append(time.perf_counter() - middle)
        started = time.perf_counter()
        table(tokens).sum().backward()
        embedding.append(time.perf_counter() - started)
    median = lambda values: statistics.median(values[1:])  # noqa: E731 - the first pass warms up
    return {"forward": median(forward) / layers, "backward": median(backward) / layers,
            "head_forward": median(head_forward), "head_backward": median(head_backward),
            "embedding": median(embedding)}


def _worker(kind: str, rank: int, world: int, port: int, payload: dict, queue) -> None:
    """A child process: one gloo endpoint of the p2p test, or one copy of the layer benchmark."""
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
            queue.put(_layer_times(payload["shape"], payload["hc_mode"], payload["repeats"]))
        finally:
            destroy_parallel()


def _spawn(kind: str, world: int, payload: dict) -> list:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = 29600 + os.getpid() % 300
    processes = [context.Process(target=_worker, args=(kind, rank, world, port, payload, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    results = [queue.get() for _ in range(1 if kind == "p2p" else world)]
    for process in processes:
        process.join()
    return results


def p2p_link(hop_bytes: int, repeats: int) -> dict:
    """gloo one-way latency (s, 4-byte message) and bandwidth (bytes/s, from a ``hop_bytes`` message),
    each the fastest of ``repeats`` round trips."""
    times = _spawn("p2p", 2, {"sizes": [4, hop_bytes], "repeats": repeats})[0]
    return {"latency": times[4], "bandwidth": hop_bytes / max(times[hop_bytes] - times[4], 1e-9)}


def train(config: str, overrides: list[str], pp: int, vpp: int, iters: int, warmup: int) -> dict:
    """One ``mhc-train`` run under torchrun; median step time (s) after ``warmup`` steps."""
    with tempfile.TemporaryDirectory() as run_dir:
        settings = [*overrides, f"pipeline_model_parallel_size={pp}", f"train_iters={iters}", "eval_interval=100000",
                    "lr_warmup_iters=1", "log_interval=1", f"run_dir={run_dir}", "save=null", "load=null"]
        if vpp > 1:
            settings.append(f"virtual_pipeline_model_parallel_size={vpp}")
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--nproc-per-node", str(pp), "-m", "mhc_megatron.train", "--config", config, *settings]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(Path(run_dir) / "metrics.jsonl") as stream:
            steps = [json.loads(line)["step_time_s"] for line in stream if "step_time_s" in line]
    return {"median": statistics.median(steps[warmup:]), "steps": steps, "command": " ".join(command[1:])}


def predict(calibration: dict, shape: dict, pp: int, vpp: int, cores: float | None) -> float:
    """The simulator's step time (s) for a PP x VPP run from the calibration's measured durations:
    chunk passes of ``layers / (pp vpp)`` layers plus the per-pass overhead (half in forward, half in
    backward), the embedding on the first chunk (a third in forward), the output layer + loss on the
    last chunk, hops of ``n s b C`` float32 values at the measured gloo latency and bandwidth,
    blocking (megatron on CPU), the measured per-step tail."""
    layers = shape["num_layers"] // (pp * vpp)
    micro_batches = shape["global_batch_size"] // shape["micro_batch_size"]
    plan = build(pp, vpp, micro_batches)
    last = plan.total_chunks - 1

    def compute(task: Task, stage: int) -> float:
        overhead = calibration["pass_overhead"] / 2
        if task.kind == "F":
            return (layers * calibration["forward"] + overhead + (calibration["head_forward"] if task.chunk == last else 0.0)
                    + (calibration["embedding"] / 3 if task.chunk == 0 else 0.0))
        return (layers * calibration["backward"] + overhead + (calibration["head_backward"] if task.chunk == last else 0.0)
                + (2 * calibration["embedding"] / 3 if task.chunk == 0 else 0.0))

    def transfer(task: Task, src: int, dst: int) -> float:
        return calibration["latency"] + calibration["hop_bytes"] / calibration["bandwidth"]

    return simulate(plan, Costs(compute, transfer, calibration["tail"]), overlap=False, shared_cores=cores).step_time


def hop_bytes(shape: dict, hc_mode: str) -> int:
    streams = 1 if hc_mode == "residual" else shape.get("num_streams", 4)
    return streams * shape["seq_length"] * shape["micro_batch_size"] * shape["hidden_size"] * 4


def calibrate(args: argparse.Namespace, shape: dict, mode: str) -> dict:
    """Per-pass durations (s) for ``mode`` from three PP = 1 runs and the benchmarks (module docstring)."""
    settings = [*args.overrides, f"hc_mode={mode}"]
    raw = _spawn("layers", 1, {"shape": shape, "hc_mode": mode, "repeats": args.repeats})[0]
    layers, micro_batches = shape["num_layers"], shape["global_batch_size"] // shape["micro_batch_size"]
    run = lambda *extra: train(args.config, [*settings, *extra], 1, 1, args.train_iters, args.warmup)  # noqa: E731
    base = run()
    double = run(f"global_batch_size={2 * shape['global_batch_size']}")
    half = run(f"num_layers={layers // 2}")
    per_micro_batch = (double["median"] - base["median"]) / micro_batches
    per_layer = (base["median"] - half["median"]) / (micro_batches * (layers // 2))
    forward_share = raw["forward"] / (raw["forward"] + raw["backward"])
    head = raw["head_forward"] + raw["head_backward"] + raw["embedding"]
    calibration = {
        "forward": forward_share * per_layer,
        "backward": (1 - forward_share) * per_layer,
        "pass_overhead": max(0.0, per_micro_batch - layers * per_layer - head),
        **{key: raw[key] for key in ("head_forward", "head_backward", "embedding")},
        "tail": max(0.0, base["median"] - micro_batches * per_micro_batch),
        "hop_bytes": hop_bytes(shape, mode),
        "benchmark": raw,
        "pp1_runs": {"base": base, "double_batch": double, "half_layers": half},
    }
    calibration.update(p2p_link(calibration["hop_bytes"], 4 * args.repeats))
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
        rows = []
        for pp, vpp in layouts:
            load_before = os.getloadavg()[0]
            measured = train(args.config, [*args.overrides, f"hc_mode={mode}"], pp, vpp, args.train_iters, args.warmup)
            predicted = predict(calibration, mode_shape, pp, vpp, cores)
            rows.append({"pp": pp, "vpp": vpp, "measured": measured["median"], "predicted": predicted,
                         "error": predicted / measured["median"] - 1, "load_average": load_before,
                         "steps": measured["steps"], "command": measured["command"]})
            print(f"{mode:8} PP {pp} VPP {vpp}: measured {measured['median'] * 1e3:7.1f} ms, predicted "
                  f"{predicted * 1e3:7.1f} ms ({100 * rows[-1]['error']:+.1f} %), load {load_before:.1f}", flush=True)
        report["modes"][mode] = {"calibration": calibration, "runs": rows}
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.json}")
