"""The collector's HTTP server (aiohttp.web) and its Kafka producer (aiokafka).

``Collector(settings).app()`` is the aiohttp application; :func:`run` serves it until SIGINT or
SIGTERM. A request is answered

* ``200 {"success": true}`` once Kafka has acknowledged every record of the request (idempotent
  producer, ``acks=all``: the in-sync replicas have them);
* ``503 {"success": false, "code": "kafka_unavailable", ...}`` with ``Retry-After`` when the
  producer is not connected, or an acknowledgement does not come within
  ``CLICKPULSE_COLLECTOR_ACK_TIMEOUT_S`` or fails: the SDKs retry 5xx, so an event is never
  answered 200 before Kafka has it (at least once: a retried request whose first attempt reached
  Kafka late is published twice, with the same ``messageId``, which the worker de-duplicates);
* ``4xx`` for a request it refuses (:mod:`clickpulse.collector.request`).

Slow and abusive clients (every answer, aiohttp's own 400/404/405/413/500 included, is the
Segment-style JSON body ``{"success": false, "code": ..., "message": ...}``):

* the write key of an ``Authorization`` header is checked from the headers, before the body is
  read (a wrong key: 401 at once); the body is read only for a request with a valid key or with
  no ``Authorization`` header (analytics.js sends ``writeKey`` in the body);
* the whole body must arrive within ``CLICKPULSE_COLLECTOR_BODY_TIMEOUT_S`` (10 s), else ``408
  request_timeout`` and the connection is closed;
* at most ``CLICKPULSE_COLLECTOR_MAX_IN_FLIGHT`` tracking requests are handled at once (each
  holds at most ``CLICKPULSE_COLLECTOR_MAX_BATCH_BYTES`` of body): beyond, ``503 overloaded``
  with ``Retry-After`` at once, body unread, connection closed (``/health`` and ``/metrics``
  are not counted);
* at most ``CLICKPULSE_COLLECTOR_MAX_CONNECTIONS`` connections are open: a connection beyond is
  answered 503 and closed on accept (:mod:`clickpulse.collector.http`); a connection idle (or
  still sending its request line and headers) for ``CLICKPULSE_COLLECTOR_IDLE_TIMEOUT_S`` is
  closed (aiohttp's ``keepalive_timeout``); an unread body left after an early answer is drained
  for at most :data:`LINGER_S` before the connection closes.

The producer is started in the background and restarted until the broker answers, so the
collector serves (503) while Kafka is down and accepts as soon as it is back.

Endpoints: ``POST /v1/{track,page,screen,identify,alias,group,batch,import}`` (and analytics.js'
``/v1/{t,p,s,i,a,g,b}``), ``GET /health`` (200 when the producer is connected and a broker
answers a metadata request, else 503), ``GET /metrics`` (Prometheus text), ``OPTIONS`` (CORS preflight).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import ConfigError
from ..runtime import stop_on_signals
from ..settings import Settings
from .http import fd_headroom_warning, harden
from .request import Limits, RequestError, basic_user, body_write_key, call_of, decode_body, parse_json, records

log = logging.getLogger(__name__)

#: Accept-latency buckets, seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OK = orjson.dumps({"success": True})
_JSON = "application/json"
#: Seconds aiohttp keeps reading (and dropping) a body left unread by an early answer (401, 503,
#: 408) before it closes the connection (its ``lingering_time``, 10 s by default).
LINGER_S = 2.0
#: Error code of the errors aiohttp raises itself (routing, limits), by status.
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "payload_too_large", 414: "bad_request", 431: "bad_request"}
#: Slack over the decoded limit for the raw body (gzip of incompressible data is a little larger).
_RAW_SLACK = 1024


class CollectorMetrics:
    """The collector's Prometheus metrics (own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("clickpulse_collector_requests_total",
                                "Tracking API requests, by call and HTTP status", ["call", "status"], registry=r)
        self.events = Counter("clickpulse_collector_events_total",
                              "Events acknowledged by Kafka and answered 200", registry=r)
        self.refused = Counter("clickpulse_collector_refused_total",
                               "Requests answered 4xx/5xx, by error code", ["code"], registry=r)
        self.latency = Histogram("clickpulse_collector_request_seconds",
                                 "Request time from body read to answer, accepted requests, by kind (single, batch)",
                                 ["kind"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.in_flight = Gauge("clickpulse_collector_in_flight_requests",
                               "Tracking requests being handled (body read, published, answered)", registry=r)
        self.kafka_up = Gauge("clickpulse_collector_kafka_up",
                              "1 while the producer is connected and its last produce succeeded", registry=r)


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Collector:
    """The tracking API over one Kafka producer.

    Parameters
    ----------
    settings
        ``collector_*`` settings, ``kafka_bootstrap`` and ``namespace`` (the raw topic).
    producer_factory
        Builds the producer (tests pass a fake); default :class:`aiokafka.AIOKafkaProducer`
        with ``enable_idempotence=True``, ``acks="all"``.

    Raises
    ------
    ConfigError
        No write key (``CLICKPULSE_COLLECTOR_WRITE_KEYS``).
    """

    def __init__(self, settings: Settings, producer_factory: Any = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.keys = tuple(k.encode() for k in sorted(settings.collector_keys))
        if not self.keys:
            raise ConfigError("CLICKPULSE_COLLECTOR_WRITE_KEYS is empty: the collector would refuse every request "
                              "(set one or more comma-separated write keys)")
        self.limits = Limits(settings.collector_max_event_bytes, settings.collector_max_batch_bytes,
                             settings.collector_max_batch_events)
        self.topic = settings.topic_raw
        self.metrics = CollectorMetrics(registry)
        self.producer: Any = None
        self._factory = producer_factory or self._default_producer
        self._connector: asyncio.Task | None = None
        self._healthy = False
        self._probed = -1.0
        origins = [o.strip() for o in settings.collector_cors_origins.split(",") if o.strip()]
        self._cors_any = "*" in origins
        self._cors_origins = frozenset(origins)
        self._in_flight = 0

    # --- producer -------------------------------------------------------------------------------

    def _default_producer(self) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=s.collector_linger_ms, max_batch_size=256 * 1024,
                                max_request_size=max(1024 * 1024, 2 * s.collector_max_event_bytes),
                                request_timeout_ms=int(max(s.collector_ack_timeout_s, 5) * 1000),
                                client_id="clickpulse-collector")

    async def _connect(self) -> None:
        delay = 0.5
        while self.producer is None:
            p = self._factory()
            try:
                await p.start()
            except asyncio.CancelledError:  # stopped while connecting (e.g. the port was taken)
                with contextlib.suppress(Exception):
                    await asyncio.shield(p.stop())
                raise
            except Exception as err:  # noqa: BLE001 - any failure: Kafka is not there yet
                log.warning("Kafka at %s unavailable (%s: %s); answering 503, retrying in %.1f s",
                            self.settings.kafka_bootstrap, type(err).__name__, err, delay)
                try:
                    await p.stop()
                except Exception:  # noqa: BLE001
                    pass
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.producer = p
            self._set_health(True)
            log.info("producer connected to %s; publishing to %s", self.settings.kafka_bootstrap, self.topic)

    def _set_health(self, ok: bool) -> None:
        self._healthy = ok
        self.metrics.kafka_up.set(1 if ok else 0)

    async def start(self, app: web.Application | None = None) -> None:
        """Start connecting the producer (in the background)."""
        self._set_health(False)
        self._connector = asyncio.create_task(self._connect())

    async def stop(self, app: web.Application | None = None) -> None:
        """Stop the producer (pending records are flushed by ``stop``)."""
        if self._connector is not None:
            self._connector.cancel()
            try:
                await self._connector
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def _publish(self, recs: list[tuple[bytes, bytes]]) -> None:
        p = self.producer
        if len(recs) == 1:
            k, v = recs[0]
            await (await p.send(self.topic, value=v, key=k))
            return
        futs = [await p.send(self.topic, value=v, key=k) for k, v in recs]
        if futs:
            await asyncio.gather(*futs)

    # --- HTTP -------------------------------------------------------------------------------------

    def _authorized(self, key: str | None) -> bool:
        if not key:
            return False
        k = key.encode()
        ok = False
        for good in self.keys:  # constant time per key
            ok |= hmac.compare_digest(k, good)
        return ok

    def _answer(self, call: str, err: RequestError, extra: dict[str, str] | None = None) -> web.Response:
        self.metrics.requests.labels(call, str(err.status)).inc()
        self.metrics.refused.labels(err.code).inc()
        resp = web.Response(status=err.status, body=err.body(), content_type=_JSON, headers=extra)
        if err.status in (408, 503) and err.code != "kafka_unavailable":
            resp.force_close()  # the body is not (all) read: this connection is done
        return resp

    async def _read(self, request: web.Request) -> bytes:
        """The raw body, at most the batch limit, all of it within ``collector_body_timeout_s``.

        Raises
        ------
        RequestError
            400 ``payload_too_large``; 408 ``request_timeout``.
        """
        limit = self.limits.max_batch_bytes + _RAW_SLACK
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(400, "payload_too_large", f"request body is over {self.limits.max_batch_bytes} bytes")
        body = bytearray()
        timeout = self.settings.collector_body_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > limit:
                        raise RequestError(400, "payload_too_large",
                                           f"request body is over {self.limits.max_batch_bytes} bytes")
        except TimeoutError:
            raise RequestError(408, "request_timeout", f"request body not received within {timeout:g} seconds "
                                                       f"({len(body)} bytes arrived)") from None
        return bytes(body)

    async def track(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/<call>``."""
        call = call_of(request.path)
        if call is None:
            return self._answer("unknown", RequestError(404, "not_found", f"no such endpoint: {request.path[:100]}"))
        header_key = basic_user(request.headers.get("Authorization"))
        if request.headers.get("Authorization") and not self._authorized(header_key):
            return self._unauthorized(call)
        try:
            raw = await self._read(request)
            started = time.perf_counter()
            limit = self.limits.max_event_bytes if call not in ("batch", "import") else self.limits.max_batch_bytes
            obj = parse_json(decode_body(raw, request.headers.get("Content-Encoding"), limit))
            if header_key is None and not self._authorized(body_write_key(obj)):
                return self._unauthorized(call)
            recs = records(call, obj, _now_rfc3339(), self.limits)
        except RequestError as err:
            return self._answer(call, err)
        retry = {"Retry-After": str(self.settings.collector_retry_after_s)}
        if self.producer is None:
            return self._answer(call, RequestError(503, "kafka_unavailable", "Kafka is unavailable; retry later"), retry)
        try:
            async with asyncio.timeout(self.settings.collector_ack_timeout_s):  # no extra task, unlike wait_for
                await self._publish(recs)
        except Exception as err:  # noqa: BLE001 - timeout or any Kafka error: not acknowledged
            self._set_health(False)
            log.warning("%d events not acknowledged by Kafka (%s: %s); answered 503", len(recs),
                        type(err).__name__, err)
            return self._answer(call, RequestError(503, "kafka_unavailable",
                                                   "Kafka did not acknowledge the events; retry later"), retry)
        if not self._healthy:
            self._set_health(True)
        self.metrics.latency.labels("batch" if call in ("batch", "import") else "single").observe(
            time.perf_counter() - started)
        self.metrics.events.inc(len(recs))
        self.metrics.requests.labels(call, "200").inc()
        return web.Response(body=_OK, content_type=_JSON)

    def _unauthorized(self, call: str) -> web.Response:
        return self._answer(call, RequestError(401, "unauthorized", "missing or unknown write key"),
                            {"WWW-Authenticate": 'Basic realm="clickpulse collector"'})

    async def _probe(self) -> bool:
        """Ask the brokers for metadata (at most every second, 2 s timeout): the producer's
        connection state, also while no request comes (a load balancer sees recovery)."""
        now = time.monotonic()
        if now - self._probed < 1.0:
            return self._healthy
        self._probed = now
        try:
            ok = bool(await asyncio.wait_for(self.producer.client.force_metadata_update(), 2.0))
        except Exception:  # noqa: BLE001 - timeout or Kafka error: down
            ok = False
        self._set_health(ok)
        return ok

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``: 200 with the producer connected and a broker answering, else 503."""
        up = self.producer is not None and await self._probe()
        return web.Response(status=200 if up else 503, content_type=_JSON,
                            body=orjson.dumps({"status": "ok" if up else "unavailable",
                                               "kafka": "up" if up else "down"}))

    async def metrics_view(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text format."""
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def preflight(self, request: web.Request) -> web.Response:
        """``OPTIONS`` (CORS preflight of the browser SDKs)."""
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
            "Access-Control-Max-Age": "86400"})

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The in-flight cap of tracking requests, and aiohttp's own HTTP errors (404, 405, 413
        raised by routing or limits) as the Segment-style JSON body."""
        tracked = request.method == "POST"
        if tracked:
            if self._in_flight >= self.settings.collector_max_in_flight:
                return self._answer("unknown", RequestError(
                    503, "overloaded", f"{self._in_flight} requests in flight (limit "
                                       f"{self.settings.collector_max_in_flight}); retry later"),
                    {"Retry-After": str(self.settings.collector_retry_after_s)})
            self._in_flight += 1
            self.metrics.in_flight.set(self._in_flight)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            extra = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return self._answer("unknown", RequestError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                                                        f"{exc.reason}: {request.method} {request.path[:100]}"), extra)
        finally:
            if tracked:
                self._in_flight -= 1
                self.metrics.in_flight.set(self._in_flight)

    def error_body(self, status: int, message: str) -> bytes:
        """The JSON body of an error aiohttp answers before any handler (:func:`harden`)."""
        return RequestError(status, _HTTP_CODES.get(status, "http_error" if status < 500 else "internal"),
                            message).body()

    def runner_options(self) -> dict[str, Any]:
        """The ``web.AppRunner`` (and ``TestServer.start_server``) options the collector needs:
        gzip decoded by the collector with its cap, the idle timeout, a short lingering time."""
        return {"auto_decompress": False, "access_log": None,
                "keepalive_timeout": self.settings.collector_idle_timeout_s, "lingering_time": LINGER_S}

    def harden(self, runner: web.BaseRunner) -> web.Server:
        """JSON bodies for aiohttp's own errors and the connection cap on a set-up ``runner``."""
        return harden(runner, self.error_body, self.settings.collector_max_connections,
                      self.settings.collector_retry_after_s)

    @web.middleware
    async def _cors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        origin = request.headers.get("Origin")
        if origin and (self._cors_any or origin in self._cors_origins):
            resp.headers["Access-Control-Allow-Origin"] = "*" if self._cors_any else origin
            if not self._cors_any:
                resp.headers["Vary"] = "Origin"
        return resp

    def app(self) -> web.Application:
        """The aiohttp application (producer started on startup, stopped on cleanup)."""
        middlewares = [self._cors, self._guard] if self._cors_origins else [self._guard]
        app = web.Application(middlewares=middlewares,
                              client_max_size=self.limits.max_batch_bytes + _RAW_SLACK)
        app.router.add_post("/v1/{call}", self.track)
        app.router.add_post("/v1/{call}/", self.track)
        app.router.add_route("OPTIONS", "/v1/{call:.*}", self.preflight)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_view)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Serve the collector on ``collector_host:collector_port`` until cancelled, SIGINT or SIGTERM."""
    collector = Collector(settings)
    runner = web.AppRunner(collector.app(), handle_signals=False, **collector.runner_options())
    await runner.setup()
    collector.harden(runner)
    if (warning := fd_headroom_warning(settings.collector_max_connections)) is not None:
        log.warning("CLICKPULSE_COLLECTOR_MAX_CONNECTIONS: %s", warning)
    site = web.TCPSite(runner, settings.collector_host, settings.collector_port, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()  # stops the producer started on setup (no "Unclosed AIOKafkaProducer")
        raise
    log.info("collector listening on http://%s:%d (topic %s)", settings.collector_host, settings.collector_port,
             settings.topic_raw)
    stop = stop_on_signals()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def loop_factory(choice: str) -> Any:
    """The event loop factory of ``CLICKPULSE_COLLECTOR_EVENT_LOOP``: uvloop's for ``uvloop`` and
    for ``auto`` when uvloop is installed, else ``None`` (asyncio's default loop).

    Raises
    ------
    ConfigError
        ``uvloop`` chosen and not installed.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("CLICKPULSE_COLLECTOR_EVENT_LOOP=uvloop but uvloop is not installed "
                              "(pip install 'clickpulse[collector]')") from None
        return None
    return uvloop.new_event_loop


def run(settings: Settings) -> None:
    """``clickpulse collector``: serve until SIGINT/SIGTERM."""
    Collector(settings)  # configuration errors before the loop starts
    factory = loop_factory(settings.collector_event_loop)
    log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(settings))
