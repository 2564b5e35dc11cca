"""Rules cost: what each expression reads, the lazy namespace and incremental evaluation.

The hard constraint is "exactly the same decisions": the REES46 replay (tests/oracle.py's input)
is run with incremental evaluation on and forced off, and with the full reference namespace, and
every outcome (actions, segment changes, decisions, runtime errors) and every user's final state
must be identical; the lazily built names must equal the full namespace's for many states.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from clickpulse.events.contract import CANONICAL_TYPES, parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.rules import triggers
from clickpulse.rules.namespace import ALL, EXTRA_KEYS, VARIABLES, Deps, event_value, flat_namespace, namespace
from clickpulse.rules.ruleset import compile_expression, flatten, parse_rules
from clickpulse.state.user import StateConfig, UserState, apply
from clickpulse.state.windows import SPANS
from clickpulse.testing import default_rules, event, memory_engine, ms
from tests.oracle import partition_mod4

CFG = StateConfig()


# --------------------------------------------------------------------------- helpers


def typed(v: Any) -> Any:
    """A comparable image that tells 1, 1.0 and True (and 0.0, -0.0) apart, as CEL does."""
    if isinstance(v, dict):
        return ("map", tuple((k, typed(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("list", tuple(typed(x) for x in v))
    if isinstance(v, float):
        return ("double", repr(v))
    return (type(v).__name__, v)


def same_map(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal names and values with exactly the same types (map key order ignored at top level)."""
    return set(a) == set(b) and all(typed_unordered(a[k]) == typed_unordered(b[k]) for k in a)


