"""The event-time engine with a hand-moved clock: timers, watermarks, restarts (S1-S3, S10-S12)."""

from __future__ import annotations

import orjson

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.state.clock import END_OF_TIME, PartitionClock
from clickpulse.testing import ManualClock, event, memory_engine, ms
from tests.oracle import independent_abandoned_users


def test_s1_lone_add_to_cart_fires_on_wall_clock_in_live_mode():
    eng = memory_engine(live=True, lateness_s=60, idle_s=5)
    clock = ManualClock(ms("2019-10-01T10:00:00Z"))
    _, acts = eng.process(0, event("add_to_cart", product_id="p1", at="2019-10-01T10:00:00Z"), clock.now_ms)
    assert acts == []
    fired = []
    while clock.now_ms < ms("2019-10-01T11:00:00Z"):
        clock.advance(1)
        fired += [(a, clock.now_ms) for a in eng.tick(0, clock.now_ms)]
    assert len(fired) == 1
    action, when = fired[0]
    assert action["user_key"] == "u1" and action["event_time"] == "2019-10-01T10:30:00.000Z"
    # due 10:30 + allowed lateness 60 s + idle timeout 5 s (strictly past)
    assert ms("2019-10-01T10:30:00Z") < when <= ms("2019-10-01T10:31:06Z")


def test_replay_mode_never_uses_the_wall_clock():
    eng = memory_engine(live=False)
    eng.process(0, event("add_to_cart", product_id="p1", at="2019-10-01T10:00:00Z"), 0)
    assert eng.tick(0, ms("2030-01-01T00:00:00Z")) == []
    _, acts = eng.process(0, event("page_view", user="u2", at="2019-10-01T10:31:01Z"), 0)
    assert [a["user_key"] for a in acts] == ["u1"]


def test_s2_late_event_counted_not_lost():
    eng = memory_engine(live=True, lateness_s=10, idle_s=5)
    arrive = {"10:00:50": "10:00:51", "10:00:58": "10:01:05", "10:00:59": "10:01:20"}
    late = []
    for ev_t, arr_t in arrive.items():
        res, _ = eng.process(0, event("page_view", at=f"2019-10-01T{ev_t}Z"), ms(f"2019-10-01T{arr_t}Z"))
        late.append(res.late)
    assert late == [False, False, True]
    st = eng.load("u1")
    assert st.windows.count("page_view", "5m", ms("2019-10-01T10:00:59Z")) == 2
    assert st.life.events == 3
    assert eng.metrics.late._value.get() == 1


def test_s3_pending_timer_survives_restart():
    clock = ManualClock(ms("2019-10-01T10:00:00Z"))
    eng = memory_engine(live=True)
    eng.process(1, event("add_to_cart", product_id="p1", at="2019-10-01T10:00:00Z"), clock.now_ms)
    clock.advance(300)
    assert eng.tick(1, clock.now_ms) == []
    table = dict(eng.table)              # what the changelog holds at the crash
    restarted = memory_engine(live=True)
    restarted.table = table
    assert restarted.restore([1], table.items(), clock.advance(10)) == 1
    fired = []
    while clock.now_ms < ms("2019-10-01T11:00:00Z"):
        fired += restarted.tick(1, clock.advance(1))
    assert len(fired) == 1
    # the restored state no longer has the timer: a second restore fires nothing
    again = memory_engine(live=True)
    again.table = dict(restarted.table)
    assert again.restore([1], again.table.items(), clock.now_ms) == 0


def test_restore_keeps_watermark_from_state():
    eng = memory_engine(live=False, lateness_s=60)
    eng.process(2, event("page_view", at="2019-10-01T10:00:00Z"), 0)
    eng2 = memory_engine(live=False, lateness_s=60)
    eng2.restore([2], eng.table.items(), 0)
    assert eng2.clock(2).watermark() == ms("2019-10-01T09:59:00Z")


