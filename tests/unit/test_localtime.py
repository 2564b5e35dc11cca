"""The site time zone: local days, DST-correct, in windows, category views, rules and once_per."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickpulse.errors import ConfigError
from clickpulse.settings import Settings
from clickpulse.state import localtime
from clickpulse.state.localtime import day_bounds, day_date, local_clock, local_day, set_site_timezone
from clickpulse.state.user import category_views
from clickpulse.state.windows import HOUR_MS
from clickpulse.testing import event, memory_engine, ms

NY = "America/New_York"
HALF_HOUR_MS = 1_800_000


@pytest.fixture(autouse=True)
def _utc_afterwards():
    yield
    set_site_timezone("UTC")


def _every_half_hour(local_date: str, user: str = "u1", etype: str = "page_view") -> list[dict]:
    """One event every 30 minutes of real time across one local day of New York."""
    set_site_timezone(NY)
    start, end = day_bounds(local_day(ms(local_date + "T12:00:00Z")))
    return [event(etype, user, t, event_id=f"{user}-{t}") for t in range(start, end, HALF_HOUR_MS)]


@pytest.mark.parametrize(("date", "hours"), [("2025-03-09", 23), ("2025-11-02", 25), ("2025-06-01", 24)])
def test_a_local_day_across_a_dst_transition_has_its_real_hours(date, hours):
    """One view every 30 minutes across 2025-03-09 in America/New_York: that local day has 23
    hours and 46 views (25 and 50 on the fall-back day), no hour merged or duplicated."""
    events = _every_half_hour(date)
    assert len(events) == 2 * hours
    eng = memory_engine(rules=None, timezone=NY)
    for ev in events:
        eng.process(0, ev, ev["timestamp_ms"])
    st = eng.load("u1")
    day = local_day(events[0]["timestamp_ms"])
    assert day_date(day) == date
    d_ring = st.windows.rings["d"]["page_view"]
    assert d_ring == {day: 2 * hours}
    start, end = day_bounds(day)
    assert (end - start) // HOUR_MS == hours
    # every real hour once, 2 views each (the hour ring keeps the latest 24 hours)
    h_ring = st.windows.rings["h"]["page_view"]
    in_day = {h: n for h, n in h_ring.items() if start // HOUR_MS <= h < end // HOUR_MS}
    assert len(in_day) == min(hours, 24) and set(in_day.values()) == {2}
    assert len({e["timestamp_ms"] // HOUR_MS for e in events}) == hours
    last = events[-1]["timestamp_ms"]
    assert st.windows.count("page_view", "today", last) == 2 * hours
    assert st.windows.count("page_view", "today", end) == 0  # local midnight: a new day
    assert st.windows.count("page_view", "7d", end) == 2 * hours
    # the local clock: the spring-forward day never shows 02:xx, the fall-back day shows 01:xx twice
    local_hours = [local_clock(e["timestamp_ms"])[1] for e in events]
    assert local_hours.count(2) == (0 if hours == 23 else 2)
    assert local_hours.count(1) == (4 if hours == 25 else 2)
    assert {local_clock(e["timestamp_ms"])[0] for e in events} == {date}


def test_day_buckets_differ_from_utc_days():
    """21:00 EST on 2025-01-10 is 02:00 UTC on the 11th: one local day, two UTC days."""
    a, b = ms("2025-01-10T14:00:00Z"), ms("2025-01-11T02:00:00Z")
    set_site_timezone("UTC")
    assert local_day(a) != local_day(b)
    set_site_timezone(NY)
    assert local_day(a) == local_day(b) and day_date(local_day(b)) == "2025-01-10"


def test_category_views_follow_local_days():
    eng = memory_engine(rules=None, timezone="Asia/Tokyo")  # UTC+9, no DST
    for i, at in enumerate(("2025-01-10T14:00:00Z", "2025-01-10T16:00:00Z")):  # 23:00 and 01:00 (next day) JST
        ev = event("product_view", "u1", at, event_id=f"v{i}", product_id=f"p{i}", category="shoes")
        eng.process(0, ev, ev["timestamp_ms"])
    st = eng.load("u1")
    assert category_views(st, ms("2025-01-10T16:00:00Z"), days=1) == {"shoes": 1}  # only today's (JST)
    assert category_views(st, ms("2025-01-10T16:00:00Z"), days=2) == {"shoes": 2}


RULES = """
version: "1"
triggers:
  - name: daily_hello
    on: page_view
    once_per: day
    when: 'event.properties.go == true && local.weekday >= 0'
    action: {type: hello, payload: {date: 'local.date', hour: 'local.hour', today: 'count.page_view["today"]'}}
"""


@pytest.mark.parametrize(("tz", "fires"), [(NY, 2), ("UTC", 1)])
def test_once_per_day_follows_the_local_day(tz, fires):
    """23:00 and 00:10 in New York are two local days (one UTC day): ``once_per: day`` lets the
    trigger fire again after local midnight there, not in UTC; a third firing the same local day
    is blocked in both."""
    eng = memory_engine(rules=RULES, timezone=tz)
    actions = []
    for i, (at, go) in enumerate((("04:00", True), ("04:10", False), ("05:10", True), ("05:20", False),
                                  ("05:30", True))):
        ev = event("page_view", "u1", f"2025-01-11T{at}:00Z", event_id=f"e{i}", go=go)
        actions += eng.process(0, ev, ev["timestamp_ms"])[1]
    assert len(actions) == fires
    first = actions[0]["payload"]
    if tz == NY:
        assert first == {"date": "2025-01-10", "hour": 23, "today": 1}
        assert actions[1]["payload"] == {"date": "2025-01-11", "hour": 0, "today": 1}
    else:
        assert first == {"date": "2025-01-11", "hour": 4, "today": 1}


def test_a_bad_time_zone_is_a_config_error():
    with pytest.raises(ConfigError, match="CLICKPULSE_TIMEZONE"):
        Settings(timezone="Mars/Olympus_Mons")
    with pytest.raises(ConfigError):
        Settings(timezone="../../etc/passwd")
    assert Settings.from_env({"CLICKPULSE_TIMEZONE": "Europe/Berlin"}).timezone == "Europe/Berlin"


ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kathmandu", "America/St_Johns",
         "Pacific/Chatham", "Pacific/Apia", "UTC"]


@settings(max_examples=400, deadline=None)
@given(zone=st.sampled_from(ZONES), t=st.integers(min_value=0, max_value=4_102_444_800_000))
def test_local_day_equals_zoneinfo(zone, t):
    """The cached offsets agree with zoneinfo at any instant 1970-2100, in zones with 30- and
    45-minute offsets, half-hour DST shifts and a skipped day (Apia, 2011-12-30)."""
    set_site_timezone(zone)
    local = datetime.fromtimestamp(t / 1000, UTC).astimezone(ZoneInfo(zone))
    assert day_date(local_day(t)) == local.date().isoformat()
    assert local_clock(t) == (local.date().isoformat(), local.hour, local.weekday())
    start, end = day_bounds(local_day(t))
    assert start <= t < end
    localtime._offsets.clear()  # computed again from scratch: the same answer
    assert day_date(local_day(t)) == local.date().isoformat()
