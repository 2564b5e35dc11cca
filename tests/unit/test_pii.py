"""The PII policy at ingest (clickpulse.events.pii): allowlists, keyed hashing, dead-letter
redaction, policy-file validation, and that the default policy changes nothing clickpulse needs."""

from __future__ import annotations

import base64
import copy
import hashlib
import logging
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator
from prometheus_client import CollectorRegistry

from clickpulse.errors import ConfigError, InvalidEvent
from clickpulse.events.contract import parse
from clickpulse.events.dlq import dlq_record
from clickpulse.events.pii import DEFAULT_POLICY_PATH, PiiPolicy, parse_hash_key, redact_detail
from clickpulse.events.schemas import load_schema
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.observability.metrics import Metrics
from clickpulse.runtime import REPO_ROOT
from clickpulse.settings import Settings
from clickpulse.testing import memory_engine
from tests.oracle import partition_mod4

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
T0 = 1569888000000

HASHING = """
version: 1
properties: {allow: [product_id, price]}
context: {allow: [user_agent]}
traits: {allow: [plan]}
hash:
  - traits.email
  - traits.phone
  - properties.email
  - {field: context.ip, normalize: exact}
"""


def _ev(**over) -> dict:
    raw = {"type": "identify", "user_id": "u1", "timestamp": T0, "event_id": "e1"}
    raw.update(over)
    return parse(orjson.dumps(raw), None)


# --- the default policy keeps what the product needs -----------------------------------------------
def _rees46(pii: bool) -> list[bytes]:
    out = []
    for raw in read_rees46(BUNDLED_SAMPLE):
        if pii:  # what a real tracker adds: all of it must go, none of it may change an action
            raw["properties"].update(email=f"user{raw['user_id']}@example.com", url="https://shop/?e=a@b.c",
                                     query="alice smith", name="Alice")
            raw["context"].update(ip="203.0.113.7", traits={"email": "a@b.c"}, page={"url": "https://x"})
            raw["integrations"] = {"All": True}
        out.append(orjson.dumps(raw))
    return out


def _replay(values: list[bytes], policy: PiiPolicy | None) -> tuple[list[dict], int]:
    eng = memory_engine(live=False, lateness_s=60)  # default rules, marketing consent assumed
    actions: list[dict] = []
    dropped = 0
    for v in values:
        ev = parse(v, None)
        if policy is not None:
            ev, counts = policy.apply(ev)
            dropped += counts["dropped"]
            assert counts["hashed"] == 0
        actions += eng.process(partition_mod4(ev["user_id"]), ev, 0)[1]
    for p in range(4):
        for src in range(4):
            actions += eng.end_of_input(p, src, 4, 0)
    return actions, dropped


def test_default_policy_keeps_what_rees46_and_the_default_rules_need():
    policy = PiiPolicy.default()
    assert policy.missing_product_fields() == []
    plain = _rees46(pii=False)
    for v in plain:  # nothing of a REES46 event is dropped
        ev = parse(v, None)
        assert policy.apply(ev) == (ev, {"dropped": 0, "hashed": 0})
    base, _ = _replay(plain, None)
    with_pii, dropped = _replay(_rees46(pii=True), policy)
    assert len(base) > 1000
    assert [a["action_id"] for a in with_pii] == [a["action_id"] for a in base]
    strip = [{k: v for k, v in a.items() if k != "created_at"} for a in base]
    assert [{k: v for k, v in a.items() if k != "created_at"} for a in with_pii] == strip
    assert dropped == 8 * len(plain)  # email, url, query, name, ip, traits, page, integrations


def test_applied_event_equals_the_event_without_the_pii():
    policy = PiiPolicy.default()
    for clean, dirty in zip(_rees46(False)[:200], _rees46(True)[:200], strict=True):
        assert policy.apply(parse(dirty, None))[0] == parse(clean, None)


def test_default_policy_drops_an_email_in_properties_and_an_ip_in_context():
    ev = _ev(type="add_to_cart", properties={"product_id": "p1", "price": 5.0, "email": "alice@example.com"},
             context={"ip": "203.0.113.7", "user_agent": "Mozilla/5.0"})
    out, counts = PiiPolicy.default().apply(ev)
    assert out["properties"] == {"product_id": "p1", "price": 5.0}
    assert out["context"] == {"user_agent": "Mozilla/5.0"}
    assert counts == {"dropped": 2, "hashed": 0}
    assert b"alice" not in orjson.dumps(out) and b"203.0.113" not in orjson.dumps(out)


