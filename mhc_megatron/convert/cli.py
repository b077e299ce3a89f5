"""``mhc-convert``: bring a trained checkpoint into this project.

    mhc-convert upcycle --config RUN/config.yaml --load SAVE --output OUT --hc-mode mhc [--num-streams 4]
                        [--pre-bias mean|zero] [key=value ...]
    mhc-convert from-megatron-lm --config CONFIG --load MEGATRON_LM_SAVE --output OUT [key=value ...]

``--config`` (with ``key=value`` overrides) describes the model as ``mhc-train`` does: for
``upcycle`` the residual run that saved ``--load`` (its ``config.yaml``), for ``from-megatron-lm``
the mHC model Megatron-LM trained (``hc_mode: mhc``, ``hc_collapse: mean``, its sizes). ``--load`` is
a save directory (its latest iteration) or one ``iter_*`` checkpoint. ``OUT`` becomes a save
directory holding iteration 0 and ``OUT/config.yaml``, which trains on from the converted weights:
``mhc-train --config OUT/config.yaml save=... run_dir=...`` (``load=OUT``, ``finetune=true``).
Exit status: 0 converted, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mhc_megatron.convert import PRE_BIASES
from mhc_megatron.method import NUM_STREAMS

BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhc-convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    upcycle = commands.add_parser("upcycle", help="a residual checkpoint to HC or mHC, starting as the same function")
    upcycle.add_argument("--hc-mode", choices=("hc", "mhc"), required=True)
    upcycle.add_argument("--num-streams", type=int, default=NUM_STREAMS, help=f"n (default {NUM_STREAMS})")
    upcycle.add_argument("--pre-bias", choices=PRE_BIASES, default="mean",
                         help="mhc's read weights: mean (1/n, exact; default) or zero (1/2, the paper's init; "
                              "exact only under the norm condition, see docs/training.md)")
    megatron_lm = commands.add_parser("from-megatron-lm", help="Megatron-LM's own mHC checkpoint to this project's")
    for command in (upcycle, megatron_lm):
        command.add_argument("--config", type=Path, required=True, help="the model's mhc-train config")
        command.add_argument("--load", type=Path, required=True, help="save directory or iter_* checkpoint to convert")
        command.add_argument("--output", type=Path, required=True, help="new save directory for the converted model")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="settings that replace the config's")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from mhc_megatron.training.cli import quiet_start_up_notices

    quiet_start_up_notices()
    from mhc_megatron.convert.megatron_lm import from_megatron_lm
    from mhc_megatron.convert.upcycle import upcycle

    try:
        if args.command == "upcycle":
            result = upcycle(args.config, args.overrides, args.load, args.output, args.hc_mode, args.num_streams,
                             args.pre_bias)
            compared = "the residual model's"
        else:
            result = from_megatron_lm(args.config, args.overrides, args.load, args.output)
            compared = "the same weights under Megatron-LM's RMS and Sinkhorn conventions"
    except ValueError as error:
        print(f"mhc-convert: error: {error}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    print(f"converted: {result.checkpoint}")
    print(f"logits on a probe batch against {compared}: {result.logits}")
    print(f"train on: mhc-train --config {result.config} save=<new save directory> run_dir=<new run directory>")


if __name__ == "__main__":
    main(sys.argv[1:])
