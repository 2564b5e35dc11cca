"""Profile API handlers, segment sets and the Redis refill over an in-memory Redis double (unit
tier; the same paths against the real Redis and a real worker are in
tests/integration/test_profile_api.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from clickpulse.errors import ConfigError
from clickpulse.observability.metrics import Metrics
from clickpulse.serving.api import RUNNER_OPTIONS, ApiMetrics, create_api, harden_api
from clickpulse.serving.redis_sink import ProfileRefill, ProfileWriter, engine_profile, epoch_key
from clickpulse.settings import Settings
from clickpulse.store import key_partition
from clickpulse.testing import memory_engine

ROOT = Path(__file__).resolve().parents[2]
KEY = "k" * 20
HDR = {"X-API-Key": KEY}


class FakeRedis:
    """The commands the API, the writer and the refill use, over dicts (bytes in, bytes out)."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}
        self.z: dict[bytes, set[bytes]] = {}
        self.sets: dict[bytes, set[bytes]] = {}
        self.down = False
        self.hang = False  # commands never answer (a stuck Redis)
        self.fail_next = 0  # this many next commands fail as a connection Redis closed
        self.on_execute = None  # called before a pipeline executes (to wipe "Redis" mid-refill)

    @staticmethod
    def _b(x: Any) -> bytes:
        return x if isinstance(x, bytes) else str(x).encode()

    def _check(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            from redis.exceptions import ConnectionError as RedisConnectionError
            raise RedisConnectionError("Connection closed by server.")
        if self.down:
            raise ConnectionError("redis down")

    # sync core
    def _set(self, k, v, ex=None, xx=False):
        k = self._b(k)
        if xx and k not in self.kv:
            return None
        self.kv[k] = self._b(v)
        return True

    def _get(self, k):
        return self.kv.get(self._b(k))

    def _mget(self, keys):
        return [self.kv.get(self._b(k)) for k in keys]

    def _delete(self, *keys):
        n = 0
        for k in keys:
            n += self.kv.pop(self._b(k), None) is not None
        return n

    def _zadd(self, k, mapping):
        self.z.setdefault(self._b(k), set()).update(self._b(m) for m in mapping)
        return len(mapping)

    def _zrem(self, k, *members):
        s = self.z.get(self._b(k), set())
        for m in members:
            s.discard(self._b(m))
        return 0

    def _zcard(self, k):
        return len(self.z.get(self._b(k), ()))

    def _zrange(self, k, start, end, bylex=False, offset=0, num=-1):
        assert bylex and end == b"+"
        members = sorted(self.z.get(self._b(k), ()))
        if start != b"-":
            assert start[:1] == b"("
            members = [m for m in members if m > start[1:]]
        return members[offset:offset + num]

    def _sadd(self, k, *members):
        self.sets.setdefault(self._b(k), set()).update(self._b(m) for m in members)

    def _sismember(self, k, m):
        return int(self._b(m) in self.sets.get(self._b(k), ()))

    def flushall(self):
        self.kv.clear()
        self.z.clear()
        self.sets.clear()

    # async API
    def __getattr__(self, name):
        core = getattr(type(self), "_" + name, None)
        if core is None:
            raise AttributeError(name)

        async def call(*a, **kw):
            self._check()
            if self.hang:
                await asyncio.sleep(3600)
            return core(self, *a, **kw)
        return call

    async def ping(self):
        self._check()
        return True

    def pipeline(self, transaction=False):
        return FakePipe(self)


class FakePipe:
    def __init__(self, r: FakeRedis) -> None:
        self.r = r
        self.ops: list[tuple[str, tuple, dict]] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def __getattr__(self, name):
        def queue(*a, **kw):
            self.ops.append((name, a, kw))
        return queue

    async def execute(self):
        if self.r.on_execute is not None:
            self.r.on_execute()
        self.r._check()
        return [getattr(FakeRedis, "_" + n)(self.r, *a, **kw) for n, a, kw in self.ops]


def _settings(**kw) -> Settings:
    return Settings(namespace="t", api_keys=f"{KEY},{'z' * 16}", **kw)


async def _client(redis: FakeRedis) -> TestClient:
    app = create_api(_settings(), client=redis, metrics=ApiMetrics(CollectorRegistry()))
    server = TestServer(app)
    await server.start_server(**RUNNER_OPTIONS)  # as clickpulse api runs it
    harden_api(server.runner)
    c = TestClient(server)
    await c.start_server()
    return c


def run(coro):
    return asyncio.run(coro)


def _profile(key: str, segments=()) -> dict[str, Any]:
    return {"schema_version": 1, "user_key": key, "segments": list(segments)}


# ---------------------------------------------------------------------------------------- spec
def test_openapi_profile_schema_is_profile_v1_and_spec_loads():
    spec = yaml.safe_load((ROOT / "schemas" / "profile-api.openapi.yaml").read_text())
    prof = json.loads((ROOT / "schemas" / "profile.v1.json").read_text())
    mine = spec["components"]["schemas"]["Profile"]
    pair = mine["properties"]["engagement"]["properties"]["top"]["items"]
    assert pair == {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": ["string", "number"]}}
    top = prof["properties"]["engagement"]["properties"]["top"]
    assert top["items"] == {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]}
    top["items"] = pair  # the one place written without prefixItems (schemathesis rejects it)
    assert mine == {k: v for k, v in prof.items() if k not in ("$schema", "$id")}
    import schemathesis
    ops = {op.ok().label for op in schemathesis.openapi.from_dict(spec).get_all_operations()}
    assert ops == {"GET /v1/profiles/{id}", "GET /v1/segments/{name}/members", "GET /health", "GET /metrics"}


# ---------------------------------------------------------------------------------------- auth
def test_auth_bearer_or_header_else_401_health_and_metrics_open():
    async def go():
        r = FakeRedis()
        r.kv[b"t:profile:u1"] = orjson.dumps(_profile("u1"))
        c = await _client(r)
        try:
            out = []
            for headers in ({}, {"X-API-Key": "wrong" * 4}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": "Bearer "}, {"Authorization": f"Bearer {KEY}"},
                            {"Authorization": f"bearer {'z' * 16}"}, HDR):
                resp = await c.get("/v1/profiles/u1", headers=headers)
                out.append(resp.status)
                if resp.status == 401:
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    assert (await resp.json())["error"] == "unauthorized"
            assert out == [401, 401, 401, 401, 200, 200, 200]
            assert (await c.get("/v1/segments/x/members")).status == 401
            assert (await c.get("/v1/nothing")).status == 401  # no key: nothing is revealed, not even a 404
            assert (await c.get("/health")).status == 200
            m = await c.get("/metrics")
            assert m.status == 200 and 'clickpulse_api_requests_total{route="profile",status="401"} 4.0' in await m.text()
        finally:
            await c.close()
    run(go())


def test_api_refuses_to_start_without_keys_and_short_keys_are_rejected():
    with pytest.raises(ConfigError):
        create_api(Settings(namespace="t"), client=FakeRedis())
    with pytest.raises(ConfigError):
        Settings(api_keys="short-key")
    assert Settings(api_keys=f" {KEY} ,, ").api_key_list == (KEY,)
    assert KEY not in repr(Settings(api_keys=KEY))


# ---------------------------------------------------------------------------------------- profiles
def test_profile_resolution_guest_to_customer():
    async def go():
        r = FakeRedis()
        r.kv[b"t:profile:c-5"] = orjson.dumps(_profile("c-5"))
        r.kv[b"t:profile:anon:g-77"] = orjson.dumps(_profile("anon:g-77"))
        r.kv[b"t:alias:anon:g-77"] = b"c-5"              # stitched guest: the customer's profile
        r.kv[b"t:alias:anon:g-new"] = b"c-new"           # customer without a profile yet: the guest's own
        r.kv[b"t:profile:anon:g-new"] = orjson.dumps(_profile("anon:g-new"))
        r.kv[b"t:alias:a"] = b"b"                        # a cycle stops
        r.kv[b"t:alias:b"] = b"a"
        r.kv[b"t:profile:b"] = orjson.dumps(_profile("b"))
        r.kv[b"t:alias:h1"] = b"h2"                      # chains are followed
        r.kv[b"t:alias:h2"] = b"c-5"
        c = await _client(r)
        try:
            async def get(i):
                resp = await c.get(f"/v1/profiles/{i}", headers=HDR)
                return resp.status, (await resp.json()), resp.headers.get("Content-Location")
            assert await get("anon:g-77") == (200, _profile("c-5"), "/v1/profiles/c-5")
            assert await get("c-5") == (200, _profile("c-5"), "/v1/profiles/c-5")
            assert (await get("anon:g-new"))[1] == _profile("anon:g-new")
            assert (await get("a"))[1] == _profile("b")
            assert (await get("h1"))[1] == _profile("c-5")
            st, body, _ = await get("nobody")
            assert st == 404 and body["error"] == "not_found"
            r.kv[b"t:profile:a/b c"] = orjson.dumps(_profile("a/b c"))
            st, body, loc = await get("a%2Fb%20c")
            assert st == 200 and body["user_key"] == "a/b c" and loc == "/v1/profiles/a%2Fb%20c"
        finally:
            await c.close()
    run(go())


def test_hostile_ids_and_redis_down():
    async def go():
        r = FakeRedis()
        c = await _client(r)
        try:
            for bad in ("%00x", "x%0Ay", "x" * 257):
                resp = await c.get(f"/v1/profiles/{bad}", headers=HDR)
                assert resp.status == 400, bad
                assert (await resp.json())["error"] == "bad_request"
            assert (await c.get("/v1/profiles/" + "é" * 256, headers=HDR)).status == 404
            r.kv[b"t:profile:u1"] = orjson.dumps(_profile("u1"))
            r.fail_next = 1  # a stale pooled connection after a Redis restart: retried once
            assert (await c.get("/v1/profiles/u1", headers=HDR)).status == 200
            r.fail_next = 2
            assert (await c.get("/v1/profiles/u1", headers=HDR)).status == 503
            r.down = True
            resp = await c.get("/v1/profiles/u1", headers=HDR)
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await c.get("/v1/segments/s/members", headers=HDR)).status == 503
            assert (await c.get("/health")).status == 503
        finally:
            await c.close()
    run(go())


