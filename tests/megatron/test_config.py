"""MhcTransformerConfig validation: every bad field raises before anything is built."""

import pytest
import torch

from mhc_megatron.megatron import MhcTransformerConfig

BASE = dict(num_layers=4, hidden_size=32, num_attention_heads=4)


def test_defaults_are_the_papers():
    config = MhcTransformerConfig(**BASE)
    assert (config.hc_mode, config.num_streams, config.sinkhorn_iters, config.hc_alpha_init) == ("mhc", 4, 20, 0.01)
    assert config.stream_count == 4
    assert MhcTransformerConfig(**BASE, hc_mode="residual").stream_count == 1


def test_batched_p2p_is_off_on_cpu():
    assert MhcTransformerConfig(**BASE).batch_p2p_comm is False


@pytest.mark.parametrize("pipeline, batched", [
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), False),
    (dict(pipeline_model_parallel_size=2), True),
    (dict(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2), True),
])
def test_batched_p2p_is_off_where_it_swaps_directions_even_with_cuda(pipeline, batched, monkeypatch):
    """At PP = 2 with a virtual pipeline a batched exchange swaps activations and gradients
    (``batched_exchange_crosses_directions``), on NCCL as on gloo; elsewhere megatron's default stays."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice is made before anything touches CUDA
    config = MhcTransformerConfig(**{**BASE, "num_layers": 8, **pipeline, "pipeline_dtype": torch.float32})
    assert config.batch_p2p_comm is batched


@pytest.mark.parametrize("fields, words", [
    ({"hc_mode": "dense"}, "hc_mode must be one of 'residual', 'hc', 'mhc', got 'dense'"),
    ({"hc_collapse": "sum"}, "hc_collapse must be one of 'mean', 'weighted', got 'sum'"),
    ({"num_streams": 0}, "num_streams must be an int >= 1, got 0"),
    ({"num_streams": 2.5}, "num_streams must be an int >= 1, got 2.5"),
    ({"sinkhorn_iters": -1}, "sinkhorn_iters must be an int >= 0, got -1"),
    ({"hc_eps": 0.0}, "hc_eps must be > 0"),
    ({"hidden_size": 30, "num_attention_heads": 2, "tensor_model_parallel_size": 4},
     r"hidden_size \(30\) must be divisible by tensor_model_parallel_size \(4\)"),
    ({"num_layers": 5, "pipeline_model_parallel_size": 2},
     r"num_layers \(5\) must be divisible among the pipeline stages.*= 2"),
    ({"num_layers": 6, "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
     r"num_layers \(6\) must be divisible among the pipeline stages.*= 4"),
    ({"mtp_num_layers": 1}, "mtp_num_layers=1 is not supported with hc_mode='mhc'"),
    ({"fp32_residual_connection": True}, "fp32_residual_connection=True is not supported with hc_mode='mhc'"),
    ({"mhc_recompute": "full"}, "mhc_recompute must be one of 'none', 'block', got 'full'"),
    ({"mhc_recompute": "block", "mhc_recompute_block": 0},
     r"mhc_recompute_block \(L_r\) must be an int >= 1 or None \(the default size\), got 0"),
    ({"mhc_recompute": "block", "mhc_recompute_block": 1.5}, r"mhc_recompute_block \(L_r\) must be an int >= 1"),
    ({"mhc_recompute": "block", "hc_mode": "residual"}, "hc_mode='residual' has none"),
    ({"mhc_recompute": "block", "mhc_recompute_rebuild": "layer"},
     "mhc_recompute_rebuild must be one of 'sublayer', 'block', got 'layer'"),
    ({"pipeline_exchange_thread": "yes"}, "pipeline_exchange_thread must be true or false, got 'yes'"),
])
def test_bad_config_raises(fields, words):
    with pytest.raises(ValueError, match=words):
        MhcTransformerConfig(**{**BASE, **fields})


@pytest.mark.parametrize("n, sublayers, expected", [(4, 8, 2), (4, 48, 6), (4, 2, 1), (1, 1, 1), (16, 4, 2)])
def test_default_block_size_is_the_papers_optimum(n, sublayers, expected):
    from mhc_megatron.method import default_block_size

    assert default_block_size(n, sublayers) == expected  # round(sqrt(n L / (n + 2))), within [1, L]
