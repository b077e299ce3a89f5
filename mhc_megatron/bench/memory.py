"""Activation memory of a slice of transformer layers: residual, mHC, and mHC with block recompute.

For each variant it builds megatron-core's decoder (the layers and the final norm, no embedding or
output layer) in one process, runs forward and backward on random hidden states, and reports, per
token and layer:

- **saved bytes**: the bytes autograd holds for backward (every saved tensor's storage counted
  once, parameters excluded; a state freed by block recompute counts 0), sampled at the end of
  forward and, with block recompute, again after every rebuild in backward; ``max_sampled`` is the
  largest of these samples. It is a count of saved tensors at chosen moments, not the process's
  memory: it leaves out the parameter gradients, the temporaries of forward and backward and what
  the C library keeps;
- ``model`` next to each: the analytic count of ``activation_bytes_per_token_layer`` and
  ``sampled_max_bytes_per_token_layer`` (docs/memory.md), and ``model_no_scores``: the same for an
  attention that keeps no s x s scores (flash attention, what ``mhc-plan`` assumes and GPUs run);
- **the step's high-water mark**, the memory the process really used during one forward + backward
  above what it held before it: on a GPU the caching allocator's peak
  (``torch.cuda.max_memory_allocated``); on CPU two figures, see ``ResidentPeak`` and
  ``allocator_peak_bytes``: the resident set's peak (what the machine must provide) and the peak of
  the bytes torch's CPU allocator has handed out (tensors only, the CPU twin of the GPU figure);
  the parameter gradients the step allocates are reported beside them;
- the step time of forward + backward: variants run in turn, in interleaved rounds (order reversed
  every other round), and each comparison is the ratio of the two variants' fastest steps, with the
  range of the per-round ratios as its spread.

The analytic model assumes megatron-core's local layer spec with RMSNorm, no linear biases, no
dropout, rotary embeddings and unfused (materialised) attention scores, which is what runs here.
``--model-only`` prints the model alone, for any shape and dtype, without building a layer.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import re
import time
import weakref
from dataclasses import dataclass, field

import torch

from mhc_megatron.method import (
    FLOAT32_BYTES,
    NUM_STREAMS,
    REBUILD_SCHEMES,
    connection_kept_bytes,
    default_block_size,
    kept_state_fraction,
    mlp_kept_bytes,
    norm_and_attention_kept_bytes,
)


@dataclass(frozen=True)
class SliceShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    seq: int
    micro_batch: int
    streams: int
    dtype: torch.dtype


def residual_bytes_per_token_layer(shape: SliceShape, scores: bool = True) -> float:
    """What one residual layer keeps per token (see docs/memory.md for the list).

    Each RMSNorm keeps its input, its normalised input and the 1/rms (fp32) and the linear after it
    keeps the norm's output (3C + 1); attention keeps q and k (2C), the fused qkv (3C, for v), the
    softmax output (h * s), the context (C), the causal mask (s * s bytes per sequence) and the
    rotary tables (4 x C/h per position); the MLP keeps fc1's output and the activation (2 F).
    ``scores=False``: an attention that keeps no s x s scores (flash attention) keeps neither the
    softmax output nor the mask; its per-head logsumexp (h float32) is not counted, as in mhc-plan.
    """
    e = torch.finfo(shape.dtype).bits // 8
    per_position_tables = 4 * (shape.hidden // shape.heads) * FLOAT32_BYTES / shape.micro_batch
    score_bytes = shape.heads * shape.seq * e + shape.seq / shape.micro_batch  # softmax output, bool mask
    return (
        norm_and_attention_kept_bytes(shape.hidden, e)
        + mlp_kept_bytes(shape.ffn, e)
        + per_position_tables
        + (score_bytes if scores else 0)
    )


def hyper_connection_bytes_per_token_layer(shape: SliceShape, block_size: int | None) -> float:
    """What the two hyper-connections of one mHC layer add per token.

    Per sub-layer, ``method.connection_kept_bytes``: the float32 coefficients and, without
    recompute, its input stream state and its output; with block recompute the input states at
    block starts only.
    """
    e = torch.finfo(shape.dtype).bits // 8
    fraction = None if block_size is None else kept_state_fraction(2 * shape.layers, block_size)
    return 2 * connection_kept_bytes(shape.streams, shape.hidden, e, fraction)


def activation_bytes_per_token_layer(shape: SliceShape, hc_mode: str, block_size: int | None,
                                     scores: bool = True) -> float:
    """The analytic model of the bytes saved at the end of forward: residual layer, plus the
    hyper-connections for ``hc_mode='mhc'``, plus the slice's final RMSNorm (input, normalised input,
    1/rms) spread over the layers. ``scores=False``: attention without s x s scores."""
    e = torch.finfo(shape.dtype).bits // 8
    total = residual_bytes_per_token_layer(shape, scores) + (2 * shape.hidden * e + FLOAT32_BYTES) / shape.layers
    if hc_mode == "mhc":
        total += hyper_connection_bytes_per_token_layer(shape, block_size)
    return total


def sampled_max_bytes_per_token_layer(shape: SliceShape, hc_mode: str, block_size: int | None,
                                      scores: bool = True, rebuild: str = "sublayer") -> float:
    """The model of the largest saved-bytes sample: the end of forward plus, with block recompute,
    what is rebuilt at the start of backward, while almost everything else is still held: the
    slice's last sub-layer's layer input (C) and the states rebuilt then (n C each), the last
    sub-layer's unless it starts a block (``rebuild="sublayer"``) or all of the last block's but
    its start (``"block"``). Later rebuilds come after backward has released more than they hold."""
    total = activation_bytes_per_token_layer(shape, hc_mode, block_size, scores)
    if hc_mode == "mhc" and block_size is not None:
        e = torch.finfo(shape.dtype).bits // 8
        freed_in_last_block = (2 * shape.layers - 1) % block_size
        states = freed_in_last_block if rebuild == "block" else min(freed_in_last_block, 1)
        total += (states * shape.streams + 1) * shape.hidden * e / shape.layers
    return total


def modelled_saved_bytes(shape: SliceShape, hc_mode: str, block_size: int | None, rebuild: str = "sublayer") -> dict:
    """The model at both sampling moments, with and without s x s attention scores."""
    def largest(*args):
        return sampled_max_bytes_per_token_layer(*args, rebuild=rebuild)

    return {
        moment: {"model": count(shape, hc_mode, block_size), "model_no_scores": count(shape, hc_mode, block_size, False)}
        for moment, count in (("end_of_forward", activation_bytes_per_token_layer), ("max_sampled", largest))
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=None, help="default 4 x hidden")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--streams", type=int, default=NUM_STREAMS)
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[],
                        help="L_r values to measure besides the default sqrt(n L / (n + 2))")
    parser.add_argument("--rebuilds", nargs="+", choices=REBUILD_SCHEMES, default=["sublayer"],
                        help="how block recompute rebuilds a block's states (mhc_recompute_rebuild), each measured "
                             "at every L_r")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds: one forward + backward of every variant per round")
    parser.add_argument("--high-water-steps", type=int, default=2,
                        help="untimed steps per variant whose resident-set peak is read (the largest is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model-only", action="store_true",
                        help="print the analytic model (with and without s x s scores) and build nothing")
    parser.add_argument("--json", default="mhc-bench-memory.json", help="where to write the results")


def _variants(args) -> list[tuple[str, str, int | None, str]]:
    """``(label, hc_mode, L_r or None, rebuild)`` of each variant to measure."""
    default = default_block_size(args.streams, 2 * args.layers)
    sizes = sorted({default, *args.block_sizes})
    return [("residual", "residual", None, "sublayer"), ("mhc", "mhc", None, "sublayer")] + [
        (f"mhc + block recompute L_r={size}{' (default)' if size == default else ''}"
         f"{', block rebuild' if rebuild == 'block' else ''}", "mhc", size, rebuild)
        for rebuild in args.rebuilds for size in sizes
    ]


def _build_decoder(shape: SliceShape, hc_mode: str, block_size: int | None, device: torch.device, rebuild: str):
    from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks

    config = MhcTransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, hc_mode=hc_mode, num_streams=shape.streams,
        mhc_recompute="none" if block_size is None else "block", mhc_recompute_block=block_size,
        mhc_recompute_rebuild=rebuild, normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=device.type == "cpu", params_dtype=shape.dtype, pipeline_dtype=shape.dtype,
        bf16=shape.dtype == torch.bfloat16,
    )
    torch.manual_seed(0)
    model = build_model_chunks(config, vocab_size=128, max_sequence_length=shape.seq, backend="local",
                               position_embedding_type="rope")[0].to(device)
    return model


class SavedTensorBytes:
    """Bytes of the storages autograd holds for backward (each counted once, parameters excluded),
    sampled at the end of forward and after every rebuild of block recompute."""

    def __init__(self, model) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: list[weakref.ref] = []
        self.samples: list[float] = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.saved.append(weakref.ref(tensor))
        return tensor

    def sample(self) -> None:
        storages = {}
        for reference in self.saved:
            tensor = reference()
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.parameters and storage.nbytes() > 0:
                storages[storage.data_ptr()] = storage.nbytes()
        self.samples.append(float(sum(storages.values())))


class ResidentPeak:
    """The process's resident-set high-water mark during one step, above its resident set at the start.

    Linux keeps the high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``) and
    resets it to the current resident set when ``5`` is written to ``/proc/self/clear_refs``
    (since Linux 4.0). So the mark read after the step, minus the resident set read right after the
    reset, is the most the step added at any moment, whatever allocated it: tensors, the C
    library's arenas, Python objects, code first loaded by the step. Before the reset, glibc's
    ``malloc_trim(0)`` returns the free memory the C library kept from earlier work, which the step
    would otherwise reuse without a page fault (and so without showing). ``unavailable`` says why
    not, where the mark cannot be reset (not Linux, an old kernel, no permission); without
    ``malloc_trim`` (not glibc) ``method`` says the figure can read low.
    """

    STATUS = "/proc/self/status"
    CLEAR_REFS = "/proc/self/clear_refs"

    def __init__(self) -> None:
        self.unavailable: str | None = None
        self._malloc_trim = None
        libc_path = ctypes.util.find_library("c")
        if libc_path is not None:
            self._malloc_trim = getattr(ctypes.CDLL(libc_path), "malloc_trim", None)
        try:
            self._reset()
            self._read("VmHWM")
        except (OSError, ValueError) as error:
            self.unavailable = f"the resident-set high-water mark cannot be reset here ({error})"
        self.before = 0

    @property
    def method(self) -> str:
        if self.unavailable:
            return self.unavailable
        trim = ("after glibc's malloc_trim(0)" if self._malloc_trim is not None else
                "without malloc_trim (not glibc: free memory the C library kept is reused unseen, so it can read low)")
        return f"VmHWM - VmRSS of /proc/self/status, the mark reset by writing 5 to /proc/self/clear_refs {trim}"

    def _read(self, field_name: str) -> int:
        with open(self.STATUS) as status:
            match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
        if match is None:
            raise ValueError(f"no {field_name} in {self.STATUS}")
        return 1024 * int(match.group(1))

    def _reset(self) -> None:
        with open(self.CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")

    def start(self) -> None:
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        self._reset()
        self.before = self._read("VmRSS")

    def stop(self) -> int:
        return self._read("VmHWM") - self.before


ALLOCATOR_METHOD = ("peak of the running sum of the CPU allocations and frees torch's profiler records "
                    "(profile_memory=True) during one untimed step, from 0 at its start")


def allocator_peak_bytes(step) -> float:
    """The peak of the bytes torch's CPU allocator has handed out while ``step()`` runs, above the
    start: torch's profiler records every CPU allocation and free with its size (``profile_memory``);
    their running sum in time order, started at 0, peaks at the step's high-water mark of tensor
    memory. Frees of tensors made before the step are not recorded and so not subtracted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [event for event in profiler.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU]
    total = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return float(peak)


