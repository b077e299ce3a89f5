"""``mhc-compare``: train one config once per hyper-connection mode, then write the comparison report.

    mhc-compare --config PATH [--out DIR] [--modes residual,hc,mhc] [--nproc-per-node N]
                [--warmup-steps K] [--dry-run | --report-only] [key=value ...]

Each mode runs, one after the other, as a child process of this Python::

    python -m mhc_megatron.train --config PATH key=value ... hc_mode=MODE run_dir=OUT/MODE

or, with ``--nproc-per-node N`` above 1, the same under ``python -m torch.distributed.run
--standalone --nproc-per-node N``. Every mode gets the same config and overrides, hence the same
data, seed and steps. The first failing run stops the comparison. Then ``write_report`` writes
``OUT/report.md`` and its plots.

Defaults: ``OUT`` is ``runs/compare-<config file stem>``; the warm-up left out of the medians is a
fifth (rounded down) of ``train_iters`` in the residual run's ``config.yaml``. A run directory that is
not empty is refused, because a new run would append to its ``metrics.jsonl`` and mix two runs;
``--report-only`` writes the report from the run directories already in ``OUT`` (for instance with
another ``--warmup-steps``) without training.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mhc_megatron.compare.report import BASELINE, PER_MODE_KEYS, load_config, write_report
from mhc_megatron.method import HC_MODES

TRAIN_MODULE = "mhc_megatron.train"


def training_command(
    config: Path, overrides: Sequence[str], mode: str, run_dir: Path, nproc_per_node: int
) -> list[str]:
    """The argv that trains ``config`` with ``overrides`` in ``mode`` into ``run_dir``.

    One process runs the training module directly; more run it under ``torch.distributed.run``.
    """
    if nproc_per_node == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}"]
    return [*launcher, "-m", TRAIN_MODULE, "--config", str(config), *overrides, f"hc_mode={mode}", f"run_dir={run_dir}"]


def default_warmup_steps(run_dir: Path) -> int:
    """A fifth, rounded down, of ``train_iters`` in ``run_dir/config.yaml``."""
    train_iters = load_config(run_dir).get("train_iters")
    if isinstance(train_iters, bool) or not isinstance(train_iters, int) or train_iters < 1:
        raise ValueError(
            f"{run_dir}/config.yaml has train_iters={train_iters!r}, expected an integer >= 1 to derive the "
            "default warm-up from; pass --warmup-steps"
        )
    return train_iters // 5


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``mhc-compare`` with ``argv`` (default ``sys.argv[1:]``); exits non-zero on failure."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if not args.config.is_file():
        parser.error(f"--config {args.config} is not a file")
    _check_overrides(parser, args.overrides)
    out = args.out if args.out is not None else Path("runs") / f"compare-{args.config.stem}"
    run_dirs = {mode: out / mode for mode in args.modes}

    if not args.report_only:
        for mode, run_dir in run_dirs.items():
            if run_dir.is_dir() and any(run_dir.iterdir()):
                parser.error(
                    f"the run directory {run_dir} of mode {mode!r} is not empty; a new run would append to its "
                    "metrics.jsonl and mix two runs. Remove it, choose another --out, or pass --report-only"
                )
        for index, (mode, run_dir) in enumerate(run_dirs.items(), start=1):
            command = training_command(args.config, args.overrides, mode, run_dir, args.nproc_per_node)
            print(f"# mode {mode} ({index}/{len(run_dirs)})", flush=True)
            print(shlex.join(command), flush=True)
            if not args.dry_run:
                _run(mode, command)
        if args.dry_run:
            return

    try:
        warmup_steps = args.warmup_steps if args.warmup_steps is not None else default_warmup_steps(run_dirs[BASELINE])
        report = write_report(run_dirs, out, warmup_steps)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"mhc-compare: no report written: {error}") from error
    print(f"report: {report}", flush=True)


def _run(mode: str, command: list[str]) -> None:
    """Run ``command`` with this process's stdout and stderr; exit naming ``mode`` if it fails."""
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"failed with exit code {code}"
        raise SystemExit(f"mhc-compare: the {mode!r} run {how} (its output is above): {shlex.join(command)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mhc-compare",
        description="Train one config once per hyper-connection mode and write a comparison report.",
    )
    parser.add_argument("--config", type=Path, required=True, help="training config YAML")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/compare-<config stem>)")
    parser.add_argument(
        "--modes",
        type=_modes,
        default=",".join(HC_MODES),
        help="comma-separated modes, residual included (default: %(default)s)",
    )
    parser.add_argument(
        "--nproc-per-node", type=_positive_int, default=1, help="processes per run; above 1 uses torch.distributed.run"
    )
    parser.add_argument(
        "--warmup-steps", type=_non_negative_int, help="steps left out of the medians (default: train_iters // 5)"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    action.add_argument("--report-only", action="store_true", help="skip training; report the runs already in --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to every run")
    return parser


def _modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",")]
    unknown = [mode for mode in modes if mode not in HC_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown} in {text!r}; expected names from {list(HC_MODES)}")
    if len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"{text!r} names a mode twice")
    if BASELINE not in modes:
        raise argparse.ArgumentTypeError(f"{text!r} must include the baseline {BASELINE!r}")
    return modes


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _check_overrides(parser: argparse.ArgumentParser, overrides: Sequence[str]) -> None:
    for override in overrides:
        key, separator, _ = override.partition("=")
        if not separator or not key.strip():
            parser.error(f"override {override!r} must have the form key=value")
        if key.strip() in PER_MODE_KEYS:
            parser.error(
                f"override {override!r} is not allowed: mhc-compare sets hc_mode=MODE and run_dir=OUT/MODE for "
                "each run; choose the modes with --modes and the output directory with --out"
            )