def test_duplicate_delivery_s7_one_action_at_most():
    eng = memory_engine(live=False)
    add = event("add_to_cart", product_id="p1", price=5.0, at="2019-10-01T10:00:00Z", event_id="dup-1")
    eng.process(0, add, 0)
    res, _ = eng.process(0, dict(add), 0)
    assert res.duplicate
    acts = eng.end_of_input(0, 0, 1, 0)
    assert len(acts) == 1 and acts[0]["payload"]["cart"]["items"][0]["quantity"] == 1


def test_end_of_input_waits_for_every_source_partition():
    c = PartitionClock(0, 0, live=False)
    assert not c.end_of_input(0, 3)
    assert not c.end_of_input(0, 3)       # same source twice
    assert not c.end_of_input(2, 3)
    assert c.end_of_input(1, 3) and c.watermark() == END_OF_TIME


def _replay_sample(flush: bool):
    """The bundled REES46 sample through parse + engine in file order, 4 partitions by user."""
    eng = memory_engine(live=False, lateness_s=60)
    actions = []
    for raw in read_rees46(BUNDLED_SAMPLE):
        ev = parse(orjson.dumps(raw), None)
        p = int(ev["user_id"]) % 4
        actions += eng.process(p, ev, 0)[1]
    if flush:
        for p in range(4):
            for src in range(4):
                actions += eng.end_of_input(p, src, 4, 0)
    return [a for a in actions if a["type"] == "cart_abandoned"]


def test_rees46_offline_matches_independent_computation():
    no_flush = {a["user_key"] for a in _replay_sample(False)}
    assert no_flush == {"550121407"} == independent_abandoned_users(False)  # S11, S12
    flushed = _replay_sample(True)
    users = [a["user_key"] for a in flushed]
    assert len(users) == len(set(users))
    assert set(users) == independent_abandoned_users(True)
    assert len(users) == 24
    assert "524325294" not in users and "533624186" not in users  # S10


def test_old_data_replayed_into_a_live_worker_fires_no_false_abandonment():
    """A live partition that saw today's traffic, then a burst of 2019 events (add, then purchase
    one message later): the add is late and its window already passed -> no action."""
    eng = memory_engine(live=True)
    now = ms("2026-11-29T10:00:00Z")
    eng.process(0, event("page_view", user="today", at=now), now)
    acts = []
    acts += eng.process(0, event("add_to_cart", user="u9", product_id="p", at="2019-10-01T00:09:33Z"), now + 10_000)[1]
    acts += eng.tick(0, now + 11_000)
    acts += eng.process(0, event("purchase", user="u9", at="2019-10-01T00:10:08Z"), now + 12_000)[1]
    assert acts == [] and eng.metrics.timers_skipped_late._value.get() == 1


def test_live_clock_follows_event_time_not_wall_time():
    """Event times 2 h behind the wall clock (skewed producer): a lone add still fires after
    30 min of *elapsed* time, not at once."""
    eng = memory_engine(live=True, lateness_s=60, idle_s=5)
    wall = ManualClock(ms("2019-10-01T12:00:00Z"))
    eng.process(0, event("add_to_cart", product_id="p", at="2019-10-01T10:00:00Z"), wall.now_ms)
    fired_at = None
    while fired_at is None and wall.now_ms < ms("2019-10-01T13:00:00Z"):
        if eng.tick(0, wall.advance(1)):
            fired_at = wall.now_ms
    assert fired_at is not None and 30 * 60_000 < fired_at - ms("2019-10-01T12:00:00Z") <= 31 * 60_000 + 1000


def test_restart_keeps_counting_idle_time_through_the_downtime():
    wall = ManualClock(ms("2019-10-01T10:00:00Z"))
    eng = memory_engine(live=True)
    eng.process(0, event("add_to_cart", product_id="p", at="2019-10-01T10:00:00Z"), wall.now_ms)
    wall.advance(20 * 60)                       # down for 20 minutes
    eng2 = memory_engine(live=True)
    eng2.table = dict(eng.table)
    eng2.restore([0], eng2.table.items(), wall.now_ms)
    fired = []
    while not fired:
        fired = eng2.tick(0, wall.advance(1))
    assert wall.now_ms <= ms("2019-10-01T10:31:01Z")   # not 20 minutes late