def _trackers(model) -> list:
    return list({id(t): t for layer in model.decoder.layers if (t := layer.block_recompute)}.values())


def _saved_bytes(model, hidden: torch.Tensor, rotary) -> tuple[float, float]:
    """(saved bytes at the end of forward, the largest sample: end of forward and every rebuild)."""
    counter = SavedTensorBytes(model)
    for tracker in _trackers(model):
        tracker.rebuild_observer = counter.sample
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        output = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
    counter.sample()
    end_of_forward = counter.samples[0]
    output.float().square().mean().backward()
    for tracker in _trackers(model):
        tracker.rebuild_observer = None
    return end_of_forward, max(counter.samples)


@dataclass
class _Variant:
    """One model of the comparison, its inputs and what was measured on it."""

    hc_mode: str
    block_size: int | None
    model: torch.nn.Module
    hidden: torch.Tensor
    rotary: torch.Tensor
    times: list[float] = field(default_factory=list)
    cuda_peak: float | None = None

    def forward_backward(self) -> None:
        output = self.model.decoder(hidden_states=self.hidden, attention_mask=None, rotary_pos_emb=self.rotary)
        output.float().square().mean().backward()

    def step(self) -> None:
        """One timed forward + backward (and, on a GPU, its allocator peak above the start)."""
        cuda = self.hidden.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        self.forward_backward()
        if cuda:
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated() - before
        self.times.append(time.perf_counter() - started)
        self.model.zero_grad(set_to_none=True)

    def resident_peak(self, meter: ResidentPeak) -> float:
        """One untimed forward + backward; what it added to the resident set at its peak."""
        meter.start()
        self.forward_backward()
        added = meter.stop()
        self.model.zero_grad(set_to_none=True)
        return float(added)

    def allocator_peak(self) -> float:
        peak = allocator_peak_bytes(self.forward_backward)
        self.model.zero_grad(set_to_none=True)
        return peak


