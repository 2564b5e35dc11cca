"""The binary user-state format (version 2) and the version 1 (orjson) records it replaces."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.state.user import (
    FORMAT_VERSION,
    VOCABULARY,
    StateConfig,
    UserState,
    apply,
    id_hash,
    is_duplicate,
)
from clickpulse.testing import event

from .fixtures.make_state_v1 import normalized, random_digest, replay, replay_digest

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "state_v1.json").read_text())


def _v1_records() -> list[dict]:
    return FIXTURE["records"]


@pytest.mark.parametrize("rec", _v1_records(), ids=lambda r: r["key"])
def test_version_1_records_written_by_the_previous_release_restore(rec):
    raw = rec["v1"].encode()
    st = UserState.from_bytes(raw)
    assert st.key == rec["key"]
    # nothing lost: writing it back as version 1 gives the same record (ids cut to 8 bytes)
    assert normalized(st.to_bytes_json()) == normalized(raw)
    # and the binary form holds the same state
    data = st.to_bytes()
    assert data[:1] != b"{" and msgspec.msgpack.decode(data)[0] == FORMAT_VERSION
    assert UserState.from_bytes(data) == st
    assert UserState.from_bytes(data).to_bytes() == data
    assert len(data) < len(raw) / 2


def test_ids_seen_before_the_upgrade_are_still_duplicates():
    rec = next(r for r in _v1_records() if r["key"] == "synthetic-user")
    st = UserState.from_bytes(rec["v1"].encode())
    recent = rec["event_ids"][-len(st.recent_ids):]
    for eid in recent:
        assert is_duplicate(st, {"event_id": eid})
        assert apply(st, event("page_view", event_id=eid), None, StateConfig()).duplicate
    assert not is_duplicate(st, {"event_id": "never-seen"})


def test_engine_decisions_equal_the_previous_release_on_rees46():
    """Actions, segment changes, labeled examples and every final state (compared in the
    version 1 form) over the REES46 sample equal what the previous release produced."""
    events = [parse(orjson.dumps(e), None) for e in read_rees46(BUNDLED_SAMPLE)]
    assert replay_digest(*replay(events)) == FIXTURE["rees46_replay_digest"]


def test_state_step_equals_the_previous_release_on_random_users():
    """Random event sequences (every type and property the step reads, duplicates, late and
    out-of-order events, the state stored and restored between events): same final states,
    flags, rule actions and profiles as the previous release."""
    assert random_digest() == FIXTURE["random_digest"]


class Version1Table(dict):
    """A table that keeps every state in the version 1 format (a changelog of the old release)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, UserState.from_bytes(value).to_bytes_json())


def test_restoring_from_version_1_records_mid_stream_changes_nothing():
    events = [parse(orjson.dumps(e), None) for e in read_rees46(BUNDLED_SAMPLE)]
    eng_a, out_a, table_a = replay(events)
    eng_b, out_b, table_b = replay(events, Version1Table())
    assert out_a == out_b
    assert replay_digest(eng_a, out_a, table_a) == replay_digest(eng_b, out_b, table_b)


def test_rees46_states_round_trip_and_are_small():
    events = [parse(orjson.dumps(e), None) for e in read_rees46(BUNDLED_SAMPLE)]
    _eng, _out, table = replay(events[:2500], close=False)   # open sessions, timers, pending predictions
    sizes = []
    for raw in table.values():
        st = UserState.from_bytes(raw)
        assert st.to_bytes() == raw
        assert UserState.from_bytes(st.to_bytes_json()) == st
        sizes.append(len(raw))
    assert sum(sizes) / len(sizes) < 300


def test_id_hash_is_the_version_1_hash_cut_to_8_bytes():
    rec = next(r for r in _v1_records() if r["key"] == "synthetic-user")
    first_v1 = orjson.loads(rec["v1"])["r"][0]
    first_id = rec["event_ids"][-len(orjson.loads(rec["v1"])["r"])]
    assert id_hash(first_id) == base64.b64decode(first_v1)[:8]


def test_unknown_version_and_garbage_raise_value_error():
    with pytest.raises(ValueError):
        UserState.from_bytes(msgspec.msgpack.encode([3, "u"]))
    with pytest.raises(ValueError):
        UserState.from_bytes(b"\xc1")
    with pytest.raises(ValueError):
        UserState.from_bytes(msgspec.msgpack.encode([FORMAT_VERSION, "u", 0, None, None]))
    with pytest.raises(ValueError):
        UserState.from_bytes(b"{not json")


