"""Single-process checks that need megatron's process groups, run by torchrun (one process).

1. ``hc_mode=residual`` gives exactly the logits of megatron-core's stock GPT layer spec with the
   same weights;
2. ``mhc`` with alpha = 0 and zero biases, and ``hc`` at its init, give the residual model's logits
   to 1e-5 (the pre-norms are scale-invariant: ``layernorm_epsilon`` is tiny next to the
   activations);
3. a bf16 mHC model (megatron's ``Float16Module``) is at most 2x as far from its float32 logits as
   the bf16 residual model is from its own, and gives finite gradients to every hyper-connection
   parameter;
4. with the fused kernels built, the mHC layers run them (mappings, pre, post_res once per
   sub-layer) and give the reference backend's logits to 1e-5 relative to their largest magnitude;
5. a checkpoint whose ``num_streams`` or ``hc_mode`` differs from the config, a missing and a corrupt
   checkpoint each raise a ``ValueError`` naming the problem, and leave the model untouched.
Prints ``ALL CHECKS PASSED`` at the end; any failure raises.
"""

import argparse
import shutil
from pathlib import Path

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, destroy_parallel, initialize_parallel
from mhc_megatron.megatron.checkpointing import load_checkpoint, save_checkpoint
from mhc_megatron.ops import backends, fused

VOCAB, SEQ = 64, 16
SHAPE = dict(
    num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
    add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
    layernorm_epsilon=1e-10, init_method_std=0.5,
)


def logits_of(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(SEQ).expand_as(tokens), None)


def build(hc_mode, **fields):
    config = MhcTransformerConfig(**SHAPE, hc_mode=hc_mode, **fields)
    [model] = build_model_chunks(config, VOCAB, SEQ, backend="local")
    return config, model


def check_residual_equals_stock(tokens):
    stock = GPTModel(TransformerConfig(**SHAPE), get_gpt_layer_local_spec(normalization="RMSNorm"), VOCAB, SEQ)
    _, residual = build("residual")
    residual.load_state_dict(stock.state_dict(), strict=True)
    assert torch.equal(logits_of(residual, tokens), logits_of(stock, tokens)), "residual != stock GPT"
    return residual


def check_hyper_connections_at_identity_equal_residual(residual, tokens):
    expected = logits_of(residual, tokens)
    for mode in ("mhc", "hc"):
        _, model = build(mode)
        missing, unexpected = model.load_state_dict(residual.state_dict(), strict=False)
        assert not unexpected and all("hyper_connection" in key for key in missing), (missing, unexpected)
        if mode == "mhc":
            for name, parameter in model.named_parameters():
                if name.endswith("hyper_connection.alpha"):
                    parameter.data.zero_()
        error = (logits_of(model, tokens) - expected).abs().max().item()
        assert error <= 1e-5, f"{mode}: max |logits - residual logits| = {error}"
        print(f"{mode} vs residual: max abs logit difference {error:.2e}")


def check_mhc_layers_run_the_fused_ops(tokens):
    reason = fused.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        print(f"SKIPPED the fused-layer check: {reason}")
        return
    _, model = build("mhc")
    with backends.use_backend("reference"):
        expected = logits_of(model, tokens)
    calls = {name: 0 for name in ("mappings", "pre", "post_res")}
    originals = {name: getattr(fused, name) for name in calls}

    def counting(name):
        def call(*args):
            calls[name] += 1
            return originals[name](*args)
        return call

    try:
        for name in calls:
            setattr(fused, name, counting(name))
        with backends.use_backend("fused"):
            got = logits_of(model, tokens)
    finally:
        for name, original in originals.items():
            setattr(fused, name, original)
    sublayers = 2 * SHAPE["num_layers"]
    assert calls == {name: sublayers for name in calls}, f"fused op calls {calls}, expected {sublayers} each"
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"fused vs reference backend: max |logits difference| / max |logits| = {error}"
    print(f"mhc layers on the fused kernels: relative logit difference {error:.2e}")


def bf16_error(mode, tokens, **fields):
    """Largest |bf16 logits - float32 logits|, relative to the largest float32 logit."""
    from megatron.core.transformer.module import Float16Module

    _, model = build(mode, **fields)
    expected = logits_of(model, tokens)
    half = Float16Module(MhcTransformerConfig(**SHAPE, hc_mode=mode, bf16=True, **fields), model)
    got = logits_of(half, tokens).float()
    return ((got - expected).abs().max() / expected.abs().max()).item(), model, half


def check_bf16_model(tokens):
    """flash-attention's rule at model level: bf16 mHC is at most 2x as far from its float32 self
    as the bf16 residual model is from its own."""
    residual_error, _, _ = bf16_error("residual", tokens)
    mhc_error, model, half = bf16_error("mhc", tokens, hc_alpha_init=0.3)
    assert mhc_error <= 2 * residual_error, f"bf16 error: mhc {mhc_error:.3g}, residual {residual_error:.3g}"
    half.train()
    half(tokens, torch.arange(SEQ).expand_as(tokens), None, labels=tokens).float().mean().backward()
    for name, parameter in model.named_parameters():
        if "hyper_connection" in name:
            assert parameter.dtype == torch.bfloat16 and torch.isfinite(parameter.grad).all(), name
    print(f"bf16 vs float32 logits, relative: mhc {mhc_error:.2e}, residual {residual_error:.2e}")


def expect_load_error(model, config, directory, words):
    before = {key: value.clone() for key, value in model.state_dict().items() if torch.is_tensor(value)}
    try:
        load_checkpoint([model], config, directory)
    except ValueError as error:
        assert words in str(error), f"expected {words!r} in {error}"
    else:
        raise AssertionError(f"loading {directory} should have failed with {words!r}")
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), f"{key} changed by a failed load"


def check_bad_checkpoints(tmp: Path):
    config, model = build("mhc")
    save_checkpoint([model], config, tmp / "mhc4")
    for mode, fields, words in [
        ("mhc", {"num_streams": 2}, "saved with num_streams=4, but the config has num_streams=2"),
        ("hc", {}, "saved with hc_mode='mhc', but the config has hc_mode='hc'"),
    ]:
        other_config, other = build(mode, **fields)
        expect_load_error(other, other_config, tmp / "mhc4", words)
    expect_load_error(model, config, tmp / "missing", "does not exist")
    corrupt = tmp / "corrupt"
    shutil.copytree(tmp / "mhc4", corrupt)
    for metadata in corrupt.glob("*metadata*"):
        metadata.unlink()
    (corrupt / "common.pt").write_bytes(b"not a checkpoint")
    expect_load_error(model, config, corrupt, "is not a readable distributed checkpoint")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tmp", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    initialize_parallel(seed=3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    residual = check_residual_equals_stock(tokens)
    check_hyper_connections_at_identity_equal_residual(residual, tokens)
    check_mhc_layers_run_the_fused_ops(tokens)
    check_bf16_model(tokens)
    check_bad_checkpoints(Path(args.tmp))
    destroy_parallel()
    print("ALL CHECKS PASSED")


if __name__ == "__main__":
    main()
