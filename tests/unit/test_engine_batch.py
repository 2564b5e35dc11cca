"""The batch engine step: determinism over batch sizes and partition counts, one write per user
per step, and a step that raises changes nothing (an event that fails is rolled back alone)."""

from __future__ import annotations

import orjson
import pytest

from clickpulse.engine import Emitted, Engine
from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.models.labels import ModelConfig
from clickpulse.models.registry import ModelRegistry
from clickpulse.testing import event, memory_engine

_EVENTS = [parse(orjson.dumps(r), None) for r in read_rees46(BUNDLED_SAMPLE)]


def _engine(models: bool = True) -> Engine:
    eng = memory_engine(live=False)  # default rules, marketing consent assumed
    if models:
        eng.models, eng.mcfg = ModelRegistry({}), ModelConfig()  # untrained: deterministic scores
    return eng


def _run(batch_size: int, partitions: int, flush: bool = True) -> tuple[list[dict], dict[bytes, bytes], list[dict]]:
    eng = _engine()
    items = [(int(ev["user_id"]) % partitions, ev) for ev in _EVENTS]
    actions: list[dict] = []
    examples: list[dict] = []
    for i in range(0, len(items), batch_size):
        em = eng.step(items[i:i + batch_size], 0)
        eng.commit(em)
        actions += em.actions
        examples += em.examples
    if flush:
        for p in range(partitions):
            for src in range(partitions):
                em = eng.end_of_input_step(p, src, partitions, 0)
                eng.commit(em)
                actions += em.actions
                examples += em.examples
    return actions, dict(eng.table), examples


def _key(actions: list[dict]) -> list[tuple]:
    return sorted((a["action_id"], a["type"], a["user_key"], a["event_time_ms"]) for a in actions)


@pytest.fixture(scope="module")
def one_by_one() -> tuple[list[dict], dict[bytes, bytes], list[dict]]:
    return _run(1, 4)


@pytest.mark.parametrize("batch_size", [7, 500])
def test_same_actions_state_and_examples_for_any_batch_size(one_by_one, batch_size):
    actions, table, examples = _run(batch_size, 4)
    ref_actions, ref_table, ref_examples = one_by_one
    assert len(ref_actions) > 1000  # the replay does decide things
    assert actions == ref_actions   # same actions in the same order, payloads included
    assert table == ref_table
    assert [e.get("example_id", e.get("event_time_ms")) for e in examples] == \
        [e.get("example_id", e.get("event_time_ms")) for e in ref_examples]


def test_same_actions_for_one_or_four_partitions(one_by_one):
    actions, _table, _ = _run(500, 1)
    assert _key(actions) == _key(one_by_one[0])


def test_a_user_is_written_once_per_step():
    eng = _engine(models=False)
    batch = [(0, event("product_view", user="u1", product_id=f"p{i}", at=f"2019-10-01T10:0{i}:00Z"))
             for i in range(5)]
    em = eng.step(batch, 0)
    assert list(em.changed) == ["u1"] and eng.table == {}      # nothing written by the step itself
    eng.commit(em)
    assert eng.load("u1").life.events == 5


def test_a_failing_event_is_rolled_back_alone(monkeypatch):
    eng = _engine(models=False)
    eng.process(0, event("add_to_cart", user="u1", product_id="p", at="2019-10-01T10:00:00Z"), 0)
    before_table = dict(eng.table)
    before_clock = eng.clocks[0].max_ts
    import clickpulse.engine.step as step_mod
    real_apply = step_mod.apply

    def poisoned(st, ev, *a, **kw):
        if ev["user_key"] == "bad":
            st.life.events += 1000  # half-done work that must not survive
            raise ValueError("boom")
        return real_apply(st, ev, *a, **kw)
    monkeypatch.setattr(step_mod, "apply", poisoned)
    batch = [(0, event("page_view", user="u2", at="2019-10-01T10:01:00Z")),
             (0, event("page_view", user="bad", at="2019-10-01T11:00:00Z")),
             (0, event("page_view", user="u1", at="2019-10-01T10:02:00Z"))]
    em = eng.step(batch, 0)
    assert [(f.index, f.user_key) for f in em.failed] == [(1, "bad")]
    assert "ValueError: boom" in em.failed[0].error
    assert em.applied[1] is None and em.applied[0] is not None and em.applied[2] is not None
    assert set(em.changed) == {"u1", "u2"}
    assert ("engine_errors", ()) in em.counters
    eng.commit(em)
    assert eng.load("bad") is None
    assert eng.clocks[0].max_ts == max(before_clock, batch[2][1]["timestamp_ms"])  # 'bad' moved no clock
    assert eng.load("u1").life.events == 2
    assert before_table.keys() <= eng.table.keys()


