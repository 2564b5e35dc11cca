"""Hostile input end to end without Kafka: arbitrary JSON through ``parse`` and the engine step.

Property: whatever a producer sends, ``parse`` either returns a canonical event or raises
``InvalidEvent`` with a known reason; the engine step then processes it without an exception
(nothing failed, nobody quarantined), and nothing non-finite (inf, NaN) reaches a user's state,
a profile, an action, a segment change or a training example.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickpulse.errors import InvalidEvent
from clickpulse.events.contract import CANONICAL_TYPES, DLQ_REASONS, parse
from clickpulse.models.labels import ModelConfig
from clickpulse.models.registry import ModelRegistry
from clickpulse.state.user import UserState
from clickpulse.testing import memory_engine

T0 = 1_569_888_000_000  # 2019-10-01T00:00:00Z

odd_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "\u0000", "\u202e", "💥" * 10, "a" * 300, "EUR", "eur", "e\u0301", "\ufeff"])
numbers = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([9e307, -9e307, 1e308, 1e-308, 0, -0.0, 2**63, 2**64 + 1, 10**30]))
leaves = st.none() | st.booleans() | numbers | odd_text
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(odd_text, inner, max_size=4), max_leaves=20)
money = numbers | odd_text | st.none()
properties = st.fixed_dictionaries({}, optional={
    "product_id": odd_text | numbers, "price": money, "revenue": money, "total": money, "value": money,
    "quantity": numbers | odd_text, "currency": odd_text, "category": odd_text | numbers,
    "scroll_pct": numbers, "dwell_ms": numbers, "page_type": odd_text | numbers,
    "consent": st.dictionaries(odd_text, st.booleans() | leaves, max_size=3),
    "traits": st.dictionaries(odd_text, json_values, max_size=3), "extra": json_values})
events = st.fixed_dictionaries({
    "type": st.sampled_from(sorted(CANONICAL_TYPES)) | odd_text | numbers,
    "user_id": st.sampled_from(["u1", "u2", "u3"]) | odd_text | numbers,
    "timestamp": st.integers(min_value=T0, max_value=T0 + 10 * 86_400_000) | numbers | odd_text,
}, optional={"event_id": odd_text | numbers, "anonymous_id": odd_text, "properties": properties | json_values,
             "context": st.dictionaries(odd_text, json_values, max_size=3) | json_values,
             "sent_at": odd_text | numbers})


def _finite(obj: Any, where: str) -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj), f"non-finite {obj!r} in {where}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        names = getattr(obj, "__slots__", None) or vars(obj)
        for k in names:
            _finite(getattr(obj, k, None), f"{where}.{k}")


def _engine() -> Any:
    eng = memory_engine(live=False)
    eng.models, eng.mcfg = ModelRegistry({}), ModelConfig()
    return eng


def _encode(obj: dict) -> bytes:
    return json.dumps(obj, allow_nan=False).encode()  # stdlib: integers of any size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(events, min_size=1, max_size=6))
def test_arbitrary_json_never_escapes_and_never_poisons_state(batch):
    eng = _engine()
    items = []
    for obj in batch:
        try:
            items.append((0, parse(_encode(obj), None, received_ms=T0 + 20 * 86_400_000)))
        except InvalidEvent as err:
            assert err.reason in DLQ_REASONS
    em = eng.step(items, T0)
    assert em.failed == [] and em.quarantined == {}, (em.failed, em.quarantined)
    eng.commit(em)
    for close in (eng.end_of_input_step(0, 0, 1, T0),):
        assert close.failed == [] and close.quarantined == {}
        eng.commit(close)
        em.merge(close)
    for rec in em.actions + em.segment_changes + em.examples:
        _finite(rec, "record")
        orjson.dumps(rec)  # serializable as the worker publishes it
    for key, raw in eng.table.items():
        state = UserState.from_bytes(raw)
        _finite(state, f"state {key!r}")
        prof = state.profile(engagement=eng.cfg.engagement, extra=eng.profile_extra(state))
        _finite(prof, "profile")
        orjson.dumps(prof)


def test_the_issue_inputs_revenue_9e307_twice():
    """Two schema-valid purchases with revenue 9e307 pushed lifetime revenue to inf."""
    eng = _engine()
    for i in range(2):
        obj = {"type": "purchase", "user_id": "whale", "timestamp": T0 + i, "event_id": f"w{i}",
               "properties": {"revenue": 9e307}}
        try:
            eng.process(0, parse(orjson.dumps(obj), None), 0)
        except InvalidEvent as err:
            assert err.reason == "out_of_range"
    st_ = eng.load("whale")
    assert st_ is None or math.isfinite(st_.life.revenue)


# --- issue #10, second review: inputs that outgrow or poison a user -------------------------------

from clickpulse.events.dlq import dlq_record  # noqa: E402
from clickpulse.events.pii import PiiPolicy  # noqa: E402
from clickpulse.state import user as user_state  # noqa: E402


def _outcome(obj: dict, raw: bytes | None = None) -> tuple[str, str]:
    try:
        parse(raw if raw is not None else orjson.dumps(obj), None)
    except InvalidEvent as err:
        return err.reason, err.detail
    return "ok", ""


def _redacted(obj: dict, raw: bytes | None = None) -> tuple[str, str]:
    """The dead-letter (reason, detail) as the default PII policy publishes it."""
    value = raw if raw is not None else orjson.dumps(obj)
    try:
        parse(value, None)
    except InvalidEvent as err:
        rec = PiiPolicy.default().redact_dead_letter(dlq_record(err, key=None, value=value, topic="t", partition=0,
                                                                offset=0, timestamp_ms=None, max_payload_bytes=100))
        return rec["reason"], rec["detail"]
    raise AssertionError("accepted")


def test_every_string_the_state_keeps_is_bounded_by_the_contract():
    """The reviewer's input: add_to_cart with a 60,000-character product_id (each event < 64 KB)
    grew one user's state past Kafka's 1 MB message limit. Every string field the state keeps
    has a limit; the dead letter says which field and that it is too long, without the value."""
    big = "p" * 60_000
    for i in range(14):
        obj = {"type": "add_to_cart", "user_id": "victim", "timestamp": T0 + i, "event_id": f"big-{i}",
               "properties": {"product_id": big, "price": 1.0}}
        assert len(orjson.dumps(obj)) < 65536
        reason, detail = _redacted(obj)
        assert reason == "schema" and detail.startswith("properties.product_id:") and "too long" in detail
        assert big[:20] not in detail
    long_ = "x" * 300
    cases = {"user_id": {"user_id": "u" * 129}, "anonymous_id": {"anonymous_id": "a" * 129},
             "event_id": {"event_id": "e" * 129}, "type": {"type": "t" * 65},
             "properties.category": {"properties": {"category": long_}},
             "properties.category_id": {"properties": {"category_id": long_}},
             "properties.page_type": {"properties": {"page_type": long_}},
             "properties.order_id": {"properties": {"order_id": long_}},
             "properties.traits.plan": {"type": "identify", "properties": {"traits": {"plan": long_}}},
             "properties.traits": {"type": "identify", "properties": {"traits": {"k" * 65: 1}}},
             "properties.consent": {"type": "consent", "properties": {"consent": {"p" * 65: True}}},
             "properties.products.0.product_id": {"properties": {"products": [{"product_id": long_}]}},
             "context.country": {"context": {"country": long_}}, "context.device": {"context": {"device": long_}}}
    for path, over in cases.items():
        obj = {"type": "product_view", "user_id": "u1", "timestamp": T0}
        for k, v in over.items():
            obj[k] = v
        reason, detail = _redacted(obj)
        assert reason == "schema" and detail.startswith(path + ":"), (path, detail)
        assert ("too long" in detail or "too many" in detail) and long_[:20] not in detail, (path, detail)
    reason, detail = _outcome({"type": "identify", "user_id": "u1", "timestamp": T0,
                               "properties": {"traits": {f"t{i}": i for i in range(65)}}})
    assert reason == "schema" and "too many (maxProperties 64)" in detail


def test_integers_beyond_2_53_are_out_of_range_anywhere_and_dwell_has_a_maximum():
    """`dwell_ms: 18446744073709551615` passed validation, then overflowed the state encoder."""
    reason, detail = _redacted({}, b'{"type":"dwell","user_id":"victim","timestamp":1569888000000,'
                                   b'"properties":{"dwell_ms":18446744073709551615}}')
    assert reason == "schema" and detail == "properties.dwell_ms: number is above the maximum (maximum 86400000)"
    for where in (b'"x":18446744073709551615', b'"context":{"a":[1,-9007199254740992]}', b'"y":9007199254740992',
                  b'"properties":{"product_id":9007199254740993}'):
        reason, detail = _outcome({}, b'{"type":"dwell","user_id":"u","timestamp":1569888000000,' + where + b"}")
        assert reason == "out_of_range" and "outside [-(2**53 - 1), 2**53 - 1]" in detail, (where, detail)
    assert _outcome({}, b'{"type":"x","user_id":"u","timestamp":1569888000000,"n":9007199254740991,'
                        b'"m":-9007199254740991,"s":"12345678901234567890"}')[0] == "ok"  # 2**53 - 1; digits in a string




def test_integers_beyond_64_bits_are_read_as_floats_and_stay_finite():
    """orjson (like most JSON decoders) reads an integer literal beyond 64 bits as a float:
    2**64 arrives as 1.8446744073709552e+19, a finite float like any other, so it is not
    ``out_of_range`` (the README says so); the money fields keep their own bound."""
    reason, _ = _outcome({}, b'{"type":"identify","user_id":"u","timestamp":1569888000000,'
                             b'"traits":{"age":18446744073709551616}}')
    assert reason == "ok"
    reason, detail = _outcome({}, b'{"type":"purchase","user_id":"u","timestamp":1569888000000,'
                                  b'"properties":{"revenue":18446744073709551616}}')
    assert reason == "out_of_range" and "CLICKPULSE_MAX_MONEY" in detail, detail


def test_timestamp_zero_and_other_numbers_below_1e11_are_refused():
    for ts in (0, -1, 1, 1_569_888_000, 99_999_999_999, 0.5):
        reason, detail = _outcome({"type": "page_view", "user_id": "u1", "timestamp": ts})
        assert reason == "bad_timestamp" and "epoch seconds" in detail, ts
    assert _outcome({"type": "page_view", "user_id": "u1", "timestamp": 100_000_000_000})[0] == "ok"
    assert _outcome({"type": "page_view", "user_id": "u1", "timestamp": "1970-01-01T00:00:00Z"})[0] == "ok"


def test_dead_letter_details_keep_the_reason_but_never_the_value():
    reason, detail = _redacted({"type": "page_view", "user_id": "x" * 60_000, "timestamp": T0})
    assert (reason, detail) == ("schema", "user_id: string of 60000 characters is too long (maxLength 128)")
    reason, detail = _redacted({"type": "page_view", "user_id": "alice\u0000@example.com", "timestamp": T0})
    assert reason == "bad_identity" and detail.startswith("user_id: contains the non-printable character U+0000")
    assert "alice" not in detail and "<redacted>" not in detail
    from clickpulse.events.pii import redact_detail
    assert redact_detail("(root): can't derive an event_id", "schema") == "(root): can't derive an event_id"
    assert redact_detail("x: 'alice' can't be", "schema") == "x: '<redacted>' can't be"
    assert (redact_detail("p: number is above the maximum (maximum 86400000) 4915112345678", "schema")
            == "p: number is above the maximum (maximum 86400000) <redacted>")
    reason, detail = _redacted({"type": "page_view", "user_id": "u1", "timestamp": T0,
                                "properties": {"price": "alice@example.com"}})
    assert detail == "properties.price: is of type string, expected number"


def test_identifiers_cannot_forge_a_guest_key_or_hide_characters():
    assert _outcome({"type": "page_view", "user_id": "anon:victim", "timestamp": T0})[0] == "bad_identity"
    assert _outcome({"type": "page_view", "anonymous_id": "anon:x", "timestamp": T0})[0] == "ok"  # guest key anon:anon:x
    for bad in ("vic\u202etim", "a\u2066b", "a\u200bb", "a\u2028b", "a\x85b", "\ufeffu1"):
        for field in ("user_id", "anonymous_id"):
            reason, detail = _outcome({"type": "page_view", field: bad, "timestamp": T0})
            assert reason == "bad_identity" and detail.startswith(field + ":"), (field, bad, detail)
    for blank in (" ", "\t\n", "\u3000"):
        assert _outcome({"type": "page_view", "user_id": blank, "timestamp": T0})[0] == "missing_identity"
    ev = parse(orjson.dumps({"type": "page_view", "user_id": "  u1 ", "anonymous_id": " ", "timestamp": T0}), None)
    assert ev["user_key"] == "u1" and ev["user_id"] == "u1" and "anonymous_id" not in ev
    ev = parse(orjson.dumps({"type": "page_view", "user_id": "Ada Lovelace", "timestamp": T0}), None)
    assert ev["user_key"] == "Ada Lovelace"
    # duplicate keys: the last value wins (documented), nothing else happens
    ev = parse(b'{"type":"page_view","user_id":"a","user_id":"b","timestamp":1569888000000}', None)
    assert ev["user_key"] == "b"


def _ev(etype: str, i: int, user: str = "grow", **props: Any) -> dict:
    obj = {"type": etype, "user_id": user, "timestamp": T0 + i * 1000, "event_id": f"{user}-{etype}-{i}"}
    if props:
        obj["properties"] = props
    return parse(orjson.dumps(obj), None)


def test_every_per_user_collection_is_capped():
    """One user sends as much distinct, maximal-length data as the contract lets through: every
    collection the state keeps stops at its cap and the encoded state stays far below the cap of
    CLICKPULSE_MAX_STATE_BYTES (256 KiB)."""
    eng = _engine()
    eng.max_state_bytes = 10**9  # measure the caps alone
    s256 = "x" * 250
    items, i = [], 0
    for n in range(300):
        i += 1
        items.append((0, _ev("add_to_cart", i, product_id=f"{n:04d}{s256}", category=f"{n}{s256}", price=1.0)))
        i += 1
        items.append((0, _ev("product_view", i, product_id=f"{n:04d}{s256}", category=f"{n}{s256}",
                             page_type=f"{n}{'p' * 60}")))
        i += 1
        items.append((0, _ev(f"custom_{n}_{'t' * 50}", i)))
        i += 1
        items.append((0, _ev("identify", i, traits={f"{n}_{j}_{'k' * 50}": s256 for j in range(16)})))
        i += 1
        items.append((0, _ev("consent", i, consent={f"{n}_{j}_{'c' * 50}": bool(j % 2) for j in range(16)})))
    for n in range(100):  # one product added again and again: lots
        i += 1
        items.append((0, _ev("add_to_cart", i, product_id="same", quantity=1)))
    for k in range(0, len(items), 50):
        em = eng.step(items[k:k + 50], T0)
        assert em.failed == [] and em.quarantined == {}
        eng.commit(em)
    st_ = eng.load("grow")
    assert len(st_.cart.items) == user_state.MAX_CART_ITEMS and "same" in st_.cart.items
    assert len(st_.cart.items["same"].lots) == user_state.MAX_LOTS and st_.cart.items["same"].quantity == 100
    assert len(st_.traits) <= user_state.MAX_TRAITS
    assert len(st_.consent) == user_state.MAX_CONSENT_PURPOSES
    assert len(st_.categories) == user_state.MAX_CATEGORIES
    assert len(st_.windows.types) <= user_state.MAX_EVENT_TYPES
    for sess in (st_.session, st_.prev_session):
        if sess is not None:
            assert len(sess.counts) <= user_state.MAX_EVENT_TYPES and len(sess.page_dwell_ms) <= user_state.MAX_PAGE_TYPES
            assert len(sess.products) <= user_state.MAX_SESSION_PRODUCTS and len(sess.path) <= user_state.MAX_PATH
    assert len(st_.recent_ids) <= eng.cfg.dedup_ids_per_user
    size = len(eng.table[b"grow"])
    assert size < 200_000, size
    # the canonical types are still counted once the custom types have filled the cap
    i += 1
    em = eng.step([(0, _ev("purchase", i, revenue=5.0))], T0)
    eng.commit(em)
    assert eng.load("grow").windows.count("purchase", "7d", T0 + i * 1000) == 1


def test_a_refused_consent_is_kept_when_purposes_overflow():
    eng = _engine()
    items = [(0, _ev("consent", 0, user="c", consent={"marketing": False}))]
    for n in range(1, 40):
        items.append((0, _ev("consent", n, user="c", consent={f"purpose_{n}": True})))
    em = eng.step(items, T0)
    eng.commit(em)
    consent = eng.load("c").consent
    assert len(consent) == user_state.MAX_CONSENT_PURPOSES and consent["marketing"][0] is False


def test_state_size_net_dead_letters_the_event_and_keeps_the_previous_state():
    """Last resort: whatever grows a state past max_state_bytes is refused (state_too_large) in
    the same step, the user's previous state stands, other users of the batch are processed."""
    eng = _engine()
    eng.max_state_bytes = 6000
    items = [(0, _ev("consent", 0, user="big", consent={"marketing": False})),
             (0, _ev("purchase", 1, user="big", revenue=12.5))]
    em = eng.step(items, T0)
    eng.commit(em)
    before = eng.table[b"big"]
    batch = []
    for n in range(60):
        batch.append((0, _ev("add_to_cart", 10 + n, user="big", product_id=f"{n}{'x' * 250}", category="c" * 250)))
        batch.append((0, _ev("page_view", 10 + n, user=f"other{n}")))
    em = eng.step(batch, T0)
    eng.commit(em)
    refused = [f for f in em.failed if f.reason == "state_too_large"]
    assert refused and all(f.user_key == "big" for f in em.failed) and len(refused) == len(em.failed)
    assert all(batch[f.index][1]["user_key"] == "big" for f in refused)
    assert em.quarantined == {}
    assert all(eng.load(f"other{n}") is not None for n in range(60))
    after = eng.table[b"big"]
    assert len(before) < len(after) <= 6000
    st_ = eng.load("big")
    assert st_.consent["marketing"][0] is False and st_.life.orders == 1 and st_.life.revenue == 12.5
    accepted = len(st_.cart.items)
    assert accepted + len(refused) == 60 and accepted > 0
    # the refused events changed nothing: the state equals one built from the accepted ones alone
    ref = _engine()
    ref.max_state_bytes = 10**9
    keep = {f.index for f in refused}
    ref.commit(ref.step(items, T0))
    ref.commit(ref.step([it for k, it in enumerate(batch) if k not in keep], T0))
    assert ref.table[b"big"] == after


