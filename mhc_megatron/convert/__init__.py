"""Checkpoints converted in (``mhc-convert``): a residual model upcycled to HC or mHC, and Megatron-LM's
own mHC layers to this project's.

``session`` holds what both share (one process with megatron's groups, loading every weight but the
hyper-connections', the probe logits, the converted save directory); ``upcycle`` and
``megatron_lm`` are the two conversions; ``cli`` is the command.
"""

# How ``upcycle`` starts mHC's read weights h_pre: 1/n (the residual layer exactly) or 1/2 (the
# paper's initialisation; the residual layer under a norm condition). ``upcycle``'s docstring says more.
PRE_BIASES = ("mean", "zero")
