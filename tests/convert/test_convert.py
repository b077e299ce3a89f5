"""``mhc-convert``: a residual checkpoint upcycled to HC and mHC starts as the same function (the
converter's probe logits, the saved weights and, for mHC, the first loss of training on from it)
and trains on;
Megatron-LM's mHC layout converts to ours exactly (a round trip through a checkpoint written in its
layout) and its conventions change the logits by a measured amount; bad input exits with 2 naming
the problem and writes nothing."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mhc_megatron.convert.megatron_lm import from_megatron_lm, megatron_lm_conventions
from mhc_megatron.convert.upcycle import upcycle
from mhc_megatron.ops import backends, mhc_mappings
from mhc_megatron.training.checkpoint_files import resolve_checkpoint
from training.conftest import TINY, dataset, read_metrics, run_command, run_train  # noqa: F401

HERE = Path(__file__).resolve().parent
REPORTED = re.compile(r"max \|difference\| (\S+) \((\S+) of the largest logit\)")


def convert(*arguments, expect_success: bool = True):
    return run_command([sys.executable, "-m", "mhc_megatron.convert", *map(str, arguments)], expect_success)


def reported_relative_difference(output: str) -> float:
    match = REPORTED.search(output)
    assert match, output
    return float(match.group(2))


def trained_run(dataset, root: Path, *overrides: str) -> Path:
    """A 3-step run of ``TINY`` with ``overrides``, saved in ``root/checkpoints``; returns ``root``."""
    run_train(*TINY, f"data_path={dataset}", f"data_dir={root / 'data'}", "train_iters=3", f"run_dir={root}",
              f"save={root / 'checkpoints'}", *overrides)
    return root


def first_losses(config: Path, root: Path, *overrides: str) -> list[float]:
    """The losses of 3 steps trained on from ``config`` (which names the weights to start from)."""
    run_train("--config", str(config), f"run_dir={root}", f"save={root / 'checkpoints'}", *overrides)
    return [record["loss"] for record in read_metrics(root)]


@pytest.fixture(scope="module")
def residual(dataset, tmp_path_factory) -> Path:
    return trained_run(dataset, tmp_path_factory.mktemp("residual"), "hc_mode=residual")


@pytest.fixture(scope="module")
def residual_losses(residual, tmp_path_factory) -> list[float]:
    """The residual model trained on from its own checkpoint, as a converted model will be."""
    return first_losses(residual / "config.yaml", tmp_path_factory.mktemp("residual-on"),
                        f"load={residual / 'checkpoints'}", "finetune=true")


def saved_weights(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint (a save directory's latest), whole, by key (via a torch.save
    file in the directory ``scratch``)."""
    copy = scratch / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(resolve_checkpoint(checkpoint), copy)
    tensors = torch.load(copy, weights_only=False)
    return {key: value for key, value in tensors.items()
            if isinstance(value, torch.Tensor) and not key.startswith("optimizer.")}


def test_an_upcycled_mhc_model_starts_as_the_residual_one_and_trains_on(residual, residual_losses, tmp_path):
    """pre_bias=mean reads with 4 sigmoid(-log 3) = 1 to a float32 rounding: the converter's probe
    logits within 1e-6 of the residual model's (relative to the largest), and the first loss of
    training on, on the same batch, equal to the residual model's to float32 rounding."""
    output = tmp_path / "upcycled"
    result = convert("upcycle", "--config", residual / "config.yaml", "--load", residual / "checkpoints",
                     "--output", output, "--hc-mode", "mhc")
    assert reported_relative_difference(result.stdout) <= 1e-6, result.stdout
    assert (output / "latest_checkpointed_iteration.txt").read_text() == "0\n"
    assert f"mhc-train --config {output / 'config.yaml'}" in result.stdout
    converted, source = saved_weights(output, tmp_path), saved_weights(residual / "checkpoints", tmp_path)
    assert all(torch.equal(converted[key], value) for key, value in source.items())
    for which in ("attention", "mlp"):
        assert torch.equal(converted[f"decoder.layers.{which}_hyper_connection.alpha"], torch.zeros(4, 3))
        torch.testing.assert_close(converted[f"decoder.layers.{which}_hyper_connection.bias"][:, :4].sigmoid(),
                                   torch.full((4, 4), 0.25), rtol=0, atol=1e-7)

    losses = first_losses(output / "config.yaml", tmp_path / "on")
    assert losses[0] == pytest.approx(residual_losses[0], rel=1e-6, abs=0)  # the same function, the same batch
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_an_upcycled_hc_model_is_the_residual_one_exactly(residual, tmp_path):
    """HC's own start reads stream l mod n with weight 1 and mixes with the identity: no logit moves."""
    output = tmp_path / "upcycled"
    result = convert("upcycle", "--config", residual / "config.yaml", "--load", residual / "checkpoints",
                     "--output", output, "--hc-mode", "hc", "--num-streams", "2")
    assert reported_relative_difference(result.stdout) == 0.0, result.stdout
    converted, source = saved_weights(output, tmp_path), saved_weights(residual / "checkpoints", tmp_path)
    assert all(torch.equal(converted[key], value) for key, value in source.items())
    assert torch.equal(converted["decoder.layers.attention_hyper_connection.weight"], torch.zeros(4, 32, 4))