def compare_times(times: list[float], baseline: list[float]) -> dict:
    """A variant's step times against a baseline's, both timed in the same rounds: the ratio of their
    fastest steps and the range of the per-round ratios."""
    per_round = [t / b for t, b in zip(times, baseline)]
    return {"ratio_of_minimums": min(times) / min(baseline), "per_round_min": min(per_round),
            "per_round_max": max(per_round)}


def _measure_all(shape: SliceShape, variants, repeats: int, high_water_steps: int, device: torch.device) -> dict:
    """Saved bytes of each variant; their step times in interleaved rounds (so that a change of load
    during the run shifts every variant alike); then each step's high-water mark."""
    per_token_layer = 1 / (shape.seq * shape.micro_batch * shape.layers)
    results, runs = {}, {}
    for label, hc_mode, block_size, rebuild in variants:
        model = _build_decoder(shape, hc_mode, block_size, device, rebuild)
        hidden = torch.randn(shape.seq, shape.micro_batch, shape.hidden, dtype=shape.dtype, device=device,
                             requires_grad=True)
        rotary = model.rotary_pos_emb(shape.seq)
        end_of_forward, sampled_max = _saved_bytes(model, hidden, rotary)  # also the untimed first step
        model.zero_grad(set_to_none=True)
        runs[label] = _Variant(hc_mode, block_size, model, hidden, rotary)
        modelled = modelled_saved_bytes(shape, hc_mode, block_size, rebuild)
        modelled["end_of_forward"]["measured"] = end_of_forward * per_token_layer
        modelled["max_sampled"]["measured"] = sampled_max * per_token_layer
        gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        results[label] = {
            "saved_bytes_per_token_layer": modelled,
            "step_high_water_bytes_per_token_layer": {},
            "parameter_gradient_bytes_per_token_layer": gradients * per_token_layer,
        }
        print(f"measured the saved bytes of {label}", flush=True)
    for round_index in range(repeats):
        for run in (runs.values() if round_index % 2 == 0 else reversed(runs.values())):
            run.step()
    meter = ResidentPeak() if device.type == "cpu" else None
    allocator_unavailable = None
    for label, run in runs.items():
        high_water = results[label]["step_high_water_bytes_per_token_layer"]
        results[label]["step_ms_per_round"] = [1000 * t for t in run.times]
        if run.cuda_peak is not None:
            high_water["cuda_allocator"] = run.cuda_peak * per_token_layer
        if meter is not None and not meter.unavailable:
            steps = [run.resident_peak(meter) * per_token_layer for _ in range(high_water_steps)]
            high_water["resident_set"] = max(steps)
            high_water["resident_set_per_step"] = steps
        if meter is not None and allocator_unavailable is None:
            try:
                high_water["cpu_allocator"] = run.allocator_peak() * per_token_layer
            except (AttributeError, RuntimeError) as error:  # a torch without the profiler's memory events
                allocator_unavailable = f"torch's profiler gave no allocation events here ({error!r})"
    labels = list(runs)
    comparisons = [{"variant": label, "baseline": "residual", **compare_times(runs[label].times, runs["residual"].times)}
                   for label in labels[1:]]
    comparisons += [{"variant": label, "baseline": "mhc", **compare_times(runs[label].times, runs["mhc"].times)}
                    for label in labels[2:]]
    methods = {"saved_bytes": "bytes of the storages autograd saved for backward (each once, parameters "
                              "excluded), sampled at the end of forward and after every rebuild of block recompute"}
    if device.type == "cuda":
        methods["cuda_allocator"] = "torch.cuda.max_memory_allocated() during the last timed step, minus the bytes allocated before it"
    else:
        methods["resident_set"] = meter.method
        methods["cpu_allocator"] = ALLOCATOR_METHOD if allocator_unavailable is None else allocator_unavailable
    return {"results": results, "comparisons": comparisons, "methods": methods}


