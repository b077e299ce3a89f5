"""Fixtures shared by the operator tests."""

import pytest

from fused_kernels import require_fused
from mhc_megatron.ops import backends


@pytest.fixture(params=backends.BACKENDS)
def op_backend(request):
    """Runs the test once per backend of the operators (``reference``, ``compile``, ``fused``), that
    backend chosen for every op: each is held to the operators' contract on its own."""
    if request.param == "fused":
        require_fused("cpu")
    with backends.use_backend(request.param):
        yield request.param
