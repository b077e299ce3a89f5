"""Training-step time of residual, HC, mHC and mHC + block recompute on one GPT shape, in rounds.

The block recompute variants: ``mhc+recompute`` rebuilds the states sub-layer by sub-layer (the
default, least memory), ``mhc+recompute-block`` a block at once (the paper's scheme, fewest
replays; ``MhcTransformerConfig.mhc_recompute_rebuild``).

Every variant's model is built once, in one process (PP = 1, a gloo world of one), with the same
initial weights (one seed, ``model/initialization.py``), and runs megatron's own forward and
backward (``pipeline.step.forward_backward``; with ``--optimizer`` the whole ``train_step``) on one
fixed synthetic batch. The timing comes in rounds: each round runs every variant back to back,
``--warmup`` untimed steps then ``--steps`` timed ones, the order rotated by one from round to
round; a variant's time in a round is the median of its timed steps.

On a shared machine noise only ever slows a run, so the overhead is the **ratio of minimums**: a
variant's fastest round over the residual model's fastest round. Beside it, the per-round ratios
(each round's time over the residual model's in the same round): their median, minimum and
maximum.

Then the decomposition (``step_parts.StepParts``), in separate recorded steps after the timed
rounds (again in rotated rounds, after the same warm-up): each step split into embedding,
expand/collapse, the hyper-connection ops (mappings with the read of the sub-layer input, post_res), the megatron layer proper,
block recompute, head, optimizer and the rest. Per variant and part the fastest of the recorded
steps is reported (ms per step), and each variant's extra time over the residual model per part:
their sum is what the decomposition explains of the measured extra (the difference of the
fastest rounds).

CPU only: on a GPU the stamps would time kernel launches, not kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from mhc_megatron.bench.memory import cpu_model
from mhc_megatron.bench.step_parts import CONNECTION_PARTS, PARTS, StepParts
from mhc_megatron.method import NUM_STREAMS, default_block_size
from mhc_megatron.world import default_to_world_of_one

# name -> (hc_mode, how block recompute rebuilds, or None: no block recompute)
VARIANTS = {"residual": ("residual", None), "hc": ("hc", None), "mhc": ("mhc", None),
            "mhc+recompute": ("mhc", "sublayer"), "mhc+recompute-block": ("mhc", "block")}
RECOMPUTE_VARIANTS = [name for name, (_, rebuild) in VARIANTS.items() if rebuild is not None]
BASELINE = "residual"
MIN_ROUNDS = 3
BYTE_LEVEL_VOCAB = 512  # the byte-level tokenizer of the default job (data/tokenizers.py), a multiple of 128
SEED = 1234


@dataclass(frozen=True)
class StepShape:
    """The GPT of the benchmark: ``micro_batch`` sequences of ``seq`` tokens, float32."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    seq: int
    micro_batch: int
    streams: int
    vocab: int