def test_a_step_that_raises_changes_nothing(monkeypatch):
    eng = _engine(models=False)
    eng.process(0, event("add_to_cart", user="u1", product_id="p", at="2019-10-01T10:00:00Z"), 0)
    table, timers = dict(eng.table), eng.pending_timers()
    members = {p: dict(m) for p, m in eng.segment_members.items()}
    monkeypatch.setattr(Engine, "_fire", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("tick failed")))
    with pytest.raises(RuntimeError):
        eng.step([], 0, tick=[0])
    assert eng.table == table and eng.pending_timers() == timers and eng.segment_members == members


def test_emitted_merge_and_metrics():
    from prometheus_client import CollectorRegistry

    from clickpulse.observability.metrics import Metrics
    a, b = Emitted(), Emitted()
    a.count("actions", "incentive")
    b.count("actions", "incentive", n=2)
    b.changed["u"] = None
    a.merge(b)
    m = Metrics(CollectorRegistry())
    a.apply_metrics(m)
    assert m.actions.labels("incentive")._value.get() == 3 and a.changed == {"u": None}


def test_a_poisoned_stored_state_is_quarantined_not_every_later_event():
    """The issue's poisoned user: a stored state the engine cannot process (here lifetime revenue
    stored as null, as an overflow left it) dead-lettered every later event of the user."""
    eng = _engine(models=False)
    eng.process(0, event("purchase", user="rich", revenue=500.0, at="2019-10-01T10:00:00Z"), 0)
    raw = orjson.loads(eng.load("rich").to_bytes_json())   # the previous release's format, still read
    raw["l"][5] = None                                       # revenue: null
    eng.table[b"rich"] = orjson.dumps(raw)
    eng._cache.clear()
    old = eng.table[b"rich"]
    em = eng.step([(0, event("purchase", user="rich", revenue=5.0, at="2019-10-01T11:00:00Z"))], 0)
    assert em.failed == [] and "rich" in em.quarantined
    q = em.quarantined["rich"]
    import base64
    assert base64.b64decode(q["state_b64"]) == old and q["stage"] == "event" and "TypeError" in q["error"]
    eng.commit(em)
    assert eng.load("rich").life.revenue == 5.0 and eng.load("rich").life.orders == 1   # a fresh state
    assert eng.metrics.users_quarantined._value.get() == 1
    _, acts = eng.process(0, event("page_view", user="rich", at="2019-10-01T11:01:00Z"), 0)  # and it goes on
    assert eng.load("rich").life.events == 2


def test_undecodable_stored_state_is_quarantined():
    eng = _engine(models=False)
    eng.table[b"u9"] = b"\x00not a state"
    em = eng.step([(0, event("page_view", user="u9"))], 0)
    assert em.failed == [] and em.quarantined["u9"]["state_b64"] is not None


def test_a_timer_over_a_broken_state_quarantines_that_user_only(monkeypatch):
    eng = _engine(models=False)
    for u in ("a", "b"):
        eng.process(0, event("add_to_cart", user=u, product_id="p", price=5.0, at="2019-10-01T10:00:00Z"), 0)
    import clickpulse.rules.triggers as trig
    real = trig.on_timers

    def broken(st, wm, ctx):
        if st.key == "a":
            raise KeyError("corrupt timer state")
        return real(st, wm, ctx)
    monkeypatch.setattr(trig, "on_timers", broken)
    em = eng.step([(0, event("page_view", user="c", at="2019-10-01T11:00:00Z"))], 0)
    assert list(em.quarantined) == ["a"] and em.quarantined["a"]["stage"] == "timer"
    assert [(x["type"], x["user_key"]) for x in em.actions if x["type"] == "cart_abandoned"] == [("cart_abandoned", "b")]


