"""Write a checkpoint the way Megatron-LM main saves a GPT with its own mHC layers, from one of ours.

    python megatron_lm_checkpoint.py --config RUN/config.yaml --load SAVE --output MEGATRON_LM_SAVE

Megatron-LM is not installed here, so its checkpoint is made from ours by the inverse of the layout
its ``HyperConnectionModule`` has (read in megatron/core/transformer/hyper_connection.py, main of
August 2026), written independently of ``mhc_megatron.convert``: per layer an ``nn.Linear``
``mapping_proj`` of weight ``[n*n + 2n, n*C]`` (``phi`` transposed), three ``[1]`` scalars
``alpha_pre``, ``alpha_post``, ``alpha_res`` and a ``bias [n*n + 2n]``, stacked over layers on a
leading axis by megatron's layer sharding, under ``self_attention_hyper_connection`` and
``mlp_hyper_connection``; every other tensor under megatron-core's own key. Its common state holds
Megatron-LM's ``args`` (a Namespace) and ``iteration``; ``iter_0000005`` and the tracker file as
Megatron-LM lays out a save directory.
"""

import argparse
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from mhc_megatron.megatron import destroy_parallel, initialize_parallel
from mhc_megatron.megatron.model.checkpointing import load_checkpoint
from mhc_megatron.training.builders import build_model
from mhc_megatron.training.checkpoint_files import resolve_checkpoint
from mhc_megatron.training.config import RunConfig
from mhc_megatron.world import default_to_world_of_one

ITERATION = 5
THEIR_NAMES = {"attention_hyper_connection": "self_attention_hyper_connection",
               "mlp_hyper_connection": "mlp_hyper_connection"}


def megatron_lm_hyper_connections(model) -> dict[str, torch.Tensor]:
    """Megatron-LM's stacked hyper-connection tensors of ``model``'s layers."""
    layers = model.decoder.layers
    tensors = {}
    for ours, theirs in THEIR_NAMES.items():
        modules = [getattr(layer, ours) for layer in layers]
        prefix = f"decoder.layers.{theirs}"
        tensors[f"{prefix}.mapping_proj.weight"] = torch.stack([m.phi.detach().t() for m in modules])
        for index, name in enumerate(("alpha_pre", "alpha_post", "alpha_res")):
            tensors[f"{prefix}.{name}"] = torch.stack([m.alpha.detach()[index:index + 1] for m in modules])
        tensors[f"{prefix}.bias"] = torch.stack([m.bias.detach() for m in modules])
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--load", required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    run = RunConfig.load(args.config)
    config = run.transformer_config()
    assert config.tensor_model_parallel_size == config.pipeline_model_parallel_size == 1
    directory = resolve_checkpoint(args.load)
    vocab = dist_checkpointing.load_tensors_metadata(str(directory))["embedding.word_embeddings.weight"].global_shape[0]
    default_to_world_of_one()
    initialize_parallel(seed=run.training.seed)
    try:
        [model] = build_model(run, config, vocab)
        load_checkpoint([model], config, directory)
        ours = {n for n, _ in model.named_parameters() if any(f".{name}." in n for name in THEIR_NAMES)}
        state = {key: value for key, value in model.sharded_state_dict().items() if key not in ours}
        for key, tensor in megatron_lm_hyper_connections(model).items():
            state[key] = ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
        state["args"] = argparse.Namespace(
            num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
            enable_mhc_connections=True, mhc_num_residual_streams=config.stream_count,
            mhc_sinkhorn_iterations=config.sinkhorn_iters,
        )
        state["iteration"] = ITERATION
        target = args.output / f"iter_{ITERATION:07d}"
        target.mkdir(parents=True)
        dist_checkpointing.save(state, str(target))
        (args.output / "latest_checkpointed_iteration.txt").write_text(f"{ITERATION}")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
