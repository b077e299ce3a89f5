"""One process of the CPU layer's round trip (test_cpu_layer.py), started by torchrun.

Twice: ``initialize_parallel``, a step of a small mHC model with megatron's selective recompute of
the norms (which runs through the CPU layer and megatron's fixes), ``destroy_parallel``; after each,
torch and megatron-core must be as they were before the first. Also the snapshot helpers the
in-process tests use.
"""

import torch
from megatron.core.tensor_parallel import random as megatron_random

# Filled by megatron-core itself the first time recomputation runs (its share-storage extension),
# not by the CPU layer or the fixes.
MEGATRON_CACHES = {("megatron random", "_share_storage_ext")}


def owners() -> dict:
    """What the CPU layer and megatron's fixes may change, resolved before they change any of it."""
    return {
        "torch.cuda": torch.cuda,
        "megatron random": megatron_random,
        "CudaRNGStatesTracker": megatron_random.CudaRNGStatesTracker,
        "CheckpointFunction": megatron_random.CheckpointFunction,
        "CheckpointWithoutOutputFunction": megatron_random.CheckpointWithoutOutputFunction,
        "CheckpointWithoutOutput": megatron_random.CheckpointWithoutOutput,
    }


def snapshot(owned: dict) -> dict:
    """Every attribute each owner holds itself, and the torch function modes of this thread."""
    state = {(label, name): value for label, owner in owned.items() for name, value in vars(owner).items()}
    state[("torch", "function modes")] = tuple(torch.overrides._get_current_function_mode_stack())
    return state


def differences(before: dict, after: dict) -> set:
    """The keys whose value is not the very object it was (or that appeared or went away)."""
    changed = {key for key in before.keys() & after.keys() if after[key] is not before[key]}
    modes = ("torch", "function modes")
    if modes in changed and after[modes] == before[modes]:  # the same modes in a new tuple
        changed.discard(modes)
    return changed | (before.keys() ^ after.keys())


def _one_step() -> None:
    from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks

    config = MhcTransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, hc_mode="mhc", num_streams=2,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, recompute_granularity="selective", recompute_modules=["layernorm"],
    )
    (model,) = build_model_chunks(config, vocab_size=64, max_sequence_length=8, backend="local")
    tokens = torch.randint(0, 64, (2, 8))
    positions = torch.arange(8).unsqueeze(0).expand(2, 8)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss), loss


def main() -> None:
    from mhc_megatron.megatron import destroy_parallel, initialize_parallel

    owned = owners()
    before = snapshot(owned)
    for round_trip in (1, 2):
        initialize_parallel(seed=round_trip)
        applied = differences(before, snapshot(owned))
        assert ("torch.cuda", "current_device") in applied, applied
        _one_step()
        destroy_parallel()
        left = differences(before, snapshot(owned)) - MEGATRON_CACHES
        assert not left, f"round trip {round_trip}: still changed after destroy_parallel: {sorted(left)}"
        print(f"round trip {round_trip}: {len(applied)} attributes changed while initialised, all restored")


if __name__ == "__main__":
    main()
