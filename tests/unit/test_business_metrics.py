"""Business metrics in the stream (clickpulse.metrics.business): hand-computed values on small
streams through the real engine step, and the bundled REES46 sample against an independent
plain-Python computation over the CSV (no clickpulse code but the sample's path)."""

from __future__ import annotations

import csv
from collections import defaultdict
from datetime import UTC, datetime

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clickpulse.engine.emitted import Emitted
from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.metrics.business import (BusinessGauges, BusinessMetrics, from_prometheus, user_view, week_label,
                                         week_of)
from clickpulse.testing import event, memory_engine, ms


def run(events, batch: int = 1, partitions: int = 1, **kw) -> BusinessMetrics:
    eng = memory_engine(rules=None)
    eng.observe_user = user_view
    bm = BusinessMetrics(**kw)
    items = [(hash(e["user_key"]) % partitions, e) for e in events]
    for i in range(0, len(items), batch):
        em = eng.step(items[i:i + batch], 0)
        eng.commit(em)
        bm.observe_emitted(em)
    return bm


def test_engine_without_observer_emits_nothing_extra():
    eng = memory_engine(rules=None)
    em = eng.step([(0, event("page_view"))], 0)
    assert em.observed == []


def test_a_failing_event_adds_nothing_and_the_rest_of_its_batch_counts_once(monkeypatch):
    import clickpulse.engine.step as step_mod
    real_apply = step_mod.apply

    def poisoned(st, ev, *a, **kw):
        if ev["user_key"] == "bad":
            raise ValueError("boom")
        return real_apply(st, ev, *a, **kw)
    monkeypatch.setattr(step_mod, "apply", poisoned)
    evs = [event("page_view", "u1", "2019-10-01T10:00:00Z"), event("page_view", "bad", "2019-10-01T10:00:01Z"),
           event("purchase", "u1", "2019-10-01T10:00:20Z", revenue=5.0)]
    s = run(evs, batch=3).snapshot()  # the batch raises, is rolled back and re-run one by one
    assert (s["sessions"], s["users"], s["customers"], s["engaged_sessions"]) == (1, 1, 1, 1)
    assert s["revenue"] == 5.0 and s["avg_session_duration_s"] == 20.0


def test_hand_computed_sessions_conversion_engagement_clv():
    # u1: session A 10:00:00-10:00:05, two product views (engaged by views), then a purchase of
    #     30 at 10:00:05 (converted); session B one page view at 12:00 (not engaged: 0 s, 1 view)
    # u2: session C 10:00:00-10:00:12, page_view + search (engaged by its 12 s span)
    # u3: session D one product view (not engaged); then session E add_to_cart + purchase 20
    #     (revenue from price x quantity) at 11:00:00 and 11:00:03
    evs = [
        event("product_view", "u1", "2019-10-01T10:00:00Z", product_id="a"),
        event("page_view", "u2", "2019-10-01T10:00:00Z"),
        event("product_view", "u3", "2019-10-01T10:00:01Z", product_id="a"),
        event("product_view", "u1", "2019-10-01T10:00:02Z", product_id="b"),
        event("purchase", "u1", "2019-10-01T10:00:05Z", revenue=30.0),
        event("search", "u2", "2019-10-01T10:00:12Z", query="x"),
        event("add_to_cart", "u3", "2019-10-01T11:00:00Z", product_id="c", price=10.0, quantity=2),
        event("purchase", "u3", "2019-10-01T11:00:03Z", price=10.0, quantity=2),
        event("page_view", "u1", "2019-10-01T12:00:00Z"),
    ]
    for batch in (1, 4, 9):
        s = run(evs, batch=batch).snapshot()
        assert s["sessions"] == 5
        assert s["converted_sessions"] == 2 and s["conversion_rate"] == pytest.approx(2 / 5)
        # durations 5 + 0 + 12 + 0 + 3 = 20 s over 5 sessions
        assert s["avg_session_duration_s"] == pytest.approx(4.0)
        # engaged: A (2 views, purchase), C (12 s), E (purchase) -> 3 of 5
        assert s["engaged_sessions"] == 3 and s["engagement_rate"] == pytest.approx(0.6)
        assert (s["users"], s["customers"], s["orders"]) == (3, 2, 2)
        assert s["revenue"] == pytest.approx(50.0) and s["clv"] == pytest.approx(25.0)
        assert [f["sessions"] for f in s["funnel"]] == [4, 1, 0, 2]  # view, cart, checkout, purchase
        (c,) = s["cohorts"]
        assert c["cohort"] == "2019-09-30" and c["users"] == 3 and c["customers"] == 2
        assert c["clv_per_user"] == pytest.approx(50 / 3) and c["clv_per_customer"] == pytest.approx(25.0)
        assert c["retention"] == [1.0]


