"""The cost model, the search, the inputs' checks and the command line."""

from __future__ import annotations

import pytest

from mhc_megatron.method import connection_bytes_moved
from mhc_megatron.plan import costs
from mhc_megatron.plan.cli import main
from mhc_megatron.plan.evaluate import evaluate
from mhc_megatron.plan.hardware import GB, cluster, gpu
from mhc_megatron.plan.model import Layout, ModelSpec, model_from_yaml
from mhc_megatron.plan.recommend import recommend

SMALL = ModelSpec(num_layers=4, hidden_size=8, num_attention_heads=2, seq_length=4, micro_batch_size=1,
                  global_batch_size=4, ffn_hidden_size=16, vocab_size=16, num_streams=2, hc_mode="mhc", bf16=False)


def test_stage_memory_by_hand():
    """C = 8, F = 16, V = 16, n = 2, fp32 (e = 4), PP = 2 on 2 GPUs (DP = 1), 4 micro-batches of 4 tokens.
    One layer's parameters: attention 8 (8 + 16) + 64 + two norms 16 = 272, MLP 2 x 8 x 16 = 256,
    two hyper-connections 2 (n C (n^2 + 2n) + n^2 + 2n + 3) = 2 (128 + 11) = 278: 806. Stage 0: two
    layers + the embedding 128 = 1740 parameters x (4 weight + 4 grad + 8 Adam) = 27,840 bytes.
    Activations per token and layer: norms 2 (3 C e + 4) = 200, attention 6 C e = 192, MLP 2 F e =
    128, mHC 2 (n C e + C e + 4 (2 n^2 + 4 n + 1)) = 2 (64 + 32 + 68) = 328: 848. Stage 0 holds
    min(m, pp) = 2 micro-batches x 2 layers x 4 tokens: 13,568 bytes. Total 41,408."""
    machine = cluster("H100", gpus_per_node=2)
    memory = costs.stage_memory(SMALL, Layout(pp=2), machine, micro_batches=4, stage=0)
    assert memory == {"weights": 27840, "activations": 13568, "total": 41408}
    last = costs.stage_memory(SMALL, Layout(pp=2), machine, micro_batches=4, stage=1)
    assert last["activations"] == 13568 / 2  # the last stage holds one micro-batch


def test_mhc_costs_more_than_residual_and_block_recompute_saves_memory():
    model = ModelSpec(num_layers=8, hidden_size=1024, num_attention_heads=8, seq_length=1024, micro_batch_size=1,
                      global_batch_size=16)
    machine = cluster("H100")
    base = evaluate(model, Layout(pp=2), machine)
    block = evaluate(model, Layout(pp=2, recompute="block"), machine)
    assert 0 < base.overhead < block.overhead
    assert block.peak_memory < base.peak_memory
    assert costs.transfer_bytes(model, Layout()) == 4 * costs.transfer_bytes(model.with_mode("residual"), Layout())
    assert base.comm_cost > evaluate(model.with_mode("residual"), Layout(pp=2), machine).comm_cost


def test_recommendation_fits_and_is_fastest():
    model = ModelSpec(num_layers=8, hidden_size=1024, num_attention_heads=8, seq_length=1024, micro_batch_size=1,
                      global_batch_size=16)
    machine = cluster("H100", gpus_per_node=4, hbm_bytes=1.5 * GB)  # tight: only some layouts fit
    search = recommend(model, Layout(), machine)
    assert search.best is not None and 0 < len(search.fitting) < search.tried
    assert all(e.peak_memory <= machine.device.hbm_bytes for e in search.fitting)
    assert search.best.step_time == min(e.step_time for e in search.fitting)
    assert search.best.residual_step is not None  # the winner is compared with residual
    assert recommend(model, Layout(), cluster("H100", gpus_per_node=4, hbm_bytes=1e3)).best is None


def test_unknown_gpu():
    with pytest.raises(ValueError, match=r"unknown GPU 'V100': expected one of H100-SXM, H800-SXM"):
        gpu("V100")
    assert gpu("h200").hbm_bytes == 141 * GB


@pytest.mark.parametrize("field", ["inter_node_bandwidth", "intra_node_bandwidth", "hbm_bandwidth"])
def test_non_positive_bandwidth(field):
    with pytest.raises(ValueError, match=f"device {field} must be positive, got 0"):
        cluster("H100", **{field: 0})


def test_layers_and_batches_must_divide():
    machine = cluster("H100", gpus_per_node=4)
    with pytest.raises(ValueError, match=r"num_layers 4 is not divisible by pp x vpp = 2 x 4"):
        costs.check_layout(SMALL, Layout(pp=2, vpp=4), machine)
    with pytest.raises(ValueError, match=r"global_batch_size 4 is not divisible by micro_batch_size x data-parallel size = 1 x 8"):
        costs.check_layout(SMALL, Layout(), cluster("H100"))
    with pytest.raises(ValueError, match="hc_mode must be one of"):
        ModelSpec(**{**vars(SMALL), "hc_mode": "dense"})


def test_yaml_config_is_read(tmp_path):
    model = model_from_yaml("configs/moe-3b.yaml")
    assert (model.num_layers, model.hidden_size, model.num_moe_experts, model.moe_router_topk) == (12, 1280, 64, 6)
    broken = tmp_path / "broken.yaml"
    broken.write_text("num_layers: 4\n")
    with pytest.raises(ValueError, match="needs .*hidden_size"):
        model_from_yaml(broken)


def test_cli_on_a_repo_config(capsys):
    main(["configs/gpt-1.3b.yaml", "--gpu", "H100", "--tp", "2", "--pp", "2", "--global-batch-size", "64"])
    out = capsys.readouterr().out
    assert "model: 24 layers, hidden 2048" in out and "1 x 8 H100-SXM" in out
    for label in ("residual", "hc", "mhc", "mhc + block", "mHC's extra"):
        assert f"\n{label} " in out or f"{label}" in out


def test_cli_reports_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["configs/tiny-cpu.yaml", "--gpu", "TPU"])
    assert "unknown GPU 'TPU'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["configs/tiny-cpu.yaml", "--pp", "3", "--gpus-per-node", "3"])
    assert "num_layers 4 is not divisible by pp x vpp = 3 x 1" in capsys.readouterr().err


def test_connection_traffic_comes_from_the_fused_kernels_byte_account():
    """n = 2, C = 8, fp32 (S = 64, R = 32 bytes per token, K = 8 coefficients of 4 bytes). mHC forward:
    mappings_pre S + R + (2K + 1) 4 = 164, post_res 2S + R + (n + n^2) 4 = 184: 348. Backward:
    mappings_pre 2S + R + (2K + 1 + n) 4 = 236, post_res 3S + 2R + 2 (n + n^2) 4 = 304, and mappings_pre
    reading the stream gradient post_res hands it, S = 64: 604. Residual: the add 3R, the gradients'
    sum 3R."""
    assert connection_bytes_moved("residual", 2, 8, 4) == (96, 96)
    assert connection_bytes_moved("mhc", 2, 8, 4) == (348, 604)
    machine = cluster("H100")
    layer = costs.layer_time(SMALL, Layout(), machine, layers_per_chunk=4)
    tokens = SMALL.seq_length * SMALL.micro_batch_size
    projection = 2 * tokens * 2 * 2 * 8 * 8 / machine.gemm_flops  # two sub-layers, 2 n C K FLOPs per token
    assert layer.connection_forward == pytest.approx(2 * tokens * 348 / machine.memory_bandwidth + projection)
    assert layer.connection_backward == pytest.approx(2 * tokens * 604 / machine.memory_bandwidth + 2 * projection)