def test_default_policy_filters_identify_traits():
    ev = _ev(properties={"traits": {"email": "a@b.c", "first_name": "Alice", "plan": "pro", "country": "DE",
                                    "phone": "+49 151 2345678"}})
    out, counts = PiiPolicy.default().apply(ev)
    assert out["properties"]["traits"] == {"plan": "pro", "country": "DE"}
    assert counts == {"dropped": 3, "hashed": 0}
    eng = memory_engine()
    eng.process(0, out, 0)
    assert eng.load("u1").traits == {"plan": "pro", "country": "DE"}


def test_segment_identify_traits_go_through_the_traits_allowlist():
    raw = {"type": "identify", "userId": "u1", "timestamp": T0, "messageId": "m1",
           "traits": {"email": "alice@example.com", "plan": "pro"}, "context": {"ip": "1.2.3.4"},
           "integrations": {"All": True}, "channel": "server"}
    out, counts = PiiPolicy.default().apply(parse(orjson.dumps(raw), None))
    assert out["properties"] == {"traits": {"plan": "pro"}} and out["context"] == {}
    assert "integrations" not in out and "channel" not in out
    assert counts == {"dropped": 4, "hashed": 0}


# --- hashing --------------------------------------------------------------------------------------------
def test_email_is_normalized_before_hashing():
    policy = PiiPolicy.from_yaml(HASHING, key=KEY)
    a, ca = policy.apply(_ev(properties={"traits": {"email": " Alice@Example.com "}}))
    b, cb = policy.apply(_ev(properties={"traits": {"email": "alice@example.com"}}))
    h = a["properties"]["traits"]["email"]
    assert h == b["properties"]["traits"]["email"]
    assert h.startswith("h1:") and len(h) == 35 and int(h[3:], 16) >= 0
    assert ca == cb == {"dropped": 0, "hashed": 1}
    # the same value joins across fields (properties.email) and events
    c, _ = policy.apply(_ev(type="page_view", properties={"email": "ALICE@example.com"}))
    assert c["properties"]["email"] == h
    assert policy.apply(_ev(properties={"traits": {"email": "bob@example.com"}}))[0]["properties"]["traits"]["email"] != h


def test_phone_keeps_digits_only_and_ip_is_hashed_as_sent():
    policy = PiiPolicy.from_yaml(HASHING, key=KEY)
    a = policy.apply(_ev(properties={"traits": {"phone": "+49 (151) 234-5678"}}))[0]
    b = policy.apply(_ev(properties={"traits": {"phone": 491512345678}}))[0]
    assert a["properties"]["traits"]["phone"] == b["properties"]["traits"]["phone"] == policy.hash_value("491512345678")
    ip = policy.apply(_ev(context={"ip": "203.0.113.7"}))[0]["context"]["ip"]
    assert ip == policy.hash_value("203.0.113.7") and ip != policy.hash_value("203.0.113.8")


@pytest.mark.parametrize("key", [KEY, b"x" * 16, b"y" * 64, b"z" * 65, bytes(range(256))])
def test_hash_is_hmac_sha256(key):
    import hmac
    policy = PiiPolicy.from_yaml(HASHING, key=key)
    for text in ("alice@example.com", "491512345678", "Zoë", "\ud800"):
        want = "h1:" + hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]
        assert policy.hash_value(text) == want


def test_different_keys_give_different_hashes():
    ev = _ev(properties={"traits": {"email": "alice@example.com"}})
    one = PiiPolicy.from_yaml(HASHING, key=KEY).apply(ev)[0]["properties"]["traits"]["email"]
    two = PiiPolicy.from_yaml(HASHING, key=OTHER_KEY).apply(ev)[0]["properties"]["traits"]["email"]
    assert one != two
    assert one == PiiPolicy.from_yaml(HASHING, key=KEY).apply(ev)[0]["properties"]["traits"]["email"]
    assert hashlib.sha256(b"alice@example.com").hexdigest()[:32] not in (one[3:], two[3:])  # keyed, not plain