def _at_least(minimum: int, why: str = ""):
    """An argparse type: an int >= ``minimum`` (``why`` explains the bound in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}{why}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=_at_least(1), default=12)
    parser.add_argument("--hidden", type=_at_least(1), default=768)
    parser.add_argument("--ffn", type=_at_least(1), default=None, help="default 4 x hidden")
    parser.add_argument("--heads", type=_at_least(1), default=None, help="default hidden / 64 (head size 64)")
    parser.add_argument("--seq", type=_at_least(1), default=512)
    parser.add_argument("--micro-batch", type=_at_least(1), default=1, help="sequences per step (one micro-batch)")
    parser.add_argument("--streams", type=_at_least(2), default=NUM_STREAMS, help="n of HC and mHC")
    parser.add_argument("--vocab", type=_at_least(1), default=BYTE_LEVEL_VOCAB,
                        help="vocabulary size (default: the byte-level tokenizer's, as the default job)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help=f"which to time; {BASELINE} is the baseline and must be among them")
    parser.add_argument("--block-size", type=_at_least(1), default=None,
                        help="L_r of the recompute variants (default sqrt(n L / (n + 2)) for the 2 x layers sub-layers)")
    parser.add_argument("--optimizer", action="store_true", help="time the optimizer step too (megatron's Adam)")
    parser.add_argument("--rounds", type=_at_least(MIN_ROUNDS, " (minimums over fewer rounds are noise)"),
                        default=12, help="timed rounds, every variant back to back in each, order rotated")
    parser.add_argument("--steps", type=_at_least(1), default=3, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=_at_least(0), default=1, help="untimed steps per variant before them")
    parser.add_argument("--part-rounds", type=_at_least(1), default=6,
                        help="rounds of recorded steps for the decomposition, one step per variant each")
    parser.add_argument("--threads", type=_at_least(1), default=2, help="torch CPU threads")
    parser.add_argument("--json", default="mhc-bench-step.json", help="where to write the results")


def shape_of(args: argparse.Namespace) -> StepShape:
    """The shape the arguments ask for; ``ValueError`` where it cannot be built."""
    heads = args.heads or args.hidden // 64
    if heads < 1 or args.hidden % heads:
        raise ValueError(f"--hidden {args.hidden} must be a multiple of --heads {heads} (default: hidden / 64)")
    return StepShape(layers=args.layers, hidden=args.hidden, ffn=args.ffn or 4 * args.hidden, heads=heads,
                     seq=args.seq, micro_batch=args.micro_batch, streams=args.streams, vocab=args.vocab)


def check_variants(names: list[str]) -> None:
    """``ValueError`` unless ``names`` holds the baseline and no name twice."""
    if BASELINE not in names:
        raise ValueError(f"--variants must include {BASELINE!r}, the baseline of every ratio; got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"--variants names a variant twice: {names}")


class Variant:
    """One model of the comparison, built as ``mhc-train`` builds it (megatron's DDP and Adam), and
    its fixed batch: ``step()`` is one training step (``optimizer`` given: with the optimizer step)."""

    def __init__(self, name: str, shape: StepShape, block_size: int, optimizer: bool) -> None:
        from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks
        from mhc_megatron.megatron.pipeline.step import MicroBatch, build_optimizer, wrap_with_ddp

        hc_mode, rebuild = VARIANTS[name]
        recompute = rebuild is not None
        self.name = name
        self.config = MhcTransformerConfig(
            num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
            num_attention_heads=shape.heads, hc_mode=hc_mode, num_streams=shape.streams,
            mhc_recompute="block" if recompute else "none", mhc_recompute_block=block_size if recompute else None,
            mhc_recompute_rebuild=rebuild or "sublayer",
            normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
            init_method_std=0.02, use_cpu_initialization=True, params_dtype=torch.float32,
            pipeline_dtype=torch.float32,
        )
        chunks = build_model_chunks(self.config, shape.vocab, shape.seq, backend="local", seed=SEED,
                                    position_embedding_type="rope")
        self.model = wrap_with_ddp(chunks, self.config)
        self.optimizer = build_optimizer(self.model, lr=1e-4) if optimizer else None
        generator = torch.Generator().manual_seed(SEED)
        tokens = torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq), generator=generator)
        self.batches = [MicroBatch(tokens, torch.roll(tokens, -1, 1), torch.ones(tokens.shape))]
        self.parameters = sum(p.numel() for p in self.model[0].parameters())

    def step(self) -> None:
        from mhc_megatron.megatron.pipeline.step import forward_backward, train_step

        if self.optimizer is None:
            forward_backward(self.model, self.config, self.batches)
        else:
            train_step(self.model, self.optimizer, self.config, self.batches)

    def timed_steps(self, warmup: int, steps: int) -> list[float]:
        """Seconds of ``steps`` steps after ``warmup`` untimed ones."""
        for _ in range(warmup):
            self.step()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - started)
        return times

    def recorded_step(self, warmup: int) -> dict:
        """One step split into parts (``StepParts``) after ``warmup`` untimed ones: its wall time (s)
        and seconds per part and phase."""
        for _ in range(warmup):
            self.step()
        recorder = StepParts(self.model[0].module, self.optimizer)
        started = time.perf_counter()
        parts = recorder.record(self.step)
        return {"wall_s": time.perf_counter() - started, "parts_s": parts}


def rotated(names: list[str], round_index: int) -> list[str]:
    """The order of round ``round_index`` (from 0): ``names`` rotated left by the round's index."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def compare(times: list[float], baseline: list[float]) -> dict:
    """A variant's round times against the baseline's in the same rounds (s, one entry per round).

    ``ratio_of_minimums``: fastest round over the baseline's fastest round; ``per_round_ratio``:
    median, min and max of ``times[r] / baseline[r]``; ``extra_s``: the difference of the fastest
    rounds, and the median, min and max of the per-round differences.
    """
    if len(times) != len(baseline) or not times:
        raise ValueError(f"need the same rounds for both, got {len(times)} and {len(baseline)}")
    ratios = [t / b for t, b in zip(times, baseline)]
    extras = [t - b for t, b in zip(times, baseline)]
    return {
        "ratio_of_minimums": min(times) / min(baseline),
        "per_round_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "extra_s": {"of_minimums": min(times) - min(baseline), "per_round_median": statistics.median(extras),
                    "per_round_min": min(extras), "per_round_max": max(extras)},
    }


