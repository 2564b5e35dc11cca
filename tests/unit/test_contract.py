"""The event contract: every dead-letter reason, Segment mapping, ids, time handling."""

from __future__ import annotations

import orjson
import pytest

from clickpulse.errors import InvalidEvent
from clickpulse.events.contract import DLQ_REASONS, check_bounds, normalize, parse, to_rfc3339
from clickpulse.events.dlq import dlq_record
from clickpulse.events.schemas import validation_errors
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46

T0 = 1569924000000  # 2019-10-01T10:00:00Z


def good(**over):
    ev = {"event_id": "e1", "type": "add_to_cart", "user_id": "u1", "timestamp": "2019-10-01T10:00:00Z",
          "properties": {"product_id": "p1", "price": 9.99, "currency": "EUR", "quantity": 2}}
    ev.update(over)
    return ev


def reason_of(value, key=None, **kw):
    with pytest.raises(InvalidEvent) as exc:
        parse(value, key, **kw)
    assert exc.value.reason in DLQ_REASONS
    return exc.value


def test_valid_event_is_normalized_and_matches_schema():
    ev = parse(orjson.dumps(good()), b"u1")
    assert ev["timestamp"] == "2019-10-01T10:00:00.000Z" and ev["timestamp_ms"] == T0
    assert ev["user_key"] == "u1" and ev["event_id"] == "e1"
    assert validation_errors("event", ev) == []


def test_epoch_ms_and_offsets_are_the_same_instant():
    a = parse(orjson.dumps(good(timestamp=T0)), None)
    b = parse(orjson.dumps(good(timestamp="2019-10-01T12:00:00+02:00")), None)
    assert a["timestamp_ms"] == b["timestamp_ms"] == T0


@pytest.mark.parametrize("value,key,reason", [
    (b"not json at all", None, "not_json"),
    (b"\xff\xfe{\"type\": 1}", None, "not_utf8"),
    (orjson.dumps(good()), b"\xff\xfe", "key_not_utf8"),
    (b"[1, 2]", None, "not_object"),
    (orjson.dumps(good(properties={"price": "abc"})), None, "schema"),
    (orjson.dumps({"type": "page_view", "timestamp": T0}), None, "missing_identity"),
    (orjson.dumps(good(user_id="")), None, "missing_identity"),
    (orjson.dumps(good(timestamp="yesterday")), None, "bad_timestamp"),
    (orjson.dumps(good(timestamp="2019-10-01T10:00:00")), None, "bad_timestamp"),
    (orjson.dumps(good(timestamp=None)), None, "bad_timestamp"),
    (orjson.dumps(good(type=7)), None, "schema"),
    (orjson.dumps(good(user_id={"a": 1})), None, "schema"),
    (orjson.dumps(good(properties={"quantity": -1})), None, "schema"),
    (orjson.dumps(good(properties={"currency": "euro"})), None, "schema"),
    (None, None, "not_json"),
])
def test_each_bad_input_has_its_reason(value, key, reason):
    err = reason_of(value, key)
    assert err.reason == reason, err.detail


def test_schema_error_names_the_field():
    err = reason_of(orjson.dumps(good(properties={"price": "abc"})))
    assert err.detail.startswith("properties.price:")


def test_too_large_is_checked_before_decoding():
    big = orjson.dumps(good(properties={"blob": "x" * (2 * 1024 * 1024)}))
    assert reason_of(big, max_bytes=65536).reason == "too_large"


def test_segment_track_call_is_mapped():
    seg = {"type": "track", "event": "Order Completed", "userId": "u9", "anonymousId": "a9", "messageId": "m-1",
           "timestamp": "2019-10-01T10:00:00Z", "properties": {"order_id": "o1", "total": 30.0, "currency": "USD"},
           "context": {"userAgent": "Mozilla/5.0"}}
    ev = parse(orjson.dumps(seg), None)
    assert ev["type"] == "purchase" and ev["user_id"] == "u9" and ev["anonymous_id"] == "a9"
    assert ev["event_id"] == "m-1" and ev["properties"]["revenue"] == 30.0
    assert ev["context"]["user_agent"] == "Mozilla/5.0"


@pytest.mark.parametrize("name,canonical", [("Product Viewed", "product_view"), ("Product Added", "add_to_cart"),
                                            ("Product Removed", "remove_from_cart"),
                                            ("Checkout Started", "checkout_start"), ("Products Searched", "search")])
def test_segment_names(name, canonical):
    assert parse(orjson.dumps(good(type=name)), None)["type"] == canonical


def test_segment_page_and_identify_calls():
    page = parse(orjson.dumps({"type": "page", "anonymousId": "a1", "timestamp": T0}), None)
    assert page["type"] == "page_view" and page["user_key"] == "anon:a1"
    ident = parse(orjson.dumps({"type": "identify", "userId": "u1", "timestamp": T0,
                                "traits": {"country": "DE"}}), None)
    assert ident["type"] == "identify" and ident["properties"]["traits"] == {"country": "DE"}


