"""One seed, one initial model, whatever the layout (mhc_megatron/megatron/model/initialization.py).

Two torchrun launches build every case of initialization_worker.py: one process builds the
references (dense mHC, HC, MoE under seed 7, and dense under seed 8), two processes build TP=2,
TP=2+SP, PP=2, PP=2 x VPP=2 (mHC and HC), EP=2 (MoE) and DP=2 in turn. Each case's initial
parameters are gathered into full tensors by megatron's checkpoint keys, and every layout must equal
its single-process reference bitwise. The rest checks the drawn distributions, the seed's effect
and the pure parts of the convention without launching anything; the two launches take most of
the module's time.
"""

import functools
import math

import pytest
import torch
from conftest import run_workers
from initialization_worker import CASES, SEED, slug

from mhc_megatron.megatron import MhcTransformerConfig
from mhc_megatron.megatron.model import initialization
from mhc_megatron.megatron.model.initialization import Constant, Normal, block_seed, megatron_rule, normal_of

REFERENCES = ["dense", "dense, seed 8", "hc", "moe"]
LAYOUTS = [name for name in CASES if name not in REFERENCES]
DRAWN = (  # the keys whose values are drawn; every other one is a constant or built from the config
    "word_embeddings.weight", "position_embeddings.weight", "linear_qkv.weight", "linear_proj.weight",
    "linear_fc1.weight", "linear_fc2.weight", "output_layer.weight", ".phi", "router.weight", "router.bias",
)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """``{case: {"tensors": {key: full tensor}, "problems": [...]}}`` of every case."""
    out = tmp_path_factory.mktemp("initial")
    run_workers("initialization_worker.py", 1, "--cases", *REFERENCES, "--out", str(out))
    run_workers("initialization_worker.py", 2, "--cases", *LAYOUTS, "--out", str(out))
    return {name: torch.load(out / f"{slug(name)}.pt") for name in CASES}


