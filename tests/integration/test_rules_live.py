"""Rules in a real worker: hot reload of the rules file mid-stream, a rejected reload, consent
and bots (S9) end to end through Kafka, and the segments topic."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from clickpulse.runtime import wait_caught_up
from tests.integration.conftest import assert_topics_match_schemas, produce, topic_values, wait_for

pytestmark = pytest.mark.integration

T0 = 1_569_924_000_000  # 2019-10-01T10:00:00Z

RULES = """
version: "{version}"
segments:
  - name: viewers
    when: 'count.page_view["24h"] > 0'
    min_size: 1
triggers:
  - name: greet
    on: page_view
    action: {{type: greeting, payload: {{text: '"{text}"', views: 'count.page_view["24h"]'}}}}
    requires_consent: marketing
{extra}
"""


def write(path: Path, version: str, text: str, extra: str = "") -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(RULES.format(version=version, text=text, extra=extra))
    tmp.replace(path)  # atomic, as an editor or a ConfigMap update does


def view(user: str, minute: int, eid: str, **ctx) -> tuple[str, dict]:
    ev = {"event_id": eid, "type": "page_view", "user_id": user, "timestamp": T0 + minute * 60_000}
    if ctx:
        ev["context"] = ctx
    return user, ev


def consent(user: str, minute: int, eid: str, granted: bool) -> tuple[str, dict]:
    return user, {"event_id": eid, "type": "consent", "user_id": user, "timestamp": T0 + minute * 60_000,
                  "properties": {"consent": {"marketing": granted}}}


def greetings(s) -> list[dict]:
    return [a for a in topic_values(s, s.topic_actions) if a["type"] == "greeting"]


def test_hot_reload_mid_stream_consent_and_bots(make_settings, workers, tmp_path):
    rules = tmp_path / "rules.yaml"
    write(rules, "v1", "hello")
    # live mode: held marketing decisions are released by the idle watermark advance; a 2 s bot
    # window keeps the hold (max of the two windows) short
    s = make_settings(time_mode="live", allowed_lateness_s=1, idle_timeout_s=1, bot_cart_window_s=2,
                      bot_events_window_s=2, rules_path=str(rules), rules_poll_s=0.5, assume_consent="")
    w = workers(s)
    assert orjson.loads(w.get("/rules"))["version"].startswith("v1+")

    # u1 consents, u2 never does, the crawler consents but is a bot
    googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    produce(s, [consent("u1", 0, "c1", True), view("u1", 1, "a1"), view("u2", 1, "b1"),
                consent("bot", 0, "c3", True), view("bot", 1, "g1", user_agent=googlebot)])
    wait_caught_up(w, s, settle_s=1.0)
    first = wait_for(lambda: greetings(s), 20, "u1's greeting after its bot hold")
    time.sleep(4)  # more than the hold + idle timeout: nothing else is coming
    first = greetings(s)
    assert [(a["user_key"], a["payload"], a["rules_version"].split("+")[0]) for a in first] == \
        [("u1", {"text": "hello", "views": 1}, "v1")]
    m = w.metrics()
    assert m["clickpulse_rule_decisions_total{outcome=consent,trigger=greet}"] == 1
    assert m["clickpulse_rule_decisions_total{outcome=bot,trigger=greet}"] == 1

    # a new version mid-stream: later decisions carry it; nothing already decided is repeated
    write(rules, "v2", "welcome back")
    wait_for(lambda: orjson.loads(w.get("/rules"))["version"].startswith("v2+"), 15, "rules v2")
    produce(s, [view("u1", 40, "a2"), view("u1", 41, "a3")])  # 40: not met (previous view met) -> no
    wait_caught_up(w, s, settle_s=1.0)
    time.sleep(4)
    # transition-only: the condition (true) was already met at u1's previous page_view
    assert len(greetings(s)) == 1
    produce(s, [view("u3", 42, "d1"), consent("u3", 41, "c4", True)])  # consent arrives after the view
    wait_caught_up(w, s, settle_s=1.0)
    time.sleep(4)
    assert greetings(s)[0]["rules_version"].startswith("v1+")
    assert greetings(s)[1:] == []  # u3's view was decided without consent (outcome consent)

    # an invalid file is rejected: v2 keeps running and the error says where
    bad = RULES.format(version="v3", text="x", extra="").replace("""views: 'count.page_view["24h"]'""",
                                                                 "views: 'cartt.value'")
    assert "cartt" in bad
    rules.write_text(bad)
    status = wait_for(lambda: (lambda r: r if r["error"] else None)(orjson.loads(w.get("/rules"))), 15,
                      "the rejected reload")
    assert status["version"].startswith("v2+") and status["rejected"] == 1
    assert "trigger 'greet'" in status["error"] and "action.payload.views" in status["error"], status["error"]
    assert "cartt" in status["error"]
    produce(s, [consent("u4", 50, "c5", True), view("u4", 51, "e1")])
    wait_caught_up(w, s, settle_s=1.0)
    last = wait_for(lambda: len(greetings(s)) == 2 and greetings(s), 20, "u4's greeting")[-1]
    assert (last["user_key"], last["payload"]["text"], last["rules_version"].split("+")[0]) == \
        ("u4", "welcome back", "v2")
    assert w.metrics()["clickpulse_rules_reloads_total{result=rejected}"] == 1

    # segment changes are published and valid; every action names its trigger and version
    changes = topic_values(s, s.topic_segments)
    assert {(c["user_key"], c["segment"], c["change"]) for c in changes} == \
        {(u, "viewers", "entered") for u in ("u1", "u2", "u3", "u4")}  # a bot is in no segment
    assert all(a["trigger"] == "greet" for a in greetings(s))
    segs = orjson.loads(w.get("/segments"))
    assert segs["segments"]["viewers"]["members"] == 4 and segs["segments"]["viewers"]["active"]
    assert_topics_match_schemas(s)
