"""Time each mHC operator, forward and backward, for the backends reference | compile | fused.

For every op (sinkhorn, mappings, mappings_pre, pre, post_res, hc_mappings_pre (HC's mappings and
read), post_res_mappings_pre, ``hc``: the full hyper-connection of one sub-layer, mappings_pre +
post_res with an identity sub-layer, and ``layer``: the two connections of a transformer layer as an
mHC layer runs them, mappings_pre, post_res_mappings_pre and post_res with the stream gradients
handed off, identity sub-layers) and
backend it reports the median time of the forward and of forward + backward (backward = the
difference), the bytes of the op's
minimal memory traffic (every input read once, every output written once), the achieved GB/s and
its fraction of the device's copy bandwidth (the fastest of its copies in the same run; likewise
the matrix-product rate below: noise only ever slows a run), and the op's floor: per pass
(forward, backward) the longer of its bytes at that copy bandwidth and its matrix products' FLOPs
(``method.fused_op_product_flops``) at the rate of a square matrix product measured in the same run
(a roofline: no kernel of the op can be faster), the two passes added. A composite has two floors:
``floor_ms``, the roofline of all its bytes and FLOPs together, which assumes one op's products
could overlap another's memory traffic; and ``ops_floor_ms``, its ops' floors added, the floor of
the ops as they run: in a connection a sub-layer separates them (post_res needs the sub-layer's
output, which needs mappings_pre's; backward runs the other way round), so no kernel overlaps them.
Writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from mhc_megatron.method import SINKHORN_ITERS, fused_op_bytes, fused_op_product_flops
from mhc_megatron.ops import (
    backends,
    fused,
    hc_mappings_pre,
    mhc_mappings,
    mhc_mappings_pre,
    mhc_post_res,
    mhc_post_res_mappings_pre,
    mhc_pre,
    num_mapping_columns,
    sinkhorn,
)

OPS = ("sinkhorn", "mappings", "mappings_pre", "pre", "post_res", "hc_mappings_pre", "post_res_mappings_pre", "hc",
       "layer")
# The fused ops each composite case runs.
COMPOSITES = {"hc": ("mappings_pre", "post_res"), "layer": ("mappings_pre", "post_res_mappings_pre", "post_res")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEFAULTS = {  # device type -> (tokens, hidden, streams, dtype)
    "cpu": (4096, 1024, 4, "float32"),
    "cuda": (16384, 4096, 4, "bfloat16"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tokens", type=int, default=None, help="default 4096 on CPU, 16384 on GPU")
    parser.add_argument("--hidden", type=int, default=None, help="C; default 1024 on CPU, 4096 on GPU")
    parser.add_argument("--streams", type=int, default=None, help="n; default 4")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--iters", type=int, default=SINKHORN_ITERS, help="Sinkhorn iterations")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--backends", nargs="+", choices=backends.BACKENDS, default=list(backends.BACKENDS))
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default="mhc-bench-kernels.json", help="where to write the results")


class Timer:
    """Wall times of a callable: CUDA events on a GPU, perf_counter on the CPU; the median (an op's
    time) or the fastest (a rate of the machine: noise only slows a run)."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def times_ms(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return times

    def median_ms(self, fn: Callable[[], object]) -> float:
        return statistics.median(self.times_ms(fn))

    def fastest_ms(self, fn: Callable[[], object]) -> float:
        return min(self.times_ms(fn))


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written), its fastest run."""
    numel = (256 << 20) // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (timer.fastest_ms(lambda: dst.copy_(src)) * 1e6)


def gemm_gflops(device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    """GFLOP/s of a square matrix product in ``dtype`` (2048 on the CPU, 8192 on a GPU), into a
    buffer allocated once, its fastest run: the best rate the projections of the mappings could run at."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    return 2 * size**3 / (timer.fastest_ms(lambda: torch.mm(a, b, out=out)) * 1e6)


@dataclass(frozen=True)
class Work:
    """What one op must do per call, forward and backward: bytes read plus written
    (``method.fused_op_bytes``) and FLOPs of its matrix products (``method.fused_op_product_flops``)."""

    bytes_forward: int
    bytes_backward: int
    flops_forward: int
    flops_backward: int

    def floor_ms(self, copy_gbps: float, gemm_gflops: float) -> float:
        """Per pass the longer of the bytes at ``copy_gbps`` and the FLOPs at ``gemm_gflops``, summed."""
        passes = ((self.bytes_forward, self.flops_forward), (self.bytes_backward, self.flops_backward))
        return sum(max(moved / (copy_gbps * 1e6), flops / (gemm_gflops * 1e6)) for moved, flops in passes)


