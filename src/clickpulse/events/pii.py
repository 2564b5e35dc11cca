"""The PII policy applied at ingest: what of an event may reach a topic, and in which form.

A canonical event (:func:`clickpulse.events.contract.parse`) carries whatever its producer sent:
e-mail addresses, phone numbers, names, IP addresses, page URLs with tokens in them. The policy
runs right after ``parse``, before the event is published anywhere (valid topic, state,
changelog, profiles, actions), and keeps only what it allows::

    policy = PiiPolicy.from_settings(settings)      # once, at start (ConfigError if invalid)
    ev = parse(msg.value, msg.key, ...)
    ev, counts = policy.apply(ev)                   # counts == {"dropped": n, "hashed": m}
    record = policy.redact_dead_letter(dlq_record(err, ...))   # for a rejected message

:meth:`PiiPolicy.apply` is pure: it returns a new event and never changes its input (nested
dicts it filters are new; values it keeps are shared, never mutated). It is idempotent
(``apply`` of an applied event changes nothing and counts nothing) and costs about 1 µs per event
(``benchmarks/pii_cost.py``).

Policy file
-----------
YAML (safe-loaded; YAML 1.2 booleans: only ``true``/``false``; a duplicate key is an error),
pointed to by ``CLICKPULSE_PII_POLICY_PATH``; empty selects the packaged default
(``src/clickpulse/events/default_pii_policy.yaml``, commented copy in
``deploy/pii-policy.example.yaml``)::

    version: 1                # required, the only version
    properties:               # required: properties keys kept (everything else is dropped)
      allow: [product_id, price, currency, quantity, ...]
    context:                  # required: context keys kept
      allow: [user_agent, device, country, ...]
    traits:                   # required: identify traits (properties.traits) kept
      allow: [country, plan, ...]
    event:                    # optional: top-level keys kept besides the canonical ones
      allow: []
    hash:                     # optional: fields kept as a keyed hash instead of in clear
      - traits.email                          # normalization from the name: email
      - {field: traits.phone, normalize: phone}
      - {field: properties.customer_no, normalize: exact}
    hash_ids: false           # optional: also hash user_id and anonymous_id (see below)
    dlq:                      # optional
      keep_payload: false     # dead-letter records keep the original bytes (true) or not (false)

Allowlists
    Keys of ``properties``, ``context`` and ``properties.traits`` (the traits of ``identify``,
    checked in any event that has them) that are not listed are dropped, one count per key
    (a dropped dict counts 1, whatever it holds). ``properties.traits`` itself is always kept
    (filtered by ``traits.allow``), a ``properties``/``context``/``traits`` that is not an
    object is dropped. Top-level keys are kept when canonical (:data:`CANONICAL_TOP_LEVEL`) or
    listed in ``event.allow``. A kept key keeps its whole value: allow only keys whose values
    carry nothing personal (``url`` may hold an e-mail in its query string, ``products`` any
    keys at all). Rules that read ``event.properties.<key>`` or ``traits.<key>`` need that key
    allowed; :data:`PRODUCT_FIELDS` lists what clickpulse itself reads, and loading a policy
    that drops one of them logs a warning.
Hashing
    A ``hash`` entry is ``<section>.<key>`` (section ``properties``, ``context`` or ``traits``;
    one level, no nesting) or ``{field: ..., normalize: email|phone|exact}``. A hashed key is
    kept (it need not be in ``allow``) with its value replaced by
    ``"h1:" + hex(HMAC-SHA256(CLICKPULSE_PII_HASH_KEY, normalized value))[:32]``: the same value
    gives the same hash in every event and every field, so hashed identifiers stay joinable, and
    nobody without the key can test a guess (an unkeyed hash of an e-mail address is reversed by
    hashing candidate addresses). Normalization before hashing: ``email`` trims and lower-cases
    (``" Alice@Example.com "`` and ``"alice@example.com"`` hash alike); ``phone`` keeps the
    digits only (``"+49 151-234"`` -> ``"49151234"``; a national ``0151...`` and an international
    ``+49151...`` number still differ); ``exact`` hashes the text as sent. Without ``normalize``
    it follows from the key's name: ``email`` if it contains "email", ``phone`` if it contains
    "phone" or "mobile", else ``exact``. Strings and integers are hashed; ``null`` is kept; any
    other value, or one that normalizes to ``""``, is dropped. A value already of the hash's
    form (``h1:`` + 32 hex digits) is kept as it is. Changing the key changes every hash:
    hashes made under the old key no longer join with new ones.
``hash_ids``
    ``user_id`` and ``anonymous_id`` are the join key of everything (state, profiles, actions,
    Redis keys, consent) and are kept as sent by default. With ``hash_ids: true`` they are
    hashed too (``exact``) and ``user_key`` is rebuilt from the hashes, so the state, the Redis
    profiles (``<ns>:profile:<hash>``), the actions and the segment changes carry the hash:
    whoever consumes actions (e-mail, CRM, ad audiences) must map the hash back to a person
    with a table of their own (hash every known id with the same key), and a lookup by a raw id
    (``clickpulse`` CLI, Redis) must hash it first (:meth:`PiiPolicy.hash_identifier`). With
    ``CLICKPULSE_RAW_KEYED`` producers key the raw topic by the raw id, so every event is
    re-keyed through the valid topic (the one-hop path never applies).
``dlq.keep_payload``
    ``false`` (the default): :meth:`PiiPolicy.redact_dead_letter` removes the original key and
    value from a dead-letter record (``key_b64``/``value_b64`` become ``null``,
    ``value_truncated`` says the copy is incomplete); the record keeps ``value_size`` and
    ``value_sha256`` (which identify the message, still readable at its source topic, partition
    and offset for the raw topic's retention), the reason and the detail, scrubbed by
    :func:`redact_detail`. ``true``: records are left as they are (the bytes and the detail as
    built), for a DLQ topic whose readers may see personal data.

Errors
------
A file that cannot be read, is not YAML, has an unknown or missing key, a value of the wrong
type, or a bad hash entry is a :class:`~clickpulse.errors.ConfigError` naming the file and the
place (``policy.yaml: hash[1].normalize: must be one of email, phone, exact, got 'sha'``). A
policy that hashes anything (``hash`` or ``hash_ids``) without ``CLICKPULSE_PII_HASH_KEY`` is a
``ConfigError`` at load: nothing is ever hashed without a key.

Examples
--------
>>> policy = PiiPolicy.from_yaml('''
... version: 1
... properties: {allow: [product_id, price]}
... context: {allow: [user_agent]}
... traits: {allow: [plan]}
... hash: [traits.email]
... ''', key=b"0123456789abcdef")
>>> ev = {"event_id": "e1", "type": "identify", "user_id": "u1", "user_key": "u1",
...       "properties": {"product_id": "p1", "email": "a@b.c",
...                      "traits": {"plan": "pro", "email": " A@B.c", "name": "Alice"}},
...       "context": {"ip": "10.0.0.1", "user_agent": "Mozilla/5.0"}}
>>> out, counts = policy.apply(ev)
>>> out["properties"], out["context"], counts
({'product_id': 'p1', 'traits': {'plan': 'pro', 'email': 'h1:c8b9adc27ca0fc812e2cca09aab792e3'}}, {'user_agent': 'Mozilla/5.0'}, {'dropped': 3, 'hashed': 1})
>>> policy.hash_value("a@b.c", "email") == out["properties"]["traits"]["email"]
True
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..yamlstrict import StrictLoader

from ..errors import ConfigError
from ..keys import secret_bytes

log = logging.getLogger(__name__)

#: The packaged default policy (``CLICKPULSE_PII_POLICY_PATH`` empty).
DEFAULT_POLICY_PATH = Path(__file__).resolve().parent / "default_pii_policy.yaml"

#: Top-level keys of a canonical event, always kept (``event.allow`` adds others).
CANONICAL_TOP_LEVEL = frozenset({
    "schema_version", "event_id", "type", "user_id", "anonymous_id", "user_key", "timestamp",
    "timestamp_ms", "sent_at", "received_at", "original_timestamp", "properties", "context",
    "previous_id",  # alias: a guest's anonymous id (identity stitching, docs/identity.md)
})

#: What clickpulse itself reads from an event (:mod:`clickpulse.state.user`,
#: :mod:`clickpulse.features.engagement`, :mod:`clickpulse.rules.bots`, the default rules); a
#: policy that drops one of these logs a warning when loaded. ``traits`` are all optional.
PRODUCT_FIELDS: dict[str, tuple[str, ...]] = {
    "properties": ("product_id", "price", "revenue", "quantity", "currency", "category", "page_type",
                   "scroll_pct", "dwell_ms", "consent"),
    "context": ("user_agent", "device", "country", "clock_corrected"),
}

NORMALIZATIONS = ("email", "phone", "exact")
SECTIONS = ("properties", "context", "traits")
#: Prefix of a hashed value (version 1: HMAC-SHA256, 32 hex digits).
HASH_PREFIX = "h1:"
#: Smallest accepted ``CLICKPULSE_PII_HASH_KEY``, in bytes.
from ..keys import MIN_KEY_BYTES  # noqa: E402 - one minimum for every secret

_HASHED = re.compile(r"h1:[0-9a-f]{32}")
_NON_DIGITS = re.compile(r"[^0-9]")
_TOP_KEYS = ("version", "properties", "context", "traits", "event", "hash", "hash_ids", "dlq")


def parse_hash_key(value: str) -> bytes:
    """The key bytes of a ``CLICKPULSE_PII_HASH_KEY`` value: an even number of at least 32 hex
    digits is decoded, anything else is taken as UTF-8 text (surrounding whitespace dropped);
    ``""`` is no key (``b""``).

    Raises
    ------
    ConfigError
        A key shorter than :data:`MIN_KEY_BYTES` bytes.
    """
    return secret_bytes(value, "CLICKPULSE_PII_HASH_KEY", MIN_KEY_BYTES)


@dataclass(frozen=True)
class HashField:
    """One ``hash`` entry: ``section.name`` hashed after ``normalize``."""

    section: str
    name: str
    normalize: str

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"


def _normalizer_for(name: str) -> str:
    low = name.lower()
    if "email" in low:
        return "email"
    if "phone" in low or "mobile" in low:
        return "phone"
    return "exact"


# --- the policy --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PiiPolicy:
    """A loaded PII policy (see the module docstring for the file format).

    Attributes
    ----------
    properties, context, traits, event : frozenset[str]
        The allowlists (``event``: top-level keys kept besides :data:`CANONICAL_TOP_LEVEL`).
    hash : tuple[HashField, ...]
        Fields kept as a keyed hash.
    hash_ids : bool
        Hash ``user_id`` and ``anonymous_id`` too (and rebuild ``user_key``).
    keep_dlq_payload : bool
        Dead-letter records keep the original key and value (``dlq.keep_payload``).
    key : bytes
        The HMAC key (``CLICKPULSE_PII_HASH_KEY``); never shown in ``repr``.
    source : str
        Where the policy came from (the file), for messages.

    Raises
    ------
    ConfigError
        From the constructor: something is hashed and ``key`` is empty.
    """

    properties: frozenset[str]
    context: frozenset[str]
    traits: frozenset[str]
    event: frozenset[str] = frozenset()
    hash: tuple[HashField, ...] = ()
    hash_ids: bool = False
    keep_dlq_payload: bool = False
    key: bytes = field(default=b"", repr=False)
    source: str = "<policy>"

    def __post_init__(self) -> None:
        if (self.hash or self.hash_ids) and not self.key:
            what = ", ".join(h.path for h in self.hash) or "user_id, anonymous_id (hash_ids: true)"
            raise ConfigError(f"{self.source}: the policy hashes {what} but CLICKPULSE_PII_HASH_KEY is not set; "
                              "set a secret key (e.g. `openssl rand -hex 32`) or remove the hash entries")
        hashed = {s: tuple((h.name, h.normalize) for h in self.hash if h.section == s) for s in SECTIONS}
        plan = (
            CANONICAL_TOP_LEVEL | self.event,
            self.properties | {n for n, _ in hashed["properties"]} | {"traits"},
            self.context | {n for n, _ in hashed["context"]},
            self.traits | {n for n, _ in hashed["traits"]},
            hashed["properties"], hashed["context"], hashed["traits"],
        )
        object.__setattr__(self, "_plan", plan)
        # HMAC-SHA256 (RFC 2104) with the keyed inner and outer states computed once: a copy of
        # each per value is three times faster than hmac.digest, which sets up the key every call
        k = self.key if len(self.key) <= 64 else hashlib.sha256(self.key).digest()
        k = k.ljust(64, b"\0")
        object.__setattr__(self, "_inner", hashlib.sha256(bytes(b ^ 0x36 for b in k)))
        object.__setattr__(self, "_outer", hashlib.sha256(bytes(b ^ 0x5C for b in k)))

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, key: bytes = b"") -> PiiPolicy:
        """Read and validate a policy file; ``key`` is the HMAC key (bytes, see :func:`parse_hash_key`).

        Raises
        ------
        ConfigError
            The file cannot be read, or is not a valid policy (the message names the file and the
            place), or it hashes something and ``key`` is empty.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the PII policy file: {err}") from err
        return cls.from_yaml(text, key=key, source=str(path))

    @classmethod
    def from_settings(cls, settings: Any) -> PiiPolicy:
        """The policy of ``CLICKPULSE_PII_POLICY_PATH`` (empty: :data:`DEFAULT_POLICY_PATH`) with the
        key of ``CLICKPULSE_PII_HASH_KEY``.

        Raises
        ------
        ConfigError
            As :meth:`load`, or a key shorter than :data:`MIN_KEY_BYTES`.
        """
        path = str(getattr(settings, "pii_policy_path", "") or "").strip() or DEFAULT_POLICY_PATH
        return cls.load(path, key=parse_hash_key(str(getattr(settings, "pii_hash_key", "") or "")))

    @classmethod
    def default(cls, key: bytes = b"") -> PiiPolicy:
        """The packaged default policy."""
        return cls.load(DEFAULT_POLICY_PATH, key=key)

    @classmethod
    def from_yaml(cls, text: str, key: bytes = b"", source: str = "<policy>") -> PiiPolicy:
        """Parse and validate policy YAML text (``source`` names it in errors).

        Raises
        ------
        ConfigError
            Not YAML, or not a valid policy, or it hashes something and ``key`` is empty.
        """
        try:
            doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err)}") from err
        return cls.from_mapping(doc, key=key, source=source)

    @classmethod
    def from_mapping(cls, doc: Any, key: bytes = b"", source: str = "<policy>") -> PiiPolicy:
        """Validate a decoded policy document (see the module docstring).

        Raises
        ------
        ConfigError
            Naming ``source`` and the place of the first problem.
        """
        def bad(where: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: {where}: {problem}")

        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: a PII policy must be a YAML mapping with the keys "
                              f"{', '.join(_TOP_KEYS)}, got {_kind(doc)}")
        unknown = sorted(str(k) for k in doc if k not in _TOP_KEYS)
        if unknown:
            raise bad(unknown[0], f"unknown key (expected one of {', '.join(_TOP_KEYS)})")
        if "version" not in doc:
            raise bad("version", "missing (write `version: 1`)")
        if doc["version"] != 1 or isinstance(doc["version"], bool):
            raise bad("version", f"must be 1, got {doc['version']!r}")
        allow: dict[str, frozenset[str]] = {}
        for section in (*SECTIONS, "event"):
            if section not in doc:
                if section == "event":
                    allow[section] = frozenset()
                    continue
                raise bad(section, f"missing (write `{section}: {{allow: [...]}}`; an empty list drops every key)")
            allow[section] = _allowlist(doc[section], section, bad)
        hashes = _hash_entries(doc.get("hash", []), bad)
        hash_ids = doc.get("hash_ids", False)
        if not isinstance(hash_ids, bool):
            raise bad("hash_ids", f"must be true or false, got {_kind(hash_ids)}")
        dlq = doc.get("dlq", {})
        if dlq is None:
            dlq = {}
        if not isinstance(dlq, dict):
            raise bad("dlq", f"must be a mapping (keep_payload: true|false), got {_kind(dlq)}")
        for k in dlq:
            if k != "keep_payload":
                raise bad(f"dlq.{k}", "unknown key (expected keep_payload)")
        keep = dlq.get("keep_payload", False)
        if not isinstance(keep, bool):
            raise bad("dlq.keep_payload", f"must be true or false, got {_kind(keep)}")
        policy = cls(properties=allow["properties"], context=allow["context"], traits=allow["traits"],
                     event=allow["event"], hash=hashes, hash_ids=hash_ids, keep_dlq_payload=keep, key=key,
                     source=source)
        missing = policy.missing_product_fields()
        if missing:
            log.warning("%s: the PII policy drops %s, which clickpulse reads (see "
                        "clickpulse.events.pii.PRODUCT_FIELDS)", source, ", ".join(missing))
        return policy

    def missing_product_fields(self) -> list[str]:
        """The fields of :data:`PRODUCT_FIELDS` this policy does not keep (``section.key``)."""
        plan = self._plan  # type: ignore[attr-defined]
        kept = {"properties": plan[1], "context": plan[2]}
        return [f"{s}.{k}" for s, keys in PRODUCT_FIELDS.items() for k in keys if k not in kept[s]]

    # -- the hot path -------------------------------------------------------------------------
    def _section(self, section: dict[str, Any], keep: frozenset[str], hash_fields: Any) -> tuple[dict[str, Any], int, int]:
        """A copy of one map (properties, traits, context) with only the allowlisted keys and
        the listed fields hashed: ``(copy, keys dropped, values hashed)``."""
        out = dict(section)
        dropped = hashed = 0
        if not keep.issuperset(section):
            for k in section:
                if k not in keep:
                    del out[k]
                    dropped += 1
        if hash_fields:
            d, hashed = self._hash_in(out, hash_fields)
            dropped += d
        return out, dropped, hashed

    def apply(self, event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
        """Apply the policy to one canonical event.

        Returns
        -------
        tuple
            ``(new_event, {"dropped": n, "hashed": m})``: ``n`` keys dropped (properties, context,
            traits and top-level keys), ``m`` values hashed. ``event`` is not changed.
        """
        top, keep_p, keep_c, keep_t, hash_p, hash_c, hash_t = self._plan  # type: ignore[attr-defined]
        if top.issuperset(event):
            out = dict(event)
            dropped = 0
        else:
            out = {k: v for k, v in event.items() if k in top}
            dropped = len(event) - len(out)
        hashed = 0
        props = out.get("properties")
        if props is not None:
            if isinstance(props, dict):
                p, d, hashed = self._section(props, keep_p, hash_p)
                dropped += d
                traits = p.get("traits")
                if traits is not None:
                    if isinstance(traits, dict):
                        p["traits"], d, h = self._section(traits, keep_t, hash_t)
                        dropped += d
                        hashed += h
                    else:
                        del p["traits"]
                        dropped += 1
                out["properties"] = p
            else:
                del out["properties"]
                dropped += 1
        ctx = out.get("context")
        if ctx is not None:
            if isinstance(ctx, dict):
                out["context"], d, h = self._section(ctx, keep_c, hash_c)
                dropped += d
                hashed += h
            else:
                del out["context"]
                dropped += 1
        if self.hash_ids:
            d, h = self._hash_in(out, _ID_FIELDS)
            dropped += d
            hashed += h
            if "user_key" in out:
                if isinstance(out.get("user_id"), str):
                    out["user_key"] = out["user_id"]
                elif isinstance(out.get("anonymous_id"), str):
                    out["user_key"] = "anon:" + out["anonymous_id"]
        return out, {"dropped": dropped, "hashed": hashed}

    def _hash_in(self, d: dict[str, Any], fields: tuple[tuple[str, str], ...]) -> tuple[int, int]:
        """Hash ``fields`` of ``d`` in place (``d`` is the policy's own copy); (dropped, hashed)."""
        dropped = hashed = 0
        for name, norm in fields:
            v = d.get(name)
            if v is None:
                continue
            if v.__class__ is str and _HASHED.fullmatch(v):
                continue  # already hashed (apply is idempotent)
            h = self.hash_value(v, norm)
            if h is None:
                del d[name]
                dropped += 1
            else:
                d[name] = h
                hashed += 1
        return dropped, hashed

    def hash_value(self, value: Any, normalize: str = "exact") -> str | None:
        """``"h1:" + hex(HMAC-SHA256(key, normalized value))[:32]``; ``None`` for a value that is
        not a string or an integer, or that normalizes to ``""``.

        Raises
        ------
        ConfigError
            The policy has no key.
        """
        if not self.key:
            raise ConfigError(f"{self.source}: no CLICKPULSE_PII_HASH_KEY: cannot hash")
        if value.__class__ is str:
            text = value
        elif isinstance(value, int) and not isinstance(value, bool):
            text = str(int(value))
        elif isinstance(value, str):
            text = str(value)
        else:
            return None
        if normalize == "email":
            text = text.strip().lower()
        elif normalize == "phone":
            text = _NON_DIGITS.sub("", text)
        if not text:
            return None
        inner = self._inner.copy()  # type: ignore[attr-defined]
        inner.update(text.encode("utf-8", "surrogatepass"))
        outer = self._outer.copy()  # type: ignore[attr-defined]
        outer.update(inner.digest())
        return HASH_PREFIX + outer.hexdigest()[:32]

    def hash_identifier(self, user_id: str) -> str:
        """A ``user_id`` or ``anonymous_id`` as events carry it under ``hash_ids: true`` (to look a
        user up by raw id); the id itself when ``hash_ids`` is false."""
        if not self.hash_ids:
            return user_id
        return user_id if _HASHED.fullmatch(user_id) else self.hash_value(user_id, "exact") or user_id

    # -- dead letters -------------------------------------------------------------------------
    def redact_dead_letter(self, record: dict[str, Any]) -> dict[str, Any]:
        """A dead-letter record (``schemas/dlq.v1.json``) as the policy lets it be published: a
        copy; with ``dlq.keep_payload: false`` without the original key and value (``key_b64``
        and ``value_b64`` ``null``, ``value_truncated`` true for a non-empty value; ``value_size``
        and ``value_sha256`` kept) and with its detail scrubbed (:func:`redact_detail`). The
        input is not changed.
        """
        out = dict(record)
        if self.keep_dlq_payload:
            return out
        value_b64 = out.get("value_b64")
        if value_b64 is not None:
            if out.get("value_sha256") is None and isinstance(value_b64, str) and not out.get("value_truncated"):
                try:
                    out["value_sha256"] = hashlib.sha256(base64.b64decode(value_b64, validate=True)).hexdigest()
                except (binascii.Error, ValueError):
                    pass
            out["value_b64"] = None
            out["value_truncated"] = bool(out.get("value_size", 1))
        if "key_b64" in out:
            out["key_b64"] = None
        if isinstance(out.get("detail"), str):
            out["detail"] = redact_detail(out["detail"], out.get("reason"))
        return out


_ID_FIELDS = (("user_id", "exact"), ("anonymous_id", "exact"), ("previous_id", "exact"))


# --- dead-letter details -------------------------------------------------------------------------
#: Reasons whose detail is built from sizes, byte offsets, type names and the JSON decoder's
#: position only (never message content): left as they are.
CONTENT_FREE_REASONS = frozenset({"too_large", "not_utf8", "key_not_utf8", "not_json", "not_object",
                                  "missing_identity"})
#: Quoted words a detail keeps (JSON types and literals named by jsonschema and orjson messages).
SAFE_QUOTED = frozenset({"string", "integer", "number", "object", "array", "boolean", "null", "true", "false"})
REDACTED = "<redacted>"
#: A quoted value: an opening quote not preceded by a letter or digit (so the apostrophe of
#: ``can't`` opens nothing) up to its closing quote, or to the end when the detail was cut.
_QUOTED = re.compile(r"""(?<![^\W_])(?:'(?:[^'\\]|\\.)*(?:'|\\?$)|"(?:[^"\\]|\\.)*(?:"|\\?$))""")
#: Words after which a number is a schema limit (``maxLength 128``, ``maximum 86400000``), kept.
_LIMIT_WORDS = ("maxLength ", "minLength ", "maximum ", "minimum ", "exclusiveMaximum ", "exclusiveMinimum ",
                "maxItems ", "maxProperties ", "limit of ", "limit is ")
_EMAIL = re.compile(r"[^\s'\"<>(),;:]+@[^\s'\"<>(),;:]+")
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*::|(?:[0-9A-Fa-f]{1,4}:){3})[0-9A-Fa-f:]{3,39}(?![\w:])")
_DIGITS = re.compile(r"\+?\(?\d(?:[ ()/-]{0,2}\d)+")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LEAD = re.compile(r"\d+")


