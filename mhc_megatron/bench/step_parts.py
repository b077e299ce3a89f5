"""A whole training step split by kind of work, stamped inside megatron's PP = 1 schedule.

``StepParts.record(step)`` runs one step and charges every moment of it to exactly one part
(exclusive time, so the parts of a step add up to its wall time), each split by phase: ``forward``
(inside megatron's ``forward_step``), ``backward`` (inside ``backward_step``) and ``step`` (the rest
of the step). The parts (``PARTS``):

- ``embedding``: the embedding's forward; its backward, from the gradient at its output to the end
  of the backward step (the autograd engine's finish included);
- ``expand_collapse``: copying the embedding into the n streams (layer 1) and collapsing them
  (the last layer), forward and backward;
- ``mappings``: the connection's coefficients ``h_pre, h_post, h_res`` (mHC: projection and
  Sinkhorn; HC: tanh of the normalised projections), forward and backward, the accumulation of
  their parameters' gradients included, and the sub-layer input ``u = h_pre x``, which their one
  op (``mhc_mappings_pre``, ``hc_mappings_pre``) computes with them (one read of the streams);
- ``post_res``: writing the next streams ``h_res x + h_post f``; in residual mode the residual add
  ``x + f``;
- ``post_res_mappings``: the one op an mHC layer runs between two sub-layers (without block
  recompute): the attention's ``post_res`` and the MLP's mappings and input, and the MLP's
  ``post_res`` and the next layer's attention mappings and input, forward and backward;
- ``layer``: the megatron layer proper: norms, attention, MLP, bias and dropout, and the
  accumulation of their weights' gradients;
- ``recompute``: mHC block recompute's bookkeeping in forward and its rebuilds in backward (the
  replays of ``post_res`` and ``read`` included);
- ``head``: from the last layer's output on: final norm, output layer, loss; in backward from the
  start of the backward step to the gradient at the last layer's output (the engine's start);
- ``optimizer``: the optimizer's ``zero_grad`` and ``step``;
- ``other``: the rest: the schedule itself, the data iterator, ``GPTModel``'s preamble (rotary
  tables), the work between layers, zeroing the gradient buffers, ``finalize_model_grads``.

How. Forward: calls made with autograd on are wrapped while recording (the connections'
``mappings_and_read`` and ``post_res``, ``post_res_then_pre`` where a layer fuses it, the first
layer's ``_stream_state``, the collapse, the embedding, each layer, block recompute's
``after_sublayer``, the optimizer's ``step`` and ``zero_grad``): the time inside a call goes to its part, nested calls to theirs. Backward: the CPU
autograd engine runs the graph's nodes one at a time in this thread, among the ready nodes the most
recently created first, so the backward of an op starts when the gradient of its output is complete.
A tensor hook on each wrapped op's output (and on the sub-layer output ``f``, for ``layer``)
switches the part there, and the op's backward lasts until the next switch. Per sub-layer that is
``x'`` (post_res) -> ``f`` (layer) -> ``u``, ``h_pre, h_post, h_res`` (mappings) -> ``x`` (post_res of
the sub-layer before). Calls without autograd (block recompute's replays, made by its
rebuild in backward) stay in the part that made them: ``recompute``, through the tracker's
``_rebuild``, wrapped too.

The wrappers and hooks exist only while ``record`` runs: steps outside it run the model untouched.
The stamps cost a few microseconds per wrapped call and per hook, some hundred per step.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import partial

import torch

from mhc_megatron.bench.part_timing import schedule_steps

PARTS = ("embedding", "expand_collapse", "mappings", "post_res", "post_res_mappings", "layer", "recompute", "head",
         "optimizer", "other")
CONNECTION_PARTS = ("mappings", "post_res", "post_res_mappings")  # the hyper-connection ops
PHASES = ("forward", "backward", "step")


class _Clock:
    """Exclusive seconds per ``(part, phase)``: the part on top of the stack is charged until the
    next change (``push``/``pop`` for nested calls, ``switch`` for the backward's hooks)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.stack = ["other"]
        self.phase = "step"
        self.since = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[(self.stack[-1], self.phase)] += now - self.since
        self.since = now

    def switch(self, part: str) -> None:
        self._charge()
        self.stack[-1] = part

    def push(self, part: str) -> None:
        self._charge()
        self.stack.append(part)

    def pop(self) -> None:
        self._charge()
        self.stack.pop()

    def enter(self, phase: str, part: str) -> None:
        """Start ``phase`` in ``part``, with no call pending (the start or end of a schedule step)."""
        if len(self.stack) != 1:
            raise RuntimeError(f"step_parts: calls {self.stack[1:]} still open at the {phase} boundary")
        self._charge()
        self.phase, self.stack[0] = phase, part

    @contextlib.contextmanager
    def charged(self, part: str) -> Iterator[None]:
        """Charge the ``with`` block to ``part``."""
        self.push(part)
        try:
            yield
        finally:
            self.pop()

    def on_gradient(self, tensor, part: str) -> None:
        """Switch to ``part`` when the gradient of ``tensor`` is complete (its producer's backward starts)."""
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda grad: self.switch(part))


