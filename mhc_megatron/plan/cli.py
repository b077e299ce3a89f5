"""``mhc-plan``: predict one training step of a model on a GPU cluster (residual, HC, mHC), and the
fastest pipeline layout that fits.

    mhc-plan configs/gpt-1.3b.yaml --gpu H100 --nodes 2 --tp 2 --pp 2
    mhc-plan --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --seq-length 4096 \\
        --micro-batch-size 1 --global-batch-size 256 --gpu H100 --nodes 4 --tp 8 --recommend

Units on the command line: TFLOP/s, GB/s, GB and microseconds; see docs/planner.md for the model.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from mhc_megatron.method import HC_MODES, REBUILD_SCHEMES
from mhc_megatron.plan.evaluate import Evaluation, evaluate
from mhc_megatron.plan.hardware import GB, TFLOPS, ClusterSpec, cluster
from mhc_megatron.plan.model import RECOMPUTE, Layout, ModelSpec, model_from_yaml
from mhc_megatron.plan.recommend import recommend

_DEVICE_FLAGS = {  # flag -> (GpuSpec field, unit)
    "bf16_tflops": ("bf16_flops", TFLOPS),
    "hbm_gbps": ("hbm_bandwidth", GB),
    "hbm_gb": ("hbm_bytes", GB),
    "intra_node_gbps": ("intra_node_bandwidth", GB),
    "inter_node_gbps": ("inter_node_bandwidth", GB),
}


def _flag_type(field_type: str):
    return {"int": int, "bool": _yes_no}.get(field_type.split(" ")[0], int)


def _yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhc-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="a training config (configs/*.yaml) for the model; flags override it")
    model = parser.add_argument_group("model (megatron-core's names; override the config)")
    for field in fields(ModelSpec):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "hc_mode":
            model.add_argument(flag, choices=HC_MODES)
        else:
            model.add_argument(flag, type=_flag_type(str(field.type)))
    device = parser.add_argument_group("cluster (the GPU's table values unless overridden)")
    device.add_argument("--gpu", default="H100", help="known: H100, H800, H200, A100, B200 (SXM parts)")
    device.add_argument("--nodes", type=int, default=1)
    device.add_argument("--gpus-per-node", type=int, default=8)
    device.add_argument("--bf16-tflops", type=float, help="dense bf16 peak per GPU (TFLOP/s)")
    device.add_argument("--hbm-gbps", type=float, help="HBM bandwidth (GB/s)")
    device.add_argument("--hbm-gb", type=float, help="HBM capacity (GB)")
    device.add_argument("--intra-node-gbps", type=float, help="NVLink bandwidth per GPU and direction (GB/s)")
    device.add_argument("--inter-node-gbps", type=float, help="InfiniBand bandwidth per GPU and direction (GB/s)")
    device.add_argument("--latency-us", type=float, help="latency of a point-to-point transfer (us, default 10)")
    device.add_argument("--mfu", type=float, help="share of the bf16 peak the matrix products reach (default 0.45)")
    device.add_argument("--hbm-efficiency", type=float, help="share of HBM bandwidth memory-bound kernels reach (default 0.8)")
    layout = parser.add_argument_group("layout")
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--vpp", type=int, default=1, help="virtual stages (model chunks) per pipeline stage")
    layout.add_argument("--ep", type=int, default=1)
    layout.add_argument("--recompute", choices=RECOMPUTE, default="none")
    layout.add_argument("--rebuild", choices=REBUILD_SCHEMES, default="sublayer",
                        help="how --recompute block rebuilds a block's states: one sub-layer at a time (least "
                             "memory) or the whole block at once (the paper's scheme, fewest replays)")
    layout.add_argument("--overlap", action="store_true", help="communication beside compute (DualPipe-like)")
    layout.add_argument("--recommend", action="store_true", help="search PP, VPP, micro-batch size and recompute")
    return parser


def inputs(args: argparse.Namespace) -> tuple[ModelSpec, Layout, ClusterSpec]:
    """The model, layout and cluster the parsed flags describe."""
    model_flags = {f.name: getattr(args, f.name) for f in fields(ModelSpec)}
    if args.config:
        model = model_from_yaml(args.config, **model_flags)
    else:
        given = {key: value for key, value in model_flags.items() if value is not None}
        try:
            model = ModelSpec(**given)
        except TypeError as error:
            raise ValueError(f"without a config the model needs every required flag: {error}") from None
    device = {name: getattr(args, flag) * unit for flag, (name, unit) in _DEVICE_FLAGS.items() if getattr(args, flag) is not None}
    machine = cluster(args.gpu, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                      link_latency=None if args.latency_us is None else args.latency_us * 1e-6,
                      mfu=args.mfu, hbm_efficiency=args.hbm_efficiency, **device)
    layout = Layout(pp=args.pp, vpp=args.vpp, tp=args.tp, ep=args.ep, recompute=args.recompute, rebuild=args.rebuild,
                    overlap=args.overlap)
    return model, layout, machine


def _describe(model: ModelSpec, machine: ClusterSpec) -> str:
    mlp = (f"MoE {model.num_moe_experts} experts top-{model.moe_router_topk} (ffn {model.moe_ffn_hidden_size or model.ffn}"
           f"{', shared ' + str(model.moe_shared_expert_intermediate_size) if model.moe_shared_expert_intermediate_size else ''})"
           if model.moe else f"ffn {model.ffn}")
    d = machine.device
    return (f"model: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads, {mlp}, "
            f"seq {model.seq_length}, micro-batch {model.micro_batch_size}, global batch {model.global_batch_size}, "
            f"n = {model.num_streams}, {'bf16' if model.bf16 else 'fp32'}\n"
            f"cluster: {machine.nodes} x {machine.gpus_per_node} {d.name} ({d.bf16_flops / TFLOPS:.0f} TFLOP/s bf16 x mfu "
            f"{machine.mfu}, HBM {d.hbm_bandwidth / GB:.0f} GB/s x {machine.hbm_efficiency}, {d.hbm_bytes / GB:.0f} GB; "
            f"NVLink {d.intra_node_bandwidth / GB:.0f} GB/s, IB {d.inter_node_bandwidth / GB:.0f} GB/s per direction)")


def _layout_text(e: Evaluation) -> str:
    l = e.layout
    return (f"TP {l.tp} PP {l.pp} VPP {l.vpp} EP {l.ep}, micro-batch {e.model.micro_batch_size} x {e.micro_batches}, "
            f"recompute {l.recompute}{f' (rebuild {l.rebuild})' if l.recompute == 'block' else ''}, "
            f"{'overlapped' if l.overlap else 'blocking'} communication")


def _row(label: str, e: Evaluation) -> str:
    memory = " ".join(f"{stage['total'] / GB:5.1f}" for stage in e.memory)
    return (f"{label:16} {e.step_time * 1e3:10.1f} {100 * e.overhead:+8.1f}% {100 * e.result.bubble_fraction:7.1f}% "
            f"{e.result.exposed_comm * 1e3:9.1f} {e.comm_cost * 1e3:9.1f}   {memory}")


def report(model: ModelSpec, layout: Layout, machine: ClusterSpec) -> dict[str, Evaluation]:
    """Print the comparison table and what mHC's overhead is made of; return the evaluations."""
    variants = {"residual": (model.with_mode("residual"), replace(layout, recompute="none" if layout.recompute == "block" else layout.recompute)),
                "hc": (model.with_mode("hc"), replace(layout, recompute="none" if layout.recompute == "block" else layout.recompute)),
                "mhc": (model.with_mode("mhc"), layout)}
    if layout.recompute == "none":
        variants["mhc + block"] = (model.with_mode("mhc"), replace(layout, recompute="block"))
    results = {label: evaluate(m, l, machine) for label, (m, l) in variants.items()}
    first = results["mhc"]
    print(f"layout: {_layout_text(first)}")
    print(f"{'connection':16} {'step ms':>10} {'vs res.':>9} {'bubble':>8} {'exp. comm':>9} {'comm cost':>9}   peak GB per stage")
    for label, e in results.items():
        print(_row(label, e))
    _explain(results, layout)
    return results