def _quoted(m: re.Match[str]) -> str:
    s = m.group(0)
    return s if s[1:-1] in SAFE_QUOTED and s[0] == s[-1] else "'" + REDACTED + "'"


def _digits(m: re.Match[str]) -> str:
    s = m.group(0)
    if sum(c.isdigit() for c in s) < 7 or _DATE.fullmatch(s):
        return s
    if m.string.endswith(_LIMIT_WORDS, 0, m.start()):  # a schema limit: kept, what follows it checked
        lead = _LEAD.match(s).group(0)  # type: ignore[union-attr]
        return lead + _DIGITS.sub(_digits, s[len(lead):])
    return REDACTED


def redact_detail(detail: str, reason: str | None = None) -> str:
    """A dead-letter detail without the message's content: for a reason outside
    :data:`CONTENT_FREE_REASONS`, every quoted value (but JSON type names) becomes
    ``'<redacted>'``, and e-mail addresses, IP addresses and runs of 7 or more digits (phone
    numbers) become ``<redacted>``. Field paths are kept (a path through a key that is itself
    an e-mail address loses that part); idempotent.

    >>> redact_detail("properties.price: 'alice@example.com' is not of type 'number'", "schema")
    "properties.price: '<redacted>' is not of type 'number'"
    >>> redact_detail("context.ip: 4915112345678 is not of type 'string'", "schema")
    "context.ip: <redacted> is not of type 'string'"
    >>> redact_detail("value is 70000 bytes, limit is 65536", "too_large")
    'value is 70000 bytes, limit is 65536'
    """
    if reason in CONTENT_FREE_REASONS:
        return detail
    out = _QUOTED.sub(_quoted, detail)
    out = _EMAIL.sub(REDACTED, out)
    out = _IPV4.sub(REDACTED, out)
    out = _IPV6.sub(REDACTED, out)
    return _DIGITS.sub(_digits, out)


