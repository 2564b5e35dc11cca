"""Conformance of the fast event contract.

* The validator compiled from ``schemas/event.v1.json`` (fastjsonschema) and jsonschema give the
  same verdict on every event of a corpus: Hypothesis-generated JSON objects and mutations of
  valid events (wrong types, missing fields, huge numbers, integral floats, deep nesting, odd
  unicode, extra fields), one case per dead-letter reason, and the REES46 sample.
* ``parse`` returns exactly what the reference path returns: ``parse(..., reference=True)``
  (jsonschema only), and :func:`legacy_parse`, a frozen copy of ``parse`` as it was before the
  compiled validator, followed by the money/quantity bounds (``out_of_range``), with the hardening
  rules added since (issue #10): identifiers stripped, blank ones absent, checked by
  :func:`check_identity` (``bad_identity``); schema details built by :func:`describe_error` (no
  value echoed); integers beyond 2**53 - 1 ``out_of_range`` after the named bounds. Where the legacy
  code crashed with another exception, ``parse`` dead-letters instead.
* ``parse`` on arbitrary bytes or arbitrary JSON raises nothing but :class:`InvalidEvent` with a
  reason in :data:`DLQ_REASONS`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

import fastjsonschema
import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from clickpulse.errors import InvalidEvent
from clickpulse.events import contract
from clickpulse.events.contract import (
    DLQ_REASONS,
    SEGMENT_CALL_TYPES,
    SEGMENT_EVENT_NAMES,
    _bad_number_path,
    check_bounds,
    check_identity,
    compiled_validator,
    describe_error,
    map_real_payload,
    normalize,
    parse,
    parse_timestamp,
    schema_error,
    to_rfc3339,
)
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46

T0 = 1569924000000  # 2019-10-01T10:00:00Z
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the legacy contract (frozen copy of contract.py at 3723414, before the compiled validator) ---

_SEGMENT_FIELDS = {"userId": "user_id", "anonymousId": "anonymous_id", "messageId": "event_id",
                   "sentAt": "sent_at", "receivedAt": "received_at", "originalTimestamp": "original_timestamp"}


def _legacy_to_rfc3339(ts_ms: int) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def _legacy_derive_event_id(obj: dict[str, Any], prefix: str = "d") -> str:
    digest = hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}-{digest[:24]}"


def _legacy_map_segment(obj: dict[str, Any]) -> dict[str, Any]:
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


def _legacy_normalize(obj: dict[str, Any], *, received_ms: int | None = None,
                      max_future_skew_ms: int = 300_000, id_source: dict[str, Any] | None = None) -> dict[str, Any]:
    ev = _legacy_map_segment(obj)
    ev.pop("user_key", None)
    for idf in ("user_id", "anonymous_id", "previous_id"):
        v = ev.get(idf)
        if isinstance(v, int) and not isinstance(v, bool):
            ev[idf] = v = str(v)
        if isinstance(v, str):  # issue #10: surrounding whitespace stripped, a blank id is absent
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
        recv_raw = ev.get("received_at")
        recv = parse_timestamp(recv_raw, "received_at") if recv_raw is not None else received_ms
        if recv is not None:
            offset = recv - parse_timestamp(ev["sent_at"], "sent_at")
            if abs(offset) >= contract.MIN_CLOCK_OFFSET_MS:
                ts_ms, corrected = ts_ms + offset, True
    if received_ms is not None and ts_ms > received_ms + max_future_skew_ms:
        ts_ms, corrected = received_ms, True
    if not 0 <= ts_ms <= 253402300799999:
        raise InvalidEvent("bad_timestamp", "timestamp out of range after clock correction")
    if corrected:
        ev["context"] = {**(ev.get("context") if isinstance(ev.get("context"), dict) else {}), "clock_corrected": True}
    ev["timestamp"] = _legacy_to_rfc3339(ts_ms)
    ev["timestamp_ms"] = ts_ms
    if not ev.get("event_id"):
        src = obj if id_source is None else id_source
        ev["event_id"] = _legacy_derive_event_id({k: v for k, v in src.items() if k not in ("received_at", "receivedAt")})
    ev["schema_version"] = 1
    errors = sorted(contract._event_validator().iter_errors(ev), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise InvalidEvent("schema", describe_error(err))
    ev["user_key"] = ev["user_id"] if "user_id" in ev else "anon:" + ev["anonymous_id"]
    return ev


def legacy_parse(value: bytes | None, key: bytes | None, *, max_bytes: int = 65536,
                 received_ms: int | None = None, max_future_skew_ms: int = 300_000,
                 premap: Any = None) -> dict[str, Any]:
    """The frozen parse; ``premap`` (added with the real-payload mapping) is applied to the decoded
    object first, the derived event_id staying over the object as sent."""
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
    mapped = obj if premap is None else premap(obj)
    return _legacy_normalize(mapped, received_ms=received_ms, max_future_skew_ms=max_future_skew_ms,
                             id_source=None if mapped is obj else obj)


# --- outcomes ---------------------------------------------------------------------------------

def canonical(obj: Any) -> list[Any]:
    """``obj`` as a flat token list, keys sorted, scalars tagged with their type (1, 1.0 and True
    differ), at any depth (no recursion: orjson writes at most 254 levels, Python's == ~1000)."""
    out: list[Any] = []
    stack: list[Any] = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            out.append(("{", len(node)))
            for k in sorted(node, reverse=True):
                stack.extend((node[k], ("key", k)))
        elif isinstance(node, list):
            out.append(("[", len(node)))
            stack.extend(reversed(node))
        elif isinstance(node, tuple) and node[:1] == ("key",):
            out.append(node)
        else:
            out.append((type(node).__name__, node))
    return out


def outcome(fn, *args, **kw) -> tuple[str, Any]:
    """``("ok", canonical(event))``, ``("invalid", (reason, detail))`` or ``("crash", type)``."""
    try:
        ev = fn(*args, **kw)
    except InvalidEvent as err:
        return "invalid", (err.reason, err.detail)
    except Exception as err:  # noqa: BLE001 - the legacy code could crash
        return "crash", type(err).__name__
    return "ok", canonical(ev)


def expected_outcome(value: bytes | None, key: bytes | None = None, **kw) -> tuple[str, Any]:
    """The legacy result on the message as :func:`map_real_payload` brings it into shape (its own
    behaviour is pinned by example below and by the SDK fixtures in test_real_payloads.py), with
    the new money/quantity bounds applied to what it accepted."""
    try:
        ev = legacy_parse(value, key, premap=map_real_payload, **kw)
    except InvalidEvent as err:
        return "invalid", (err.reason, err.detail)
    except Exception as err:  # noqa: BLE001 - the legacy code could crash
        return "crash", type(err).__name__
    try:
        check_bounds(ev)
    except InvalidEvent as err:
        return "invalid", (err.reason, err.detail)
    bad = _bad_number_path(ev)
    if bad is not None:
        return "invalid", ("out_of_range", bad)
    return "ok", canonical(ev)


def assert_conforms(value: bytes | None, key: bytes | None = None, **kw) -> tuple[str, Any]:
    got = outcome(parse, value, key, **kw)
    assert got[0] != "crash", f"parse raised {got[1]} on {value!r:.300}"
    if got[0] == "invalid":
        assert got[1][0] in DLQ_REASONS
    assert outcome(parse, value, key, reference=True, **kw) == got
    want = expected_outcome(value, key, **kw)
    if want[0] == "crash":  # the legacy code crashed: now a dead letter
        assert got[0] == "invalid", (want, got)
    else:
        assert got == want
    return got


def fast_accepts(instance: Any) -> bool:
    try:
        compiled_validator()(instance)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def assert_same_verdict(instance: Any) -> None:
    fast, slow = fast_accepts(instance), schema_error(instance) is None
    assert fast == slow, f"compiled says {'valid' if fast else 'invalid'}, jsonschema {schema_error(instance)!r} for {instance!r:.400}"


# --- strategies -------------------------------------------------------------------------------

odd_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
SPECIAL = [
    0, 1, -1, 1.0, 2.0, -0.0, 0.5, 100, 100.0, 100.5, 100000, 100000.0, 100001, 10000, 10001,
    1e9, 1e9 + 1, -1e9, -2e9, 9e307, -9e307, 1.7976931348623157e308, 5e-324, 2**53 + 1, 2**63 - 1,
    -(2**63), 2**64 - 1, 1569924000000, 1569924000, 253402300799999, 253402300800000,
    True, False, None, "", " ", "0", "1", "abc", "EUR", "eur", "EUR\n", "EURO", "\nEUR", "€",
    "\u0000", "\u200b", "\U0001f600" * 3, "e\u0301", "ß" * 70, "x" * 129, "x" * 257,
    "2019-10-01T10:00:00Z", "2019-10-01T10:00:00.123+02:00", "2019-10-01t10:00:00z",
    "2019-10-01T10:00:00Z\n", "2019-02-30T10:00:00Z", "0000-01-01T00:00:00Z",
    "2019-10-01T10:00:00+0200", "2019-10-01 10:00:00Z", "2019-10-01T10:00:00", "2019-10-01T24:00:00Z",
    "\u0661\u0669\u0669\u0669-10-01T10:00:00Z",
    [], [1], {}, {"a": 1}, {"marketing": True}, {"marketing": 1}, {"traits": {"x": 1}},
    # real payloads (map_real_payload): device objects, locations, products lists
    {"type": "ios", "model": "iPad13,4", "advertisingId": "a-1"}, {"type": "android"}, {"type": 7},
    {"country": "Germany"}, {"country": ""}, [{"price": 5, "quantity": 2}, {"price": 1.5}],
    [{"price": "5"}, {"price": 1e308, "quantity": 10}, "x"], [{"price": True, "quantity": 1.5}],
]
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | odd_text | st.sampled_from(SPECIAL))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(odd_text, c, max_size=4),
                           max_leaves=12)

