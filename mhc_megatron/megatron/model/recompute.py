"""mHC's block recomputation of the stream state (paper, section 4.3).

Without it, every hyper-connected sub-layer ``l`` keeps for backward its input stream state ``x_l``
(``n*C`` values per token, read by the mappings, ``pre`` and ``post_res``) and its layer input
``u_l = h_pre x_l`` (``C``, the sub-layer's norm keeps it), besides its output ``f_l`` (``C``,
``post_res`` needs it for the gradient of ``h_post``) and its coefficients. With
``mhc_recompute="block"`` the sub-layers of each (virtual) pipeline chunk form blocks of ``L_r``
consecutive sub-layers and only the state at a block's start is kept; the other states and every
layer input are freed as soon as forward no longer needs them.

Backward rebuilds the states by replaying ``x_{k+1} = post_res(x_k, f_k, h_post_k, h_res_k)`` from
the block start with the kept outputs and coefficients, and each ``u_l = read(x_l, h_pre_l)`` just
before sub-layer ``l``'s backward; each is freed again when that backward is done. Two schemes
(``rebuild``, ``MhcTransformerConfig.mhc_recompute_rebuild``):

* ``sublayer`` (default): ``x_l`` is replayed just before sub-layer ``l``'s backward, from the
  block start. At most one rebuilt state per chunk is held at any time, for ``L_r (L_r - 1) / 2``
  replayed ``post_res`` per block.
* ``block`` (the paper's): when the block's backward begins, one replay from the block start
  rebuilds all its states: ``L_r - 1`` ``post_res`` per block, and up to ``L_r - 1`` rebuilt states
  held until their sub-layers' backward is done.

Either way the replay runs the same operators on the same inputs as forward, so the rebuilt
tensors, and every gradient, are bitwise those of ``none``.

Mechanics: a freed tensor stays (autograd holds it) but its storage shrinks to zero bytes; the
rebuild gives that storage the replayed values (the replay's memory, handed over without a copy),
below autograd's version counters, as megatron-core's ``CheckpointWithoutOutput`` restores its
outputs. The rebuild of sub-layer ``l`` is a hook on the gradient of its output state ``x_{l+1}``,
which autograd runs before any backward of ``l``; the same hook frees what sub-layer ``l + 1``
used, whose backward is then complete. Blocks never cross a pipeline chunk: the chunk's input and
output are block boundaries.

Layers that megatron-core itself recomputes (``recompute_granularity="full"``) keep only their
chunk's input already; block recomputation leaves them alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mhc_megatron.method import REBUILD_SCHEMES


def _free(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(0)


def _restore(freed: torch.Tensor, values: torch.Tensor) -> None:
    """Give the storage of ``freed``, which had exactly the layout of ``values``, their values.

    ``values`` is a fresh tensor that nothing else holds (a replay's output): its memory is handed
    over to ``freed``'s storage (``UntypedStorage._swap_data_ptr_``, how FSDP refills storages it
    resized to 0), without a copy, and ``values`` is left with none. A torch without that method
    copies."""
    if (values.shape != freed.shape or values.stride() != freed.stride() or values.dtype != freed.dtype
            or values.storage_offset() != freed.storage_offset()):
        raise RuntimeError(
            f"block recompute rebuilt a tensor of shape {tuple(values.shape)}, strides {values.stride()}, "
            f"offset {values.storage_offset()}, {values.dtype}; forward had {tuple(freed.shape)}, "
            f"{freed.stride()}, offset {freed.storage_offset()}, {freed.dtype}"
        )
    storage = freed.untyped_storage()
    if hasattr(storage, "_swap_data_ptr_"):
        storage._swap_data_ptr_(values.untyped_storage())
    else:
        storage.resize_(values.untyped_storage().nbytes())
        storage.copy_(values.untyped_storage())


@dataclass
class _SubLayer:
    """One hyper-connected sub-layer in one forward pass.

    ``state`` is its input stream state (freed unless it starts the block), ``layer_input`` the
    input it gave the sub-layer (always freed); ``read(state)`` recomputes ``layer_input`` and
    ``advance(state)`` the next state, both with the coefficients and output kept from forward,
    each into a fresh tensor (the rebuild hands its memory to the freed one).
    """

    state: torch.Tensor | None
    state_freed: bool
    layer_input: torch.Tensor | None
    read: Callable[[torch.Tensor], torch.Tensor] | None
    advance: Callable[[torch.Tensor], torch.Tensor] | None
    state_rebuilt: bool = False

    def release(self) -> None:
        """Free what backward rebuilt and drop every reference: nothing later in backward reads this
        sub-layer (the rebuilds that follow replay the sub-layers before it). Dropping them also
        breaks the cycle a hook on ``state`` would otherwise close (the hook holds the block, the
        block this sub-layer, this sub-layer ``state``): autograd keeps hooks in C++, where Python's
        collector cannot see the cycle, and every step's states, outputs and coefficients leaked."""
        if self.layer_input is None:
            return  # released already (a second backward through a retained graph)
        _free(self.layer_input)
        if self.state_freed:
            _free(self.state)
        self.state = self.layer_input = self.read = self.advance = None


