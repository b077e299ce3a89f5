"""mHC block recomputation: gradients bitwise equal to no recomputation (float64, CPU), states and
sub-layer inputs really freed and rebuilt, under PP (1F1B and interleaved), megatron's own
recomputation and MoE."""

import itertools
import json

import pytest

from conftest import run_workers
from mhc_megatron.method import REBUILD_SCHEMES

BLOCK_SIZES = ["None", "1", "2", "3", "100"]


def run_recompute_case(tmp_path, nproc: int, *args: str) -> list[dict]:
    out = tmp_path / "record"
    run_workers("recompute_worker.py", nproc, *args, "--out", str(out))
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("record.stage*"))]


@pytest.mark.parametrize(
    "nproc, args",
    [
        (1, []),
        (2, ["--pp", "2"]),
        (2, ["--pp", "2", "--vpp", "2", "--layers", "8"]),
        (1, ["--megatron-recompute", "selective"]),
        (1, ["--megatron-recompute", "full-block"]),
        (1, ["--megatron-recompute", "full"]),
        (1, ["--experts", "4"]),
    ],
    ids=["single", "pp2-1f1b", "pp2-vpp2", "megatron-selective", "megatron-full-block", "megatron-full", "moe"],
)
def test_block_recompute_gives_the_gradients_of_none(tmp_path, nproc, args):
    stages = run_recompute_case(tmp_path, nproc, *args)
    assert len(stages) == (2 if "--pp" in args else 1)
    for record in stages:
        for size, rebuild in itertools.product(BLOCK_SIZES, REBUILD_SCHEMES):
            variant = record[f"{rebuild}-{size}"]
            assert variant["max_grad_difference"] == 0.0, (size, rebuild, variant)
            assert variant["loss"] == record["none"]["loss"]
            assert variant["freed_states"] == variant["rebuilt_states"]
            assert variant["freed_inputs"] == variant["rebuilt_inputs"]
        for size in BLOCK_SIZES:  # the same tensors freed and rebuilt; the paper's scheme replays fewer
            sublayer, block = record[f"sublayer-{size}"], record[f"block-{size}"]
            assert block["rebuilt_states"] == sublayer["rebuilt_states"]
            assert block["replayed_post_res"] == block["rebuilt_states"]
            assert sublayer["replayed_post_res"] >= block["replayed_post_res"]
        if "full" in args:  # megatron reruns every layer (uniform); block recompute has nothing to add
            assert all(record[f"sublayer-{size}"]["freed_inputs"] == 0 for size in BLOCK_SIZES)
        else:  # every sub-layer input is rebuilt; L_r = 1 keeps every state, longer blocks free some
            assert all(record[f"sublayer-{size}"]["freed_inputs"] > 0 for size in BLOCK_SIZES)
            assert record["sublayer-1"]["freed_states"] == 0
            assert record["sublayer-100"]["freed_states"] > 0
            assert record["sublayer-100"]["replayed_post_res"] > record["block-100"]["replayed_post_res"]


def _toy_pass(weights, x, tracker=None, cut_at=None):
    """Four toy sub-layers with the hyper-connection's data flow: u = read(x) = 2 x, f = w u (keeps u
    for w's gradient), x' = advance(x) = x / 2 + f (keeps nothing)."""
    import torch

    for position, weight in enumerate(weights):
        if position == cut_at:
            return None
        layer_input = x * 2.0
        output = weight * layer_input
        next_state = x * 0.5 + output
        if tracker is not None:
            tracker.after_sublayer(
                position, x, layer_input, next_state,
                read=lambda state: state * 2.0,
                advance=lambda state, output=output: state * 0.5 + output,
            )
        x = next_state
    return x


@pytest.mark.parametrize("rebuild, replays", [("sublayer", 3), ("block", 2)])
def test_tracker_rebuilds_exact_values_after_a_cut_forward_pass(rebuild, replays):
    import torch

    from mhc_megatron.megatron.model.recompute import BlockRecompute

    def gradients(tracker, cut_first):
        weights = [torch.full((3,), 1.0 + i / 10, dtype=torch.float64, requires_grad=True) for i in range(4)]
        x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).requires_grad_()
        if cut_first:  # a pass that stops half-way leaves an open block behind
            _toy_pass(weights, x * 1.0, tracker, cut_at=3)
        _toy_pass(weights, x * 1.0, tracker).square().sum().backward()
        return [w.grad for w in weights] + [x.grad]

    reference = gradients(None, cut_first=False)
    tracker = BlockRecompute(sublayers=4, block_size=3, rebuild=rebuild)
    for got, want in zip(gradients(tracker, cut_first=True), reference):
        assert torch.equal(got, want)
    # blocks {0, 1, 2} and {3}: states 1 and 2 and every input rebuilt once, nothing of the cut pass;
    # sub-layer by sub-layer, state 2 replays two post_res and state 1 one; the whole block, two
    assert tracker.rebuilt_inputs == 4 and tracker.rebuilt_states == 2
    assert tracker.replayed_post_res == replays


def test_tracker_refuses_an_unknown_rebuild_scheme():
    from mhc_megatron.megatron.model.recompute import BlockRecompute

    with pytest.raises(ValueError, match="mhc_recompute_rebuild must be one of 'sublayer', 'block', got 'layer'"):
        BlockRecompute(sublayers=4, block_size=3, rebuild="layer")


@pytest.mark.parametrize("rebuild", REBUILD_SCHEMES)
def test_tracker_keeps_nothing_after_backward(rebuild):
    """Once a pass's backward is done, its states, layer inputs and outputs are garbage: the hooks the
    tracker puts on the states must not keep them alive (a reference cycle through autograd's hooks,
    which Python's collector does not see, leaked every step's tensors before)."""
    import gc
    import weakref

    import torch

    from mhc_megatron.megatron.model.recompute import BlockRecompute

    tracker = BlockRecompute(sublayers=4, block_size=3, rebuild=rebuild)
    seen = []
    original = tracker.after_sublayer

    def recording(position, state, layer_input, next_state, read, advance):
        seen.extend(weakref.ref(t) for t in (state, layer_input, next_state))
        original(position, state, layer_input, next_state, read, advance)

    tracker.after_sublayer = recording
    weights = [torch.full((3,), 1.0 + i / 10, dtype=torch.float64, requires_grad=True) for i in range(4)]
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).requires_grad_()
    _toy_pass(weights, x * 1.0, tracker).square().sum().backward()
    gc.collect()
    assert len(seen) == 12 and tracker.rebuilt_inputs == 4
    assert [ref() is None for ref in seen] == [True] * len(seen)


def test_a_rebuilt_tensor_takes_the_replays_memory_without_a_copy():
    import torch

    from mhc_megatron.megatron.model.recompute import _free, _restore

    freed = torch.arange(12.0).reshape(3, 4)
    view = freed[1:]  # what autograd may hold: another tensor on the same storage
    _free(freed)
    values = torch.full((3, 4), 7.0)
    address = values.data_ptr()
    _restore(freed, values)
    assert freed.data_ptr() == address and torch.equal(view, torch.full((2, 4), 7.0))
    assert values.untyped_storage().nbytes() == 0
    with pytest.raises(RuntimeError, match=r"rebuilt a tensor of shape \(4, 3\)"):
        _restore(torch.empty(3, 4), torch.empty(4, 3))
