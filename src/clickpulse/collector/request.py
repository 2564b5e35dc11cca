"""One tracking-API request -> the Kafka records it stands for, or a :class:`RequestError`.

Pure functions (no I/O) shared by the server (:mod:`clickpulse.collector.server`) and its tests:

* :func:`call_of` maps a path (``/v1/track``, ``/v1/batch``, analytics.js' short ``/v1/t``, ...)
  to a call;
* :func:`decode_body` undoes ``Content-Encoding: gzip`` with a cap on the decoded size (a gzip
  bomb stops at ``limit + 1`` bytes);
* :func:`basic_user` reads the write key of an ``Authorization: Basic`` header (Segment and
  RudderStack: the key is the user name, the password empty);
* :func:`records` turns the decoded body into ``(key, value)`` records for ``<ns>.events.raw``.

What is checked here is what the collector needs to answer for the request as a whole: the body
is JSON, an object, a ``batch`` is a list of at most ``max_events`` objects, every event has an
identity (``userId`` or ``anonymousId``, a non-empty string or an integer: it is the Kafka key)
and is at most ``max_event_bytes`` as published. The event's content (type, time, properties) is
the worker's to check (:func:`clickpulse.events.contract.parse`, dead-lettered with a reason),
exactly as for any other producer of the raw topic.

Error codes (``code`` of the 4xx body ``{"success": false, "code": ..., "message": ...}``, the
shape the Segment libraries read): ``invalid_request`` (not JSON, not an object, a bad batch),
``payload_too_large`` (body or event over its limit, too many events), ``bad_encoding`` (bad
gzip), ``unsupported_encoding`` (415), ``no_user_anon_id`` (an event without identity),
``unauthorized`` (401), ``not_found`` (404); and from the server
(:mod:`clickpulse.collector.server`): ``request_timeout`` (408, body not received in time),
``method_not_allowed`` (405), ``overloaded`` and ``kafka_unavailable`` (503), ``bad_request``
(aiohttp's own 400s: a request line or header too long, a malformed request).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

#: Single-event calls of the Segment/RudderStack HTTP tracking API (``POST /v1/<call>``); the
#: call becomes the message's ``type``.
SINGLE_CALLS = ("track", "page", "screen", "identify", "alias", "group")
#: Calls whose body is ``{"batch": [message, ...], ...}`` (``import`` is Segment's historical batch).
BATCH_CALLS = ("batch", "import")
#: analytics.js (analytics-next) posts to the call's first letter: ``/v1/t``, ``/v1/p``, ...
_SHORT = {"t": "track", "p": "page", "s": "screen", "i": "identify", "a": "alias", "g": "group", "b": "batch"}
#: Message fields that never reach Kafka: the write key is a credential.
_DROPPED = ("writeKey",)


@dataclass(frozen=True)
class Limits:
    """Request limits, in bytes and events (Segment's by default: 32 KB per event, 500 KB per
    request, 2500 events per batch)."""

    max_event_bytes: int = 32768
    max_batch_bytes: int = 512000
    max_batch_events: int = 2500


class RequestError(Exception):
    """A request the collector refuses: HTTP ``status``, Segment-style ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> bytes:
        """``{"success": false, "code": ..., "message": ...}`` as JSON bytes."""
        return orjson.dumps({"success": False, "code": self.code, "message": self.message})


def call_of(path: str) -> str | None:
    """The call of a request path (``/v1/track`` -> ``track``, ``/v1/t`` -> ``track``, a trailing
    slash allowed), ``None`` for any other path.

    >>> call_of("/v1/batch"), call_of("/v1/p/"), call_of("/v2/track")
    ('batch', 'page', None)
    """
    if not path.startswith("/v1/"):
        return None
    name = path[4:].rstrip("/")
    if name in SINGLE_CALLS or name in BATCH_CALLS:
        return name
    return _SHORT.get(name)