@pytest.fixture(scope="module")
def initial(records):
    """``{case: {key: full tensor}}`` of every case."""
    return {name: record["tensors"] for name, record in records.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_starts_from_the_single_process_model(layout, records, initial):
    for case in (layout, CASES[layout].model):
        assert not records[case]["problems"], f"{case}: {records[case]['problems']}"
    got, want = initial[layout], initial[CASES[layout].model]
    assert got.keys() == want.keys()
    different = [key for key in want if got[key].dtype != want[key].dtype or not torch.equal(got[key], want[key])]
    assert not different, f"{layout}: initial values differ from one process's in {different}"


def test_another_seed_draws_every_drawn_value_anew_and_nothing_else(initial):
    seven, eight = initial["dense"], initial["dense, seed 8"]
    changed = {key for key in seven if not torch.equal(seven[key], eight[key])}
    assert changed == {key for key in seven if key.endswith(DRAWN)}
    for key in changed:
        assert (seven[key] != eight[key]).float().mean() > 0.99, key


def test_layers_and_experts_draw_their_own_values(initial):
    qkv = initial["dense"]["decoder.layers.self_attention.linear_qkv.weight"]  # [layer, 3C, C]
    experts = initial["moe"]["decoder.layers.mlp.experts.experts.linear_fc1.weight"]  # [layer, expert, 2F, C]
    for stack in (qkv, experts.flatten(0, 1)):
        assert all(not torch.equal(stack[i], stack[j]) for i in range(len(stack)) for j in range(i))


def test_the_values_follow_megatrons_and_the_modules_inits(initial):
    dense, std, layers = initial["dense"], 0.02, 4
    expected_std = {
        "embedding.word_embeddings.weight": std,
        "decoder.layers.self_attention.linear_qkv.weight": std,
        "decoder.layers.mlp.linear_fc1.weight": std,
        "decoder.layers.self_attention.linear_proj.weight": std / math.sqrt(2 * layers),
        "decoder.layers.mlp.linear_fc2.weight": std / math.sqrt(2 * layers),
        "decoder.layers.attention_hyper_connection.phi": 1 / math.sqrt(4 * 16),
        "decoder.layers.stream_collapse.phi": 1 / math.sqrt(4 * 16),
    }
    for key, want in expected_std.items():
        assert dense[key].std().item() == pytest.approx(want, rel=0.1), key
        assert abs(dense[key].mean().item()) < 4 * want / math.sqrt(dense[key].numel()), key
    for key, value in dense.items():
        if key.endswith(("layer_norm_weight", "final_layernorm.weight")):
            assert torch.equal(value, torch.ones_like(value)), key
        elif key.endswith("bias") and "router" not in key:
            assert torch.equal(value, torch.zeros_like(value)), key
        elif key.endswith("alpha"):
            assert torch.equal(value, torch.full_like(value, 0.3)), key
    hc = initial["hc"]
    # static_pre [layer, n]: the MLP sub-layer of layer l (sub-layer 2 l + 1) reads stream (2 l + 1) mod n
    static_pre = hc["decoder.layers.mlp_hyper_connection.static_pre"]
    assert torch.equal(static_pre.argmax(dim=1), torch.tensor([1, 3, 1, 3]))


def test_block_seed_is_a_stable_hash_of_seed_identity_and_block():
    assert block_seed(SEED, "embedding.word_embeddings.weight", 0) == 574302606790046117
    assert len({block_seed(s, name, b) for s in (7, 8) for name in ("a.weight", "b.weight") for b in (0, 1)}) == 8


@pytest.mark.parametrize("ranges", [((0, 10),), ((3, 7),), ((2, 4), (6, 8)), ((0, 1), (9, 10)), ((4, 9),)])
def test_a_shard_is_the_slice_of_the_full_draw(monkeypatch, ranges):
    """With blocks of 3 slices, drawing only the blocks that overlap the ranges gives the full
    tensor's slices."""
    monkeypatch.setattr(initialization, "BLOCK_ELEMENTS", 3 * 5 * 2)
    draw = functools.partial(initialization._drawn_ranges, SEED, "w", (10, 5, 2), rule=Normal(1.0))
    full = draw(((0, 10),))
    assert torch.equal(draw(ranges), torch.cat([full[start:stop] for start, stop in ranges]))


SHAPE = dict(num_layers=4, hidden_size=32, num_attention_heads=4)


@pytest.fixture(scope="module")
def config():
    return MhcTransformerConfig(**SHAPE, init_method_std=0.01)


@pytest.mark.parametrize("identity, rule", [
    ("embedding.word_embeddings.weight", Normal(0.01)),
    ("output_layer.weight", Normal(0.01)),
    ("decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight", Normal(0.01 / math.sqrt(8))),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", Constant(1.0)),  # Transformer Engine's fused norm
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_bias", Constant(0.0)),
    ("decoder.layers.0.self_attention.k_layernorm.weight", Constant(1.0)),
    ("decoder.layers.0.mlp.shared_experts.gate_weight", Normal(0.01)),
])
def test_megatron_rules_by_slot_and_name(config, identity, rule):
    assert megatron_rule(identity, config) == rule


def test_zero_centered_gamma_starts_norm_weights_at_zero():
    config = MhcTransformerConfig(**SHAPE, layernorm_zero_centered_gamma=True)
    assert megatron_rule("decoder.final_layernorm.weight", config) == Constant(0.0)


def test_a_parameter_without_a_rule_is_named(config):
    identity = "decoder.layers.0.self_attention.linear_q_down_proj.weight"
    with pytest.raises(ValueError, match=f"no initial-value rule for parameter '{identity}'"):
        megatron_rule(identity, config)


def test_an_init_method_that_is_not_normal_is_refused():
    config = MhcTransformerConfig(**SHAPE, init_method=torch.nn.init.xavier_uniform_)
    with pytest.raises(ValueError, match="config.init_method must be a normal init"):
        normal_of(config, "init_method")


def test_the_seed_must_be_an_int(config):
    with pytest.raises(TypeError, match="seed must be an int, got '7'"):
        initialization.initialize_parameters(torch.nn.Linear(2, 2), config, "7")