def test_an_event_that_overflows_only_with_the_stored_state_does_not_quarantine_it():
    """The reviewer's dwell_ms overflow got past the contract and failed only when added to the
    stored total; a fresh state took it, so the engine blamed (quarantined) the stored state,
    wiping consent, orders and revenue. Built here past the contract (a canonical event the
    engine might get from an older release): the event is dead-lettered, the state kept."""
    eng = _engine()
    eng.commit(eng.step([(0, _ev("consent", 0, user="victim", consent={"marketing": False})),
                         (0, _ev("purchase", 1, user="victim", revenue=40.0))], T0))
    before = eng.table[b"victim"]
    for n in range(3):
        ev = _ev("dwell", 2 + n, user="victim", dwell_ms=1000)
        ev["properties"]["dwell_ms"] = 2**63  # alone it encodes (uint64); added to a total it overflows
        em = eng.step([(0, ev)], T0)
        eng.commit(em)
        assert em.quarantined == {}, em.quarantined
        if n:
            assert [f.reason for f in em.failed] == ["internal"] and "Overflow" in em.failed[0].error
    st_ = eng.load("victim")
    assert st_.consent["marketing"][0] is False and st_.life.orders == 1 and st_.life.revenue == 40.0
    assert len(eng.table[b"victim"]) >= len(before)


