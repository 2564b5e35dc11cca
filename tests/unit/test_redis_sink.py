"""Write-behind buffer: coalescing, bounded while Redis is down, recovery (fake client: unit tier)."""

from __future__ import annotations

import asyncio

import orjson
from prometheus_client import CollectorRegistry

from clickpulse.observability.metrics import Metrics
from clickpulse.serving.redis_sink import ProfileWriter


class FakePipe:
    def __init__(self, client):
        self.client = client
        self.ops = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def set(self, key, value, ex):
        self.ops.append((key, value, ex))

    async def execute(self):
        if self.client.down:
            raise ConnectionError("redis down")
        self.client.pipelines += 1
        for k, v, _ex in self.ops:
            self.client.data[k] = v


class FakeRedis:
    def __init__(self):
        self.down = False
        self.data = {}
        self.pipelines = 0

    def pipeline(self, transaction=False):
        return FakePipe(self)


def test_coalesces_and_pipelines():
    client = FakeRedis()
    m = Metrics(CollectorRegistry())
    w = ProfileWriter(client, "ns", 60, 100, m)
    for i in range(10):
        w.mark("u1", {"v": i})
    w.mark("u2", {"v": 0})
    assert asyncio.run(w.flush()) == 2
    assert client.pipelines == 1 and orjson.loads(client.data["ns:profile:u1"]) == {"v": 9}
    assert m.redis_writes._value.get() == 2


def test_outage_keeps_newest_bounded_and_recovers():
    client = FakeRedis()
    m = Metrics(CollectorRegistry())
    w = ProfileWriter(client, "ns", 60, 3, m)
    client.down = True
    for i in range(5):
        w.mark(f"u{i}", {"v": i})
    assert m.redis_dropped._value.get() == 2          # bound of 3 enforced at mark time
    assert asyncio.run(w.flush()) == 0 and m.redis_errors._value.get() == 1
    w.mark("u4", {"v": 44})                            # newer than the failed batch
    client.down = False
    assert asyncio.run(w.flush()) == 3
    assert orjson.loads(client.data["ns:profile:u4"]) == {"v": 44}
    assert set(client.data) == {"ns:profile:u2", "ns:profile:u3", "ns:profile:u4"}


def test_a_new_namespace_refills_nothing_and_logs_one_info_line(caplog):
    import logging

    from clickpulse.serving.redis_sink import ProfileRefill, epoch_key
    from tests.unit.test_profile_api import FakeRedis as ApiFakeRedis

    r = ApiFakeRedis()
    w = ProfileWriter(r, "t", 60, 10_000, Metrics(CollectorRegistry()))
    refill = ProfileRefill(w, rate_per_s=1e6, batch=10)
    with caplog.at_level(logging.INFO, logger="clickpulse.serving.redis_sink"):
        written = asyncio.run(refill.check(lambda: [0, 1, 2, 3], {}, lambda k: 0, lambda raw: None))
    assert written == {0: 0, 1: 0, 2: 0, 3: 0}
    assert all(r.kv[epoch_key("t", p).encode()].startswith(b"done:") for p in range(4))
    records = [rec for rec in caplog.records if rec.name == "clickpulse.serving.redis_sink"]
    assert [rec.levelname for rec in records] == ["INFO"] and "new namespace" in records[0].getMessage()
