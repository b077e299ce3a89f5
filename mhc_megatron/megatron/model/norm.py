"""``SequenceParallelNorm``: LayerNorm / RMSNorm that works under sequence parallelism without TE or Apex.

megatron-core's plain-torch norm (``WrappedTorchNorm``) refuses sequence parallelism, because under
it each tensor rank normalises different tokens and the norm weights' gradients must be summed over
the tensor group. This norm marks its parameters ``sequence_parallel`` so that megatron's
``finalize_model_grads`` all-reduces their gradients over the tensor group, exactly as it does for
TE's and Apex's norms. Its state-dict keys (``weight``, ``bias``) and numerics are those of
``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn


class SequenceParallelNorm(nn.Module):
    """``config.normalization`` (``LayerNorm`` or ``RMSNorm``) over the last dimension ``[..., C]``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(
                f"normalization must be 'LayerNorm' or 'RMSNorm' for SequenceParallelNorm, "
                f"got {config.normalization!r}"
            )
        self.normalization = config.normalization
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if config.normalization == "LayerNorm"
            else None
        )
        for parameter in self.parameters():
            parameter.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.hidden_size,)
        if self.bias is None:
            return nn.functional.rms_norm(x, shape, self.weight, self.eps)
        return nn.functional.layer_norm(x, shape, self.weight, self.bias, self.eps)