@dataclass
class _Block:
    """The sub-layers of one block in one forward pass; ``sublayers[0].state`` is kept."""

    sublayers: list[_SubLayer] = field(default_factory=list)


class BlockRecompute:
    """Block bookkeeping for the hyper-connected sub-layers of one pipeline chunk.

    ``sublayers`` counts the chunk's hyper-connected sub-layers, ``block_size`` is ``L_r``. The
    layer calls ``after_sublayer`` after each sub-layer (see there). The chunk's sub-layers run in
    order within one forward pass, and a block closes within the pass, so one open block per chunk
    suffices; what backward needs lives in the hooks. Sub-layers the tracker does not see (layers
    megatron recomputes, at the start of a chunk) are skipped: the first one it sees starts a block.
    """

    def __init__(self, sublayers: int, block_size: int, rebuild: str = "sublayer") -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"mhc_recompute_block must be an int >= 1, got {block_size!r}")
        if rebuild not in REBUILD_SCHEMES:
            raise ValueError(f"mhc_recompute_rebuild must be one of {', '.join(map(repr, REBUILD_SCHEMES))}, "
                             f"got {rebuild!r}")
        self.sublayers = sublayers
        self.block_size = block_size
        self.rebuild = rebuild
        self._open: _Block | None = None
        # Counters over the tracker's life, for tests and benchmarks.
        self.freed_states = self.rebuilt_states = 0
        self.freed_inputs = self.rebuilt_inputs = 0
        self.replayed_post_res = 0
        # Called after each rebuild, while the rebuilt tensors are held (benchmarks measure there).
        self.rebuild_observer: Callable[[], None] | None = None

    def after_sublayer(
        self,
        position: int,
        state: torch.Tensor,
        layer_input: torch.Tensor,
        next_state: torch.Tensor,
        read: Callable[[torch.Tensor], torch.Tensor],
        advance: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Sub-layer ``position`` (its index among the chunk's sub-layers, from 0) has run: it read
        ``layer_input`` from ``state`` and produced ``next_state``; ``read`` and ``advance``
        recompute the two from ``state`` without autograd (see ``_SubLayer``)."""
        if not torch.is_grad_enabled():
            return  # nothing is kept for backward (evaluation, or a forward megatron recomputes)
        if position == 0:
            self._open = None  # a new forward pass (one that was cut short left no block to link to)
        offset = position % self.block_size
        starts_block = offset == 0 or self._open is None  # a block start, or the first sub-layer tracked
        previous = None if starts_block else self._open
        if starts_block:
            previous_block, self._open = self._open, _Block()
        sublayer = _SubLayer(state, not starts_block, layer_input, read, advance)
        self._open.sublayers.append(sublayer)
        # This sub-layer was the last reader of both in forward.
        _free(layer_input)
        self.freed_inputs += 1
        if sublayer.state_freed:
            _free(state)
            self.freed_states += 1
        # Backward reaches `state` once this sub-layer's backward is done: free what it rebuilt and
        # rebuild the previous sub-layer (same block, or the last of the previous block).
        if state.requires_grad:
            if previous is None:
                previous, index = previous_block, None
            else:
                index = len(previous.sublayers) - 2
            state.register_hook(self._hook(release=sublayer, block=previous, index=index))
        if position == self.sublayers - 1:  # the chunk's last sub-layer: nothing comes after it
            block, self._open = self._open, None
            next_state.register_hook(self._hook(release=None, block=block, index=len(block.sublayers) - 1))

    def _hook(self, release: _SubLayer | None, block: _Block | None, index: int | None):
        def on_gradient(_grad: torch.Tensor) -> None:
            if release is not None:
                release.release()
            if block is not None and block.sublayers:
                self._rebuild(block, len(block.sublayers) - 1 if index is None else index)

        return on_gradient

    def _rebuild(self, block: _Block, index: int) -> None:
        """Rebuild the input state (with ``block`` rebuilding: those of the sub-layers before it in
        the block too) and the layer input of ``block.sublayers[index]`` for its backward."""
        sublayer = block.sublayers[index]
        with torch.no_grad():
            if sublayer.state_freed and not sublayer.state_rebuilt:
                first = 1 if self.rebuild == "block" else index
                state = block.sublayers[0].state
                for position in range(1, index + 1):
                    state = block.sublayers[position - 1].advance(state)
                    self.replayed_post_res += 1
                    target = block.sublayers[position]
                    if position >= first and target.state_freed and not target.state_rebuilt:
                        _restore(target.state, state)
                        state = target.state  # the replay's values now live there
                        target.state_rebuilt = True
                        self.rebuilt_states += 1
            _restore(sublayer.layer_input, sublayer.read(sublayer.state))
            self.rebuilt_inputs += 1
        if self.rebuild_observer is not None:
            self.rebuild_observer()
