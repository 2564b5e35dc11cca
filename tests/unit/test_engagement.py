"""Engagement score (decay, arrival order, weights, contributors) and engagement tiers (unit tier)."""

from __future__ import annotations

import itertools
import pickle
import random

import pytest

from clickpulse.errors import ConfigError
from clickpulse.features.engagement import (
    ACTIVE_SIGNALS,
    DEFAULT_WEIGHTS,
    PASSIVE_SIGNALS,
    EngagementConfig,
    signals,
    top_contributors,
    update,
    value,
)
from clickpulse.models.tiers import TIERS, EngagementTiers, session_features
from clickpulse.state.user import Session
from clickpulse.testing import event, ms

HOUR = "2019-10-01T{:02d}:00:00Z"
CFG = EngagementConfig(half_life_s=3600)  # 1 h half-life: hand arithmetic stays small


def _fold(events, cfg=CFG):
    s: dict = {}
    for e in events:
        s = update(s, e, cfg)
    return s


def test_decay_matches_hand_computation():
    evs = [event("add_to_cart", at=HOUR.format(10)),                       # 5 points at 10:00
           event("search", at=HOUR.format(11)),                            # 3 points at 11:00
           event("page_view", dwell_ms=240_000, at="2019-10-01T11:30:00Z"),  # 0.5 + 4 min × 0.5 = 2.5 at 11:30
           event("scroll_depth", scroll_pct=50, at="2019-10-01T11:30:00Z")]   # scroll_50: 0.25 at 11:30
    s = _fold(evs)
    # at 12:00, half-life 1 h:
    #   add_to_cart 5    × 2^-2   = 1.25
    #   search      3    × 2^-1   = 1.5
    #   page_view   0.5  × 2^-0.5 = 0.35355339...
    #   dwell       2.0  × 2^-0.5 = 1.41421356...
    #   scroll_50   0.25 × 2^-0.5 = 0.17677669...
    #   total = 2.75 + 2.75 × 2^-0.5 = 2.75 + 1.94454365... = 4.69454365...
    expected = 2.75 + 2.75 * 2 ** -0.5
    assert value(s, ms(HOUR.format(12)), CFG) == pytest.approx(expected, abs=1e-12)
    assert abs(expected - 4.694543648) < 1e-9
    # one more half-life halves it; a time before the state's own time does not inflate it
    assert value(s, ms(HOUR.format(13)), CFG) == pytest.approx(expected / 2, abs=1e-12)
    assert value(s, ms(HOUR.format(9)), CFG) == pytest.approx(value(s, ms("2019-10-01T11:30:00Z"), CFG))
    # the stored total is the sum of the stored contributions
    assert s["v"] == pytest.approx(sum(s["c"].values()), abs=1e-12)
    assert s["t"] == ms("2019-10-01T11:30:00Z")


def test_default_half_life_is_a_week():
    cfg = EngagementConfig()
    s = update({}, event("purchase", at="2019-10-01T00:00:00Z"), cfg)
    assert value(s, ms("2019-10-08T00:00:00Z"), cfg) == pytest.approx(DEFAULT_WEIGHTS["purchase"] / 2)


def test_any_arrival_order_gives_the_same_value():
    evs = [event("product_view", at="2019-10-01T10:00:00Z"),
           event("add_to_cart", at="2019-10-01T10:07:00Z"),
           event("page_view", dwell_ms=90_000, at="2019-10-01T09:13:00Z"),
           event("scroll_depth", scroll_pct=100, at="2019-10-01T12:41:00Z"),
           event("hover", at="2019-10-01T10:07:00Z"),
           event("remove_from_cart", at="2019-10-01T13:00:00Z"),  # no signal: must not move the state's time
           event("purchase", at="2019-10-02T08:00:00Z")]
    at = ms("2019-10-02T09:00:00Z")
    ref = _fold(evs)
    ref_top = top_contributors(ref, at, CFG, k=10)
    for perm in itertools.permutations(evs):  # 5040 orders
        s = _fold(perm)
        assert abs(value(s, at, CFG) - value(ref, at, CFG)) < 1e-9
        assert s["t"] == ref["t"] == ms("2019-10-02T08:00:00Z")
        assert top_contributors(s, at, CFG, k=10) == ref_top


