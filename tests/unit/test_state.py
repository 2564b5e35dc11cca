"""Per-user state transitions: sessions (S8), cart episodes, duplicates (S7), late events (S2)."""

from __future__ import annotations

import itertools

import pytest

from clickpulse.events.schemas import validation_errors
from clickpulse.rules import triggers
from clickpulse.rules.ruleset import load_rules
from clickpulse.settings import Settings
from clickpulse.state.user import StateConfig, UserState, apply
from clickpulse.testing import event, ms

CFG = StateConfig(session_gap_ms=1_800_000, dedup_ids_per_user=32)
# cart abandonment is the default rules' cart_abandonment trigger (30 min, once per episode)
CTX = triggers.RuleContext(load_rules(Settings().rules_file), assumed_consent=frozenset({"marketing"}),
                           created_at="2026-01-01T00:00:00.000Z")


def run(events, wm=None, st=None):
    st = st or UserState(key="u1")
    for e in events:
        res = apply(st, e, wm, CFG)
        triggers.on_event(st, e, res.late, wm, CTX)
    return st


def cart_due(st):
    return st.rules.get("t", {}).get("cart_abandonment", {}).get("due")


def fire_due(st, wm, created="2026-01-01T00:00:00.000Z"):
    ctx = triggers.RuleContext(CTX.ruleset, assumed_consent=CTX.assumed_consent, created_at=created)
    return [a for a in triggers.on_timers(st, wm, ctx).actions if a["type"] == "cart_abandoned"]


@pytest.mark.parametrize("order", list(itertools.permutations(["10:05", "10:00", "10:10"])))
def test_out_of_order_views_make_one_ten_minute_session(order):
    st = run([event("page_view", at=f"2019-10-01T{t}:00Z") for t in order])
    assert st.life.sessions == 1
    assert st.session.start_ms == ms("2019-10-01T10:00:00Z") and st.session.duration_ms == 600_000


@pytest.mark.parametrize("order", [("10:00:00.000", "10:30:00.000"), ("10:30:00.000", "10:00:00.000")])
def test_exact_gap_splits_in_either_order(order):
    st = run([event("page_view", at=f"2019-10-01T{t}Z") for t in order])
    assert st.life.sessions == 2


def test_just_under_the_gap_is_one_session_in_either_order():
    for order in (("10:00:00.000", "10:29:59.999"), ("10:29:59.999", "10:00:00.000")):
        assert run([event("page_view", at=f"2019-10-01T{t}Z") for t in order]).life.sessions == 1


def test_late_event_goes_to_previous_session():
    st = run([event("page_view", at="2019-10-01T10:00:00Z"), event("page_view", at="2019-10-01T11:00:00Z"),
              event("page_view", at="2019-10-01T10:05:00Z")])
    assert st.life.sessions == 2
    assert st.prev_session.duration_ms == 300_000 and st.session.events == 1


def test_cart_add_remove_and_value():
    st = run([event("add_to_cart", product_id="p1", price=10.0, quantity=2, currency="EUR"),
              event("add_to_cart", product_id="p2", price=5.5, at="2019-10-01T10:01:00Z"),
              event("remove_from_cart", product_id="p1", quantity=1, at="2019-10-01T10:02:00Z")])
    assert {p: i.quantity for p, i in st.cart.items.items()} == {"p1": 1, "p2": 1}
    assert st.cart.value == 15.5 and st.cart.currency == "EUR"
    assert cart_due(st) == ms("2019-10-01T10:31:00Z")  # last add_to_cart + 30 min


def test_an_emptied_cart_fires_nothing():
    st = run([event("add_to_cart", product_id="p1"), event("remove_from_cart", product_id="p1",
                                                           at="2019-10-01T10:01:00Z")])
    assert st.cart.items == {}
    assert fire_due(st, ms("2019-10-02T00:00:00Z")) == []  # the rule's condition is '!cart.empty'
    assert cart_due(st) is None


def test_any_purchase_closes_the_episode():
    # S10 second user: adds one product, buys another
    st = run([event("add_to_cart", product_id="4804056", at="2019-10-01T00:11:00Z"),
              event("purchase", product_id="4802036", price=171.56, at="2019-10-01T00:12:14Z")])
    assert cart_due(st) is None and st.life.orders == 1 and st.life.revenue == 171.56


def test_purchase_before_a_later_add_keeps_the_later_item():
    st = run([event("add_to_cart", product_id="a", at="2019-10-01T10:00:00Z"),
              event("add_to_cart", product_id="b", at="2019-10-01T10:20:00Z"),
              event("purchase", at="2019-10-01T10:10:00Z")])  # arrives late
    assert list(st.cart.items) == ["b"] and cart_due(st) == ms("2019-10-01T10:50:00Z")


def test_purchase_exactly_at_due_time_counts_as_within():
    st = run([event("add_to_cart", product_id="a", at="2019-10-01T10:00:00Z")])
    assert fire_due(st, ms("2019-10-01T10:30:00Z"), "2026-01-01T00:00:00Z") == []  # wm not past due
    run([event("purchase", at="2019-10-01T10:30:00Z")], ms("2019-10-01T10:30:00Z"), st)
    assert fire_due(st, ms("2019-10-02T00:00:00Z"), "2026-01-01T00:00:00Z") == []


