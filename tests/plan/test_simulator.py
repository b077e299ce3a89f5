"""The simulator against step times worked out by hand.

Every case: forward f = 1, backward b = 2 (per task), a hop between stages c = 0.5 unless said.
Notation: ``Fi`` / ``Bi`` is micro-batch i; ``Fi.g`` its pass through global chunk g; ``[t0, t1]`` a
busy interval; "s0" and "s1" the stages.
"""

from __future__ import annotations

import pytest

from mhc_megatron.plan.schedule import Task, build, interleaved, one_f_one_b
from mhc_megatron.plan.simulator import Costs, simulate


def costs(forward=1.0, backward=2.0, hop=0.5, tail=0.0) -> Costs:
    return Costs(lambda task, stage: forward if task.kind == "F" else backward, lambda task, src, dst: hop, tail)


def test_orders_follow_megatron():
    assert [str(t) for t in one_f_one_b(2, 4).orders[0]] == ["F0.0", "F1.0", "B0.0", "F2.0", "B1.0", "F3.0", "B2.0", "B3.0"]
    assert [str(t) for t in one_f_one_b(2, 4).orders[1]] == ["F0.1", "B0.1", "F1.1", "B1.1", "F2.1", "B2.1", "F3.1", "B3.1"]
    assert [str(t) for t in interleaved(2, 2, 2).orders[0]] == ["F0.0", "F1.0", "F0.2", "F1.2", "B0.2", "B1.2", "B0.0", "B1.0"]
    assert [str(t) for t in interleaved(2, 2, 2).orders[1]] == ["F0.1", "F1.1", "F0.3", "B0.3", "F1.3", "B1.3", "B0.1", "B1.1"]


def test_1f1b_blocking_two_micro_batches():
    """s0: F0 [0, 1]; the hop to s1 (waiting at F0) [1, 1.5] holds both stages; s0 F1 [1.5, 2.5],
    s1 F0 [1.5, 2.5], B0 [2.5, 4.5]. s0's send of F1 waits until s1 reaches F1 (4.5); s1's send of
    B0's gradient to s0 (waiting at B0) also starts at 4.5: both [4.5, 5]. s0 B0 [5, 7]; s1 F1 [5, 6],
    B1 [6, 8]; the hop [8, 8.5]; s0 B1 [8.5, 10.5]. Step 10.5. s0's exposed communication: 0.5 before
    F1, B0 and B1 = 1.5; busy 2 f + 2 b = 6; bubble 10.5 - 6 - 1.5 = 3."""
    result = simulate(one_f_one_b(2, 2), costs(), overlap=False)
    assert result.step_time == 10.5
    assert (result.stages[0].busy, result.stages[0].exposed_comm, result.stages[0].bubble) == (6.0, 1.5, 3.0)
    # s1: waits 1.5 for F0 of which 1 is s0's compute (data) and 0.5 the hop; before F1 4.5 -> 5 (hop)
    assert (result.stages[1].exposed_comm, result.stages[1].bubble) == (1.0, 3.5)


def test_1f1b_blocking_four_micro_batches():
    """As above up to s0 B0 [5, 7] and s1 F1 [5, 6], B1 [6, 8]. s0 F2 [7, 8]; its send and s1's B1
    gradient both start when each side is ready, 8: [8, 8.5]; s0 B1 [8.5, 10.5], s1 F2 [8.5, 9.5],
    B2 [9.5, 11.5]; s0 F3 [10.5, 11.5]; both hops [11.5, 12]; s0 B2 [12, 14], s1 F3 [12, 13], B3
    [13, 15]; the last gradient [15, 15.5]; s0 B3 [15.5, 17.5]. Step 17.5; s0 waits 0.5 on a hop
    before F1, B0, B1, B2 and B3: exposed 2.5."""
    result = simulate(one_f_one_b(2, 4), costs(), overlap=False)
    assert result.step_time == 17.5
    assert (result.stages[0].busy, result.stages[0].exposed_comm, result.stages[0].bubble) == (12.0, 2.5, 3.0)


def test_1f1b_overlapped_two_micro_batches():
    """s0 F0 [0, 1], F1 [1, 2] (sending does not stop it); F0 arrives at s1 at 1.5: F0 [1.5, 2.5],
    B0 [2.5, 4.5]; the gradient arrives at 5: s0 B0 [5, 7]; s1 F1 (arrived 2.5) [4.5, 5.5], B1
    [5.5, 7.5]; arrives 8: s0 B1 [8, 10]. Step 10: only the consumer waits."""
    result = simulate(one_f_one_b(2, 2), costs(), overlap=True)
    assert result.step_time == 10.0
    assert result.stages[0].exposed_comm == 1.0  # before B0 (4.5 -> 5) and B1 (7.5 -> 8)


