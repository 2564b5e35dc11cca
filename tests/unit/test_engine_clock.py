"""The engine's event time belongs to no single producer (issue 10): an event moves its
partition's watermark to ``min(event time, receive time)`` at most, so a future-skewed event
(within CLICKPULSE_MAX_FUTURE_SKEW_S, so not clamped) neither makes the honest events that follow
late nor fires a timer early; and an end-of-input control is accepted once per partition, durably
(the clock log), so a replay changes nothing, also after a restart. Broker-free."""

from __future__ import annotations

import orjson
import pytest

from clickpulse.engine import clock_key
from clickpulse.events.contract import parse
from clickpulse.events.control import CONTROL_MAX_AGE_MS
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.testing import event, memory_engine

T0 = 1_700_000_000_000
RULES = """
version: "t"
triggers:
  - name: cart_120
    on: {timeout: {after: add_to_cart, no: purchase, within_s: 120}}
    when: '!cart.empty'
    action: {type: cart_abandoned}
"""


def _add(user: str, at: int) -> dict:
    return event("add_to_cart", user=user, at=at, product_id="p1", price=20.0, currency="EUR")


def _skewed_run(received: bool) -> tuple[list[dict], list[bool], object]:
    """u1 adds to its cart at T0; 1 s later an event stamped 295 s ahead arrives (a skewed or
    hostile producer); then honest events 2 s and 10 s after T0."""
    eng = memory_engine(rules=RULES, lateness_s=5)
    steps = [(_add("u1", T0), T0),
             (event("page_view", user="skewed", at=T0 + 295_000), T0 + 1_000),
             (event("page_view", user="u3", at=T0 + 2_000), T0 + 2_000),
             (_add("u4", T0 + 10_000), T0 + 10_000)]
    actions, late = [], []
    for ev, recv in steps:
        em = eng.step([(0, ev)], recv, received=[recv] if received else None)
        eng.commit(em)
        actions += em.actions
        late += [a.late for a in em.applied]
    return actions, late, eng


def test_a_future_skewed_event_moves_time_to_its_arrival_only():
    actions, late, eng = _skewed_run(received=True)
    assert actions == []                                  # the 120 s cart timer did not fire 2 s in
    assert late == [False, False, False, False]           # the honest events that follow count
    assert eng.clock(0).watermark() == T0 + 10_000 - 5_000
    assert eng.load("skewed").life.last_ms == T0 + 295_000   # the event keeps its own time
    # time goes on with honest traffic: the cart fires when real event time passes its due time
    em = eng.step([(0, event("page_view", user="u5", at=T0 + 130_000))], T0 + 130_000, received=[T0 + 130_000])
    assert [(a["user_key"], a["type"], a["event_time_ms"]) for a in em.actions] == \
        [("u1", "cart_abandoned", T0 + 120_000)]


def test_without_the_receive_time_the_skewed_event_takes_the_clock():
    """The failing input of the report: the same run without receive times (the engine before
    the fix) fires the cart 2 s after the add and counts the honest events late."""
    actions, late, _eng = _skewed_run(received=False)
    assert [a["user_key"] for a in actions] == ["u1"]
    assert late == [False, False, True, True]


def test_the_candidate_also_bounds_the_users_own_timers_before_its_event():
    """An event fires its own user's due timers at the watermark it moves to: that one is capped too."""
    eng = memory_engine(rules=RULES, lateness_s=5)
    eng.commit(eng.step([(0, _add("u1", T0))], T0, received=[T0]))
    em = eng.step([(0, event("page_view", user="u1", at=T0 + 290_000))], T0 + 1_000, received=[T0 + 1_000])
    assert em.actions == []


def test_live_idle_advance_starts_from_the_arrival_not_the_skewed_time():
    eng = memory_engine(rules=RULES, lateness_s=5, idle_s=1, live=True)
    eng.commit(eng.step([(0, _add("u1", T0))], T0, received=[T0]))
    eng.commit(eng.step([(0, event("page_view", user="skewed", at=T0 + 295_000))], T0 + 1_000,
                        received=[T0 + 1_000]))
    assert eng.step([], T0 + 60_000, tick=[0]).actions == []          # 60 s later: not due yet
    em = eng.step([], T0 + 127_000, tick=[0])                         # 120 s + lateness later: due
    assert [a["user_key"] for a in em.actions] == ["u1"]


