"""Activation memory of a slice of transformer layers: residual, mHC, and mHC with block recompute.

For each variant it builds megatron-core's decoder (the layers and the final norm, no embedding or
output layer) in one process, runs forward and backward on random hidden states, and reports:

- ``measured``: the bytes autograd holds for backward at the end of the forward pass (every saved
  tensor's storage counted once, parameters excluded; a state freed by block recompute counts 0),
  per token and layer; on a GPU also the allocator's peak during forward + backward above the
  memory before it (``torch.cuda.max_memory_allocated``);
- ``model``: the analytic count of ``activation_bytes_per_token_layer`` (docs/memory.md);
- the median time of forward + backward (variants timed in turn, round-robin), and each variant's
  overhead over the residual model.

The analytic model assumes megatron-core's local layer spec with RMSNorm, no linear biases, no
dropout, rotary embeddings and unfused (materialised) attention scores, which is what runs here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass

import torch

from mhc_megatron.megatron.recompute import default_block_size

FLOAT32 = 4


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


def residual_bytes_per_token_layer(shape: SliceShape) -> float:
    """What one residual layer keeps per token (see docs/memory.md for the list).

    Each RMSNorm keeps its input, its normalised input and the 1/rms (fp32) and the linear after it
    keeps the norm's output (3C + 1); attention keeps q and k (2C), the fused qkv (3C, for v), the
    softmax output (h * s), the context (C), the causal mask (s * s bytes per sequence) and the
    rotary tables (4 x C/h per position); the MLP keeps fc1's output and the activation (2 F).
    """
    e = torch.finfo(shape.dtype).bits // 8
    per_position_tables = 4 * (shape.hidden // shape.heads) * FLOAT32 / shape.micro_batch
    return (
        2 * (3 * shape.hidden * e + FLOAT32)  # two norms and the linears after them
        + (2 + 3 + 1) * shape.hidden * e  # q, k, qkv, context
        + shape.heads * shape.seq * e  # softmax output
        + 2 * shape.ffn * e  # fc1 output, activation output
        + shape.seq / shape.micro_batch  # causal mask, bool
        + per_position_tables
    )


def hyper_connection_bytes_per_token_layer(shape: SliceShape, block_size: int | None) -> float:
    """What the two hyper-connections of one mHC layer add per token.

    Per sub-layer: the float32 coefficients, h_res (n^2), h_pre and h_post (2n), and the projection
    with its rms (n^2 + 2n + 1); without recompute also its input stream state (n C) and its output
    (C, for the gradient of h_post). Block recompute keeps the input state at block starts only
    (``kept_state_fraction``), and the sub-layer input the norm would keep (C, counted in the
    residual layer) is rebuilt too, which the kept output (C) offsets.
    """
    e = torch.finfo(shape.dtype).bits // 8
    n, c = shape.streams, shape.hidden
    coefficients = (2 * n * n + 4 * n + 1) * FLOAT32
    if block_size is None:
        return 2 * (n * c * e + c * e + coefficients)
    return 2 * (kept_state_fraction(shape.layers, block_size) * n * c * e + coefficients)


def kept_state_fraction(layers: int, block_size: int) -> float:
    """Share of the 2 L sub-layer input states block recompute keeps: the block starts."""
    sublayers = 2 * layers
    return -(-sublayers // block_size) / sublayers


def activation_bytes_per_token_layer(shape: SliceShape, hc_mode: str, block_size: int | None) -> float:
    """The analytic model: residual layer, plus the hyper-connections for ``hc_mode='mhc'``, plus the
    slice's final RMSNorm (input, normalised input, 1/rms) spread over the layers."""
    e = torch.finfo(shape.dtype).bits // 8
    total = residual_bytes_per_token_layer(shape) + (2 * shape.hidden * e + FLOAT32) / shape.layers
    if hc_mode == "mhc":
        total += hyper_connection_bytes_per_token_layer(shape, block_size)
    return total


def peak_bytes_per_token_layer(shape: SliceShape, hc_mode: str, block_size: int | None) -> float:
    """The model's peak: the end of forward plus, with block recompute, what is rebuilt for the
    slice's last sub-layer at the start of backward, while almost everything else is still held: its
    layer input (C) and, unless it starts a block, its input state (n C). Later rebuilds come after
    backward has released more than they hold."""
    total = activation_bytes_per_token_layer(shape, hc_mode, block_size)
    if hc_mode == "mhc" and block_size is not None:
        e = torch.finfo(shape.dtype).bits // 8
        last_state_rebuilt = (2 * shape.layers - 1) % block_size != 0
        total += (last_state_rebuilt * shape.streams + 1) * shape.hidden * e / shape.layers
    return total


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=None, help="default 4 x hidden")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[],
                        help="L_r values to measure besides the default sqrt(n L / (n + 2))")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward + backward runs (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default="mhc-bench-memory.json", help="where to write the results")


def _variants(args) -> list[tuple[str, str, int | None]]:
    default = default_block_size(args.streams, 2 * args.layers)
    sizes = sorted({default, *args.block_sizes})
    return [("residual", "residual", None), ("mhc", "mhc", None)] + [
        (f"mhc + block recompute L_r={size}{' (default)' if size == default else ''}", "mhc", size) for size in sizes
    ]


