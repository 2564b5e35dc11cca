"""Rules core: the CEL namespace, compiling and evaluating conditions, the rules file and reloads."""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path

import pytest

import clickpulse.rules.namespace as namespace_mod
import clickpulse.rules.ruleset as ruleset_mod
from clickpulse.errors import ClickpulseError
from clickpulse.rules.namespace import namespace
from clickpulse.rules import (
    VARIABLES,
    RulesError,
    RulesFile,
    activation,
    compile_expression,
    evaluate,
    evaluate_condition,
    load_rules,
    parse_rules,
    render_payload,
)
from clickpulse.state.user import StateConfig, UserState, apply
from clickpulse.testing import event, ms

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "rules.example.yaml"
CFG = StateConfig()
DAY = "2019-10-08"


def shopper() -> UserState:
    """A returning customer: a purchase on Oct 3, then on Oct 8 a session with three cart adds."""
    st = UserState(key="u1")
    evs = [
        event("identify", at="2019-09-30T09:00:00Z", traits={"age_band": "25-34", "vip": True}),
        event("purchase", at="2019-10-03T09:00:00Z", revenue=20.0, currency="EUR"),
        event("product_view", at=f"{DAY}T10:00:00Z", product_id="p1", category="shoes", scroll_pct=40),
        event("product_view", at=f"{DAY}T10:01:00Z", product_id="p2", category="shoes", scroll_pct=80.5,
              dwell_ms=12_500),
        event("add_to_cart", at=f"{DAY}T10:02:00Z", product_id="p1", price=30.0, quantity=1, currency="EUR",
              category="shoes"),
        event("add_to_cart", at=f"{DAY}T10:03:00Z", product_id="p2", price=12.5, quantity=2, currency="EUR"),
        event("add_to_cart", at=f"{DAY}T10:06:00Z", product_id="p1", price=30.0, quantity=1, currency="EUR"),
    ]
    for e in evs:
        apply(st, e, None, CFG)
    return st


AT = ms(f"{DAY}T10:08:00Z")


@pytest.fixture(scope="module")
def ns():
    return namespace(shopper(), AT)


# ---------------------------------------------------------------- namespace


def test_namespace_values_from_a_real_state(ns):
    assert ns["count"]["add_to_cart"] == {"5m": 1, "1h": 3, "24h": 3, "7d": 3, "today": 3}
    assert ns["count"]["product_view"]["7d"] == 2
    assert ns["count"]["purchase"]["7d"] == 1  # day buckets Oct 2..Oct 8
    assert ns["count"]["checkout_start"] == {"5m": 0, "1h": 0, "24h": 0, "7d": 0, "today": 0}  # canonical types zero-filled
    s = ns["session"]
    assert s["duration_s"] == 360 and s["events"] == 5 and s["idle_s"] == 120
    assert s["counts"]["add_to_cart"] == 3 and s["counts"]["product_view"] == 2 and s["counts"]["purchase"] == 0
    assert s["max_scroll_pct"] == 80.5 and s["dwell_s"] == 12 and s["products"] == 2
    # 10:00 and 10:01 product views (60 s each until the next event), then cart changes at
    # 10:02 (60 s to 10:03) and 10:03 (180 s to 10:06); the time after the last event is not credited yet
    assert s["page_type_dwell_s"] == {"product": 120, "cart": 240}
    assert s["path"] == ["product_view", "add_to_cart"]
    assert ns["category_views"] == {"shoes": 2}
    c = ns["cart"]
    assert c["items"] == [{"product_id": "p1", "quantity": 2, "price": 30.0, "category": "shoes"},
                          {"product_id": "p2", "quantity": 2, "price": 12.5, "category": None}]
    assert (c["count"], c["units"], c["value"], c["currency"]) == (2, 4, 85.0, "EUR")
    assert c["empty"] is False and c["idle_s"] == 120
    life = ns["lifetime"]
    assert (life["orders"], life["revenue"], life["sessions"], life["events"]) == (1, 20.0, 3, 7)
    assert life["days_since_last_order"] == 5 and life["days_since_first_seen"] == 8
    assert ns["traits"] == {"age_band": "25-34", "vip": True}
    assert ns["scores"] == {"intent": 0.5, "churn": 0.5, "engagement": 0.0, "p_purchase": 0.5}
    assert ns["segments"] == []
    assert ns["event"] == {"type": "", "timestamp_ms": AT, "properties": {}, "context": {}}


