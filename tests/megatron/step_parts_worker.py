"""Run by test_step_bench.py under torchrun (one process): recorded steps of ``mhc-bench step``'s
variants on a tiny shape, dumped as JSON.

Per variant, ``PLAIN`` recorded steps (with the optimizer step), each with its wall time measured
around ``StepParts.record`` (``Variant.recorded_step``). Then, per case of ``CASES``, one recorded
step of a variant with a delay put into one op: a sleep of ``DELAY`` seconds in its forward, or in
its backward (an identity on one of the op's tensors whose backward sleeps). Each sleep is measured
around ``time.sleep`` by the delay itself, independently of the stamps, and filed under the part
and phase where it must land: where autograd was on (forward) and where it was off (backward, or
block recompute's replays of ``post_res`` in backward).
"""

import argparse
import contextlib
import json
import time
from collections.abc import Iterator

import torch
from delays import CallInBackward
from megatron.core.transformer.mlp import MLP

from mhc_megatron.bench.step import Variant, StepShape
from mhc_megatron.megatron import destroy_parallel, initialize_parallel
from mhc_megatron.megatron.model import layer as layer_module
from mhc_megatron.modules import hyper_connection

SHAPE = StepShape(layers=2, hidden=32, ffn=64, heads=4, seq=16, micro_batch=1, streams=4, vocab=128)
BLOCK_SIZE = 3  # blocks of 3 sub-layers: the replays rebuild states in backward
PLAIN = 2
DELAY = 0.2
# case -> (variant, where the delay goes, direction, (part, phase) for sleeps with autograd on, and off)
CASES = {
    "post_res forward": ("mhc", "post_res", "forward", ("post_res", "forward"), None),
    "post_res forward, replayed": ("mhc+recompute", "post_res", "forward", ("post_res", "forward"),
                                   ("recompute", "backward")),
    "mappings and pre backward": ("mhc", "mappings_pre", "backward", None, ("mappings", "backward")),
    "post_res and the next mappings backward": ("mhc", "post_res_mappings_pre", "backward", None,
                                                ("post_res_mappings", "backward")),
    "hc mappings and pre backward": ("hc", "hc_mappings_pre", "backward", None, ("mappings", "backward")),
    "expand forward": ("mhc", "expand", "forward", ("expand_collapse", "forward"), None),
    "mlp backward": ("mhc", "mlp", "backward", None, ("layer", "backward")),
    "residual mlp backward": ("residual", "mlp", "backward", None, ("layer", "backward")),
}


class Sleeps:
    """The measured sleeps, filed by whether autograd was on when they happened."""

    def __init__(self) -> None:
        self.with_grad: list[float] = []
        self.without_grad: list[float] = []

    def sleep(self) -> None:
        started = time.perf_counter()
        time.sleep(DELAY)
        (self.with_grad if torch.is_grad_enabled() else self.without_grad).append(time.perf_counter() - started)


def delayed(function, direction: str, sleeps: Sleeps, argument: int | None = None):
    """``function`` with a sleep before it (``forward``), or with its argument ``argument`` (or, if
    None, its output; a tuple's first element) passed through ``CallInBackward`` (``backward``)."""

    def wrapper(*args, **kwargs):
        if direction == "forward":
            sleeps.sleep()
            return function(*args, **kwargs)
        if argument is not None:
            args = list(args)
            args[argument] = CallInBackward.apply(args[argument], sleeps.sleep)
            return function(*args, **kwargs)
        output = function(*args, **kwargs)
        if isinstance(output, tuple):
            return (CallInBackward.apply(output[0], sleeps.sleep), *output[1:])
        return CallInBackward.apply(output, sleeps.sleep)

    return wrapper


# where -> (module or class, attribute, argument sent through CallInBackward: None = the output)
TARGETS = {
    "post_res": (hyper_connection, "mhc_post_res", None),
    "mappings_pre": (hyper_connection, "mhc_mappings_pre", 0),  # the streams x: after the op's own backward
    "hc_mappings_pre": (hyper_connection, "hc_mappings_pre", 0),  # likewise
    "post_res_mappings_pre": (hyper_connection, "mhc_post_res_mappings_pre", 1),  # f (x's gradient is handed off)
    "expand": (layer_module, "expand_streams", None),
    "mlp": (MLP, "forward", None),
}


@contextlib.contextmanager
def delay_in(where: str, direction: str, sleeps: Sleeps) -> Iterator[None]:
    owner, name, argument = TARGETS[where]
    original = getattr(owner, name)
    setattr(owner, name, delayed(original, direction, sleeps, argument))
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize_parallel(seed=1234)
    variants = {name: Variant(name, SHAPE, BLOCK_SIZE, optimizer=True)
                for name in ("residual", "hc", "mhc", "mhc+recompute")}
    report = {"plain": {name: [variant.recorded_step(warmup=1) for _ in range(PLAIN)]
                        for name, variant in variants.items()},
              "cases": {}}
    for case, (name, where, direction, with_grad, without_grad) in CASES.items():
        variants[name].step()  # the warm-up, without the delay
        sleeps = Sleeps()
        with delay_in(where, direction, sleeps):
            step = variants[name].recorded_step(warmup=0)
        report["cases"][case] = {
            "variant": name, **step,
            "sleeps": {"with_grad": {"expected": with_grad, "seconds": sleeps.with_grad},
                       "without_grad": {"expected": without_grad, "seconds": sleeps.without_grad}},
        }
    with open(args.out, "w") as out:
        json.dump(report, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