def decode_body(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body with its ``Content-Encoding`` undone: ``identity`` (or none) and ``gzip``
    (one member or several concatenated).

    Parameters
    ----------
    raw
        The body as received.
    encoding
        The ``Content-Encoding`` header (case-insensitive), ``None`` when absent.
    limit
        Most bytes the decoded body may have; decoding stops at ``limit + 1`` bytes, so a gzip
        bomb costs at most that much memory.

    Raises
    ------
    RequestError
        400 ``payload_too_large`` (over ``limit``), 400 ``bad_encoding`` (not gzip, truncated,
        trailing bytes that are not another gzip member), 415 ``unsupported_encoding`` (another encoding).
    """
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        out = raw
    elif enc in ("gzip", "x-gzip"):
        out = _gunzip(raw, limit)
    else:
        raise RequestError(415, "unsupported_encoding", f"Content-Encoding {enc[:32]!r} is not supported (gzip or none)")
    if len(out) > limit:
        raise RequestError(400, "payload_too_large", f"request body is over {limit} bytes")
    return out


def _gunzip(raw: bytes, limit: int) -> bytes:
    """``raw`` gunzipped, one member after another (RFC 1952 2.2: a gzip file is a series of
    members, and ``gzip -c a b``, Go's and Java's writers produce several); at most ``limit + 1``
    bytes are decoded in all, so a bomb split over many members is capped as one."""
    parts: list[bytes] = []
    size = 0
    rest = raw
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            part = d.decompress(rest, limit + 1 - size)
        except zlib.error as err:
            where = "body is" if not parts else "bytes after the end of a gzip member are"
            raise RequestError(400, "bad_encoding", f"{where} not valid gzip: {err}") from err
        parts.append(part)
        size += len(part)
        if size > limit:
            break
        if not d.eof:
            raise RequestError(400, "bad_encoding", "gzip body is truncated")
        rest = d.unused_data
        if not rest:
            break
        if not rest.startswith(b"\x1f\x8b"):
            raise RequestError(400, "bad_encoding", "bytes after the end of the gzip stream")
    return b"".join(parts)


def basic_user(header: str | None) -> str | None:
    """The user name of an ``Authorization: Basic base64(user:password)`` header, else ``None``.

    >>> basic_user("Basic " + base64.b64encode(b"key1:").decode())
    'key1'
    >>> basic_user("Bearer x") is None, basic_user("Basic !!!") is None
    (True, True)
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user = text.partition(":")[0]
    return user or None


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object.

    Raises
    ------
    RequestError
        400 ``invalid_request``: not UTF-8 ("body is not valid UTF-8"), not JSON, or not an object.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as uerr:
            raise RequestError(400, "invalid_request",
                               f"body is not valid UTF-8 (byte {uerr.start}: {uerr.reason})") from err
        raise RequestError(400, "invalid_request", f"body is not valid JSON: {str(err)[:200]}") from err
    if not isinstance(obj, dict):
        raise RequestError(400, "invalid_request", f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def body_write_key(obj: dict[str, Any]) -> str | None:
    """``writeKey`` of a body (analytics.js sends it there instead of a header)."""
    key = obj.get("writeKey")
    return key if isinstance(key, str) and key else None


def identity_key(msg: dict[str, Any]) -> bytes | None:
    """The Kafka key of a message: ``userId``, else ``"anon:" + anonymousId`` (as the worker's
    ``user_key``; integers as their decimal text), ``None`` without a usable identity."""
    uid = msg["user_id"] if "user_id" in msg else msg.get("userId")  # the contract's precedence
    if isinstance(uid, str) and uid or isinstance(uid, int) and uid.__class__ is not bool:
        return str(uid).encode()
    aid = msg["anonymous_id"] if "anonymous_id" in msg else msg.get("anonymousId")
    if isinstance(aid, str) and aid or isinstance(aid, int) and aid.__class__ is not bool:
        return ("anon:" + str(aid)).encode()
    return None


def records(call: str, obj: dict[str, Any], received_at: str, limits: Limits) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` records of one request, in order.

    Every message gets ``receivedAt = received_at`` (the collector's clock; any sent value is
    replaced) and loses ``writeKey``; one with neither ``timestamp`` nor ``originalTimestamp``
    gets ``timestamp = received_at`` (Segment's HTTP API treats the time as optional and uses the
    receive time). A single call's ``type`` is the call. A batch's top-level
    ``sentAt`` is given to messages without one and its ``context`` is merged under each
    message's own (the message's keys win), as Segment does.

    Raises
    ------
    RequestError
        400 ``invalid_request``, ``payload_too_large`` or ``no_user_anon_id`` (see the module
        docstring); the message names the event's index in a batch.
    """
    if call in BATCH_CALLS:
        batch = obj.get("batch")
        if not isinstance(batch, list):
            raise RequestError(400, "invalid_request", "batch must be a list of messages")
        if len(batch) > limits.max_batch_events:
            raise RequestError(400, "payload_too_large",
                               f"batch has {len(batch)} events, limit is {limits.max_batch_events}")
        sent_at = obj.get("sentAt")
        ctx = obj.get("context")
        msgs = []
        for i, m in enumerate(batch):
            if not isinstance(m, dict):
                raise RequestError(400, "invalid_request", f"batch[{i}] is {type(m).__name__}, expected an object")
            if sent_at is not None and m.get("sentAt") is None:
                m["sentAt"] = sent_at
            if isinstance(ctx, dict) and ctx:
                own = m.get("context")
                if own is None:
                    m["context"] = ctx
                elif isinstance(own, dict):
                    m["context"] = {**ctx, **own}
            msgs.append(m)
    else:
        obj["type"] = call
        msgs = [obj]
    out = []
    for i, m in enumerate(msgs):
        where = f"batch[{i}]" if call in BATCH_CALLS else "event"
        key = identity_key(m)
        if key is None:
            raise RequestError(400, "no_user_anon_id", f"{where} has neither userId nor anonymousId "
                                                       "(a non-empty string or an integer)")
        for name in _DROPPED:
            m.pop(name, None)
        m["receivedAt"] = received_at
        if m.get("timestamp") is None and m.get("originalTimestamp") is None:
            m["timestamp"] = received_at  # Segment: an event sent without a time happened when received
        try:
            value = orjson.dumps(m)
        except TypeError as err:  # nested deeper than orjson writes (254 levels)
            raise RequestError(400, "invalid_request", f"{where} cannot be encoded: {err}") from err
        if len(value) > limits.max_event_bytes:
            raise RequestError(400, "payload_too_large",
                               f"{where} is {len(value)} bytes, limit is {limits.max_event_bytes}")
        out.append((key, value))
    return out