def test_historical_replay_is_unchanged_by_receive_times():
    """Replay (receive time far after event time): the candidate is the event time; same actions."""
    events = [parse(orjson.dumps(r), None) for r in read_rees46(BUNDLED_SAMPLE)][:3000]
    now = 1_800_000_000_000   # years after the sample's October 2019
    out = []
    for received in (None, now):
        eng = memory_engine()
        acts = []
        for i in range(0, len(events), 250):
            batch = [(int(ev["user_id"]) % 2, ev) for ev in events[i:i + 250]]
            em = eng.step(batch, now, received=None if received is None else [received] * len(batch))
            eng.commit(em)
            acts += em.actions
        for p in range(2):
            for src in range(2):
                em = eng.end_of_input_step(p, src, 2, now)
                eng.commit(em)
                acts += em.actions
        out.append((acts, dict(eng.table)))
    assert len(out[0][0]) > 10
    assert out[0] == out[1]


# ---------------------------------------------------------------------- end-of-input controls
def _closing(eng, part: int, src: int, control: str | None, issued: int = T0, wall: int = T0,
             raw_offset: int | None = None, n: int = 1):
    em = eng.end_of_input_step(part, src, n, wall, control=control, issued_at_ms=issued, raw_offset=raw_offset)
    eng.commit(em)
    return em


def _restarted(eng, wall: int, items=None):
    """A new engine restoring partition 0 from ``eng``'s table (= the changelog) after it wrote
    its clock log, as the worker does after each batch."""
    eng.table[clock_key(0, lambda k: 0)] = eng.checkpoint(0, {"valid": 5})
    table = dict(items if items is not None else eng.table)
    new = memory_engine(rules=RULES)
    new.table.update(table)                 # the recovered table
    new.restore([0], list(table.items()), wall)
    return new


def test_a_control_is_accepted_once_per_partition():
    eng = memory_engine(rules=RULES)
    eng.commit(eng.step([(0, _add("u1", T0))], T0))
    first = _closing(eng, 0, 0, "run-a:0:1")
    assert [a["user_key"] for a in first.actions] == ["u1"] and eng.clock(0).closed
    eng.clock(0).closed, eng.clock(0).eoi_sources, eng.clock(0).wm = False, set(), T0   # reopened
    again = _closing(eng, 0, 0, "run-a:0:1")
    assert again.counters.get(("control_forged", ())) == 1 and not eng.clock(0).closed
    assert eng.control_seen("run-a:0:1") == "replayed" and eng.control_seen("run-b:0:1") == "new"


def test_a_control_forwarded_again_from_the_same_raw_offset_is_a_redelivery():
    """The raw record re-read after a rebalance or restart is forwarded again: applied (ending a
    source's input twice is idempotent), not counted as forged; from another offset: a replay."""
    eng = memory_engine(rules=RULES)
    eng.commit(eng.step([(0, _add("u1", T0))], T0))
    assert _closing(eng, 0, 0, "run-a:0:1", raw_offset=41, n=2).counters.get(("control_forged", ())) is None
    assert eng.control_seen("run-a:0:1", 41) == "redelivered" and eng.control_seen("run-a:0:1", 42) == "replayed"
    again = _closing(eng, 0, 0, "run-a:0:1", raw_offset=41, n=2)
    assert again.counters.get(("control_forged", ())) is None and not eng.clock(0).closed
    eng2 = _restarted(eng, T0 + 1_000)
    eng2.commit(eng2.step([(0, _add("u2", T0 + 1_000))], T0 + 1_000))
    assert eng2.control_seen("run-a:0:1", 41) == "redelivered"
    again = _closing(eng2, 0, 0, "run-a:0:1", wall=T0 + 2_000, raw_offset=41, n=2)
    assert again.counters.get(("control_forged", ())) is None and not eng2.clock(0).closed
    last = _closing(eng2, 0, 1, "run-a:1:1", wall=T0 + 2_000, raw_offset=17, n=2)
    assert eng2.clock(0).closed and sorted(a["user_key"] for a in last.actions) == ["u1", "u2"]
    eng3 = _restarted(eng, T0 + 1_000)
    replay = _closing(eng3, 0, 0, "run-a:0:1", wall=T0 + 2_000, raw_offset=42, n=2)
    assert replay.counters.get(("control_forged", ())) == 1 and not eng3.clock(0).closed


def test_an_end_of_input_accepted_before_a_restart_still_counts_after_it():
    """Source 0 of 2 ended, then the worker restarted (or the partition moved): the end of source
    1 closes the partition. Before the accepted controls were counted from the durable clock log,
    the source-0 end was forgotten and the partition never closed: a three-worker test run lost
    471 actions (its raw controls were committed, nothing would send them again)."""
    eng = memory_engine(rules=RULES)
    eng.commit(eng.step([(0, _add("u1", T0))], T0))
    _closing(eng, 0, 0, "run-a:0:1", raw_offset=3, n=2)
    eng2 = _restarted(eng, T0 + 1_000)
    assert not eng2.clock(0).closed and eng2.pending_timers() == 1
    last = _closing(eng2, 0, 1, "run-a:1:1", wall=T0 + 2_000, raw_offset=8, n=2)
    assert eng2.clock(0).closed and [a["user_key"] for a in last.actions] == ["u1"]


