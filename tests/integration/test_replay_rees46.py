"""The REES46 sample through the real broker: actions vs an independent computation (S10-S12),
schemas on every topic, Redis profiles, and a SIGKILL restart that neither loses nor doubles.

The default rules' cart_abandoned and assistance_offer actions are compared, user and event time
one for one, with tests/oracle.py's plain-Python model of the documented semantics, on the
partitions Kafka's murmur2 partitioner gives the users (the watermark is per partition)."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest
import redis

from clickpulse.events.schemas import validation_errors
from clickpulse.ingest.datasets import BUNDLED_SAMPLE
from clickpulse.ingest.replay import messages, publish
from clickpulse.runtime import read_topic, wait_caught_up
from clickpulse.serving.redis_sink import profile_key
from clickpulse.testing import default_rules
from clickpulse.topics import CONTROL_HEADER
from tests.integration.conftest import assert_topics_match_schemas, cart_actions, end_of_input, topic_values
from tests.oracle import expected_actions_by_type, independent_abandoned_users, kafka_partition

pytestmark = pytest.mark.integration


def replay(settings, flush=False):
    return asyncio.run(publish(settings.kafka_bootstrap, settings.topic_raw, messages("rees46", BUNDLED_SAMPLE),
                               flush=flush, control_key=settings.control_key))


RULE_TRIGGERS = {"cart_abandoned": "cart_abandonment", "assistance_offer": "browse_abandonment"}


def assert_rule_actions_match_oracle(settings, flush: bool) -> None:
    """The cart_abandoned and assistance_offer actions on the actions topic are exactly the
    oracle's (user, event time), none twice; every rule action names its trigger and the rules
    version, and every event was processed on the partition the oracle assumes."""
    valid = asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_valid))
    wrong = [(orjson.loads(v)["user_key"], m["partition"]) for _k, v, m in valid
             if not any(h[0] == CONTROL_HEADER for h in m["headers"])
             and m["partition"] != kafka_partition(orjson.loads(v)["user_key"], settings.partitions)]
    assert wrong == [], f"events not on the murmur2 partition of their user: {wrong[:5]}"
    actions = topic_values(settings, settings.topic_actions)
    expected = expected_actions_by_type(flush, lambda u: kafka_partition(u, settings.partitions),
                                        round(settings.allowed_lateness_ms / 1000))
    counts = Counter(a["type"] for a in actions)
    for typ, trigger in RULE_TRIGGERS.items():
        got = sorted((a["user_key"], a["event_time_ms"]) for a in actions if a["type"] == typ)
        assert got == expected[typ], (f"{typ} (flush={flush}): {len(got)} on the topic, {len(expected[typ])} expected "
                                      f"(all actions {dict(counts)}); topic only "
                                      f"{sorted(Counter(got) - Counter(expected[typ]))[:10]}, oracle only "
                                      f"{sorted(Counter(expected[typ]) - Counter(got))[:10]}")
        assert {a["trigger"] for a in actions if a["type"] == typ} <= {trigger}
    rules = default_rules()
    by_type = {trig.action.type: trig.name for trig in rules.triggers}
    bad = [a for a in actions if a["type"] in by_type
           and (a["trigger"], a["rules_version"]) != (by_type[a["type"]], rules.version)]
    assert bad == [], f"rule actions without their trigger or rules version: {bad[:3]}"
    assert all(a["model_version"] for a in actions if a["type"] not in by_type)  # the rest: model actions
    assert len({a["action_id"] for a in actions}) == len(actions)


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
    assert_rule_actions_match_oracle(s, flush=False)

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
    assert_rule_actions_match_oracle(s, flush=True)                     # nothing lost or doubled
    counts = assert_topics_match_schemas(s)
    assert counts[s.topic_dlq] == 0, [(r["reason"], r["detail"]) for r in topic_values(s, s.topic_dlq)]


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
    assert_rule_actions_match_oracle(s, flush=True)
    assert_topics_match_schemas(s)