def test_the_papers_start_differs_by_what_the_norm_condition_says(residual, tmp_path):
    """pre_bias=zero reads (n/2) x: the RMS norms' eps (1e-5) against the mean square of activations
    drawn with std 0.02 (4e-4) is not negligible, and the converter shows it."""
    result = convert("upcycle", "--config", residual / "config.yaml", "--load", residual / "checkpoints",
                     "--output", tmp_path / "upcycled", "--hc-mode", "mhc", "--pre-bias", "zero")
    assert 1e-4 < reported_relative_difference(result.stdout) < 0.1, result.stdout


@pytest.fixture(scope="module")
def mhc_run(dataset, tmp_path_factory) -> Path:
    return trained_run(dataset, tmp_path_factory.mktemp("mhc"), "hc_mode=mhc", "hc_collapse=mean")


@pytest.fixture(scope="module")
def megatron_lm(mhc_run, tmp_path_factory) -> Path:
    """``mhc_run``'s checkpoint written in Megatron-LM's layout (``megatron_lm_checkpoint.py``)."""
    save = tmp_path_factory.mktemp("megatron-lm") / "checkpoints"
    run_command([sys.executable, str(HERE / "megatron_lm_checkpoint.py"), "--config", str(mhc_run / "config.yaml"),
                 "--load", str(mhc_run / "checkpoints"), "--output", str(save)])
    return save


def test_a_megatron_lm_checkpoint_converts_to_the_same_model(mhc_run, megatron_lm, tmp_path):
    output = tmp_path / "converted"
    result = convert("from-megatron-lm", "--config", mhc_run / "config.yaml", "--load", megatron_lm,
                     "--output", output)
    # alpha = 0.3 and one Sinkhorn iteration (TINY): the conventions' difference shows
    assert 1e-5 < reported_relative_difference(result.stdout) < 0.05, result.stdout

    converted, original = saved_weights(output, tmp_path), saved_weights(mhc_run / "checkpoints", tmp_path)
    assert converted.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(converted[key], value), key  # the same weights, bit for bit


def megatron_lm_mappings(x, weight, alpha_pre, alpha_post, alpha_res, bias, n, iterations):
    """Megatron-LM main's ``HyperConnectionModule.compute_mappings`` for streams ``x [s, b, n*C]``
    (its layout and formulas: ``nn.Linear`` projection, RMS with eps outside the root, per-column
    alphas, rows-then-columns Sinkhorn with clamped sums)."""
    s, b, width = x.shape
    r = 1.0 / (x.norm(dim=-1, keepdim=True) / math.sqrt(width) + 1e-6)
    proj = x @ weight.t()
    alphas = torch.cat([alpha_pre.expand(n), alpha_post.expand(n), alpha_res.expand(n * n)], dim=-1)
    h = r * proj * alphas + bias
    matrix = torch.exp(h[..., 2 * n:].view(s, b, n, n) - h[..., 2 * n:].view(s, b, n, n).max(dim=-1, keepdim=True).values)
    for _ in range(iterations):
        matrix = matrix / matrix.sum(dim=-1, keepdim=True).clamp(min=1e-6)
        matrix = matrix / matrix.sum(dim=-2, keepdim=True).clamp(min=1e-6)
    return h[..., :n].sigmoid(), 2 * h[..., n:2 * n].sigmoid(), matrix


