"""The event contract: raw bytes -> canonical event dict, or :class:`InvalidEvent`.

``parse(value, key, ...)`` is the whole ingest step as a pure function. It

1. checks size (``too_large``), decodes key and value as UTF-8 (``key_not_utf8``,
   ``not_utf8``) and JSON with orjson (``not_json``, ``not_object``);
2. brings what the Segment/RudderStack libraries send into shape (:func:`map_real_payload`:
   ``originalTimestamp`` without ``timestamp``, currency in any case, ``context.device`` and
   other context objects, identify traits in ``context.traits``, ``products[]`` totals), then
   maps Segment spec messages (``{"type": "track", "event": "Product Added", "userId": ...}``)
   and Segment event names onto canonical names and fields;
3. strips surrounding whitespace from the ids (a blank id is absent), requires ``user_id`` or
   ``anonymous_id`` (``missing_identity``), checks them (:func:`check_identity`: printable, at
   most 128 characters, no ``user_id`` in the guest key space ``anon:``; ``bad_identity``),
   parses the event time (RFC 3339 with offset, or epoch milliseconds, any number below 1e11
   refused as epoch seconds; ``bad_timestamp``) and clamps times further
   than ``max_future_skew_ms`` past the receive time (``sent_at``/``received_at`` correct the
   client clock when present, as in Segment's timestamp correction);
4. derives a deterministic ``event_id`` from the content when there is none;
5. validates the result against ``schemas/event.v1.json`` (``schema``, the detail names the
   field path): with a validator compiled from the schema by :mod:`fastjsonschema`, and, only
   when that one rejects the event, with :mod:`jsonschema` (``Draft202012Validator`` with format
   checking), whose first error (by field path) is the detail and whose verdict is final;
6. bounds money and quantities (``out_of_range``): the numeric money fields of ``properties``
   (:data:`MONEY_FIELDS`) must be finite with ``abs(x) <= max_money`` and ``quantity`` at most
   ``max_quantity``, so no event can push a user's lifetime revenue to ``inf``; then any integer
   anywhere in the event outside ``[-(2**53 - 1), 2**53 - 1]`` (:data:`MAX_JSON_INT`) is
   ``out_of_range`` (found by orjson's strict-integer writer, about 0.2 µs; the path by a walk
   only then).

Every string the state keeps has a schema limit (``schema``, ``... is too long (maxLength N)``;
listed in the README, *Topics and schemas*), and schema details are built from the failed rule,
never from the value (:func:`describe_error`). A key repeated in one JSON object is not
detected: the last value wins (orjson's reading).

JSON numbers beyond the double range (``1e400``) and ``NaN``/``Infinity`` are refused by the JSON
decoder (``not_json``); :func:`normalize`, which takes already-decoded objects, rejects any
non-finite float anywhere in the object (``out_of_range``).

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
>>> parse(b'{"type": "purchase", "userId": "u1", "timestamp": 1569888000000,'
...       b' "properties": {"revenue": 9e307}}', None)
Traceback (most recent call last):
...
clickpulse.errors.InvalidEvent: out_of_range: properties.revenue: 9e+307 is outside [-1e+09, 1e+09] (CLICKPULSE_MAX_MONEY)
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import fastjsonschema
import orjson
from jsonschema import Draft202012Validator, FormatChecker
from rfc3339_validator import validate_rfc3339

from ..errors import InvalidEvent
from .schemas import load_schema

log = logging.getLogger(__name__)

CANONICAL_TYPES = frozenset({
    "page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start",
    "purchase", "search", "scroll_depth", "dwell", "identify", "consent", "alias",
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
SEGMENT_CALL_TYPES = {"page": "page_view", "screen": "page_view", "identify": "identify", "alias": "alias"}

#: Client clock offsets (received_at - sent_at) below this are taken as network transit, not skew.
MIN_CLOCK_OFFSET_MS = 2000

DLQ_REASONS = ("not_utf8", "key_not_utf8", "not_json", "not_object", "too_large",
               "missing_identity", "bad_timestamp", "schema", "internal", "out_of_range",
               "forged_control", "bad_identity", "state_too_large")

#: Largest magnitude of a JSON integer anywhere in an event: 2**53 - 1 (JavaScript's
#: ``Number.MAX_SAFE_INTEGER``), the range every JSON implementation (and a float64) holds
#: exactly; larger ones are ``out_of_range``.
MAX_JSON_INT = 2**53 - 1
#: Prefix of the ``user_key`` of a guest (``"anon:" + anonymous_id``): a ``user_id`` may not start
#: with it (``bad_identity``), so no customer id can address a guest's state.
ANON_PREFIX = "anon:"
#: Identity fields checked by :func:`check_identity`.
ID_FIELDS = ("user_id", "anonymous_id", "previous_id")

#: Money fields of ``properties`` (in ``currency``): ``price`` (unit price) and ``revenue`` are
#: what :mod:`clickpulse.state.user` adds up; ``total`` becomes ``revenue`` of a Segment
#: ``Order Completed``; ``value`` is Segment's generic money value. When numeric, each must be
#: finite with ``abs(x) <= max_money``.
MONEY_FIELDS = ("price", "total", "value", "revenue")
#: Default bound of a money field, in units of ``currency`` (``CLICKPULSE_MAX_MONEY``).
DEFAULT_MAX_MONEY = 1e9
#: Default bound of ``properties.quantity``, in units (``CLICKPULSE_MAX_QUANTITY``).
DEFAULT_MAX_QUANTITY = 10_000

#: Segment camelCase top-level fields -> canonical names.
_SEGMENT_FIELDS = {"userId": "user_id", "anonymousId": "anonymous_id", "messageId": "event_id",
                   "sentAt": "sent_at", "receivedAt": "received_at", "originalTimestamp": "original_timestamp",
                   "previousId": "previous_id"}
#: Top-level keys and ``type`` values that mark a Segment message (anything to map).
_SEGMENT_KEYS = frozenset(_SEGMENT_FIELDS) | {"event"}
_SEGMENT_TYPES = frozenset(SEGMENT_CALL_TYPES) | {"track"}

_MIN_TS_MS = 0
_MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_MIN_PLAUSIBLE_MS = 100_000_000_000  # 1973-03-03 in ms; any epoch-seconds value of today is below it
_RFC3339_NO_OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?$")
_is_rfc3339 = validate_rfc3339  # the same checker jsonschema uses for format: date-time

_validator: Draft202012Validator | None = None
_compiled: Callable[[Any], Any] | None = None


def _event_validator() -> Draft202012Validator:
    global _validator
    if _validator is None:
        _validator = Draft202012Validator(load_schema("event"), format_checker=FormatChecker())
    return _validator


def _schema_patterns(node: Any) -> set[str]:
    """Every ``pattern`` keyword value in a schema."""
    out: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if isinstance(n.get("pattern"), str):
                out.add(n["pattern"])
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return out


def compiled_validator() -> Callable[[Any], Any]:
    """The validator :mod:`fastjsonschema` compiles from ``schemas/event.v1.json`` (once).

    Called with an event dict it returns it when valid and raises
    :class:`fastjsonschema.JsonSchemaException` when not. It checks ``format: date-time`` with
    jsonschema's own checker, and ``pattern`` with :func:`re.search` on the pattern as written,
    as jsonschema does (fastjsonschema would read ``$`` as end of string, ``\\Z``, where Python's
    ``$`` also matches before a final newline), so that it accepts exactly what
    :func:`validate_slow` accepts (``tests/unit/test_contract_conformance.py``).
    """
    global _compiled
    if _compiled is None:
        schema = load_schema("event")
        checker = FormatChecker(formats=("date-time",))

        def date_time(value: str) -> bool:
            return checker.conforms(value, "date-time")

        fn = fastjsonschema.compile(schema, formats={"date-time": date_time}, use_default=False)
        regexes = fn.__wrapped__.__globals__["REGEX_PATTERNS"]
        for pattern in _schema_patterns(schema.get("properties", {})):
            if pattern not in regexes:
                raise RuntimeError(f"fastjsonschema did not compile the schema pattern {pattern!r}")
            regexes[pattern] = re.compile(pattern)
        _compiled = fn
    return _compiled


def _kind_of(x: Any) -> str:
    """The JSON type name of a decoded value."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(type(x), type(x).__name__)