def test_ten_seconds_exactly_is_engaged_and_a_duplicate_changes_nothing():
    e1 = event("page_view", "u1", "2019-10-01T10:00:00Z")
    evs = [e1, event("dwell", "u1", "2019-10-01T10:00:10Z", dwell_ms=100), e1,
           event("page_view", "u2", "2019-10-01T10:00:00Z"), event("dwell", "u2", "2019-10-01T10:00:09.999Z",
                                                                   dwell_ms=100)]
    s = run(evs).snapshot()
    assert s["sessions"] == 2 and s["engaged_sessions"] == 1
    assert s["avg_session_duration_s"] == pytest.approx((10 + 9.999) / 2)


def test_weekly_cohort_retention_hand_computed():
    # weeks (Monday UTC): W0 = 2019-09-30, W1 = 2019-10-07, W2 = 2019-10-14
    # cohort W0: a, b, c, d. a active W1 and W2 (twice in W2); b active W2; c active W1; d never
    # cohort W1: e, f. e active W2. f: a purchase of 40 in W2.
    plan = {
        "a": ["2019-10-01T10:00:00Z", "2019-10-08T10:00:00Z", "2019-10-15T10:00:00Z", "2019-10-16T10:00:00Z"],
        "b": ["2019-10-02T10:00:00Z", "2019-10-14T00:00:00Z"],
        "c": ["2019-10-06T23:59:59Z", "2019-10-07T00:00:00Z"],
        "d": ["2019-10-03T10:00:00Z"],
        "e": ["2019-10-09T10:00:00Z", "2019-10-17T10:00:00Z"],
        "f": ["2019-10-10T10:00:00Z"],
    }
    evs = [event("page_view", u, t) for u, ts in plan.items() for t in ts]
    evs.append(event("purchase", "f", "2019-10-18T10:00:00Z", revenue=40.0))
    evs.sort(key=lambda e: e["timestamp_ms"])
    s = run(evs, batch=3, partitions=3).snapshot()
    by = {c["cohort"]: c for c in s["cohorts"]}
    assert list(by) == ["2019-09-30", "2019-10-07"]
    w0, w1 = by["2019-09-30"], by["2019-10-07"]
    assert w0["users"] == 4 and w0["active"] == [4, 2, 2] and w0["retention"] == [1.0, 0.5, 0.5]
    # the cohort W1 has reached only one more week; e and f (by its purchase) were active in it
    assert w1["users"] == 2 and w1["active"] == [2, 2] and w1["retention"] == [1.0, 1.0]
    assert w1["revenue"] == 40.0 and w1["clv_per_user"] == 20.0 and w1["customers"] == 1
    assert w0["revenue"] == 0 and w0["clv_per_customer"] is None


def test_cohorts_are_capped_oldest_dropped():
    evs = [event("page_view", f"u{k}", ms("2019-10-01T10:00:00Z") + k * 7 * 86_400_000) for k in range(6)]
    bm = run(evs, max_cohorts=3, max_weeks=2)
    s = bm.snapshot()
    assert [c["cohort"] for c in s["cohorts"]] == [week_label(week_of(evs[k]["timestamp_ms"])) for k in (3, 4, 5)]
    assert s["users"] == 6  # the totals keep every user
    # an event of a user whose cohort was dropped changes no cohort
    more = BusinessMetrics(max_cohorts=1)
    eng = memory_engine(rules=None)
    eng.observe_user = user_view
    for e in [event("page_view", "old", "2019-10-01T10:00:00Z"), event("page_view", "new", "2019-10-09T10:00:00Z"),
              event("page_view", "old", "2019-10-10T10:00:00Z")]:
        em = eng.step([(0, e)], 0)
        eng.commit(em)
        more.observe_emitted(em)
    (c,) = more.snapshot()["cohorts"]
    assert c["cohort"] == "2019-10-07" and c["active"] == [1]
    with pytest.raises(ValueError):
        BusinessMetrics(max_cohorts=0)


