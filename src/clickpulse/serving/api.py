"""The profile API: ``clickpulse api``, a small read-only HTTP service over the profiles in Redis.

Its own process (scaled apart from the workers), on ``aiohttp.web``; every answer is one or two
Redis round trips and no JSON parsing of the stored profile (its bytes are sent as they are).

* ``GET /v1/profiles/{id}`` — the profile (``schemas/profile.v1.json``) of user key ``id``. A guest
  id resolves to its customer: when identity stitching wrote ``<ns>:alias:<id>`` (the customer's
  user key), the customer's profile is served (aliases are followed up to
  :data:`MAX_ALIAS_HOPS` hops, cycles stop); if the customer has no profile yet, the guest's own
  profile is served. An id with no profile that does not start with ``anon:`` is looked up
  again as ``anon:<id>`` (a raw anonymous id, as the SDKs send it: its user key is
  ``anon:<id>``); a user_id wins over an anonymous id spelled alike. ``404`` when nothing
  exists (the detail names the ``anon:`` form). The header ``Content-Location`` names the
  profile served.
* ``GET /v1/segments/{name}/members?limit=&cursor=`` — the members of a segment, ordered by user
  key, ``limit`` (1–1000, default 100) per page; ``next_cursor`` (opaque; ``null`` on the last
  page) gives the next page. Paging is exact (no member twice, none skipped) for members present
  during the whole walk. ``404`` for a segment no worker declared and with no members.
* ``GET /health`` — ``200`` when Redis answers ``PING``, else ``503``. No key needed.
* ``GET /metrics`` — Prometheus text: ``clickpulse_api_requests_total{route,status}``,
  ``clickpulse_api_request_seconds{route}``, ``clickpulse_api_redis_errors_total``. No key needed.

Auth: every ``/v1/`` request needs one of ``CLICKPULSE_API_KEYS`` in ``Authorization: Bearer
<key>`` or ``X-API-Key: <key>``; otherwise ``401`` with ``WWW-Authenticate: Bearer``. When a
request carries both, it is accepted if either is a valid key (any valid credential suffices: a
stale ``X-API-Key`` added by a proxy does not lock out a client with a valid token, and a wrong
credential never grants anything a valid one would not). Keys are compared as SHA-256 digests
with :func:`hmac.compare_digest`, every presented credential against every configured key.

Errors are JSON ``{"error": <code>, "detail": <text>}``: ``400 bad_request`` (an id or segment name
that no user or segment can have, a bad ``limit`` or ``cursor``), ``401 unauthorized``,
``404 not_found``, ``405 method_not_allowed``, ``503 unavailable`` (Redis unreachable or not answering within
:data:`REQUEST_TIMEOUT_S`; ``Retry-After: 1``). Every error has this
body, also those aiohttp answers before any handler (a URL or header over 8190 bytes, a malformed
request: ``400 bad_request``; :func:`clickpulse.collector.http.harden`). The spec is
``schemas/profile-api.openapi.yaml``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from ..collector.http import harden
from ..errors import ConfigError
from ..runtime import stop_on_signals
from ..settings import Settings
from .redis_sink import alias_key, profile_key, segment_key, segments_index_key

log = logging.getLogger(__name__)

#: how many alias links a profile lookup follows (guest -> customer -> ...)
MAX_ALIAS_HOPS = 4
#: longest accepted user key, characters (``anon:`` + a 128-character anonymous id fits)
MAX_ID_CHARS = 256
#: segment names as the rules file allows them (:mod:`clickpulse.rules.ruleset`)
SEGMENT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
#: seconds one request may wait for Redis before it is answered 503
REQUEST_TIMEOUT_S = 2.0
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: unpadded base64url of at least one byte (the spec's pattern for ``cursor``)
_CURSOR_RE = re.compile(r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?")
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 1.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiMetrics:
    """The API's Prometheus metrics (own registry unless one is given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("clickpulse_api_requests_total", "Profile API requests, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("clickpulse_api_request_seconds", "Profile API time in the handler, by route",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.redis_errors = Counter("clickpulse_api_redis_errors_total", "Requests answered 503 because Redis failed",
                                    registry=r)


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": code, "detail": detail}),
                        content_type="application/json", headers=headers)


def error_body(status: int, detail: str) -> bytes:
    """The JSON error body for ``status`` (also for the errors aiohttp answers itself)."""
    code = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
            503: "unavailable"}.get(status, "bad_request" if status < 500 else "internal")
    return orjson.dumps({"error": code, "detail": detail})


def _cursor_encode(member: bytes) -> str:
    return base64.urlsafe_b64encode(member).decode().rstrip("=")


