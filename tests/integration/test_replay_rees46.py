"""The REES46 sample through the real broker: actions vs an independent computation (S10-S12),
schemas on every topic, Redis profiles, and a SIGKILL restart that neither loses nor doubles."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis

from clickpulse.events.schemas import validation_errors
from clickpulse.ingest.datasets import BUNDLED_SAMPLE
from clickpulse.ingest.replay import messages, publish
from clickpulse.runtime import wait_caught_up
from clickpulse.serving.redis_sink import profile_key
from tests.integration.conftest import assert_topics_match_schemas, cart_actions, end_of_input, topic_values
from tests.oracle import independent_abandoned_users

pytestmark = pytest.mark.integration


def replay(settings, flush=False):
    return asyncio.run(publish(settings.kafka_bootstrap, settings.topic_raw, messages("rees46", BUNDLED_SAMPLE),
                               flush=flush))


def test_replay_without_flush_then_kill_restart_and_flush(make_settings, workers):
    s = make_settings(time_mode="replay")
    w = workers(s)
    assert replay(s).published == 4999
    wait_caught_up(w, s)
    actions = cart_actions(s)
    assert [a["user_key"] for a in actions] == ["550121407"]           # S11, and S12: nothing else yet
    assert {a["user_key"] for a in actions} == independent_abandoned_users(flush=False)
    m = w.metrics()
    assert m["clickpulse_events_duplicate_total"] == 3
    assert sum(v for k, v in m.items() if k.startswith("clickpulse_events_processed_total{")) == 4996

    # Redis profiles are written behind the stream
    r = redis.Redis.from_url(s.redis_url)
    prof = orjson.loads(r.get(profile_key(s.namespace, "524325294")))
    assert validation_errors("profile", prof) == []
    assert prof["lifetime"]["orders"] == 1 and prof["cart"]["items"] == []

    # crash and restart: state comes back from the changelog, nothing is re-fired
    w.kill()
    w2 = workers(s)
    end_of_input(s)                                                      # replay --flush, after the restart
    wait_caught_up(w2, s)
    actions = cart_actions(s)
    users = [a["user_key"] for a in actions]
    assert len(users) == len(set(users)) == len({a["action_id"] for a in actions})
    assert set(users) == independent_abandoned_users(flush=True)
    assert "524325294" not in users and "533624186" not in users       # S10
    counts = assert_topics_match_schemas(s)
    assert counts[s.topic_dlq] == 0


def test_replay_with_flush_yields_pending_carts(make_settings, workers):
    s = make_settings(time_mode="replay")
    w = workers(s)
    replay(s, flush=True)
    wait_caught_up(w, s)
    actions = cart_actions(s)
    assert {a["user_key"] for a in actions} == independent_abandoned_users(flush=True)
    assert len(actions) == 24
    by_user = {a["user_key"]: a for a in actions}
    cart = by_user["536415846"]["payload"]["cart"]
    assert cart["items"] == [{"product_id": "1004833", "quantity": 3, "price": 174.76, "category": "electronics.smartphone"}] or cart["items"][0]["quantity"] == 3
    assert_topics_match_schemas(s)