# --- YAML -------------------------------------------------------------------------------------------
# the strict loader (YAML 1.2 booleans: a trait called ``no`` stays a string; duplicate keys rejected)
_Loader = StrictLoader


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else str(problem)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__) + (f" {v!r}" if isinstance(v, str | int | float) else "")


def _allowlist(node: Any, section: str, bad: Any) -> frozenset[str]:
    if not isinstance(node, dict):
        raise bad(section, f"must be a mapping with an allow list (`{section}: {{allow: [...]}}`), got {_kind(node)}")
    for k in node:
        if k != "allow":
            raise bad(f"{section}.{k}", "unknown key (expected allow)")
    if "allow" not in node:
        raise bad(f"{section}.allow", "missing (an empty list `[]` drops every key)")
    items = node["allow"]
    if items is None:
        items = []
    if not isinstance(items, list):
        raise bad(f"{section}.allow", f"must be a list of key names, got {_kind(items)}")
    out: set[str] = set()
    for i, name in enumerate(items):
        if not isinstance(name, str) or not name.strip():
            raise bad(f"{section}.allow[{i}]", f"must be a non-empty key name, got {_kind(name)}")
        if name != name.strip():
            raise bad(f"{section}.allow[{i}]", f"key name {name!r} has surrounding spaces")
        if name in out:
            raise bad(f"{section}.allow[{i}]", f"{name!r} is listed twice")
        out.add(name)
    if section == "properties" and "traits" in out:
        raise bad(f"{section}.allow", "do not list `traits`: properties.traits is always kept and filtered by "
                                      "traits.allow")
    if section == "event":
        clash = sorted(out & CANONICAL_TOP_LEVEL)
        if clash:
            raise bad("event.allow", f"{clash[0]!r} is a canonical field (always kept); list only other top-level keys")
    return frozenset(out)