def summarize(rounds: list[dict], names: list[str]) -> dict:
    """Per variant: fastest and median round (s), and ``compare`` against the residual model (and,
    for the recompute variants, against mhc); ``rounds[r]["round_s"][name]`` is a variant's time in
    round ``r``."""
    per_variant = {name: [r["round_s"][name] for r in rounds] for name in names}
    summary = {}
    for name, times in per_variant.items():
        summary[name] = {"min_s": min(times), "median_s": statistics.median(times)}
        if name != BASELINE:
            summary[name]["vs_residual"] = compare(times, per_variant[BASELINE])
    for name in RECOMPUTE_VARIANTS:
        if name in per_variant and "mhc" in per_variant:
            summary[name]["vs_mhc"] = compare(per_variant[name], per_variant["mhc"])
    return summary


def part_totals(recorded: list[dict]) -> dict:
    """The fastest of the recorded steps, part by part (ms per step): ``{part: {phase: ms, "total":
    ms}}``, ``total`` the fastest step's sum over phases of that part; and the fastest wall time."""
    parts = {}
    for part in PARTS:
        steps = [r["parts_s"][part] for r in recorded if part in r["parts_s"]]
        if not steps:
            continue
        parts[part] = {phase: 1e3 * min(s.get(phase, 0.0) for s in steps)
                       for phase in sorted({phase for s in steps for phase in s})}
        parts[part]["total"] = 1e3 * min(sum(s.values()) for s in steps)
    return {"parts_ms": parts, "wall_ms": 1e3 * min(r["wall_s"] for r in recorded),
            "sum_of_parts_ms": sum(p["total"] for p in parts.values())}


def explain(decomposition: dict, summary: dict) -> dict:
    """Per variant other than the residual model: its extra ms per step over it, part by part
    (fastest recorded steps), their sum (``explained_ms``), the measured extra of the timed rounds
    (difference of the fastest rounds, and the per-round range) and the fraction explained."""
    base = decomposition[BASELINE]["parts_ms"]
    result = {}
    for name, numbers in decomposition.items():
        if name == BASELINE:
            continue
        parts = numbers["parts_ms"]
        extra = {part: parts.get(part, {}).get("total", 0.0) - base.get(part, {}).get("total", 0.0)
                 for part in PARTS if part in parts or part in base}
        measured = summary[name]["vs_residual"]["extra_s"]
        explained = sum(extra.values())
        result[name] = {
            "extra_ms": extra,
            "connection_ops_extra_ms": sum(extra.get(part, 0.0) for part in CONNECTION_PARTS),
            "explained_ms": explained,
            "measured_extra_ms": 1e3 * measured["of_minimums"],
            "measured_extra_per_round_ms": {key: 1e3 * measured[key] for key in
                                            ("per_round_median", "per_round_min", "per_round_max")},
            "recorded_extra_ms": numbers["wall_ms"] - decomposition[BASELINE]["wall_ms"],
            "fraction_explained": explained / (1e3 * measured["of_minimums"]) if measured["of_minimums"] else None,
        }
    return result


def command_line(args: argparse.Namespace) -> str:
    """The ``mhc-bench step`` command with every setting spelled out (defaults included)."""
    words = ["mhc-bench", "step"]
    for key, value in vars(args).items():
        option = "--" + key.replace("_", "-")
        if key == "command" or value is None or value is False:
            continue
        if value is True:
            words.append(option)
        else:
            words += [option, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(words)


def machine() -> dict:
    """The CPU, the threads torch uses, the fused kernels' instruction-set level and the versions."""
    from megatron.core import __version__ as megatron_version

    from mhc_megatron.ops import backends, fused

    try:
        isa = fused.cpu_isa()
    except RuntimeError as error:  # the extension is not built: every op falls back to the reference
        isa = f"unavailable ({error})"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "fused_cpu_isa": isa,
            "backends": {op: backends.get_backend(op) for op in backends.OPS}, "torch": torch.__version__,
            "megatron_core": megatron_version}


def _progress(text: str) -> None:
    print(text, flush=True)


def time_rounds(variants: dict[str, Variant], rounds: int, steps: int, warmup: int) -> list[dict]:
    """The timed rounds: per round its order, the load average (1 min) before and after, every
    timed step (s) and each variant's median step (``round_s``)."""
    records = []
    for index in range(rounds):
        order = rotated(list(variants), index)
        load_before = os.getloadavg()[0]
        step_s = {name: variants[name].timed_steps(warmup, steps) for name in order}
        round_s = {name: statistics.median(step_s[name]) for name in variants}
        records.append({"order": order, "load_average": [load_before, os.getloadavg()[0]], "step_s": step_s,
                        "round_s": round_s})
        _progress(f"round {index + 1}/{rounds}: " + ", ".join(f"{name} {round_s[name]:.3f} s" for name in order)
                  + f" (load {load_before:.1f} -> {records[-1]['load_average'][1]:.1f})")
    return records