def test_lift_from_the_experiment_counters_and_arms_capped():
    bm = BusinessMetrics(max_arms=3)
    em = Emitted()
    em.count("experiment_exposures", "x", "holdout", n=200)
    em.count("experiment_converters", "x", "holdout", n=10)
    em.count("experiment_exposures", "x", "chat", n=400)
    em.count("experiment_converters", "x", "chat", n=30)
    em.count("experiment_revenue", "x", "chat", n=99.0)  # not a count of users: ignored
    bm.observe_emitted(em)
    em2 = Emitted()
    em2.count("experiment_exposures", "x", "discount", n=100)
    em2.count("experiment_exposures", "y", "other", n=100)  # a 4th arm: over the cap
    bm.observe_emitted(em2)
    rows = {(r["experiment"], r["variant"]): r for r in bm.snapshot()["experiments"]}
    assert set(rows) == {("x", "holdout"), ("x", "chat"), ("x", "discount")}
    assert rows[("x", "holdout")]["lift"] is None
    assert rows[("x", "chat")]["conversion_rate"] == pytest.approx(0.075)
    assert rows[("x", "chat")]["lift"] == pytest.approx(0.075 / 0.05 - 1)
    assert rows[("x", "discount")]["lift"] == pytest.approx(-1.0)


def test_gauges_and_scrape_round_trip():
    evs = [event("product_view", "u1", "2019-10-01T10:00:00Z"), event("purchase", "u1", "2019-10-01T10:00:20Z",
                                                                      revenue=12.5),
           event("page_view", "u2", "2019-10-08T10:00:00Z")]
    bm = run(evs)
    em = Emitted()
    em.count("experiment_exposures", "x", "holdout", n=10)
    em.count("experiment_converters", "x", "holdout", n=1)
    em.count("experiment_exposures", "x", "t", n=10)
    em.count("experiment_converters", "x", "t", n=2)
    bm.observe_emitted(em)
    reg = CollectorRegistry()
    g = BusinessGauges(reg)
    snap = bm.snapshot()
    g.set(snap)
    samples = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    back = from_prometheus(samples)
    assert back["sessions"] == 2 and back["conversion_rate"] == 0.5 and back["clv"] == 12.5
    assert back["funnel"] == {"view": 2, "add_to_cart": 0, "checkout": 0, "purchase": 1}
    assert back["cohorts"]["2019-09-30"] == {"users": 1, "clv": 12.5, "retention": {0: 1.0, 1: 0.0}}
    assert back["cohorts"]["2019-10-07"] == {"users": 1, "clv": 0.0, "retention": {0: 1.0}}
    assert back["lift"] == {"x/t": pytest.approx(1.0)}
    assert not any("u1" in k or "u2" in k for k in samples)  # no user in any label
    # a cohort dropped later disappears from the gauges
    bm.cohorts.pop(min(bm.cohorts))
    g.set(bm.snapshot())
    assert "2019-09-30" not in generate_latest(reg).decode()


# ------------------------------------------------------------------------------------------
# REES46: the stream against a second, independent computation over the CSV