def test_namespace_types_match_the_declared_cel_types(ns):
    py = {"int": int, "double": float, "bool": bool, "string": str}
    for name, sig in VARIABLES.items():
        head, _, tail = name.partition(".")
        value = ns[head][tail] if tail else ns[head]
        if sig in py:
            assert type(value) is py[sig], (name, value)
        elif sig.startswith("map"):
            assert isinstance(value, dict), name
        else:
            assert isinstance(value, list), name
    assert set(ns) == {n.partition(".")[0] for n in VARIABLES}


def test_every_name_is_documented_in_the_namespace_docstring():
    doc = namespace_mod.__doc__
    for name, sig in VARIABLES.items():
        assert f"{name} : {sig}" in doc, name


def test_namespace_of_a_new_user_scores_segments_and_the_event():
    st = UserState(key="u2")
    ev = event("product_view", user="u2", at="2019-10-01T10:00:00Z", product_id="p9", category="toys")
    apply(st, ev, None, CFG)
    ns = namespace(st, ev["timestamp_ms"], {"intent": 0.91}, segments=["browsers"], event=ev)
    assert ns["scores"] == {"intent": 0.91, "churn": 0.5, "engagement": 0.0, "p_purchase": 0.5}
    assert ns["tier"] == "medium" and ns["conversion"] == {"user": 0.5} and ns["consent"] == {}
    assert ns["segments"] == ["browsers"]
    assert ns["event"]["type"] == "product_view" and ns["event"]["properties"]["category"] == "toys"
    assert ns["cart"] == {"items": [], "count": 0, "units": 0, "value": 0.0, "currency": "", "empty": True,
                          "idle_s": -1, "last_update": ""}
    assert ns["lifetime"]["days_since_last_order"] == -1 and ns["lifetime"]["days_since_first_seen"] == 0
    st.ml["sc"] = {"intent": 0.2, "intent_version": "v3", "churn": 0.7}
    assert namespace(st, ev["timestamp_ms"])["scores"] == {"intent": 0.2, "churn": 0.7, "engagement": 0.0,
                                                           "p_purchase": 0.5}
    assert namespace(UserState(key="nobody"), 0)["session"]["events"] == 0


# ---------------------------------------------------------------- CEL evaluation


@pytest.mark.parametrize(("expr", "expected"), [
    ('count.add_to_cart["7d"] > 2 && cart.value >= 50.0', True),
    ('count.add_to_cart["5m"] > 2', False),
    ('count["product_view"]["1h"] == 2', True),
    ('"shoes" in cart.items.map(i, i.category)', True),
    ('"checkout" in session.page_type_dwell_s', False),
    ("session.duration_s > 300 && session.counts.product_view >= 2", True),
    ("session.max_scroll_pct >= 75.0", True),
    ("lifetime.orders > 0 && lifetime.days_since_last_order == 5", True),
    ('traits.age_band == "25-34" && traits.vip', True),
    ('has(traits.country)', False),
    ("scores.intent < 0.8", True),
    ('cart.currency == "EUR" && cart.units == 4 && !cart.empty', True),
    ('size(segments) == 0', True),
])
def test_conditions_over_the_namespace(ns, expr, expected):
    errors = []
    assert evaluate_condition(compile_expression(expr, want_bool=True), ns, errors) is expected
    assert errors == []


def test_one_activation_serves_many_expressions(ns):
    act = activation(ns)
    exprs = [compile_expression(s, want_bool=True) for s in ("cart.value > 80.0", "cart.value > 90.0")]
    assert [evaluate_condition(e, act) for e in exprs] == [True, False]
    assert evaluate(compile_expression("cart.items.map(i, i.product_id)", field="x"), act) == (["p1", "p2"], None)