# ---------------------------------------------------------------------------------------- segments
def test_segment_sets_follow_profiles_and_page_exactly():
    async def go():
        r = FakeRedis()
        m = Metrics(CollectorRegistry())
        w = ProfileWriter(r, "t", 60, 10_000, m)
        w.segment_names(["vip", "empty"])
        for i in range(250):
            w.mark(f"u{i:03d}", _profile(f"u{i:03d}", ["vip"] if i % 2 == 0 else ["lapsed"]))
        await w.flush()
        w.mark("u000", _profile("u000", ["lapsed"]))  # left vip (e.g. expired or flagged as a bot: no change record)
        w.forget("u002")                               # erased
        await w.flush()
        c = await _client(r)
        try:
            seen, cursor, pages = [], None, 0
            while True:
                q = {"limit": "40"} | ({"cursor": cursor} if cursor else {})
                resp = await c.get("/v1/segments/vip/members", headers=HDR, params=q)
                assert resp.status == 200
                body = await resp.json()
                assert body["count"] == 123 and len(body["members"]) <= 40
                seen += body["members"]
                pages += 1
                cursor = body["next_cursor"]
                if cursor is None:
                    break
            expect = sorted(f"u{i:03d}" for i in range(4, 250, 2))
            assert seen == expect and pages == 4
            empty = await c.get("/v1/segments/empty/members", headers=HDR)  # declared by the rules, no members
            assert empty.status == 200 and await empty.json() == {"segment": "empty", "count": 0, "members": [],
                                                                "next_cursor": None}
            assert (await c.get("/v1/segments/nope/members", headers=HDR)).status == 404
            for q in ({"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"cursor": "%%%"}, {"cursor": "="}):
                assert (await c.get("/v1/segments/vip/members", headers=HDR, params=q)).status == 400, q
            assert (await c.get("/v1/segments/1bad/members", headers=HDR)).status == 400
        finally:
            await c.close()
    run(go())


# ---------------------------------------------------------------------------------------- refill
def _engine_with_users(n: int):
    eng = memory_engine()
    t0 = 1_700_000_000_000
    batch = [(key_partition(f"u{i}".encode(), 4), {"event_id": f"e{i}", "type": "page_view", "user_id": f"u{i}",
                                                   "user_key": f"u{i}", "timestamp_ms": t0 + i, "properties": {}})
             for i in range(n)]
    em = eng.step(batch, t0 + n)
    eng.commit(em)
    return eng


def test_refill_rewrites_every_profile_of_owned_partitions_once():
    eng = _engine_with_users(300)
    r = FakeRedis()
    m = Metrics(CollectorRegistry())
    w = ProfileWriter(r, "t", 60, 10_000, m)
    refill = ProfileRefill(w, rate_per_s=1e6, batch=64)
    owned = [0, 1, 2]
    args = (lambda: owned, eng.table, lambda k: key_partition(k, 4), engine_profile(eng))
    written = run(refill.check(*args))
    mine = {k.decode() for k in eng.table if key_partition(k, 4) in owned}
    assert sum(written.values()) == len(mine) > 150
    assert {k.decode().split(":", 2)[2] for k in r.kv if b":profile:" in k} == mine
    assert all(r.kv[epoch_key("t", p).encode()].startswith(b"done:") for p in owned)
    assert epoch_key("t", 3).encode() not in r.kv
    prof = orjson.loads(r.kv[f"t:profile:{sorted(mine)[0]}".encode()])
    assert prof["lifetime"]["events"] == 1 and prof["counts"]["page_view"]["5m"] == 1
    assert run(refill.check(*args)) == {}  # sentinels present: nothing to do
    assert m.registry.get_sample_value("clickpulse_redis_refills_total") == 3
    # Redis restarted empty: found again
    r.flushall()
    assert sum(run(refill.check(*args)).values()) == len(mine)


def test_refill_skips_pending_and_retries_when_redis_is_wiped_mid_refill():
    eng = _engine_with_users(100)
    r = FakeRedis()
    w = ProfileWriter(r, "t", 60, 10_000, Metrics(CollectorRegistry()))
    refill = ProfileRefill(w, rate_per_s=1e6, batch=10)
    some = next(k.decode() for k in eng.table if key_partition(k, 4) == 0)
    w.mark(some, _profile(some, []))  # newer profile waiting for the flush: the refill leaves it to the flush
    calls = {"n": 0}

    def wipe_once():
        calls["n"] += 1
        if calls["n"] == 3:
            r.flushall()
    r.on_execute = wipe_once
    args = (lambda: [0], eng.table, lambda k: key_partition(k, 4), engine_profile(eng))
    run(refill.check(*args))
    assert r.kv.get(epoch_key("t", 0).encode()) is None  # wiped mid-way: not marked done
    r.on_execute = None
    written = run(refill.check(*args))
    assert f"t:profile:{some}".encode() not in r.kv
    n0 = sum(1 for k in eng.table if key_partition(k, 4) == 0)
    assert written == {0: n0 - 1}
    assert r.kv[epoch_key("t", 0).encode()].startswith(b"done:")
    r.kv[epoch_key("t", 0).encode()] = b"refilling:dead-worker"  # a refill that never finished
    assert run(refill.check(*args)) == {0: n0 - 1}


def test_refill_stops_for_a_revoked_partition_and_survives_redis_down():
    eng = _engine_with_users(200)
    r = FakeRedis()
    m = Metrics(CollectorRegistry())
    w = ProfileWriter(r, "t", 60, 10_000, m)
    refill = ProfileRefill(w, rate_per_s=1e6, batch=5)
    owned = [0]
    n = {"batches": 0}

    def revoke_after_two():
        n["batches"] += 1
        if n["batches"] == 3:
            owned.clear()
    r.on_execute = revoke_after_two
    written = run(refill.check(lambda: owned, eng.table, lambda k: key_partition(k, 4), engine_profile(eng)))
    assert written[0] <= 10 and epoch_key("t", 0).encode() in r.kv
    assert not r.kv[epoch_key("t", 0).encode()].startswith(b"done")
    r.down = True
    assert run(refill.check(lambda: [1], eng.table, lambda k: key_partition(k, 4), engine_profile(eng))) == {}
    assert m.redis_errors._value.get() == 1


def test_a_stuck_redis_is_a_503_after_the_request_timeout(monkeypatch):
    import clickpulse.serving.api as api_mod
    monkeypatch.setattr(api_mod, "REQUEST_TIMEOUT_S", 0.2)

    async def go():
        r = FakeRedis()
        r.hang = True
        c = await _client(r)
        try:
            started = asyncio.get_running_loop().time()
            resp = await c.get("/v1/profiles/u1", headers=HDR)
            assert resp.status == 503 and (await resp.json())["error"] == "unavailable"
            assert asyncio.get_running_loop().time() - started < 30
        finally:
            await c.close()
    run(go())


def test_refill_rewrites_identity_links_not_stub_profiles():
    """A guest merged into a customer is a stub in the table: after Redis comes back empty the
    refill writes its link <ns>:alias:<guest> (the API resolves the guest through it), never a
    profile of the stub."""
    from clickpulse.state.user import UserState

    eng = _engine_with_users(20)
    stub = UserState("anon:g-77")
    stub.merged_into = "u3"
    eng.table[b"anon:g-77"] = stub.to_bytes()
    r = FakeRedis()
    w = ProfileWriter(r, "t", 60, 10_000, Metrics(CollectorRegistry()))
    refill = ProfileRefill(w, rate_per_s=1e6, batch=8)
    run(refill.check(lambda: [0, 1, 2, 3], eng.table, lambda k: key_partition(k, 4), engine_profile(eng)))
    assert r.kv[b"t:alias:anon:g-77"] == b"u3"
    assert b"t:profile:anon:g-77" not in r.kv and b"t:profile:u3" in r.kv


# ---------------------------------------------------------------------------------- edge cases (#9 review)
def test_any_valid_credential_is_accepted_when_both_are_sent():
    async def go():
        r = FakeRedis()
        r.kv[b"t:profile:u1"] = orjson.dumps(_profile("u1"))
        c = await _client(r)
        try:
            cases = [({"X-API-Key": "wrong" * 4, "Authorization": f"Bearer {KEY}"}, 200),
                     ({"X-API-Key": KEY, "Authorization": "Bearer " + "wrong" * 4}, 200),
                     ({"X-API-Key": KEY, "Authorization": "Basic xyz"}, 200),
                     ({"X-API-Key": "wrong" * 4, "Authorization": "Bearer " + "bad" * 6}, 401),
                     ({"X-API-Key": "", "Authorization": f"Bearer {KEY}"}, 200)]
            for headers, status in cases:
                resp = await c.get("/v1/profiles/u1", headers=headers)
                assert resp.status == status, headers
        finally:
            await c.close()
    run(go())


def test_any_base64url_cursor_is_a_position_in_byte_order():
    async def go():
        r = FakeRedis()
        r.sets[b"t:segments"] = {b"vip"}
        r.z[b"t:segment:vip"] = {b"u1", b"u2"}
        c = await _client(r)
        try:
            # 0xff 0xff, 0xff, 0x80 0x80 0x80 (not UTF-8): after every key; 0x00: before every key
            for cursor, members in (("__8", []), ("_w", []), ("gICA", []), ("AA", ["u1", "u2"])):
                resp = await c.get("/v1/segments/vip/members", headers=HDR, params={"cursor": cursor})
                assert resp.status == 200, cursor
                assert (await resp.json())["members"] == members, cursor
            ok = await c.get("/v1/segments/vip/members", headers=HDR, params={"cursor": "dTE"})  # "u1"
            assert ok.status == 200 and (await ok.json())["members"] == ["u2"]
        finally:
            await c.close()
    run(go())


async def _raw(port: int, data: bytes) -> tuple[int, str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)  # the server closes after an error
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    ctype = next((ln.split(":", 1)[1].strip() for ln in head.decode().split("\r\n")
                  if ln.lower().startswith("content-type:")), "")
    return int(head.split()[1]), ctype, body


@pytest.mark.parametrize("request_bytes,status,code", [
    (b"GET /v1/profiles/" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),  # URL > 8 KB
    (b"GET /v1/profiles/u1 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + b"k" * 9000 + b"\r\n\r\n", 400, "bad_request"),
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"POST /v1/profiles/u1 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
     + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405, "method_not_allowed"),
    (b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "not_found"),
])
def test_every_error_is_the_api_json_body(request_bytes, status, code):
    async def go():
        c = await _client(FakeRedis())
        try:
            got_status, ctype, body = await _raw(c.port, request_bytes)
            assert (got_status, ctype) == (status, "application/json"), body[:200]
            got = orjson.loads(body)
            assert got["error"] == code and got["detail"]
        finally:
            await c.close()
    run(go())