def record_parts(variants: dict[str, Variant], rounds: int, warmup: int) -> dict:
    """The decomposition's recorded steps, one per variant and round, order rotated; per variant
    the raw steps and ``part_totals``."""
    recorded = {name: [] for name in variants}
    for index in range(rounds):
        for name in rotated(list(variants), index):
            recorded[name].append(variants[name].recorded_step(warmup))
        _progress(f"recorded parts, round {index + 1}/{rounds}")
    return {name: {**part_totals(steps), "steps": steps} for name, steps in recorded.items()}


def run(args: argparse.Namespace) -> None:
    try:
        shape = shape_of(args)
        check_variants(args.variants)
    except ValueError as error:
        raise SystemExit(f"mhc-bench step: {error}") from None
    if torch.cuda.is_available():
        raise SystemExit("mhc-bench step: times CPU steps only (on a GPU the stamps would time kernel launches)")
    from mhc_megatron.megatron import destroy_parallel, initialize_parallel

    torch.set_num_threads(args.threads)
    block_size = args.block_size or default_block_size(shape.streams, 2 * shape.layers)
    default_to_world_of_one()
    started = datetime.datetime.now(datetime.timezone.utc)
    initialize_parallel(seed=SEED)
    try:
        variants = {}
        for name in args.variants:
            building = time.perf_counter()
            variants[name] = Variant(name, shape, block_size, args.optimizer)
            _progress(f"built {name}: {variants[name].parameters / 1e6:.1f} M parameters "
                      f"({time.perf_counter() - building:.0f} s)")
        rounds = time_rounds(variants, args.rounds, args.steps, args.warmup)
        decomposition = record_parts(variants, args.part_rounds, args.warmup)
        report = {
            "command": command_line(args),
            "date": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "shape": {**asdict(shape), "dtype": "float32"},
            "settings": {"variants": args.variants, "block_size": block_size, "optimizer": args.optimizer,
                         "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                         "part_rounds": args.part_rounds, "seed": SEED},
            "units": "seconds (_s) and milliseconds per step (_ms)",
            "parameters": {name: variant.parameters for name, variant in variants.items()},
            "rounds": rounds,
            "summary": summarize(rounds, args.variants),
            "decomposition": decomposition,
        }
        report["explained"] = explain(decomposition, report["summary"])
    finally:
        destroy_parallel()
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print_report(report)
    print(f"wrote {args.json}")


def print_report(report: dict) -> None:
    """The ratio table and the decomposition table."""
    summary, settings = report["summary"], report["settings"]
    optimizer = "with" if settings["optimizer"] else "without"
    print(f"\n{settings['rounds']} rounds x {settings['steps']} steps, {optimizer} the optimizer step; "
          "per round the median step")
    print(f"{'variant':20} {'fastest':>9} {'median':>9} {'ratio of min':>12} "
          f"{'per-round ratio: median [min, max]':>36}")
    for name, numbers in summary.items():
        line = f"{name:20} {numbers['min_s']:8.3f}s {numbers['median_s']:8.3f}s"
        if "vs_residual" in numbers:
            vs = numbers["vs_residual"]
            ratio = vs["per_round_ratio"]
            line += f" {vs['ratio_of_minimums']:12.3f} {ratio['median']:17.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]"
        print(line)
    decomposition, explained = report["decomposition"], report["explained"]
    names = list(decomposition)
    print("\nms per step: fastest recorded step per part, and in brackets the extra over residual")
    print(f"{'part':16}" + "".join(f"{name:>24}" for name in names))
    rows = [(part, {name: decomposition[name]["parts_ms"].get(part, {}).get("total", 0.0) for name in names})
            for part in PARTS if any(part in decomposition[name]["parts_ms"] for name in names)]
    rows.append(("sum of parts", {name: decomposition[name]["sum_of_parts_ms"] for name in names}))
    rows.append(("fastest step", {name: decomposition[name]["wall_ms"] for name in names}))
    for label, values in rows:
        cells = [f"{values[name]:.1f}" + (f" ({values[name] - values[BASELINE]:+.1f})" if name != BASELINE else "")
                 for name in names]
        print(f"{label:16}" + "".join(f"{cell:>24}" for cell in cells))
    for name, numbers in explained.items():
        fraction = numbers["fraction_explained"]
        low, high = (numbers["measured_extra_per_round_ms"][key] for key in ("per_round_min", "per_round_max"))
        print(f"{name}: the parts explain {numbers['explained_ms']:+.1f} ms of the measured "
              f"{numbers['measured_extra_ms']:+.1f} ms (per round {low:+.1f} to {high:+.1f})"
              + (f", {100 * fraction:.0f} %" if fraction is not None else ""))
