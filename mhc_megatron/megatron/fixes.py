"""Fixes of megatron-core 0.19.2 that hold on every device, applied by ``initialize_parallel``.

* ``CheckpointWithoutOutput`` sets its flag as ``self.fp8 = fp8 is not None``, so the default
  ``fp8=False`` that every caller passes turns it on. Forward then asks Transformer Engine's
  ``FP8GlobalStateManager`` whether fp8 is enabled; without Transformer Engine that name does not
  exist and forward raises ``NameError``, on a GPU as on the CPU. Megatron's selective recompute of
  ``layernorm`` and ``moe_act`` takes this path. Where Transformer Engine is absent the flag
  becomes ``bool(fp8)``; where it is installed megatron's own code runs unchanged (the name exists
  there, and it reports fp8 off unless the run turns fp8 on).

``MegatronFixes`` is an ``Adaptation``: ``undo`` (``destroy_parallel``) restores megatron-core.
"""

from __future__ import annotations

import contextlib
import functools

from mhc_megatron.megatron.patching import Adaptation, replace


class MegatronFixes(Adaptation):
    """The fixes of this module's docstring that apply in this process."""

    def _adapt(self, stack: contextlib.ExitStack) -> None:
        from megatron.core.tensor_parallel import random as megatron_random

        if megatron_random.HAVE_TE:
            return
        checkpoint = megatron_random.CheckpointWithoutOutput
        original_init = checkpoint.__init__

        @functools.wraps(original_init)
        def init_with_fp8_flag(self, fp8=False):
            original_init(self, fp8)
            self.fp8 = bool(fp8)

        replace(stack, checkpoint, "__init__", init_with_fp8_flag)