def op_works(op: str, tokens: int, hidden: int, n: int, stream_bytes: int, coefficient_bytes: int) -> list[Work]:
    """The ``Work`` of each fused op ``op`` runs (one, or those of a composite of ``COMPOSITES``) on
    ``tokens`` tokens; in ``layer``, mappings_pre's backward also reads the stream gradient handed to it."""
    works = []
    for name in COMPOSITES.get(op, (op,)):
        account = fused_op_bytes(name, n, hidden, stream_bytes, coefficient_bytes)
        flops_forward, flops_backward = fused_op_product_flops(name, n, hidden)
        handed = tokens * n * hidden * stream_bytes if op == "layer" and not works else 0
        works.append(Work(account.forward(tokens), account.backward(tokens) + handed,
                          tokens * flops_forward, tokens * flops_backward))
    return works


def combined(works: list[Work]) -> Work:
    """One ``Work`` of several ops: their bytes and FLOPs added, pass by pass."""
    return Work(*(sum(getattr(w, field.name) for w in works) for field in fields(Work)))


def make_case(op: str, tokens: int, hidden: int, n: int, dtype: torch.dtype, iters: int, device: torch.device):
    """``(forward, inputs, works)`` of one op at one shape: ``works`` as ``op_works``."""
    coeff = torch.float64 if dtype == torch.float64 else torch.float32
    k = num_mapping_columns(n)
    works = op_works(op, tokens, hidden, n, torch.finfo(dtype).bits // 8, torch.finfo(coeff).bits // 8)

    def leaf(*shape, dt=coeff, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=coeff) * scale).to(dt).requires_grad_()

    x = leaf(tokens, n, hidden, dt=dtype)
    phi, alpha, bias = leaf(n * hidden, k, scale=(n * hidden) ** -0.5), leaf(3), leaf(k, scale=0.1)
    h_pre, h_post, h_res = leaf(tokens, n), leaf(tokens, n), leaf(tokens, n, n)
    f = leaf(tokens, hidden, dt=dtype)
    hc_parameters = [leaf(hidden, n + 2, scale=hidden ** -0.5), leaf(3), leaf(n), leaf(n), leaf(n, n)]

    def hc():
        layer_input, _, post, res = mhc_mappings_pre(x, phi, alpha, bias, iters)
        return mhc_post_res(x, layer_input, post, res)

    mlp_phi, mlp_alpha, mlp_bias = leaf(n * hidden, k, scale=(n * hidden) ** -0.5), leaf(3), leaf(k, scale=0.1)

    def layer():
        attention, mlp = fused.StreamGradient(), fused.StreamGradient()
        layer_input, _, post, res = mhc_mappings_pre(x, phi, alpha, bias, iters, stream_gradient=attention)
        streams, layer_input, _, post, res = mhc_post_res_mappings_pre(
            x, layer_input, post, res, mlp_phi, mlp_alpha, mlp_bias, iters, stream_gradient=attention,
            next_stream_gradient=mlp)
        return mhc_post_res(streams, layer_input, post, res, stream_gradient=mlp)

    logits = leaf(tokens, n, n)
    cases = {
        "sinkhorn": ((lambda: sinkhorn(logits, iters)), [logits]),
        "mappings": ((lambda: mhc_mappings(x, phi, alpha, bias, iters)), [x, phi, alpha, bias]),
        "mappings_pre": ((lambda: mhc_mappings_pre(x, phi, alpha, bias, iters)), [x, phi, alpha, bias]),
        "pre": ((lambda: mhc_pre(x, h_pre)), [x, h_pre]),
        "post_res": ((lambda: mhc_post_res(x, f, h_post, h_res)), [x, f, h_post, h_res]),
        "hc_mappings_pre": ((lambda: hc_mappings_pre(x, *hc_parameters)), [x, *hc_parameters]),
        "post_res_mappings_pre": ((lambda: mhc_post_res_mappings_pre(x, f, h_post, h_res, phi, alpha, bias, iters)),
                                  [x, f, h_post, h_res, phi, alpha, bias]),
        "hc": (hc, [x, phi, alpha, bias]),
        "layer": (layer, [x, phi, alpha, bias, mlp_phi, mlp_alpha, mlp_bias]),
    }
    forward, inputs = cases[op]
    return forward, inputs, works


