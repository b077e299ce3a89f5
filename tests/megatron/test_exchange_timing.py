"""The exposed-communication measures of ``exchange_timing`` on hand-built timelines of two stages.

Messages: ``a<k>`` is the k-th activation from rank 0 to rank 1, ``g<k>`` the k-th gradient back.
"""

import pytest

from mhc_megatron.megatron.pipeline.exchange_timing import Timeline, critical_path, exposed_transfer_seconds

A = [(0, 1, True, k) for k in range(2)]
G = [(1, 0, False, k) for k in range(2)]


def _neighbour_bound():
    """Rank 0 computes F0 over [0, 1], posts a0 at 1 (its receive of g0 was posted at 0.5), waits
    for g0 over [2, 6], computes until 8. Rank 1 waits for a0 over [0, 1.3], computes until 5,
    posts g0 at 5, computes until 7. Critical path: rank 0 to 1, a0 1 -> 1.3, rank 1 to 5,
    g0 5 -> 6, rank 0 to 8: 8 s, of which 1.3 s transfers, 2 hops."""
    rank0 = Timeline(rank=0, started=0.0, ended=8.0,
                     intervals=[(0.5, 0.5, (G[0],)), (1.0, 1.1, (A[0],)), (2.0, 6.0, (G[0],))],
                     posts={G[0]: 0.5, A[0]: 1.0})
    rank1 = Timeline(rank=1, started=0.0, ended=7.0,
                     intervals=[(0.0, 1.3, (A[0],)), (5.0, 5.2, (G[0],))],
                     posts={A[0]: 0.0, G[0]: 5.0})
    return [rank0, rank1]


def test_critical_path_follows_the_neighbour_a_stage_waited_for():
    path = critical_path(_neighbour_bound())
    assert path.seconds == 8.0 and path.hops == 2
    assert path.transfer_seconds == pytest.approx(1.3)


def test_exposed_counts_each_rank_s_wait_after_both_sides_posted():
    timelines = _neighbour_bound()
    # rank 0: a0's send call 1 -> 1.1 (both posted at 1), g0's wait 5 -> 6; the posting call at 0.5 waits for nothing
    assert exposed_transfer_seconds(timelines, 0) == pytest.approx(1.1)
    # rank 1: a0 1 -> 1.3, g0's send call 5 -> 5.2
    assert exposed_transfer_seconds(timelines, 1) == pytest.approx(0.5)


def test_a_transfer_under_way_costs_only_the_rest_of_the_wait():
    """Rank 1 posts g0 at 1.5 while rank 0 computes until 2; rank 0 waits over [2, 3]: an instant
    transfer would have saved 1 s, and the path stays on rank 0 (whose computation ended at 2)."""
    rank0 = Timeline(rank=0, started=0.0, ended=5.0, intervals=[(0.0, 0.0, (G[0],)), (2.0, 3.0, (G[0],))],
                     posts={G[0]: 0.0})
    rank1 = Timeline(rank=1, started=0.0, ended=4.0, intervals=[(1.5, 1.6, (G[0],))], posts={G[0]: 1.5})
    path = critical_path([rank0, rank1])
    assert (path.seconds, path.transfer_seconds, path.hops) == (5.0, 1.0, 0)


def test_a_faster_stage_s_transfers_off_the_path_do_not_count():
    """Rank 1 (the slow stage) ends last; rank 0 waited for g0 (posted at 5) over [2, 6] but rank 1
    never waited for rank 0 after a0: on the path are a0's transfer (1 -> 1.3) and rank 1's own
    call sending g0 (5 -> 5.2), not g0's transfer to rank 0."""
    rank0, rank1 = _neighbour_bound()
    slow = Timeline(rank=1, started=0.0, ended=12.0, intervals=rank1.intervals, posts=rank1.posts)
    path = critical_path([rank0, slow])
    assert (path.seconds, path.hops) == (12.0, 1)
    assert path.transfer_seconds == pytest.approx(0.5)
    assert exposed_transfer_seconds([rank0, slow], 0) == pytest.approx(1.1)


def test_a_blocking_exchange_follows_the_message_posted_last():
    """Rank 0's blocking call at 2 sends a1 and receives g0; g0 was posted at 1.5, but rank 1 posted
    its receive of a1 only at 4, and the call returns at 5: the path goes to rank 1 at 4."""
    rank0 = Timeline(rank=0, started=0.0, ended=6.0, intervals=[(2.0, 5.0, (A[1], G[0]))],
                     posts={A[1]: 2.0, G[0]: 2.0})
    rank1 = Timeline(rank=1, started=0.0, ended=5.0, intervals=[(1.5, 1.5, (G[0],)), (4.0, 5.0, (A[1],))],
                     posts={G[0]: 1.5, A[1]: 4.0})
    path = critical_path([rank0, rank1])
    assert (path.seconds, path.transfer_seconds, path.hops) == (6.0, 1.0, 1)
