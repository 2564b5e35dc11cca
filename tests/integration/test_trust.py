"""Trust boundaries against the real broker: a producer of the raw topic cannot close event time."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from clickpulse.events.control import CONTROL_HEADER, CONTROL_SIG_HEADER
from clickpulse.runtime import read_topic
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
    # the gauge is set by the worker's 1 s timer tick: waited for, not read at once (load)
    wait_for(lambda: w.metrics().get("clickpulse_timers_pending") == 1, 30, "one pending cart timer left")

    w.stop()                                                             # a restart restores from the changelog
    w2 = workers(s)
    wait_for(lambda: w2.metrics().get("clickpulse_timers_pending") == 1, 60, "the other user's timer restored")
    assert export_user(s, "victim")["state"] is None
    end_of_input(s)                                                      # only the other cart is abandoned
    actions = wait_for(lambda: cart_actions(s), 60, "the remaining cart_abandoned")
    time.sleep(2)
    assert [a["user_key"] for a in cart_actions(s)] == ["other"]
    assert r.get(profile_key(s.namespace, "victim")) is None


def test_no_user_can_outgrow_a_kafka_message_or_take_others_down(make_settings, workers):
    """Issue #10, second review: 14 valid-looking add_to_cart events of one user, each with a
    60,000-character product_id (each < 64 KB), grew the user's state past Kafka's 1 MB limit;
    the changelog produce failed and the batch's events (other users' too) were lost. Now the
    contract refuses them (``schema``, too long), and the engine's last-resort cap refuses any
    event that would still take a state past CLICKPULSE_MAX_STATE_BYTES (``state_too_large``),
    so nothing oversized reaches the changelog and every other event is processed."""
    from clickpulse.engine.step import CLOCK_KEY_PREFIX
    from clickpulse.state.user import UserState
    cap = 8000
    s = make_settings(time_mode="replay", cart_abandon_after_s=600, max_state_bytes=cap)
    w = workers(s)
    t0 = int(time.time() * 1000)
    big = "p" * 60_000
    recs = []
    for i in range(14):  # the reviewer's input, with other users' events in between
        recs.append(("victim", {"event_id": f"big-{i}", "type": "add_to_cart", "user_id": "victim", "timestamp": t0 + i,
                                "properties": {"product_id": big, "price": 1.0}}))
        recs.append((f"other{i}", {"event_id": f"o-{i}", "type": "add_to_cart", "user_id": f"other{i}",
                                   "timestamp": t0 + i, "properties": {"product_id": "p1", "price": 2.0}}))
    for i in range(40):  # within the contract's limits, but more than the (test-sized) state cap holds
        recs.append(("grower", {"event_id": f"g-{i}", "type": "add_to_cart", "user_id": "grower", "timestamp": t0 + i,
                                "properties": {"product_id": f"{i:03d}" + "x" * 250, "category": "c" * 256,
                                               "price": 1.0}}))
    recs.append(("victim", {"event_id": "ok-1", "type": "add_to_cart", "user_id": "victim", "timestamp": t0 + 100,
                            "properties": {"product_id": "p1", "price": 3.0}}))
    produce(s, recs)

    def dlq() -> list[dict]:
        return topic_values(s, s.topic_dlq)

    def last_grower_cart() -> int | None:
        for k, v, _m in reversed(asyncio.run(read_topic(s.kafka_bootstrap, f"{s.namespace}-worker-users-changelog"))):
            if k == b"grower" and v is not None:
                return len(UserState.from_bytes(v).cart.items)
        return None

    def all_dead_lettered() -> list[dict] | None:
        """The 14 oversized events, and every grower event that did not fit: each of the 40 is
        either in its cart or refused (read again until both topics have all of them: under
        load the DLQ and the changelog fill over seconds, and a first look saw 26 of 34)."""
        r = dlq()
        kept = last_grower_cart()
        too_large = sum(x["reason"] == "state_too_large" for x in r)
        return r if sum(x["reason"] == "schema" for x in r) == 14 and kept is not None and kept + too_large == 40 \
            else None
    records = wait_for(all_dead_lettered, 120, "the 14 oversized events and the state cap's refusals dead-lettered")
    schema = [r for r in records if r["reason"] == "schema"]
    assert all(r["detail"] == "properties.product_id: string of 60000 characters is too long (maxLength 256)"
               for r in schema), schema[0]["detail"]
    refused = [r for r in records if r["reason"] == "state_too_large"]
    assert {r["reason"] for r in records} == {"schema", "state_too_large"}
    assert all(f"above the limit of {cap}" in r["detail"] and "grower" not in r["detail"] for r in refused)
    # every other user (and the victim's valid event, and the grower's events that fit) got through
    users = {"victim", "grower"} | {f"other{i}" for i in range(14)}

    def changelog_with_everyone():
        recs = [r for r in asyncio.run(read_topic(s.kafka_bootstrap, f"{s.namespace}-worker-users-changelog"))
                if not r[0].startswith(CLOCK_KEY_PREFIX)]  # the partitions' clock logs are not users
        return recs if {k.decode() for k, _v, _m in recs} >= users else None
    changelog = wait_for(changelog_with_everyone, 60, "every user's state on the changelog")
    sizes = {}
    for k, v, _m in changelog:
        if v is not None:
            sizes[k.decode()] = max(sizes.get(k.decode(), 0), len(v))
    assert set(sizes) == users
    assert max(sizes.values()) <= cap
    last = {k.decode(): v for k, v, _m in changelog if v is not None}
    grower = UserState.from_bytes(last["grower"])
    assert len(grower.cart.items) + len(refused) == 40
    assert list(UserState.from_bytes(last["victim"]).cart.items) == ["p1"]
    assert w.proc.poll() is None                                       # the worker is alive


def test_a_poisoned_user_is_quarantined_then_repaired_by_its_worker(make_settings, workers):
    """The issue's poisoned user (lifetime revenue stored as null, as an overflow left it) on the
    real broker: its next purchase quarantines the state and it goes on from a fresh one (which
    forgot its opt-out); ``clickpulse quarantine repair`` first re-tries the state as it is (it
    still fails: nothing changes, the audit record says why), then drops the broken totals: the
    owning worker puts the opt-out back, merges the totals, tombstones the quarantine record and
    audits; the user's next events are processed."""
    import os
    import subprocess
    import sys

    from clickpulse.events.schemas import validation_errors
    from clickpulse.privacy import export_user
    from clickpulse.quarantine import quarantined
    from clickpulse.state.user import UserState
    from clickpulse.store import key_partition
    s = make_settings(time_mode="replay")
    w = workers(s)
    t0 = int(time.time() * 1000)

    def ev(eid: str, etype: str, at: int, **props) -> tuple[str, dict]:
        return ("rich", {"event_id": eid, "type": etype, "user_id": "rich", "timestamp": at, "properties": props})
    produce(s, [ev("c1", "consent", t0, consent={"marketing": False}),
                ev("p1", "purchase", t0 + 1000, revenue=250.0, order_id="o1", currency="EUR"),
                ev("p2", "purchase", t0 + 2000, revenue=250.0, order_id="o2", currency="EUR")])
    wait_for(lambda: (export_user(s, "rich")["state"] or {}).get("life", {}).get("orders") == 2, 60,
             "the user's two orders in the changelog")
    w.stop()
    # the poisoned record, as the last changelog value of the user (the previous release's format)
    state = UserState.from_bytes(next(v for k, v, _m in reversed(asyncio.run(read_topic(s.kafka_bootstrap,
                                                                                        s.changelog_topic)))
                                      if k == b"rich"))
    raw = orjson.loads(state.to_bytes_json())
    raw["l"][5] = None
    asyncio.run(_produce_to(s.kafka_bootstrap, s.changelog_topic, b"rich", orjson.dumps(raw),
                            key_partition(b"rich", s.partitions)))
    w2 = workers(s)
    produce(s, [ev("p3", "purchase", t0 + 3000, revenue=5.0, order_id="o3", currency="EUR")])
    rec = wait_for(lambda: quarantined(s).get("rich"), 60, "the user quarantined")
    assert rec["stage"] == "event" and "NoneType" in rec["error"]
    wait_for(lambda: export_user(s, "rich")["state"]["consent"] == {}, 30,
             "the fresh state (it forgot the opt-out) in the changelog")

    env = {**os.environ, **s.env()}

    def repair(*args: str) -> tuple[int, dict]:
        res = subprocess.run([sys.executable, "-m", "clickpulse.cli", "quarantine", "repair", "rich", *args,
                              "--timeout", "90"], env=env, capture_output=True, text=True, timeout=150)
        return res.returncode, orjson.loads(res.stdout)

    code, audit = repair()                                               # as it is: still broken
    assert code == 1 and audit["request"] == "repair" and audit["repair"]["outcome"] == "failed"
    assert "__round__" in audit["repair"]["error"] and validation_errors("privacy_audit", audit) == []
    assert "rich" in quarantined(s)                                      # still quarantined
    code, audit = repair("--drop-field", "life")
    assert code == 0, audit
    assert audit["repair"] == {"outcome": "repaired", "mode": "retry", "drop_fields": ["life"], "error": None,
                               "merged_with_current": True, "quarantined_at": rec["quarantined_at"]}
    assert validation_errors("privacy_audit", audit) == [] and "rich" not in orjson.dumps(audit).decode()
    wait_for(lambda: "rich" not in quarantined(s), 30, "the quarantine record tombstoned")
    st = wait_for(lambda: (x := export_user(s, "rich")["state"]) and x["consent"] and x, 30, "the repaired state")
    assert st["consent"]["marketing"][0] is False                        # the opt-out is back
    assert st["life"]["orders"] == 1 and st["life"]["revenue"] == 5.0    # the totals since the quarantine
    assert w2.metrics().get("clickpulse_users_repaired_total{outcome=repaired}") == 1
    assert w2.metrics().get("clickpulse_users_repaired_total{outcome=failed}") == 1
    # its next events are processed, over the repaired state
    produce(s, [ev("v1", "page_view", t0 + 4000), ev("p4", "purchase", t0 + 5000, revenue=7.0, order_id="o4",
                                                      currency="EUR")])
    st = wait_for(lambda: (x := export_user(s, "rich")["state"]) and x["life"]["orders"] == 2 and x, 60,
                  "the next purchase applied")
    assert st["life"]["revenue"] == 12.0 and st["consent"]["marketing"][0] is False
    assert "rich" not in quarantined(s)