def measure(op: str, backend: str, args, device: torch.device, dtype: torch.dtype, timer: Timer,
            copy_gbps: float, gemm: float) -> dict:
    """Times of ``op`` under ``backend``, its ``Work`` and its floors (module docstring) at the run's
    ``copy_gbps`` and matrix-product rate ``gemm`` (GFLOP/s)."""
    tokens, hidden, n = args.tokens, args.hidden, args.streams
    forward, inputs, works = make_case(op, tokens, hidden, n, dtype, args.iters, device)
    op_work = combined(works)

    def outputs():
        out = forward()
        return out if isinstance(out, tuple) else (out,)

    grads = [torch.randn_like(o) for o in outputs()]

    def forward_backward():
        torch.autograd.grad(outputs(), inputs, grads)

    with backends.use_backend(backend):
        with torch.no_grad():
            fwd_inference = timer.median_ms(outputs)
        fwd = timer.median_ms(outputs)
        fwd_bwd = timer.median_ms(forward_backward)
    return {"op": op, "backend": backend, "forward_ms": fwd, "forward_inference_ms": fwd_inference,
            "forward_backward_ms": fwd_bwd, "backward_ms": fwd_bwd - fwd,
            **asdict(op_work), "floor_ms": op_work.floor_ms(copy_gbps, gemm),
            "ops_floor_ms": sum(w.floor_ms(copy_gbps, gemm) for w in works)}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_description() -> str:
    """The CPU, the threads torch uses and the instruction-set level of the fused CPU kernels."""
    level = fused.cpu_isa() if fused.unavailable_reason(torch.device("cpu")) is None else "not built"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, fused CPU kernels: {level}"


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens, hidden, streams, dtype_name = DEFAULTS[device.type]
    args.tokens, args.hidden = args.tokens or tokens, args.hidden or hidden
    args.streams, args.dtype = args.streams or streams, args.dtype or dtype_name
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        # Imported here: mhc_megatron.megatron imports megatron-core, which a GPU host that only
        # validates the kernels (kernels/gpu-validate.sh) may not have.
        from mhc_megatron.megatron.cpu_heap import keep_freed_heap

        keep_freed_heap()  # as in a training step on CPU (initialize_parallel), for every backend alike
    dtype = DTYPES[args.dtype]
    timer = Timer(device, args.warmup, args.repeats)
    copy_gbps, gemm = copy_bandwidth(device, timer), gemm_gflops(device, dtype, timer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"mhc-bench kernels: {name}; tokens {args.tokens}, C {args.hidden}, n {args.streams}, {args.dtype}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s, matrix product {gemm:.0f} GFLOP/s")
    print(f"{'op':15} {'backend':9} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd':>9} {'GB/s':>7} {'of copy':>7} "
          f"{'floor':>7} {'x floor':>7} {'ops fl.':>7} {'x ops':>7}")
    results = []
    for op in args.ops:
        for backend in args.backends:
            r = measure(op, backend, args, device, dtype, timer, copy_gbps, gemm)
            r["gbps"] = (r["bytes_forward"] + r["bytes_backward"]) / (r["forward_backward_ms"] * 1e6)
            r["fraction_of_copy"] = r["gbps"] / copy_gbps
            r["times_floor"] = r["forward_backward_ms"] / r["floor_ms"]
            r["times_ops_floor"] = r["forward_backward_ms"] / r["ops_floor_ms"]
            results.append(r)
            print(f"{op:15} {backend:9} {r['forward_ms']:9.3f} {r['backward_ms']:9.3f} "
                  f"{r['forward_backward_ms']:9.3f} {r['gbps']:7.1f} {r['fraction_of_copy']:7.1%} "
                  f"{r['floor_ms']:7.2f} {r['times_floor']:7.2f} {r['ops_floor_ms']:7.2f} {r['times_ops_floor']:7.2f}")
        times = {r["backend"]: r["forward_backward_ms"] for r in results if r["op"] == op}
        if "fused" in times:
            ratios = ", ".join(f"{times[b] / times['fused']:.2f}x vs {b}" for b in times if b != "fused")
            print(f"{op:15} fused fwd+bwd: {ratios}")
    report = {
        "command": "mhc-bench kernels " + " ".join(sys.argv[2:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__, "copy_gbps": copy_gbps, "gemm_gflops": gemm,
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "streams": args.streams, "dtype": args.dtype,
                  "iters": args.iters},
        "results": results,
    }
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> None:
    """``python -m mhc_megatron.bench.kernels``: ``mhc-bench kernels`` without the other benchmarks,
    which import megatron-core."""
    parser = argparse.ArgumentParser(prog="mhc-bench kernels", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
