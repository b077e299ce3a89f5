"""Run by test_part_timing.py under torchrun (one process): a small model's PP = 1 schedule with a
``PartTimer``, in residual and mHC mode, dumped as JSON (per pass: its parts and its durations)."""

import argparse
import json

from mhc_megatron.bench.part_timing import PartTimer
from mhc_megatron.bench.pipeline import _SinglePipeline
from mhc_megatron.megatron import destroy_parallel, initialize_parallel

SHAPE = ["num_layers=3", "hidden_size=32", "ffn_hidden_size=64", "num_attention_heads=4", "seq_length=16",
         "micro_batch_size=2", "global_batch_size=6"]
MICRO_BATCHES, SCHEDULES = 3, 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize_parallel()
    report = {}
    for mode in ("residual", "mhc"):
        pipeline = _SinglePipeline("configs/tiny-cpu.yaml", [*SHAPE, f"hc_mode={mode}"], MICRO_BATCHES)
        timer = PartTimer(pipeline.model[0].module)
        with timer.recording():
            for _ in range(SCHEDULES):
                pipeline.schedule(MICRO_BATCHES)
        pipeline.schedule(1)  # outside the recording: adds no pass
        report[mode] = {
            "passes": [
                {"parts": {str(key): value for key, value in timer.pass_parts(stamps).items()},
                 **dict(zip(("forward", "backward"), timer.durations(stamps)))}
                for stamps in timer.passes
            ],
            "medians": timer.parts(),
        }
    with open(args.out, "w") as out:
        json.dump(report, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
