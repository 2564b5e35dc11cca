"""The stated delivery guarantee (docs/delivery.md) on the real broker and Redis.

* A worker SIGKILLed in the middle of the REES46 replay, then restarted: every action a run
  without a crash produces is on the actions topic at least once, with the same content (only
  ``created_at`` may differ), and every duplicate is its first copy except ``created_at`` and
  ``payload.recommendations`` (from the publishing worker's in-memory model).
* ``clickpulse deliver --sink jsonl`` running through all of it (and restarted once) writes each
  action id exactly once, the bytes of its first copy.
* ``--sink webhook``: duplicates are POSTed once, a refused action lands on ``<ns>.actions.dlq``
  with its status, the offsets are committed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis

from clickpulse.delivery import dlq_topic, group_id, run
from clickpulse.errors import ServiceError
from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.ingest.replay import messages, publish
from clickpulse.runtime import committed_offsets, end_offsets, free_port, read_topic, wait_caught_up
from clickpulse.testing import memory_engine
from tests.integration.conftest import end_of_input, wait_for
from tests.oracle import comparable_action, expected_actions_by_type, kafka_partition

pytestmark = pytest.mark.integration

MODEL_TYPES = {"high_intent", "churn_risk"}  # the models' actions (none here: no trainer, no model)
CREATED_AT = re.compile(rb'"created_at":"[^"]*"')


def crash_free_actions(partitions: int) -> list[dict]:
    """The actions of a run without a crash: the in-memory engine over the sample on Kafka's
    murmur2 partitions, then end_of_input on every partition (what the test sends)."""
    eng = memory_engine(live=False)  # the default rules, marketing consent assumed
    out = []
    for raw in read_rees46(BUNDLED_SAMPLE):
        ev = parse(orjson.dumps(raw), None)
        out += eng.process(kafka_partition(ev["user_key"], partitions), ev, 0)[1]
    for p in range(partitions):
        for src in range(partitions):
            out += eng.end_of_input(p, src, partitions, 0)
    return out


class Adapter:
    """A ``clickpulse deliver --sink jsonl`` subprocess."""

    def __init__(self, settings, out: Path, log_path: Path) -> None:
        self.settings, self.out, self.log_path = settings, out, log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Adapter:
        env = {**os.environ, **self.settings.env()}
        with self.log_path.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "clickpulse.cli", "--log-level", "info", "deliver", "--sink", "jsonl",
                 "--out", str(self.out), "--metrics-port", str(self.port)],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or b"clickpulse deliver ready" in self.log_path.read_bytes(),
                 90, "the delivery adapter to start")
        assert self.proc.poll() is None, self.log_path.read_text()
        return self

    def metrics(self) -> dict[str, float]:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(f"http://{self.settings.web_host}:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else ""):
                s.value for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"the adapter did not stop on SIGTERM; log {self.log_path}") from None


def adapter_caught_up(s) -> bool:
    ends = asyncio.run(end_offsets(s.kafka_bootstrap, s.topic_actions))
    done = asyncio.run(committed_offsets(s.kafka_bootstrap, group_id(s)))
    return all(done.get((s.topic_actions, p), 0) >= end for p, end in ends.items())


def lost_where(s, lost: list[dict], committed: dict) -> str:
    """Where the events that fired the lost event-triggered actions are on the valid topic,
    relative to the worker's committed offsets at the SIGKILL."""
    valid = asyncio.run(read_topic(s.kafka_bootstrap, s.topic_valid))
    at = {}
    for _k, v, m in valid:
        ev = orjson.loads(v)
        if "user_key" in ev:
            at.setdefault((ev["user_key"], ev.get("timestamp_ms")), (m["partition"], m["offset"]))
    where = Counter()
    for a in lost:
        pos = at.get((a["user_key"], a["event_time_ms"]))
        if pos is None:
            where["timer"] += 1
        else:
            c = committed.get((s.topic_valid, pos[0]), 0)
            where["event before the committed offset" if pos[1] < c else "event re-read after the restart"] += 1
    return ", ".join(f"{n} {k}" for k, n in where.items())