def run(args: argparse.Namespace) -> None:
    shape = SliceShape(
        layers=args.layers, hidden=args.hidden, ffn=args.ffn or 4 * args.hidden, heads=args.heads, seq=args.seq,
        micro_batch=args.micro_batch, streams=args.streams, dtype=getattr(torch, args.dtype),
    )
    if args.model_only:
        results = {label: {"saved_bytes_per_token_layer": modelled_saved_bytes(shape, hc_mode, block_size, rebuild)}
                   for label, hc_mode, block_size, rebuild in _variants(args)}
        _print_model(shape, results)
        _write(args, shape, {"results": results}, "analytic model only")
        return
    from mhc_megatron.megatron import destroy_parallel, initialize_parallel
    from mhc_megatron.megatron.parallel import local_device

    if args.threads:
        torch.set_num_threads(args.threads)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    initialize_parallel()
    device = local_device()
    try:
        measured = _measure_all(shape, _variants(args), args.repeats, args.high_water_steps, device)
    finally:
        destroy_parallel()
    _print_table(shape, measured, device)
    device_name = (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"CPU ({cpu_model()}), {torch.get_num_threads()} threads")
    _write(args, shape, measured, device_name)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what lscpu prints), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write(args: argparse.Namespace, shape: SliceShape, measured: dict, device_name: str) -> None:
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "arguments": vars(args),
        "shape": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(shape).items()},
        "units": "bytes per token and layer; step times in ms",
        **measured,
    }
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.json}")


