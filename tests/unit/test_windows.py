"""Window counters: hand cases and a property test against a brute-force count."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from clickpulse.state.clock import PartitionClock
from clickpulse.state.windows import SPANS, Windows

BASE = 1_569_888_000_000  # 2019-10-01T00:00:00Z, a whole day


def brute(events: list[tuple[str, int]], etype: str, span: str, at: int) -> int:
    _ring, width, n = SPANS[span]
    hi = at // width
    return sum(1 for t, ts in events if t == etype and hi - n < ts // width <= hi)


def test_bucket_boundaries():
    w = Windows()
    w.add("v", BASE + 59_999)          # minute 0
    w.add("v", BASE + 60_000)          # minute 1
    w.add("v", BASE + 5 * 60_000)      # minute 5
    assert w.count("v", "5m", BASE + 5 * 60_000) == 2   # minutes 1..5
    assert w.count("v", "5m", BASE + 4 * 60_000 + 1) == 2  # minutes 0..4
    assert w.count("v", "1h", BASE + 5 * 60_000) == 3
    assert w.count("v", "24h", BASE + 86_399_999) == 3
    assert w.count("v", "24h", BASE + 86_400_000 * 2) == 0
    assert w.count("v", "7d", BASE + 6 * 86_400_000) == 3
    assert w.count("v", "7d", BASE + 7 * 86_400_000) == 0
    assert w.count("other", "5m", BASE) == 0


def test_pruning_bounds_the_record():
    w = Windows()
    for i in range(10_000):
        w.add("v", BASE + i * 30_000)   # every 30 s for ~3.5 days
    assert len(w.rings["m"]["v"]) <= 60 and len(w.rings["h"]["v"]) <= 24 and len(w.rings["d"]["v"]) <= 7
    assert w.count("v", "1h", BASE + 9_999 * 30_000) == brute([("v", BASE + i * 30_000) for i in range(10_000)],
                                                               "v", "1h", BASE + 9_999 * 30_000)


def test_serialization_roundtrip():
    w = Windows()
    for i in range(50):
        w.add("a" if i % 2 else "b", BASE + i * 700_000)
    w2 = Windows.from_obj(w.to_obj())
    assert w2.counts(BASE + 50 * 700_000) == w.counts(BASE + 50 * 700_000)


LATENESS_MS = 120_000


@st.composite
def arrivals(draw):
    """Events over ~10 days delivered in a random order in which no event is more than
    LATENESS_MS behind the newest event delivered before it: each event gets a random
    delivery delay in [0, LATENESS_MS] and events are delivered by time + delay."""
    times = draw(st.lists(st.integers(0, 10 * 86_400_000), min_size=1, max_size=120))
    n = len(times)
    types = draw(st.lists(st.sampled_from(["v", "c", "p"]), min_size=n, max_size=n))
    delays = draw(st.lists(st.integers(0, LATENESS_MS), min_size=n, max_size=n))
    events = sorted(zip(types, times, delays, strict=True), key=lambda e: e[1] + e[2])
    return [(t, BASE + ts) for t, ts, _d in events]


@settings(max_examples=300, deadline=None)
@given(arrivals(), st.integers(0, 8 * 86_400_000))
def test_counts_equal_brute_force_for_any_order_within_lateness(delivered, query_after_max):
    w = Windows()
    clock = PartitionClock(LATENESS_MS, 5000, live=False)
    kept = []
    for etype, ts in delivered:
        wm = clock.watermark()
        late = wm is not None and ts < wm
        if not late:
            w.add(etype, ts)
            kept.append((etype, ts))
        clock.observe(ts, 0)
    assert len(kept) == len(delivered), "generator must stay within the allowed lateness"
    newest = max(ts for _t, ts in delivered)
    for at in (newest, newest + query_after_max):
        for etype in ("v", "c", "p"):
            for span in SPANS:
                assert w.count(etype, span, at) == brute(delivered, etype, span, at), (etype, span, at)


def test_out_of_order_buckets_stay_in_order_and_wire_round_trips():
    w = Windows()
    for ts in (BASE + 10 * 60_000, BASE + 3 * 60_000, BASE + 7 * 60_000, BASE - 86_400_000):
        w.add("v", ts)
    assert all(list(b) == sorted(b) for ring in w.rings.values() for b in ring.values())
    back = Windows.from_wire(copy.deepcopy(w.to_wire()))
    assert back == w and back.counts(BASE + 11 * 60_000) == w.counts(BASE + 11 * 60_000)
    assert Windows.from_obj(w.to_obj()) == w
    assert Windows.from_wire(Windows().to_wire()) == Windows()
    w.add("product_view", BASE)   # a type of the vocabulary is stored under its code
    assert w.to_wire().keys() == {"v", 1} and w.rings["d"] == {"v": {18169: 1, 18170: 3}, "product_view": {18170: 1}}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 90 * 86_400_000), min_size=1, max_size=80), st.integers(0, 86_400_000))
def test_counts_over_months_equal_brute_force(times, after):
    times = sorted(times)
    w = Windows()
    for ts in times:
        w.add("v", BASE + ts)
    assert len(w.rings["m"]["v"]) <= 60 and len(w.rings["h"]["v"]) <= 24 and len(w.rings["d"]["v"]) <= 7
    at = BASE + times[-1] + after
    for span in SPANS:
        assert w.count("v", span, at) == brute([("v", BASE + ts) for ts in times], "v", span, at), span