def typed_unordered(v: Any) -> Any:
    if isinstance(v, dict):
        return ("map", frozenset((k, typed_unordered(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("list", tuple(typed_unordered(x) for x in v))
    if isinstance(v, float):
        return ("double", repr(v))
    return (type(v).__name__, v)


def prune(value: Any, paths: frozenset[tuple[str, ...]]) -> Any:
    """Independent reference for event paths: keep, in a plain nested value, only what the key
    paths reach (the value at a path's end whole; a non-map on the way whole)."""
    out: dict[str, Any] = {}
    for path in paths:
        src, dst = value, out
        for i, key in enumerate(path):
            if not isinstance(src, dict):
                break
            if key not in src:
                break
            last = i == len(path) - 1
            if last or not isinstance(src[key], dict):
                dst[key] = src[key]
                break
            dst = dst.setdefault(key, {})
            if not isinstance(dst, dict):  # a shorter path took the whole value already
                break
            src = src[key]
    return out


def restricted(full: dict[str, Any], deps: Deps) -> dict[str, Any]:
    """``flatten(namespace(...))`` restricted to what ``deps`` reads (the reference)."""
    out = {n: full[n] for n in deps.names}
    if "count" in out:
        types = deps.count_types
        spans = deps.count_spans
        out["count"] = {t: {s: n for s, n in per.items() if spans is None or s in spans}
                        for t, per in full["count"].items() if types is None or t in types}
    if "event" in out and deps.event_paths is not None:
        out["event"] = prune(full["event"], deps.event_paths)
    return out


# --------------------------------------------------------------------------- what an expression reads


@pytest.mark.parametrize(("source", "names", "types", "spans", "paths"), [
    ('count.add_to_cart["7d"] > 2 && count.purchase["7d"] == 0', {"count"}, {"add_to_cart", "purchase"}, {"7d"},
     set()),
    ('count["purchase"]["24h"] > 0', {"count"}, {"purchase"}, {"24h"}, set()),
    ('has(count.foo)', {"count"}, {"foo"}, None, set()),
    ('count.exists(t, count[t]["7d"] > 3)', {"count"}, None, None, set()),
    ('"7d" in count.add_to_cart', {"count"}, {"add_to_cart"}, None, set()),
    ('count.add_to_cart[event.type] > 1', {"count", "event"}, {"add_to_cart"}, None, {("type",)}),
    ('"count.x" == "session.idle_s" && "tier" != "cart.value"', set(), set(), set(), set()),  # literals only
    ('cart.items.exists(i, i.price > 10.0)', {"cart.items"}, set(), set(), set()),
    ('[1, 2].map(x, x * lifetime.orders).size() > 0', {"lifetime.orders"}, set(), set(), set()),
    ('has(event.properties.category) && event.properties.category in category_views '
     '&& category_views[event.properties.category] >= 3', {"event", "category_views"}, set(), set(),
     {("properties", "category")}),
    ('event.properties[event.type] == 1', {"event"}, set(), set(), {("properties",), ("type",)}),
    ('event["context"]["device"] == "ios"', {"event"}, set(), set(), {("context", "device")}),
    ('size(event) > 0', {"event"}, set(), set(), None),
    ('event.properties.exists(k, k == "a")', {"event"}, set(), set(), {("properties",)}),
    ('{"a": cart.value}.a > 1.0 && has(traits.age_band)', {"cart.value", "traits"}, set(), set(), set()),
    ('scores.intent >= 0.8 && !cart.empty && tier == "high" && conversion.user > 0.1',
     {"scores.intent", "cart.empty", "tier", "conversion.user"}, set(), set(), set()),
    ('session.counts.product_view > 1 && "x" in segments', {"session.counts", "segments"}, set(), set(), set()),
])
def test_expression_deps_from_the_checked_ast(source, names, types, spans, paths):
    d = compile_expression(source).deps
    assert d.names == frozenset(names)
    assert d.count_types == (None if types is None else frozenset(types))
    assert d.count_spans == (None if spans is None else frozenset(spans))
    assert d.event_paths == (None if paths is None else frozenset(paths))


def test_a_comprehension_variable_named_like_a_name_is_read_conservatively():
    # the loop variable shadows `count`: reading all of count is over-approximate, never less
    d = compile_expression("[1, 2].exists(count, count > 1)").deps
    assert d.covers(Deps.of(set())) and (d.names == frozenset() or d.count_types is None)


def test_the_ruleset_exposes_what_conditions_and_payloads_read():
    rs = default_rules()
    assert rs.eval_deps.names == {"count", "scores.intent", "cart.empty", "tier", "lifetime.orders",
                                  "lifetime.days_since_last_order", "event", "category_views"}
    assert rs.eval_deps.count_types == {"add_to_cart", "purchase"} and rs.eval_deps.count_spans == {"7d"}
    assert rs.eval_deps.event_paths == {("properties", "category")}
    assert rs.payload_deps.names == {"cart.items", "cart.value", "cart.currency", "cart.last_update", "cart.count",
                                     "session.products", "event", "category_views"}
    assert rs.trigger("cart_abandonment").payload_deps.names == {"cart.items", "cart.value", "cart.currency",
                                                                  "cart.last_update"}
    assert rs.eval_deps.extra_keys == {"tier"}


# --------------------------------------------------------------------------- the lazy namespace


def _synthetic_events(user: str, rng: random.Random, start: int, n: int) -> list[dict[str, Any]]:
    types = ["product_view", "add_to_cart", "remove_from_cart", "purchase", "page_view", "identify", "consent",
             "search", "checkout_start", "scroll", "dwell", "custom_thing"]
    out = []
    t = start
    for _ in range(n):
        t += rng.choice([0, 1_000, 30_000, 400_000, 2_000_000, 90_000_000, 5 * 86_400_000]) * rng.choice([1, 1, -1])
        etype = rng.choice(types)
        props: dict[str, Any] = {}
        if etype in ("product_view", "add_to_cart", "remove_from_cart"):
            props = {"product_id": f"p{rng.randint(1, 5)}", "category": rng.choice(["a.b", "c", "d.e.f", ""]),
                     "price": rng.choice([9.99, 30.0, 0.0, 120.5, None]), "currency": "EUR",
                     "quantity": rng.choice([None, 1, 2, 3])}
            props = {k: v for k, v in props.items() if v is not None}
        elif etype == "purchase":
            props = {"revenue": rng.choice([10.0, 0.0, 99.99])}
        elif etype == "identify":
            props = {"traits": {"age_band": rng.choice(["25-34", "x"]), "vip": rng.choice([True, 1, 1.0]),
                                "n": rng.choice([0.0, -0.0, 2])}}
        elif etype == "consent":
            props = {"consent": {"marketing": rng.choice([True, False])}}
        elif etype == "scroll":
            props = {"scroll_pct": rng.choice([10, 55.5, 100])}
        elif etype == "dwell":
            props = {"dwell_ms": rng.choice([1200, 60_000]), "page_type": rng.choice(["checkout", "home"])}
        out.append(event(etype, user, max(0, t), **props))
    return out


NAME_SETS = [
    Deps.of({n}) for n in VARIABLES if n not in ("count", "event")
] + [
    ALL,
    Deps.of({"count"}),
    Deps.of({"count"}, {"add_to_cart", "purchase"}, {"7d"}),
    Deps.of({"count"}, {"product_view", "custom_thing", "never_seen"}, {"5m", "1h", "nope"}),
    Deps.of({"count"}, set(CANONICAL_TYPES), None),
    Deps.of({"event"}),
    Deps.of({"event"}, event_paths={("properties", "category")}),
    Deps.of({"event"}, event_paths={("properties",), ("properties", "price"), ("type",)}),
    Deps.of({"event"}, event_paths={("context", "device"), ("timestamp_ms", "x"), ("nope",), ("type", "a", "b")}),
    Deps.of({"cart.items", "cart.value", "tier", "scores.engagement", "segments", "event"},
            event_paths={("properties", "traits", "vip")}),
]


def _check_state(st: UserState, at: int, ev: dict[str, Any] | None, rng: random.Random) -> None:
    scores = rng.choice([None, {"intent": 0.9}, {"churn": 0.1, "intent": 0.0}])
    segments = rng.choice([(), ("a", "b")])
    extra = rng.choice([None, {"engagement": 3.5, "tier": "high", "p_purchase": 0.2, "conversion_user": 0.3}])
    full = flatten(namespace(st, at, scores, segments=segments, event=ev, extra=extra))
    for deps in NAME_SETS:
        lazy = flat_namespace(st, at, deps, scores, segments=segments, event=ev, extra=extra)
        want = restricted(full, deps)
        assert same_map(lazy, want), (deps, lazy, want)
        if "count" in deps.names and deps.count_types is None and deps.count_spans is None:
            assert typed(lazy["count"]) == typed(full["count"])  # the same order too
    # the extra mapping needs only the keys asked for
    if extra is not None:
        for name, key in EXTRA_KEYS.items():
            lazy = flat_namespace(st, at, {name}, extra={key: extra[key]})
            assert typed(lazy[name]) == typed(full[name])


def test_flat_namespace_equals_the_full_namespace_on_the_rees46_replay_states():
    """Every state of the REES46 sample (plus synthetic users with every kind of event), at the
    event's time and later (idle times, window roll-out, day buckets): each name built alone, in
    groups and with ``count`` / ``event`` restricted equals the full namespace's value."""
    rng = random.Random(7)
    users: dict[str, UserState] = {}
    wm = None
    raws = [parse(orjson.dumps(r), None) for r in read_rees46(BUNDLED_SAMPLE)]
    synthetic = [e for u in range(12) for e in _synthetic_events(f"s{u}", rng, raws[0]["timestamp_ms"], 40)]
    for i, ev in enumerate(itertools.chain(raws, synthetic)):
        st = users.setdefault(ev["user_key"], UserState(ev["user_key"]))
        apply(st, ev, wm, CFG)
        t = ev["timestamp_ms"]
        wm = t - 60_000 if wm is None else max(wm, t - 60_000)
        if i % 11 and not ev["user_key"].startswith("s"):
            continue  # every 11th REES46 state, every synthetic one
        for offset in (0, 59_000, 3_600_001, 2 * 86_400_000, 8 * 86_400_000, -120_000):
            _check_state(st, t + offset, ev if offset == 0 else None, rng)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=hs.integers(0, 10**9), n=hs.integers(1, 25), offset=hs.sampled_from([0, 1, 61_000, 86_400_000]))
def test_flat_namespace_equals_the_full_namespace_property(seed, n, offset):
    rng = random.Random(seed)
    st = UserState("h")
    evs = _synthetic_events("h", rng, ms("2019-10-01T00:00:00Z"), n)
    for e in evs:
        apply(st, e, None, CFG)
    _check_state(st, evs[-1]["timestamp_ms"] + offset, evs[-1] if offset == 0 else None, rng)


def test_event_value_with_paths_keeps_only_what_they_reach():
    ev = event("product_view", "u1", "2019-10-01T10:00:00Z", category="shoes", price=3.0)
    at = ev["timestamp_ms"]
    assert event_value(ev, at, {("properties", "category")}) == {"properties": {"category": "shoes"}}
    assert event_value(ev, at, {("properties", "brand")}) == {"properties": {}}
    assert event_value(ev, at, {("properties",), ("properties", "price")}) == {"properties": ev["properties"]}
    assert event_value(None, at, {("type",), ("timestamp_ms",)}) == {"type": "", "timestamp_ms": at}
    assert event_value(ev, at, None) == namespace(UserState("u1"), at, event=ev)["event"]


# --------------------------------------------------------------------------- the extra contract


def test_extra_is_asked_only_for_the_names_read_and_not_at_all_when_none_is():
    calls: list[frozenset[str]] = []

    def extra(st, at, names):
        calls.append(names)
        return {"tier": "high", "engagement": 9.0, "p_purchase": 0.1, "conversion_user": 0.2}

    st = UserState("u1")
    ev = event("add_to_cart", "u1", "2019-10-01T10:00:00Z", product_id="p1", price=60.0)
    apply(st, ev, None, CFG)
    no_extra = parse_rules('version: "1"\nsegments:\n  - {name: s, when: "cart.value > 1.0", min_size: 1}\n')
    triggers.on_event(st, ev, False, None, triggers.RuleContext(no_extra, extra=extra))
    assert calls == []
    tiered = parse_rules('version: "1"\nsegments:\n  - {name: s, when: "tier == \'high\'", min_size: 1}\n'
                         'triggers:\n  - name: t\n    on: add_to_cart\n    action: {type: a, payload: '
                         '{e: scores.engagement}}\n')
    st2 = UserState("u2")
    apply(st2, ev, None, CFG)
    out = triggers.on_event(st2, ev, False, None, triggers.RuleContext(tiered, extra=extra))
    assert calls == [frozenset({"tier"}), frozenset({"engagement"})]  # the payload's only when it fires
    assert out.actions[0]["payload"] == {"e": 9.0} and st2.rules["seg"] == ["s"]


def test_engine_extra_computes_only_what_is_asked():
    eng = memory_engine()
    st = UserState("u1")
    apply(st, event("page_view", "u1", "2019-10-01T10:00:00Z"), None, CFG)
    assert eng._extra(st, st.life.last_ms, frozenset()) == {}
    assert set(eng._extra(st, st.life.last_ms, frozenset({"engagement"}))) == {"engagement"}
    assert set(eng.profile_extra(st)) == {"engagement", "conversion_user"}  # no models: no tier, p_purchase


# --------------------------------------------------------------------------- same decisions


RICH = """
version: "inc-1"
segments:
  - {name: hesitant, when: 'count.add_to_cart["7d"] > 2 && count.purchase["7d"] == 0', min_size: 1}
  - {name: idle_browsers, when: 'session.idle_s > 60 && count.product_view["1h"] >= 1', min_size: 1}
  - {name: new_users, when: 'lifetime.days_since_first_seen < 1 && lifetime.sessions <= 2', min_size: 3}
  - {name: engaged, when: 'scores.engagement > 3.0 || conversion.user > 0.6 || tier == "high"', min_size: 1}
  - {name: cart_idle, when: 'cart.idle_s > 120 && cart.units >= 1 && cart.value > 10.0', min_size: 1}
  - {name: looker, when: 'category_views.exists(c, category_views[c] >= 2)', min_size: 1}
  - {name: busy, when: 'count.exists(t, count[t]["5m"] >= 3)', min_size: 1}
  - {name: pathy, when: 'size(session.path) >= 2 && session.counts.product_view >= 2 && session.duration_s > 30'}
  - {name: errs, when: 'traits.age_band == "x" || count.nope["7d"] > 1', min_size: 1}
  - {name: meta, when: '"hesitant" in segments || "busy" in segments', min_size: 1}
  - {name: lapsed, when: 'lifetime.orders > 0 && (lifetime.days_since_last_order >= 1 || cart.idle_s > 300)',
     min_size: 1}
triggers:
  - name: third_view
    on: product_view
    when: 'count.product_view["24h"] == 3'
    action: {type: nudge, payload: {items: cart.items, path: session.path, cv: category_views, n: 3}}
  - name: whole_event
    on: product_view
    when: 'size(event.properties) > 3 && event.timestamp_ms % 2000 == 0'
    action: {type: echo, payload: {props: event.properties, segs: segments}}
  - name: brand
    on: product_view
    when: 'has(event.properties.brand) && event.properties.brand == "samsung" && !("meta" in segments)'
    action: {type: brand, payload: {b: event.properties.brand, e: scores.engagement, t: tier}}
    cooldown_s: 600
  - name: enter_hesitant
    on: {segment_enter: hesitant}
    when: 'cart.value > 0.0'
    action: {type: hesitant, payload: {v: cart.value, segs: segments}}
  - name: exit_idle
    on: {segment_exit: idle_browsers}
    action: {type: back, payload: {idle: session.idle_s, p: scores.p_purchase}}
  - name: enter_lapsed
    on: {segment_enter: lapsed}
    action: {type: winback, payload: {days: lifetime.days_since_last_order, idle: cart.idle_s}}
  - name: stale_cart
    on: {timeout: {after: add_to_cart, no: purchase, within_s: 600}}
    when: '!cart.empty && cart.idle_s >= 600'
    action: {type: stale, payload: {items: cart.items, last: cart.last_update, c: conversion.user}}
  - name: viewed
    on: {timeout: {after: product_view, no: [add_to_cart, purchase], within_s: 120}}
    when: 'cart.empty || session.products > 2'
    action: {type: viewed, payload: {n: session.products, x: 'traits.nope'}}
    once_per: session
  - name: bought
    on: purchase
    when: 'true'
    action: {type: thanks, payload: {x: 'traits.nope', r: lifetime.revenue, o: lifetime.orders}}
    requires_consent: marketing
"""


def _json(v: Any) -> bytes:
    # keys sorted: the order of a CEL map's entries (a payload's map value) is not deterministic
    # (cel-cpp's hash maps), today as before; JSON objects are unordered anyway
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS)


ON_EVENT, ON_TIMERS, EVAL_BOOL = triggers.on_event, triggers.on_timers, triggers._eval_bool


def _replay(rules: Any, mode: str, monkeypatch: pytest.MonkeyPatch, limit: int | None = None,
            models: bool = False, forget_every: int = 0) -> tuple[list[Any], dict[bytes, bytes]]:
    """Outcomes (in order) and final table of the REES46 replay on 4 partitions, flushed."""
    monkeypatch.setattr(triggers, "INCREMENTAL", mode == "incremental")
    monkeypatch.setattr(triggers, "LAZY_NAMESPACE", mode != "reference")
    ruleset = parse_rules(rules, "<rules>") if isinstance(rules, str) else rules
    eng = memory_engine(rules=ruleset)
    if models:
        from clickpulse.models.labels import ModelConfig
        from clickpulse.models.registry import ModelRegistry
        eng.models, eng.mcfg = ModelRegistry({}), ModelConfig()
    record: list[Any] = []
    on_event, on_timers = ON_EVENT, ON_TIMERS

    def keep(out: triggers.Outcome) -> triggers.Outcome:
        record.append((out.decisions[:], [(e.rule, e.field, e.reason) for e in out.errors],
                       [c.to_record() for c in out.changes], _json(out.actions), out.bot_flagged,
                       out.timer_skipped_late))
        return out

    monkeypatch.setattr(triggers, "on_event", lambda *a, **k: keep(on_event(*a, **k)))
    monkeypatch.setattr(triggers, "on_timers", lambda *a, **k: keep(on_timers(*a, **k)))
    actions = []
    for i, raw in enumerate(itertools.islice(read_rees46(BUNDLED_SAMPLE), limit)):
        if forget_every and i % forget_every == 0:
            ruleset.runtime.clear()  # as after a restart: nothing remembered
        ev = parse(orjson.dumps(raw), None)
        actions += eng.process(partition_mod4(ev["user_id"]), ev, 0)[1]
    for p in range(4):
        for src in range(4):
            actions += eng.end_of_input(p, src, 4, 0)
    record.append(("actions", _json(actions)))
    record.append(("segment_changes", _json(eng.drain_segment_changes())))
    return record, dict(eng.table)


@pytest.mark.parametrize("rules", ["default", RICH], ids=["default rules", "rich rules"])
def test_incremental_evaluation_decides_exactly_as_evaluating_everything(rules, monkeypatch):
    """Actions (ids, types, users, event times, payloads), segment changes, per-trigger decisions,
    runtime errors and every user's final state: identical with incremental evaluation on, off,
    and with the full reference namespace at every evaluation."""
    src = default_rules() if rules == "default" else rules
    ref, ref_table = _replay(src, "reference", monkeypatch)
    off, off_table = _replay(src, "lazy", monkeypatch)
    on, on_table = _replay(src, "incremental", monkeypatch)
    assert len(ref) == len(off) == len(on) > 5000
    for a, b, c in zip(ref, off, on, strict=True):
        assert a == b == c
    assert ref_table == off_table == on_table
    actions = orjson.loads(ref[-2][1])
    assert actions and len({a["action_id"] for a in actions}) == len(actions)
    if rules == RICH:  # the rich rules do exercise what they are meant to
        decided = {d for out in ref[:-2] for d in out[0]}
        assert {("third_view", "fired"), ("whole_event", "fired"), ("enter_hesitant", "fired"),
                ("exit_idle", "fired"), ("stale_cart", "fired"), ("viewed", "fired"), ("enter_lapsed", "fired"),
                ("bought", "held")} <= decided, decided
        assert any(out[1] for out in ref[:-2])  # runtime errors, reported the same way
        changes = orjson.loads(ref[-1][1])
        assert {c["segment"] for c in changes} >= {"hesitant", "idle_browsers", "looker", "busy", "meta", "lapsed"}


def test_a_cache_emptied_mid_stream_changes_nothing(monkeypatch):
    """Nothing remembered (a restart, a rebalance, an eviction) only means evaluating."""
    ref, ref_table = _replay(RICH, "lazy", monkeypatch, limit=2500)
    on, on_table = _replay(RICH, "incremental", monkeypatch, limit=2500, forget_every=97)
    assert ref == on and ref_table == on_table


def test_with_models_the_extra_values_decide_the_same(monkeypatch):
    """With the engine's models (tier, p_purchase from untrained models) asked only as needed."""
    ref, ref_table = _replay(RICH, "reference", monkeypatch, limit=1500, models=True)
    on, on_table = _replay(RICH, "incremental", monkeypatch, limit=1500, models=True)
    assert ref == on and ref_table == on_table


def test_results_are_re_used_when_inputs_are_equal(monkeypatch):
    evaluated = []
    inner = EVAL_BOOL

    def counting(expr, act):
        evaluated.append(expr.rule)
        return inner(expr, act)
    monkeypatch.setattr(triggers, "_eval_bool", counting)
    _replay(default_rules(), "incremental", monkeypatch, limit=2000)
    on = len(evaluated)
    evaluated.clear()
    _replay(default_rules(), "lazy", monkeypatch, limit=2000)
    off = len(evaluated)
    assert on * 4 < off, (on, off)  # the segments' conditions are mostly re-used


def test_a_bounded_cache(monkeypatch):
    monkeypatch.setattr(triggers, "MEMO_ENTRIES", 8)
    ref, _ = _replay(RICH, "lazy", monkeypatch, limit=1200)
    on, _ = _replay(RICH, "incremental", monkeypatch, limit=1200)
    assert ref == on
    rs = parse_rules(RICH, "<rules>")
    _replay(rs, "incremental", monkeypatch, limit=1200)
    groups = [rs.runtime["segments"], *rs.runtime["events"].values(), *rs.runtime["when"].values()]
    assert all(len(g.cache) <= 8 for g in groups) and any(len(g.cache) == 8 for g in groups)


@pytest.mark.parametrize("span", sorted(SPANS))
def test_time_alone_moves_a_window_condition(span):
    """A remembered result is not re-used across a window boundary: the count is an input."""
    rs = parse_rules(f'version: "1"\nsegments:\n  - {{name: s, when: \'count.add_to_cart["{span}"] >= 1\', '
                     f'min_size: 1}}\ntriggers:\n  - name: x\n    on: {{timeout: {{after: add_to_cart, no: purchase, '
                     f'within_s: 1}}}}\n    when: "false"\n    action: {{type: t}}\n')
    ctx = triggers.RuleContext(rs)
    st = UserState("u1")
    ev = event("add_to_cart", "u1", "2019-10-01T10:00:00Z", product_id="p1")
    apply(st, ev, None, CFG)
    assert [c.change for c in triggers.on_event(st, ev, False, None, ctx).changes] == ["entered"]
    due = ev["timestamp_ms"] + SPANS[span][1] * SPANS[span][2]  # the window has just rolled past the add
    st.rules["t"]["x"]["due"] = due
    assert [c.change for c in triggers.on_timers(st, due + 1, ctx).changes] == ["exited"]
    st.rules["t"]["x"]["due"] = due - min(2, SPANS[span][2]) * SPANS[span][1]  # back inside the window (time may go back)
    assert [c.change for c in triggers.on_timers(st, due, ctx).changes] == ["entered"]


def test_the_images_computed_from_the_state_equal_those_of_the_built_values():
    """The memo keys are computed without building the names: they must be exactly the images
    of what flat_namespace builds (count windows, event paths, including odd events)."""
    rng = random.Random(11)
    odd = [event("product_view", "o", "2019-10-01T10:00:00Z", category=c, nested={"a": {"b": 1}}, n=1.5)
           for c in ("x", "", "-0")]
    odd.append({**odd[0], "properties": {1: "int key", "category": "y"}})
    odd.append({**odd[0], "properties": "not a map", "context": None})
    path_sets = [frozenset({("properties", "category")}), frozenset({("properties",), ("type",)}),
                 frozenset({("properties", "nested", "a", "b"), ("properties", "nested", "z"), ("context", "x")}),
                 frozenset({("timestamp_ms",), ("type", "x"), ("nope", "y"), ("properties", "n", "deeper")})]
    count_sets = [(frozenset({"add_to_cart", "purchase"}), frozenset({"7d"})), (frozenset({"custom_thing"}), None),
                  (frozenset({"product_view", "nope"}), frozenset({"5m", "1h", "x"}))]
    for u in range(20):
        st = UserState(f"i{u}")
        for ev in _synthetic_events(st.key, rng, ms("2019-10-01T00:00:00Z"), 30) + odd:
            apply(st, ev, None, CFG)
            at = ev["timestamp_ms"] + rng.choice([0, 61_000, 86_400_000])
            for paths in path_sets:
                assert triggers._event_key(paths)(st, at, None, None, (), ev, {}) == \
                    triggers._event_image(paths)(event_value(ev, at, paths)), (paths, ev)
            for types, spans in count_sets:
                built = flat_namespace(st, at, Deps.of({"count"}, types, spans))["count"]
                assert triggers._count_key(types, spans)(st, at) == triggers._count_image(types, spans)(built)


def test_a_map_read_at_the_key_an_event_gives_is_remembered_by_that_entry_only(monkeypatch):
    rs = parse_rules('version: "1"\ntriggers:\n  - name: t\n    on: product_view\n    when: '
                     '\'has(event.properties.category) && category_views[event.properties.category] >= 2\'\n'
                     '    action: {type: a}\n')
    deps = rs.trigger("t").when.deps
    assert deps.partial_maps == {"category_views"}
    assert deps.map_reads == {("category_views", "e", ("properties", "category"))}
    evaluated = []
    monkeypatch.setattr(triggers, "_eval_bool", lambda e, act: evaluated.append(1) or EVAL_BOOL(e, act))
    ctx = triggers.RuleContext(rs)
    fired = []
    for u in range(6):  # the other categories viewed do not matter
        st = UserState(f"m{u}")
        for i, cat in enumerate([f"other{u}", "shoes", "shoes"]):
            ev = event("product_view", st.key, ms("2019-10-01T10:00:00Z") + i * 1000, category=cat)
            apply(st, ev, None, CFG)
            fired += triggers.on_event(st, ev, False, None, ctx).actions
    # one evaluation per user for its own first category, then (shoes, 1) and (shoes, 2) once for all
    # (with the whole map as the input it would be 6 + 12)
    assert len(fired) == 6 and len(evaluated) == 6 + 2


def test_the_faster_formatting_gives_exactly_the_same_strings():
    from clickpulse.events.contract import to_rfc3339
    from clickpulse.state.user import action_id
    rng = random.Random(5)
    times = [rng.randrange(0, 253_402_300_800_000) for _ in range(20_000)]
    times += [0, 999, 1000, 86_399_999, 86_400_000, 951_782_400_000, 253_402_300_799_999, -1, 253_402_300_800_000]
    for t in times:
        if 0 <= t < 253_402_300_800_000:
            assert triggers._rfc3339(t) == to_rfc3339(t), t
    assert triggers._action_id is triggers._action_id_v5  # the state's own ids, checked at import
    for _ in range(5_000):
        args = ("".join(rng.choice("aé🙂|-_0") for _ in range(rng.randint(0, 12))), rng.choice(["t", "x|y", ""]),
                str(rng.randrange(10**13)))
        assert triggers._action_id(*args) == action_id(*args)


def test_an_odd_unhashable_value_is_evaluated_not_remembered(monkeypatch):
    """A value no builder of ours makes (here a set in a hand-made state) cannot be a memory key:
    the condition is just evaluated, as with incremental evaluation off."""
    from clickpulse.state.user import CartItem
    rs = parse_rules('version: "1"\nsegments:\n  - {name: s, when: "cart.items.size() > 0", min_size: 1}\n')
    outs = []
    for mode in (True, False):
        monkeypatch.setattr(triggers, "INCREMENTAL", mode)
        st = UserState("odd")
        st.cart.items["p1"] = CartItem(1, 2.0, 0, {"a", "b"}, [[0, 1]])  # category: a set
        ev = event("page_view", "odd", "2019-10-01T10:00:00Z")
        apply(st, ev, None, CFG)
        out = triggers.on_event(st, ev, False, None, triggers.RuleContext(rs))
        outs.append(([c.change for c in out.changes], [str(e) for e in out.errors]))
    assert outs[0] == outs[1]
