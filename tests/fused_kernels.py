"""Whether a test may run the fused kernels, for the tests of every backend.

Missing kernels fail a test that needs them, unless ``MHC_BUILD`` asked for none on that device
(``none``; ``cpu`` for CUDA): then it skips, saying so. A build that broke must never leave the
suite green.
"""

import os

import pytest
import torch

from mhc_megatron.ops import fused


def require_fused(device: str) -> torch.device:
    """``device`` as a torch.device when the fused kernels run there; else skip or fail (above)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = fused.unavailable_reason(device)
    if reason is None:
        return device
    build = os.environ.get("MHC_BUILD", "auto")
    if build == "none" or (build == "cpu" and device.type == "cuda"):
        pytest.skip(f"MHC_BUILD={build}: no fused kernels for {device.type} were built ({reason})")
    pytest.fail(f"fused kernels unavailable on {device.type}: {reason} (MHC_BUILD={build}); "
                "fix the build, or set MHC_BUILD=none to run without them")
