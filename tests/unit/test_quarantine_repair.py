"""``Engine.repair_step``: a quarantined user's state put back (``clickpulse quarantine repair``)."""

from __future__ import annotations

import base64

import orjson

from clickpulse.engine.step import merge_consent, merge_lifetimes
from clickpulse.state.user import Lifetime
from clickpulse.testing import event, memory_engine


def _poisoned():
    """The issue's poisoned user: lifetime revenue stored as null (an overflow left it so), with
    a consent decision and two orders; its next purchase quarantines the state."""
    eng = memory_engine(live=False)
    eng.process(0, event("consent", user="rich", at="2019-10-01T09:00:00Z", consent={"marketing": False}), 0)
    for i, at in enumerate(("2019-10-01T10:00:00Z", "2019-10-01T10:05:00Z")):
        eng.process(0, event("purchase", user="rich", revenue=250.0, order_id=f"o{i}", at=at), 0)
    raw = orjson.loads(eng.load("rich").to_bytes_json())   # the previous release's format, still read
    raw["l"][5] = None                                       # revenue: null
    eng.table[b"rich"] = orjson.dumps(raw)
    eng._cache.clear()
    em = eng.step([(0, event("purchase", user="rich", revenue=5.0, order_id="o9", at="2019-10-01T11:00:00Z"))], 0)
    assert em.failed == [] and "rich" in em.quarantined
    eng.commit(em)
    return eng, base64.b64decode(em.quarantined["rich"]["state_b64"])


def test_retry_of_a_state_that_still_fails_changes_nothing():
    eng, old = _poisoned()
    before = eng.table[b"rich"]
    em, summary = eng.repair_step("rich", 0, old, "retry", (), 0)
    assert summary["outcome"] == "failed" and "__round__" in summary["error"]   # what the profile flush hit
    assert em.changed == {} and eng.table[b"rich"] == before
    assert em.counters[("users_repaired", ("failed",))] == 1


def test_reset_keeps_the_lifetime_totals_it_is_given():
    """...unless they are the broken part: then a reset fails and says so (drop them, below)."""
    eng, old = _poisoned()
    em, summary = eng.repair_step("rich", 0, old, "reset", (), 0)
    assert summary["outcome"] == "failed" and "__round__" in summary["error"]   # what the profile flush hit


def test_dropping_the_broken_part_puts_the_history_back_and_the_user_goes_on():
    eng, old = _poisoned()
    current = eng.load("rich")
    assert current.life.orders == 1 and current.consent == {}            # the fresh state forgot the opt-out
    em, summary = eng.repair_step("rich", 0, old, "reset", ["life"], 0)
    assert summary == {"outcome": "repaired", "mode": "reset", "drop_fields": ["life"], "error": None,
                       "merged_with_current": True}
    eng.commit(em)
    st = eng.load("rich")
    assert st.consent["marketing"][0] is False                           # the opt-out is back
    assert st.life.orders == 1 and st.life.revenue == 5.0                # the totals since the quarantine
    assert eng.metrics.users_repaired.labels("repaired")._value.get() == 1
    eng.process(0, event("page_view", user="rich", at="2019-10-01T11:01:00Z"), 0)   # and it goes on
    assert eng.load("rich").life.events == 2


def test_retry_after_a_fix_restores_the_behavioral_state_and_sums_the_totals():
    """A state that now decodes and processes (here: one the running code never had a problem
    with, standing for "after a code fix") comes back whole; the totals of the events since the
    quarantine are added."""
    eng = memory_engine(live=False)
    eng.process(0, event("consent", user="u", at="2019-10-01T09:00:00Z", consent={"marketing": False}), 0)
    eng.process(0, event("add_to_cart", user="u", product_id="p", price=5.0, at="2019-10-01T09:10:00Z"), 0)
    eng.process(0, event("purchase", user="u", revenue=40.0, order_id="o1", at="2019-10-01T09:20:00Z"), 0)
    saved = eng.table[b"u"]
    del eng.table[b"u"]                                                  # as after a quarantine: a fresh state
    eng._cache.clear()
    eng.restore([0], list(eng.table.items()), 0)
    eng.process(0, event("purchase", user="u", revenue=10.0, order_id="o2", at="2019-10-01T12:00:00Z"), 0)
    eng.process(0, event("consent", user="u", at="2019-10-01T12:01:00Z", consent={"marketing": True}), 0)
    em, summary = eng.repair_step("u", 0, saved, "retry", (), 0)
    assert summary["outcome"] == "repaired" and summary["merged_with_current"]
    eng.commit(em)
    st = eng.load("u")
    assert st.life.orders == 2 and st.life.revenue == 50.0 and st.life.events == 5
    assert st.consent["marketing"][0] is True                            # the later decision wins
    assert st.life.first_ms < st.life.last_ms


def test_a_foreign_or_garbage_state_is_refused():
    eng, old = _poisoned()
    assert eng.repair_step("someone-else", 0, old, "reset", ["life"], 0)[1]["outcome"] == "failed"
    assert eng.repair_step("rich", 0, b"\x00garbage", "retry", (), 0)[1]["error"]
    assert "cannot drop" in eng.repair_step("rich", 0, old, "retry", ["key"], 0)[1]["error"]
    assert "unknown repair mode" in eng.repair_step("rich", 0, old, "nuke", (), 0)[1]["error"]


def test_merge_helpers():
    a = Lifetime(first_ms=10, last_ms=20, events=2, sessions=1, orders=1, revenue=5.0, last_wall_ms=1)
    b = Lifetime(first_ms=30, last_ms=40, events=3, sessions=2, orders=0, revenue=1.5, last_wall_ms=2)
    m = merge_lifetimes(a, b)
    assert (m.first_ms, m.last_ms, m.events, m.sessions, m.orders, m.revenue, m.last_wall_ms) == (10, 40, 5, 3, 1, 6.5, 2)
    assert merge_consent({"marketing": [False, 5], "analytics": [True, 1]}, {"marketing": [True, 9]}) \
        == {"marketing": [True, 9], "analytics": [True, 1]}
    assert merge_consent({"marketing": [False, 9]}, {"marketing": [True, 5]}) == {"marketing": [False, 9]}
