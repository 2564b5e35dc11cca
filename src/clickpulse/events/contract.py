"""The event contract: raw bytes -> canonical event dict, or :class:`InvalidEvent`.

``parse(value, key, ...)`` is the whole ingest step as a pure function. It

1. checks size (``too_large``), decodes key and value as UTF-8 (``key_not_utf8``,
   ``not_utf8``) and JSON with orjson (``not_json``, ``not_object``);
2. maps Segment spec messages (``{"type": "track", "event": "Product Added", "userId": ...}``)
   and Segment event names onto canonical names and fields;
3. requires ``user_id`` or ``anonymous_id`` (``missing_identity``), parses the event time
   (RFC 3339 with offset, or epoch milliseconds; ``bad_timestamp``) and clamps times further
   than ``max_future_skew_ms`` past the receive time (``sent_at``/``received_at`` correct the
   client clock when present, as in Segment's timestamp correction);
4. derives a deterministic ``event_id`` from the content when there is none;
5. validates the result against ``schemas/event.v1.json`` with :mod:`jsonschema`
   (``schema``, the detail names the field path).

The output always has ``event_id``, ``type``, ``timestamp`` (RFC 3339 UTC, ms),
``timestamp_ms`` and ``user_key`` (``user_id`` or ``"anon:" + anonymous_id``).

Examples
--------
>>> ev = parse(b'{"type": "Product Added", "userId": "u1", "timestamp": 1569888000000,'
...            b' "properties": {"product_id": "p1", "price": 9.5}}', None, received_ms=1569888000000)
>>> ev["type"], ev["user_key"], ev["timestamp"]
('add_to_cart', 'u1', '2019-10-01T00:00:00.000Z')
>>> parse(b'{"type": "page_view", "timestamp": 0}', None)
Traceback (most recent call last):
...
clickpulse.errors.InvalidEvent: missing_identity: neither user_id nor anonymous_id is set
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from jsonschema import Draft202012Validator, FormatChecker
from rfc3339_validator import validate_rfc3339

from ..errors import InvalidEvent
from .schemas import load_schema

CANONICAL_TYPES = frozenset({
    "page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start",
    "purchase", "search", "scroll_depth", "dwell", "identify", "consent",
})

#: Segment e-commerce spec v2 event names -> canonical types
#: (https://segment.com/docs/connections/spec/ecommerce/v2/).
SEGMENT_EVENT_NAMES = {
    "Products Searched": "search",
    "Product List Viewed": "page_view",
    "Product List Filtered": "page_view",
    "Product Clicked": "product_click",
    "Product Viewed": "product_view",
    "Product Added": "add_to_cart",
    "Product Removed": "remove_from_cart",
    "Cart Viewed": "cart_view",
    "Checkout Started": "checkout_start",
    "Checkout Step Viewed": "checkout_step",
    "Checkout Step Completed": "checkout_step",
    "Payment Info Entered": "payment_info",
    "Order Completed": "purchase",
    "Order Refunded": "refund",
    "Order Cancelled": "order_cancelled",
}
#: Segment message types (``type`` field of a Segment call) with no ``event`` name.
SEGMENT_CALL_TYPES = {"page": "page_view", "screen": "page_view", "identify": "identify"}

#: Client clock offsets (received_at - sent_at) below this are taken as network transit, not skew.
MIN_CLOCK_OFFSET_MS = 2000

DLQ_REASONS = ("not_utf8", "key_not_utf8", "not_json", "not_object", "too_large",
               "missing_identity", "bad_timestamp", "schema", "internal", "forged_control")

#: Segment camelCase top-level fields -> canonical names.
_SEGMENT_FIELDS = {"userId": "user_id", "anonymousId": "anonymous_id", "messageId": "event_id",
                   "sentAt": "sent_at", "receivedAt": "received_at", "originalTimestamp": "original_timestamp"}

_MIN_TS_MS = 0
_MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_MIN_PLAUSIBLE_MS = 100_000_000_000  # 1973-03-03 in ms; any epoch-seconds value of today is below it
_RFC3339_NO_OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?$")
_is_rfc3339 = validate_rfc3339  # the same checker jsonschema uses for format: date-time

_validator: Draft202012Validator | None = None


def _event_validator() -> Draft202012Validator:
    global _validator
    if _validator is None:
        _validator = Draft202012Validator(load_schema("event"), format_checker=FormatChecker())
    return _validator


def to_rfc3339(ts_ms: int) -> str:
    """Epoch milliseconds -> ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC).

    >>> to_rfc3339(1569888000123)
    '2019-10-01T00:00:00.123Z'
    """
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def parse_timestamp(value: Any, field: str = "timestamp") -> int:
    """RFC 3339 string (offset required) or epoch milliseconds -> epoch milliseconds.

    Raises
    ------
    InvalidEvent
        ``bad_timestamp``: missing, naive (no offset), not RFC 3339, epoch seconds instead of
        milliseconds (a number below 1e11, i.e. before 1973), or outside year 1970–9999.
    """
    if isinstance(value, bool) or value is None:
        raise InvalidEvent("bad_timestamp", f"{field} is missing or not a time: {value!r}")
    if isinstance(value, int | float):
        ms = int(value)
        if 0 < ms < _MIN_PLAUSIBLE_MS:
            raise InvalidEvent("bad_timestamp", f"{field}={value!r} is before 1973 as epoch milliseconds; "
                                                "epoch seconds are not accepted (multiply by 1000)")
    elif isinstance(value, str):
        if not _is_rfc3339(value):
            if _RFC3339_NO_OFFSET.match(value):
                raise InvalidEvent("bad_timestamp", f"{field} has no UTC offset: {value[:64]!r}")
            raise InvalidEvent("bad_timestamp", f"{field} is not RFC 3339 (e.g. 2019-10-01T10:00:00Z): {value[:64]!r}")
        try:
            dt = datetime.fromisoformat(value.replace("z", "Z"))
        except ValueError as err:
            raise InvalidEvent("bad_timestamp", f"{field} is not a valid date-time: {value[:64]!r}") from err
        ms = int(dt.timestamp() * 1000)
    else:
        raise InvalidEvent("bad_timestamp", f"{field} must be an RFC 3339 string or epoch ms, got {type(value).__name__}")
    if not _MIN_TS_MS <= ms <= _MAX_TS_MS:
        raise InvalidEvent("bad_timestamp", f"{field} out of range: {value!r}")
    return ms


def derive_event_id(obj: dict[str, Any], prefix: str = "d") -> str:
    """Deterministic event id from the content: ``prefix-`` + 24 hex chars of SHA-256 over the
    canonical JSON (sorted keys). Identical content gives the identical id, so exact duplicate
    deliveries de-duplicate.

    >>> derive_event_id({"b": 1, "a": 2}) == derive_event_id({"a": 2, "b": 1})
    True
    """
    digest = hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}-{digest[:24]}"


def _map_segment(obj: dict[str, Any]) -> dict[str, Any]:
    """Rename Segment fields and names in place-safe way (returns a new dict when mapped)."""
    if not any(k in obj for k in _SEGMENT_FIELDS) and "event" not in obj and obj.get("type") not in SEGMENT_CALL_TYPES and obj.get("type") != "track":
        return obj
    out = dict(obj)
    for seg, canon in _SEGMENT_FIELDS.items():
        if seg in out:
            out.setdefault(canon, out.pop(seg))
    call = out.get("type")
    if call == "track" or ("event" in out and isinstance(out.get("event"), str)):
        name = out.pop("event", None)
        if isinstance(name, str):
            out["type"] = SEGMENT_EVENT_NAMES.get(name, name)
    elif call in SEGMENT_CALL_TYPES:
        out["type"] = SEGMENT_CALL_TYPES[call]
    if call == "identify" and isinstance(out.get("traits"), dict):
        props = dict(out.get("properties") or {})
        props.setdefault("traits", out.pop("traits"))
        out["properties"] = props
    ctx = out.get("context")
    if isinstance(ctx, dict) and "userAgent" in ctx:
        ctx = dict(ctx)
        ctx.setdefault("user_agent", ctx.pop("userAgent"))
        out["context"] = ctx
    props = out.get("properties")
    if isinstance(props, dict) and "revenue" not in props and isinstance(props.get("total"), int | float) and out.get("type") == "purchase":
        out["properties"] = {**props, "revenue": props["total"]}
    return out


def parse(value: bytes | None, key: bytes | None, *, max_bytes: int = 65536,
          received_ms: int | None = None, max_future_skew_ms: int = 300_000) -> dict[str, Any]:
    """Turn one raw message into a canonical event.

    Parameters
    ----------
    value, key
        The Kafka message value and key, as bytes (``None`` allowed for the key).
    max_bytes
        Size limit of the value in bytes (``CLICKPULSE_MAX_EVENT_BYTES``).
    received_ms
        Receive time in epoch ms (the Kafka message timestamp); used to clamp future times.
        ``None`` disables the clamp.
    max_future_skew_ms
        How far past ``received_ms`` an event time may be before it is clamped.

    Returns
    -------
    dict
        The canonical event (see module docstring); ``context.clock_corrected`` is ``True``
        when the time was corrected.

    Raises
    ------
    InvalidEvent
        With ``reason`` in :data:`DLQ_REASONS`.
    """
    if value is None:
        raise InvalidEvent("not_json", "empty message (null value)")
    if len(value) > max_bytes:
        raise InvalidEvent("too_large", f"value is {len(value)} bytes, limit is {max_bytes}")
    if key is not None:
        try:
            key.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidEvent("key_not_utf8", f"key is not UTF-8 at byte {err.start}") from err
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidEvent("not_utf8", f"value is not UTF-8 at byte {err.start}") from err
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as err:
        raise InvalidEvent("not_json", f"value is not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"value is JSON {type(obj).__name__}, expected an object")
    return normalize(obj, received_ms=received_ms, max_future_skew_ms=max_future_skew_ms)


def normalize(obj: dict[str, Any], *, received_ms: int | None = None,
              max_future_skew_ms: int = 300_000) -> dict[str, Any]:
    """Map, complete and validate one decoded event object (see :func:`parse`)."""
    ev = _map_segment(obj)
    ev.pop("user_key", None)
    for idf in ("user_id", "anonymous_id"):
        v = ev.get(idf)
        if isinstance(v, int) and not isinstance(v, bool):
            ev[idf] = str(v)
        elif v == "" or v is None:
            ev.pop(idf, None)
    if "user_id" not in ev and "anonymous_id" not in ev:
        raise InvalidEvent("missing_identity", "neither user_id nor anonymous_id is set")
    for idf in ("user_id", "anonymous_id"):
        if idf in ev and not isinstance(ev[idf], str):
            raise InvalidEvent("schema", f"{idf}: must be a string, got {type(ev[idf]).__name__}")
    if not isinstance(ev.get("type"), str) or not ev["type"]:
        raise InvalidEvent("schema", "type: missing or not a non-empty string")
    ev["type"] = SEGMENT_EVENT_NAMES.get(ev["type"], ev["type"])
    ts_ms = parse_timestamp(ev.get("timestamp"))
    corrected = False
    if ev.get("sent_at") is not None and ev.get("original_timestamp") is None:
        # Segment's correction: timestamp + (received_at - sent_at) removes the client clock's
        # offset (https://segment.com/docs/connections/spec/common/#timestamp-overview). A message
        # that carries originalTimestamp was corrected upstream (Segment did it): left alone.
        # Offsets under MIN_CLOCK_OFFSET_MS are transit time, not skew.
        recv_raw = ev.get("received_at")
        recv = parse_timestamp(recv_raw, "received_at") if recv_raw is not None else received_ms
        if recv is not None:
            offset = recv - parse_timestamp(ev["sent_at"], "sent_at")
            if abs(offset) >= MIN_CLOCK_OFFSET_MS:
                ts_ms, corrected = ts_ms + offset, True
    if received_ms is not None and ts_ms > received_ms + max_future_skew_ms:
        ts_ms, corrected = received_ms, True
    if not _MIN_TS_MS <= ts_ms <= _MAX_TS_MS:
        raise InvalidEvent("bad_timestamp", "timestamp out of range after clock correction")
    if corrected:
        ev["context"] = {**(ev.get("context") if isinstance(ev.get("context"), dict) else {}), "clock_corrected": True}
    ev["timestamp"] = to_rfc3339(ts_ms)
    ev["timestamp_ms"] = ts_ms
    if not ev.get("event_id"):
        ev["event_id"] = derive_event_id({k: v for k, v in obj.items() if k not in ("received_at", "receivedAt")})
    ev["schema_version"] = 1
    errors = sorted(_event_validator().iter_errors(ev), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        path = ".".join(str(p) for p in err.absolute_path) or "(root)"
        raise InvalidEvent("schema", f"{path}: {err.message[:200]}")
    ev["user_key"] = ev["user_id"] if "user_id" in ev else "anon:" + ev["anonymous_id"]
    return ev