def test_erase_removes_state_timers_and_segment_counts():
    eng = _engine(models=False)
    for i in range(3):  # three adds in 7 days, no purchase: hesitant_buyers
        eng.process(0, event("add_to_cart", user="x", product_id=f"p{i}", price=5.0,
                             at=f"2019-10-01T10:0{i}:00Z"), 0)
    assert eng.segment_members[0].get("hesitant_buyers") == 1 and eng.pending_timers() == 1
    done = eng.erase("x", 0)
    assert done["state"] and done["timers"] == 1 and done["segments"] == ["hesitant_buyers"]
    assert eng.load("x") is None and eng.pending_timers() == 0
    assert eng.segment_members[0].get("hesitant_buyers") == 0
    assert eng.erase("nobody", 0)["state"] is False


def test_restore_resumes_at_the_saved_position_and_skips_what_the_states_hold():
    """After a crash the changelog holds every batch up to the newest clock-log entry (written
    after the batch's states) and maybe part of the next batch. The clock restarts at that entry,
    the re-read up to it is skipped, and the partly saved batch's events, duplicates for the users
    saved, move the clock as they did the first time: the watermark, the states and the timers
    agree with a run without the crash."""
    from clickpulse.engine import CLOCK_KEY_PREFIX, clock_key
    eng = _engine(models=False)
    t0 = 1_569_924_000_000                                  # 2019-10-01T10:00:00Z
    eng.commit(eng.step([(0, event("add_to_cart", user="a", product_id="p", at=t0))], 0))
    saved_a = eng.table[b"a"]                               # a as saved with its cart timer pending
    eng.commit(eng.step([(0, event("page_view", user="b", at=t0 + 1_700_000))], 0))
    log1 = eng.checkpoint(0, {"valid": 1})                  # offsets 0-1 saved: clock at t0 + 1700 s
    c_event = event("page_view", user="c", at=t0 + 1_900_000)
    em = eng.step([(0, c_event)], 0)                        # offset 2: fires a's cart timer (due t0 + 1800 s)
    assert [x["type"] for x in em.actions] == ["cart_abandoned"]
    eng.commit(em)
    key = clock_key(0, lambda k: 0)
    assert key.startswith(CLOCK_KEY_PREFIX)
    # the SIGKILL came after c's new state reached the changelog, before a's and the clock log did
    table = dict(eng.table)
    table[b"a"] = saved_a
    table[key] = log1
    fresh = _engine(models=False)
    fresh.table = table
    assert fresh.restore([0], table.items(), 0, committed={("valid", 0): 0}) == 1   # a's timer
    assert fresh.clocks[0].watermark(0) == t0 + 1_700_000 - 60_000
    assert fresh.positions[0] == {"valid": 1}
    assert [fresh.redelivered(0, "valid", o) for o in (0, 1, 2)] == [True, True, False]
    again = fresh.step([(0, c_event)], 0)                   # a duplicate for c: moves the clock all the same
    assert again.applied[0].duplicate
    assert [(x["type"], x["user_key"]) for x in again.actions] == [("cart_abandoned", "a")]
    assert again.actions[0]["action_id"] == em.actions[0]["action_id"]      # the same action, again
    # without a clock log (an older table): the newest event time in the states
    old = _engine(models=False)
    old.restore([0], [(k, v) for k, v in table.items() if k != key], 0)
    assert old.clocks[0].watermark(0) == t0 + 1_900_000 - 60_000 and old.positions[0] == {}
    assert orjson.loads(log1)["log"][-1]["t"] == t0 + 1_700_000


