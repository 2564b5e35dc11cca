"""Identity stitching in the broker-free engine: a guest's state merged into its customer's once,
the guest's later events routed to the customer, in any arrival order, with the two keys on
different partitions (docs/identity.md)."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

import pytest

from clickpulse.errors import InvalidEvent
from clickpulse.engine.identity import link_keys, route, route_key
from clickpulse.events.contract import normalize
from clickpulse.rules.triggers import next_due
from clickpulse.state.user import UserState
from clickpulse.testing import memory_engine, ms
from tests.unit.identity_harness import Cluster

_seq = itertools.count()
DAY = "2019-10-01T"
#: partitions of the model worker: with 3, anon:g-77 and c-5 are on different partitions
P = 3


def ev(etype: str, at: str, *, user: str | None = None, anon: str | None = None, event_id: str | None = None,
       **props: Any) -> dict[str, Any]:
    """A canonical event (the real contract) with a user id, an anonymous id or both."""
    raw: dict[str, Any] = {"type": etype, "timestamp": ms(at if "T" in at else DAY + at + "Z"),
                           "event_id": event_id or f"i-{next(_seq)}"}
    if user is not None:
        raw["user_id"] = user
    if anon is not None:
        raw["anonymous_id"] = anon
    if props:
        raw["properties"] = props
    return normalize(raw)


def _partitions_apart(n: int = 3) -> tuple[str, str]:
    """A guest id and a customer id whose keys are on different partitions (of ``n``)."""
    c = Cluster(n)
    assert c.partition("anon:g-77") != c.partition("c-5")
    return "g-77", "c-5"


def cart_actions(c: Cluster) -> list[dict]:
    return [a for a in c.actions if a["type"] == "cart_abandoned"]


# ------------------------------------------------------------------ routing
def test_link_events_are_routed_to_the_guest_key():
    identify = ev("identify", "09:12:00", user="c-5", anon="g-77")
    assert identify["user_key"] == "c-5"                       # what the contract says
    assert link_keys(identify) == ("anon:g-77", "c-5") and route_key(identify) == "anon:g-77"
    assert route(dict(identify))["user_key"] == "anon:g-77"
    view = ev("product_view", "09:12:00", user="c-5", anon="g-77", product_id="p1")
    assert route(dict(view))["user_key"] == "c-5"               # only identify/alias link
    # a Segment alias (userId + previousId) links the previous (anonymous) id to the user id
    alias = normalize({"type": "alias", "userId": "c-5", "previousId": "g-77", "timestamp": ms(DAY + "09:12:00Z")})
    assert alias["type"] == "alias" and alias["previous_id"] == "g-77" and route_key(alias) == "anon:g-77"
    # an alias from one user id to another is not a guest link
    rename = normalize({"type": "alias", "userId": "c-5", "previousId": "c-4", "anonymousId": "g-9",
                        "timestamp": ms(DAY + "09:12:00Z")})
    assert link_keys(rename) is None and route_key(rename) == "c-5"
    # a user id in the guest key space never links (the contract dead-letters it: bad_identity)
    with pytest.raises(InvalidEvent, match="bad_identity"):
        ev("identify", "09:12:00", user="anon:x", anon="y")
    assert link_keys({"type": "identify", "user_id": "anon:x", "anonymous_id": "y"}) is None


# ------------------------------------------------------------------ g-77 / c-5
def _g77(c: Cluster, purchase: bool = True) -> None:
    g, cust = _partitions_apart()
    c.send(ev("add_to_cart", "09:10:00", anon=g, product_id="p1", price=10.0),
           ev("add_to_cart", "09:10:00", anon=g, product_id="p2", price=5.0),
           ev("identify", "09:12:00", user=cust, anon=g, traits={"plan": "gold"}))
    if purchase:
        c.send(ev("purchase", "09:14:00", user=cust, anon=g, revenue=15.0))


@pytest.mark.parametrize("merge_late", [False, True], ids=["merge-before-purchase", "merge-after-purchase"])
def test_guest_cart_bought_by_the_customer_is_not_abandoned(merge_late):
    c = Cluster(P)
    c.hold_merges = merge_late
    _g77(c)
    if merge_late:
        assert c.state("c-5").life.orders == 1 and c.state("c-5").merged == []  # bought before the merge
        c.release()
    # the guest's pending abandonment timer was answered by the customer's purchase: cancelled
    assert next_due(c.state("c-5")) is None and c.engine.pending_timers() == 0
    c.send(ev("page_view", "11:00:00", user="someone-else"))    # event time moves well past 09:44
    c.flush()                                                   # and every timer fires
    assert cart_actions(c) == []
    cust, stub = c.state("c-5"), c.state("anon:g-77")
    assert stub.merged_into == "c-5" and stub.life.events == 0 and not stub.cart.items
    assert cust.merged and cust.merged[0][0] == "anon:g-77"
    assert cust.cart.items == {} and cust.life.orders == 1 and cust.life.revenue == 15.0
    assert cust.traits["plan"] == "gold"
    assert cust.windows.count("add_to_cart", "24h", ms(DAY + "09:15:00Z")) == 2
    assert cust.life.sessions == 1 and cust.session.counts == {"add_to_cart": 2, "identify": 1, "purchase": 1}
    assert cust.life.converted_sessions == 1
    assert c.aliases == {"anon:g-77": "c-5"}


@pytest.mark.parametrize("merge_late", [False, True])
def test_without_a_purchase_the_customer_gets_the_abandonment(merge_late):
    c = Cluster(P)
    c.hold_merges = merge_late
    _g77(c, purchase=False)
    c.send(ev("page_view", "11:00:00", user="someone-else"))
    if merge_late:
        c.release()   # the merge reaches c-5 after its watermark passed 09:40: the timer fires then
    c.flush()
    acts = cart_actions(c)
    assert [(a["user_key"], a["user_id"], a["event_time"]) for a in acts] == [("c-5", "c-5", DAY + "09:40:00.000Z")]
    assert {i["product_id"] for i in acts[0]["payload"]["cart"]["items"]} == {"p1", "p2"}


def test_without_stitching_the_guest_would_get_the_abandonment():
    """The same input with the identify not routed to the guest (the behaviour before): the guest
    key keeps its cart and is declared abandoned although the customer bought (the bug)."""
    c = Cluster(P)
    c.send(ev("add_to_cart", "09:10:00", anon="g-77", product_id="p1", price=10.0))
    identify = ev("identify", "09:12:00", user="c-5", anon="g-77")
    c.valid[c.partition("c-5")].append(identify)              # keyed by the customer, not routed
    c.send(ev("purchase", "09:14:00", user="c-5", revenue=10.0), ev("page_view", "11:00:00", user="x"))
    c.flush()
    assert [a["user_key"] for a in cart_actions(c)] == ["anon:g-77"]


# ------------------------------------------------------------------ counts once
def _three_views(c: Cluster, identify: dict) -> None:
    c.send(*(ev("product_view", f"10:0{i}:00", anon="g-1", product_id=f"p{i}", category="shoes") for i in range(3)))
    c.send(identify)


def test_guest_views_count_once_for_the_customer_even_when_the_identify_is_delivered_twice():
    c = Cluster(P)
    identify = ev("identify", "10:05:00", user="c-1", anon="g-1")
    _three_views(c, identify)
    c.send(identify)                                          # the same message again
    c.send(ev("identify", "10:06:00", user="c-1", anon="g-1"))  # a second sign-in (a new event)
    cust = c.state("c-1")
    at = ms(DAY + "10:07:00Z")
    assert cust.windows.count("product_view", "1h", at) == 3
    assert cust.life.events == 3 + 2 and cust.life.sessions == 1
    assert cust.session.products == ["p0", "p1", "p2"]
    assert cust.categories["shoes"][0][1] == 3
    assert len(cust.merged) == 1
    assert c.counter("identity_links", "linked") == 1 and c.counter("identity_links", "repeat") == 1
    assert c.counter("duplicates") == 1


def test_a_merge_record_delivered_twice_is_merged_once():
    c = Cluster(P)
    _three_views(c, ev("identify", "10:05:00", user="c-1", anon="g-1"))
    assert len(c.merges) == 1
    c.identity[c.partition("c-1")].append(c.merges[0])
    c.run()
    assert c.state("c-1").windows.count("product_view", "1h", ms(DAY + "10:07:00Z")) == 3
    assert c.counter("identity_links", "merge_duplicate") == 1


def test_counts_once_after_a_restart_that_restores_from_the_changelog_and_re_reads_the_input():
    c = Cluster(P)
    views = [ev("product_view", f"10:0{i}:00", anon="g-1", product_id=f"p{i}") for i in range(3)]
    identify = ev("identify", "10:05:00", user="c-1", anon="g-1")
    c.send(*views, identify)
    table = dict(c.engine.table)                       # the changelog at the crash
    merges = list(c.merges)
    restarted = memory_engine()
    restarted.table = table
    restarted.restore(range(P), list(table.items()), 0)
    c2 = Cluster(P, engine=restarted)
    c2.send(*views, identify)                          # the uncommitted input is read again
    for m in merges:                                   # and so is the identity topic
        c2.identity[c2.partition(m["customer_key"])].append(m)
    c2.run()
    cust = c2.state("c-1")
    assert cust.windows.count("product_view", "1h", ms(DAY + "10:07:00Z")) == 3
    assert cust.life.events == 4 and len(cust.merged) == 1
    assert c2.forwards == [] and c2.merges == []       # replays of the guest's input: duplicates at the stub


def test_later_guest_only_events_are_routed_to_the_customer():
    c = Cluster(P)
    _three_views(c, ev("identify", "10:05:00", user="c-1", anon="g-1"))
    c.send(ev("product_view", "10:08:00", anon="g-1", product_id="p9"))   # the guest id only
    cust, stub = c.state("c-1"), c.state("anon:g-1")
    assert cust.windows.count("product_view", "1h", ms(DAY + "10:09:00Z")) == 4
    assert stub.merged_into == "c-1" and stub.life.events == 0 and stub.life.last_ms == ms(DAY + "10:08:00Z")
    assert [f["user_key"] for f in c.forwards] == ["c-1"]
    assert c.counter("identity_forwarded") == 1


def test_a_guest_seen_for_the_first_time_in_its_identify_still_links():
    c = Cluster(P)
    c.send(ev("identify", "10:00:00", user="c-1", anon="g-new"))
    c.send(ev("page_view", "10:01:00", anon="g-new"))
    assert c.state("anon:g-new").merged_into == "c-1"
    assert c.state("c-1").windows.count("page_view", "1h", ms(DAY + "10:02:00Z")) == 1


# ------------------------------------------------------------------ consent
def test_guest_consent_carries_over_to_a_customer_without_a_decision():
    c = Cluster(P)   # marketing assumed for users with no decision: the guest's refusal must win
    c.send(ev("consent", "09:00:00", anon="g-2", consent={"marketing": False}),
           ev("add_to_cart", "09:01:00", anon="g-2", product_id="p1", price=10.0),
           ev("identify", "09:02:00", user="c-2", anon="g-2"))
    assert c.state("c-2").consent == {"marketing": [False, ms(DAY + "09:00:00Z")]}
    c.send(ev("page_view", "11:00:00", user="x"))
    c.flush()
    assert cart_actions(c) == []
    assert c.counter("rule_decisions", "cart_abandonment", "consent") == 1


@pytest.mark.parametrize("customer_at, expected", [("08:00:00", False), ("10:00:00", True)])
def test_the_later_consent_decision_wins(customer_at, expected):
    c = Cluster(P)
    c.send(ev("consent", customer_at, user="c-3", consent={"marketing": True}),
           ev("consent", "09:00:00", anon="g-3", consent={"marketing": False}),
           ev("identify", "09:30:00", user="c-3", anon="g-3"))
    assert c.state("c-3").consent["marketing"][0] is expected


# ------------------------------------------------------------------ conflicts, several devices
def test_a_guest_linked_to_a_second_customer_first_link_wins():
    c = Cluster(P)
    c.send(ev("product_view", "10:00:00", anon="g-4", product_id="p1"),
           ev("identify", "10:01:00", user="c-first", anon="g-4"))
    c.send(ev("identify", "10:02:00", user="c-second", anon="g-4", traits={"name": "B"}),
           ev("product_view", "10:03:00", anon="g-4", product_id="p2"))
    at = ms(DAY + "10:05:00Z")
    first, second = c.state("c-first"), c.state("c-second")
    assert first.windows.count("product_view", "1h", at) == 2          # p1 merged, p2 forwarded
    assert second.windows.count("product_view", "1h", at) == 0         # no state moved
    assert second.traits == {"name": "B"} and second.merged == []      # its identify applies as its own
    assert c.state("anon:g-4").merged_into == "c-first"
    assert c.counter("identity_links", "conflict") == 1
    assert c.aliases["anon:g-4"] == "c-first"


def test_a_customer_with_several_devices_gets_every_guest():
    c = Cluster(P)
    c.send(ev("product_view", "10:00:00", anon="phone", product_id="p1"),
           ev("product_view", "10:00:30", anon="laptop", product_id="p2"),
           ev("product_view", "10:01:00", anon="laptop", product_id="p3"))
    c.send(ev("identify", "10:02:00", user="c-6", anon="phone"), ev("identify", "10:03:00", user="c-6", anon="laptop"))
    cust = c.state("c-6")
    assert cust.windows.count("product_view", "1h", ms(DAY + "10:05:00Z")) == 3
    assert sorted(m[0] for m in cust.merged) == ["anon:laptop", "anon:phone"]
    assert cust.life.sessions == 1 and sorted(cust.session.products) == ["p1", "p2", "p3"]


def test_sessions_a_gap_apart_stay_two_sessions():
    c = Cluster(P)
    c.send(ev("product_view", "08:00:00", anon="g-5", product_id="p1"),
           ev("product_view", "10:00:00", user="c-7", product_id="p2"),
           ev("identify", "08:10:00", user="c-7", anon="g-5"))
    cust = c.state("c-7")
    assert cust.life.sessions == 2
    assert (cust.prev_session.start_ms, cust.session.start_ms) == (ms(DAY + "08:00:00Z"), ms(DAY + "10:00:00Z"))


# ------------------------------------------------------------------ models: pending predictions
def test_pending_predictions_move_with_the_guest():
    from clickpulse.models.labels import ModelConfig
    from clickpulse.models.registry import ModelRegistry
    eng = memory_engine()
    eng.models, eng.mcfg = ModelRegistry({}), ModelConfig()
    c = Cluster(P, engine=eng)
    c.send(ev("add_to_cart", "10:00:00", anon="g-8", product_id="p1", price=3.0),
           ev("identify", "10:01:00", user="c-8", anon="g-8"))
    cust = c.state("c-8")
    assert len(cust.ml["pi"]) == 1 and eng.pending_predictions == 1
    c.send(ev("purchase", "10:02:00", user="c-8", revenue=3.0))
    assert c.state("c-8").ml.get("pi") is None and eng.pending_predictions == 0
    intent = [e for e in c.examples if e["task"] == "intent"]
    # the guest's prediction (made at its add to cart) is labelled by the customer's purchase
    assert [(e["user_key"], e["predicted_at_ms"], e["y"]) for e in intent] == [("c-8", ms(DAY + "10:00:00Z"), True)]


# ------------------------------------------------------------------ erasure, retention, codec
def test_erasing_a_customer_erases_its_links():
    c = Cluster(P)
    _three_views(c, ev("identify", "10:05:00", user="c-1", anon="g-1"))
    done = c.engine.erase("c-1", 0)
    assert done["state"] and done["linked"] == ["anon:g-1"]
    assert c.engine.load("c-1") is None
    done = c.engine.erase("anon:g-1", 0)             # what the worker asks next, on the guest's partition
    assert done["state"] and c.engine.load("anon:g-1") is None


def test_stub_and_links_survive_retention_and_the_codec():
    c = Cluster(P)
    _three_views(c, ev("identify", "10:05:00", user="c-1", anon="g-1"))
    for key in ("c-1", "anon:g-1"):
        st = c.state(key)
        assert UserState.from_bytes(st.to_bytes()) == st
        assert UserState.from_json(st.to_bytes_json()) == st
    c.send(ev("page_view", "2019-11-20T00:00:00Z", user="x"), ev("page_view", "2019-11-20T00:00:00Z", user="y"),
           ev("page_view", "2019-11-20T00:00:00Z", user="z"), ev("page_view", "2019-11-20T00:00:00Z", user="w"))
    for p in range(P):
        c.take(c.engine.expire_step(p, 30 * 86_400_000, 0, dormant_retention_ms=730 * 86_400_000))
    cust = c.state("c-1")
    assert cust.session is None and cust.merged[0][0] == "anon:g-1"   # dormant, keeps its links
    assert c.state("anon:g-1").merged_into == "c-1"
    c.send(ev("page_view", "2019-11-21T00:00:00Z", anon="g-1"))          # still routed
    assert c.state("c-1").life.last_ms == ms("2019-11-21T00:00:00Z")


# ------------------------------------------------------------------ Diginetica sessions
FIXTURE = Path(__file__).parent / "fixtures" / "diginetica_mixed_sessions.csv"


def _diginetica() -> dict[str, list[dict[str, str]]]:
    sessions: dict[str, list[dict[str, str]]] = {}
    with FIXTURE.open() as f:
        for row in csv.DictReader((line for line in f if not line.startswith("#")), delimiter=";"):
            sessions.setdefault(row["session_id"], []).append(row)
    for rows in sessions.values():
        rows.sort(key=lambda r: int(r["timeframe"]))
    return sessions


def _diginetica_events(sid: str, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """A session's item views as events: anonymous (the session id as the device's anonymous id)
    until a user id appears; at that moment an identify (the sign-in), then views with both ids."""
    out: list[dict[str, Any]] = []
    anon = f"dg-{sid}"
    seen_user = None
    for i, r in enumerate(rows):
        at = ms(r["eventdate"] + "T00:00:00Z") + int(r["timeframe"])
        user = None if r["user_id"] == "NA" else f"dg-user-{r['user_id']}"
        if user is not None and user != seen_user:
            out.append(normalize({"type": "identify", "user_id": user, "anonymous_id": anon, "timestamp": at,
                                  "event_id": f"dg-{sid}-{i}-identify"}))
            seen_user = user
        raw = {"type": "product_view", "anonymous_id": anon, "timestamp": at, "event_id": f"dg-{sid}-{i}",
               "properties": {"product_id": r["item_id"]}}
        if user is not None:
            raw["user_id"] = user
        out.append(normalize(raw))
    return out


@pytest.mark.parametrize("batch", [1, 500])
def test_diginetica_sessions_where_a_user_id_appears_mid_session_belong_to_the_user(batch):
    sessions = _diginetica()
    assert len(sessions) == 8
    c = Cluster(P, batch=batch)
    events = sorted((e for sid, rows in sessions.items() for e in _diginetica_events(sid, rows)),
                    key=lambda e: e["timestamp_ms"])
    c.send(*events)
    checked = 0
    for sid, rows in sessions.items():
        users = list(dict.fromkeys(r["user_id"] for r in rows if r["user_id"] != "NA"))
        stub = c.state(f"anon:dg-{sid}")
        first = f"dg-user-{users[0]}"
        assert stub is not None and stub.merged_into == first, sid
        owner = c.state(first)
        own_views = len(rows) if len(users) == 1 else sum(1 for r in rows if r["user_id"] in ("NA", users[0]))
        if len(users) == 1:  # every view of the session, the anonymous ones included, is the user's
            assert owner.session.counts["product_view"] == len(rows), sid
            assert owner.life.sessions == 1 and owner.session.start_ms == \
                ms(rows[0]["eventdate"] + "T00:00:00Z") + int(rows[0]["timeframe"]), sid
            assert sorted(owner.session.products) == sorted({r["item_id"] for r in rows}), sid
            checked += 1
        else:                # a shared device: the first user keeps the guest part (first link wins)
            assert owner.session.counts["product_view"] == own_views, sid
            other = c.state(f"dg-user-{users[1]}")
            assert other.merged == [] and other.session.counts["product_view"] == len(rows) - own_views
    assert checked == 6                                      # and 2 shared devices (1691, 2998)
    assert c.counter("identity_links", "conflict") == 2


def test_merge_records_match_their_schema_and_a_bad_one_changes_nothing():
    from clickpulse.events.schemas import validation_errors
    c = Cluster(P)
    _three_views(c, ev("identify", "10:05:00", user="c-1", anon="g-1"))
    (rec,) = c.merges
    assert validation_errors("merge", rec) == []
    assert validation_errors("event", rec["link_event"]) == []
    before = dict(c.engine.table)
    fresh = {**rec, "link_event": {**rec["link_event"], "event_id": "another"}}  # not a re-delivery
    for bad in ({**fresh, "state_b64": "not base64!"}, {**fresh, "state_b64": "AAAA"}, {**rec, "guest_key": 5},
                {**fresh, "guest_key": "anon:someone-else"}, {"schema_version": 1}):
        with pytest.raises(ValueError):
            c.engine.merge_step(c.partition("c-1"), bad, 0)
    assert dict(c.engine.table) == before


def test_a_segment_alias_links_like_an_identify_and_a_rename_does_not():
    c = Cluster(P)
    c.send(ev("product_view", "10:00:00", anon="g-9", product_id="p1"))
    alias = normalize({"type": "alias", "userId": "c-9", "previousId": "g-9", "timestamp": ms(DAY + "10:01:00Z"),
                       "messageId": "alias-1"})
    c.send(alias)
    assert c.state("anon:g-9").merged_into == "c-9"
    assert c.state("c-9").windows.count("product_view", "1h", ms(DAY + "10:02:00Z")) == 1
    rename = normalize({"type": "alias", "userId": "c-10", "previousId": "c-9", "anonymousId": "g-9",
                        "timestamp": ms(DAY + "10:03:00Z"), "messageId": "alias-2"})
    c.send(rename)
    assert c.state("c-10").merged == [] and c.state("c-10").life.events == 1
    assert c.counter("identity_links", "unsupported") == 1


@pytest.mark.parametrize("lib", ["segment-python-2.4.0", "rudder-python-2.1.9"])
def test_the_real_sdks_alias_call_links_the_previous_id(lib):
    """The recorded ``alias(previous_id, user_id)`` of the real server SDKs (``anonymousId: null``)."""
    import orjson
    (msg,) = orjson.loads((Path(__file__).parent / "fixtures" / lib / "alias.json").read_bytes())["batch"]
    alias = normalize(msg)
    who = lib.split("-")[0]
    assert route_key(alias) == f"anon:{who}-anon-1" and link_keys(alias) == (f"anon:{who}-anon-1", f"{who}-user-1")
    c = Cluster(P)
    c.send(ev("product_view", "10:00:00", anon=f"{who}-anon-1", product_id="p1"), alias)
    assert c.state(f"{who}-user-1").merged[0][0] == f"anon:{who}-anon-1"
