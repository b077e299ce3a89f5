"""Checks of the GPU path that need a GPU, and the report, for kernels/gpu-validate.sh.

``stream``: the high-priority stream switch (``mhc_post_res_high_priority_stream``): the fused
post_res run on the highest-priority CUDA stream through ``cuda_streams.run_on_stream``, forward and
backward, against the same op on the default stream: bitwise equal, and the side stream's priority
above the default's. Needs no megatron-core (the module is loaded from its file).

``step``: one training step's forward and backward of a small mHC GPT (megatron-core, one process;
NCCL on a GPU) with the fused ops against the reference ops: the loss and every parameter gradient
within float32 tolerances (loss: relative 1e-5; gradients: 1e-4 of each gradient's largest
magnitude), the fused run calling the kernels and the reference run none. Runs on CPU too (gloo, the CPU kernels), which is how the test suite checks this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]


class CountFusedKernels(TorchDispatchMode):
    """Counts the calls of ``torch.ops.mhc_megatron`` kernels made within it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == "mhc_megatron"
        return func(*args, **(kwargs or {}))


def load_cuda_streams():
    """mhc_megatron/megatron/model/cuda_streams.py without its package, which imports megatron-core."""
    path = ROOT / "mhc_megatron" / "megatron" / "model" / "cuda_streams.py"
    spec = importlib.util.spec_from_file_location("cuda_streams", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_stream() -> dict:
    from mhc_megatron.modules import Mixing
    from mhc_megatron.ops import backends, mhc_post_res, sinkhorn

    cuda_streams = load_cuda_streams()
    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens, n, hidden = 4096, 4, 1024
    streams = torch.randn(tokens, n, hidden, device="cuda", generator=generator, dtype=torch.bfloat16)
    output = torch.randn(tokens, hidden, device="cuda", generator=generator, dtype=torch.bfloat16)
    h_post = 2 * torch.rand(tokens, n, device="cuda", generator=generator)
    h_res = sinkhorn(torch.randn(tokens, n, n, device="cuda", generator=generator))
    mixing = Mixing(h_post, h_res, h_pre=torch.rand(tokens, n, device="cuda", generator=generator))
    weights = torch.randn(tokens, n, hidden, device="cuda", generator=generator)

    def post_res(streams, output, mixing):
        return mhc_post_res(streams, output, mixing.h_post, mixing.h_res)

    results = {}
    side = cuda_streams.high_priority_stream()
    for name in ("default", "high priority"):
        leaves = [t.detach().clone().requires_grad_() for t in (streams, output)]
        with backends.use_backend("fused"):
            if name == "default":
                result = post_res(*leaves, mixing)
            else:
                result = cuda_streams.run_on_stream(side, post_res, *leaves, mixing)
            (result.float() * weights).sum().backward()
        torch.cuda.synchronize()
        results[name] = [result.detach(), *(leaf.grad for leaf in leaves)]
    equal = all(torch.equal(a, b) for a, b in zip(results["default"], results["high priority"]))
    default_priority = torch.cuda.current_stream().priority
    return {"check": "stream", "passed": equal and side.priority < default_priority,
            "bitwise_equal": equal, "side_stream_priority": side.priority, "default_priority": default_priority}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_step(device: str) -> dict:
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, destroy_parallel, initialize_parallel
    from mhc_megatron.ops import backends

    initialize_parallel()
    try:
        config = MhcTransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                      hc_mode="mhc", num_streams=4, hidden_dropout=0.0, attention_dropout=0.0,
                                      use_cpu_initialization=True)
        vocab, seq = 128, 32
        model = build_model_chunks(config, vocab, seq, backend="local")[0].to(device)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (2, seq + 1), generator=generator).to(device)
        positions = torch.arange(seq, device=device).expand(2, seq)
        results, counts = {}, {}
        for backend in ("reference", "fused"):
            model.zero_grad(set_to_none=True)
            with backends.use_backend(backend), CountFusedKernels() as count:
                loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
                loss.backward()
            results[backend] = (loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()})
            counts[backend] = count.calls
        (reference_loss, reference_grads), (fused_loss, fused_grads) = results["reference"], results["fused"]
        loss_difference = relative_difference(fused_loss, reference_loss)
        grad_difference = max(relative_difference(fused_grads[name], grad) for name, grad in reference_grads.items())
        backend_name = torch.distributed.get_backend()
    finally:
        destroy_parallel()
    return {"check": "step", "device": device, "process_group": backend_name,
            "passed": loss_difference <= 1e-5 and grad_difference <= 1e-4 and counts["fused"] > 0
                      and counts["reference"] == 0,
            "fused_kernel_calls": counts,
            "loss_reference": reference_loss.item(), "loss_fused": fused_loss.item(),
            "loss_relative_difference": loss_difference, "max_grad_relative_difference": grad_difference}


def report(out: Path) -> dict:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, milliseconds, log = line.split("\t")
        entry = {"step": name, "status": "skipped" if status == "skipped" else "passed" if status == "0" else "failed",
                 "seconds": round(int(milliseconds) / 1000, 1), "log": log}
        path = out / log
        if entry["status"] != "skipped" and path.exists():
            lines = path.read_text().strip().splitlines()
            results = [line for line in lines if line.startswith("{")]
            if path.suffix == ".json" and results:
                entry["result"] = json.loads(results[-1])
            else:
                entry["last_line"] = lines[-1] if lines else ""
        steps.append(entry)
    on_gpu = torch.cuda.is_available()
    record = {"device": torch.cuda.get_device_name() if on_gpu else None,
              "capability": list(torch.cuda.get_device_capability()) if on_gpu else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "passed": all(step["status"] != "failed" for step in steps), "steps": steps}
    bench = out / "bench-kernels.json"
    if bench.exists():
        record["bench_kernels"] = json.loads(bench.read_text())
    (out / "gpu-validate.json").write_text(json.dumps(record, indent=2))
    return {"check": "report", "passed": record["passed"], "wrote": str(out / "gpu-validate.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["stream", "step", "report"])
    parser.add_argument("outdir", nargs="?", type=Path, help="report only: gpu-validate.sh's OUTDIR")
    parser.add_argument("--device", default="cuda", help="step only: cuda (default) or cpu")
    args = parser.parse_args()
    if args.check == "report" and args.outdir is None:
        parser.error("report needs the OUTDIR of a gpu-validate.sh run")
    checks = {"stream": check_stream, "step": lambda: check_step(args.device), "report": lambda: report(args.outdir)}
    result = checks[args.check]()
    print(json.dumps(result))
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
