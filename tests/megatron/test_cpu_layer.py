"""The CPU layer (mhc_megatron/megatron/cpu.py) and megatron's fixes (fixes.py): while applied,
megatron-core's GPU assumptions hold on the CPU; undone, torch and megatron-core are as before."""

import pytest
import torch
from conftest import run_workers
from cpu_layer_worker import differences, owners, snapshot
from megatron.core.tensor_parallel import random as megatron_random
from torch.overrides import TorchFunctionMode

from mhc_megatron.megatron.cpu import CpuLayer, CudaArgumentsOnCpu
from mhc_megatron.megatron.fixes import MegatronFixes

# What the CPU layer's docstring says it changes (megatron's "tracker initialised" flag too, unless
# it was set already, when the layer sets the same value again).
CPU_LAYER_CHANGES = {
    ("torch.cuda", "current_device"), ("torch.cuda", "synchronize"), ("torch.cuda", "current_stream"),
    ("torch.cuda", "manual_seed"), ("megatron random", "_get_cuda_rng_state"),
    ("megatron random", "_set_cuda_rng_state"), ("megatron random", "CudaRNGStatesTracker"),
    ("megatron random", "_CUDA_RNG_STATE_TRACKER"), ("CheckpointFunction", "backward"),
    ("CheckpointWithoutOutputFunction", "backward"), ("CheckpointWithoutOutput", "_recompute"),
    ("torch", "function modes"),
}
TRACKER_FLAG = ("megatron random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")


class Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_the_layer_runs_cuda_calls_on_the_cpu_and_undo_restores_torch_and_megatron():
    owned = owners()
    before = snapshot(owned)
    with CpuLayer() as layer:
        assert layer.applied
        assert differences(before, snapshot(owned)) - {TRACKER_FLAG} == CPU_LAYER_CHANGES
        assert isinstance(torch.overrides._get_current_function_mode(), CudaArgumentsOnCpu)
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).to(torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        torch.cuda.synchronize()
        torch.cuda.current_stream().wait_stream(None)
        tracker = megatron_random.get_cuda_rng_tracker()
        tracker.add("test-stream", 11)
        with tracker.fork("test-stream"):
            drawn = torch.rand(3)
        assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(11)))
    assert not layer.applied
    assert not differences(before, snapshot(owned))
    assert torch.ones(2).type() == "torch.FloatTensor"


def test_the_layer_applies_again_after_undo():
    owned = owners()
    before = snapshot(owned)
    layer = CpuLayer()
    for _ in range(2):
        layer.apply()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        layer.undo()
        assert not differences(before, snapshot(owned))


def test_apply_twice_and_undo_unapplied_are_refused():
    layer = CpuLayer()
    with pytest.raises(RuntimeError, match="CpuLayer is not applied"):
        layer.undo()
    with layer:
        with pytest.raises(RuntimeError, match="CpuLayer is applied already"):
            layer.apply()


def test_undo_waits_for_a_mode_entered_after_the_layer():
    owned = owners()
    before = snapshot(owned)
    layer = CpuLayer().apply()
    later = Passthrough().__enter__()
    try:
        with pytest.raises(RuntimeError, match="a torch function mode entered after it is still active"):
            layer.undo()
        assert layer.applied and torch.cuda.current_device() == torch.device("cpu")  # nothing undone
    finally:
        later.__exit__(None, None, None)
    layer.undo()
    assert not differences(before, snapshot(owned))


def test_a_failed_apply_leaves_nothing_changed(monkeypatch):
    owned = owners()
    before = snapshot(owned)

    def fail(force_reset=False):
        raise RuntimeError("tracker refused")

    monkeypatch.setattr(megatron_random, "initialize_rng_tracker", fail)
    layer = CpuLayer()
    with pytest.raises(RuntimeError, match="tracker refused"):
        layer.apply()
    monkeypatch.undo()
    assert not layer.applied
    assert not differences(before, snapshot(owned))


@pytest.mark.skipif(megatron_random.HAVE_TE, reason="with Transformer Engine megatron's fp8 flag works; nothing is fixed")
def test_the_fp8_flag_fix_is_about_transformer_engine_not_the_cpu():
    """Without Transformer Engine megatron's ``CheckpointWithoutOutput`` (selective recompute of the
    norms) fails with the CPU layer applied as it would on a GPU: its forward names Transformer
    Engine. ``MegatronFixes`` mends it, and its undo restores megatron."""
    owned = owners()
    before = snapshot(owned)
    x = torch.ones(3, requires_grad=True)
    with CpuLayer():
        assert megatron_random.CheckpointWithoutOutput().fp8 is True  # megatron's `fp8 is not None`
        with pytest.raises(NameError, match="FP8GlobalStateManager"):
            megatron_random.CheckpointWithoutOutput().checkpoint(lambda t: t * 2, x)
        with MegatronFixes():
            assert megatron_random.CheckpointWithoutOutput().fp8 is False
            assert torch.equal(megatron_random.CheckpointWithoutOutput().checkpoint(lambda t: t * 2, x), 2 * x)
    assert not differences(before, snapshot(owned))


def test_initialize_and_destroy_parallel_leave_torch_and_megatron_as_before(tmp_path):
    output = run_workers("cpu_layer_worker.py", 1)
    assert "round trip 1: " in output and "round trip 2: " in output
    assert "all restored" in output
