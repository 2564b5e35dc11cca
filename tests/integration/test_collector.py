"""The collector against the real broker, a real worker and the real SDKs
(segment-analytics-python 2.4.0, rudder-sdk-python 2.1.9), each pointed at a collector subprocess
unchanged but for its host and write key."""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
import rudderstack.analytics as rudder
import segment.analytics as segment

from clickpulse.runtime import WorkerProcess, free_port, read_topic
from clickpulse.serving.redis_sink import alias_key, profile_key
from clickpulse.settings import Settings
from tests.integration.conftest import assert_topics_match_schemas, cart_actions, topic_values, wait_for

pytestmark = pytest.mark.integration

KEY = "wk-it-" + uuid.uuid4().hex[:8]


class CollectorProcess(WorkerProcess):
    """``clickpulse collector`` as a subprocess (``WorkerProcess`` with the collector command)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.collector_port}"

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def wait_listening(self, timeout_s: float = 60.0) -> None:
        wait_for(lambda: not self.alive() or self.health() in (200, 503), timeout_s, "the collector to listen")
        assert self.alive(), self.log_path.read_text()[-3000:]


@pytest.fixture
def collectors(tmp_path: Path) -> Iterator[Callable[..., CollectorProcess]]:
    started: list[CollectorProcess] = []

    def start(settings: Settings) -> CollectorProcess:
        s = settings.replace(collector_port=free_port(), collector_write_keys=KEY)
        c = CollectorProcess(s, tmp_path / f"collector-{s.namespace}-{len(started)}.log", command="collector")
        c.start()
        started.append(c)
        c.wait_listening()
        return c
    yield start
    for c in started:
        c.stop()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode(),
        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), orjson.loads(err.read())


def test_both_sdks_deliver_unchanged_into_state_and_actions(make_settings, workers, collectors):
    s = make_settings(time_mode="live", cart_abandon_after_s=6, allowed_lateness_s=1, idle_timeout_s=1)
    workers(s)
    c = collectors(s)
    wait_for(lambda: c.health() == 200, 60, "the collector's producer to connect")
    errors: list[Exception] = []

    def on_error(err, batch):
        errors.append(err)

    seg = segment.Client(KEY, host=c.url, sync_mode=True, on_error=on_error, max_retries=3)
    rud = rudder.Client(KEY, host=c.url, sync_mode=True, on_error=on_error, max_retries=3)  # gzip by default
    tag = uuid.uuid4().hex[:6]
    seg_user, rud_user, guest = f"seg-{tag}", f"rud-{tag}", f"guest-{tag}"
    # RudderStack: a customer who adds to the cart and buys (products[] only, lower-case currency)
    rud.identify(user_id=rud_user, traits={"plan": "pro", "email": "r@example.com"})
    rud.track(user_id=rud_user, event="Product Added",
              properties={"product_id": "sku-1", "price": 20.0, "quantity": 2, "currency": "eur"})
    rud.track(user_id=rud_user, event="Order Completed",
              properties={"order_id": f"o-{tag}", "currency": "eur",
                          "products": [{"product_id": "sku-1", "price": 20.0, "quantity": 2},
                                       {"product_id": "sku-2", "price": 5.5}]})
    # Segment: a customer who adds to the cart and leaves; a guest who only browses (batched, page + screen)
    seg.identify(user_id=seg_user, traits={"plan": "free", "country": "DE"})
    seg.page(user_id=seg_user, name="Shoes", properties={"url": "https://shop.example/shoes"})
    seg.track(user_id=seg_user, event="Product Added",
              properties={"product_id": "sku-9", "price": 60.0, "quantity": 1, "currency": "usd"},
              context={"device": {"type": "android", "model": "Pixel 8", "advertisingId": "ad-secret"}})
    batched = segment.Client(KEY, host=c.url, sync_mode=False, upload_interval=0.2, upload_size=50,
                             on_error=on_error, max_retries=3)
    batched.page(anonymous_id=guest, name="Home")
    batched.screen(anonymous_id=guest, name="Catalog")
    batched.alias(previous_id=guest, user_id=seg_user)
    batched.group(user_id=seg_user, group_id="acct-1", traits={"name": "Example"})
    batched.flush()
    batched.join()
    assert errors == []

    actions = wait_for(lambda: cart_actions(s), 60, "cart_abandoned for the Segment user")
    assert [a["user_key"] for a in actions] == [seg_user]
    assert actions[0]["payload"]["cart"]["items"][0]["product_id"] == "sku-9"
    assert actions[0]["payload"]["cart"]["currency"] == "USD"

    r = redis.Redis.from_url(s.redis_url)

    def profile(user):
        raw = r.get(profile_key(s.namespace, user))
        return orjson.loads(raw) if raw else None
    buyer = wait_for(lambda: (p := profile(rud_user)) and p["lifetime"]["orders"] == 1 and p, 30, "the buyer's order")
    assert buyer["lifetime"]["revenue"] == 45.5  # from products[]: 2 x 20 + 5.5
    assert buyer["traits"]["plan"] == "pro" and "email" not in buyer["traits"]
    shopper = wait_for(lambda: profile(seg_user), 30, "the Segment user's profile")
    assert shopper["traits"]["device"] == "mobile" and shopper["traits"]["plan"] == "free"
    # the alias linked the guest to the Segment user (identity stitching, docs/identity.md): its
    # two page views are the user's, the guest's key resolves through the alias key
    assert wait_for(lambda: r.get(alias_key(s.namespace, f"anon:{guest}")), 30, "the guest's alias key") \
        == seg_user.encode()
    wait_for(lambda: (p := profile(seg_user)) and p["counts"].get("page_view", {}).get("7d") == 3, 30,
             "the guest's page views in the Segment user's profile")
    assert profile(f"anon:{guest}") is None
    time.sleep(3)
    assert [a["user_key"] for a in cart_actions(s)] == [seg_user]  # the buyer's cart never abandoned

    valid = topic_values(s, s.topic_valid)
    assert {v["type"] for v in valid} >= {"identify", "add_to_cart", "purchase", "page_view", "alias", "group"}
    assert not any(b"ad-secret" in orjson.dumps(v) for v in valid)  # the advertising id never left ingest
    assert topic_values(s, s.topic_dlq) == []
    counts = assert_topics_match_schemas(s)
    assert counts[s.topic_valid] == len(valid)
    # 3 RudderStack calls, 3 + 4 Segment calls; a guest page view that reached the guest's key after
    # the alias is on the valid topic a second time, forwarded to the Segment user (same event_id)
    assert len({v["event_id"] for v in valid}) == 10 and len(valid) - 10 in (0, 1, 2)
    raw = asyncio.run(read_topic(s.kafka_bootstrap, s.topic_raw))
    assert all(orjson.loads(v)["receivedAt"].endswith("Z") and b"writeKey" not in v for _k, v, _m in raw)


def test_hostile_requests_and_an_invalid_event(make_settings, collectors):
    s = make_settings()
    c = collectors(s)
    wait_for(lambda: c.health() == 200, 60, "the collector's producer to connect")
    url = c.url
    assert post(url + "/v1/track", b"{}", {"Authorization": "Basic " + base64.b64encode(b"nope:").decode()})[0] == 401
    assert post(url + "/v1/track", b"not json")[0] == 400
    big = orjson.dumps({"userId": "u", "properties": {"x": "y" * 40_000}})
    status, _h, body = post(url + "/v1/track", big)
    assert (status, body["code"]) == (400, "payload_too_large") and body["success"] is False
    huge = orjson.dumps({"batch": [{"userId": "u", "properties": {"x": "y" * 20_000}}] * 30})
    assert post(url + "/v1/batch", huge)[2]["code"] == "payload_too_large"
    bomb = gzip.compress(b" " * (100 * 1024 * 1024))
    assert post(url + "/v1/batch", bomb, {"Content-Encoding": "gzip"})[2]["code"] == "payload_too_large"
    assert post(url + "/v1/batch", b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"})[2]["code"] == "bad_encoding"
    # a well-formed request with an invalid event: accepted (200), dead-lettered by the worker's contract
    status, _h, body = post(url + "/v1/track", orjson.dumps({"userId": "u-bad", "messageId": "m-bad",
                                                             "timestamp": "yesterday", "event": "x"}))
    assert (status, body) == (200, {"success": True})
    assert c.alive() and c.health() == 200
    raw = asyncio.run(read_topic(s.kafka_bootstrap, s.topic_raw))
    assert [(k, orjson.loads(v)["messageId"]) for k, v, _m in raw] == [(b"u-bad", "m-bad")]


def test_kafka_unavailable_is_503_with_retry_after_never_200(make_settings, collectors, tmp_path):
    s = make_settings().replace(kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens there
    c = collectors(s.replace(collector_retry_after_s=3))
    assert c.health() == 503
    status, headers, body = post(c.url + "/v1/batch", orjson.dumps({"batch": [{"userId": "u1", "event": "x"}]}))
    assert status == 503 and headers["Retry-After"] == "3" and body["code"] == "kafka_unavailable"
    # the SDK sees the failure (it retries 5xx, then reports), never a success
    errors: list[Exception] = []
    client = segment.Client(KEY, host=c.url, sync_mode=True, max_retries=1, on_error=lambda e, b: errors.append(e))
    with pytest.raises(Exception) as exc:
        client.track(user_id="u1", event="x")
    assert "503" in str(exc.value) or getattr(exc.value, "status", None) == 503
    assert c.alive()


def _slow_request(url: str, headers: dict[str, str]) -> "socket.socket":
    """A request whose headers promise 100,000 bytes of body of which 20 are sent."""
    import socket
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n{head}\r\n".encode()
                 + b'{"userId": "slow-1", ')
    return sock


def _read_to_eof(sock) -> bytes:
    """Everything the server sends until it closes (the socket's 60 s timeout fails the test)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    return out


def test_slow_clients_are_timed_out_and_capped_and_health_stays_up(make_settings, collectors):
    """The review's attack on a real collector process: requests that send their headers and then
    dribble the body are answered 408 after CLICKPULSE_COLLECTOR_BODY_TIMEOUT_S and closed (with a
    key and without one), a wrong key is refused from the headers alone, requests beyond
    CLICKPULSE_COLLECTOR_MAX_IN_FLIGHT get 503 + Retry-After at once, and /health answers throughout."""
    s = make_settings().replace(collector_body_timeout_s=5.0, collector_max_in_flight=4, collector_retry_after_s=2)
    c = collectors(s)
    wait_for(lambda: c.health() == 200, 60, "the collector's producer to connect")
    auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
    for headers in (auth, {}):  # authenticated, and with the key expected in the body
        raw = _read_to_eof(_slow_request(c.url, headers))
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), raw[:300]
        assert orjson.loads(body)["code"] == "request_timeout"
    wrong = _slow_request(c.url, {"Authorization": "Basic " + base64.b64encode(b"nope:").decode()})
    assert wrong.recv(12) == b"HTTP/1.1 401"  # before the body (which never comes)
    wrong.close()

    slow = [_slow_request(c.url, auth) for _ in range(4)]  # hold every in-flight slot
    try:
        def in_flight() -> float:
            text = urllib.request.urlopen(c.url + "/metrics", timeout=10).read().decode()
            return float(next(ln.split()[1] for ln in text.splitlines()
                              if ln.startswith("clickpulse_collector_in_flight_requests ")))
        wait_for(lambda: in_flight() == 4, 30, "the four slow requests to be in flight")
        # while they are held, a request is refused at once; after the body timeout frees the
        # slots, the same request is accepted (a 200 can come only once all four have ended)
        answers = []

        def refused_then_accepted() -> bool:
            status, headers, body = post(c.url + "/v1/track", orjson.dumps({"userId": "u-ok", "event": "x"}))
            answers.append((status, headers.get("Retry-After"), body.get("code")))
            assert c.health() == 200
            return status == 200
        wait_for(refused_then_accepted, 60, "the collector to accept again after the slow requests' timeout")
        assert answers[0] == (503, "2", "overloaded"), answers
        for sock in slow:  # every slow request was answered 408 and closed
            assert _read_to_eof(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in slow:
            sock.close()
    assert c.alive() and c.health() == 200
    metrics = urllib.request.urlopen(c.url + "/metrics", timeout=10).read().decode()
    assert 'clickpulse_collector_refused_total{code="request_timeout"} 6.0' in metrics