def test_a_broken_stored_state_is_still_quarantined():
    """The decision still blames a state that fails on its own (here a corrupt order count)."""
    eng = _engine()
    eng.commit(eng.step([(0, _ev("purchase", 0, user="p", revenue=5.0))], T0))
    st_ = eng.load("p")
    st_.life.orders = "1"  # a corrupt total: any purchase over it raises
    eng.table[b"p"] = st_.to_bytes()
    eng._cache.clear()
    em = eng.step([(0, _ev("purchase", 1, user="p", revenue=5.0))], T0)
    assert list(em.quarantined) == ["p"] and em.failed == []


def test_a_failing_event_in_a_rerun_batch_loses_none_of_its_users_other_events():
    """A batch with a failing event is re-run event by event; the user's earlier events of the
    batch (not committed to the table yet) must survive the failing event's rollback."""
    eng = _engine()
    bad = _ev("purchase", 2, user="a", revenue=1.0)
    bad["properties"]["revenue"] = "abc"  # past the contract: fails over any state
    batch = [(0, _ev("add_to_cart", 1, user="a", product_id="p1", price=2.0)), (0, bad),
             (0, _ev("add_to_cart", 3, user="a", product_id="p2", price=3.0)),
             (0, _ev("page_view", 3, user="b"))]
    em = eng.step(batch, T0)
    eng.commit(em)
    assert [(f.index, f.reason) for f in em.failed] == [(1, "internal")] and em.quarantined == {}
    st_ = eng.load("a")
    assert set(st_.cart.items) == {"p1", "p2"} and st_.life.events == 2 and eng.load("b") is not None