def test_custom_types_pass_through():
    assert parse(orjson.dumps(good(type="wishlist_add")), None)["type"] == "wishlist_add"


def test_missing_event_id_is_derived_deterministically():
    raw = good()
    del raw["event_id"]
    a = parse(orjson.dumps(raw), None)["event_id"]
    b = parse(orjson.dumps(dict(reversed(list(raw.items())))), None)["event_id"]
    assert a == b and a.startswith("d-")
    raw["properties"] = {**raw["properties"], "quantity": 3}
    assert parse(orjson.dumps(raw), None)["event_id"] != a


def test_future_timestamps_are_clamped_to_receive_time():
    received = T0
    ev = parse(orjson.dumps(good(timestamp=T0 + 3600_000)), None, received_ms=received, max_future_skew_ms=300_000)
    assert ev["timestamp_ms"] == received and ev["context"]["clock_corrected"] is True
    ok = parse(orjson.dumps(good(timestamp=T0 + 60_000)), None, received_ms=received, max_future_skew_ms=300_000)
    assert ok["timestamp_ms"] == T0 + 60_000 and "clock_corrected" not in ok.get("context", {})


def test_sent_at_corrects_client_clock_offset():
    # client clock 2 h ahead: timestamp and sent_at both ahead, received_at is the server's
    ev = parse(orjson.dumps(good(timestamp=T0 + 7200_000 - 5000, sent_at=T0 + 7200_000, received_at=T0)), None)
    assert ev["timestamp_ms"] == T0 - 5000


def test_dlq_record_matches_schema_and_keeps_offset():
    value = b"\xff" * 100
    rec = dlq_record(InvalidEvent("not_utf8", "x"), key=b"k", value=value, topic="raw", partition=2, offset=41,
                     timestamp_ms=T0, max_payload_bytes=10)
    assert validation_errors("dlq", rec) == []
    assert rec["value_truncated"] is True and rec["value_size"] == 100
    assert rec["source"] == {"topic": "raw", "partition": 2, "offset": 41, "timestamp_ms": T0}


def test_rees46_sample_ids_and_duplicates():
    events = list(read_rees46(BUNDLED_SAMPLE))
    assert len(events) == 4999
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == 4999 - 3  # the sample's 3 exact duplicate rows share ids
    assert {e["type"] for e in events} == {"product_view", "add_to_cart", "purchase"}
    for e in events[:200]:
        assert validation_errors("event", parse(orjson.dumps(e), None)) == []


