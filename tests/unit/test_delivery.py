"""The delivery adapter without Kafka: de-duplication, the order deliver -> mark -> commit, the
jsonl sink on disk and the webhook sink against a real HTTP server on loopback (aiohttp); only
Redis is a fake here (the integration test uses the real one)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from clickpulse.cli import main
from clickpulse.delivery import (DedupStore, Deliverer, DeliveryMetrics, Item, JsonlSink, Record, WebhookSink,
                                 delivered_key)
from clickpulse.errors import ConfigError
from clickpulse.settings import Settings

NS = "unit"


def action(aid: str, user: str = "u1", created_at: str = "2026-01-01T00:00:00.000Z") -> dict[str, Any]:
    return {"schema_version": 1, "action_id": aid, "type": "cart_abandoned", "user_key": user, "user_id": user,
            "anonymous_id": None, "event_time": "2019-10-01T00:00:00.000Z", "event_time_ms": 1569888000000,
            "reason": "r", "payload": {"cart": {"items": [], "value": 1.5, "currency": "USD"}},
            "trigger": "cart_abandonment", "model_version": None, "rules_version": "1+abc", "created_at": created_at}


def rec(aid: str, offset: int, partition: int = 0, **kw: Any) -> Record:
    a = action(aid, **kw)
    return Record(partition, offset, a["user_key"].encode(), orjson.dumps(a), f"{NS}.actions")


class FakeRedis:
    """MGET and a pipeline of SET NX EX, as redis.asyncio does them; ``log`` records the calls."""

    def __init__(self, log: list | None = None) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.log = log if log is not None else []
        self.fail_set = False

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        return [self.data[k][0] if k in self.data else None for k in keys]

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, r: FakeRedis) -> None:
        self.r = r
        self.ops: list[tuple[str, bytes, bool, int]] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def set(self, key: str, value: bytes, nx: bool = False, ex: int | None = None) -> None:
        self.ops.append((key, value, nx, ex))

    async def execute(self) -> list[bool | None]:
        if self.r.fail_set:
            raise ConnectionError("redis went away")
        out = []
        for key, value, nx, ex in self.ops:
            self.r.log.append(("mark", key.rsplit(":", 1)[1]))
            if nx and key in self.r.data:
                out.append(None)
            else:
                self.r.data[key] = (value, ex)
                out.append(True)
        return out


class RecordingSink:
    name = "test"

    def __init__(self, log: list, fail: set[str] = frozenset(), raise_on: set[str] = frozenset()) -> None:
        self.log = log
        self.got: list[bytes] = []
        self.fail = fail
        self.raise_on = raise_on

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def deliver(self, items):
        from clickpulse.delivery import Failure
        if any(it.action_id in self.raise_on for it in items):
            raise OSError("disk full")
        out = []
        for it in items:
            self.log.append(("deliver", it.action_id))
            if it.action_id in self.fail:
                out.append(Failure(it, "http_4xx", 400, "HTTP 400: no", 1))
            else:
                self.got.append(it.record.value)
        return out


def make(sink, log: list, redis: FakeRedis | None = None, ttl_s: float = 604800):
    redis = redis if redis is not None else FakeRedis(log)
    dlq: list[tuple[bytes | None, dict]] = []
    commits: list[dict[int, int]] = []

    async def dead_letter(recs):
        log.append(("dlq", [orjson.loads(v)["action_id"] for _k, v in recs]))
        dlq.extend((k, orjson.loads(v)) for k, v in recs)

    async def commit(offsets):
        log.append(("commit", dict(offsets)))
        commits.append(dict(offsets))

    metrics = DeliveryMetrics(CollectorRegistry())
    d = Deliverer(sink, DedupStore(redis, NS, ttl_s), metrics, dead_letter=dead_letter, commit=commit)
    return d, redis, dlq, commits, metrics


def value(metrics: DeliveryMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_duplicates_are_skipped_within_a_batch_and_across_batches(tmp_path):
    log: list = []
    sink = JsonlSink(tmp_path / "out" / "actions.jsonl")
    d, redis, dlq, commits, m = make(sink, log)

    async def go():
        await sink.start()
        r1 = await d.handle([rec("a1", 0), rec("a2", 1), rec("a1", 2, created_at="2026-01-01T00:00:09.000Z")])
        r2 = await d.handle([rec("a2", 3, created_at="2026-01-02T00:00:00.000Z"), rec("a3", 4), rec("a3", 0, 1)])
        await sink.close()
        return r1, r2

    r1, r2 = asyncio.run(go())
    assert (r1.delivered, r1.duplicates) == (["a1", "a2"], 1)
    assert (r2.delivered, r2.duplicates) == (["a3"], 2)
    lines = (tmp_path / "out" / "actions.jsonl").read_bytes().splitlines()
    assert lines == [rec("a1", 0).value, rec("a2", 1).value, rec("a3", 4).value]  # the first copies, byte for byte
    assert commits == [{0: 3}, {0: 5, 1: 1}]
    assert dlq == []
    key = delivered_key(NS, "a1")
    assert redis.data[key] == (b"1", 604800)  # SET ... NX EX <ttl>
    assert value(m, "clickpulse_delivery_delivered_total", sink="jsonl") == 3
    assert value(m, "clickpulse_delivery_duplicates_total") == 3
    assert value(m, "clickpulse_delivery_batches_total") == 2


def test_order_is_deliver_then_mark_then_commit():
    log: list = []
    d, *_ = make(RecordingSink(log), log)
    asyncio.run(d.handle([rec("a1", 7), rec("a2", 8)]))
    assert log == [("deliver", "a1"), ("deliver", "a2"), ("mark", "a1"), ("mark", "a2"), ("commit", {0: 9})]


def test_a_crash_before_the_mark_redelivers_once_marked_never_again():
    """The stated window: delivered but not marked -> delivered again after a restart; marked ->
    a re-read (or a re-publication by the worker) is skipped."""
    log: list = []
    sink = RecordingSink(log)
    redis = FakeRedis(log)
    d, _r, _dlq, commits, m = make(sink, log, redis)
    redis.fail_set = True
    with pytest.raises(ConnectionError):
        asyncio.run(d.handle([rec("a1", 0)]))
    assert commits == []                                    # nothing committed: the batch is read again
    redis.fail_set = False
    asyncio.run(d.handle([rec("a1", 0)]))                   # the restart re-reads it
    assert len(sink.got) == 2                               # at least once at the sink (the window)
    asyncio.run(d.handle([rec("a1", 0)]))                   # re-read again: marked now
    asyncio.run(d.handle([rec("a1", 5, created_at="2026-03-01T00:00:00.000Z")]))  # re-published by the worker
    assert len(sink.got) == 2
    assert commits == [{0: 1}, {0: 1}, {0: 6}]
    assert value(m, "clickpulse_delivery_duplicates_total") == 2


def test_a_sink_error_marks_and_commits_nothing():
    log: list = []
    d, redis, _dlq, commits, _m = make(RecordingSink(log, raise_on={"a2"}), log)
    with pytest.raises(OSError):
        asyncio.run(d.handle([rec("a1", 0), rec("a2", 1)]))
    assert commits == [] and redis.data == {}


def test_refused_actions_go_to_the_dlq_unmarked_and_the_batch_is_committed():
    log: list = []
    d, redis, dlq, commits, m = make(RecordingSink(log, fail={"bad"}), log)
    not_json = Record(1, 4, b"u9", b"{nope", f"{NS}.actions")
    res = asyncio.run(d.handle([rec("ok", 0), rec("bad", 1), not_json]))
    assert res.delivered == ["ok"]
    assert [(k, r["reason"], r["status"], r["action_id"]) for k, r in dlq] == [
        (b"u9", "invalid", None, None), (b"u1", "http_4xx", 400, "bad")]
    bad = dlq[1][1]
    assert bad["action"] == action("bad") and bad["source"] == {"topic": f"{NS}.actions", "partition": 0, "offset": 1}
    assert bad["attempts"] == 1 and bad["sink"] == "test" and bad["value_b64"] is None
    assert dlq[0][1]["value_b64"] == "e25vcGU="
    assert delivered_key(NS, "bad") not in redis.data     # a later copy is tried again
    assert [e[0] for e in log] == ["deliver", "deliver", "mark", "dlq", "commit"]
    assert commits == [{0: 2, 1: 5}]
    assert value(m, "clickpulse_delivery_failures_total", reason="http_4xx") == 1
    assert value(m, "clickpulse_delivery_failures_total", reason="invalid") == 1
    # the worker publishes "bad" again (or an operator re-publishes it from the dlq): tried again
    d.sink.fail = set()
    assert asyncio.run(d.handle([rec("bad", 9)])).delivered == ["bad"]


def test_jsonl_start_truncates_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(rec("a1", 0).value + b"\n" + rec("a2", 1).value[:20])
    sink = JsonlSink(path)

    async def go():
        await sink.start()
        await sink.deliver([Item(rec("a2", 1), "a2", action("a2"))])
        await sink.close()

    asyncio.run(go())
    assert path.read_bytes().splitlines() == [rec("a1", 0).value, rec("a2", 1).value]


# ------------------------------------------------------------------------------------ webhook
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A real HTTP server on loopback; ``script[action_id]`` lists the statuses to answer in turn
    (then 200)."""

    def __init__(self, script: dict[str, list[int]] | None = None, headers: dict[str, str] | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.headers = headers or {}
        self.calls: list[tuple[str, bytes, str | None, str | None]] = []
        self.port = _free_port()

    async def handler(self, request: web.Request) -> web.Response:
        body = await request.read()
        aid = orjson.loads(body)["action_id"]
        self.calls.append((aid, body, request.headers.get("Idempotency-Key"), request.headers.get("Content-Type")))
        todo = self.script.get(aid)
        status = todo.pop(0) if todo else 200
        return web.Response(status=status, text="nope" if status >= 300 else "ok",
                            headers=self.headers if status >= 300 else None)

    async def run(self, body: Callable[[str], Any]) -> Any:
        app = web.Application()
        app.router.add_post("/hook", self.handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            return await body(f"http://127.0.0.1:{self.port}/hook")
        finally:
            await runner.cleanup()


def webhook(url: str, metrics: DeliveryMetrics | None = None, attempts: int = 3) -> WebhookSink:
    return WebhookSink(url, attempts=attempts, timeout_s=5, backoff_s=0.01, backoff_max_s=0.05, metrics=metrics)


def test_webhook_posts_the_exact_bytes_with_an_idempotency_key_in_partition_order():
    recv = Receiver()
    records = [rec("a1", 0, 0), rec("b1", 0, 1), rec("a2", 1, 0), rec("b2", 1, 1), rec("a3", 2, 0)]

    async def body(url):
        sink = webhook(url)
        await sink.start()
        try:
            return await sink.deliver([Item(r, orjson.loads(r.value)["action_id"], orjson.loads(r.value))
                                       for r in records])
        finally:
            await sink.close()

    assert asyncio.run(recv.run(body)) == []
    by_id = {r.value: r for r in records}
    assert all(body in by_id and key == orjson.loads(body)["action_id"] and ctype == "application/json"
               for _aid, body, key, ctype in recv.calls)
    assert [c[0] for c in recv.calls if c[0].startswith("a")] == ["a1", "a2", "a3"]  # per partition, in order
    assert [c[0] for c in recv.calls if c[0].startswith("b")] == ["b1", "b2"]


def test_webhook_retries_then_dead_letters_with_the_status():
    recv = Receiver({"flaky": [503, 503], "down": [500] * 10, "rejected": [400], "moved": [301],
                     "throttled": [429]}, headers={"Retry-After": "0"})

    async def body(url):
        log: list = []
        m = DeliveryMetrics(CollectorRegistry())
        sink = webhook(url, m, attempts=3)
        await sink.start()
        d, redis, dlq, commits, _m = make(sink, log)
        d.metrics = m
        try:
            res = await d.handle([rec(a, i) for i, a in enumerate(["ok", "flaky", "down", "rejected", "moved",
                                                                   "throttled"])])
        finally:
            await sink.close()
        return res, dlq, commits, redis, m

    res, dlq, commits, redis, m = asyncio.run(recv.run(body))
    assert res.delivered == ["ok", "flaky", "throttled"]
    got = {r["action_id"]: (r["reason"], r["status"], r["attempts"]) for _k, r in dlq}
    assert got == {"down": ("http_5xx", 500, 3), "rejected": ("http_4xx", 400, 1), "moved": ("http_3xx", 301, 1)}
    assert all(r["action"]["action_id"] == r["action_id"] and "HTTP" in r["error"] for _k, r in dlq)
    assert [c[0] for c in recv.calls].count("down") == 3 and [c[0] for c in recv.calls].count("flaky") == 3
    assert commits == [{0: 6}]
    assert {k.rsplit(":", 1)[1] for k in redis.data} == {"ok", "flaky", "throttled"}
    assert value(m, "clickpulse_delivery_retries_total") == 2 + 2 + 1
    assert value(m, "clickpulse_delivery_failures_total", reason="http_5xx") == 1
    assert value(m, "clickpulse_delivery_delivered_total", sink="webhook") == 3


def test_webhook_unreachable_is_a_connection_failure():
    async def go():
        log: list = []
        sink = webhook(f"http://127.0.0.1:{_free_port()}/hook", attempts=2)
        await sink.start()
        d, redis, dlq, commits, _m = make(sink, log)
        try:
            await d.handle([rec("a1", 0)])
        finally:
            await sink.close()
        return dlq, commits, redis

    dlq, commits, redis = asyncio.run(go())
    assert [(r["reason"], r["status"], r["attempts"]) for _k, r in dlq] == [("connection", None, 2)]
    assert "ClientConnectorError" in dlq[0][1]["error"] or "Connect" in dlq[0][1]["error"]
    assert commits == [{0: 1}] and redis.data == {}


def test_webhook_url_must_be_http():
    with pytest.raises(ConfigError):
        WebhookSink("file:///etc/passwd")


def test_cli_deliver_needs_its_sink_argument(capsys, monkeypatch):
    # no broker at this address: the flags are checked first (exit 2, not 3), no I/O at all
    monkeypatch.setenv("CLICKPULSE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    assert main(["deliver", "--sink", "jsonl"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["deliver", "--sink", "webhook"]) == 2
    assert "--url" in capsys.readouterr().err


def test_delivery_settings():
    s = Settings.from_env({"CLICKPULSE_DELIVERY_DEDUP_TTL_S": "3600", "CLICKPULSE_DELIVERY_WEBHOOK_ATTEMPTS": "2"})
    assert (s.delivery_dedup_ttl_s, s.delivery_webhook_attempts, s.delivery_batch_max) == (3600.0, 2, 500)
    assert Settings().delivery_dedup_ttl_s == 7 * 86400
    with pytest.raises(ConfigError, match="CLICKPULSE_DELIVERY_DEDUP_TTL_S"):
        Settings(delivery_dedup_ttl_s=0)
    with pytest.raises(ConfigError, match="CLICKPULSE_DELIVERY_WEBHOOK_BACKOFF_S"):
        Settings(delivery_webhook_backoff_s=-1)