def test_update_is_pure_and_ignores_events_without_signal():
    s0 = update({}, event("search", at=HOUR.format(10)), CFG)
    snapshot = {"t": s0["t"], "v": s0["v"], "c": dict(s0["c"])}
    s1 = update(s0, event("purchase", at=HOUR.format(11)), CFG)
    assert s0 == snapshot and s1 is not s0
    assert update(s1, event("identify", at=HOUR.format(12)), CFG) is s1
    assert update({}, event("consent", at=HOUR.format(12)), CFG) == {}
    assert value({}, 0, CFG) == 0.0 and top_contributors({}, 0, CFG) == []


def test_active_signals_weigh_more_than_passive_ones():
    w = DEFAULT_WEIGHTS
    assert set(ACTIVE_SIGNALS) | set(PASSIVE_SIGNALS) == set(w)
    assert min(w[s] for s in ACTIVE_SIGNALS) > max(w[s] for s in PASSIVE_SIGNALS)
    at = ms(HOUR.format(10))
    one = {etype: value(update({}, event(etype, at=HOUR.format(10)), CFG), at, CFG)
           for etype in ("add_to_cart", "purchase", "search", "click", "product_click", "form_submit",
                         "checkout_start", "page_view", "product_view", "hover")}
    for active in ("add_to_cart", "purchase", "search", "click", "product_click", "form_submit", "checkout_start"):
        for passive in ("page_view", "product_view", "hover"):
            assert one[active] > one[passive] > 0
    # a minute of dwell and a scroll milestone are passive too
    assert one["click"] > value(update({}, event("dwell", dwell_ms=60_000, at=HOUR.format(10)), CFG), at, CFG) > 0
    assert one["click"] > value(update({}, event("scroll_depth", scroll_pct=100, at=HOUR.format(10)), CFG), at, CFG) > 0


def test_scroll_milestones_dwell_cap_and_weight_overrides():
    cfg = EngagementConfig(weights={"scroll_100": 1.0})
    assert [signals(event("scroll_depth", scroll_pct=p), cfg) for p in (10, 25, 74.9, 100)] == [
        [], [("scroll_25", 0.25)], [("scroll_50", 0.25)], [("scroll_100", 1.0)]]
    assert cfg.weights["search"] == DEFAULT_WEIGHTS["search"]  # overrides merge over the defaults
    # an 8-hour dwell (background tab) earns at most max_dwell_s = 10 min × 0.5
    assert signals(event("dwell", dwell_ms=8 * 3_600_000), EngagementConfig()) == [("dwell", 5.0)]
    # odd property values (the contract rejects them; a hand-built dict may not) give no dwell
    for odd in (True, "60000", float("inf")):
        assert signals({"type": "page_view", "properties": {"dwell_ms": odd}}, EngagementConfig()) == [("page_view", 0.5)]
    for bad in ({"weights": {"search": -1}}, {"half_life_s": 0}, {"max_dwell_s": float("nan")}):
        with pytest.raises(ConfigError):
            EngagementConfig(**bad)


def test_top_contributors():
    evs = [event("add_to_cart", at=HOUR.format(8)),         # 5 at 08:00 -> 5/16 = 0.3125 at 12:00
           *(event("page_view", at=HOUR.format(12)) for _ in range(3)),  # 3 × 0.5 = 1.5 at 12:00
           event("search", at=HOUR.format(11)),             # 3 at 11:00 -> 1.5 at 12:00
           event("hover", at=HOUR.format(12))]              # 0.1
    s = _fold(evs)
    at = ms(HOUR.format(12))
    assert top_contributors(s, at, CFG) == [["page_view", 1.5], ["search", 1.5], ["add_to_cart", 0.3125]]
    assert top_contributors(s, at, CFG, k=1) == [["page_view", 1.5]]
    assert top_contributors(s, at, CFG, k=10)[-1] == ["hover", 0.1]
    # long after, everything has decayed to 0 at 4 decimals and nothing is listed
    assert top_contributors(s, ms("2019-10-03T12:00:00Z"), CFG) == []