TOP_FIELDS = ["event_id", "type", "user_id", "anonymous_id", "timestamp", "timestamp_ms", "sent_at",
              "received_at", "schema_version", "properties", "context", "userId", "anonymousId",
              "messageId", "sentAt", "receivedAt", "originalTimestamp", "event", "traits", "user_key"]
PROP_FIELDS = ["product_id", "category", "category_id", "brand", "price", "currency", "quantity", "cart_id",
               "order_id", "revenue", "total", "value", "page_type", "url", "scroll_pct", "dwell_ms", "query",
               "session_id", "consent", "traits", "products"]
CTX_FIELDS = ["device", "user_agent", "userAgent", "country", "ip", "source", "clock_corrected",
              "device_info", "location", "traits", "os", "app"]
TYPES = ["page_view", "product_view", "add_to_cart", "remove_from_cart", "purchase", "consent", "identify",
         "track", "page", "screen", "Order Completed", "Product Added", "custom_thing", "Cart Viewed",
         "Checkout Started"]


@st.composite
def valid_raw_events(draw) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": draw(st.sampled_from(TYPES)),
                          draw(st.sampled_from(["timestamp", "timestamp", "originalTimestamp"])):
                              draw(st.sampled_from([T0, "2019-10-01T10:00:00Z", "2019-10-01T12:00:00.5+02:00"]))}
    ident = draw(st.sampled_from(["user_id", "anonymous_id", "userId", "anonymousId", "both"]))
    if ident == "both":
        ev["user_id"], ev["anonymous_id"] = "u1", "a1"
    else:
        ev[ident] = draw(st.sampled_from(["u1", "a-\u00e9", 42]))
    if draw(st.booleans()):
        ev[draw(st.sampled_from(["event_id", "messageId"]))] = draw(st.sampled_from(["e1", "m-" + "9" * 20]))
    if ev["type"] == "track":
        ev["event"] = draw(st.sampled_from(list(SEGMENT_EVENT_NAMES) + ["Custom Event"]))
    props = draw(st.fixed_dictionaries({}, optional={
        "product_id": st.sampled_from(["p1", 7]), "price": st.sampled_from([9.99, 0, 1e9, 12]),
        "currency": st.sampled_from(["EUR", "eur", "Usd"]), "quantity": st.sampled_from([0, 1, 2, 10000]),
        "products": st.sampled_from([[{"product_id": "p1", "price": 5, "quantity": 2}], [{"price": 1.25}], []]),
        "revenue": st.sampled_from([30.0, -5, 1e9]), "total": st.sampled_from([30.0, 2]),
        "category": st.sampled_from(["shoes", None]), "scroll_pct": st.sampled_from([0, 55.5, 100]),
        "consent": st.just({"marketing": True}), "value": st.sampled_from(["x", 3])}))
    if props or draw(st.booleans()):
        ev["properties"] = props
    if draw(st.booleans()):
        ev["context"] = draw(st.fixed_dictionaries({}, optional={
            "userAgent": st.just("Mozilla/5.0"),
            "device": st.sampled_from(["mobile", {"type": "ios", "model": "iPhone14,2", "id": "d1"}, {"id": "d2"}]),
            "location": st.just({"country": "Germany", "city": "Berlin"}),
            "traits": st.just({"plan": "pro"}), "os": st.just({"name": "iOS", "version": "17.1"})}))
    if draw(st.booleans()):
        ev["sentAt" if draw(st.booleans()) else "sent_at"] = T0 + draw(st.sampled_from([0, 10, 7200_000]))
        if draw(st.booleans()):
            ev["received_at"] = T0
    if ev["type"] == "identify" and draw(st.booleans()):
        ev["traits"] = {"country": "DE"}
    return ev