def test_fire_due_once_with_deterministic_id_and_valid_schema():
    st = run([event("add_to_cart", product_id="p1", price=29.51, currency="USD", at="2019-10-01T00:05:14Z")])
    copy = UserState.from_bytes(st.to_bytes())
    acts = fire_due(st, ms("2019-10-01T00:35:15Z"), "2026-01-01T00:00:00.000Z")
    assert len(acts) == 1 and validation_errors("action", acts[0]) == []
    assert acts[0]["event_time"] == "2019-10-01T00:35:14.000Z"
    assert acts[0]["payload"]["cart"] == {"items": [{"product_id": "p1", "quantity": 1, "price": 29.51,
                                                     "category": None}], "value": 29.51, "currency": "USD",
                                          "last_update": "2019-10-01T00:05:14.000Z"}
    assert acts[0]["trigger"] == "cart_abandonment" and acts[0]["rules_version"] == CTX.ruleset.version
    assert "no purchase within 1800 s after add_to_cart at 2019-10-01T00:05:14.000Z" in acts[0]["reason"]
    assert fire_due(st, ms("2019-10-02T00:00:00Z"), "x") == []   # fired once
    again = fire_due(copy, ms("2019-10-01T00:35:15Z"), "2026-01-01T00:00:01.000Z")
    assert again[0]["action_id"] == acts[0]["action_id"]  # re-processing -> same id


def test_duplicate_purchase_counted_once():
    p = event("purchase", price=100.0, event_id="order-1")
    st = UserState(key="u1")
    assert not apply(st, p, None, CFG).duplicate
    assert apply(st, dict(p), None, CFG).duplicate
    assert st.life.orders == 1 and st.life.revenue == 100.0 and st.life.events == 1


def test_dedup_memory_is_bounded():
    st = run([event("page_view", event_id=f"e{i}") for i in range(100)])
    assert len(st.recent_ids) == CFG.dedup_ids_per_user


def test_late_event_not_in_windows_but_in_lifetime():
    st = UserState(key="u1")
    apply(st, event("page_view", at="2019-10-01T10:00:50Z"), None, CFG)
    res = apply(st, event("page_view", at="2019-10-01T10:00:30Z"), ms("2019-10-01T10:00:40Z"), CFG)
    assert res.late
    assert st.windows.count("page_view", "5m", ms("2019-10-01T10:01:00Z")) == 1
    assert st.life.events == 2 and st.life.first_ms == ms("2019-10-01T10:00:30Z")


def test_state_roundtrip_and_size():
    events = [event("product_view", product_id=f"p{i}", at=f"2019-10-01T10:{i:02d}:00Z") for i in range(20)]
    events += [event("add_to_cart", product_id="p1", price=12.5, currency="USD", at="2019-10-01T10:30:00Z")]
    st = run(events)
    data = st.to_bytes()
    assert UserState.from_bytes(data).to_bytes() == data
    assert len(data) < 1500, len(data)


def test_profile_matches_schema():
    st = run([event("add_to_cart", product_id="p1", price=3.0, currency="USD"), event("identify", traits={"country": "DE"})])
    prof = st.profile()
    assert validation_errors("profile", prof) == []
    assert prof["traits"]["country"] == "DE" and prof["cart"]["value"] == 3.0


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(hst.permutations([("add_to_cart", "a", 0), ("add_to_cart", "b", 5), ("purchase", None, 10),
                         ("add_to_cart", "c", 15), ("add_to_cart", "a", 20), ("purchase", None, 3)]))
def test_cart_outcome_is_the_same_in_any_arrival_order(order):
    st = run([event(t, product_id=p, at=ms("2019-10-01T10:00:00Z") + m * 60_000) if p else
              event(t, at=ms("2019-10-01T10:00:00Z") + m * 60_000) for t, p, m in order])
    assert {p: i.quantity for p, i in st.cart.items.items()} == {"c": 1, "a": 1}
    assert cart_due(st) == ms("2019-10-01T10:50:00Z")


def _late(st, e, wm):
    res = apply(st, e, wm, CFG)
    return res, triggers.on_event(st, e, res.late, wm, CTX)


def test_late_add_never_arms_a_timer_that_is_already_due():
    st = UserState(key="u1")
    res, out = _late(st, event("add_to_cart", product_id="p1", at="2019-10-01T10:00:00Z"), ms("2026-01-01T00:00:00Z"))
    assert res.late and out.timer_skipped_late == 1 and cart_due(st) is None and list(st.cart.items) == ["p1"]
    # a late add whose window is still open arms normally
    st2 = UserState(key="u2")
    res2, out2 = _late(st2, event("add_to_cart", product_id="p1", at="2019-10-01T10:00:00Z"), ms("2019-10-01T10:01:00Z"))
    assert res2.late and out2.timer_skipped_late == 0 and cart_due(st2) == ms("2019-10-01T10:30:00Z")


def test_engagement_score_on_the_profile_decays_with_event_time():
    st = run([event("product_view", product_id="p1", at="2019-10-01T10:00:00Z"),
              event("add_to_cart", product_id="p1", price=5.0, at="2019-10-01T10:01:00Z")])
    now = st.profile(ms("2019-10-01T10:01:00Z"))
    week_later = st.profile(ms("2019-10-08T10:01:00Z"))
    assert validation_errors("profile", now) == []
    assert now["engagement"]["top"][0][0] == "add_to_cart"          # active above passive
    assert abs(week_later["engagement"]["score"] - now["engagement"]["score"] / 2) < 0.01   # 7-day half-life
    assert UserState.from_bytes(st.to_bytes()).profile(ms("2019-10-01T10:01:00Z"))["engagement"] == now["engagement"]
