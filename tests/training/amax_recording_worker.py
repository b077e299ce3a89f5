"""Run ``Trainer.step`` with the Amax gain recorded on one step only, counting what each step runs.

Usage (one process, 2 intra-op threads): ``torchrun --nproc-per-node 1 amax_recording_worker.py
--data PREFIX --run-dir DIR overrides...``. Per step it records the number of calls of every
``torch.distributed`` collective and the number of the process's OS threads, and prints them as
JSON lines ``{"step": k, "recorded": bool, "collectives": {...}, "threads": n}``.
"""

import argparse
import collections
import functools
import json
import os

import torch

from mhc_megatron.megatron import destroy_parallel, initialize_parallel, parallel_layout
from mhc_megatron.training.config import RunConfig
from mhc_megatron.training.loop import Trainer

COLLECTIVES = ("all_gather_object", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor",
               "all_gather_into_tensor", "gather_object", "broadcast_object_list")


def count_collectives(counts: collections.Counter) -> None:
    """Wrap each collective of torch.distributed so that a call adds one to ``counts[name]``."""
    for name in COLLECTIVES:
        original = getattr(torch.distributed, name)

        @functools.wraps(original)
        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(torch.distributed, name, counted)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--recorded-step", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [*args.overrides, f"data_path={args.data}", f"run_dir={args.run_dir}", f"train_iters={args.steps}",
                 f"log_interval={args.recorded_step}", "eval_interval=1000"]
    run = RunConfig.load(None, overrides)
    config = run.transformer_config()
    initialize_parallel(**parallel_layout(config), seed=run.training.seed)
    counts = collections.Counter()
    count_collectives(counts)
    trainer = Trainer(run, config)
    for _ in range(args.steps):
        counts.clear()
        record = trainer.step()
        print(json.dumps({"step": record["step"], "recorded": "amax_gain_backward" in record,
                          "collectives": dict(counts), "threads": len(os.listdir("/proc/self/task"))}))
    destroy_parallel()


if __name__ == "__main__":
    main()