def processed_everything(w, s) -> bool:
    """The worker has handled every message on the input topics (its /progress offsets, not its
    commits)."""
    try:
        prog = w.progress()["topics"]
    except OSError:
        return False
    for topic in (s.topic_raw, s.topic_valid):
        ends = asyncio.run(end_offsets(s.kafka_bootstrap, topic))
        done = prog.get(topic, {})
        if topic == s.topic_raw and not s.raw_keyed:
            continue  # two hops: the raw topic is the ingest's (forwarded to valid, checked there)
        if any(end > 0 and done.get(str(p), -1) < end - 1 for p, end in ends.items()):
            return False
    return True


def processed(w) -> int:
    try:
        return int(sum(v for k, v in w.metrics().items() if k.startswith("clickpulse_events_processed_total{")))
    except OSError:
        return 0


@pytest.mark.timeout(900)
def test_sigkill_mid_replay_duplicates_identical_none_lost_adapter_delivers_once(make_settings, workers, tmp_path):
    s = make_settings(time_mode="replay", delivery_dedup_ttl_s=3600, stall_timeout_s=60)
    out = tmp_path / "delivered" / "actions.jsonl"
    adapter = Adapter(s, out, tmp_path / "deliver-1.log").start()
    adapters = [adapter]
    scraped: list[dict[str, float]] = []
    def start() -> object:
        """A worker, restarted when it exits 75 (it saw its consumer skip input: docs/delivery.md),
        as a supervisor does."""
        for _ in range(3):
            try:
                return workers(s)
            except ServiceError as err:
                if "exited with 75" not in str(err):
                    raise
                print("a worker exited 75 (input skipped by the consumer) while starting; restarted")
        return workers(s)

    try:
        w = start()
        replayed = {}
        t = threading.Thread(target=lambda: replayed.update(res=asyncio.run(publish(
            s.kafka_bootstrap, s.topic_raw, messages("rees46", BUNDLED_SAMPLE), control_key=s.control_key))))
        t.start()
        # kill mid-replay: once some events (and so some actions) are processed, before all are
        current = [w]

        def progressed() -> int:
            if not current[0].alive() and current[0].proc.returncode == 75:  # see start()
                current[0] = start()
                return 0
            n = processed(current[0])
            return n >= 800 and n
        at_kill = wait_for(progressed, 180, "the worker to process events", poll_s=0.05)
        w = current[0]
        w.kill()
        committed_at_kill = asyncio.run(committed_offsets(s.kafka_bootstrap, s.app_id))
        t.join(120)
        assert replayed["res"].published == 4999
        print(f"\nworker SIGKILLed after {at_kill} of 4996 events processed")
        # a graceful adapter restart on the way, once it has everything the dead worker published
        # (so its counters are final): the restarted one meets the re-published copies
        wait_for(lambda: adapter_caught_up(s), 180, "the adapter to commit what the first worker published")
        scraped.append(adapter.metrics())
        assert adapter.stop() == 0
        w2 = start()
        end_of_input(s)
        adapter = Adapter(s, out, tmp_path / "deliver-2.log").start()
        adapters.append(adapter)
        stalled = None
        supervised = 0
        while True:
            try:
                wait_caught_up(w2, s)
                break
            except ServiceError as err:
                # a worker that saw its consumer skip input exits 75 before committing past it
                # (docs/delivery.md): a supervisor restarts it, as this does
                if "worker died" in str(err) and w2.proc.returncode == 75 and supervised < 3:
                    supervised += 1
                    print("the restarted worker exited 75 (input skipped by the consumer); restarted again")
                    w2 = start()
                    continue
                if "did not catch up" not in str(err):
                    raise
                # KNOWN LIVENESS GAP (docs/delivery.md): now and then the restarted worker processes
                # a partition to its end but cannot commit it (its first messages after the restart
                # were never acknowledged to Faust's consumer). Nothing is lost: check everything
                # below all the same, once the worker has processed every input message, and xfail.
                stalled = str(err)
                break
        if stalled:
            wait_for(lambda: processed_everything(w2, s), 120, "the stalled worker to process every input message")
            seen: list[dict] = []  # then the actions topic unchanged over 3 polls a second apart
            wait_for(lambda: seen.append(asyncio.run(end_offsets(s.kafka_bootstrap, s.topic_actions))) or
                     (len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]), 60, "the last actions published",
                     poll_s=1.0)
        w2_metrics = w2.metrics()
        w2_duplicates = w2_metrics.get("clickpulse_events_duplicate_total", 0)
        wait_for(lambda: adapter_caught_up(s), 180, "the adapter to commit the whole actions topic")
        scraped.append(adapter.metrics())
        assert adapter.stop() == 0
    finally:
        for a in adapters:
            if a.proc is not None and a.proc.poll() is None:
                os.killpg(a.proc.pid, signal.SIGKILL)

    # -- the topic: duplicates identical to their first copy except created_at -------------------
    msgs = asyncio.run(read_topic(s.kafka_bootstrap, s.topic_actions))  # sorted by partition, offset
    copies: dict[str, list[bytes]] = {}
    for _k, v, _m in msgs:
        copies.setdefault(orjson.loads(v)["action_id"], []).append(v)
    dups = {aid: vs for aid, vs in copies.items() if len(vs) > 1}
    print(f"{len(msgs)} actions on the topic, {len(copies)} distinct ids, {len(dups)} published more than once "
          f"({len(msgs) - len(copies)} extra copies)")
    for aid, vs in dups.items():
        for v in vs[1:]:
            assert comparable_action(orjson.loads(v)) == comparable_action(orjson.loads(vs[0])), \
                f"duplicate of {aid} differs:\n{vs[0]}\n{v}"
            assert CREATED_AT.search(v) and CREATED_AT.search(vs[0])

    # -- the adapter: each action exactly once at the sink, the bytes of its first copy ----------
    # (an experiment's holdout decisions, deliver: false, are never delivered: docs/experiments.md)
    holdout = {aid for aid, vs in copies.items() if orjson.loads(vs[0]).get("deliver") is False}
    held_msgs = sum(len(copies[aid]) for aid in holdout)
    assert holdout, "the default rules' example experiment has a holdout"
    lines = out.read_bytes().splitlines()
    ids = [orjson.loads(line)["action_id"] for line in lines]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert twice == [], f"{len(twice)} action ids delivered more than once"
    assert set(ids) == set(copies) - holdout
    assert all(line == copies[aid][0] for line, aid in zip(lines, ids, strict=True))
    total = lambda name: sum(m.get(name, 0) for m in scraped)  # noqa: E731
    assert total("clickpulse_delivery_delivered_total{sink=jsonl}") == len(copies) - len(holdout)
    assert total("clickpulse_delivery_duplicates_total") == len(msgs) - held_msgs - (len(copies) - len(holdout))
    assert total("clickpulse_delivery_holdout_skipped_total") == held_msgs
    assert total("clickpulse_delivery_failures_total{reason=invalid}") == 0
    r = redis.Redis.from_url(s.redis_url)
    keys = list(r.scan_iter(match=f"{s.namespace}:delivered:*", count=1000))
    assert len(keys) == len(copies) - len(holdout)
    assert 0 < r.ttl(keys[0]) <= 3600
    assert asyncio.run(end_offsets(s.kafka_bootstrap, dlq_topic(s))) == {0: 0}
    r.delete(*keys)

    # -- the worker: every action of a crash-free run at least once, and nothing else ------------
    first = {aid: orjson.loads(vs[0]) for aid, vs in copies.items()}
    model_ids = {aid for aid, a in first.items() if a["type"] in MODEL_TYPES}
    expected = {a["action_id"]: a for a in crash_free_actions(s.partitions)}
    gaps = []
    lost = sorted(set(expected) - set(first))
    if lost:
        gaps.append(f"{len(lost)} actions of the crash-free run are not on the topic "
                    f"({lost_where(s, [expected[i] for i in lost], committed_at_kill)}; the restarted worker counted "
                    f"{w2_duplicates:g} duplicate events, 3 without a crash, re-ingested raw events included), e.g. "
                    f"{expected[lost[0]]}")
    extra = sorted(set(first) - set(expected) - model_ids)
    if extra:
        gaps.append(f"{len(extra)} actions a crash-free run does not produce, e.g. {first[extra[0]]}")
    differ = [aid for aid, a in expected.items() if aid in first and comparable_action(a) != comparable_action(first[aid])]
    if differ:
        gaps.append(f"{len(differ)} actions differ from the crash-free run: {expected[differ[0]]} vs {first[differ[0]]}")
    # ... and the independent oracle for the two timeout triggers
    oracle = expected_actions_by_type(True, lambda u: kafka_partition(u, s.partitions),
                                      round(s.allowed_lateness_ms / 1000))
    for typ in ("cart_abandoned", "assistance_offer"):
        got = sorted((a["user_key"], a["event_time_ms"]) for a in first.values() if a["type"] == typ)
        if got != oracle[typ]:
            gaps.append(f"{typ}: {len(set(oracle[typ]) - set(got))} of the oracle's missing, "
                        f"{len(set(got) - set(oracle[typ]))} not the oracle's")
    # none lost, nothing a crash-free run does not produce, every action as in the crash-free run
    # (created_at aside): the stated at-least-once guarantee, on every run
    redelivered = sum(v for k, v in w2_metrics.items() if k.startswith("clickpulse_events_redelivered_total{"))
    print(f"restarted worker: {redelivered:g} input messages skipped as already in the saved state, "
          f"{w2_duplicates:g} duplicate events")
    assert not gaps, "worker recovery after SIGKILL: " + " | ".join(gaps)
    if stalled:
        pytest.xfail(f"after the SIGKILL restart the worker could not commit part of its input (nothing lost: "
                     f"every check above passed): {stalled}")