def _path_part(p: Any) -> str:
    """A field path element as a detail shows it: a key longer than 64 characters or with
    characters outside printable ASCII is shown by its length only."""
    s = str(p)
    return s if len(s) <= 64 and s.isascii() and s.isprintable() else f"<key of {len(s)} characters>"


def describe_error(err: Any) -> str:
    """A :class:`jsonschema.ValidationError` as ``"<path>: <rule>"`` built from the failed keyword,
    its limit and the size or type of the value, never from the value itself, so the reason
    (``too long``, ``above the maximum``...) survives redaction of the dead-letter detail
    (:func:`clickpulse.events.pii.redact_detail`) and no PII is echoed.

    >>> from jsonschema import Draft202012Validator
    >>> e = next(Draft202012Validator({"properties": {"a": {"maxLength": 3}}}).iter_errors({"a": "x" * 9}))
    >>> describe_error(e)
    'a: string of 9 characters is too long (maxLength 3)'
    """
    path = ".".join(_path_part(p) for p in err.absolute_path) or "(root)"
    kw, lim, x = err.validator, err.validator_value, err.instance
    kind = _kind_of(x)
    if kw == "maxLength":
        rule = f"string of {len(x)} characters is too long (maxLength {lim})"
    elif kw == "minLength":
        rule = f"string of {len(x)} characters is too short (minLength {lim})"
    elif kw == "maxItems":
        rule = f"array of {len(x)} items is too long (maxItems {lim})"
    elif kw == "maxProperties":
        rule = f"object with {len(x)} properties has too many (maxProperties {lim})"
    elif kw in ("maximum", "exclusiveMaximum"):
        rule = f"number is above the maximum ({kw} {lim})"
    elif kw in ("minimum", "exclusiveMinimum"):
        rule = f"number is below the minimum ({kw} {lim})"
    elif kw == "type":
        want = lim if isinstance(lim, str) else " or ".join(lim)
        rule = f"is of type {kind}, expected {want}"
    elif kw == "required":
        missing = [k for k in lim if isinstance(x, dict) and k not in x]
        rule = f"required property missing: {', '.join(missing) or lim}"
    elif kw == "pattern":
        rule = f"string of {len(x)} characters does not match the pattern {lim}"
    elif kw == "not":
        rule = f"{kind} matches a forbidden form {orjson.dumps(lim).decode()[:120]}"
    elif kw == "format":
        rule = f"{kind} is not a valid {lim}"
    elif kw in ("const", "enum"):
        rule = f"{kind} is not one of the allowed values ({kw})"
    elif kw in ("oneOf", "anyOf"):
        rule = f"{kind} matches none of the allowed forms ({kw})"
    else:
        rule = f"{kind} fails {kw}"
    return f"{path}: {rule}"