def test_rfc3339_roundtrip():
    assert to_rfc3339(0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize("ts,why", [
    (1764432000, "epoch seconds"), ("20261129T100000Z", "not RFC 3339"), ("2026-11-29 10:00Z", "not RFC 3339"),
    ("2026-11-29T10:00:00", "no UTC offset"),
])
def test_ambiguous_or_non_rfc3339_timestamps_are_rejected(ts, why):
    err = reason_of(orjson.dumps(good(timestamp=ts)))
    assert err.reason == "bad_timestamp"
    assert why.split()[0].lower() in err.detail.lower() or "rfc 3339" in err.detail.lower()


def test_segment_delivered_timestamp_is_not_corrected_twice():
    # Segment already corrected `timestamp`; originalTimestamp (device clock, 2 h ahead) marks it
    seg = {"type": "track", "event": "Product Viewed", "userId": "u1", "timestamp": "2019-10-01T10:00:01Z",
           "originalTimestamp": "2019-10-01T12:00:00Z", "sentAt": "2019-10-01T12:00:00.500Z",
           "receivedAt": "2019-10-01T10:00:01.500Z"}
    ev = parse(orjson.dumps(seg), None)
    assert ev["timestamp"] == "2019-10-01T10:00:01.000Z" and "clock_corrected" not in ev.get("context", {})


def test_network_transit_is_not_clock_skew():
    ev = parse(orjson.dumps(good(timestamp=T0, sent_at=T0 + 10, received_at=T0 + 50)), None)
    assert ev["timestamp_ms"] == T0 and "clock_corrected" not in ev.get("context", {})


# --- bounds against poisoned users (issue "Trust and privacy") -------------------------------------

def purchase(**props):
    return orjson.dumps(good(type="purchase", event_id=None, properties={"currency": "USD", **props}))


def test_two_purchases_of_9e307_are_dead_lettered_not_summed_to_inf():
    # the exact inputs that pushed lifetime revenue to inf and crashed the worker: both schema-valid
    assert validation_errors("event", {**good(type="purchase"), "properties": {"revenue": 9e307}}) == []
    for _ in range(2):
        err = reason_of(purchase(revenue=9e307))
        assert err.reason == "out_of_range"
        assert err.detail == "properties.revenue: 9e+307 is outside [-1e+09, 1e+09] (CLICKPULSE_MAX_MONEY)"


@pytest.mark.parametrize("props,field", [
    ({"price": 1e9 + 1}, "price"), ({"revenue": -2e9}, "revenue"), ({"total": 5e9}, "total"),
    ({"value": 1e10}, "value"), ({"price": 18446744073709551615}, "price"), ({"revenue": 1.7976931348623157e308}, "revenue"),
])
def test_money_beyond_the_bound_is_out_of_range_naming_field_and_limit(props, field):
    err = reason_of(purchase(**props))
    assert err.reason == "out_of_range"
    assert err.detail.startswith(f"properties.{field}: ") and "1e+09" in err.detail and "CLICKPULSE_MAX_MONEY" in err.detail


@pytest.mark.parametrize("props", [{"price": 1e9}, {"revenue": -1e9}, {"revenue": -12.5}, {"total": 30},
                                   {"value": "n/a"}, {"value": 99.5}, {"quantity": 0}, {"quantity": 10_000}])
def test_money_and_quantities_within_the_bounds_pass(props):
    assert parse(purchase(**props), None)["properties"] == {"currency": "USD", **props}


def test_segment_total_is_bounded_as_the_sender_named_it():
    seg = {"type": "track", "event": "Order Completed", "userId": "u9", "timestamp": T0,
           "properties": {"order_id": "o1", "total": 2e9, "currency": "USD"}}
    err = reason_of(orjson.dumps(seg))
    assert err.reason == "out_of_range" and err.detail.startswith("properties.total: 2000000000.0 is outside")


def test_quantity_bound_and_schema_bound():
    err = reason_of(orjson.dumps(good(properties={"quantity": 10_001})))
    assert err.reason == "out_of_range"
    assert err.detail == "properties.quantity: 10001 is above the limit of 10000 units (CLICKPULSE_MAX_QUANTITY)"
    assert reason_of(orjson.dumps(good(properties={"quantity": 100_001}))).reason == "schema"  # the schema's own cap


def test_bounds_are_parameters():
    assert reason_of(purchase(price=150.0), max_money=100.0).reason == "out_of_range"
    assert parse(purchase(price=5e9), None, max_money=1e10)["properties"]["price"] == 5e9
    assert reason_of(orjson.dumps(good(properties={"quantity": 3})), max_quantity=2).reason == "out_of_range"


def test_bounds_come_after_schema_and_bool_is_not_money():
    assert reason_of(purchase(revenue=True)).reason == "schema"
    assert parse(purchase(value=True), None)["properties"]["value"] is True  # not a number: not money


def test_non_finite_numbers_are_rejected():
    err = reason_of(b'{"type": "purchase", "user_id": "u1", "timestamp": 0, "properties": {"revenue": 1e400}}')
    assert err.reason == "not_json" and "infinity" in err.detail  # orjson refuses numbers beyond a double
    assert reason_of(b'{"type": "purchase", "user_id": "u1", "timestamp": 0, "properties": {"revenue": NaN}}').reason == "not_json"
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(InvalidEvent) as exc:  # normalize takes Python objects: checked everywhere
            normalize({**good(), "properties": {"scroll_pct": 5, "extra": [1, {"x": bad}]}})
        assert exc.value.reason == "out_of_range" and exc.value.detail == "properties.extra.1.x: not a finite number"
        with pytest.raises(InvalidEvent) as exc:
            check_bounds({**good(), "properties": {"revenue": bad}})
        assert exc.value.reason == "out_of_range" and "not a finite number" in exc.value.detail


def test_out_of_range_dead_letter_matches_the_dlq_schema():
    err = reason_of(purchase(revenue=9e307))
    rec = dlq_record(err, key=None, value=purchase(revenue=9e307), topic="raw", partition=0, offset=1,
                     timestamp_ms=T0, max_payload_bytes=1000)
    assert rec["reason"] == "out_of_range" and validation_errors("dlq", rec) == []


def test_bound_settings_from_env():
    from clickpulse.errors import ConfigError
    from clickpulse.settings import Settings
    s = Settings.from_env({})
    assert (s.max_money, s.max_quantity) == (1e9, 10_000)
    s = Settings.from_env({"CLICKPULSE_MAX_MONEY": "5e6", "CLICKPULSE_MAX_QUANTITY": "50"})
    assert (s.max_money, s.max_quantity) == (5e6, 50)
    for env in ({"CLICKPULSE_MAX_MONEY": "nan"}, {"CLICKPULSE_MAX_MONEY": "inf"}, {"CLICKPULSE_MAX_QUANTITY": "0"}):
        with pytest.raises(ConfigError):
            Settings.from_env(env)


def test_identifiers_with_control_characters_are_refused():
    """They become Kafka and Redis keys and CLI arguments (a NUL cannot even be passed to
    `clickpulse privacy erase`)."""
    import orjson as _orjson
    for field in ("user_id", "anonymous_id"):
        for bad in ("\x00", "a\x01b", "a\nb", "x\x1b[31m", "del\x7f"):
            with pytest.raises(InvalidEvent) as exc:
                parse(_orjson.dumps({"type": "page_view", field: bad, "timestamp": 1569888000000}), None)
            assert exc.value.reason == "bad_identity" and field in exc.value.detail
            assert bad not in exc.value.detail  # the detail names the character, never the value