def _shape_line(shape: SliceShape, where: str) -> str:
    return (f"{shape.layers} layers, hidden {shape.hidden}, ffn {shape.ffn}, heads {shape.heads}, seq {shape.seq}, "
            f"micro-batch {shape.micro_batch}, n = {shape.streams}, {str(shape.dtype).removeprefix('torch.')}, {where}")


def _print_model(shape: SliceShape, results: dict) -> None:
    print(f"\nanalytic model of the saved bytes per token and layer: {_shape_line(shape, 'no measurement')}")
    print(f"{'':42} {'with s x s scores':>34}   {'without s x s scores':>34}")
    print(f"{'variant':42} {'end of fwd':>10} {'max sampled':>11} {'vs res.':>11}   "
          f"{'end of fwd':>10} {'max sampled':>11} {'vs res.':>11}")
    base = results["residual"]["saved_bytes_per_token_layer"]["max_sampled"]
    for label, r in results.items():
        saved = r["saved_bytes_per_token_layer"]
        row = [f"{label:42}"]
        for key in ("model", "model_no_scores"):
            end, top = saved["end_of_forward"][key], saved["max_sampled"][key]
            row.append(f"{end:10.0f} {top:11.0f} {100 * (top / base[key] - 1):+10.1f}%  ")
        print(" ".join(row))