def schema_error(ev: dict[str, Any]) -> str | None:
    """jsonschema's verdict on ``ev``: ``None`` when valid, else the first error (by field path) as
    ``"<path>: <rule>"`` (:func:`describe_error`; path ``(root)`` for the whole object)."""
    errors = sorted(_event_validator().iter_errors(ev), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    return describe_error(errors[0])


def validate_slow(ev: dict[str, Any]) -> None:
    """Validate ``ev`` against ``schemas/event.v1.json`` with :mod:`jsonschema` only (the reference
    path: about 80 µs per event, see ``benchmarks/parse_cost.py``).

    Raises
    ------
    InvalidEvent
        ``schema``, detail from :func:`schema_error`.
    """
    detail = schema_error(ev)
    if detail is not None:
        raise InvalidEvent("schema", detail)


def validate(ev: dict[str, Any]) -> None:
    """Validate ``ev`` against ``schemas/event.v1.json``: the compiled validator, then, only when it
    rejects the event, :func:`validate_slow` for the error detail; jsonschema's verdict is final
    (an event the compiled validator rejects and jsonschema accepts is accepted, and logged).

    Raises
    ------
    InvalidEvent
        ``schema``, detail from :func:`schema_error`.
    """
    try:
        (_compiled or compiled_validator())(ev)
    except fastjsonschema.JsonSchemaException:
        detail = schema_error(ev)
        if detail is None:
            log.warning("compiled validator rejected an event jsonschema accepts (event_id %r); accepted",
                        ev.get("event_id"))
            return
        raise InvalidEvent("schema", detail) from None


def check_identity(ev: dict[str, Any]) -> None:
    """Check the identity fields (:data:`ID_FIELDS`) that are strings (already stripped of
    surrounding whitespace by the contract).

    Each must be at most 128 characters of printable text (:meth:`str.isprintable`: no control
    characters, no format characters such as the bidi overrides U+202A-U+202E/U+2066-U+2069 or
    zero-width ones, no line/paragraph separators, no unassigned or private-use code points;
    a space inside is fine), and a ``user_id`` must not start with :data:`ANON_PREFIX`, which
    marks a guest's ``user_key``.

    Raises
    ------
    InvalidEvent
        ``bad_identity`` (the detail names the field and the rule, never the value), or
        ``schema`` for an id longer than 128 characters (``too long``).

    >>> check_identity({"user_id": "anon:victim"})
    Traceback (most recent call last):
    ...
    clickpulse.errors.InvalidEvent: bad_identity: user_id: starts with the reserved prefix anon: (guest keys)
    """
    for idf in ID_FIELDS:
        v = ev.get(idf)
        if not isinstance(v, str):
            continue
        if len(v) > 128:
            raise InvalidEvent("schema", f"{idf}: string of {len(v)} characters is too long (maxLength 128)")
        if not v.isprintable():
            bad = next(c for c in v if not c.isprintable())
            raise InvalidEvent("bad_identity", f"{idf}: contains the non-printable character U+{ord(bad):04X} "
                                               "(control, format/bidi or separator characters are not allowed)")
    uid = ev.get("user_id")
    if isinstance(uid, str) and uid.startswith(ANON_PREFIX):
        raise InvalidEvent("bad_identity", f"user_id: starts with the reserved prefix {ANON_PREFIX} (guest keys)")


def check_bounds(ev: dict[str, Any], max_money: float = DEFAULT_MAX_MONEY,
                 max_quantity: int = DEFAULT_MAX_QUANTITY) -> None:
    """Bound money and quantities of a schema-valid event.

    Every numeric (not bool) ``properties`` field of :data:`MONEY_FIELDS` must be finite with
    ``abs(x) <= max_money`` (units of ``currency``), and ``properties.quantity`` (an integer from 0
    by the schema) at most ``max_quantity`` units.

    Raises
    ------
    InvalidEvent
        ``out_of_range``, the detail names the field and the limit.
    """
    props = ev.get("properties")
    if not isinstance(props, dict):
        return
    for name in MONEY_FIELDS:
        x = props.get(name)
        if x is None or x.__class__ is bool or not isinstance(x, int | float):
            continue
        if x != x or abs(x) > max_money:  # NaN fails x == x; ±inf and too large fail the bound
            limit = f"[{-max_money:g}, {max_money:g}] (CLICKPULSE_MAX_MONEY)"
            if x != x or x in (math.inf, -math.inf):
                raise InvalidEvent("out_of_range", f"properties.{name}: {x!r} is not a finite number; limit {limit}")
            raise InvalidEvent("out_of_range", f"properties.{name}: {repr(x)[:64]} is outside {limit}")
    q = props.get("quantity")
    if q is not None and q.__class__ is not bool and isinstance(q, int | float) and q > max_quantity:
        raise InvalidEvent("out_of_range", f"properties.quantity: {repr(q)[:64]} is above the limit of "
                                           f"{max_quantity} units (CLICKPULSE_MAX_QUANTITY)")


def _bad_number_path(obj: Any, ints: bool = True) -> str | None:
    """``"<path>: <problem>"`` for the first non-finite float (NaN, ±inf) or (with ``ints``)
    integer outside ``[-(2**53 - 1), 2**53 - 1]`` (:data:`MAX_JSON_INT`) anywhere in ``obj`` (path
    ``a.b.0``), else ``None``."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return f"{path or '(root)'}: not a finite number"
        elif ints and isinstance(node, int):
            if not -MAX_JSON_INT <= node <= MAX_JSON_INT and node.__class__ is not bool:
                return (f"{path or '(root)'}: integer of {len(str(abs(node)))} digits is outside "
                        f"[-(2**53 - 1), 2**53 - 1], the range JSON numbers hold exactly")
        elif isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node))
    return None


_EPOCH_DATE = date(1970, 1, 1)
_DAYS: dict[int, str] = {}  # days since 1970-01-01 -> "YYYY-MM-DD" (cleared when large)


def to_rfc3339(ts_ms: int) -> str:
    """Epoch milliseconds -> ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC).

    >>> to_rfc3339(1569888000123)
    '2019-10-01T00:00:00.123Z'
    """
    if ts_ms.__class__ is int and _MIN_TS_MS <= ts_ms <= _MAX_TS_MS:
        days, rem = divmod(ts_ms, 86_400_000)
        day = _DAYS.get(days)
        if day is None:
            if len(_DAYS) >= 4096:
                _DAYS.clear()
            day = _DAYS[days] = (_EPOCH_DATE + timedelta(days=days)).isoformat()
        secs, ms = divmod(rem, 1000)
        hours, secs = divmod(secs, 3600)
        minutes, secs = divmod(secs, 60)
        return f"{day}T{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}Z"
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def parse_timestamp(value: Any, field: str = "timestamp") -> int:
    """RFC 3339 string (offset required) or epoch milliseconds -> epoch milliseconds.

    Raises
    ------
    InvalidEvent
        ``bad_timestamp``: missing, naive (no offset), not RFC 3339, epoch seconds instead of
        milliseconds (any number below 1e11, i.e. before 1973-03-03, including 0 and negative
        numbers), or outside year 1970–9999.
    """
    if isinstance(value, bool) or value is None:
        raise InvalidEvent("bad_timestamp", f"{field} is missing or not a time: {value!r}")
    if isinstance(value, int | float):
        if value != value or value in (math.inf, -math.inf):
            raise InvalidEvent("bad_timestamp", f"{field} is not a finite number")
        ms = int(value)
        if ms < _MIN_PLAUSIBLE_MS:
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


#: Segment ``context.device.type`` values of phones and tablets (the mobile libraries send the OS).
_MOBILE_OS = frozenset({"ios", "android", "ipados", "watchos", "tvos", "harmonyos", "fireos"})
#: ``context.device`` classes the features know (:mod:`clickpulse.models.features`).
_DEVICE_CLASSES = frozenset({"desktop", "mobile", "tablet"})
#: Canonical types whose ``properties.products[]`` give the money total (``revenue`` of a
#: purchase, ``value`` of the others) when the producer sent none.
_PRODUCT_LIST_TYPES = {"purchase": "revenue", "cart_view": "value", "checkout_start": "value"}
_CURRENCY_LETTERS = re.compile(r"[A-Za-z]{3}")
_TABLET_WORD = re.compile(r"\btab(let)?\b")


def device_class(device: dict[str, Any]) -> str | None:
    """The device class (``desktop``, ``mobile``, ``tablet`` or the type as sent, lower case) of a
    Segment/RudderStack ``context.device`` object, ``None`` when it has no string ``type``.

    The mobile libraries send the OS as ``type`` (``"ios"``, ``"android"``); a model or name
    containing ``ipad``, or the word ``tablet`` or ``tab`` (``Galaxy Tab S9``), makes it a tablet.

    >>> device_class({"type": "ios", "model": "iPad13,4"}), device_class({"type": "android"})
    ('tablet', 'mobile')
    """
    kind = device.get("type")
    if not isinstance(kind, str) or not kind.strip():
        return None
    kind = kind.strip().lower()[:64]
    if kind in _DEVICE_CLASSES:
        return kind
    if kind in _MOBILE_OS:
        hint = " ".join(v for v in (device.get("model"), device.get("name")) if isinstance(v, str)).lower()
        return "tablet" if "ipad" in hint or _TABLET_WORD.search(hint) else "mobile"
    return kind


def _final_type(obj: dict[str, Any]) -> Any:
    """The canonical ``type`` :func:`_normalize` will give ``obj`` (a Segment ``event`` name wins)."""
    t = obj.get("type")
    name = obj.get("event")
    if isinstance(name, str):
        t = name
    elif isinstance(t, str) and t in SEGMENT_CALL_TYPES:
        t = SEGMENT_CALL_TYPES[t]
    return SEGMENT_EVENT_NAMES.get(t, t) if isinstance(t, str) else None


def _products_total(products: list[Any]) -> float | None:
    """Sum of ``price * quantity`` (quantity 1 when absent) over the products with a numeric,
    finite ``price`` and an integer ``quantity`` >= 0 (others are left out); ``None`` when no
    product has a price. Rounded to 1/100 of the currency unit."""
    total, priced = 0.0, False
    for item in products[:1000]:
        if not isinstance(item, dict):
            continue
        price = item.get("price")
        if price.__class__ is bool or not isinstance(price, int | float) or not math.isfinite(price):
            continue
        qty = item.get("quantity", 1)
        if qty.__class__ is bool or not isinstance(qty, int | float) or qty != qty or qty < 0 or qty != int(qty):
            continue
        total += price * qty
        priced = True
    return round(total, 2) if priced and math.isfinite(total) else None


def map_real_payload(obj: dict[str, Any]) -> dict[str, Any]:
    """Bring what the Segment and RudderStack libraries send into the shape the contract reads:
    ``obj`` itself when there is nothing to do, else a new dict (``obj`` is left unchanged; nested
    dicts that change are copied). Applied first by :func:`normalize`/:func:`parse`.

    * **Time**: a message with ``originalTimestamp`` and no ``timestamp`` (RudderStack's
      libraries, Segment's before its server sets ``timestamp``) takes ``originalTimestamp`` as
      its client time; ``sentAt``/``receivedAt`` then correct the client clock (Segment's
      ``timestamp = receivedAt - (sentAt - originalTimestamp)``).
    * **Currency**: three ASCII letters in any case become upper case (``"eur"`` -> ``"EUR"``).
    * **Context objects**: ``context.device`` as an object (mobile libraries) moves to
      ``context.device_info`` and ``context.device`` becomes its class (:func:`device_class`;
      absent when it has no ``type``), so the PII policy's ``device`` allowance keeps a class,
      never the advertising id; ``context.location.country`` becomes ``context.country`` when
      that is absent. ``os``, ``app``, ``page``, ``campaign``, ``library``, ``screen`` and
      ``network`` objects pass as sent (the PII policy decides what is kept).
    * **Traits**: an ``identify`` whose traits are in ``context.traits`` (RudderStack) and not
      at the top level has them moved to the top level (then to ``properties.traits``).
    * **Products**: a purchase (``Order Completed``), ``Cart Viewed`` or ``Checkout Started``
      with a ``properties.products`` list and no money total gets one from the list
      (:func:`_products_total`): ``revenue`` of a purchase when neither ``revenue`` nor
      ``total`` is set (so lifetime revenue counts the order), ``value`` of the others.

    >>> map_real_payload({"type": "track", "event": "Order Completed", "userId": "u1",
    ...                   "originalTimestamp": "2019-10-01T10:00:00Z",
    ...                   "properties": {"currency": "eur", "products": [{"price": 5, "quantity": 2}]}})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'type': 'track', 'event': 'Order Completed', 'userId': 'u1', 'properties': {'currency': 'EUR',
     'products': [{'price': 5, 'quantity': 2}], 'revenue': 10.0}, 'timestamp': '2019-10-01T10:00:00Z'}
    """
    out = obj
    if obj.get("timestamp") is None:
        for name in ("original_timestamp", "originalTimestamp"):
            if obj.get(name) is not None:
                out = dict(obj)
                out["timestamp"] = out[name]
                out.pop("original_timestamp", None)
                out.pop("originalTimestamp", None)
                break
    props = out.get("properties")
    if isinstance(props, dict):
        new_props = props
        cur = props.get("currency")
        if isinstance(cur, str) and not cur.isupper() and _CURRENCY_LETTERS.fullmatch(cur):
            new_props = {**new_props, "currency": cur.upper()}
        products = props.get("products")
        if isinstance(products, list) and products:
            field_name = _PRODUCT_LIST_TYPES.get(_final_type(out))
            taken = ("revenue", "total") if field_name == "revenue" else (field_name,)
            if field_name is not None and all(props.get(k) is None for k in taken):
                total = _products_total(products)
                if total is not None:
                    new_props = {**new_props, field_name: total}
        if new_props is not props:
            out = dict(out) if out is obj else out
            out["properties"] = new_props
    ctx = out.get("context")
    if isinstance(ctx, dict):
        new_ctx = ctx
        device = ctx.get("device")
        if isinstance(device, dict):
            new_ctx = dict(ctx)
            new_ctx.setdefault("device_info", device)
            kind = device_class(device)
            if kind is None:
                del new_ctx["device"]
            else:
                new_ctx["device"] = kind
        loc = ctx.get("location")
        if isinstance(loc, dict) and isinstance(loc.get("country"), str) and loc["country"] and ctx.get("country") is None:
            new_ctx = dict(new_ctx) if new_ctx is ctx else new_ctx
            new_ctx["country"] = loc["country"]
        traits = ctx.get("traits")
        if (out.get("type") == "identify" and isinstance(traits, dict) and out.get("traits") is None):
            new_ctx = dict(new_ctx) if new_ctx is ctx else new_ctx
            del new_ctx["traits"]
            out = dict(out) if out is obj else out
            out["traits"] = traits
        if new_ctx is not ctx:
            out = dict(out) if out is obj else out
            out["context"] = new_ctx
    return out


def _map_segment(obj: dict[str, Any]) -> dict[str, Any]:
    """Rename Segment fields and names; ``obj`` itself when there is nothing to map, else a new
    dict (``obj`` is left unchanged)."""
    if _SEGMENT_KEYS.isdisjoint(obj):
        call = obj.get("type")
        if not isinstance(call, str) or call not in _SEGMENT_TYPES:
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
    elif isinstance(call, str) and call in SEGMENT_CALL_TYPES:
        out["type"] = SEGMENT_CALL_TYPES[call]
    if call == "identify" and isinstance(out.get("traits"), dict) and isinstance(out.get("properties") or {}, dict):
        props = dict(out.get("properties") or {})  # (properties of another type: left to the schema)
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
          received_ms: int | None = None, max_future_skew_ms: int = 300_000,
          max_money: float = DEFAULT_MAX_MONEY, max_quantity: int = DEFAULT_MAX_QUANTITY,
          reference: bool = False) -> dict[str, Any]:
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
    max_money
        Bound of ``abs(x)`` for the money fields of ``properties`` (:data:`MONEY_FIELDS`), in
        units of ``currency`` (``CLICKPULSE_MAX_MONEY``).
    max_quantity
        Bound of ``properties.quantity``, in units (``CLICKPULSE_MAX_QUANTITY``).
    reference
        Validate with :func:`validate_slow` (jsonschema only) instead of :func:`validate`: the
        same result, several times slower; for tests and benchmarks.

    Returns
    -------
    dict
        The canonical event (see module docstring); ``context.clock_corrected`` is ``True``
        when the time was corrected.

    Raises
    ------
    InvalidEvent
        With ``reason`` in :data:`DLQ_REASONS` (never any other exception for bytes input).
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
        obj = orjson.loads(value)  # refuses invalid UTF-8 too: told apart below
    except orjson.JSONDecodeError as err:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as uerr:
            raise InvalidEvent("not_utf8", f"value is not UTF-8 at byte {uerr.start}") from uerr
        raise InvalidEvent("not_json", f"value is not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"value is JSON {type(obj).__name__}, expected an object")
    return _normalize(obj, received_ms, max_future_skew_ms, max_money, max_quantity, reference)


def normalize(obj: dict[str, Any], *, received_ms: int | None = None,
              max_future_skew_ms: int = 300_000, max_money: float = DEFAULT_MAX_MONEY,
              max_quantity: int = DEFAULT_MAX_QUANTITY, reference: bool = False) -> dict[str, Any]:
    """Map, complete and validate one decoded event object (see :func:`parse`; ``obj`` may be
    changed in place). A non-finite float anywhere in ``obj`` is ``out_of_range`` (decoded JSON
    never has one).

    Raises
    ------
    InvalidEvent
        With ``reason`` in :data:`DLQ_REASONS`.
    """
    bad = _bad_number_path(obj, ints=False)
    if bad is not None:
        raise InvalidEvent("out_of_range", bad)
    return _normalize(obj, received_ms, max_future_skew_ms, max_money, max_quantity, reference)


def _normalize(obj: dict[str, Any], received_ms: int | None, max_future_skew_ms: int,
               max_money: float, max_quantity: int, reference: bool) -> dict[str, Any]:
    ev = _map_segment(map_real_payload(obj))
    ev.pop("user_key", None)
    if ev.get("type") == "alias" and ev.get("anonymous_id") in (None, "") \
            and isinstance(ev.get("previous_id"), str | int) and not isinstance(ev.get("previous_id"), bool):
        # Segment alias {userId, previousId}: the previous id is the guest's anonymous id
        # (identity stitching, clickpulse.engine.identity)
        ev["previous_id"] = ev["anonymous_id"] = str(ev["previous_id"])
    for idf in ID_FIELDS:
        v = ev.get(idf)
        if isinstance(v, int) and not isinstance(v, bool):
            ev[idf] = v = str(v)
        if isinstance(v, str):
            if v and (v[0].isspace() or v[-1].isspace()):
                ev[idf] = v = v.strip()
            if not v:
                ev.pop(idf, None)
        elif v is None:
            ev.pop(idf, None)
    if "user_id" not in ev and "anonymous_id" not in ev:
        raise InvalidEvent("missing_identity", "neither user_id nor anonymous_id is set")
    for idf in ("user_id", "anonymous_id"):
        if idf in ev and not isinstance(ev[idf], str):
            raise InvalidEvent("schema", f"{idf}: must be a string, got {type(ev[idf]).__name__}")
    check_identity(ev)
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
        try:
            ev["event_id"] = derive_event_id({k: v for k, v in obj.items() if k not in ("received_at", "receivedAt")})
        except TypeError as err:  # orjson: nested deeper than 254 levels (or not JSON data)
            raise InvalidEvent("schema", f"(root): cannot derive an event_id from the content ({err}); "
                                         "send an event_id") from err
    ev["schema_version"] = 1
    if reference:
        validate_slow(ev)
    else:
        validate(ev)
    check_bounds(ev, max_money, max_quantity)
    try:  # after the named bounds, whose details say more (money, quantity, time, schema maxima)
        orjson.dumps(ev, option=orjson.OPT_STRICT_INTEGER)  # ~0.2 µs: raises on any |int| > 2**53 - 1
    except TypeError:
        bad = _bad_number_path(ev)  # where (or nothing: another reason orjson cannot write it)
        if bad is not None:
            raise InvalidEvent("out_of_range", bad) from None
    ev["user_key"] = ev["user_id"] if "user_id" in ev else "anon:" + ev["anonymous_id"]
    return ev
