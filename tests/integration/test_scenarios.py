"""SCENARIOS S1-S4, S7, S8 against the real broker and Redis."""

from __future__ import annotations

import time

import orjson
import pytest
import redis

from clickpulse.runtime import wait_caught_up
from clickpulse.serving.redis_sink import profile_key
from clickpulse.testing import ms
from tests.integration.conftest import assert_topics_match_schemas, cart_actions, produce, topic_values, wait_for

pytestmark = pytest.mark.integration


def now_ms() -> int:
    return int(time.time() * 1000)


def add(user: str, ts: int, eid: str, product="p1", price=19.99):
    return (user, {"event_id": eid, "type": "add_to_cart", "user_id": user, "timestamp": ts,
                   "properties": {"product_id": product, "price": price, "currency": "EUR"}})


LIVE = dict(time_mode="live", cart_abandon_after_s=6, allowed_lateness_s=1, idle_timeout_s=1)


def test_s1_lone_add_to_cart_fires_without_more_traffic(make_settings, workers):
    s = make_settings(**LIVE)
    workers(s)
    t0 = now_ms()
    produce(s, [add("u1", t0, "s1-add")])
    actions = wait_for(lambda: cart_actions(s), 30, "cart_abandoned")
    assert [a["user_key"] for a in actions] == ["u1"] and actions[0]["type"] == "cart_abandoned"
    assert actions[0]["event_time_ms"] == t0 + 6000
    published_ms = ms(actions[0]["created_at"])
    # due 6 s + 1 s allowed lateness, then the next 1 s tick (+ scheduling slack on a busy machine)
    assert 7_000 < published_ms - t0 <= 12_000, published_ms - t0
    time.sleep(4)
    assert len(cart_actions(s)) == 1   # exactly one
    assert_topics_match_schemas(s)


def test_s3_sigkill_with_pending_timer(make_settings, workers):
    s = make_settings(**{**LIVE, "cart_abandon_after_s": 15})
    w = workers(s)
    t0 = now_ms()
    produce(s, [add("u1", t0, "s3-add"), add("u2", t0, "s3-add-2")])
    wait_for(lambda: w.metrics().get("clickpulse_timers_pending") == 2, 20, "two pending timers")
    time.sleep(2)
    w.kill()                                   # SIGKILL, a few seconds after the adds
    assert cart_actions(s) == []
    workers(s)
    actions = wait_for(lambda: len(cart_actions(s)) >= 2 and cart_actions(s),
                       60, "both actions after restart")
    time.sleep(4)
    actions = cart_actions(s)
    assert sorted(a["user_key"] for a in actions) == ["u1", "u2"]       # none lost, none doubled
    assert_topics_match_schemas(s)


def test_s4_bad_input_goes_to_dead_letter_and_stream_survives_restart(make_settings, workers):
    s = make_settings(time_mode="replay")
    w = workers(s)
    t0 = 1_569_924_000_000
    big = {"event_id": "big", "type": "page_view", "user_id": "u1", "timestamp": t0,
           "properties": {"blob": "x" * (2 * 1024 * 1024)}}
    bad = [
        ("k1", b"this is not json"),
        ("k2", b"\xff\xfe\xfd not utf-8"),
        (b"\xff\xfe", orjson.dumps({"event_id": "k", "type": "page_view", "user_id": "u1", "timestamp": t0})),
        ("u1", {"event_id": "p", "type": "add_to_cart", "user_id": "u1", "timestamp": t0,
                "properties": {"price": "abc"}}),
        ("u1", big),
        (None, {"event_id": "n", "type": "page_view", "timestamp": t0}),
    ]
    expected = ["not_json", "not_utf8", "key_not_utf8", "schema", "too_large", "missing_identity"]
    # all on one partition, so the dead-letter order is the input order
    produce(s, [(b"same-key", v if isinstance(v, bytes) else orjson.dumps(v)) if k != b"\xff\xfe" else (k, v)
                for k, v in bad[:2]])
    produce(s, [bad[2]])
    produce(s, [(b"same-key", orjson.dumps(v)) for _k, v in bad[3:]])
    produce(s, [("u9", {"event_id": "ok-1", "type": "page_view", "user_id": "u9", "timestamp": t0})])
    wait_caught_up(w, s)
    dlq = topic_values(s, s.topic_dlq)
    assert sorted(r["reason"] for r in dlq) == sorted(expected)
    for r in dlq:
        assert r["source"]["topic"] == s.topic_raw and r["source"]["offset"] >= 0
    too_large = next(r for r in dlq if r["reason"] == "too_large")
    assert too_large["value_truncated"] and too_large["value_size"] > 2 * 1024 * 1024
    schema_err = next(r for r in dlq if r["reason"] == "schema")
    assert "properties.price" in schema_err["detail"]
    valid = topic_values(s, s.topic_valid)
    assert [e["event_id"] for e in valid] == ["ok-1"]
    m = w.metrics()
    assert m["clickpulse_events_invalid_total{reason=schema}"] == 1
    assert m["clickpulse_events_processed_total{type=page_view}"] == 1
    # a clean restart recovers: nothing re-dead-lettered, new events still processed
    w.stop()
    w2 = workers(s)
    produce(s, [("u9", {"event_id": "ok-2", "type": "page_view", "user_id": "u9", "timestamp": t0 + 1000})])
    wait_caught_up(w2, s)
    assert len(topic_values(s, s.topic_dlq)) == len(expected)
    assert [e["event_id"] for e in topic_values(s, s.topic_valid)] == ["ok-1", "ok-2"]
    assert_topics_match_schemas(s)