def test_runtime_errors_are_false_with_a_reason_not_exceptions(ns):
    errors = []
    missing_type = compile_expression('count.wishlist_add["7d"] > 0', rule="wish", want_bool=True)
    missing_trait = compile_expression('traits.country == "DE"', rule="de", want_bool=True)
    div = compile_expression("cart.units / (cart.count - 2) > 1", rule="div", want_bool=True)
    dyn = compile_expression("traits.age_band", rule="dyn", want_bool=True)  # dyn: checked at run time
    for e in (missing_type, missing_trait, div, dyn):
        assert evaluate_condition(e, ns, errors) is False
    assert [(x.rule, x.field) for x in errors] == [("wish", "when"), ("de", "when"), ("div", "when"), ("dyn", "when")]
    assert "wishlist_add" in errors[0].reason and "country" in errors[1].reason
    assert "divide by zero" in errors[2].reason and "not a bool" in errors[3].reason
    assert evaluate_condition(missing_trait, ns) is False  # no error list: still no exception
    # CEL's commutative || and &&: an error on one side does not matter when the other decides
    assert evaluate_condition(compile_expression('traits.country == "DE" || cart.value > 1.0'), ns) is True
    assert evaluate_condition(missing_trait, {"count": {}}) is False  # names absent from the activation


def test_payload_templates_render_values_and_constants(ns):
    rs = parse_rules(EXAMPLE.read_bytes(), str(EXAMPLE))
    errors = []
    payload = render_payload(rs.trigger("cart_abandonment").action.payload, ns, errors)
    assert errors == []
    assert payload == {"cart": {"items": ns["cart"]["items"], "value": 85.0, "currency": "EUR",
                                "last_update": "2019-10-08T10:06:00.000Z"}, "offer": "FREESHIP"}
    assert render_payload(rs.trigger("repeat_cart_incentive").action.payload, ns)["discount_pct"] == 10
    payload = render_payload(rs.trigger("category_interest").action.payload, ns, errors)
    assert payload == {"category": None, "views_7d": None} and errors[0].field == "action.payload.category"


def test_no_python_eval_anywhere_in_the_rules_package():
    for mod in (ruleset_mod, namespace_mod):
        tree = ast.parse(inspect.getsource(mod))
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not called & {"eval", "exec", "compile", "__import__"}, mod.__name__
    with pytest.raises(RulesError, match="undeclared reference to '__import__'"):
        compile_expression('__import__("os").system("true")')


# ---------------------------------------------------------------- invalid rules


def _rules(body: str) -> str:
    return 'version: "1"\n' + body


@pytest.mark.parametrize(("body", "rule", "field", "pos", "reason"), [
    ("triggers:\n  - name: t1\n    on: add_to_cart\n    when: 'count.add_to_cart[\"7d\"] > 2 &&'\n    action: {type: x}\n",
     "t1", "when", (4, 1, 31), "Syntax error"),
    ("segments:\n  - name: s1\n    when: cartt.value > 1.0\n", "s1", "when", (3, 1, 6), "undeclared reference to 'cartt.value'"),
    ("segments:\n  - name: s1\n    when: session.nope > 1\n", "s1", "when", (3, 1, 8), "undeclared reference to 'session.nope'"),
    ("segments:\n  - name: s1\n    when: cart.value > 50\n", "s1", "when", (3, 1, 12), "write 50.0"),
    ("segments:\n  - name: s1\n    when: |\n      cart.value > 1.0 &&\n        count.x['7d'] > 'a'\n", "s1", "when", (3, 2, 17),
     "no matching overload"),
    ("segments:\n  - name: s1\n    when: cart.value\n", "s1", "when", (3, None, None), "must be a bool"),
    ("triggers:\n  - name: t1\n    on: product_view\n    action:\n      type: x\n      payload:\n        items: cart.itemz\n",
     "t1", "action.payload.items", (7, 1, 5), "undeclared reference to 'cart.itemz'"),
    ("triggers:\n  - name: t1\n    on: {segment_enter: nope}\n    action: {type: x}\n", "t1", "on.segment_enter",
     (3, None, None), "unknown segment 'nope'"),
    ("triggers:\n  - name: t1\n    on: {timeout: {after: add_to_cart, no: purchase, within_s: 0}}\n    action: {type: x}\n",
     "t1", "on.timeout.within_s", (3, None, None), "positive number"),
    ("triggers:\n  - name: t1\n    on: {timeout: {after: add_to_cart, within_s: 60}}\n    action: {type: x}\n",
     "t1", "on.timeout.no", (3, None, None), "missing field 'no'"),
    ("triggers:\n  - name: t1\n    on: product_view\n    once_per: week\n    action: {type: x}\n", "t1", "once_per",
     (4, None, None), "once_per must be one of episode, session, day, lifetime"),
    ("triggers:\n  - name: t1\n    on: product_view\n    cooldown: 60\n    action: {type: x}\n", "t1", "cooldown",
     (4, None, None), "unknown field 'cooldown'"),
    ("triggers:\n  - name: t1\n    on: product_view\n", "t1", "action", (2, None, None), "missing field 'action'"),
    ("triggers:\n  - name: t1\n    on: product_view\n    requires_consent: [a]\n    action: {type: x}\n", "t1",
     "requires_consent", (4, None, None), "requires_consent"),
])
def test_invalid_rules_are_rejected_with_rule_field_position_and_reason(body, rule, field, pos, reason):
    """``pos`` = (line in ``body``, line and column in the expression); the file has a version line first."""
    pos = (pos[0] + 1, pos[1], pos[2])
    with pytest.raises(RulesError) as info:
        parse_rules(_rules(body), "rules.yaml")
    err = info.value
    assert isinstance(err, ClickpulseError)
    assert (err.rule, err.field, (err.file_line, err.line, err.column)) == (rule, field, pos)
    msg = str(err)
    assert msg.startswith("rules.yaml: ") and f"'{rule}'" in msg and f"field '{field}'" in msg and reason in msg
    if pos[1] is not None:
        assert f"expression line {pos[1]}, column {pos[2]}" in msg


