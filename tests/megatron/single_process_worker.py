"""Single-process checks that need megatron's process groups, run by torchrun (one process).

1. ``hc_mode=residual`` gives exactly the logits of megatron-core's stock GPT layer spec with the
   same weights;
2. ``mhc`` with alpha = 0 and zero biases, and ``hc`` at its init, compute the residual model's
   function (the pre-norms are scale-invariant: ``layernorm_epsilon`` is tiny next to the
   activations): equal to it in float64, and in float32 within twice the residual model's own
   float32 rounding error (``within_float32_rounding``);
3. a bf16 mHC model (megatron's ``Float16Module``) is at most 2x as far from its float32 logits as
   the bf16 residual model is from its own, and gives finite gradients to every hyper-connection
   parameter;
4. the mHC layers run the fused kernels (the first attention's mappings_pre, one op between every
   two sub-layers, the last MLP's post_res), as far from the float64 logits as the reference backend
   is, within float32 rounding, and their backward fills no stream-sized tensor with zeros (a
   gradient that autograd materialised where a hand-off left none); without the kernels this check
   fails, unless ``MHC_BUILD=none`` asked for none;
5. a checkpoint whose ``num_streams`` or ``hc_mode`` differs from the config, a missing and a corrupt
   checkpoint each raise a ``ValueError`` naming the problem, and leave the model untouched.
Prints ``ALL CHECKS PASSED`` at the end; any failure raises.
"""

import argparse
import os
import shutil
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, destroy_parallel, initialize_parallel
from mhc_megatron.megatron.model.checkpointing import load_checkpoint, save_checkpoint
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


def float64_logits_of(model, mode, tokens):
    """The logits of a float64 twin of ``model`` (built for ``mode``): the exact value against which
    float32 runs are judged."""
    _, twin = build(mode)
    twin.load_state_dict(model.state_dict(), strict=True)
    return logits_of(twin.double(), tokens)


FLOAT32_EPS = torch.finfo(torch.float32).eps


def within_float32_rounding(got, exact, baseline, what):
    """``got`` (float32 logits) is at most twice as far from ``exact`` (float64) as ``baseline`` is,
    plus 4 float32 units of the logit scale.

    The tolerance comes from the data, not from one CPU: a float32 model's logits carry rounding
    error that grows with the depth (every sub-layer adds a few units in the last place of its
    output, and the layers amplify what they receive) and with the logit scale. Two float32
    computations of the same function differ by up to the sum of their errors; which of them lands
    nearer depends on summation order and FMA contraction, which differ between kernels and CPUs.
    ``baseline`` is the same model family's own float32 error (here 4 layers at logit scale ~13:
    ~2.5e-5, about 15 units of the scale); the 4-unit floor covers a baseline that happens to round
    almost exactly.
    """
    scale = exact.abs().max().item()
    error = (got.double() - exact).abs().max().item()
    allowed = 2 * (baseline.double() - exact).abs().max().item() + 4 * FLOAT32_EPS * scale
    assert error <= allowed, f"{what}: max |logits - float64 logits| = {error:.3g} > {allowed:.3g} (logit scale {scale:.3g})"
    return error


def check_hyper_connections_at_identity_equal_residual(residual, tokens):
    expected = logits_of(residual, tokens)
    exact = float64_logits_of(residual, "residual", tokens)
    for mode in ("mhc", "hc"):
        _, model = build(mode)
        missing, unexpected = model.load_state_dict(residual.state_dict(), strict=False)
        assert not unexpected and all("hyper_connection" in key for key in missing), (missing, unexpected)
        if mode == "mhc":
            for name, parameter in model.named_parameters():
                if name.endswith("hyper_connection.alpha"):
                    parameter.data.zero_()
        same_function = (float64_logits_of(model, mode, tokens) - exact).abs().max().item()
        assert same_function <= 1e-9 * exact.abs().max().item(), f"{mode} in float64: {same_function:.3g} from residual"
        error = within_float32_rounding(logits_of(model, tokens), exact, expected, f"{mode} at identity")
        print(f"{mode} vs float64 residual: max abs logit difference {error:.2e} "
              f"(float32 residual: {(expected.double() - exact).abs().max().item():.2e})")


def check_mhc_layers_run_the_fused_ops(tokens):
    reason = fused.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        assert os.environ.get("MHC_BUILD") == "none", f"fused kernels unavailable: {reason}"
        print(f"SKIPPED the fused-layer check (MHC_BUILD=none): {reason}")
        return
    _, model = build("mhc")
    with backends.use_backend("reference"):
        expected = logits_of(model, tokens)
        exact = float64_logits_of(model, "mhc", tokens)
    calls = {name: 0 for name in ("mappings_pre", "post_res_mappings_pre", "post_res")}
    originals = {name: getattr(fused, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
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
    expected_calls = {"mappings_pre": 1, "post_res_mappings_pre": sublayers - 1, "post_res": 1}
    assert calls == expected_calls, f"fused op calls {calls}, expected {expected_calls}"
    error = within_float32_rounding(got, exact, expected, "fused kernels")
    print(f"mhc layers on the fused kernels: max abs logit difference from float64 {error:.2e}")
    check_no_stream_sized_zeros_in_backward(model, tokens)


class ZeroFills(TorchDispatchMode):
    """Counts the ops that create or fill a tensor of ``numel`` elements with zeros."""

    ZEROING = ("zeros", "zeros_like", "new_zeros", "zero_", "fill_")

    def __init__(self, numel):
        super().__init__()
        self.numel = numel
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func._opname in self.ZEROING and isinstance(result, torch.Tensor) and result.numel() == self.numel:
            self.count += 1
        return result


def check_no_stream_sized_zeros_in_backward(model, tokens):
    model.train()
    stream_numel = tokens.numel() * model.config.stream_count * SHAPE["hidden_size"]
    with backends.use_backend("fused"):
        logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None)
        with ZeroFills(stream_numel) as fills:
            logits.float().square().mean().backward()
    assert fills.count == 0, f"the backward filled {fills.count} stream-sized tensors with zeros"


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