def test_webhook_delivers_duplicates_once_and_dead_letters_refusals(make_settings):
    """Actions produced straight to <ns>.actions (with duplicates), the adapter in-process against
    a receiver on loopback that answers 500 for one action: that one goes to the dlq with its
    status after the retries; the others are POSTed once each."""
    from aiohttp import web
    from aiokafka import AIOKafkaProducer

    s = make_settings(delivery_dedup_ttl_s=600, delivery_webhook_attempts=2, delivery_webhook_backoff_s=0.05,
                      delivery_webhook_backoff_max_s=0.1)

    def act(i: int, created: str) -> dict:
        return {"schema_version": 1, "action_id": f"00000000-0000-5000-8000-{i:012d}", "type": "incentive",
                "user_key": f"u{i % 3}", "user_id": f"u{i % 3}", "anonymous_id": None,
                "event_time": "2019-10-01T00:00:00.000Z", "event_time_ms": 1569888000000, "reason": "r",
                "payload": {"i": i}, "trigger": "t", "model_version": None, "rules_version": "1+0", "created_at": created}

    sent = [act(i, "2026-01-01T00:00:00.000Z") for i in range(6)] + [act(i, "2026-01-01T00:05:00.000Z") for i in (1, 4)]
    got: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        a = orjson.loads(await request.read())
        got.append(a["action_id"])
        return web.Response(status=500 if a["payload"]["i"] == 3 else 204)

    async def scenario() -> None:
        p = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
        await p.start()
        try:
            for a in sent:
                await p.send_and_wait(s.topic_actions, orjson.dumps(a), key=a["user_key"].encode())
        finally:
            await p.stop()
        app = web.Application()
        app.router.add_post("/hook", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        from clickpulse.delivery import DeliveryMetrics, make_sink
        metrics = DeliveryMetrics()
        stop = asyncio.Event()
        task = asyncio.create_task(run(s, make_sink("webhook", out=None, url=f"http://127.0.0.1:{port}/hook",
                                                    settings=s, metrics=metrics), metrics=metrics, stop=stop))
        try:
            for _ in range(600):
                if task.done() or await asyncio.to_thread(adapter_caught_up, s):
                    break
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            await runner.cleanup()

    asyncio.run(scenario())
    ids = [a["action_id"] for a in sent]
    refused = ids[3]
    assert sorted(i for i in got if i != refused) == sorted(set(ids) - {refused})  # each once
    assert got.count(refused) == 2                                                  # the retries
    dlq = [orjson.loads(v) for _k, v, _m in asyncio.run(read_topic(s.kafka_bootstrap, dlq_topic(s)))]
    assert [(d["action_id"], d["reason"], d["status"], d["attempts"]) for d in dlq] == [(refused, "http_5xx", 500, 2)]
    assert dlq[0]["action"] == sent[3]
    assert adapter_caught_up(s)
    r = redis.Redis.from_url(s.redis_url)
    assert r.exists(*(f"{s.namespace}:delivered:{i}" for i in set(ids))) == 5
    r.delete(*(f"{s.namespace}:delivered:{i}" for i in set(ids)))
