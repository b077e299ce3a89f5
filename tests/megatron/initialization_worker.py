"""One process of the initial-weights test, started by torchrun (see test_initialization.py).

For each case named on the command line, in turn and in the same processes: set up megatron's
process groups for the case's layout, build the model chunks of its seed, and gather every rank's
initial parameters into full tensors by megatron's checkpoint keys (``sharded_state_dict``: global
layer and expert offsets, tensor-parallel and SwiGLU splits, replicas), independently of the code
under test. Replicas (data-parallel copies, tensor-parallel copies of replicated parameters, the
last stage's tied output weight) should be bitwise equal to the copy they repeat, and every element
of every tensor held by some rank. Rank 0 saves ``{"tensors": {key: full tensor}, "problems": [what
broke those rules]}`` to ``--out/<case>.pt``.
"""

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, destroy_parallel, initialize_parallel

VOCAB, SEQ, SEED = 64, 16, 7


@dataclass(frozen=True)
class Case:
    model: str = "dense"
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    sp: bool = False
    seed: int = SEED


CASES = {
    # one process: the references
    "dense": Case(),
    "dense, seed 8": Case(seed=8),
    "hc": Case(model="hc"),
    "moe": Case(model="moe"),
    # two processes
    "TP=2": Case(tp=2),
    "TP=2+SP": Case(tp=2, sp=True),
    "PP=2": Case(pp=2),
    "PP=2 x VPP=2": Case(pp=2, vpp=2),
    "PP=2 x VPP=2, hc": Case(model="hc", pp=2, vpp=2),
    "EP=2, moe": Case(model="moe", ep=2),
    "DP=2": Case(),
}

# megatron's GPU initialisation path (``use_cpu_initialization=False``, as mhc-train on GPUs): without
# the layout-independent draw, each tensor rank would draw its own shard from its own random state.
# Every kind of parameter: biases, LayerNorm, SwiGLU (stride-2 split of fc1), learned positions, tied
# (dense, hc) and untied (moe) output layer, the weighted collapse's phi, hc's static parts, experts.
MODELS = {
    "dense": dict(hc_mode="mhc", hc_collapse="weighted"),
    "hc": dict(hc_mode="hc"),
    "moe": dict(hc_mode="mhc", num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather"),
}
TIED = {"dense": True, "hc": True, "moe": False}


def slug(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", case).strip("-")


def make_config(case: Case) -> MhcTransformerConfig:
    return MhcTransformerConfig(
        **MODELS[case.model],
        num_layers=4, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_streams=4, hc_alpha_init=0.3,
        normalization="LayerNorm", gated_linear_unit=True, add_bias_linear=True,
        tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp,
        virtual_pipeline_model_parallel_size=case.vpp, expert_model_parallel_size=case.ep, sequence_parallel=case.sp,
        use_cpu_initialization=False, params_dtype=torch.float32, pipeline_dtype=torch.float32,
    )


def local_pieces(chunks) -> list[tuple[str, tuple, tuple, int, torch.Tensor]]:
    """``(key, global shape, global offset, prepended axes, local data)`` of every sharded tensor."""
    pieces = []
    for chunk in chunks:
        state = chunk.sharded_state_dict()
        apply_factories(state)
        stack = list(state.values())
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, ShardedTensor):
                shape, offset = tuple(item.global_shape), tuple(item.global_offset)
                pieces.append((item.key, shape, offset, item.prepend_axis_num, item.data.detach().clone()))
    return pieces


def assemble(pieces) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full tensors from every rank's pieces, and the problems found: replicas that differ from the
    copy they repeat, elements that no rank holds."""
    full, held, problems = {}, {}, []
    for key, shape, offset, prepended, data in pieces:
        if key not in full:
            full[key] = torch.zeros(shape, dtype=data.dtype)
            held[key] = torch.zeros(shape, dtype=torch.bool)
        if full[key].shape != shape:
            problems.append(f"{key}: global shapes {tuple(full[key].shape)} and {shape}")
            continue
        data = data.reshape((1,) * prepended + tuple(data.shape))
        region = tuple(slice(start, start + size) for start, size in zip(offset, data.shape))
        if held[key][region].any() and not (held[key][region].all() and torch.equal(full[key][region], data)):
            problems.append(f"{key}: the replica at offset {offset} differs")
        full[key][region] = data
        held[key][region] = True
    problems += [f"{key}: {int((~held[key]).sum())} elements held by no rank" for key in held if not held[key].all()]
    return full, problems


def run_case(name: str, case: Case, out: Path) -> None:
    initialize_parallel(case.tp, case.pp, case.vpp, case.ep, seed=case.seed)
    chunks = build_model_chunks(
        make_config(case), VOCAB, SEQ, backend="local", share_embeddings_and_output_weights=TIED[case.model]
    )
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local_pieces(chunks))
    if torch.distributed.get_rank() == 0:
        tensors, problems = assemble([piece for pieces in gathered for piece in pieces])
        torch.save({"tensors": tensors, "problems": problems}, out / f"{slug(name)}.pt")
    parallel_state.destroy_model_parallel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", choices=list(CASES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.cases:
        run_case(name, CASES[name], args.out)
    destroy_parallel()


if __name__ == "__main__":
    main()