def test_vocabulary_codes_fit_in_one_byte_and_are_unique():
    assert len(VOCABULARY) < 128 and len(set(VOCABULARY)) == len(VOCABULARY)


def test_odd_shapes_in_rules_and_ml_are_kept_as_they_are():
    st = UserState("odd", user_id="someone-else", anonymous_id="anon-1")
    apply(st, event("page_view", event_id="o-1"), None, StateConfig())
    st.ml.update({"pi": [[1, 2, 0.5, "v", [0.123456789]]], "pc": [1, 2, 3], "sc": {"churn_version": 7},
                  "hi": "x", "new": {"k": [1, None, True]}, "en": {"t": 1, "v": 2, "c": {}}})
    st.rules.update({"t": {"a": {1: 2}}, "bot": {"e": [], "flag": "crawler", "at": 5}, "seg": ["s", 3],
                     "held": [[10, {"type": "x"}]], "cv": ["hesitant_buyers", "mine"]})
    st.traits["n"] = 2 ** 63
    data = st.to_bytes()
    back = UserState.from_bytes(data)
    assert back == st and back.to_bytes() == data


# -- property test: any sequence of events -------------------------------------------------------

TYPES = ["page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start", "purchase",
         "search", "scroll_depth", "identify", "consent", "my_custom_event"]


@hst.composite
def user_events(draw):
    n = draw(hst.integers(1, 25))
    out = []
    for i in range(n):
        etype = draw(hst.sampled_from(TYPES))
        at = 1_569_888_000_000 + draw(hst.integers(-3, 200)) * draw(hst.sampled_from([1, 1000, 60_000, 3_600_000]))
        props = {}
        if draw(hst.booleans()):
            props["product_id"] = draw(hst.sampled_from(["p1", "p2", "12345", 7]))
        if etype in ("add_to_cart", "remove_from_cart"):
            props["quantity"] = draw(hst.integers(0, 3))
            if draw(hst.booleans()):
                props["price"] = draw(hst.sampled_from([1.5, 19.99, 100]))
            if draw(hst.booleans()):
                props["currency"] = "EUR"
        if etype == "product_view" and draw(hst.booleans()):
            props["category"] = draw(hst.sampled_from(["shoes", "hats", "électronique"]))
        if etype == "scroll_depth":
            props["scroll_pct"] = draw(hst.integers(0, 100))
        if draw(hst.booleans()):
            props["dwell_ms"] = draw(hst.integers(1, 900_000))
        if draw(hst.booleans()):
            props["page_type"] = draw(hst.sampled_from(["home", "product", "weird-page"]))
        if etype == "identify":
            props["traits"] = {"plan": "pro", "age": 41}
        if etype == "consent":
            props["consent"] = {"marketing": draw(hst.booleans())}
        if etype == "purchase" and draw(hst.booleans()):
            props["revenue"] = draw(hst.sampled_from([0.0, 12.34, 99]))
        eid = f"e{draw(hst.integers(0, n))}" if draw(hst.integers(0, 9)) == 0 else f"id-{i}"
        out.append((event(etype, at=at, event_id=eid, **props), draw(hst.booleans())))
    return out


@settings(max_examples=150, deadline=None)
@given(user_events())
def test_round_trip_after_any_events_gives_an_equal_state_and_equal_bytes(evs):
    cfg = StateConfig(dedup_ids_per_user=8)
    st, via_bytes = UserState("u1"), UserState("u1")
    wm = None
    for e, wall in evs:
        a = apply(st, e, wm, cfg, 1_700_000_000_000 if wall else None)
        b = apply(via_bytes, e, wm, cfg, 1_700_000_000_000 if wall else None)
        assert a == b
        data = via_bytes.to_bytes()
        via_bytes = UserState.from_bytes(data)
        assert via_bytes == st and via_bytes.to_bytes() == data
        legacy = UserState.from_bytes(st.to_bytes_json())
        assert legacy == st
        wm = max(wm or 0, e["timestamp_ms"] - 120_000)
    assert len(st.recent_ids) <= 8