@st.composite
def mutated_events(draw, base=valid_raw_events()) -> dict[str, Any]:
    ev = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "props", "ctx"]))
        if where == "top":
            target, names = ev, TOP_FIELDS
        else:
            key = "properties" if where == "props" else "context"
            if not isinstance(ev.get(key), dict):
                ev[key] = {}
            target, names = ev[key], PROP_FIELDS if where == "props" else CTX_FIELDS
        name = draw(st.sampled_from(names) | odd_text)
        if draw(st.integers(0, 4)) == 0:
            target.pop(name, None)
        else:
            target[name] = draw(json_values)
    return ev


# --- one case per dead-letter reason ------------------------------------------------------------

def _good(**over) -> dict[str, Any]:
    ev = {"event_id": "e1", "type": "add_to_cart", "user_id": "u1", "timestamp": "2019-10-01T10:00:00Z",
          "properties": {"product_id": "p1", "price": 9.99, "currency": "EUR", "quantity": 2}}
    ev.update(over)
    return ev


REASON_CASES = [
    ("not_utf8", b"\xff\xfe{\"type\": 1}", None),
    ("key_not_utf8", orjson.dumps(_good()), b"\xff\xfe"),
    ("not_json", b"not json at all", None),
    ("not_json", b'{"type": "purchase", "user_id": "u1", "timestamp": 0, "properties": {"revenue": 1e400}}', None),
    ("not_json", b'{"type": "purchase", "user_id": "u1", "properties": {"revenue": NaN}}', None),
    ("not_object", b"[1, 2]", None),
    ("too_large", orjson.dumps(_good(properties={"blob": "x" * 70000})), None),
    ("missing_identity", orjson.dumps({"type": "page_view", "timestamp": T0}), None),
    ("bad_timestamp", orjson.dumps(_good(timestamp="yesterday")), None),
    ("schema", orjson.dumps(_good(properties={"price": "abc"})), None),
    ("schema", orjson.dumps(_good(properties={"currency": "euro"})), None),
    ("schema", orjson.dumps(_good(type=[1])), None),  # crashed with TypeError before
    ("schema", orjson.dumps({"type": [], "userId": "u1", "timestamp": T0}), None),  # crashed too
    ("schema", b'{"type":"identify","timestamp":1569924000000,"user_id":"u1","traits":{"c":"DE"},"properties":true}',
     None),  # crashed (TypeError) too: found by the Hypothesis corpus
    ("schema", b'{"type": "x", "user_id": "u1", "timestamp": 1569888000000, "properties": {"d": %s}}' % (b"[" * 300 + b"]" * 300), None),
    ("schema", orjson.dumps(_good(properties={"product_id": "p" * 60000})), None),  # issue #10: "too long"
    ("out_of_range", orjson.dumps(_good(type="purchase", properties={"revenue": 9e307})), None),
    ("out_of_range", orjson.dumps(_good(properties={"quantity": 10001})), None),
    ("out_of_range", b'{"type": "dwell", "user_id": "u1", "timestamp": 1569888000000, "x": 18446744073709551615}', None),
    ("bad_identity", orjson.dumps(_good(user_id="anon:victim")), None),
    ("bad_identity", orjson.dumps(_good(user_id="vic\u202etim")), None),
    ("bad_timestamp", orjson.dumps(_good(timestamp=0)), None),
]


