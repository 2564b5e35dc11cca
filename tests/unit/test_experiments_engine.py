"""Experiments in the rules and the engine step: variant/holdout actions with a deterministic,
sticky assignment, exposure once per user, conversions attributed in event time inside the
window (and not after it), and the delivery adapter skipping holdout decisions."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from clickpulse.engine import Engine
from clickpulse.experiments.assignment import HOLDOUT
from clickpulse.rules.ruleset import RulesError, parse_rules
from clickpulse.events.schemas import validation_errors
from clickpulse.testing import event, memory_engine, ms

RULES = """
version: "exp-test"
triggers:
  - name: cart_abandonment
    on: {timeout: {after: add_to_cart, no: purchase, within_s: 1800}}
    when: '!cart.empty'
    action:
      type: cart_abandoned
      payload:
        cart: {items: cart.items, value: cart.value, currency: cart.currency}
        offer: '"SAVE5"'
    once_per: episode
    experiment:
      name: cart_offer
      salt: "s1"
      holdout: 0.2
      window_s: 86400
      variants:
        - {name: control, weight: 1}
        - {name: freeship, weight: 1, offer: '"FREESHIP"', delay_s: 600}
"""
T0 = ms("2019-10-01T10:00:00Z")
WALL = T0


def step(eng: Engine, events: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    em = eng.step([(0, e) for e in events], WALL)
    eng.commit(em)
    assert not em.failed
    return list(em.actions), list(em.experiments)


def carts(n: int) -> list[dict[str, Any]]:
    return [event("add_to_cart", f"u{i}", T0 + i, product_id="p1", price=20.0, quantity=1) for i in range(n)]


def test_experiment_actions_are_assigned_flagged_and_exposed_once() -> None:
    rs = parse_rules(RULES)
    exp = rs.experiments["cart_offer"]
    eng = memory_engine(rules=rs)
    n = 300
    actions, records = step(eng, carts(n))
    assert actions == [] and records == []
    # a late clock event moves the watermark past every due time (30 min / 10 min after the adds)
    actions, records = step(eng, [event("page_view", "clock", T0 + 3 * 3600_000)])
    assert len(actions) == n
    arms = {}
    for a in actions:
        assert validation_errors("action", a) == []
        arm = exp.assign(a["user_key"])
        arms[a["user_key"]] = arm
        assert a["experiment"] == "cart_offer" and a["variant"] == arm
        assert a["deliver"] is (arm != HOLDOUT)
        added = T0 + int(a["user_key"][1:])
        if arm == "freeship":
            assert a["payload"]["offer"] == "FREESHIP" and a["event_time_ms"] == added + 600_000
        else:  # control and holdout: the trigger's own payload and delay
            assert a["payload"]["offer"] == "SAVE5" and a["event_time_ms"] == added + 1800_000
    assert {HOLDOUT, "control", "freeship"} == set(arms.values())
    assert 0.1 < sum(v == HOLDOUT for v in arms.values()) / n < 0.3  # share 0.2 (binomial sd 0.023)
    # one exposure record per user, at the decision's event time
    assert sorted(r["user_key"] for r in records) == sorted(arms)
    for r in records:
        assert validation_errors("experiment", r) == []
        assert r["kind"] == "exposure" and r["variant"] == arms[r["user_key"]]
    # a second episode for u0: a new decision, no second exposure
    actions, records = step(eng, [event("purchase", "u0", T0 + 4 * 3600_000, revenue=5.0),
                                  event("add_to_cart", "u0", T0 + 5 * 3600_000, product_id="p2", price=3.0),
                                  event("page_view", "clock", T0 + 8 * 3600_000)])
    assert [a["user_key"] for a in actions] == ["u0"]
    assert [r["kind"] for r in records] == ["conversion"]  # the purchase, inside the window
    assert sum(eng.metrics.experiment_exposures.labels("cart_offer", arm)._value.get()
               for arm in ("holdout", "control", "freeship")) == n
    assert eng.metrics.experiment_converters.labels("cart_offer", arms["u0"])._value.get() == 1


def test_assignment_is_stable_across_engines_and_reloads() -> None:
    first = memory_engine(rules=parse_rules(RULES))
    step(first, carts(50))
    a1, _ = step(first, [event("page_view", "clock", T0 + 3 * 3600_000)])
    # another engine, and the rules file edited (a payload changed, same salt and weights)
    second = memory_engine(rules=parse_rules(RULES.replace('"SAVE5"', '"SAVE10"')))
    step(second, carts(50))
    a2, _ = step(second, [event("page_view", "clock", T0 + 3 * 3600_000)])
    assert {a["user_key"]: a["variant"] for a in a1} == {a["user_key"]: a["variant"] for a in a2}
    # a new salt re-randomizes
    third = memory_engine(rules=parse_rules(RULES.replace('salt: "s1"', 'salt: "s2"')))
    step(third, carts(50))
    a3, _ = step(third, [event("page_view", "clock", T0 + 3 * 3600_000)])
    assert {a["user_key"]: a["variant"] for a in a1} != {a["user_key"]: a["variant"] for a in a3}


def test_conversion_attributed_within_the_window_and_not_after() -> None:
    eng = memory_engine(rules=parse_rules(RULES))
    step(eng, carts(3))
    actions, exposures = step(eng, [event("page_view", "clock", T0 + 3 * 3600_000)])
    at = {r["user_key"]: r["exposure_time_ms"] for r in exposures}
    day = 86_400_000
    _, recs = step(eng, [
        event("purchase", "u0", at["u0"] + day - 1, revenue=40.0),     # last ms of the window: counts
        event("purchase", "u1", at["u1"] + day, revenue=40.0),         # first ms after it: does not
        event("purchase", "u2", at["u2"] - 1000, revenue=40.0),        # before the exposure (late): does not
    ])
    assert [(r["user_key"], r["kind"], r["revenue"]) for r in recs] == [("u0", "conversion", 40.0)]
    assert recs[0]["exposure_time_ms"] == at["u0"]
    assert recs[0]["variant"] == {a["user_key"]: a["variant"] for a in actions}["u0"]
    st = eng.load("u0")
    assert st is not None and st.rules["x"]["cart_offer"][3:] == [1, 40.0]
    # a duplicate of the converting event is not counted twice
    dup = event("purchase", "u0", at["u0"] + 5000, event_id="same", revenue=2.0)
    _, r1 = step(eng, [dup])
    _, r2 = step(eng, [dup])
    assert len(r1) == 1 and r2 == []


def test_experiment_validation_errors() -> None:
    with pytest.raises(RulesError, match="delay_s overrides a timeout"):
        parse_rules(RULES.replace("on: {timeout: {after: add_to_cart, no: purchase, within_s: 1800}}",
                                  "on: add_to_cart").replace("once_per: episode", ""))
    with pytest.raises(RulesError, match="holdout is a share"):
        parse_rules(RULES.replace("holdout: 0.2", "holdout: 1.0"))
    with pytest.raises(RulesError, match="other than 'holdout'"):
        parse_rules(RULES.replace("name: control", "name: holdout"))
    with pytest.raises(RulesError, match="expected a positive number"):
        parse_rules(RULES.replace("weight: 1}", "weight: 0}", 1))
    with pytest.raises(RulesError, match="unknown field 'holdot'"):
        parse_rules(RULES.replace("holdout: 0.2", "holdot: 0.2"))
    two = RULES + RULES.split("triggers:")[1].replace("name: cart_abandonment", "name: other")
    with pytest.raises(RulesError, match="already declared by trigger 'cart_abandonment'"):
        parse_rules(two)


def test_delivery_skips_holdout_actions() -> None:
    from prometheus_client import CollectorRegistry

    from clickpulse.delivery import Deliverer, DeliveryMetrics, Record

    from .test_delivery import FakeRedis, action

    delivered: list[str] = []

    class Sink:
        name = "test"

        async def deliver(self, items: list[Any]) -> list[Any]:
            delivered.extend(it.action_id for it in items)
            return []

    from clickpulse.delivery import DedupStore
    commits: list[dict[int, int]] = []

    async def dead_letter(recs: list[Any]) -> None:
        raise AssertionError("nothing is dead-lettered")

    async def commit(offsets: dict[int, int]) -> None:
        commits.append(offsets)

    metrics = DeliveryMetrics(CollectorRegistry())
    d = Deliverer(Sink(), DedupStore(FakeRedis(), "unit", 60), metrics, dead_letter=dead_letter, commit=commit)
    recs = []
    for i, (arm, deliver) in enumerate([("control", True), (HOLDOUT, False), ("freeship", True), (None, None)]):
        a = action(f"a{i}")
        if arm is not None:
            a.update(experiment="e", variant=arm, deliver=deliver)
        recs.append(Record(0, i, b"u1", orjson.dumps(a), "unit.actions"))
    res = asyncio.run(d.handle(recs))
    assert delivered == ["a0", "a2", "a3"] and res.holdout == 1
    assert commits == [{0: 4}]  # the holdout's offset is committed too
    assert metrics.holdout._value.get() == 1


BANDIT = """
version: "bandit-test"
triggers:
  - name: welcome
    on: product_view
    when: 'count.product_view["7d"] == 1'
    action: {type: welcome_offer, payload: {offer: '"NONE"'}}
    experiment:
      name: welcome_bandit
      holdout: 0.1
      allocation: thompson
      window_s: 3600
      variants:
        - {name: a, offer: '"A"'}
        - {name: b, offer: '"B"'}