def _hash_entries(node: Any, bad: Any) -> tuple[HashField, ...]:
    if node is None:
        return ()
    if not isinstance(node, list):
        raise bad("hash", f"must be a list of fields (`- traits.email`), got {_kind(node)}")
    out: list[HashField] = []
    seen: set[str] = set()
    for i, entry in enumerate(node):
        where = f"hash[{i}]"
        norm: Any = None
        if isinstance(entry, dict):
            for k in entry:
                if k not in ("field", "normalize"):
                    raise bad(f"{where}.{k}", "unknown key (expected field, normalize)")
            if "field" not in entry:
                raise bad(f"{where}.field", "missing")
            path, norm = entry["field"], entry.get("normalize")
            if norm is not None and norm not in NORMALIZATIONS:
                raise bad(f"{where}.normalize", f"must be one of {', '.join(NORMALIZATIONS)}, got {norm!r}")
        else:
            path = entry
        if not isinstance(path, str):
            raise bad(where, f"must be a field such as traits.email, got {_kind(path)}")
        section, _, name = path.partition(".")
        if section not in SECTIONS or not name:
            raise bad(where, f"{path!r} is not <section>.<key> with section {', '.join(SECTIONS)} "
                             "(e.g. traits.email, context.ip)")
        if "." in name:
            raise bad(where, f"{path!r}: nested fields are not supported; hash or drop the top key of the section")
        if section == "properties" and name == "traits":
            raise bad(where, "properties.traits holds the identify traits: hash them one by one (traits.email)")
        if path in seen:
            raise bad(where, f"{path!r} is listed twice")
        seen.add(path)
        out.append(HashField(section, name, norm or _normalizer_for(name)))
    return tuple(out)
