"""Run by test_part_timing.py under torchrun (one process): a small model's PP = 1 schedule with a
``PartTimer``, in residual and mHC mode, dumped as JSON.

Per mode: the parts of every pass of two recorded schedules and their medians; then, for each
direction, one more recorded schedule in which layer ``SLOW_LAYER`` sleeps ``DELAY`` seconds at the
start of its forward, or in its backward (an identity on the layer's output whose backward sleeps),
with each sleep as measured around ``time.sleep`` by the delay itself, independently of the stamps.
"""

import argparse
import contextlib
import json
import time
from collections.abc import Iterator

import torch
from delays import CallInBackward

from mhc_megatron.bench.part_timing import PartTimer
from mhc_megatron.bench.pipeline import _SinglePipeline
from mhc_megatron.megatron import destroy_parallel, initialize_parallel

SHAPE = ["num_layers=3", "hidden_size=32", "ffn_hidden_size=64", "num_attention_heads=4", "seq_length=16",
         "micro_batch_size=2", "global_batch_size=6"]
MICRO_BATCHES, SCHEDULES = 3, 2
SLOW_LAYER, DELAY = 1, 0.2


def measured_sleep() -> float:
    """Sleep ``DELAY`` seconds; return the seconds that passed."""
    started = time.perf_counter()
    time.sleep(DELAY)
    return time.perf_counter() - started


@contextlib.contextmanager
def slowed_down(layer: torch.nn.Module, direction: str, slept: list) -> Iterator[None]:
    """Meanwhile ``layer`` sleeps at the start of its forward (``direction`` "forward") or, through
    its output, in its backward ("backward"); each measured sleep is appended to ``slept``."""

    def slowed(*args, **kwargs):
        if direction == "forward":
            slept.append(measured_sleep())
        output, context = type(layer).forward(layer, *args, **kwargs)
        if direction == "backward":
            output = CallInBackward.apply(output, lambda: slept.append(measured_sleep()))
        return output, context

    layer.forward = slowed
    try:
        yield
    finally:
        del layer.forward


def recorded_passes(timer: PartTimer) -> list[dict]:
    return [
        {"parts": {str(key): value for key, value in timer.pass_parts(stamps).items()},
         **dict(zip(("forward", "backward"), timer.durations(stamps)))}
        for stamps in timer.passes
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize_parallel()
    report = {}
    for mode in ("residual", "mhc"):
        pipeline = _SinglePipeline("configs/tiny-cpu.yaml", [*SHAPE, f"hc_mode={mode}"], MICRO_BATCHES)
        model = pipeline.model[0].module
        timer = PartTimer(model)
        with timer.recording():
            for _ in range(SCHEDULES):
                pipeline.schedule(MICRO_BATCHES)
        pipeline.schedule(1)  # outside the recording: adds no pass
        report[mode] = {"passes": recorded_passes(timer), "medians": timer.parts()}
        for direction in ("forward", "backward"):
            timer.passes.clear()
            slept = []
            with slowed_down(model.decoder.layers[SLOW_LAYER], direction, slept), timer.recording():
                pipeline.schedule(MICRO_BATCHES)
            report[mode][f"{direction}_delay"] = {"passes": recorded_passes(timer), "slept": slept}
    with open(args.out, "w") as out:
        json.dump(report, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
