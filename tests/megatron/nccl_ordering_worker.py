"""One process of a test of the NCCL ordering emulation (``pipeline/nccl_ordering.py``), started by
torchrun: runs each exchange of ``--scenarios`` under a fresh emulation and writes, per scenario,
what this rank received or the ``PipelineDeadlock`` message it raised (``<out>.rank<R>.json``). A
deadlocked scenario leaves its threads blocked on its own process group, so the next one is unaffected.

Scenarios (rank r's peer is the other rank at 2 processes; at 3, a ring):
``matched``: rank 0 sends then receives, rank 1 receives then sends; ``both-send-first`` and
``both-receive-first``: both ranks issue the same order, ungrouped; ``both-send-first-batched``: the
same, as one batched group each; ``groups-share-a-queue``: like ``both-receive-first`` but each
rank's two operations on different process groups; ``ring-batched`` (3 ranks): each rank's send to
the next and receive from the previous in one batched group; ``batched-both-directions``: megatron's batched exchange at
pipeline size 2 (both ranks send "a gradient" to the previous and "an activation" to the next stage
and receive from both, all with the one peer, in megatron's order); ``send-waits-for-receive``: rank 0's
send is checked unfinished while rank 1 has not posted its receive.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from mhc_megatron.megatron.pipeline.nccl_ordering import PipelineDeadlock, nccl_ordering


def payload(rank: int) -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32) + 100 * rank


def run(scenario: str, rank: int, world: int, other_group) -> dict:
    peer = 1 - rank if world == 2 else None
    received = torch.zeros(6)
    if scenario == "matched":
        order = ["send", "recv"] if rank == 0 else ["recv", "send"]
    elif scenario in ("both-send-first", "both-send-first-batched"):
        order = ["send", "recv"]
    elif scenario in ("both-receive-first", "groups-share-a-queue"):
        order = ["recv", "send"]
    if scenario == "ring-batched":
        ops = [dist.P2POp(dist.isend, payload(rank), (rank + 1) % world),
               dist.P2POp(dist.irecv, received, (rank - 1) % world)]
        requests = dist.batch_isend_irecv(ops)
    elif scenario == "both-send-first-batched":
        ops = [dist.P2POp(dist.isend, payload(rank), peer), dist.P2POp(dist.irecv, received, peer)]
        requests = dist.batch_isend_irecv(ops)
    elif scenario == "batched-both-directions":
        from_previous, from_next = torch.zeros(6), torch.zeros(6)
        ops = [dist.P2POp(dist.isend, payload(rank) + 0.5, peer), dist.P2POp(dist.irecv, from_previous, peer),
               dist.P2POp(dist.isend, payload(rank), peer), dist.P2POp(dist.irecv, from_next, peer)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return {"from previous (an activation)": from_previous.tolist(), "from next (a gradient)": from_next.tolist()}
    elif scenario == "send-waits-for-receive":
        store = dist.distributed_c10d._get_default_store()
        if rank == 0:
            request = dist.isend(payload(rank), 1)
            time.sleep(0.5)
            unfinished = not request.is_completed()
            store.set("receive may start", "yes")
            request.wait()
            return {"send unfinished before the receive": unfinished}
        store.wait(["receive may start"])
        requests = [dist.irecv(received, 0)]
    else:
        groups = {"send": other_group if scenario == "groups-share-a-queue" and rank == 1 else None,
                  "recv": other_group if scenario == "groups-share-a-queue" and rank == 0 else None}
        requests = [dist.isend(payload(rank), peer, group=groups[kind]) if kind == "send"
                    else dist.irecv(received, peer, group=groups[kind]) for kind in order]
    for request in requests:
        request.wait()
    return {"received": received.tolist()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", nargs="+", required=True)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    other_group = dist.new_group(backend="gloo")
    record = {}
    for scenario in args.scenarios:
        try:
            with nccl_ordering(timeout=args.timeout, grace=1.0):
                record[scenario] = run(scenario, rank, world, other_group)
        except PipelineDeadlock as deadlock:
            record[scenario] = {"deadlock": str(deadlock)}
    with open(f"{args.out}.rank{rank}.json", "w") as out:
        json.dump(record, out)
    os._exit(0)  # without tearing down gloo: threads of deadlocked scenarios are still blocked in it


if __name__ == "__main__":
    main()