@pytest.mark.parametrize("reason,value,key", REASON_CASES)
def test_one_case_per_dead_letter_reason(reason, value, key):
    got = assert_conforms(value, key)
    assert got[0] == "invalid" and got[1][0] == reason, got


def test_every_parse_reason_has_a_case():
    # ``internal`` (an unexpected exception around parse) and ``forged_control`` (an unsigned
    # control header, tests/unit/test_control.py) are the worker's own, never parse's
    # and ``state_too_large`` (the engine's state size net, tests/unit/test_hostile_input.py)
    assert {r for r, _v, _k in REASON_CASES} == set(DLQ_REASONS) - {"internal", "forged_control", "state_too_large"}


# --- verdicts of the two validators -------------------------------------------------------------

@FAST
@given(json_values)
@example({"event_id": "e", "type": "t", "user_id": "u", "timestamp": "2019-10-01T10:00:00Z",
          "properties": {"currency": "EUR\n"}})
@example({"event_id": "e", "type": "t", "user_id": "u", "timestamp": "2019-10-01T10:00:00Z", "schema_version": True})
@example({"event_id": "e", "type": "t", "user_id": "u", "timestamp": "2019-10-01t10:00:00z"})
@example({"event_id": "e", "type": "t", "user_id": "u", "timestamp": 1.0, "timestamp_ms": 5.0})
@example({"event_id": "e", "type": "t", "user_id": "u", "timestamp": 0, "received_at": "2019-02-29T00:00:00Z"})
@example({"event_id": "e", "type": "t", "anonymous_id": "a", "timestamp": 0, "properties": {"quantity": 100000.0}})
def test_validators_agree_on_arbitrary_json(instance):
    assert_same_verdict(instance)


