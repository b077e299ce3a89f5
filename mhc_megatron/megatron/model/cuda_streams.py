"""A CUDA stream of high priority for the MLP sub-layer's post/residual mixing (mHC paper, section
4.3: DeepSeek runs ``F_post,res`` of the MLP on a high-priority stream, so that the kernel that
produces the next layer's input is scheduled ahead of other queued work, such as communication).

``run_on_stream`` runs one function on a side stream with the synchronisation that makes it safe:
the side stream first waits for the current one (the inputs were produced there), the current one
waits for the side stream before anything uses the result, and the caching allocator is told which
stream uses which tensor (``record_stream``), so that no memory is reused while the other stream may
still read it. Autograd runs the backward of the function on the same side stream and synchronises
it with the streams around it by itself. Nothing here runs on CPU: the config refuses the switch
without CUDA.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

_streams: dict[int, object] = {}


def high_priority_stream(device: int | None = None):
    """The highest-priority CUDA stream of ``device`` (the current one by default), one per device."""
    index = torch.cuda.current_device() if device is None else device
    if index not in _streams:
        _, highest = torch.cuda.Stream.priority_range()  # (least, greatest); greater priority is lower
        _streams[index] = torch.cuda.Stream(device=index, priority=highest)
    return _streams[index]


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def run_on_stream(stream, function, *args, current=None, stream_context=None):
    """``function(*args)`` on ``stream``, ordered after the work already queued on ``current`` (the
    current stream by default) and before the work queued there next. ``stream_context`` is
    ``torch.cuda.stream`` unless given (tests pass stand-ins)."""
    current = torch.cuda.current_stream() if current is None else current
    stream_context = torch.cuda.stream if stream_context is None else stream_context
    stream.wait_stream(current)
    with stream_context(stream):
        result = function(*args)
    for tensor in _tensors(args):
        tensor.record_stream(stream)  # read on the side stream: not reused before it is done
    for tensor in _tensors(result):
        tensor.record_stream(current)  # made on the side stream, used on the current one
    current.wait_stream(stream)
    return result