def test_without_communication_matches_the_bubble_formula():
    """With instant hops 1F1B takes (m + p - 1)(f + b) and interleaved m v (f + b) + (p - 1)(f + b),
    f and b per chunk: p = 2, m = 4 -> 5 x 3 = 15; p = 2, v = 2, m = 4 with f = 0.5, b = 1 -> 12 + 1.5."""
    assert simulate(one_f_one_b(2, 4), costs(hop=0.0), overlap=False).step_time == 15.0
    assert simulate(one_f_one_b(4, 8), costs(hop=0.0), overlap=True).step_time == 33.0
    assert simulate(interleaved(2, 2, 4), costs(0.5, 1.0, hop=0.0), overlap=False).step_time == 13.5
    assert simulate(interleaved(4, 2, 8), costs(0.5, 1.0, hop=0.0), overlap=True).step_time == 28.5


def test_interleaved_overlapped():
    """p = 2, v = 2, m = 2 (chunks 0, 2 on s0; 1, 3 on s1), f = 1, b = 2 per chunk pass, c = 0.5.
    s0 F0.0 [0, 1], F1.0 [1, 2]; hops s0->s1 [1, 1.5] and [2, 2.5]. s1 F0.1 [1.5, 2.5], F1.1
    [2.5, 3.5]; hops s1->s0 [2.5, 3], [3.5, 4]. s0 F0.2 [3, 4], F1.2 [4, 5]; hops [4, 4.5], [5, 5.5].
    s1 F0.3 [4.5, 5.5], B0.3 [5.5, 7.5], F1.3 [7.5, 8.5], B1.3 [8.5, 10.5]; gradients reach s0 at 8
    and 11. s0 B0.2 [8, 10] (hop [10, 10.5]), B1.2 [11, 13] (hop [13, 13.5]). s1 B0.1 [10.5, 12.5]
    (hop [12.5, 13]), B1.1 [13.5, 15.5] (hop [15.5, 16]). s0 B0.0 [13, 15], B1.0 [16, 18]. Step 18."""
    result = simulate(interleaved(2, 2, 2), costs(), overlap=True)
    assert result.step_time == 18.0
    assert dict(((stage, str(task)), (start, end)) for stage, task, start, end in result.timeline)[(0, "B0.0")] == (13.0, 15.0)


def test_shared_cores_spread_the_work():
    """One core for two stages, no hops: whenever both compute each runs at half speed, and one of
    them always computes, so the step is the total work: 2 stages x 2 micro-batches x (1 + 2) = 12.
    s0 F0 [0, 1]; s0 F1 and s1 F0 together [1, 3]; s1 B0 alone [3, 5]; s0 B0 and s1 F1 together
    until F1 ends at 7; s0 B0 (1 left) and s1 B1 together to 9; s1 B1 (1 left) [9, 10]; s0 B1 [10, 12]."""
    result = simulate(one_f_one_b(2, 2), costs(hop=0.0), overlap=False, shared_cores=1)
    assert result.step_time == 12.0
    assert result.stages[0].busy == 1 + 2 + 4 + 2  # F0, F1 at half speed, B0 over [5, 9], B1


def test_step_tail_is_added():
    assert simulate(one_f_one_b(2, 2), costs(tail=0.25), overlap=False).step_time == 10.75


@pytest.mark.parametrize("stages, chunks, micro_batches", [(1, 1, 3), (2, 1, 1), (3, 1, 5), (4, 2, 8), (8, 3, 16), (3, 4, 6)])
@pytest.mark.parametrize("overlap", [False, True])
def test_no_deadlock_and_every_task_once(stages, chunks, micro_batches, overlap):
    plan = build(stages, chunks, micro_batches)
    result = simulate(plan, costs(), overlap=overlap)
    tasks = [task for _, task, _, _ in result.timeline]
    assert len(tasks) == len(set(tasks)) == 2 * stages * chunks * micro_batches
    assert Task("B", micro_batches - 1, 0) in tasks


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match=r"micro-batches \(3\) must be a multiple of the pipeline stages \(2\)"):
        interleaved(2, 2, 3)
    with pytest.raises(ValueError, match="pipeline stages must be a positive integer, got 0"):
        one_f_one_b(0, 4)
