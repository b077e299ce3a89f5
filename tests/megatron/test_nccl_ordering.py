"""The NCCL ordering emulation (``pipeline/nccl_ordering.py``) on exchanges whose fate under NCCL's
rules is known (../shared/docs/nccl-semantics.md): what NCCL completes completes with the right data,
and what deadlocks under NCCL fails here within the timeout, each rank naming the operation it is
stuck on and the one queued behind it, instead of passing as it does on plain gloo."""

import json
import re

import pytest
from conftest import run_workers

PAYLOAD = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # rank r sends PAYLOAD + 100 r (nccl_ordering_worker.py)
COMPLETING = ["matched", "both-send-first-batched", "batched-both-directions", "send-waits-for-receive"]
DEADLOCKING = {  # each rank's first operation holds its queue; the one the peer needs is behind it
    "both-send-first": ("send to rank {peer}", "recv from rank {peer}"),
    "both-receive-first": ("recv from rank {peer}", "send to rank {peer}"),
    "groups-share-a-queue": ("recv from rank {peer}", "send to rank {peer}"),
}


def sent_by(rank: int) -> list:
    return [value + 100 * rank for value in PAYLOAD]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every two-rank scenario, in one torchrun: each rank's record."""
    out = tmp_path_factory.mktemp("nccl-ordering") / "run"
    run_workers("nccl_ordering_worker.py", 2, "--scenarios", *COMPLETING, *DEADLOCKING, "--timeout", "2",
                "--out", str(out))
    return [json.loads(out.with_name(f"run.rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("scenario", ["matched", "both-send-first-batched"])
def test_orders_nccl_completes_deliver_the_data(scenario, two_ranks):
    for rank, record in enumerate(two_ranks):
        assert record[scenario] == {"received": sent_by(1 - rank)}


def test_a_send_waits_for_the_matching_receive(two_ranks):
    assert two_ranks[0]["send-waits-for-receive"] == {"send unfinished before the receive": True}
    assert two_ranks[1]["send-waits-for-receive"] == {"received": sent_by(0)}


def test_a_batch_pairs_its_operations_with_one_peer_in_issue_order(two_ranks):
    """Why ``MhcTransformerConfig`` turns ``batch_p2p_comm`` off at pipeline size 2 with a virtual
    pipeline: in megatron's batched order the gradient sent to the previous stage lands in the
    peer's activation buffer, and the activation in its gradient buffer."""
    for rank, record in enumerate(two_ranks):
        gradient, activation = [value + 0.5 for value in sent_by(1 - rank)], sent_by(1 - rank)
        assert record["batched-both-directions"] == {
            "from previous (an activation)": gradient, "from next (a gradient)": activation}


@pytest.mark.parametrize("scenario", list(DEADLOCKING))
def test_orders_that_deadlock_under_nccl_fail_naming_the_operations(scenario, two_ranks):
    head, behind = DEADLOCKING[scenario]
    for rank, record in enumerate(two_ranks):
        peer, message = 1 - rank, record[scenario]["deadlock"]
        assert message.startswith(f"rank {rank}: #"), message
        head_line = re.escape(f"#0 {head.format(peer=peer)} [6] torch.float32 (issued by nccl_ordering_worker.py:")
        assert re.search(head_line + r".*\): holds the queue for \d", message), message
        assert f"#1 {behind.format(peer=peer)} [6] torch.float32" in message and "queued" in message, message


def test_a_batched_group_spans_two_peers(tmp_path):
    run_workers("nccl_ordering_worker.py", 3, "--scenarios", "ring-batched", "--out", str(tmp_path / "run"))
    for rank in range(3):
        record = json.loads((tmp_path / f"run.rank{rank}.json").read_text())
        assert record == {"ring-batched": {"received": sent_by((rank - 1) % 3)}}