def _print_table(shape: SliceShape, measured: dict, device: torch.device) -> None:
    results = measured["results"]
    base = results["residual"]["saved_bytes_per_token_layer"]
    print(f"\nbytes per token and layer: {_shape_line(shape, device.type)}")
    print("saved bytes: what autograd holds for backward, sampled at the end of forward and after every "
          "rebuild (max sampled); model: docs/memory.md; no scores: the model for attention without s x s scores")
    high_water_keys = ("cuda_allocator",) if device.type == "cuda" else ("resident_set", "cpu_allocator")
    print(f"{'variant':42} {'saved, end of fwd':>17} {'vs res.':>7} {'err':>4}  {'saved, max sampled':>18} "
          f"{'vs res.':>7} {'err':>4}  {'no scores':>9} {'vs res.':>7}  "
          + "  ".join(f"{'step peak: ' + key.replace('_', ' '):>26}" for key in high_water_keys)
          + f"  {'grads':>7}")
    for label, r in results.items():
        saved = r["saved_bytes_per_token_layer"]
        row = [f"{label:42}"]
        for moment, width in (("end_of_forward", 17), ("max_sampled", 18)):
            measured_bytes, modelled = saved[moment]["measured"], saved[moment]["model"]
            row.append(f"{measured_bytes:{width}.0f} {100 * (measured_bytes / base[moment]['measured'] - 1):+6.1f}% "
                       f"{100 * (modelled / measured_bytes - 1):+3.0f}% ")
        no_scores = saved["max_sampled"]["model_no_scores"]
        row.append(f"{no_scores:9.0f} {100 * (no_scores / base['max_sampled']['model_no_scores'] - 1):+6.1f}% ")
        high_water = r["step_high_water_bytes_per_token_layer"]
        row += [f"{high_water[key]:26.0f}" if key in high_water else f"{'-':>26}" for key in high_water_keys]
        row.append(f"{r['parameter_gradient_bytes_per_token_layer']:7.0f}")
        print(" ".join(row))
    for key, method in measured["methods"].items():
        print(f"  {key}: {method}")
    print("\nforward + backward, interleaved rounds: fastest step, and against the baseline the ratio of the "
          "fastest steps (the per-round ratios' range)")
    for label, r in results.items():
        line = f"{label:42} {min(r['step_ms_per_round']):9.1f} ms"
        for comparison in measured["comparisons"]:
            if comparison["variant"] == label:
                line += (f"   vs {comparison['baseline']}: {comparison['ratio_of_minimums']:.3f} "
                         f"({comparison['per_round_min']:.3f} - {comparison['per_round_max']:.3f})")
        print(line)