def test_unhashable_and_empty_values_are_dropped_null_is_kept():
    policy = PiiPolicy.from_yaml(HASHING, key=KEY)
    out, counts = policy.apply(_ev(properties={"traits": {"email": {"work": "a@b.c"}, "phone": "  -  "},
                                               "email": None}))
    assert out["properties"] == {"traits": {}, "email": None}
    assert counts == {"dropped": 2, "hashed": 0}


def test_apply_never_mutates_its_input_and_is_idempotent():
    policy = PiiPolicy.from_yaml(HASHING.replace("version: 1", "version: 1\nhash_ids: true"), key=KEY)
    ev = _ev(properties={"product_id": "p1", "email": "a@b.c", "url": "u",
                         "traits": {"email": "A@b.c", "plan": "pro", "name": "Al"}},
             context={"ip": "1.2.3.4", "user_agent": "ua", "page": {"url": "x"}}, anonymous_id="anon-1", foo=1)
    before = copy.deepcopy(ev)
    out, counts = policy.apply(ev)
    assert ev == before
    assert counts == {"dropped": 4, "hashed": 5}
    again, counts2 = policy.apply(out)
    assert again == out and counts2 == {"dropped": 0, "hashed": 0}
    assert out is not ev and out["properties"] is not ev["properties"] and out["context"] is not ev["context"]


def test_hash_ids_rebuilds_the_user_key():
    policy = PiiPolicy.from_yaml(HASHING.replace("version: 1", "version: 1\nhash_ids: true"), key=KEY)
    out, _ = policy.apply(_ev(user_id="alice@example.com"))
    assert out["user_id"] == out["user_key"] == policy.hash_identifier("alice@example.com") != "alice@example.com"
    anon = policy.apply(parse(orjson.dumps({"type": "page_view", "anonymous_id": "a1", "timestamp": T0}), None))[0]
    assert anon["user_key"] == "anon:" + policy.hash_value("a1") and anon["anonymous_id"] == policy.hash_value("a1")
    assert PiiPolicy.default().hash_identifier("u1") == "u1"


# --- dead letters ----------------------------------------------------------------------------------------
SECRETS = ("alice@example.com", "Alice Smith", "203.0.113.7", "4915112345678", "+49 151 1234567")


@pytest.mark.parametrize("raw", [
    b'{"type": "x", "user_id": "alice@example.com", "timestamp": 1569888000000, "properties": {"price": "Alice Smith"}}',
    b'{"type": "x", "user_id": "u", "timestamp": "Alice Smith"}',
    b'{"type": "x", "user_id": "u", "timestamp": 1569888000000, "properties": {"consent": {"alice@example.com": 1}}}',
    b'{"type": "x", "user_id": "u", "timestamp": 1569888000000, "context": {"ip": 4915112345678}}',
    b'{"type": "x", "user_id": "u", "timestamp": 1569888000000, "properties": {"product_id": {"ip": "203.0.113.7"}}}',
    b'{"type": "x", "user_id": "u", "timestamp": 1569888000000, "properties": {"currency": "+49 151 1234567"}}',
    b'{"email": "alice@example.com", "timestamp": 0, "type": "page_view"}',
    b'{"email": "alice@example.com"',
])
def test_dead_letter_keeps_no_original_bytes(raw):
    with pytest.raises(InvalidEvent) as exc:
        parse(raw, b"alice@example.com")
    rec = dlq_record(exc.value, key=b"alice@example.com", value=raw, topic="t", partition=0, offset=3,
                     timestamp_ms=None, max_payload_bytes=65536)
    before = copy.deepcopy(rec)
    red = PiiPolicy.default().redact_dead_letter(rec)
    assert rec == before  # input unchanged
    Draft202012Validator(load_schema("dlq")).validate(red)
    assert red["key_b64"] is None and red["value_b64"] is None and red["value_truncated"] is True
    assert red["value_size"] == len(raw) and red["value_sha256"] == hashlib.sha256(raw).hexdigest()
    assert red["reason"] == rec["reason"] and red["source"] == rec["source"]
    text = orjson.dumps(red).decode()
    for s in SECRETS:
        assert s not in text, (s, red["detail"])
    assert base64.b64encode(raw).decode()[:16] not in text
    assert PiiPolicy.default().redact_dead_letter(red) == red  # idempotent