class _Patches:
    """Instance attributes and module hooks set while recording, all removed by ``undo``."""

    def __init__(self) -> None:
        self._attributes: list[tuple[object, str]] = []
        self._handles: list = []

    def wrap(self, owner, name: str, part: str, clock: _Clock, gradient_parts: Callable | None = None,
             always: bool = False) -> None:
        """Replace ``owner.name`` by a wrapper that charges its calls to ``part``: every call
        (``always``), or only the calls made with autograd on (the forward's: backward and block
        recompute's replays run without); then ``gradient_parts(clock, result, *args, **kwargs)``
        places the hooks of backward."""
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if not (always or torch.is_grad_enabled()):
                return original(*args, **kwargs)
            with clock.charged(part):
                result = original(*args, **kwargs)
                if gradient_parts is not None:
                    gradient_parts(clock, result, *args, **kwargs)
            return result

        setattr(owner, name, wrapper)
        self._attributes.append((owner, name))

    def charge_module(self, module: torch.nn.Module, part: str, clock: _Clock, after: Callable | None = None) -> None:
        """Charge ``module``'s forward to ``part``; then ``after(output)``, if given."""

        def started(module, args):
            clock.push(part)

        def ended(module, args, output):
            clock.pop()
            if after is not None:
                after(output)

        self._handles += [module.register_forward_pre_hook(started), module.register_forward_hook(ended)]

    def undo(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, name in reversed(self._attributes):
            delattr(owner, name)
        self._attributes, self._handles = [], []


def _mappings_and_read_gradients(clock: _Clock, outputs, *args, **kwargs) -> None:
    for tensor in outputs:  # layer_input, h_pre, h_post, h_res: one op
        clock.on_gradient(tensor, "mappings")


def _post_res_gradients(clock: _Clock, next_streams, streams, output, *args, **kwargs) -> None:
    clock.on_gradient(output, "layer")  # f is read by post_res only: its producer runs next
    clock.on_gradient(next_streams, "post_res")


def _post_res_then_pre_gradients(clock: _Clock, result, streams, output, *args, **kwargs) -> None:
    next_streams, layer_input, mixing = result
    clock.on_gradient(output, "layer")  # the sub-layer's output is read by this op only
    for tensor in (next_streams, layer_input, mixing.h_pre, mixing.h_post, mixing.h_res):
        clock.on_gradient(tensor, "post_res_mappings")


def _expand_gradients(clock: _Clock, streams, hidden_states, *args, **kwargs) -> None:
    if streams is not hidden_states:
        clock.on_gradient(streams, "expand_collapse")


class StepParts:
    """Records training steps of ``model`` (a ``GPTModel``, PP = 1, not DDP-wrapped) split into
    ``PARTS`` (see the module docstring); ``optimizer``, if given, is the one the step calls."""

    def __init__(self, model: torch.nn.Module, optimizer=None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.layers = list(model.decoder.layers)

    def record(self, step: Callable[[], object]) -> dict[str, dict[str, float]]:
        """Run ``step()`` once, recorded: seconds per part and phase, ``{part: {phase: s}}``, only
        the parts and phases that took time."""
        clock = _Clock()
        patches = self._install(clock)
        forward = partial(self._phase, clock, "forward", "other")
        backward = partial(self._phase, clock, "backward", "head")
        try:
            clock.enter("step", "other")
            with schedule_steps(forward, backward):
                step()
            clock.enter("step", "other")
        finally:
            patches.undo()
        parts: dict[str, dict[str, float]] = {}
        for (part, phase), seconds in clock.seconds.items():
            if seconds > 0:
                parts.setdefault(part, {})[phase] = seconds
        return parts

    @staticmethod
    @contextlib.contextmanager
    def _phase(clock: _Clock, phase: str, part: str) -> Iterator[None]:
        """A schedule's forward or backward step: ``phase``, starting in ``part``."""
        clock.enter(phase, part)
        try:
            yield
        finally:
            clock.enter("step", "other")

    def _install(self, clock: _Clock) -> _Patches:
        patches = _Patches()
        patches.charge_module(self.model.embedding, "embedding", clock,
                              after=lambda output: clock.on_gradient(output, "embedding"))
        trackers = {}
        for index, layer in enumerate(self.layers):
            last = index == len(self.layers) - 1
            patches.charge_module(layer, "layer", clock, after=(lambda output: clock.switch("head")) if last else None)
            for connection in (layer.attention_hyper_connection, layer.mlp_hyper_connection):
                if connection.mode != "residual":
                    patches.wrap(connection, "mappings_and_read", "mappings", clock, _mappings_and_read_gradients)
                patches.wrap(connection, "post_res", "post_res", clock, _post_res_gradients)
            fused_connections = (
                (layer.attention_hyper_connection, layer.fuses_attention_post_res_with_mlp_pre),
                (layer.mlp_hyper_connection, layer.hands_pre_to_following),
            )
            for connection, fuses in fused_connections:
                if fuses:
                    patches.wrap(connection, "post_res_then_pre", "post_res_mappings", clock,
                                 _post_res_then_pre_gradients)
            if layer.expands_embedding and layer.num_streams > 1:
                patches.wrap(layer, "_stream_state", "expand_collapse", clock, _expand_gradients)
            if layer.stream_collapse is not None:
                patches.charge_module(layer.stream_collapse, "expand_collapse", clock,
                                      after=lambda output: clock.on_gradient(output, "expand_collapse"))
            if layer.block_recompute is not None:
                trackers[id(layer.block_recompute)] = layer.block_recompute
        for tracker in trackers.values():
            patches.wrap(tracker, "after_sublayer", "recompute", clock)
            patches.wrap(tracker, "_rebuild", "recompute", clock, always=True)  # runs in backward
        if self.optimizer is not None:
            patches.wrap(self.optimizer, "zero_grad", "optimizer", clock, always=True)
            patches.wrap(self.optimizer, "step", "optimizer", clock, always=True)
        return patches