# -- tiers -----------------------------------------------------------------------------------

def _session(level: str, rng: random.Random) -> dict[str, float]:
    """Session features of three well-separated behaviours."""
    minutes, counts = {"low": (1, {"page_view": 2}),
                       "medium": (12, {"page_view": 6, "product_view": 5, "search": 1}),
                       "high": (45, {"page_view": 15, "product_view": 12, "search": 3, "add_to_cart": 3,
                                     "checkout_start": 1, "purchase": 1})}[level]
    counts = {k: max(0, v + rng.randint(-1, 1)) for k, v in counts.items()}
    s = Session(0, int(minutes * 60_000 * rng.uniform(0.8, 1.2)), events=sum(counts.values()), counts=counts,
                max_scroll_pct=rng.choice((0.0, 50.0, 100.0)), dwell_ms=rng.randint(0, 120_000))
    return session_features(s)


def _data(seed: int = 7, n: int = 150) -> list[tuple[str, dict[str, float]]]:
    rng = random.Random(seed)
    rows = [(lvl, _session(lvl, rng)) for _ in range(n) for lvl in TIERS]
    rng.shuffle(rows)
    return rows


def _trained(rows, seed=3) -> EngagementTiers:
    m = EngagementTiers(seed=seed)
    for _lvl, x in rows:
        m.learn(x)
    return m


def test_tiers_order_well_separated_sessions():
    rows = _data()
    m = _trained(rows)
    assert m.examples == len(rows) and m.version == f"tiers-kmeans-{len(rows)}"
    assert all(m.tier(x) == lvl for lvl, x in rows)
    c = m.centers()
    assert c["high"]["engagement"] > c["medium"]["engagement"] > c["low"]["engagement"]
    assert set(m.names().values()) == set(TIERS)


def test_tiers_deterministic_for_a_seed():
    rows = _data()
    a, b = _trained(rows, seed=11), _trained(rows, seed=11)
    assert [a.tier(x) for _l, x in rows] == [b.tier(x) for _l, x in rows]
    assert a.centers() == b.centers()


def test_tiers_before_warm_start_and_odd_features():
    m = EngagementTiers(warmup=30)
    assert m.tier({"engagement": 3.0}) == "medium"  # nothing learned yet
    for e in range(10):
        m.learn({"engagement": float(e)})
    assert not m.initialised and m.centers() == {}
    assert [m.tier({"engagement": e}) for e in (0.5, 4.5, 9.5)] == ["low", "medium", "high"]
    rows = _data(n=20)
    for _lvl, x in rows:
        m.learn(x)
    # missing, unknown, bool and NaN values do not raise
    for x in ({}, {"engagement": float("nan")}, {"new_feature": 1.0, "events": True}):
        assert m.tier(x) in TIERS
    for bad in ({"halflife": 0}, {"warmup": 2}, {"engagement_key": "nope"}):
        with pytest.raises(ConfigError):
            EngagementTiers(**bad)


def test_tiers_pickle_round_trip():
    rows = _data()
    m = _trained(rows[:200])
    m2 = EngagementTiers.from_bytes(m.to_bytes())
    assert [m2.tier(x) for _l, x in rows] == [m.tier(x) for _l, x in rows]
    for _lvl, x in rows[200:]:  # both keep learning identically
        m.learn(x)
        m2.learn(x)
    assert m2.centers() == m.centers() and m2.examples == m.examples
    with pytest.raises(TypeError):
        EngagementTiers.from_bytes(pickle.dumps({"not": "a model"}))
