"""Trust boundaries against the real broker: a producer of the raw topic cannot close event time."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from clickpulse.events.control import CONTROL_HEADER, CONTROL_SIG_HEADER
from tests.integration.conftest import _produce_partitioned, cart_actions, end_of_input, produce, topic_values, wait_for

pytestmark = pytest.mark.integration


def test_forged_end_of_input_is_dead_lettered_and_closes_nothing(make_settings, workers):
    # replay mode: only events (or a genuine end of input) move event time
    s = make_settings(time_mode="replay", cart_abandon_after_s=600)
    w = workers(s)
    t0 = int(time.time() * 1000)
    produce(s, [("u1", {"event_id": "add-1", "type": "add_to_cart", "user_id": "u1", "timestamp": t0,
                        "properties": {"product_id": "p1", "price": 20.0, "currency": "EUR"}})])
    wait_for(lambda: w.metrics().get("clickpulse_timers_pending") == 1, 30, "the cart's pending timer")
    body = orjson.dumps({"schema_version": 1, "control": "end_of_input", "source_partition": 0,
                         "source_partitions": 1})
    forged = []
    for p in range(s.partitions):  # header alone, then a made-up signature, on every raw partition
        forged.append((None, body, [(CONTROL_HEADER, b"end_of_input")]))
    asyncio.run(_produce_partitioned(s, forged))
    asyncio.run(_produce_partitioned(s, [(None, body, [(CONTROL_HEADER, b"end_of_input"),
                                                       (CONTROL_SIG_HEADER, b"00" * 32)])
                                         for _ in range(s.partitions)]))
    dlq = wait_for(lambda: [r for r in topic_values(s, s.topic_dlq) if r["reason"] == "forged_control"]
                   if len(topic_values(s, s.topic_dlq)) >= 2 * s.partitions else None, 60, "forged control dead-lettered")
    assert len(dlq) == 2 * s.partitions
    assert all("signature" in r["detail"] for r in dlq)
    time.sleep(3)
    assert cart_actions(s) == []                                   # event time was not closed
    assert w.metrics().get("clickpulse_timers_pending") == 1
    assert w.metrics().get("clickpulse_control_forged_total") == 2 * s.partitions
    end_of_input(s)                                                # the signed one does close it
    actions = wait_for(lambda: cart_actions(s), 60, "cart_abandoned after the signed end of input")
    assert [a["user_key"] for a in actions] == ["u1"]


def test_erasure_leaves_nothing_even_after_a_restart(make_settings, workers):
    import redis

    from clickpulse.privacy import export_user, request_erase
    from clickpulse.serving.redis_sink import profile_key
    s = make_settings(time_mode="replay", cart_abandon_after_s=600)
    w = workers(s)
    t0 = int(time.time() * 1000)

    def add(user: str, eid: str) -> tuple[str, dict]:
        return (user, {"event_id": eid, "type": "add_to_cart", "user_id": user, "timestamp": t0,
                       "properties": {"product_id": "p1", "price": 20.0, "currency": "EUR"}})
    produce(s, [add("victim", "v1"), add("other", "o1"),
                ("victim", {"event_id": "v2", "type": "identify", "user_id": "victim", "timestamp": t0 + 1,
                            "properties": {"traits": {"plan": "gold"}}})])
    r = redis.Redis.from_url(s.redis_url)
    wait_for(lambda: r.get(profile_key(s.namespace, "victim")), 60, "the victim's profile in Redis")
    wait_for(lambda: w.metrics().get("clickpulse_timers_pending") == 2, 30, "two pending cart timers")
    before = export_user(s, "victim")
    assert before["state"] is not None and before["profile"]["traits"]["plan"] == "gold"

    audit = request_erase(s, "victim", timeout_s=90)
    assert audit["removed"]["state"] is True and audit["removed"]["timers"] == 1
    assert "victim" not in orjson.dumps(audit).decode()                  # the audit keeps only a hash
    # request_erase returns once the profile key is gone (the audit is published when the deletion is queued)
    assert r.get(profile_key(s.namespace, "victim")) is None
    after = export_user(s, "victim")
    assert after["state"] is None and after["profile"] is None and after["quarantine"] is None
    assert w.metrics().get("clickpulse_timers_pending") == 1

    w.stop()                                                             # a restart restores from the changelog
    w2 = workers(s)
    wait_for(lambda: w2.metrics().get("clickpulse_timers_pending") == 1, 60, "the other user's timer restored")
    assert export_user(s, "victim")["state"] is None
    end_of_input(s)                                                      # only the other cart is abandoned
    actions = wait_for(lambda: cart_actions(s), 60, "the remaining cart_abandoned")
    time.sleep(2)
    assert [a["user_key"] for a in cart_actions(s)] == ["other"]
    assert r.get(profile_key(s.namespace, "victim")) is None