def test_yaml_on_and_no_keys_are_not_booleans():
    rs = parse_rules(_rules("triggers:\n  - name: t\n    on: {timeout: {after: a, no: [b, c], within_s: 5}}\n"
                            "    action: {type: x}\n"))
    assert rs.trigger("t").on.timeout.no == ("b", "c")


@pytest.mark.parametrize(("text", "needle"), [
    ("version: 1.10\n", "version must be a non-empty string"),
    ("version: '1'\nversion: '2'\n", "duplicate key 'version'"),
    ("version: '1'\nsegments:\n  - name: s\n     when: x\n", "invalid YAML"),
    ("segments: []\n", "missing field 'version'"),
    ("version: '1'\nsegments:\n  - {name: s, when: 'true'}\n  - {name: s, when: 'false'}\n", "duplicate segment name"),
    ("- a\n", "a rules file is a mapping"),
])
def test_file_level_errors(text, needle):
    with pytest.raises(RulesError, match=needle):
        parse_rules(text, "r.yaml")


def test_yaml_syntax_error_has_a_position():
    with pytest.raises(RulesError) as info:
        parse_rules("version: '1'\nsegments:\n  - name: s\n     when: x\n")
    assert (info.value.line, info.value.column) == (4, 10)


# ---------------------------------------------------------------- the example file and reloads


def test_the_example_rules_file_loads():
    rs = load_rules(EXAMPLE)
    assert rs.version.startswith("2026-12-01.1+") and len(rs.version.split("+")[1]) == 8
    assert {t.name for t in rs.triggers} == {"cart_abandonment", "browse_abandonment", "repeat_cart_incentive",
                                            "checkout_help", "category_interest"}
    cart = rs.trigger("cart_abandonment")
    assert (cart.on.kind, cart.on.timeout.after, cart.on.timeout.no, cart.on.timeout.within_s) == \
        ("timeout", "add_to_cart", ("purchase",), 1800.0)
    assert cart.requires_consent == "marketing" and cart.once_per == "episode"
    browse = rs.trigger("browse_abandonment").on.timeout
    assert (browse.after, browse.no, browse.within_s) == ("product_view", ("add_to_cart",), 300.0)
    assert [t.name for t in rs.triggers_on("add_to_cart")] == ["repeat_cart_incentive"]
    assert rs.segment("hesitant_buyers").min_size == 50 and rs.segment("lapsed_customers").min_size == 50


def test_example_rules_over_the_shopper(ns):
    rs = load_rules(EXAMPLE)
    errors = []
    # a purchase in the last 7 days: not a hesitant buyer; no intent score yet
    assert rs.matching_segments(ns, errors) == [] and errors == []
    assert evaluate_condition(rs.trigger("cart_abandonment").when, ns) is True
    assert evaluate_condition(rs.trigger("repeat_cart_incentive").when, ns) is False
    st = shopper()
    late = namespace(st, ms("2019-10-10T12:00:00Z"))  # the Oct 3 purchase has left the 7-day window
    assert late["count"]["purchase"]["7d"] == 0
    assert rs.matching_segments(late, errors) == ["hesitant_buyers"] and errors == []
    assert evaluate_condition(rs.trigger("repeat_cart_incentive").when, late) is True