def test_a_closed_event_time_is_closed_again_after_a_restart_within_the_window():
    """Every source ended, the clock log written, the crash before the fired states were saved:
    the restored partition is closed and its timers fire at the next tick. After the 10-minute
    window the controls are forgotten and a restored partition is open again (never permanent)."""
    eng = memory_engine(rules=RULES)
    eng.commit(eng.step([(0, _add("u1", T0))], T0))
    states_before = dict(eng.table)
    for src in (0, 1):
        _closing(eng, 0, src, f"run-a:{src}:1", raw_offset=5 + src, n=2)
    assert eng.clock(0).closed
    eng.table[clock_key(0, lambda k: 0)] = eng.checkpoint(0, {"valid": 5})
    torn = {**states_before, clock_key(0, lambda k: 0): eng.table[clock_key(0, lambda k: 0)]}
    eng2 = _restarted(eng, T0 + 1_000, torn)
    assert eng2.clock(0).closed and eng2.pending_timers() == 1
    fired = eng2.step([], T0 + 2_000, tick=[0])
    assert [a["user_key"] for a in fired.actions] == ["u1"]
    late = _restarted(eng, T0 + CONTROL_MAX_AGE_MS + 1, torn)
    assert not late.clock(0).closed and late.clock(0).controls == {}


def test_controls_of_different_runs_never_combine():
    eng = memory_engine(rules=RULES)
    eng.commit(eng.step([(0, _add("u1", T0))], T0))
    _closing(eng, 0, 0, "run-a:0:1", raw_offset=1, n=2)
    _closing(eng, 0, 1, "run-b:1:1", raw_offset=2, n=2)
    assert not eng.clock(0).closed and eng.pending_timers() == 1
    _closing(eng, 0, 1, "run-a:1:1", raw_offset=3, n=2)
    assert eng.clock(0).closed


def test_a_replayed_control_is_refused_after_a_restart_from_the_changelog():
    eng = memory_engine(rules=RULES)
    eng.commit(eng.step([(0, _add("u1", T0))], T0))
    _closing(eng, 0, 0, "run-a:0:1", n=2)
    eng2 = _restarted(eng, T0 + 1_000)
    assert eng2.control_seen("run-a:0:1") == "replayed"
    eng2.commit(eng2.step([(0, _add("u2", T0 + 1_000))], T0 + 1_000))
    replay = _closing(eng2, 0, 0, "run-a:0:1", wall=T0 + 2_000, n=2)
    assert replay.counters.get(("control_forged", ())) == 1
    assert replay.actions == [] and not eng2.clock(0).closed and eng2.pending_timers() == 2
    # negative control: a new engine that did not restore the clock log accepts it
    eng3 = _restarted(eng, T0 + 1_000, {k: v for k, v in eng.table.items() if not k.startswith(b"\xffclock")})
    assert eng3.control_seen("run-a:0:1") == "new"
    assert _closing(eng3, 0, 0, "run-a:0:1", wall=T0 + 2_000, n=2).counters.get(("control_forged", ())) is None


def test_accepted_control_ids_are_forgotten_after_the_freshness_window():
    eng = memory_engine(rules=RULES)
    _closing(eng, 0, 0, "old:0:1", issued=T0, wall=T0)
    _closing(eng, 0, 0, "new:0:1", issued=T0 + CONTROL_MAX_AGE_MS, wall=T0 + CONTROL_MAX_AGE_MS + 1)
    assert set(eng.clock(0).controls) == {"new:0:1"}
    blob = orjson.loads(eng.checkpoint(0, {"valid": 1}))
    assert blob["ctl"] == {"new:0:1": [T0 + CONTROL_MAX_AGE_MS, None, 1]}


def test_a_clock_log_written_before_raw_offsets_restores_its_ids():
    eng = memory_engine(rules=RULES)
    eng.restore([0], [(clock_key(0, lambda k: 0), orjson.dumps({"p": 0, "log": [], "ctl": {"a:0:1": T0}}))], T0)
    assert eng.clock(0).controls == {"a:0:1": (T0, None, None)}
    assert eng.control_seen("a:0:1", 3) == "replayed"


@pytest.mark.parametrize("ctl", ["not a dict", {"a:0:1": "x"}, ["a"], None, {"a:0:1": [1]}, {"a:0:1": [1, "x"]},
                                 {"a:0:1": [True, 2]}, {"a:0:1": [1, 2, 3, 4]}])
def test_a_broken_control_list_in_the_clock_log_restores_no_ids(ctl):
    eng = memory_engine(rules=RULES)
    eng.restore([0], [(clock_key(0, lambda k: 0), orjson.dumps({"p": 0, "log": [], "ctl": ctl}))], T0)
    assert eng.clock(0).controls == {}