def test_a_restart_reads_the_backlog_before_the_partition_counts_as_idle():
    """A reviewer's three-worker run: a worker restarted 25 s after the last event it had saved
    moved event time by the whole downtime at its first tick and fired timers that the events
    waiting on the topic would have cancelled. The backlog read within the idle timeout after the
    restore comes first now."""
    from clickpulse.state.clock import PartitionClock
    c = PartitionClock(allowed_lateness_ms=0, idle_timeout_ms=5_000, live=True)
    c.observe(1_000_000, wall_ms=1_000_000)
    c.restore(1_000_000, wall_ms=1_025_000, max_ts_wall_ms=1_000_000)       # down for 25 s
    assert c.watermark(1_026_000) == 1_000_000                           # not idle yet: no jump
    c.observe(1_010_000, wall_ms=1_027_000)                              # the backlog arrives
    assert c.watermark(1_028_000) == 1_010_000
    assert c.watermark(1_033_000) == 1_010_000 + 6_000                   # idle again: follows the wall
    quiet = PartitionClock(allowed_lateness_ms=0, idle_timeout_ms=5_000, live=True)
    quiet.observe(1_000_000, wall_ms=1_000_000)
    quiet.restore(1_000_000, wall_ms=1_025_000, max_ts_wall_ms=1_000_000)
    assert quiet.watermark(1_030_000) == 1_030_000                      # no backlog: the downtime counts


def test_idle_users_expire_after_retention_even_with_a_pending_model_label():
    """A pending model label (churn: 14-day horizon) never keeps an idle user's behavioral state
    past the retention: the label is dropped and counted. Consent and lifetime totals stay (a
    durable record) until the dormant retention, then the user is deleted."""
    from clickpulse.models.labels import ModelConfig
    from clickpulse.models.registry import ModelRegistry

    eng = memory_engine(live=False, lateness_s=0)
    eng.models, eng.mcfg = ModelRegistry({}), ModelConfig()     # churn horizon 14 days
    eng.process(0, event("consent", user="idle", consent={"marketing": False}, at="2019-10-01T09:00:00Z"), 0)
    eng.process(0, event("purchase", user="idle", revenue=500.0, at="2019-10-01T10:00:00Z"), 0)
    eng.process(0, event("page_view", user="recent", at="2019-10-04T10:00:00Z"), 0)   # watermark moves on
    assert eng.load("idle").ml.get("pc") is not None                 # the churn label is pending
    # 'idle' is 3 days behind, its churn label is still pending: expired anyway, the label dropped
    assert eng.expire_users(0, retention_ms=86_400_000, wall_ms=0, dormant_retention_ms=10 * 86_400_000) == 1
    idle = eng.load("idle")
    assert idle.session is None and idle.ml == {} and idle.rules == {} and idle.windows.counts(0) == {}
    assert idle.consent["marketing"][0] is False and idle.life.revenue == 500.0 and idle.life.orders == 1
    assert eng.metrics.users_expired._value.get() == 1
    assert eng.metrics.predictions_dropped.labels("retention")._value.get() == 1
    # the opted-out customer returns: still opted out, still a customer
    eng.process(0, event("page_view", user="idle", at="2019-10-05T10:00:00Z"), 0)
    back = eng.load("idle")
    assert back.consent["marketing"][0] is False and back.life.orders == 1 and back.life.events == 3
    # past the dormant retention the durable record goes too
    eng.process(0, event("page_view", user="recent", at="2019-10-07T10:00:00Z"), 0)
    eng.expire_users(0, retention_ms=86_400_000, wall_ms=0, dormant_retention_ms=10 * 86_400_000)
    eng.process(0, event("page_view", user="recent", at="2019-10-30T10:00:00Z"), 0)
    eng.expire_users(0, retention_ms=86_400_000, wall_ms=0, dormant_retention_ms=10 * 86_400_000)
    assert eng.load("idle") is None and eng.metrics.users_deleted._value.get() == 1
    assert eng.expire_users(1, retention_ms=1, wall_ms=0) == 0                          # other partition
