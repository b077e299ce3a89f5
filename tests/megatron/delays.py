"""The delay the timing workers (part_timing_worker.py, step_parts_worker.py) put into a backward."""

import torch


class CallInBackward(torch.autograd.Function):
    """The identity on ``tensor``; its backward calls ``callback()`` (a sleep the worker measures)
    before passing the gradient on."""

    @staticmethod
    def forward(ctx, tensor, callback):
        ctx.callback = callback
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None
