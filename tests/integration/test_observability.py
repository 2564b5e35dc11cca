"""Observability against the real services: a real Prometheus (Debian's binary) scrapes a real
worker and trainer processing events on the real Kafka, and every dashboard query returns data;
the alert rules load and evaluate; ``/ready`` follows a Redis that goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clickpulse.observability.health import KafkaProbe
from clickpulse.observability.prometheus import PrometheusServer, finite_values
from clickpulse.runtime import WorkerProcess, free_port, stop_process_group
from tests.integration.conftest import produce, wait_for
from tests.integration.test_models import _produce_examples, synthetic
from tests.unit.test_dashboard import panel_queries

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def http(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def events(now_ms: int, wave: int) -> list:
    """Traffic that creates every condition a dashboard panel shows: views by category (the
    category_interest trigger fires on the 3rd: an event-triggered action, so a produce -> action
    latency), carts (hesitant_buyers segment entries, the held repeat_cart_incentive decision), a
    purchase after a scored add_to_cart (an intent training example), a duplicate, and messages the
    contract dead-letters for two reasons. Counters born with a label (a new reason, an action
    type) have no rate in their first scrape: the test sends two waves."""
    out: list = []
    t = now_ms - 60_000
    for u in range(6):
        user = f"obs-user-{wave}-{u}"
        for i in range(4):
            t += 100
            out.append((user, {"type": "product_view", "user_id": user, "timestamp": t, "event_id": f"{user}-v{i}",
                               "properties": {"product_id": f"p{i}", "category": "shoes", "price": 20.0}}))
        for i in range(3):
            t += 100
            out.append((user, {"type": "add_to_cart", "user_id": user, "timestamp": t, "event_id": f"{user}-c{i}",
                               "properties": {"product_id": f"p{i}", "price": 20.0, "quantity": 1}}))
        if u % 2 == 0:
            t += 100
            out.append((user, {"type": "purchase", "user_id": user, "timestamp": t, "event_id": f"{user}-o",
                               "properties": {"order_id": f"o{u}", "revenue": 60.0, "currency": "EUR"}}))
    out.append(out[0])                                           # duplicate event_id
    out.append(("bad", b"this is not json"))                     # not_json
    out.append(("bad", {"type": "page_view", "timestamp": t}))   # missing_identity
    return out


def test_every_dashboard_query_returns_data(make_settings, workers, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text((ROOT / "src" / "clickpulse" / "rules" / "default_rules.yaml").read_text())
    s = make_settings(health_poll_s=1, rules_path=str(rules), rules_poll_s=1, snapshot_every=50,
                      snapshot_interval_s=1, trainer_web_port=free_port())
    w = workers(s)
    tr = WorkerProcess(s, tmp_path / "trainer.log", command="trainer").start()
    prom = None
    try:
        tr.wait_ready()
        prom = PrometheusServer(tmp_path / "prom", rule_files=[ALERTS],
                                targets={"clickpulse-worker": [f"127.0.0.1:{s.web_port}"],
                                         "clickpulse-trainer": [f"127.0.0.1:{s.trainer_web_port}"]}).start()
        start = time.time()
        # Prometheus has scraped both before the traffic starts (rates need a sample before it)
        wait_for(lambda: len([r for r in prom.api("query", query="up == 1")["result"]]) == 2, 60,
                 "Prometheus scraping the worker and the trainer")
        produce(s, events(int(start * 1000), wave=1))
        # labeled examples straight to the training topic: the trainer learns them, publishes
        # snapshots, the worker installs them and exports their progressive-validation metrics
        asyncio.run(_produce_examples(s, synthetic(200, 0, seed=7)))
        # a rules change, hot-reloaded (the rules-reloads panel)
        rules.write_text(rules.read_text().replace('version: "', 'version: "obs-', 1))

        def worker_has_everything():
            m = w.metrics()
            keys = " ".join(m)
            return (m.get("clickpulse_rules_reloads_total{result=ok}", 0) >= 1
                    and "clickpulse_action_latency_seconds_count{type=content_recommendation}" in keys
                    and "clickpulse_model_metric{metric=roc_auc,scope=window,task=intent}" in keys
                    and "clickpulse_training_examples_total{task=intent}" in keys
                    and m.get("clickpulse_events_invalid_total{reason=not_json}") == 1
                    and m.get("clickpulse_events_invalid_total{reason=missing_identity}") == 1)
        wait_for(worker_has_everything, 180, "the worker's metrics for every condition", poll_s=1)
        # the second wave once Prometheus has the labelled series of the first
        wait_for(lambda: prom.api("query", query='clickpulse_events_invalid_total{reason="not_json"} == 1'
                                  ' and on () clickpulse_action_latency_seconds_count > 0')["result"],
                 60, "Prometheus to scrape the first wave")
        produce(s, events(int(time.time() * 1000), wave=2))
        wait_for(lambda: w.metrics().get("clickpulse_events_invalid_total{reason=not_json}") == 2, 120,
                 "the second wave processed")

        queries = panel_queries()
        missing: list[str] = []

        def all_have_data():
            missing.clear()
            for title, ref, expr in queries:
                if finite_values(prom.query_range(expr, start - 5, time.time(), 1.0)) == 0:
                    missing.append(f"{title} [{ref}]: {expr}")
            return not missing
        try:
            wait_for(all_have_data, 120, "every dashboard query to return data", poll_s=2)
        except AssertionError:
            raise AssertionError("dashboard queries without data:\n" + "\n".join(missing)) from None

        # a few values are what the test sent, not just "something"
        def last(expr):
            res = prom.api("query", query=expr)["result"]
            return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in res}
        assert last("sum by (reason) (clickpulse_events_invalid_total)") == {
            (("reason", "missing_identity"),): 2.0, (("reason", "not_json"),): 2.0}
        assert last("sum(clickpulse_events_duplicate_total)") == {(): 2.0}
        assert last('sum(clickpulse_actions_total{type="content_recommendation"})') == {(): 12.0}
        lat = last('histogram_quantile(1, sum by (le) (clickpulse_action_latency_seconds_bucket))')
        assert 0 < lat[()] <= 300, lat  # produce -> action within the worker's first minutes
        for name in ("action", "event"):  # the figures of this run, for the record (not asserted: load varies)
            q = {p: last(f"histogram_quantile({p}, sum by (le) (clickpulse_{name}_latency_seconds_bucket))")[()]
                 for p in (0.5, 0.95)}
            print(f"produce -> {name}: p50 ~ {q[0.5]:.3f} s, p95 ~ {q[0.95]:.3f} s (interpolated in the buckets)")
        lag = prom.api("query", query="clickpulse_consumer_lag_messages")["result"]
        assert {r["metric"]["topic"] for r in lag} == {s.topic_raw, s.topic_valid, s.topic_privacy}
        assert {int(r["metric"]["partition"]) for r in lag} == set(range(s.partitions))

        # the alert rules are loaded and evaluate without errors on real data
        groups = prom.api("rules")["groups"]
        rules_state = [(r["name"], r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]]
        assert {n for n, _h, _e in rules_state} >= {"ClickpulseConsumerLagGrowing", "ClickpulseNoActions",
                                                   "ClickpulseDeadLetterRateHigh", "ClickpulseModelRocAucDrop",
                                                   "ClickpulseRedisErrors", "ClickpulseDependencyDown"}
        wait_for(lambda: all(h == "ok" for _n, h, _e in
                             ((r["name"], r["health"], 0) for g in prom.api("rules")["groups"] for r in g["rules"])),
                 30, f"every rule evaluated healthy: {rules_state}")
    finally:
        if prom is not None:
            prom.stop()
        tr.stop()


def _redis_server(port: int, workdir: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    assert binary, "redis-server not found (deploy/local/redis.sh installs it)"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    import redis
    wait_for(lambda: _pings(redis.Redis(port=port, socket_timeout=1)), 30, "the test's own redis-server")
    return proc


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False


def test_ready_follows_redis_down_and_back(make_settings, workers, tmp_path):
    """The worker's own Redis (a redis-server started here, never the shared one) is stopped and
    started again: /ready answers 503 naming redis while it is down, 200 after; /health stays 200."""
    port = free_port()
    redis_proc = _redis_server(port, tmp_path / "redis")
    try:
        s = make_settings(redis_url=f"redis://127.0.0.1:{port}/0", health_poll_s=1)
        w = workers(s)
        wait_for(lambda: http(w.base_url + "/ready")[0] == 200, 60, "/ready 200 with Kafka and Redis up")
        produce(s, [("u1", {"type": "page_view", "user_id": "u1", "timestamp": int(time.time() * 1000)})])

        stop_process_group(redis_proc)
        code, body = wait_for(lambda: (r := http(w.base_url + "/ready"))[0] == 503 and r, 60,
                              "/ready 503 with Redis down")
        assert body["ready"] is False and body["checks"]["redis"]["ok"] is False
        assert body["checks"]["redis"]["error"] and body["checks"]["kafka"]["ok"] is True
        assert http(w.base_url + "/health") == (200, {"status": "ok"})  # liveness is not readiness
        m = w.metrics()
        assert m["clickpulse_dependency_up{dependency=redis}"] == 0
        assert m["clickpulse_dependency_up{dependency=kafka}"] == 1
        # profile writes fail while Redis is away: counted (the Redis-errors panel and alert)
        produce(s, [("u1", {"type": "page_view", "user_id": "u1", "timestamp": int(time.time() * 1000)})])
        wait_for(lambda: w.metrics().get("clickpulse_redis_errors_total", 0) > 0, 60, "a counted Redis error")

        redis_proc = _redis_server(port, tmp_path / "redis")
        wait_for(lambda: http(w.base_url + "/ready")[0] == 200, 60, "/ready 200 again with Redis back")
        assert w.metrics()["clickpulse_dependency_up{dependency=redis}"] == 1
        assert w.alive()
    finally:
        stop_process_group(redis_proc)


def test_kafka_probe_fails_on_an_unreachable_broker_and_passes_on_the_real_one(local_services):
    """The Kafka readiness check: a port nobody listens on fails within the probe's timeout (it
    never hangs); the real broker answers."""
    async def run():
        dead = KafkaProbe(f"127.0.0.1:{free_port()}", "obs-probe", timeout_s=3.0)
        t0 = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - aiokafka's connection error or the timeout
            await dead.lag([("t", 0)])
        took = time.monotonic() - t0
        await dead.close()
        live = KafkaProbe(local_services.kafka_bootstrap, "obs-probe", timeout_s=10.0)
        try:
            assert await live.lag([]) == {}
        finally:
            await live.close()
        return took
    took = asyncio.run(run())
    assert took < 30, took