def test_megatron_lm_conventions_compute_its_mappings_from_the_converted_parameters():
    """Pins the mapping at the operator level, in float64: phi = weight^T, alpha = (pre, post, res),
    the bias as is; under ``megatron_lm_conventions`` our reference computes Megatron-LM's mappings
    to rounding, and under ours it differs by the conventions alone."""
    generator = torch.Generator().manual_seed(0)
    n, hidden, iterations = 4, 8, 20
    x = torch.randn(3, 2, n * hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(n * n + 2 * n, n * hidden, generator=generator, dtype=torch.float64) / math.sqrt(n * hidden)
    alpha_pre, alpha_post, alpha_res = (torch.tensor([a], dtype=torch.float64) for a in (0.7, 0.4, 1.1))
    bias = torch.randn(n * n + 2 * n, generator=generator, dtype=torch.float64)
    expected = megatron_lm_mappings(x, weight, alpha_pre, alpha_post, alpha_res, bias, n, iterations)
    arguments = (x.view(3, 2, n, hidden), weight.t(), torch.cat([alpha_pre, alpha_post, alpha_res]), bias, iterations, 1e-6)
    with megatron_lm_conventions():
        converted = mhc_mappings(*arguments)
    for got, want in zip(converted, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with backends.use_backend("reference"):
        ours = mhc_mappings(*arguments)
    assert (ours[2] - expected[2]).abs().max() > 1e-6  # Sinkhorn's order: rows exact here, columns there
    torch.testing.assert_close(ours[2].sum(-1), torch.ones(3, 2, n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(expected[2].sum(-2), torch.ones(3, 2, n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_bad_input_names_the_problem_and_writes_nothing(residual, mhc_run, megatron_lm, tmp_path):
    """What is caught before any model is built, called in this process; then the command's exit
    status and message, for one of those and for a tensor shape found while loading."""
    output = tmp_path / "never"
    config, checkpoints = residual / "config.yaml", residual / "checkpoints"
    cases = [
        (lambda: upcycle(config, [], checkpoints, output, "mhc", 1), "upcycle needs num_streams >= 2"),
        (lambda: upcycle(config, [], checkpoints, output, "residual", 4), "upcycle converts to hc_mode 'hc' or 'mhc'"),
        (lambda: upcycle(config, ["hc_mode=mhc"], checkpoints, output, "mhc", 4),
         "upcycle takes a residual model; the config has hc_mode='mhc'"),
        (lambda: upcycle(config, [], mhc_run / "checkpoints", output, "mhc", 4),
         "holds an hc_mode='mhc' model; upcycle takes a residual one"),
        (lambda: upcycle(config, [], tmp_path / "missing", output, "mhc", 4), "does not exist"),
        (lambda: upcycle(config, [], checkpoints, checkpoints, "mhc", 4), "already holds checkpoints"),
        (lambda: from_megatron_lm(config, [], mhc_run / "checkpoints", output),
         "converts to hc_mode=mhc with hc_collapse=mean"),
        (lambda: from_megatron_lm(mhc_run / "config.yaml", [], checkpoints, output),
         "not a checkpoint of Megatron-LM's mHC layers"),
        (lambda: from_megatron_lm(mhc_run / "config.yaml", ["sinkhorn_iters=20"], megatron_lm, output),
         "was saved by Megatron-LM with mhc_sinkhorn_iterations=1, but the config has sinkhorn_iters=20"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    upcycle_command = ("upcycle", "--config", config, "--load", checkpoints, "--output", output, "--hc-mode", "mhc")
    for arguments, message in [
        ((*upcycle_command, "--num-streams", "1"), "mhc-convert: error: upcycle needs num_streams >= 2"),
        ((*upcycle_command, "ffn_hidden_size=128"), "mhc-convert: error: checkpoint tensor "
         "'decoder.layers.mlp.linear_fc1.weight' has global shape (4, 64, 32), the model expects (4, 128, 32)"),
    ]:
        result = convert(*arguments, expect_success=False)
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stdout + result.stderr)
    assert not output.exists()