"""


def test_thompson_allocation_moves_traffic_and_survives_a_restore() -> None:
    """Users who get b buy, users who get a never do: after a few hundred outcomes almost every
    new user is given b; the holdout keeps its hashed 10%; the engine's per-arm counts are the
    same when rebuilt from the table (restore), and a failed event's rollback counts nothing twice."""
    rs = parse_rules(BANDIT)
    eng = memory_engine(rules=rs)
    arms: dict[str, str] = {}
    t = T0
    for batch in range(20):
        views = [event("product_view", f"u{batch}-{i}", t + i, product_id="p") for i in range(100)]
        _, recs = step(eng, views)
        arms.update({r["user_key"]: r["variant"] for r in recs})
        buys = [event("purchase", r["user_key"], t + 1000, revenue=10.0) for r in recs if r["variant"] == "b"]
        step(eng, buys)
        t += 10_000
    first = [arms[f"u0-{i}"] for i in range(100)]
    last = [arms[f"u19-{i}"] for i in range(100)]
    assert 20 < first.count("a") < 70  # no data yet: about even
    assert last.count("a") <= 5 and last.count("b") >= 80, last
    holdout = sum(v == "holdout" for v in arms.values()) / len(arms)
    assert 0.06 < holdout < 0.14
    counts = eng.arm_counts("welcome_bandit")
    assert counts["b"][1] == counts["b"][0] and counts["a"][1] == 0
    assert sum(n for n, _ in counts.values()) == len(arms) == 2000
    # sticky: an early user exposed to a keeps a, though the counts now favour b
    from clickpulse.rules import triggers
    early = next(u for u, v in arms.items() if v == "a")
    ctx = triggers.RuleContext(rs, arm_counts=eng.arm_counts)
    assert triggers._arm(eng.load(early), rs.experiments["welcome_bandit"], ctx) == "a"
    # a batch with a failing event is re-run event by event: nothing counted twice
    bad = dict(event("product_view", "v-bad", t, product_id="p"))
    bad["timestamp_ms"] = "not a number"
    em = eng.step([(0, event("product_view", "v-new", t, product_id="p")), (0, bad)], WALL)
    eng.commit(em)
    assert len(em.failed) == 1 and len(em.experiments) == 1
    counts = eng.arm_counts("welcome_bandit")
    assert sum(n for n, _ in counts.values()) == 2001
    again = memory_engine(rules=rs)
    again.table.update(eng.table)
    again.restore([0], list(eng.table.items()), WALL)
    assert again.arm_counts("welcome_bandit") == counts
    with pytest.raises(RulesError, match="not with allocation: thompson"):
        parse_rules(RULES.replace("salt: \"s1\"", "salt: \"s1\"\n      allocation: thompson"))