def test_dead_letter_detail_keeps_its_diagnosis():
    assert redact_detail("properties.price: 'Alice' is not of type 'number'", "schema") == \
        "properties.price: '<redacted>' is not of type 'number'"
    assert redact_detail("timestamp is not RFC 3339 (e.g. 2019-10-01T10:00:00Z): 'Bob'", "bad_timestamp") == \
        "timestamp is not RFC 3339 (e.g. 2019-10-01T10:00:00Z): '<redacted>'"
    assert redact_detail("properties.quantity: 20000 is above the limit of 10000 units", "out_of_range") == \
        "properties.quantity: 20000 is above the limit of 10000 units"
    assert redact_detail("KeyError: 'bob@x.org'", "internal") == "KeyError: '<redacted>'"
    assert redact_detail("context.ip: 2001:db8::1 and fe80:0:0:0:1:2:3:4 seen", "schema") == \
        "context.ip: <redacted> and <redacted> seen"


def test_keep_payload_true_leaves_dead_letters_as_built():
    text = DEFAULT_POLICY_PATH.read_text().replace("keep_payload: false", "keep_payload: true")
    policy = PiiPolicy.from_yaml(text)
    rec = dlq_record(InvalidEvent("schema", "x: 'a@b.c'"), key=b"k", value=b"{}", topic="t", partition=0,
                     offset=0, timestamp_ms=None, max_payload_bytes=10)
    assert policy.keep_dlq_payload and policy.redact_dead_letter(rec) == rec


def test_null_message_dead_letter():
    rec = dlq_record(InvalidEvent("not_json", "empty message (null value)"), key=None, value=None, topic="t",
                     partition=0, offset=0, timestamp_ms=None, max_payload_bytes=10)
    red = PiiPolicy.default().redact_dead_letter(rec)
    assert red["value_b64"] is None and red["value_truncated"] is False and red["value_sha256"] is None


# --- loading ----------------------------------------------------------------------------------------------
BASE = "version: 1\nproperties: {allow: [a]}\ncontext: {allow: []}\ntraits: {allow: []}\n"


