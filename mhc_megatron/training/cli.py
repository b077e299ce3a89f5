"""``mhc-train``: train a hyper-connected GPT with megatron-core, on one process or under torchrun.

    torchrun --nproc-per-node N -m mhc_megatron.train --config configs/NAME.yaml [key=value ...]

``mhc_megatron.train`` is the module ``python -m`` runs; the command is ``main`` here. Nothing of
megatron-core is imported before ``main`` has silenced its start-up notices, which is why this
package's ``__init__`` imports none of its modules.

Keys are described in docs/training.md (megatron-core's ``TransformerConfig`` field names, the mHC
fields and the training settings). A bad config, dataset or checkpoint stops the job before any
training with a message that names it (exit status 2); a run that diverges stops with exit status 3
(``loop.TrainingDiverged``); a run stopped by its exit signal or time budget saves and exits with 75
(``exit_requests``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from mhc_megatron.world import default_to_world_of_one

# Notices megatron-core and torch print on every start that say nothing about this run: the
# optional Apex / Transformer Engine fallbacks, experimental or deprecated APIs we do not use
# (GPTModel still is megatron-core's GPT), and torch's CUDA_HOME probe on machines without CUDA.
BAD_INPUT, DIVERGED = 2, 3

_START_UP_NOTICES = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "MimoModelConfig is experimental",
)


def quiet_start_up_notices() -> None:
    for text in _START_UP_NOTICES:
        warnings.filterwarnings("ignore", message=text, category=UserWarning)
    # DeepSpeed's ZeRO calls collectives that torch 2.13 deprecates (all_gather_into_tensor, ...), each time
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="mhc-train",
        description="Train a residual / HC / mHC GPT with megatron-core (start it with torchrun for several processes).",
    )
    parser.add_argument("--config", help="YAML config (flat mapping of keys); omitted: defaults and overrides only")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that replace the config's")
    return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    parser, args = _parse_args(argv)
    default_to_world_of_one()  # started without torchrun
    quiet_start_up_notices()
    from mhc_megatron.training.config import RunConfig
    from mhc_megatron.training.exit_requests import EXIT_STATUS as INTERRUPTED
    from mhc_megatron.training.loop import TrainingDiverged, train

    try:
        run = RunConfig.load(args.config, args.overrides)
        if os.environ["RANK"] == "0":
            for notice in run.notices:
                print(f"mhc-train: note: {notice}", file=sys.stderr)
        result = train(run)
    except ValueError as error:
        _error(error, BAD_INPUT)
    except TrainingDiverged as error:
        _error(error, DIVERGED)
    if result.checkpoint is not None and os.environ["RANK"] == "0":
        print(f"checkpoint: {result.checkpoint}")
    if result.interrupted_by is not None:
        if os.environ["RANK"] == "0":
            print(f"mhc-train: interrupted after step {result.last_step} ({result.interrupted_by}); "
                  f"{'resume with load=<the save directory>' if result.checkpoint else 'nothing saved: save is not set'}"
                  f" (exit status {INTERRUPTED})", file=sys.stderr)
        _exit(INTERRUPTED)
    _exit(0)


def _error(error: Exception, status: int) -> None:
    if os.environ["RANK"] == "0":
        print(f"mhc-train: error: {error}", file=sys.stderr)
    _exit(status)


def _exit(status: int) -> None:
    """Exit with ``status``, first written to ``$MHC_EXIT_STATUS_FILE`` when set: torchrun exits with 1
    whatever its workers' statuses, so the launch scripts read the status there (an interrupted run's
    75 is how they know to requeue it). Every rank of the node writes it (the same status on every
    rank): torchrun terminates the other workers as soon as one exits with a status other than 0, so
    the rank that exits first must be one that wrote it. Each writes its own file and renames it into
    place, so a reader sees one whole status."""
    path = os.environ.get("MHC_EXIT_STATUS_FILE")
    if path:
        written = f"{path}.rank{os.environ['LOCAL_RANK']}"
        with open(written, "w") as file:
            file.write(f"{status}\n")
        os.replace(written, path)
    sys.exit(status)

