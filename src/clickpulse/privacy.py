"""Erasure and export of one user's data (GDPR articles 15, 17 and 20), from the command line.

* :func:`request_erase` publishes an erase request (``schemas/privacy_request.v1.json``) on the
  internal ``<ns>.privacy`` topic, keyed by the user key, so it reaches — in order with the
  user's events — the worker that owns the user. The worker deletes the user's state (a
  changelog tombstone), timers, pending predictions and segment memberships, deletes the Redis
  profile, tombstones the user's quarantine record, removes its identity links (a customer's
  merged guests get their own erase request, which removes each guest's forwarding stub and its
  ``<ns>:alias:<guest>`` Redis key; erasing a guest key removes that guest's stub and link only,
  its merged history is the customer's: docs/identity.md) and publishes an audit record on
  ``<ns>.privacy.audit`` (the user key only as its SHA-256). :func:`request_erase` waits for that
  record and then for the Redis profile key to be gone (the worker's write-behind flush deletes
  it a few seconds after the audit is published).
* :func:`export_user` gathers everything clickpulse stores about a user: the latest state in the
  table's changelog (decoded), the Redis profile and the quarantine record, as one JSON object.

Not rewritten by an erasure (stated in the README's privacy section): the append-only topics
(raw, valid, dead-letter, actions, segments, training) keep the user's records until their
retention removes them (7 days; 30 for the dead-letter topic); superseded values on the compacted
changelog are removed by compaction within ``max.compaction.lag.ms`` (1 day).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from .errors import ServiceError
from .settings import Settings


def _now_rfc3339() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _send(settings: Settings, topic: str, key: bytes, value: bytes) -> None:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    try:
        await p.start()  # inside the try: a broker that does not answer must not leave it unclosed
        await (await p.send(topic, key=key, value=value))
    finally:
        await p.stop()


def request_erase(settings: Settings, user_key: str, *, wait: bool = True, timeout_s: float = 120.0) -> dict[str, Any]:
    """Ask the workers to erase ``user_key``; returns the audit record (``wait``) or the request.

    Raises
    ------
    ServiceError
        ``wait`` and no audit record for the request within ``timeout_s`` (no worker running?).
    """
    req = {"schema_version": 1, "request": "erase", "request_id": str(uuid.uuid4()), "user_key": user_key,
           "requested_at": _now_rfc3339()}
    audit = send_request(settings, req, wait=wait, timeout_s=timeout_s)
    if wait:
        wait_profile_deleted(settings, user_key, time.monotonic() + timeout_s)
    return audit


def send_request(settings: Settings, req: dict[str, Any], *, wait: bool, timeout_s: float) -> dict[str, Any]:
    """Publish ``req`` (a ``privacy_request.v1`` record) on ``<ns>.privacy`` keyed by its
    ``user_key``; returns its audit record from ``<ns>.privacy.audit`` (``wait``) or ``req``.

    Raises
    ------
    ServiceError
        ``wait`` and no audit record for the request within ``timeout_s`` (no worker running?).
    """
    from .runtime import read_topic
    asyncio.run(_send(settings, settings.topic_privacy, req["user_key"].encode(), orjson.dumps(req)))
    if not wait:
        return req
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for key, value, _m in asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_privacy_audit)):
            if key == req["request_id"].encode() and value is not None:
                return orjson.loads(value)  # type: ignore[no-any-return]
        time.sleep(1.0)
    raise ServiceError(f"no audit record for {req['request']} request {req['request_id']} within {timeout_s:g} s "
                       f"(is a worker of namespace {settings.namespace!r} running?)")


def wait_profile_deleted(settings: Settings, user_key: str, deadline: float) -> None:
    """Return once the user's Redis profile key is gone (no Redis configured: at once).

    The worker publishes the audit record (``removed.redis_profile: true``) when it has queued
    the key's deletion; the write-behind flush deletes it within ``CLICKPULSE_REDIS_FLUSH_INTERVAL_S``
    (retried until Redis answers). Waiting here makes what ``clickpulse privacy erase`` prints true
    when it is printed.

    Raises
    ------
    ServiceError
        The key is still there at ``deadline`` (``time.monotonic()``).
    """
    if not settings.redis_url:
        return
    import redis

    from .serving.redis_sink import profile_key
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    name = profile_key(settings.namespace, user_key)
    try:
        while client.exists(name):
            if time.monotonic() >= deadline:
                raise ServiceError(f"the worker recorded the erasure, but the Redis profile {name} is still there "
                                   "(its deletion is queued on the worker and retried until Redis answers); "
                                   "check the worker's log and clickpulse_redis_errors_total")
            time.sleep(0.5)
    finally:
        client.close()


def plain(obj: Any) -> Any:
    """A JSON-friendly copy of a state object (dataclasses, slotted objects, dicts, lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [plain(v) for v in obj]
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    names = getattr(obj, "__slots__", None) or list(vars(obj))
    return {n: plain(getattr(obj, n, None)) for n in names}


def export_user(settings: Settings, user_key: str) -> dict[str, Any]:
    """Everything stored about ``user_key`` (reads the whole changelog: O(table) — a tool, not an API)."""
    import redis

    from .runtime import read_topic
    from .serving.redis_sink import alias_key, profile_key
    from .state.user import UserState
    key = user_key.encode()
    raw = None
    for k, v, _m in asyncio.run(read_topic(settings.kafka_bootstrap, settings.changelog_topic)):
        if k == key:
            raw = v  # the latest value wins; a tombstone (None) means erased or expired
    state = None
    if raw is not None:
        state = plain(UserState.from_bytes(raw))
    quarantine = None
    for k, v, _m in asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_quarantine)):
        if k == key:
            quarantine = None if v is None else orjson.loads(v)
    profile = alias = None
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        value = client.get(profile_key(settings.namespace, user_key))
        profile = None if value is None else orjson.loads(value)
        link = client.get(alias_key(settings.namespace, user_key))
        alias = None if link is None else link.decode()
    return {"user_key": user_key, "exported_at": _now_rfc3339(), "namespace": settings.namespace,
            "state": state, "profile": profile, "quarantine": quarantine, "alias_of": alias}
