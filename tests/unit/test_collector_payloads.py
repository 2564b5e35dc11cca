"""Real payloads through the collector's request handling, the event contract, the PII policy and
the user state.

Fixtures (``tests/unit/fixtures/``):

* ``segment-python-2.4.0/<call>.json`` and ``rudder-python-2.1.9/<call>.json``: the request bodies
  the real SDKs POSTed to ``/v1/batch`` (recorded against a capturing HTTP server; the rudder ones
  were gzip-encoded on the wire) for track, page, screen, identify, alias, group, and a batch of
  five calls flushed together (page, Product Viewed, Cart Viewed with ``products[]``, identify,
  Order Completed with ``products[]``). Timestamps and message ids are the recording's.
* ``segment-spec/ios-batch.json``, ``rudder-spec/js-batch.json``, ``rudder-spec/android-track.json``:
  written by hand after the Segment common-fields spec and RudderStack's event spec (not
  recorded): the mobile and browser shapes the Python SDKs never send - ``context.device`` /
  ``os`` / ``app`` / ``location`` / ``page`` / ``campaign`` objects, ``originalTimestamp``
  without ``timestamp``, identify traits in ``context.traits``, lower-case currencies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from clickpulse.collector.request import Limits, records
from clickpulse.events.contract import parse, parse_timestamp
from clickpulse.events.pii import PiiPolicy
from clickpulse.state.user import StateConfig, UserState, apply

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = sorted(FIXTURES.glob("segment-python-*/*.json")) + sorted(FIXTURES.glob("rudder-python-*/*.json"))
SPEC = sorted(FIXTURES.glob("segment-spec/*.json")) + sorted(FIXTURES.glob("rudder-spec/*.json"))
CALLS = ("track", "page", "screen", "identify", "alias", "group", "batch")
RECEIVED = "2026-12-01T10:00:30.000Z"


def through(path: Path, received_at: str = RECEIVED) -> list[dict[str, Any]]:
    """The fixture as the collector publishes it, parsed by the worker's contract and filtered by the
    default PII policy: one canonical event per message."""
    obj = orjson.loads(path.read_bytes())
    call = "batch" if "batch" in obj else path.stem.split("-")[-1]
    policy = PiiPolicy.default()
    out = []
    for key, value in records(call, obj, received_at, Limits()):
        ev = parse(value, key, received_ms=parse_timestamp(received_at))
        assert ev["user_key"].encode() == key  # the collector's Kafka key is the worker's user key
        ev, _counts = policy.apply(ev)
        out.append(ev)
    return out


def test_every_call_type_of_both_sdks_is_recorded():
    for lib in ("segment-python-2.4.0", "rudder-python-2.1.9"):
        assert sorted(p.stem for p in (FIXTURES / lib).glob("*.json")) == sorted(CALLS)


@pytest.mark.parametrize("path", RECORDED + SPEC, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_contract_accepts_every_fixture(path):
    events = through(path)
    assert events
    raw = orjson.loads(path.read_bytes())
    msgs = raw["batch"] if "batch" in raw else [raw]
    assert [e["event_id"] for e in events] == [m["messageId"] for m in msgs]  # messageId is event_id
    for ev in events:
        blob = orjson.dumps(ev)
        # the default PII policy keeps no address, IP, advertising id or device id
        for secret in (b"@example.com", b"203.0.113.7", b"198.51.100.4", b"advertisingId", b"B5372DB0",
                       b"38400000-8cf0", b"Jane Doe", b"writeKey", b"wk-fixture"):
            assert secret not in blob, (secret, ev)


@pytest.mark.parametrize("lib", ["segment-python-2.4.0", "rudder-python-2.1.9"])
def test_recorded_single_calls_map_to_canonical_events(lib):
    d = FIXTURES / lib
    [track] = through(d / "track.json")
    assert track["type"] == "add_to_cart" and track["properties"]["currency"] == "USD"
    assert track["properties"]["product_id"] == "sku-1" and track["properties"]["quantity"] == 2
    assert track["user_key"] == f"{lib.split('-')[0]}-user-1"
    [page] = through(d / "page.json")
    assert page["type"] == "page_view" and page["user_key"] == f"anon:{lib.split('-')[0]}-anon-1"
    [screen] = through(d / "screen.json")
    assert screen["type"] == "page_view"
    [ident] = through(d / "identify.json")
    # Segment sends traits at the top level, RudderStack in context.traits: both become traits
    assert ident["type"] == "identify" and ident["properties"]["traits"] == {"plan": "pro", "country": "US"}
    assert "traits" not in ident.get("context", {})
    [alias] = through(d / "alias.json")
    assert alias["type"] == "alias" and alias["user_id"] == f"{lib.split('-')[0]}-user-1"
    [group] = through(d / "group.json")
    assert group["type"] == "group"


@pytest.mark.parametrize("lib", ["segment-python-2.4.0", "rudder-python-2.1.9"])
def test_recorded_batch_products_count_in_state(lib):
    events = through(FIXTURES / lib / "batch.json")
    assert [e["type"] for e in events] == ["page_view", "product_view", "cart_view", "identify", "purchase"]
    cart, order = events[2], events[4]
    assert cart["properties"]["value"] == 15 * 3 + 2.5
    assert order["properties"]["revenue"] == 15 * 3 + 2.5 and order["properties"]["currency"] == "EUR"
    st = UserState(key=order["user_key"])
    apply(st, order, None, StateConfig())
    assert st.life.orders == 1 and st.life.revenue == 47.5  # lifetime revenue counts the products


def test_segment_mobile_context_objects():
    screen, add = through(FIXTURES / "segment-spec" / "ios-batch.json")
    assert screen["context"]["device"] == "mobile" and add["context"]["device"] == "tablet"  # iPhone, iPad
    assert screen["context"]["country"] == "Germany"  # from context.location
    assert screen["context"]["os"] == {"name": "iOS", "version": "17.1"}  # allowed by the default policy
    assert "device_info" not in screen["context"] and "location" not in screen["context"]
    assert add["properties"]["currency"] == "EUR"
    st = UserState(key=screen["user_key"])
    for ev in (screen, add):
        apply(st, ev, None, StateConfig())
    assert st.traits["device"] == "tablet" and st.traits["country"] == "Germany"
    assert st.cart.items["sku-3"].quantity == 1


def test_rudderstack_js_original_timestamp_and_clock_correction():
    page, ident, order = through(FIXTURES / "rudder-spec" / "js-batch.json")
    # timestamp = receivedAt - (sentAt - originalTimestamp): 10:00:30 - 0.8 s
    assert page["timestamp"] == "2026-12-01T10:00:29.200Z" and page["context"]["clock_corrected"] is True
    assert ident["properties"]["traits"] == {"plan": "pro", "country": "GB"}
    assert order["type"] == "purchase" and order["properties"]["revenue"] == 189.0
    assert order["properties"]["currency"] == "GBP"
    # a client clock within 2 s of the collector's is transit time, not skew: left as sent
    [close] = through(FIXTURES / "rudder-spec" / "js-batch.json", "2026-12-01T10:00:01.000Z")[:1]
    assert close["timestamp"] == "2026-12-01T10:00:00.000Z"


def test_rudderstack_android_device_and_currency():
    [ev] = through(FIXTURES / "rudder-spec" / "android-track.json")
    assert ev["type"] == "product_view" and ev["context"]["device"] == "mobile"
    assert ev["properties"]["currency"] == "USD" and ev["user_key"] == "anon:rand-anon-1"


@pytest.mark.parametrize("device,cls", [
    ({"type": "ios", "model": "iPhone15,2"}, "mobile"), ({"type": "ios", "model": "iPad13,4"}, "tablet"),
    ({"type": "android", "name": "Galaxy Tab S9"}, "tablet"), ({"type": "Android"}, "mobile"),
    ({"type": "desktop"}, "desktop"), ({"type": "tvos"}, "mobile"), ({"type": "smart-tv"}, "smart-tv"),
    ({"id": "x"}, None), ({"type": ""}, None), ({"type": 7}, None),
])
def test_device_objects(device, cls):
    ev = parse(orjson.dumps({"type": "page", "anonymousId": "a", "timestamp": 1764583200000,
                             "context": {"device": device}}), None)
    assert ev["context"].get("device") == cls and ev["context"]["device_info"] == device


@pytest.mark.parametrize("cur,out", [("eur", "EUR"), ("Usd", "USD"), ("EUR", "EUR")])
def test_currency_in_any_case(cur, out):
    ev = parse(orjson.dumps({"type": "purchase", "user_id": "u", "timestamp": 1764583200000,
                             "properties": {"revenue": 1, "currency": cur}}), None)
    assert ev["properties"]["currency"] == out


@pytest.mark.parametrize("cur", ["euro", "eu", "eur\n", "€ur", "ｅｕｒ", 7])
def test_currency_that_is_no_code_is_still_refused(cur):
    from clickpulse.errors import InvalidEvent
    with pytest.raises(InvalidEvent) as exc:
        parse(orjson.dumps({"type": "purchase", "user_id": "u", "timestamp": 1764583200000,
                            "properties": {"revenue": 1, "currency": cur}}), None)
    assert exc.value.reason == "schema" and "currency" in exc.value.detail


@pytest.mark.parametrize("props,want", [
    ({"products": [{"price": 2, "quantity": 3}, {"price": 1.5}]}, 7.5),
    ({"products": [{"price": 2, "quantity": 3}], "revenue": 1}, 1),  # sent revenue wins
    ({"products": [{"price": 2, "quantity": 3}], "total": 4}, 4),  # total becomes revenue, as before
    ({"products": [{"price": "2"}, {"quantity": 2}, {"price": 2, "quantity": -1}, {"price": 2, "quantity": 1.5}]}, None),
    ({"products": [{"price": 1e308, "quantity": 10}]}, None),  # overflow: no total (inf is never made)
    ({"products": []}, None),
])
def test_products_total_of_a_purchase(props, want):
    ev = parse(orjson.dumps({"type": "track", "event": "Order Completed", "userId": "u", "timestamp": 1764583200000,
                             "properties": props}), None)
    assert ev["type"] == "purchase" and ev["properties"].get("revenue") == want


def test_products_total_is_bounded_like_any_money():
    from clickpulse.errors import InvalidEvent
    with pytest.raises(InvalidEvent) as exc:
        parse(orjson.dumps({"type": "Order Completed", "userId": "u", "timestamp": 1764583200000,
                            "properties": {"products": [{"price": 1e9, "quantity": 3}]}}), None)
    assert exc.value.reason == "out_of_range" and "revenue" in exc.value.detail


def test_products_must_be_a_list_of_objects():
    from clickpulse.errors import InvalidEvent
    for products in ("x", [1, 2], {"a": 1}):
        with pytest.raises(InvalidEvent) as exc:
            parse(orjson.dumps({"type": "Cart Viewed", "userId": "u", "timestamp": 1764583200000,
                                "properties": {"products": products}}), None)
        assert exc.value.reason == "schema" and exc.value.detail.startswith("properties.products")


def test_original_timestamp_is_used_only_without_timestamp():
    base = {"type": "page", "anonymousId": "a"}
    ev = parse(orjson.dumps({**base, "originalTimestamp": "2026-12-01T10:00:00Z"}), None)
    assert ev["timestamp"] == "2026-12-01T10:00:00.000Z" and "original_timestamp" not in ev
    # with both (Segment's server already corrected timestamp): timestamp as sent, no correction
    ev = parse(orjson.dumps({**base, "timestamp": "2026-12-01T10:00:05Z", "originalTimestamp": "2026-12-01T09:00:00Z",
                             "sentAt": "2026-12-01T09:00:01Z", "receivedAt": "2026-12-01T10:00:06Z"}), None)
    assert ev["timestamp"] == "2026-12-01T10:00:05.000Z"
    from clickpulse.errors import InvalidEvent
    with pytest.raises(InvalidEvent) as exc:
        parse(orjson.dumps({**base, "originalTimestamp": "yesterday"}), None)
    assert exc.value.reason == "bad_timestamp"


def test_identify_keeps_top_level_traits_over_context_traits():
    ev = parse(orjson.dumps({"type": "identify", "userId": "u", "timestamp": 1764583200000,
                             "traits": {"plan": "a"}, "context": {"traits": {"plan": "b"}}}), None)
    assert ev["properties"]["traits"] == {"plan": "a"} and ev["context"]["traits"] == {"plan": "b"}
    ev = parse(orjson.dumps({"type": "track", "event": "x", "userId": "u", "timestamp": 1764583200000,
                             "context": {"traits": {"plan": "b"}}}), None)
    assert "traits" not in ev.get("properties", {})  # only identify takes traits
