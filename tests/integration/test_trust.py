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