@pytest.mark.parametrize(("text", "problem"), [
    ("properties: [", "not valid YAML: line"),
    ("- a\n- b\n", "must be a YAML mapping"),
    (BASE + "propertes: {allow: []}\n", "propertes: unknown key"),
    (BASE.replace("version: 1\n", ""), "version: missing"),
    (BASE.replace("version: 1", "version: 2"), "version: must be 1"),
    (BASE.replace("context: {allow: []}\n", ""), "context: missing"),
    (BASE.replace("{allow: [a]}", "[a, b]"), "properties: must be a mapping with an allow list"),
    (BASE.replace("{allow: [a]}", "{allow: a}"), "properties.allow: must be a list of key names"),
    (BASE.replace("{allow: [a]}", "{allow: [a, 3]}"), "properties.allow[1]: must be a non-empty key name"),
    (BASE.replace("{allow: [a]}", "{allow: [a, a]}"), "properties.allow[1]: 'a' is listed twice"),
    (BASE.replace("{allow: [a]}", "{allowed: [a]}"), "properties.allowed: unknown key"),
    (BASE.replace("{allow: [a]}", "{allow: [traits]}"), "do not list `traits`"),
    (BASE + "properties: {allow: []}\n", "duplicate key 'properties'"),
    (BASE + "hash: traits.email\n", "hash: must be a list"),
    (BASE + "hash: [email]\n", "hash[0]: 'email' is not <section>.<key>"),
    (BASE + "hash: [user.email]\n", "hash[0]: 'user.email' is not <section>.<key>"),
    (BASE + "hash: [context.page.url]\n", "nested fields are not supported"),
    (BASE + "hash: [properties.traits]\n", "hash them one by one"),
    (BASE + "hash: [{field: traits.email, normalize: sha}]\n", "hash[0].normalize: must be one of email, phone, exact"),
    (BASE + "hash: [{name: traits.email}]\n", "hash[0].name: unknown key"),
    (BASE + "hash: [traits.email, traits.email]\n", "hash[1]: 'traits.email' is listed twice"),
    (BASE + "hash_ids: yes\n", "hash_ids: must be true or false"),
    (BASE + "dlq: {keep_payload: 1}\n", "dlq.keep_payload: must be true or false"),
    (BASE + "dlq: {keep: true}\n", "dlq.keep: unknown key"),
    (BASE + "event: {allow: [user_id]}\n", "'user_id' is a canonical field"),
])
def test_invalid_policy_files_are_rejected_naming_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        PiiPolicy.load(path, key=KEY)
    assert str(path) in str(exc.value) and problem in str(exc.value), str(exc.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read the PII policy file"):
        PiiPolicy.load(tmp_path / "nope.yaml")


def test_hash_fields_without_a_key_are_refused_at_load(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HASHING)
    with pytest.raises(ConfigError, match=r"p.yaml: the policy hashes traits.email.*CLICKPULSE_PII_HASH_KEY is not set"):
        PiiPolicy.load(path)
    with pytest.raises(ConfigError, match="CLICKPULSE_PII_HASH_KEY is not set"):
        PiiPolicy.from_settings(Settings(pii_policy_path=str(path)))
    path.write_text(BASE + "hash_ids: true\n")
    with pytest.raises(ConfigError, match=r"hashes user_id, anonymous_id \(hash_ids: true\)"):
        PiiPolicy.load(path)
    path.write_text(HASHING)
    assert PiiPolicy.from_settings(Settings(pii_policy_path=str(path), pii_hash_key="s" * 16)).hash


def test_key_parsing():
    assert parse_hash_key("") == b""
    assert parse_hash_key("ab" * 16) == bytes.fromhex("ab" * 16)
    assert parse_hash_key(" a-text-secret-of-20 ") == b"a-text-secret-of-20"
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        parse_hash_key("short")


def test_settings_and_metric():
    s = Settings.from_env({"CLICKPULSE_PII_POLICY_PATH": "/p.yaml", "CLICKPULSE_PII_HASH_KEY": "topsecret-0123456789"})
    assert (s.pii_policy_path, s.pii_hash_key) == ("/p.yaml", "topsecret-0123456789")
    assert "topsecret" not in repr(s) and "topsecret" not in repr(PiiPolicy.default(key=b"topsecret-0123456789"))
    assert PiiPolicy.from_settings(Settings()) == PiiPolicy.default()
    m = Metrics(CollectorRegistry())
    m.pii_fields.labels("dropped").inc(2)
    m.pii_fields.labels("hashed").inc()
    assert m.registry.get_sample_value("clickpulse_pii_fields_total", {"action": "dropped"}) == 2


def test_example_policy_is_the_default_policy():
    example = REPO_ROOT / "deploy" / "pii-policy.example.yaml"
    a, b = PiiPolicy.load(example), PiiPolicy.default()
    assert (a.properties, a.context, a.traits, a.event, a.hash, a.hash_ids, a.keep_dlq_payload) == \
        (b.properties, b.context, b.traits, b.event, b.hash, b.hash_ids, b.keep_dlq_payload)
    # its commented hashing example is valid once uncommented
    text = example.read_text().replace("hash: []\n", "").replace("# hash:\n", "hash:\n")
    text = text.replace("#   - ", "  - ")
    hashed = PiiPolicy.from_yaml(text, key=KEY, source=str(example))
    assert [h.path for h in hashed.hash] == ["traits.email", "traits.phone", "context.ip"]
    assert [h.normalize for h in hashed.hash] == ["email", "phone", "exact"]


def test_a_policy_dropping_product_fields_warns(caplog):
    with caplog.at_level(logging.WARNING, "clickpulse.events.pii"):
        policy = PiiPolicy.from_yaml(BASE, source="mine.yaml")
    assert "properties.product_id" in policy.missing_product_fields()
    assert "mine.yaml: the PII policy drops properties.product_id" in caplog.text


def test_packaged_default_is_shipped():
    assert DEFAULT_POLICY_PATH.is_file() and Path(DEFAULT_POLICY_PATH).parent.name == "events"
