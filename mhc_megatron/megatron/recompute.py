"""mHC's block recomputation of the stream state (paper, section 4.3).

Without it, every hyper-connected sub-layer keeps its input stream state ``x_l`` (``n*C`` values per
token) for backward. With ``mhc_recompute="block"`` the sub-layers of each (virtual) pipeline chunk
form blocks of ``L_r`` consecutive sub-layers; only the state at a block's start is kept, with each
sub-layer's output ``f_l`` (kept anyway: ``post_res`` needs it). The other states are freed as soon
as the forward pass no longer needs them, and rebuilt when backward reaches the block's last
sub-layer, by replaying ``x_{l+1} = post_res(x_l, f_l, mappings(x_l))`` from the block start. The
replay runs the same operators on the same inputs, so the rebuilt states, and every gradient, are
bitwise those of ``none``.

Mechanics: a freed state keeps its tensor (which autograd holds) but its storage shrinks to zero
bytes; the rebuild writes the replayed values back into that storage, below autograd's version
counters, the way megatron-core's ``CheckpointWithoutOutput`` restores its outputs. The rebuild is a
hook on the gradient of the block's last state, which autograd runs before any backward of the
block. Blocks never cross a pipeline chunk: the chunk's input and output are block boundaries.

Layers that megatron-core itself recomputes (``recompute_granularity="full"``) keep only their
chunk's input already; block recomputation leaves them alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RECOMPUTE_MODES = ("none", "block")


def default_block_size(num_streams: int, sublayers: int) -> int:
    """``L_r* = sqrt(n * L / (n + 2))`` rounded, for ``L`` hyper-connected sub-layers in a chunk.

    It balances the states kept at block starts (``n*C * L / L_r`` per token) against the states
    rebuilt for one block in backward (about ``(n + 2) * C * L_r``).
    """
    return min(sublayers, max(1, round(math.sqrt(num_streams * sublayers / (num_streams + 2)))))


@dataclass
class _Block:
    """The states of one block in one forward pass, and how to replay them."""

    tracker: BlockRecompute
    start: torch.Tensor
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    freed: list[torch.Tensor] = field(default_factory=list)

    def rebuild(self, _grad: torch.Tensor) -> None:
        """Replay the block from its start and write every freed state back into its storage."""
        self.tracker.rebuilt_states += len(self.freed)
        with torch.no_grad():
            state = self.start
            for step, freed in zip(self.steps, self.freed):
                state = step(state)
                freed.untyped_storage().resize_(state.untyped_storage().nbytes())
                freed.untyped_storage().copy_(state.untyped_storage())
        self.steps.clear()
        if self.tracker.rebuild_observer is not None:
            self.tracker.rebuild_observer()


class BlockRecompute:
    """Block bookkeeping for the hyper-connected sub-layers of one pipeline chunk.

    ``sublayers`` counts the chunk's hyper-connected sub-layers, ``block_size`` is ``L_r``. The layer
    calls ``after_sublayer(position, x_in, x_out, replay)`` after each sub-layer, with the sub-layer's
    position in the chunk (from 0), its input and output states, and a function that recomputes
    ``x_out`` from ``x_in`` without autograd. The chunk's sub-layers run in order within one forward
    pass, and a block closes within the pass, so one open block per chunk suffices. Sub-layers the
    tracker does not see (layers megatron recomputes) are skipped: the first one it sees after them
    starts a block.
    """

    def __init__(self, sublayers: int, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"mhc_recompute_block must be an int >= 1, got {block_size!r}")
        self.sublayers = sublayers
        self.block_size = block_size
        self._open: _Block | None = None
        self.freed_states = 0  # counters over the tracker's life, for tests and benchmarks
        self.rebuilt_states = 0
        # Called after each block rebuild, when the rebuilt states are held (benchmarks measure there).
        self.rebuild_observer: Callable[[], None] | None = None

    def after_sublayer(
        self, position: int, x_in: torch.Tensor, x_out: torch.Tensor, replay: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        if not torch.is_grad_enabled():
            return  # nothing is kept for backward (evaluation, or a forward megatron recomputes)
        offset = position % self.block_size
        if offset == 0 or self._open is None:  # a block start, or the first sub-layer tracked
            self._open = _Block(tracker=self, start=x_in)
        else:
            # x_in was the previous sub-layer's output; this sub-layer was its last reader in forward.
            self._open.freed.append(x_in)
            x_in.untyped_storage().resize_(0)
            self.freed_states += 1
        self._open.steps.append(replay)
        last_of_block = offset == self.block_size - 1 or position == self.sublayers - 1
        if last_of_block:
            block, self._open = self._open, None
            del block.steps[len(block.freed):]  # only the replays that produce freed states
            if block.freed:
                x_out.register_hook(block.rebuild)
