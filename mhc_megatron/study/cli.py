"""``mhc-study``: train a stability study's runs (resumably), then write its report.

    mhc-study --config PATH [--out DIR] [--nproc-per-node N] [--dry-run | --report-only] [key=value ...]

Every run is ``python -m mhc_megatron.train --config OUT/training.yaml key=value ... hc_mode=MODE
seed=S lr=LR min_lr=... run_dir=OUT/runs/NAME save=... load=...`` in one process, or under
``torch.distributed.run --nproc-per-node N`` (``runner``).
Running the same command again skips the runs that ended and continues the one that was stopped
from its last checkpoint. Then ``OUT/report/`` gets ``report.md``, its plots and ``study.json``
(``report``). ``OUT`` defaults to ``runs/study-<config file stem>``. Exit status: 0 done, 2 bad input,
75 interrupted by SIGTERM (run again to resume), 1 a run failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mhc_megatron.study.config import PER_RUN_KEYS, StudyConfig
from mhc_megatron.study.report import write_report
from mhc_megatron.study.runner import run_study


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mhc-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="study YAML (sections 'study' and 'training')")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/study-<config stem>)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per run (GPUs of the node)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print the runs' commands and exit")
    action.add_argument("--report-only", action="store_true", help="write the report of the runs already in --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides for every run")
    args = parser.parse_intermixed_args(argv)
    try:
        config = StudyConfig.load(args.config)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for override in args.overrides:
        key, separator, _ = override.partition("=")
        if not separator or not key.strip():
            parser.error(f"override {override!r} must have the form key=value")
        if key.strip() in PER_RUN_KEYS:
            parser.error(f"override {override!r} is not allowed: the study sets {', '.join(PER_RUN_KEYS)} for each run")
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    out = args.out if args.out is not None else Path("runs") / f"study-{args.config.stem}"
    if not args.report_only:
        run_study(config, out, args.overrides, args.nproc_per_node, dry_run=args.dry_run)
        if args.dry_run:
            return
    try:
        report = write_report(config, out)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"mhc-study: no report written: {error}") from error
    print(f"report: {report}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