def independent_rees46(gap_s: int = 1800) -> dict:
    """Plain Python over the CSV: a row identical to an earlier row of the same user is a
    duplicate; sessions split where a user's gap is >= gap_s; view -> page/product view,
    cart -> add to cart, purchase revenue = price."""
    with open(BUNDLED_SAMPLE, encoding="utf-8") as fh:
        header = fh.readline()
        lines = [ln.rstrip("\r\n") for ln in fh if ln.strip()]
    cols = next(csv.reader([header]))
    by_user: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    for ln in lines:
        r = dict(zip(cols, next(csv.reader([ln])), strict=True))
        u = r["user_id"]
        if ln in seen[u]:
            continue
        seen[u].add(ln)
        t = int(datetime.strptime(r["event_time"], "%Y-%m-%d %H:%M:%S %Z").replace(tzinfo=UTC).timestamp() * 1000)
        by_user[u].append((t, r["event_type"], float(r["price"] or 0)))
    sessions = converted = engaged = 0
    duration = 0
    steps = {"view": 0, "add_to_cart": 0, "checkout": 0, "purchase": 0}
    revenue, customers = 0.0, 0
    cohort_users: dict[str, set[str]] = defaultdict(set)
    cohort_active: dict[tuple[str, int], set[str]] = defaultdict(set)
    cohort_revenue: dict[str, float] = defaultdict(float)
    monday = datetime(1970, 1, 5, tzinfo=UTC).timestamp() * 1000
    for u, evs in by_user.items():
        evs.sort()
        week = [int((t - monday) // (7 * 86_400_000)) for t, _e, _p in evs]
        cohort = week[0]
        cohort_users[str(cohort)].add(u)
        for w in week:
            cohort_active[(str(cohort), w - cohort)].add(u)
        groups: list[list[tuple[int, str, float]]] = [[evs[0]]]
        for prev, cur in zip(evs, evs[1:]):
            if cur[0] - prev[0] >= gap_s * 1000:
                groups.append([])
            groups[-1].append(cur)
        for g in groups:
            types = [e for _t, e, _p in g]
            span = g[-1][0] - g[0][0]
            sessions += 1
            duration += span
            bought = "purchase" in types
            converted += bought
            engaged += span >= 10_000 or bought or types.count("view") >= 2
            steps["view"] += "view" in types
            steps["add_to_cart"] += "cart" in types
            steps["purchase"] += bought
        spent = sum(p for _t, e, p in evs if e == "purchase")
        revenue += spent
        cohort_revenue[str(cohort)] += spent
        customers += any(e == "purchase" for _t, e, _p in evs)
    return {"sessions": sessions, "converted": converted, "duration_ms": duration, "engaged": engaged,
            "steps": steps, "revenue": revenue, "customers": customers, "users": len(by_user),
            "cohorts": {c: (len(us), cohort_revenue[c], [len(cohort_active[(c, k)]) for k in range(12)])
                        for c, us in cohort_users.items()}}


@pytest.mark.parametrize("batch", [1, 64])
def test_rees46_stream_equals_an_independent_computation(batch):
    evs = [parse(orjson.dumps(raw), None) for raw in read_rees46(BUNDLED_SAMPLE)]
    eng = memory_engine()  # the default rules too: what the worker runs
    eng.observe_user = user_view
    bm = BusinessMetrics()
    for i in range(0, len(evs), batch):
        em = eng.step([(int(e["user_id"]) % 4, e) for e in evs[i:i + batch]], 0)
        eng.commit(em)
        bm.observe_emitted(em)
    s = bm.snapshot()
    exp = independent_rees46()
    assert s["sessions"] == exp["sessions"] == 1753  # the demo's figure
    assert s["converted_sessions"] == exp["converted"]
    assert s["conversion_rate"] == pytest.approx(exp["converted"] / exp["sessions"])
    assert s["avg_session_duration_s"] == pytest.approx(exp["duration_ms"] / 1000 / exp["sessions"])
    assert s["engaged_sessions"] == exp["engaged"]
    assert {f["step"]: f["sessions"] for f in s["funnel"]} == exp["steps"]
    assert s["users"] == exp["users"] and s["customers"] == exp["customers"]
    assert s["revenue"] == pytest.approx(exp["revenue"]) and s["clv"] == pytest.approx(exp["revenue"] / exp["customers"])
    (c,) = s["cohorts"]
    users, rev, active = exp["cohorts"][str(week_of(s["first_event_ms"]))]
    assert (c["users"], c["revenue"]) == (users, pytest.approx(rev, abs=0.01))
    assert c["active"] == active[:len(c["active"])] and len(c["active"]) == 1
    # the figures, so a change in the sample or the definitions shows up here
    assert (exp["converted"], exp["engaged"], exp["customers"]) == (48, 989, 48)