# ------------------------------------------------------------------ with identity stitching
def _stitched_events() -> tuple[list[dict], set[str]]:
    """REES46 with every 2nd user (of those with 3+ events) a guest for the first half of its
    events: those carry only an anonymous id (``g<user>``); an identify (both ids) comes at the
    time of its middle event, just before it in the file; the rest carry the user id."""
    from clickpulse.events.contract import normalize
    by_user: dict[str, list[dict]] = {}
    for ev in _EVENTS:
        by_user.setdefault(ev["user_id"], []).append(ev)
    signin: dict[str, dict] = {}
    for uid, evs in by_user.items():
        mid = evs[len(evs) // 2]
        if int(uid) % 2 == 0 and len(evs) >= 3 and mid["timestamp_ms"] > evs[0]["timestamp_ms"]:
            signin[uid] = mid
    out: list[dict] = []
    for ev in _EVENTS:
        uid = ev["user_id"]
        mid = signin.get(uid)
        if mid is None:
            out.append(ev)
        elif ev["timestamp_ms"] < mid["timestamp_ms"]:   # before the sign-in: the guest
            raw = {k: v for k, v in ev.items() if k not in ("user_id", "user_key", "timestamp")}
            out.append(normalize({**raw, "anonymous_id": f"g{uid}", "timestamp": ev["timestamp_ms"]}))
        else:
            if ev is mid:
                out.append(normalize({"type": "identify", "user_id": uid, "anonymous_id": f"g{uid}",
                                      "timestamp": mid["timestamp_ms"], "event_id": f"identify-{uid}"}))
            out.append(ev)
    return out, set(signin)


def _run_stitched(batch: int, partitions: int, stitched: list[dict]):
    from tests.unit.identity_harness import Cluster
    c = Cluster(partitions, engine=_engine(models=False), batch=batch)
    for i in range(0, len(stitched), batch):
        c.send(*stitched[i:i + batch])
    c.flush()
    return c


def _cart(actions: list[dict]) -> list[tuple]:
    return sorted((a["action_id"], a["user_key"], a["event_time_ms"]) for a in actions if a["type"] == "cart_abandoned")


def test_identity_stitching_gives_the_same_carts_for_any_batch_size_and_partition_count():
    stitched, users = _stitched_events()
    assert len(users) >= 20
    runs = {(b, p): _run_stitched(b, p, stitched) for b, p in ((1, 4), (7, 4), (500, 4), (500, 1))}
    ref = runs[(1, 4)]
    assert ref.counter("identity_links", "merged") == len(users)
    for run in runs.values():
        assert _cart(run.actions) == _cart(ref.actions)
        for uid in users:   # the merged state does not depend on when the merge record arrived
            a, b = run.state(uid), ref.state(uid)
            assert (a.windows, a.life.events, a.life.orders, a.life.sessions, a.cart.items, a.merged) == \
                (b.windows, b.life.events, b.life.orders, b.life.sessions, b.cart.items, b.merged)
            assert run.state(f"anon:g{uid}").merged_into == uid
    # and the carts are those of the same replay without guests: as if signed in all along
    plain, _t, _x = _run(500, 4)
    assert _cart(ref.actions) == _cart(plain)
    assert not any(k.startswith("anon:") for _id, k, _t in _cart(ref.actions))


def test_events_forwarded_again_by_the_ingest_are_recognised_by_their_raw_position():
    """Two hops: after a restart the ingest forwards again from its committed raw offsets, so the
    valid topic holds some events twice, at new offsets; the raw position each carries tells."""
    from clickpulse.engine import clock_key
    eng = _engine(models=False)
    assert [eng.redelivered(0, "valid", o, (3, r)) for o, r in ((0, 10), (1, 11), (2, 9), (3, 11), (4, 12))] \
        == [False, False, True, True, False]
    assert eng.redelivered(0, "valid", 5, (2, 0)) is False          # another raw partition
    blob = eng.checkpoint(0, {"valid": 5})
    assert orjson.loads(blob)["log"][-1]["s"] == {"3": 12, "2": 0}
    fresh = _engine(models=False)
    fresh.restore([0], [(clock_key(0, lambda k: 0), blob)], 0)
    assert fresh.redelivered(0, "valid", 6, (3, 12)) is True and fresh.redelivered(0, "valid", 7, (3, 13)) is False
    assert fresh.redelivered(0, "valid", 5) is True and fresh.redelivered(0, "valid", 6) is False
    # a broken clock log never stops a restore
    broken = _engine(models=False)
    broken.restore([0], [(clock_key(0, lambda k: 0),
                          b'{"p": 0, "log": [{"o": {"valid": "x"}, "s": [1], "t": "y"}]}')], 0)
    assert broken.positions[0] == {} and broken.sources[0] == {} and broken.clocks[0].watermark(0) is None
