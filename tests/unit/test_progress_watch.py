"""The stall watchdog (observability.health.ProgressWatch): which partitions count as stalled."""

from __future__ import annotations

from clickpulse.observability.health import ProgressWatch

T0, T1 = ("raw", 0), ("raw", 1)


def test_a_partition_with_lag_and_no_progress_is_stalled_after_the_timeout():
    w = ProgressWatch(timeout_s=180)
    assert w.check(0, {T0: 40}, {T0: 100}, {T0: None}) == []   # owned after a rebalance, never fed
    assert w.check(179, {T0: 40}, {T0: 100}, {T0: None}) == []
    (st,) = w.check(180, {T0: 40}, {T0: 100}, {T0: None})
    assert (st.topic, st.partition, st.lag, st.committed, st.seen, st.seconds) == ("raw", 0, 40, 100, None, 180)


def test_processed_but_never_committed_is_a_stall_too():
    """The commit stall: every record delivered (seen at the end), the committed offset stuck."""
    w = ProgressWatch(timeout_s=60)
    assert w.check(0, {T0: 25}, {T0: 75}, {T0: 90}) == []
    assert w.check(30, {T0: 25}, {T0: 75}, {T0: 100}) == []      # a new record: progress
    assert w.check(89, {T0: 25}, {T0: 75}, {T0: 100}) == []
    assert [s.partition for s in w.check(90, {T0: 25}, {T0: 75}, {T0: 100})] == [0]


def test_idle_partitions_and_moving_ones_never_stall():
    w = ProgressWatch(timeout_s=10)
    for t in range(0, 100, 5):
        # T0: no lag at all (idle); T1: lag, but its commit moves every poll
        assert w.check(t, {T0: 0, T1: 7}, {T0: 50, T1: 10 + t}, {T0: 50, T1: None}) == []


def test_a_rebalance_restarts_every_clock_and_moved_partitions_are_forgotten():
    w = ProgressWatch(timeout_s=10)
    w.check(0, {T0: 5, T1: 5}, {T0: 1, T1: 1}, {})
    w.reset()
    assert w.check(10, {T0: 5, T1: 5}, {T0: 1, T1: 1}, {}) == []  # first look after the rebalance
    assert w.check(15, {T0: 5}, {T0: 1}, {}) == []                # T1 moved to another worker
    assert [s.partition for s in w.check(20, {T0: 5, T1: 5}, {T0: 1, T1: 1}, {})] == [0]  # T1 back: a new clock