def test_s7_s8_duplicates_out_of_order_and_late_in_redis(make_settings, workers):
    s = make_settings(time_mode="replay", allowed_lateness_s=10)
    w = workers(s)
    t = 1_569_924_000_000  # 10:00:00
    purchase = {"event_id": "order-1", "type": "purchase", "user_id": "buyer", "timestamp": t,
                "properties": {"order_id": "o1", "revenue": 120.0, "currency": "EUR"}}
    views = [("viewer", {"event_id": f"v{m}", "type": "page_view", "user_id": "viewer", "timestamp": t + m * 60_000})
             for m in (5, 0, 10)]
    split = [("splitter", {"event_id": f"s{i}", "type": "page_view", "user_id": "splitter", "timestamp": ts})
             for i, ts in enumerate((t + 1_800_000, t))]
    produce(s, [("buyer", purchase), ("buyer", purchase)] + views + split)
    wait_caught_up(w, s, settle_s=2.0)
    r = redis.Redis.from_url(s.redis_url)

    def profile(user):
        raw = r.get(profile_key(s.namespace, user))
        return orjson.loads(raw) if raw else None
    buyer = wait_for(lambda: profile("buyer"), 10, "buyer profile")
    assert buyer["lifetime"]["orders"] == 1 and buyer["lifetime"]["revenue"] == 120.0          # S7
    viewer = wait_for(lambda: profile("viewer"), 10, "viewer profile")
    assert viewer["lifetime"]["sessions"] == 1 and viewer["session"]["duration_s"] == 600.0     # S8
    assert wait_for(lambda: profile("splitter"), 10, "splitter profile")["lifetime"]["sessions"] == 2
    m = w.metrics()
    assert m["clickpulse_events_duplicate_total"] == 1
    # 10:00 view arrives after 10:05 on its partition with 10 s lateness: counted as late
    assert m["clickpulse_events_late_total"] >= 1
    assert_topics_match_schemas(s)


def test_s2_late_event_by_wall_clock_arrival(make_settings, workers):
    """S2 with real arrival times: event times 10:00:50, :58, :59 arrive at 10:00:51, 10:01:05,
    10:01:20 (shifted by whole minutes to now); 1-minute buckets, 10 s allowed lateness."""
    s = make_settings(time_mode="live", allowed_lateness_s=10, idle_timeout_s=5)
    w = workers(s)
    ten_00_51 = 51_000  # offset of 10:00:51 within its minute
    start = ((now_ms() + 5_000 - ten_00_51) // 60_000 + 1) * 60_000 + ten_00_51  # next hh:mm:51 >= 5 s away
    minute = start - ten_00_51
    plan = [(minute + 50_000, start), (minute + 58_000, start + 14_000), (minute + 59_000, start + 29_000)]
    for i, (event_ms, arrive_ms) in enumerate(plan):
        time.sleep(max(0.0, (arrive_ms - now_ms()) / 1000))
        produce(s, [("u-s2", {"event_id": f"s2-{i}", "type": "page_view", "user_id": "u-s2", "timestamp": event_ms})])
    wait_caught_up(w, s)
    assert w.metrics()["clickpulse_events_late_total"] == 1
    r = redis.Redis.from_url(s.redis_url)
    prof = wait_for(lambda: r.get(profile_key(s.namespace, "u-s2")), 10, "profile")
    prof = orjson.loads(prof)
    assert prof["counts"]["page_view"]["5m"] == 2          # the 10:00 minute counts 2
    assert prof["lifetime"]["events"] == 3                   # the late one is not lost


def test_partition_count_mismatch_is_a_clear_error(make_settings):
    import asyncio

    from clickpulse.errors import ConfigError
    from clickpulse.topics import ensure_topics
    s = make_settings()
    with pytest.raises(ConfigError, match="has 4 partitions but .* want 8"):
        asyncio.run(ensure_topics(s.replace(partitions=8)))
