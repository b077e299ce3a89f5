"""Durations of the parts of one GPT micro-batch pass, stamped inside megatron's own schedule.

``PartTimer`` times a PP = 1 model as megatron's schedule runs it: each ``forward_step`` and
``backward_step`` of the schedule, and inside them the embedding and every transformer layer. A
layer's forward is the interval between its forward pre-hook and forward hook; its backward is the
interval between the gradient reaching its output and the gradient reaching its input (tensor
hooks; the CPU autograd engine runs the backward in this thread, one node after the other), each
extended to the next layer's start so that the block's work between layers is counted. The rest of
each pass is split by where it runs, so that the parts add up to the pass:

- ``prologue``: the forward step before the first layer, less the embedding (the data iterator,
  ``GPTModel``'s preamble): every pipeline chunk pays it;
- ``head_forward``: after the last layer (final norm, output layer, loss);
  ``head_backward``: from the start of the backward step to the gradient at the last layer's
  output (the same, backwards, and the autograd engine's start);
- ``embedding_forward``; ``embedding_backward``: from the gradient at the first layer's input to
  the end of the backward step (the embedding's backward and the engine's finish).

A pipeline chunk of layers ``a..b`` then costs, per micro-batch, its layers' forward (backward)
plus the prologue, plus the embedding parts on the first chunk and the head parts on the last.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def schedule_steps(around_forward, around_backward) -> Iterator[None]:
    """Meanwhile every ``forward_step`` megatron's schedules call runs inside ``with around_forward():``
    and every ``backward_step`` inside ``with around_backward():`` (both context-manager factories)."""
    from megatron.core.pipeline_parallel import schedules

    forward_step, backward_step = schedules.forward_step, schedules.backward_step

    def wrapped_forward(*args, **kwargs):
        with around_forward():
            return forward_step(*args, **kwargs)

    def wrapped_backward(*args, **kwargs):
        with around_backward():
            return backward_step(*args, **kwargs)

    schedules.forward_step, schedules.backward_step = wrapped_forward, wrapped_backward
    try:
        yield
    finally:
        schedules.forward_step, schedules.backward_step = forward_step, backward_step


class PartTimer:
    """Stamps of every micro-batch pass of ``model`` (a ``GPTModel``, PP = 1) while ``recording``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = list(model.decoder.layers)
        self.passes: list[dict] = []
        self._stamps: dict | None = None
        model.embedding.register_forward_pre_hook(lambda module, args: self._stamp("embedding_start"))
        model.embedding.register_forward_hook(lambda module, args, output: self._stamp("embedding_end"))
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._layer_started(index), with_kwargs=True)
            layer.register_forward_hook(self._layer_ended(index))

    def _stamp(self, name: str, index: int | None = None) -> None:
        if self._stamps is not None:
            self._stamps[name if index is None else (name, index)] = time.perf_counter()

    def _on_gradient(self, tensor: torch.Tensor, name: str, index: int) -> None:
        stamps = self._stamps

        def hook(grad):
            stamps[(name, index)] = time.perf_counter()

        if stamps is not None and tensor.requires_grad:
            tensor.register_hook(hook)

    def _layer_started(self, index: int):
        def hook(module, args, kwargs):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._on_gradient(hidden_states, "grad_input", index)
            self._stamp("layer_start", index)

        return hook

    def _layer_ended(self, index: int):
        def hook(module, args, output):
            self._stamp("layer_end", index)
            self._on_gradient(output[0], "grad_output", index)

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Time every ``forward_step`` and ``backward_step`` megatron's schedules call meanwhile."""
        pending: list[dict] = []  # passes whose forward ran and backward has not

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            self._stamps = {"forward_start": time.perf_counter()}
            try:
                yield
            finally:
                self._stamps["forward_end"] = time.perf_counter()
                pending.append(self._stamps)
                self._stamps = None

        @contextlib.contextmanager
        def backward() -> Iterator[None]:
            stamps = pending.pop(0)
            stamps["backward_start"] = time.perf_counter()
            try:
                yield
            finally:
                stamps["backward_end"] = time.perf_counter()
                self.passes.append(stamps)

        with schedule_steps(forward, backward):
            yield

    @staticmethod
    def durations(stamps: dict) -> tuple[float, float]:
        """Seconds of one recorded pass's forward step and backward step."""
        return stamps["forward_end"] - stamps["forward_start"], stamps["backward_end"] - stamps["backward_start"]

    def pass_parts(self, stamps: dict) -> dict:
        """The parts (s) of one recorded pass: ``prologue``, ``embedding_forward``,
        ``embedding_backward``, ``head_forward``, ``head_backward`` and ``("layer_forward", k)``,
        ``("layer_backward", k)`` per layer ``k`` (see the module docstring)."""
        s, last = stamps, len(self.layers) - 1
        embedding = s["embedding_end"] - s["embedding_start"]
        parts = {
            "prologue": s[("layer_start", 0)] - s["forward_start"] - embedding,
            "embedding_forward": embedding,
            "head_forward": s["forward_end"] - s[("layer_end", last)],
            "head_backward": s[("grad_output", last)] - s["backward_start"],
            "embedding_backward": s["backward_end"] - s[("grad_input", 0)],
        }
        for index in range(len(self.layers)):
            # up to the next layer's start (the block's own work between layers included)
            forward_end = s[("layer_start", index + 1)] if index < last else s[("layer_end", last)]
            backward_start = s[("grad_input", index + 1)] if index < last else s[("grad_output", last)]
            parts[("layer_forward", index)] = forward_end - s[("layer_start", index)]
            parts[("layer_backward", index)] = s[("grad_input", index)] - backward_start
        return parts

    def parts(self) -> dict:
        """Median seconds over the recorded passes of each part of ``pass_parts``, the layers' as
        the lists ``layer_forward`` and ``layer_backward`` (one entry per layer)."""
        samples: dict = {}
        for stamps in self.passes:
            for key, value in self.pass_parts(stamps).items():
                samples.setdefault(key, []).append(value)
        medians = {key: statistics.median(values) for key, values in samples.items()}
        result = {key: value for key, value in medians.items() if isinstance(key, str)}
        for kind in ("layer_forward", "layer_backward"):
            result[kind] = [medians[(kind, index)] for index in range(len(self.layers))]
        return result
