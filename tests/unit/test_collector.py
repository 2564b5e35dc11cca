"""The collector's request handling: pure functions and the aiohttp app over a fake producer
(the real SDKs, Kafka and a worker are in tests/integration/test_collector.py)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickpulse.collector.request import (
    Limits,
    RequestError,
    basic_user,
    call_of,
    decode_body,
    identity_key,
    parse_json,
    records,
)
from clickpulse.collector.server import Collector
from clickpulse.errors import ConfigError
from clickpulse.settings import Settings

KEY = "wk-test-1"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
T = "2026-12-01T10:00:00.000Z"


# --- pure request handling ------------------------------------------------------------------------

@pytest.mark.parametrize("path,call", [
    ("/v1/track", "track"), ("/v1/page", "page"), ("/v1/screen", "screen"), ("/v1/identify", "identify"),
    ("/v1/alias", "alias"), ("/v1/group", "group"), ("/v1/batch", "batch"), ("/v1/import", "import"),
    ("/v1/t", "track"), ("/v1/b", "batch"), ("/v1/track/", "track"),
    ("/v1/", None), ("/v1/x", None), ("/v2/track", None), ("/track", None), ("/v1/track/x", None),
])
def test_call_of(path, call):
    assert call_of(path) == call


def test_decode_body_gzip_and_identity():
    body = orjson.dumps({"a": 1})
    assert decode_body(body, None, 100) == body
    assert decode_body(body, "identity", 100) == body
    assert decode_body(gzip.compress(body), "gzip", 100) == body
    assert decode_body(gzip.compress(body), "GZIP", 100) == body


@pytest.mark.parametrize("raw,enc,status,code", [
    (b"not gzip at all", "gzip", 400, "bad_encoding"),
    (gzip.compress(b'{"a": 1}')[:-6], "gzip", 400, "bad_encoding"),  # truncated
    (gzip.compress(b'{"a": 1}') + b"junk", "gzip", 400, "bad_encoding"),  # trailing bytes
    (b"{}", "br", 415, "unsupported_encoding"),
    (b"x" * 101, None, 400, "payload_too_large"),
    (gzip.compress(b"x" * 101), "gzip", 400, "payload_too_large"),
])
def test_decode_body_refuses(raw, enc, status, code):
    with pytest.raises(RequestError) as exc:
        decode_body(raw, enc, 100)
    assert (exc.value.status, exc.value.code) == (status, code)


def test_gzip_bomb_stops_at_the_limit():
    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024), compresslevel=9)  # 200 MB in ~200 KB
    assert len(bomb) < 512000
    with pytest.raises(RequestError) as exc:
        decode_body(bomb, "gzip", 512000)
    assert exc.value.code == "payload_too_large"


def test_basic_user():
    enc = base64.b64encode
    assert basic_user("Basic " + enc(b"k:").decode()) == "k"
    assert basic_user("basic " + enc(b"k:secret").decode()) == "k"
    assert basic_user("Basic " + enc(b"k").decode()) == "k"  # no colon: still the user
    assert basic_user("Basic " + enc(b":pw").decode()) is None
    assert basic_user("Basic " + enc(b"\xff\xfe:").decode()) is None
    for bad in (None, "", "Basic", "Basic ", "Bearer abc", "Basic @@@", "Digest x"):
        assert basic_user(bad) is None


def test_parse_json_refuses_non_objects():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for body in (b"", b"[1]", b'"x"', b"nul", b"\xff{}", b'{"a": NaN}'):
        with pytest.raises(RequestError) as exc:
            parse_json(body)
        assert exc.value.code == "invalid_request" and exc.value.status == 400


def test_identity_key():
    assert identity_key({"userId": "u1", "anonymousId": "a"}) == b"u1"
    assert identity_key({"anonymousId": "a"}) == b"anon:a"
    assert identity_key({"userId": 42}) == b"42"
    assert identity_key({"userId": "", "anonymousId": "a"}) == b"anon:a"
    assert identity_key({"user_id": "c", "userId": "u"}) == b"c"  # the contract's precedence
    for bad in ({}, {"userId": True}, {"userId": None}, {"userId": {"a": 1}}, {"anonymousId": [1]}):
        assert identity_key(bad) is None


def test_records_of_a_single_call():
    obj = {"userId": "u1", "event": "Product Added", "type": "page", "writeKey": KEY, "receivedAt": "forged"}
    [(key, value)] = records("track", obj, T, Limits())
    msg = orjson.loads(value)
    assert key == b"u1"
    assert msg["type"] == "track"  # the endpoint's call wins
    assert msg["receivedAt"] == T  # stamped by the collector, never the client's
    assert "writeKey" not in msg  # a credential never reaches Kafka


def test_an_event_without_a_time_happened_when_received():
    """Segment's HTTP API: ``timestamp`` is optional. Hand-written calls without one were
    answered 200 and then dead-lettered as bad_timestamp by the worker (a newcomer's review)."""
    from clickpulse.events.contract import parse
    def ev() -> dict:
        return {"userId": "u1", "event": "Product Viewed", "properties": {"product_id": "p9"}}
    [(_k, value)] = records("track", ev(), T, Limits())
    msg = orjson.loads(value)
    assert msg["timestamp"] == T
    assert parse(value, None)["timestamp"] == parse(orjson.dumps({**msg, "timestamp": T}), None)["timestamp"]
    # a sent time is kept as it is: timestamp, or the SDKs' originalTimestamp
    [(_k, v2)] = records("track", {**ev(), "timestamp": "2026-12-01T08:00:00Z"}, T, Limits())
    assert orjson.loads(v2)["timestamp"] == "2026-12-01T08:00:00Z"
    [(_k, v3)] = records("track", {**ev(), "originalTimestamp": "2026-12-01T08:00:00Z"}, T, Limits())
    assert "timestamp" not in orjson.loads(v3)
    batch = {"batch": [{"type": "track", "event": "A", "userId": "u"}, {"type": "track", "event": "B", "userId": "v",
                                                                         "timestamp": "2026-12-01T07:00:00Z"}]}
    times = [orjson.loads(v)["timestamp"] for _k, v in records("batch", batch, T, Limits())]
    assert times == [T, "2026-12-01T07:00:00Z"]


def test_records_of_a_batch_merge_context_and_sent_at():
    obj = {"writeKey": KEY, "sentAt": "2026-12-01T09:59:59Z", "context": {"library": {"name": "x"}, "ip": "1.2.3.4"},
           "batch": [{"type": "track", "event": "A", "anonymousId": "a1", "context": {"ip": "5.6.7.8"}},
                     {"type": "page", "userId": "u2", "sentAt": "2026-12-01T09:00:00Z", "writeKey": "other"}]}
    recs = records("batch", obj, T, Limits())
    assert [k for k, _ in recs] == [b"anon:a1", b"u2"]
    m0, m1 = (orjson.loads(v) for _, v in recs)
    assert m0["context"] == {"library": {"name": "x"}, "ip": "5.6.7.8"}
    assert m0["sentAt"] == "2026-12-01T09:59:59Z" and m1["sentAt"] == "2026-12-01T09:00:00Z"
    assert m1["context"] == {"library": {"name": "x"}, "ip": "1.2.3.4"}
    assert "writeKey" not in m1 and m0["receivedAt"] == m1["receivedAt"] == T


@pytest.mark.parametrize("call,obj,code,where", [
    ("batch", {"batch": "x"}, "invalid_request", "batch must be a list"),
    ("batch", {}, "invalid_request", "batch must be a list"),
    ("batch", {"batch": [{"userId": "u"}, 5]}, "invalid_request", "batch[1]"),
    ("batch", {"batch": [{"userId": "u"}, {"type": "track"}]}, "no_user_anon_id", "batch[1]"),
    ("batch", {"batch": [{"userId": "u"}] * 11}, "payload_too_large", "11 events"),
    ("track", {"event": "x"}, "no_user_anon_id", "event"),
    ("track", {"userId": "u", "properties": {"blob": "x" * 2000}}, "payload_too_large", "event is"),
    ("batch", {"batch": [{"userId": "u"}, {"userId": "u", "p": "x" * 2000}]}, "payload_too_large", "batch[1]"),
])
def test_records_refuse(call, obj, code, where):
    with pytest.raises(RequestError) as exc:
        records(call, obj, T, Limits(max_event_bytes=1024, max_batch_bytes=100_000, max_batch_events=10))
    assert exc.value.status == 400 and exc.value.code == code and where in exc.value.message
    body = orjson.loads(exc.value.body())
    assert body == {"success": False, "code": code, "message": exc.value.message}


def test_an_event_too_deep_to_encode_is_refused():
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    with pytest.raises(RequestError) as exc:
        records("track", {"userId": "u", "properties": {"d": deep}}, T, Limits())
    assert exc.value.code == "invalid_request"


# --- the server over a fake producer ----------------------------------------------------------------

class FakeProducer:
    """Records what is sent; ``mode`` makes it fail: ``down`` (start fails), ``nack`` (the
    acknowledgement fails), ``hang`` (no acknowledgement ever)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.acked: list[tuple[str, bytes, bytes]] = []
        self.started = self.stopped = False

    @property
    def client(self) -> FakeProducer:
        return self

    def force_metadata_update(self) -> asyncio.Future:
        """The broker answers a metadata request only in mode ``ok``."""
        fut = asyncio.get_running_loop().create_future()
        if self.mode != "hang":
            fut.set_result(self.mode == "ok")
        return fut

    async def start(self) -> None:
        if self.mode == "down":
            raise KafkaConnectionError("no broker")
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.sent.append((topic, key, value))
        if self.mode == "ok":
            self.acked.append((topic, key, value))
            fut.set_result(None)
        elif self.mode == "nack":
            fut.set_exception(KafkaConnectionError("broker went away"))
        return fut


def _settings(**over: Any) -> Settings:
    over.setdefault("collector_write_keys", f"{KEY}, wk-other")
    return Settings(namespace="unit-coll", **over)


def run_client(test: Callable[[TestClient, Collector, FakeProducer], Any], mode: str = "ok", **over: Any) -> None:
    producer = FakeProducer(mode)

    async def main() -> None:
        c = Collector(_settings(**over), producer_factory=lambda: producer)
        server = TestServer(c.app())
        await server.start_server(**c.runner_options())  # as serve() runs it: gzip decoded with a cap, ...
        c.harden(server.runner)  # ... aiohttp's own errors as JSON, the connection cap
        async with TestClient(server) as client:
            if mode != "down":
                for _ in range(200):
                    if c.producer is not None:
                        break
                    await asyncio.sleep(0.01)
            await test(client, c, producer)
        assert mode == "down" or producer.stopped

    asyncio.run(main())


def test_collector_needs_a_write_key():
    with pytest.raises(ConfigError, match="WRITE_KEYS"):
        Collector(Settings(namespace="x"))


def test_track_is_acknowledged_and_published_keyed_by_identity():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        r = await client.post("/v1/track", data=orjson.dumps(
            {"userId": "u1", "event": "Product Added", "messageId": "m-1", "properties": {"product_id": "p1"}}),
            headers=AUTH)
        assert r.status == 200 and await r.json() == {"success": True}
        [(topic, key, value)] = p.acked
        msg = orjson.loads(value)
        assert topic == "unit-coll.events.raw" and key == b"u1"
        assert msg["messageId"] == "m-1" and msg["type"] == "track" and msg["receivedAt"].endswith("Z")
    run_client(t)


def test_body_write_key_and_gzip_batch():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        body = gzip.compress(orjson.dumps({"writeKey": "wk-other", "batch": [
            {"type": "page", "anonymousId": "a1"}, {"type": "identify", "userId": "u1", "traits": {"plan": "x"}}]}))
        r = await client.post("/v1/batch", data=body, headers={"Content-Encoding": "gzip",
                                                               "Content-Type": "text/plain"})
        assert r.status == 200, await r.text()
        assert [k for _, k, _ in p.acked] == [b"anon:a1", b"u1"]
        assert all(b"wk-other" not in v for _, _, v in p.acked)
    run_client(t)


@pytest.mark.parametrize("headers,body", [
    ({}, {"userId": "u"}),  # no key anywhere
    ({"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()}, {"userId": "u"}),
    ({"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()}, {"userId": "u", "writeKey": KEY}),
    ({"Authorization": "Bearer " + KEY}, {"userId": "u"}),
    ({"Authorization": "Basic !!!"}, {"userId": "u"}),
    ({}, {"userId": "u", "writeKey": "wk-test"}),  # a prefix of a key
    ({}, {"userId": "u", "writeKey": ["wk-test-1"]}),
])
def test_bad_auth_is_401(headers, body):
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        r = await client.post("/v1/track", data=orjson.dumps(body), headers=headers)
        assert r.status == 401
        assert (await r.json())["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert p.sent == []
    run_client(t)


def test_hostile_requests_get_the_right_4xx_and_nothing_is_published():
    big_event = {"userId": "u", "properties": {"blob": "x" * 40_000}}
    big_batch = {"batch": [{"userId": "u", "properties": {"blob": "x" * 20_000}}] * 30}  # ~600 KB
    cases = [
        ("/v1/track", b"not json", {}, 400, "invalid_request"),
        ("/v1/track", b"[1, 2]", {}, 400, "invalid_request"),
        ("/v1/track", b"\xff\xfe\x00", {}, 400, "invalid_request"),
        ("/v1/track", orjson.dumps(big_event), {}, 400, "payload_too_large"),
        ("/v1/batch", orjson.dumps(big_batch), {}, 400, "payload_too_large"),
        ("/v1/batch", gzip.compress(orjson.dumps(big_batch)), {"Content-Encoding": "gzip"}, 400, "payload_too_large"),
        ("/v1/batch", gzip.compress(b"\0" * (50 * 1024 * 1024)), {"Content-Encoding": "gzip"}, 400, "payload_too_large"),
        ("/v1/batch", b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, "bad_encoding"),
        ("/v1/batch", b"{}", {"Content-Encoding": "compress"}, 415, "unsupported_encoding"),
        ("/v1/batch", orjson.dumps({"batch": {"userId": "u"}}), {}, 400, "invalid_request"),
        ("/v1/batch", orjson.dumps({"batch": [{"userId": "u"}, None]}), {}, 400, "invalid_request"),
        ("/v1/batch", orjson.dumps({"batch": [{"userId": "u"}] * 2501}), {}, 400, "payload_too_large"),
        ("/v1/identify", orjson.dumps({"userId": {"$ne": 1}}), {}, 400, "no_user_anon_id"),
        ("/v1/track", orjson.dumps({"anonymousId": ""}), {}, 400, "no_user_anon_id"),
        ("/v1/nope", b"{}", {}, 404, "not_found"),
    ]

    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        for path, body, headers, status, code in cases:
            r = await client.post(path, data=body, headers={**AUTH, **headers})
            got = await r.json()
            assert (r.status, got.get("code")) == (status, code), (path, body[:80], got)
            assert got["success"] is False and got["message"]
        assert p.sent == []
        # absurd but well-formed events pass: the worker's contract dead-letters them with a reason
        r = await client.post("/v1/track", data=orjson.dumps({"userId": "u", "timestamp": "yesterday",
                                                              "properties": {"price": "abc"}}), headers=AUTH)
        assert r.status == 200 and len(p.acked) == 1
        metrics = await (await client.get("/metrics")).text()
        assert 'clickpulse_collector_refused_total{code="payload_too_large"} 5.0' in metrics
    run_client(t)


def test_content_length_over_the_limit_is_refused_before_reading():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        async def body():
            yield b"{" + b" " * 2000
        r = await client.post("/v1/batch", data=b"x" * 3000, headers=AUTH)
        assert r.status == 400 and (await r.json())["code"] == "payload_too_large"
        r = await client.post("/v1/batch", data=body(), headers=AUTH)  # chunked: counted while read
        assert r.status == 400 and (await r.json())["code"] == "payload_too_large"
    run_client(t, collector_max_batch_bytes=1000, collector_max_event_bytes=500)


def test_kafka_down_is_503_with_retry_after_and_health_503():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        r = await client.post("/v1/track", data=orjson.dumps({"userId": "u1"}), headers=AUTH)
        assert r.status == 503 and r.headers["Retry-After"] == "7"
        assert (await r.json())["code"] == "kafka_unavailable"
        h = await client.get("/health")
        assert h.status == 503 and (await h.json())["kafka"] == "down"
        assert p.sent == []
    run_client(t, mode="down", collector_retry_after_s=7)


@pytest.mark.parametrize("mode", ["nack", "hang"])
def test_an_unacknowledged_event_is_never_answered_200(mode):
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        r = await client.post("/v1/batch", data=orjson.dumps({"batch": [{"userId": "u1"}, {"userId": "u2"}]}),
                              headers=AUTH)
        assert r.status == 503 and r.headers["Retry-After"] == "5"
        assert len(p.sent) == 2 and p.acked == []
        assert (await client.get("/health")).status == 503
        metrics = await (await client.get("/metrics")).text()
        assert "clickpulse_collector_kafka_up 0.0" in metrics
        assert "clickpulse_collector_events_total 0.0" in metrics
        p.mode = "ok"  # the broker is back: /health says so without any request
        await asyncio.sleep(1.05)  # the probe runs at most once a second
        assert (await client.get("/health")).status == 200
        r = await client.post("/v1/track", data=orjson.dumps({"userId": "u3"}), headers=AUTH)
        assert r.status == 200 and [k for _, k, _ in p.acked] == [b"u3"]
    run_client(t, mode=mode, collector_ack_timeout_s=0.3)


def test_health_metrics_and_cors():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        h = await client.get("/health")
        assert h.status == 200 and await h.json() == {"status": "ok", "kafka": "up"}
        r = await client.post("/v1/page", data=orjson.dumps({"anonymousId": "a"}),
                              headers={**AUTH, "Origin": "https://shop.example"})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        r = await client.post("/v1/page", data=orjson.dumps({"anonymousId": "a"}),
                              headers={**AUTH, "Origin": "https://evil.example"})
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
        pre = await client.options("/v1/track", headers={"Origin": "https://shop.example",
                                                         "Access-Control-Request-Method": "POST"})
        assert pre.status == 204 and "Authorization" in pre.headers["Access-Control-Allow-Headers"]
        text = await (await client.get("/metrics")).text()
        assert 'clickpulse_collector_requests_total{call="page",status="200"} 2.0' in text
        assert "clickpulse_collector_events_total 2.0" in text
        assert 'clickpulse_collector_request_seconds_count{kind="single"} 2.0' in text
    run_client(t, collector_cors_origins="https://shop.example")


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=20)
message = st.dictionaries(st.sampled_from(["userId", "anonymousId", "user_id", "type", "event", "context", "sentAt",
                                           "messageId", "writeKey", "receivedAt"]), json_any, max_size=5)
batches = st.fixed_dictionaries({"batch": st.lists(message, max_size=4)},
                                optional={"context": json_any, "sentAt": json_any, "writeKey": json_any})


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["/v1/track", "/v1/batch", "/v1/identify", "/v1/b", "/v1/import"]),
                          st.binary(max_size=200) | json_any.map(lambda o: json.dumps(o).encode())
                          | batches.map(lambda o: json.dumps(o).encode()),
                          st.sampled_from([None, "gzip"]), st.booleans()), min_size=1, max_size=5))
def test_arbitrary_bodies_never_crash_the_collector(reqs):
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        for path, body, enc, compress in reqs:
            headers = dict(AUTH)
            if enc == "gzip" and compress:
                body = gzip.compress(body)
            if enc:
                headers["Content-Encoding"] = enc
            r = await client.post(path, data=body, headers=headers)
            assert r.status in (200, 400), (r.status, await r.text())
            got = await r.json()
            assert got["success"] is (r.status == 200)
        assert all(k for _, k, _ in p.acked)
    run_client(t)


def test_app_is_an_aiohttp_application():
    assert isinstance(Collector(_settings(), producer_factory=FakeProducer).app(), web.Application)


def test_event_loop_choice(monkeypatch):
    import sys

    from clickpulse.collector.server import loop_factory
    assert loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")


@pytest.mark.parametrize("over,match", [
    ({"collector_event_loop": "trio"}, "EVENT_LOOP"),
    ({"collector_max_event_bytes": 70000}, "COLLECTOR_MAX_EVENT_BYTES"),  # over what the worker takes
    ({"collector_max_event_bytes": 2000, "collector_max_batch_bytes": 1000}, "COLLECTOR_MAX_EVENT_BYTES"),
    ({"collector_ack_timeout_s": 0}, "ACK_TIMEOUT"),
    ({"collector_linger_ms": -1}, "LINGER"),
])
def test_collector_settings_are_checked(over, match):
    with pytest.raises(ConfigError, match=match):
        Settings(**over)


def test_write_keys_from_the_environment():
    s = Settings.from_env({"CLICKPULSE_COLLECTOR_WRITE_KEYS": " a ,b,, "})
    assert s.collector_keys == frozenset({"a", "b"})
    assert "collector_write_keys" not in repr(s)  # a secret: not in logs


# --- slow and abusive clients, aiohttp's own errors (issue #9/#10 review) ------------------------------

def test_concatenated_gzip_members_are_one_body():
    a, b = b'{"userId": "u1", ', b'"event": "x"}'
    assert decode_body(gzip.compress(a) + gzip.compress(b), "gzip", 100) == a + b
    assert decode_body(gzip.compress(a) + gzip.compress(b"") + gzip.compress(b), "gzip", 100) == a + b
    for raw, why in [(gzip.compress(a) + b"junk", "bytes after the end of the gzip stream"),
                     (gzip.compress(a) + gzip.compress(b)[:-4], "truncated"),
                     (gzip.compress(a) + b"\x1f\x8b\x63" + b"\0" * 20, "not valid gzip")]:
        with pytest.raises(RequestError, match=why) as exc:
            decode_body(raw, "gzip", 100)
        assert exc.value.code == "bad_encoding"


def test_a_gzip_bomb_split_over_members_is_capped_as_a_whole():
    member = gzip.compress(b"\0" * (1024 * 1024), compresslevel=9)  # 1 MB in ~1 KB
    with pytest.raises(RequestError) as exc:
        decode_body(member * 100, "gzip", 512000)  # 100 MB in all, each member under the cap
    assert exc.value.code == "payload_too_large"
    with pytest.raises(RequestError) as exc:
        decode_body(gzip.compress(b"x" * 60) * 2, "gzip", 100)  # 120 bytes over two members
    assert exc.value.code == "payload_too_large"


def test_invalid_utf8_is_named_as_such():
    for body in (b'{"userId": "\xff"}', b"\xff\xfe\x00", b'{"a": "\xed\xa0\x80"}'):  # the last: a UTF-8 surrogate
        with pytest.raises(RequestError, match="body is not valid UTF-8") as exc:
            parse_json(body)
        assert exc.value.code == "invalid_request" and "surrogates" not in exc.value.message


def test_gzip_members_through_the_server():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        body = orjson.dumps({"batch": [{"type": "track", "event": "x", "userId": f"u{i}"} for i in range(3)]})
        gz = gzip.compress(body[:20]) + gzip.compress(body[20:])
        r = await client.post("/v1/batch", data=gz, headers={**AUTH, "Content-Encoding": "gzip"})
        assert r.status == 200, await r.text()
        assert [k for _, k, _ in p.acked] == [b"u0", b"u1", b"u2"]
    run_client(t)


async def _raw(port: int, data: bytes, *, wait_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection, read until the server closes it (at most ``wait_s``:
    a server that never closes fails the test); the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), wait_s)  # until EOF
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _head(path: str, headers: dict[str, str], length: int = 100000, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {length}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("headers", [AUTH, {}], ids=["authenticated", "no-key"])
def test_a_body_that_never_arrives_is_408_and_the_connection_closed(headers):
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        # the headers promise 100,000 bytes, 20 arrive: answered 408 after the body timeout and
        # closed by the server (_raw reads until EOF), with or without a key in the headers
        status, h, body = await _raw(client.port, _head("/v1/track", headers) + b'{"userId": "u1", ')
        got = orjson.loads(body)
        assert (status, got["code"], got["success"]) == (408, "request_timeout", False)
        assert "0.3 seconds" in got["message"] and h["connection"] == "close"
        assert p.sent == [] and c._in_flight == 0
        metrics = await (await client.get("/metrics")).text()
        assert 'clickpulse_collector_refused_total{code="request_timeout"} 1.0' in metrics
    run_client(t, collector_body_timeout_s=0.3)


def test_a_wrong_key_is_refused_from_the_headers_before_any_body_byte():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        bad = {"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()}
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(_head("/v1/track", bad))  # headers only: no body byte is ever sent
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)  # long before the 60 s body timeout
        assert first.startswith(b"HTTP/1.1 401")
        writer.close()
    run_client(t, collector_body_timeout_s=60)


def test_requests_beyond_the_in_flight_cap_get_503_at_once_and_health_stays_up():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        slow = []
        for _ in range(2):  # two requests whose bodies never come hold both slots
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(_head("/v1/track", AUTH) + b"{")
            await writer.drain()
            slow.append(writer)
        for _ in range(3000):
            if c._in_flight == 2:
                break
            await asyncio.sleep(0.01)
        assert c._in_flight == 2
        r = await client.post("/v1/track", data=orjson.dumps({"userId": "u1"}), headers=AUTH)
        got = await r.json()
        assert (r.status, got["code"], r.headers["Retry-After"]) == (503, "overloaded", "5")
        assert "limit 2" in got["message"]
        assert (await client.get("/health")).status == 200  # not counted against the cap
        assert p.sent == []
        for w in slow:
            w.close()
        for _ in range(3000):  # the slow handlers end with their connections
            if c._in_flight == 0:
                break
            await asyncio.sleep(0.01)
        r = await client.post("/v1/track", data=orjson.dumps({"userId": "u1"}), headers=AUTH)
        assert r.status == 200
    run_client(t, collector_max_in_flight=2, collector_body_timeout_s=60)


def test_connections_beyond_the_cap_are_answered_503_on_accept():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        srv = client.server.runner.server
        idle = []
        for _ in range(3):
            idle.append(await asyncio.open_connection("127.0.0.1", client.port))
        for _ in range(3000):
            if srv.open_connections >= 3:
                break
            await asyncio.sleep(0.01)
        assert srv.open_connections == 3
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        raw = await asyncio.wait_for(reader.read(), 30)  # answered and closed without a request
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in head
        assert orjson.loads(body)["success"] is False and srv.refused_connections == 1
        for _r, w in idle:
            w.close()
        for _ in range(3000):
            if srv.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        status, _h, body = await _raw(client.port, _head("/v1/track", {**AUTH, "Connection": "close"}, 16)
                                      + b'{"userId": "u1"}')
        assert status == 200
    # a TestClient keeps no connection open before its first request: the three idle ones fill the cap
    run_client(t, collector_max_connections=3)


def test_an_idle_connection_is_closed_after_the_idle_timeout():
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server
        writer.close()
    run_client(t, collector_idle_timeout_s=0.3)


@pytest.mark.parametrize("request_bytes,status,code", [
    (_head("/v1/../v1/track", AUTH, 2) + b"{}", None, None),  # a dot segment: whatever aiohttp routes it to, JSON
    (_head("/v1/track", AUTH, 0, "GET"), 405, "method_not_allowed"),
    (_head("/v1/track", AUTH, 0, "PUT"), 405, "method_not_allowed"),
    (_head("/nope", AUTH, 2) + b"{}", 404, "not_found"),
    (_head("/v1/track?" + "x" * 9000, AUTH, 2) + b"{}", 400, "bad_request"),  # request line over 8190 bytes
    (_head("/v1/track", {**AUTH, "X-Big": "y" * 9000}, 2) + b"{}", 400, "bad_request"),  # a header too long
    (b"NOT AN HTTP REQUEST\r\n\r\n", 400, "bad_request"),
    (_head("/v1/track", {**AUTH, "Transfer-Encoding": "chunked"}, 2) + b"{}", 400, "bad_request"),  # both lengths
])
def test_every_error_is_the_segment_json_body(request_bytes, status, code):
    async def t(client: TestClient, c: Collector, p: FakeProducer) -> None:
        got_status, headers, body = await _raw(client.port, request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        assert headers["content-type"].startswith("application/json"), (got_status, body)
        got = orjson.loads(body)
        assert got["success"] is False and got["code"] and got["message"]
        if status is not None:
            assert (got_status, got["code"]) == (status, code)
        else:
            assert got_status != 200 or got == {"success": True}
    run_client(t)


@pytest.mark.parametrize("over,match", [
    ({"collector_body_timeout_s": 0}, "BODY_TIMEOUT_S"),
    ({"collector_idle_timeout_s": -1}, "IDLE_TIMEOUT_S"),
    ({"collector_max_in_flight": 0}, "MAX_IN_FLIGHT"),
    ({"collector_max_connections": 0}, "MAX_CONNECTIONS"),
])
def test_slow_client_settings_are_checked(over, match):
    with pytest.raises(ConfigError, match=match):
        Settings(**over)


def test_fd_headroom_warning():
    import resource

    from clickpulse.collector.http import fd_headroom_warning
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no open-file limit")
    assert fd_headroom_warning(soft) is not None and "ulimit -n" in fd_headroom_warning(soft)
    assert fd_headroom_warning(max(1, soft - 100)) is None