async def _produce_to(bootstrap: str, topic: str, key: bytes, value: bytes, partition: int) -> None:
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        await (await p.send(topic, key=key, value=value, partition=partition))
    finally:
        await p.stop()


# ---------------------------------------------------------------------- issue 10: time is no producer's
def _send_on(s, body: bytes, headers: list, parts) -> None:
    """The same record (value and headers, byte for byte) on each raw partition of ``parts``."""
    from aiokafka import AIOKafkaProducer

    async def go() -> None:
        p = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
        await p.start()
        try:
            for part in parts:
                await (await p.send(s.topic_raw, value=body, headers=headers, partition=part))
        finally:
            await p.stop()
    asyncio.run(go())


def _signed_eoi(s, part: int, run: str) -> tuple[bytes, list]:
    from clickpulse.events.control import control_headers
    body = orjson.dumps({"schema_version": 1, "control": "end_of_input", "source_partition": part,
                         "source_partitions": s.partitions, "run_id": run, "namespace": s.namespace,
                         "issued_at_ms": int(time.time() * 1000)})
    return body, control_headers(s.control_key, body)


def _forged(s) -> list[dict]:
    return [r for r in topic_values(s, s.topic_dlq) if r["reason"] == "forged_control"]


def test_a_captured_end_of_input_ends_no_other_partition_and_not_again_after_a_restart(make_settings, workers):
    """One validly signed end_of_input for raw partition 0, captured and re-published with the same
    body and headers on the other raw partitions, then again on partition 0 after a restart: every
    copy but the first is dead-lettered as forged_control and event time stays open."""
    from clickpulse.runtime import wait_caught_up
    s = make_settings(time_mode="replay", cart_abandon_after_s=600)
    n = s.partitions
    assert n >= 2
    w = workers(s)
    t0 = int(time.time() * 1000)
    produce(s, [("u1", {"event_id": "add-1", "type": "add_to_cart", "user_id": "u1", "timestamp": t0,
                        "properties": {"product_id": "p1", "price": 20.0, "currency": "EUR"}})])
    wait_for(lambda: w.metrics().get("clickpulse_timers_pending") == 1, 30, "the cart's pending timer")
    body, headers = _signed_eoi(s, 0, "captured")
    _send_on(s, body, headers, range(1, n))                        # cross-partition replay
    dlq = wait_for(lambda: len(_forged(s)) >= n - 1 and _forged(s), 60, "the cross-partition copies dead-lettered")
    assert len(dlq) == n - 1 and all("arrived on raw partition" in r["detail"] for r in dlq)
    _send_on(s, body, headers, [0])                                # where it belongs: one source of n ends
    wait_caught_up(w, s, timeout_s=120)
    assert cart_actions(s) == [] and w.metrics().get("clickpulse_timers_pending") == 1
    assert len(_forged(s)) == n - 1

    w.stop()                                                       # restart: in-memory ids are gone
    w2 = workers(s)
    wait_for(lambda: w2.metrics().get("clickpulse_timers_pending") == 1, 60, "the cart's timer restored")
    _send_on(s, body, headers, [0])                                # the captured one, again
    again = wait_for(lambda: _forged(s)[n - 1:], 60, "the replay after the restart dead-lettered")
    assert all("already accepted" in r["detail"] for r in again), again
    # had the replay been accepted, a genuine end of input from the other partitions would close time
    for p in range(1, n):
        _send_on(s, *_signed_eoi(s, p, "run-b"), [p])
    wait_caught_up(w2, s, timeout_s=120)
    assert cart_actions(s) == [] and w2.metrics().get("clickpulse_timers_pending") == 1
    assert w2.metrics().get("clickpulse_control_forged_total", 0) >= 1
    _send_on(s, *_signed_eoi(s, 0, "run-b"), [0])                 # the genuine last one closes it
    actions = wait_for(lambda: cart_actions(s), 60, "cart_abandoned after the genuine end of input")
    assert [a["user_key"] for a in actions] == ["u1"]