@FAST
@given(mutated_events())
def test_validators_agree_on_mutated_events(raw):
    assert_same_verdict(raw)
    # ...and on the event as normalize hands it to the validator
    seen: list[dict[str, Any]] = []
    original = contract.validate

    def spy(ev):
        seen.append(copy.deepcopy(ev))
        return original(ev)

    contract.validate = spy
    try:
        outcome(normalize, copy.deepcopy(raw))
    finally:
        contract.validate = original
    for ev in seen:
        assert_same_verdict(ev)


def test_validators_agree_on_rees46_and_parse_is_unchanged():
    raw = list(read_rees46(BUNDLED_SAMPLE))
    for e in raw:
        value = orjson.dumps(e)
        kind, _ = assert_conforms(value, received_ms=T0 + 10**9)
        assert kind == "ok"
        assert_same_verdict(parse(value, None))
        assert_same_verdict(e)


# --- parse against the reference paths -----------------------------------------------------------

@FAST
@given(valid_raw_events(), st.sampled_from([None, T0 - 3600_000, T0, T0 + 10**9]))
def test_parse_matches_reference_on_valid_events(raw, received_ms):
    assert_conforms(orjson.dumps(raw), received_ms=received_ms)


@FAST
@given(mutated_events(), st.sampled_from([None, T0]))
def test_parse_matches_reference_on_mutated_events(raw, received_ms):
    try:
        value = orjson.dumps(raw)
    except TypeError:  # e.g. a value orjson cannot write: not a message anyone can send
        assume(False)
    assert_conforms(value, received_ms=received_ms)