def _cursor_decode(cursor: str) -> bytes:
    """Raises ValueError for a cursor this service cannot have made."""
    if len(cursor) > 2048 or not _CURSOR_RE.fullmatch(cursor):
        raise ValueError("not a cursor of this API")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError) as err:
        raise ValueError("not a cursor of this API") from err
    if not raw:
        raise ValueError("not a cursor of this API")
    # any bytes are a position in the segment's byte-wise (ZRANGE BYLEX) order: a cursor this
    # service did not make (it encodes user keys, UTF-8) just starts the page after those bytes,
    # so every schema-valid cursor gets a page (schemathesis: no 400 for a schema-valid request)
    return raw


def check_id(user_id: str) -> str | None:
    """Why ``user_id`` cannot be a user key (``None`` when it can)."""
    if not user_id:
        return "empty id"
    if len(user_id) > MAX_ID_CHARS:
        return f"id longer than {MAX_ID_CHARS} characters"
    if _CONTROL.search(user_id):
        return "id with control characters"
    return None


class ProfileApi:
    """Request handlers over one ``redis.asyncio.Redis`` client.

    Parameters
    ----------
    client
        ``redis.asyncio.Redis`` (connection pool; any client with ``mget``, ``get``, ``ping`` and
        ``pipeline``).
    namespace
        Key prefix (``CLICKPULSE_NAMESPACE``).
    api_keys
        Accepted keys; must not be empty (:class:`clickpulse.errors.ConfigError`).
    """

    def __init__(self, client: Any, namespace: str, api_keys: tuple[str, ...],
                 metrics: ApiMetrics | None = None) -> None:
        if not api_keys:
            raise ConfigError("clickpulse api needs CLICKPULSE_API_KEYS (comma-separated keys of >= 16 characters)")
        self.client = client
        self.ns = namespace
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in api_keys)
        self.metrics = metrics or ApiMetrics()

    # -- auth --------------------------------------------------------------------------------------
    def authorized(self, request: web.Request) -> bool:
        """True when ``X-API-Key`` or the ``Authorization: Bearer`` token is a configured key
        (either suffices when both are sent)."""
        presented = []
        key = request.headers.get("X-API-Key")
        if key:
            presented.append(key)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            presented.append(token.strip())
        ok = False
        for cred in presented:
            digest = hashlib.sha256(cred.encode(errors="surrogateescape")).digest()
            for d in self._digests:  # every key compared: the time does not tell which matched
                ok |= hmac.compare_digest(d, digest)
        return ok

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        started = time.perf_counter()
        try:
            if request.path.startswith("/v1/") and not self.authorized(request):
                resp: web.StreamResponse = _error(401, "unauthorized", "missing or invalid API key",
                                                  {"WWW-Authenticate": 'Bearer realm="clickpulse"'})
            else:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    try:
                        resp = await handler(request)
                    except (ConnectionError, RedisConnectionError):
                        # a pooled connection Redis closed (e.g. it restarted): every handler is a
                        # read, so try once more on a fresh connection before answering 503
                        resp = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405 for unknown paths and methods
            resp = web.Response(status=exc.status, body=error_body(exc.status, exc.reason),
                                content_type="application/json",
                                headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
        except (ConnectionError, TimeoutError, OSError) as err:
            resp = self._unavailable(err)
        except RedisError as err:
            resp = self._unavailable(err)
        self.metrics.requests.labels(route, str(resp.status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        return resp

    def _unavailable(self, err: BaseException) -> web.Response:
        self.metrics.redis_errors.inc()
        log.warning("redis failed: %s: %s", type(err).__name__, err)
        return _error(503, "unavailable", "the profile store is unavailable", {"Retry-After": "1"})

    # -- handlers ----------------------------------------------------------------------------------
    async def profile(self, request: web.Request) -> web.Response:
        user_id = request.match_info["id"]
        why = check_id(user_id)
        if why is not None:
            return _error(400, "bad_request", why)
        served, body = await self._resolve(user_id)
        if body is None and not user_id.startswith("anon:") and check_id("anon:" + user_id) is None:
            # a raw anonymous id (the SDK's anonymousId): its user key is anon:<id>
            served, body = await self._resolve("anon:" + user_id)
        if body is None:
            hint = "" if user_id.startswith("anon:") else \
                " (looked up as a user_id and as the anonymous id anon:<id>)"
            return _error(404, "not_found", "no profile for this id" + hint)
        from urllib.parse import quote
        return web.Response(body=body, content_type="application/json",
                            headers={"Content-Location": "/v1/profiles/" + quote(served, safe="")})

    async def _resolve(self, user_id: str) -> tuple[str, bytes | None]:
        """(user key served, profile bytes or None) for ``user_id``, following guest aliases."""
        ns, client = self.ns, self.client
        alias, own = await client.mget([alias_key(ns, user_id), profile_key(ns, user_id)])
        served, body = user_id, own
        seen = {user_id}
        hops = 0
        while alias is not None and hops < MAX_ALIAS_HOPS:
            target = alias.decode(errors="replace")
            if target in seen:
                break
            seen.add(target)
            hops += 1
            alias, prof = await client.mget([alias_key(ns, target), profile_key(ns, target)])
            if prof is not None:
                served, body = target, prof
        return served, body

    async def members(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not SEGMENT_NAME_RE.match(name):
            return _error(400, "bad_request", "not a segment name ([A-Za-z][A-Za-z0-9_.-]{0,63})")
        q = request.query
        try:
            limit = int(q.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return _error(400, "bad_request", "limit must be an integer")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, "bad_request", f"limit must be in [1, {MAX_LIMIT}]")
        start = b"-"
        if "cursor" in q:
            try:
                start = b"(" + _cursor_decode(q["cursor"])
            except ValueError as err:
                return _error(400, "bad_request", str(err))
        key = segment_key(self.ns, name)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.sismember(segments_index_key(self.ns), name)
            pipe.zcard(key)
            pipe.zrange(key, start, b"+", bylex=True, offset=0, num=limit + 1)
            known, count, page = await pipe.execute()
        if not known and not count:
            return _error(404, "not_found", "no such segment")
        more = len(page) > limit
        page = page[:limit]
        body = {"segment": name, "count": count, "members": [m.decode(errors="replace") for m in page],
                "next_cursor": _cursor_encode(page[-1]) if more else None}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        try:
            await self.client.ping()
        except Exception as err:  # noqa: BLE001 - any failure means not healthy
            return _error(503, "unavailable", f"redis: {type(err).__name__}")
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


#: the :class:`ProfileApi` of an application made by :func:`create_api`
API_KEY: web.AppKey[ProfileApi] = web.AppKey("clickpulse_profile_api", ProfileApi)


def create_api(settings: Settings, client: Any = None, metrics: ApiMetrics | None = None) -> web.Application:
    """The ``aiohttp`` application of the profile API for ``settings`` (``client``: a
    ``redis.asyncio.Redis``; default one on ``CLICKPULSE_REDIS_URL``, closed with the app).

    Raises
    ------
    ConfigError
        No API key configured, or no Redis URL.
    """
    own = client is None
    if own:
        if not settings.redis_url:
            raise ConfigError("clickpulse api needs CLICKPULSE_REDIS_URL")
        import redis.asyncio as aioredis
        # no socket_timeout: redis-py would arm an asyncio timer around every read and write (a
        # third of the handler's CPU in a profile); the middleware bounds each request instead
        client = aioredis.from_url(settings.redis_url, socket_connect_timeout=REQUEST_TIMEOUT_S,
                                   max_connections=256)
    api = ProfileApi(client, settings.namespace, settings.api_key_list, metrics)
    app = web.Application(middlewares=[api.middleware], client_max_size=64 * 1024)
    app.router.add_get("/v1/profiles/{id}", api.profile, name="profile", allow_head=False)
    app.router.add_get("/v1/segments/{name}/members", api.members, name="segment_members", allow_head=False)
    app.router.add_get("/health", api.health, name="health", allow_head=False)
    app.router.add_get("/metrics", api.metrics_page, name="metrics", allow_head=False)
    app[API_KEY] = api
    if own:
        async def close(_app: web.Application) -> None:
            await client.aclose()
        app.on_cleanup.append(close)
    return app


#: ``web.AppRunner`` options of ``clickpulse api``: idle connections closed after 15 s (aiohttp's
#: default keeps them an hour), a body left unread drained for at most 2 s
RUNNER_OPTIONS: dict[str, Any] = {"access_log": None, "keepalive_timeout": 15.0, "lingering_time": 2.0}


def harden_api(runner: web.BaseRunner) -> web.Server:
    """aiohttp's own errors (URL or header too long, malformed request) with the API's JSON
    body, on a set-up ``runner`` (:func:`clickpulse.collector.http.harden`)."""
    return harden(runner, error_body)


async def serve(settings: Settings, host: str, port: int) -> None:
    """Serve the API on ``host:port`` until cancelled, SIGINT or SIGTERM."""
    runner = web.AppRunner(create_api(settings), handle_signals=False, **RUNNER_OPTIONS)
    await runner.setup()
    harden_api(runner)
    await web.TCPSite(runner, host, port).start()
    print(f"clickpulse api listening on http://{host}:{port} (namespace {settings.namespace})", flush=True)
    stop = stop_on_signals()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the API until SIGTERM/SIGINT (``clickpulse api``)."""
    host, port = host or settings.api_host, port or settings.api_port
    factory = None
    if os.environ.get("CLICKPULSE_API_UVLOOP", "1") != "0":
        try:
            import uvloop
            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(settings, host, port))