def test_a_future_skewed_event_does_not_move_event_time_ahead(make_settings, workers):
    """An event stamped 295 s ahead (inside CLICKPULSE_MAX_FUTURE_SKEW_S, so not clamped) on the
    partition of an open cart: the 20 s cart timer does not fire early, the honest events that
    follow are not late, and the cart fires when real time has passed its due time."""
    from clickpulse.runtime import wait_caught_up
    # 10 s allowed lateness: an honest event reaching the broker a few seconds after its timestamp
    # (a slow producer start on a loaded machine) is not late; 295 s of skew would still make it so
    s = make_settings(time_mode="live", cart_abandon_after_s=20, allowed_lateness_s=10, idle_timeout_s=1,
                      partitions=1)
    w = workers(s)
    t0 = int(time.time() * 1000)
    produce(s, [("u1", {"event_id": "add-1", "type": "add_to_cart", "user_id": "u1", "timestamp": t0,
                        "properties": {"product_id": "p1", "price": 20.0, "currency": "EUR"}})])
    wait_for(lambda: w.metrics().get("clickpulse_timers_pending") == 1, 30, "the cart's pending timer")
    honest = int(time.time() * 1000)
    produce(s, [("skewed", {"event_id": "sk-1", "type": "page_view", "user_id": "skewed",
                            "timestamp": honest + 295_000}),
                ("u3", {"event_id": "h-1", "type": "page_view", "user_id": "u3", "timestamp": honest}),
                ("u4", {"event_id": "h-2", "type": "page_view", "user_id": "u4", "timestamp": honest + 1})])
    wait_caught_up(w, s, timeout_s=120)
    m = w.metrics()
    assert m.get("clickpulse_events_processed_total{type=page_view}") == 3
    assert m.get("clickpulse_events_late_total", 0) == 0            # the honest events count
    assert m.get("clickpulse_events_clock_corrected_total", 0) == 0        # the skewed one was not clamped
    wm = m.get("clickpulse_watermark_seconds")
    assert wm is not None and wm <= time.time() + 1, (wm, time.time())  # never ahead of real time
    early = [a for a in cart_actions(s) if ms_of(a["created_at"]) < t0 + 20_000]
    assert early == [], early
    actions = wait_for(lambda: cart_actions(s), 90, "cart_abandoned once real time passed its due time")
    assert [a["user_key"] for a in actions] == ["u1"] and actions[0]["event_time_ms"] == t0 + 20_000
    assert ms_of(actions[0]["created_at"]) >= t0 + 20_000


def ms_of(rfc3339: str) -> int:
    from datetime import datetime
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)