def _nested_bytes(depth: int) -> bytes:
    out = b"1"
    for i in range(depth):
        out = b'{"n": ' + out + b"}" if i % 2 else b"[" + out + b"]"
    return out


@pytest.mark.parametrize("depth", [10, 250, 253, 254, 255, 300, 1000, 1030])
@pytest.mark.parametrize("with_id", [True, False])
def test_deep_nesting(depth, with_id):
    # orjson reads up to 1024 levels but writes at most 254: without an event_id to keep, the
    # derived id cannot be computed (the legacy code crashed with TypeError): ``schema``
    value = b'{"type": "custom", "user_id": "u1", "timestamp": %d, %s"properties": {"deep": %s}}' % (
        T0, b'"event_id": "e1", ' if with_id else b"", _nested_bytes(depth))
    got = assert_conforms(value)
    if got[0] == "invalid":
        assert got[1][0] in ("schema", "not_json")


# --- never anything but InvalidEvent ------------------------------------------------------------

@FAST
@given(st.binary(max_size=300), st.none() | st.binary(max_size=8))
@example(b'{"type": [], "user_id": "u", "timestamp": 0}', None)
@example(b"\xef\xbb\xbf{}", None)
@example(b'"\\ud800"', None)
@example(b'{"a": "\\ud800", "type": "x", "user_id": "u", "timestamp": 0}', None)
@example(b'{"type": "x", "user_id": "u", "timestamp": 18446744073709551616}', None)
def test_parse_of_arbitrary_bytes_raises_only_invalid_event(value, key):
    assert_conforms(value, key)


@FAST
@given(json_values)
def test_parse_of_arbitrary_json_raises_only_invalid_event(obj):
    try:
        value = orjson.dumps(obj)
    except TypeError:
        assume(False)
    assert_conforms(value)


@FAST
@given(st.binary(max_size=200), st.integers(0, 400))
def test_parse_of_corrupted_valid_events_raises_only_invalid_event(noise, at):
    value = orjson.dumps(_good(type="purchase", properties={"revenue": 12.5, "currency": "USD"}))
    at = min(at, len(value))
    assert_conforms(value[:at] + noise + value[at:])


# --- pieces ---------------------------------------------------------------------------------------

@FAST
@given(st.integers(0, 253402300799999))
@example(0)
@example(253402300799999)
@example(951782400000)  # 2000-02-29
@example(1569888000123)
def test_to_rfc3339_matches_datetime(ts_ms):
    assert to_rfc3339(ts_ms) == _legacy_to_rfc3339(ts_ms)


@pytest.mark.parametrize("ts", [-1, -1500, True, 253402300800000 - 1])
def test_to_rfc3339_outside_the_fast_range_is_unchanged(ts):
    assert to_rfc3339(ts) == _legacy_to_rfc3339(ts)


def test_jsonschema_verdict_wins_when_the_validators_disagree(monkeypatch, caplog):
    def always_reject(ev):
        raise fastjsonschema.JsonSchemaValueException("forced")

    monkeypatch.setattr(contract, "_compiled", always_reject)
    with caplog.at_level(logging.WARNING, logger="clickpulse.events.contract"):
        ev = parse(orjson.dumps(_good()), None)
    assert ev["event_id"] == "e1" and "jsonschema accepts" in caplog.text
    with pytest.raises(InvalidEvent) as exc:
        parse(orjson.dumps(_good(properties={"price": "abc"})), None)
    assert exc.value.reason == "schema" and exc.value.detail.startswith("properties.price:")


def test_schema_detail_is_the_jsonschema_one():
    err_new = outcome(parse, orjson.dumps(_good(properties={"quantity": 1.5, "price": -1})), None)
    err_old = outcome(legacy_parse, orjson.dumps(_good(properties={"quantity": 1.5, "price": -1})), None)
    assert err_new == err_old and err_new[1][0] == "schema"