def test_reload_good_then_bad_keeps_the_previous_ruleset(tmp_path, caplog):
    path = tmp_path / "rules.yaml"
    path.write_text('version: "1"\nsegments:\n  - {name: big_carts, when: "cart.value > 100.0"}\n')
    rf = RulesFile(path)
    v1 = rf.current()
    assert v1.version.startswith("1+") and rf.error is None
    assert rf.poll() is False and rf.current() is v1  # unchanged content: nothing reloaded

    path.write_text('version: "2"\nsegments:\n  - {name: big_carts, when: "cart.value > 50.0"}\n')
    assert rf.poll() is True
    v2 = rf.current()
    assert v2.version.startswith("2+") and v2.version != v1.version and rf.reloads == 1 and rf.error is None

    with caplog.at_level(logging.WARNING, logger="clickpulse.rules.ruleset"):
        path.write_text('version: "3"\nsegments:\n  - {name: big_carts, when: "cart.value > 50"}\n')
        assert rf.poll() is False
        assert rf.poll() is False  # the same bad content is not re-parsed, logged or counted again
    assert rf.current() is v2
    assert rf.error is not None and rf.error.rule == "big_carts" and "write 50.0" in str(rf.error)
    assert rf.failures == 1 and sum("reload rejected" in r.message for r in caplog.records) == 1

    path.unlink()
    assert rf.poll() is False and rf.current() is v2 and "cannot read" in str(rf.error)

    path.write_text('version: "2"\nsegments:\n  - {name: big_carts, when: "cart.value > 50.0"}\n')
    assert rf.poll() is False and rf.current() is v2 and rf.error is None  # back to the active content

    path.write_text('version: "4"\nsegments:\n  - {name: big_carts, when: "cart.value > 10.0"}\n')
    assert rf.poll() is True and rf.current().version.startswith("4+") and rf.reloads == 2


def test_same_version_string_different_content_gives_a_different_version(tmp_path):
    a = parse_rules('version: "1"\nsegments:\n  - {name: s, when: "true"}\n')
    b = parse_rules('version: "1"\nsegments:\n  - {name: s, when: "false"}\n')
    assert a.file_version == b.file_version == "1" and a.version != b.version


def test_a_rules_file_that_is_invalid_from_the_start_raises(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text('version: "1"\nsegments:\n  - {name: s, when: "nope > 1"}\n')
    with pytest.raises(RulesError, match="undeclared reference to 'nope'"):
        RulesFile(path)
    with pytest.raises(RulesError, match="cannot read"):
        RulesFile(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("source", "column"), [('count.add_to_cart["7days"] > 2', 19),
                                                ('cart.value > 1.0 && count["purchase"]["1d"] == 0', 39)])
def test_an_unknown_window_is_rejected_at_load(source, column):
    with pytest.raises(RulesError) as err:
        compile_expression(source, rule="r")
    assert err.value.column == column and "unknown window" in err.value.reason
    assert "'5m', '1h', '24h', '7d'" in err.value.reason


def test_a_non_canonical_event_type_loads_with_a_warning():
    rs = parse_rules('version: "1"\ntriggers:\n  - name: x\n    on: add_to_crt\n    action: {type: a}\n')
    assert len(rs.warnings) == 1 and "'add_to_crt' is not a canonical event type" in rs.warnings[0]
    assert load_rules(EXAMPLE).warnings == ()


def test_typos_that_load_are_warned_about():
    rs = parse_rules('version: "1"\nsegments:\n  - name: s\n    when: \'count.add_to_crt["7d"] > 2\'\n'
                     'triggers:\n  - name: x\n    on: add_to_cart\n    requires_consent: marketting\n'
                     '    action: {type: a, payload: {n: \'count.purchse["7d"]\'}}\n')
    assert len(rs.warnings) == 3
    assert "segment 's': count.add_to_crt is not a canonical event type" in rs.warnings[0]
    assert "trigger 'x': count.purchse" in rs.warnings[1]
    assert "requires_consent 'marketting' is not a common purpose" in rs.warnings[2]