def _build_decoder(shape: SliceShape, hc_mode: str, block_size: int | None, device: torch.device):
    from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks

    config = MhcTransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, hc_mode=hc_mode, num_streams=shape.streams,
        mhc_recompute="none" if block_size is None else "block", mhc_recompute_block=block_size,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=device.type == "cpu", params_dtype=shape.dtype, pipeline_dtype=shape.dtype,
        bf16=shape.dtype == torch.bfloat16,
    )
    torch.manual_seed(0)
    model = build_model_chunks(config, vocab_size=128, max_sequence_length=shape.seq, backend="local",
                               position_embedding_type="rope")[0].to(device)
    return model


class SavedTensorBytes:
    """Bytes of the storages autograd holds for backward (each counted once, parameters excluded),
    sampled at the end of forward and after every rebuild of block recompute (its peak)."""

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


def _trackers(model) -> list:
    return list({id(t): t for layer in model.decoder.layers if (t := layer.block_recompute)}.values())


def _held_bytes(model, hidden: torch.Tensor, rotary) -> tuple[float, float]:
    """(bytes held at the end of forward, peak bytes held during forward + backward)."""
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
    times: list[float]
    cuda_peak: float | None = None

    def step(self) -> None:
        """One timed forward + backward (and, on a GPU, its allocator peak above the start)."""
        cuda = self.hidden.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        output = self.model.decoder(hidden_states=self.hidden, attention_mask=None, rotary_pos_emb=self.rotary)
        output.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated() - before
        self.times.append(time.perf_counter() - started)
        self.model.zero_grad(set_to_none=True)


def _measure_all(shape: SliceShape, variants, repeats: int, device: torch.device) -> dict:
    """Memory of each variant, then their step times measured round-robin (so that a change of load
    during the run shifts every variant alike), medians of ``repeats``."""
    tokens = shape.seq * shape.micro_batch
    results, runs = {}, {}
    for label, hc_mode, block_size in variants:
        model = _build_decoder(shape, hc_mode, block_size, device)
        hidden = torch.randn(shape.seq, shape.micro_batch, shape.hidden, dtype=shape.dtype, device=device,
                             requires_grad=True)
        rotary = model.rotary_pos_emb(shape.seq)
        held, peak_held = _held_bytes(model, hidden, rotary)  # also the untimed first step
        model.zero_grad(set_to_none=True)
        runs[label] = _Variant(hc_mode, block_size, model, hidden, rotary, [])
        results[label] = {
            "measured_bytes_per_token_layer": held / tokens / shape.layers,
            "model_bytes_per_token_layer": activation_bytes_per_token_layer(shape, hc_mode, block_size),
            "measured_peak_bytes_per_token_layer": peak_held / tokens / shape.layers,
            "model_peak_bytes_per_token_layer": peak_bytes_per_token_layer(shape, hc_mode, block_size),
        }
        print(f"measured the memory of {label}", flush=True)
    for _ in range(repeats):
        for run in runs.values():
            run.step()
    for label, run in runs.items():
        results[label]["step_ms"] = 1000 * statistics.median(run.times)
        if run.cuda_peak is not None:
            results[label]["cuda_peak_bytes_per_token_layer"] = run.cuda_peak / tokens / shape.layers
    return results


def run(args: argparse.Namespace) -> None:
    from mhc_megatron.megatron import destroy_parallel, initialize_parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SliceShape(
        layers=args.layers, hidden=args.hidden, ffn=args.ffn or 4 * args.hidden, heads=args.heads, seq=args.seq,
        micro_batch=args.micro_batch, streams=args.streams, dtype=getattr(torch, args.dtype),
    )
    initialize_parallel()
    try:
        results = _measure_all(shape, _variants(args), args.repeats, device)
    finally:
        destroy_parallel()
    _print_table(shape, results, device)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(shape).items()},
        "results": results,
    }
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.json}")


def _print_table(shape: SliceShape, results: dict, device: torch.device) -> None:
    base = results["residual"]
    print(
        f"\nactivation bytes per token and layer: {shape.layers} layers, hidden {shape.hidden}, ffn {shape.ffn}, "
        f"heads {shape.heads}, seq {shape.seq}, micro-batch {shape.micro_batch}, n = {shape.streams}, "
        f"{str(shape.dtype).removeprefix('torch.')}, {device.type}"
    )
    print(f"{'':42} {'end of forward':>31}   {'peak (+ rebuilt in bwd)':>31}   {'forward + backward':>20}")
    print(f"{'variant':42} {'measured':>9} {'vs res.':>8} {'model':>9} {'err':>4}   {'measured':>9} {'vs res.':>8} "
          f"{'model':>9} {'err':>4}   {'ms':>9} {'vs res.':>8}")
    for label, r in results.items():
        row = [f"{label:42}"]
        for key in ("", "peak_"):
            measured, modelled = r[f"measured_{key}bytes_per_token_layer"], r[f"model_{key}bytes_per_token_layer"]
            baseline = base[f"measured_{key}bytes_per_token_layer"]
            row.append(f"{measured:9.0f} {100 * (measured / baseline - 1):+7.1f}% {modelled:9.0f} "
                       f"{100 * (modelled / measured - 1):+3.0f}%  ")
        row.append(f"{r['step_ms']:9.1f} {100 * (r['step_ms'] / base['step_ms'] - 1):+7.1f}%")
        print(" ".join(row))