def _explain(results: dict[str, Evaluation], layout: Layout) -> None:
    """Split mHC's extra step time into its causes (per step, over the busiest stage's passes)."""
    mhc, residual = results["mhc"], results["residual"]
    passes = mhc.micro_batches * mhc.model.num_layers // layout.pp
    traffic = {name: e.layer.connection_forward + e.layer.connection_backward for name, e in results.items()}
    connection = passes * (traffic["mhc"] - traffic["residual"])
    recompute = passes * (mhc.layer.recompute - residual.layer.recompute)
    transfers = mhc.comm_cost - residual.comm_cost
    extra = mhc.step_time - residual.step_time
    print(f"mHC's extra {extra * 1e3:.1f} ms per step ({100 * mhc.overhead:+.1f} %): connection kernels "
          f"{connection * 1e3:.1f} ms (forward + backward, {traffic["mhc"] / max(traffic["residual"], 1e-30):.1f}x "
          f"the residual add's traffic), recompute replay {recompute * 1e3:.1f} ms, stage-to-stage transfers "
          f"{transfers * 1e3:.1f} ms (n x the bytes), the rest {(extra - connection - recompute - transfers) * 1e3:+.1f} ms "
          "(bubbles scale with the longer passes; with overlap, compute hides communication)")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model, layout, machine = inputs(args)
        print(_describe(model, machine))
        report(model, layout, machine)
        if args.recommend:
            search = recommend(model, layout, machine)
            best = search.best
            print(f"\nsearched {search.tried} layouts, {len(search.fitting)} fit in {machine.device.hbm_bytes / GB:.0f} GB; "
                  "fastest that fit:")
            for e in search.fitting[:5]:
                print(f"  {e.step_time * 1e3:9.1f} ms  peak {e.peak_memory / GB:5.1f} GB  {_layout_text(e)}")
            if best is None:
                print("recommendation: none fits; add GPUs, tensor parallelism or a smaller micro-batch")
            else:
                print(f"recommendation: {_layout_text(best)}: {best.step_time * 1e3:.1f} ms per step, "
                      f"mHC overhead {100 * best.overhead:+.1f} %, peak {best.peak_memory / GB:.1f} GB")
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
