"""The names a rule's CEL expression can use, built from one user's state.

:func:`namespace` turns a :class:`~clickpulse.state.user.UserState` into a plain nested dict
(the *namespace*); :data:`VARIABLES` declares each top-level CEL name with its CEL type, so the
rules compiler type-checks every expression against it at load time (an unknown name such as
``cartt.value`` or ``session.nope`` is rejected there, with its position).

Names, types and units
----------------------
Integers are CEL ``int`` and money, scores and percentages CEL ``double``. CEL does not mix the
two: compare an ``int`` with ``2`` and a ``double`` with ``50.0`` (or convert with ``int(...)`` /
``double(...)``). Times are whole seconds or whole days, floored.

count : map<string, map<string, int>>
    Events per type per window, as of ``at_ms``: ``count.add_to_cart["7d"]``. Windows ``"5m"``,
    ``"1h"``, ``"24h"``, ``"7d"``, ``"today"`` (:data:`clickpulse.state.windows.SPANS`; "last 5
    min" = the current minute plus the 4 before it, and so on; ``"7d"`` = the current local day
    and the 6 before it, ``"today"`` = the current local day, in the site time zone
    ``CLICKPULSE_TIMEZONE``, 23 or 25 hours long on a daylight-saving transition day). A span name starts with a digit, so it is
    indexed with ``["7d"]``: ``count.add_to_cart.7d`` is a syntax error in CEL. Every canonical
    type is present (0 when unseen), plus any other type the user sent; an absent type is a
    runtime error (the condition is then false). Late events are not counted.
session.duration_s : int
    Seconds from the first to the last event of the user's latest session.
session.events : int
    Events in that session.
session.counts : map<string, int>
    Events of that session by type (every canonical type present, 0 when unseen):
    ``session.counts.product_view``.
session.max_scroll_pct : double
    Highest ``scroll_pct`` property seen in the session, 0–100 (%).
session.dwell_s : int
    Sum of the ``dwell_ms`` properties of the session's events, in seconds.
session.page_type_dwell_s : map<string, int>
    Seconds spent per page type in the session: the time from an event to the user's next event
    is credited to the first event's page type (``properties.page_type``, else ``checkout`` for
    ``checkout_start``, ``product`` for ``product_view``, ``cart`` for cart changes, ``search``,
    ``page``, ``confirmation`` for ``purchase``), each gap capped at the session gap; only page
    types seen are present: ``"checkout" in session.page_type_dwell_s &&
    session.page_type_dwell_s.checkout > 300``. The time on the current page is credited when the
    next event arrives.
session.path : list<string>
    The session's opening: its event types in event-time order, consecutive repeats collapsed,
    the first 16 (events arriving out of order are not inserted).
session.products : int
    Distinct products seen in the session (counted up to 32).
session.idle_s : int
    Seconds from the session's last event to ``at_ms`` (0 while the user is active; 1800 or
    more means that session has ended).
cart.items : list<map<string, dyn>>
    The cart's lines, sorted by product id, each ``{"product_id": string, "quantity": int,
    "price": double or null, "category": string or null}`` (``price`` per unit, in
    ``cart.currency``).
cart.count : int
    Distinct products in the cart.
cart.units : int
    Units in the cart (sum of quantities).
cart.value : double
    Sum of quantity × unit price, in ``cart.currency`` (unknown prices count 0).
cart.currency : string
    ISO 4217 code of the cart's prices, ``""`` when unknown.
cart.empty : bool
    True when the cart has no items.
cart.last_update : string
    RFC 3339 event time of the last cart change, ``""`` when none.
cart.idle_s : int
    Seconds since the last cart change (add, remove, purchase), ``-1`` when there was none.
lifetime.events : int
    Events of the user, all time.
lifetime.sessions : int
    Sessions of the user, all time.
lifetime.orders : int
    Purchases, all time.
lifetime.revenue : double
    Revenue of those purchases, in the shop's currency (summed as sent).
lifetime.days_since_last_order : int
    Whole days from the latest purchase to ``at_ms``, ``-1`` when the user never purchased.
lifetime.days_since_first_seen : int
    Whole days from the user's first event to ``at_ms`` (0 for a new user).
traits : map<string, dyn>
    Traits from ``identify`` events (string, int, double or bool values) plus ``device`` and
    ``country`` from the events' context: ``traits.country == "DE"``; test a trait that may be
    absent with ``has(traits.age_band)``.
local.date : string
    The local date of the evaluation in the site time zone (``CLICKPULSE_TIMEZONE``, IANA name,
    default UTC), ``"YYYY-MM-DD"``: ``local.date == "2025-12-24"``.
local.hour : int
    The local hour of the evaluation, 0–23 (the skipped hour of a spring-forward day never
    occurs; the repeated hour of a fall-back day occurs twice).
local.weekday : int
    The local weekday of the evaluation, 0 (Monday) to 6 (Sunday).
category_views : map<string, int>
    Product views per ``properties.category`` over the local day of the evaluation and the 6 days
    before it (16 most recently viewed categories per user; late events not counted):
    ``category_views["electronics.smartphone"] >= 3``.
consent : map<string, bool>
    The user's latest decision per consent purpose (``consent`` events): ``consent.marketing``.
    A purpose never decided is absent (``has(consent.marketing)``).
scores.intent : double
    Latest purchase-intent score, 0–1 (0.5 before the model has learned anything).
scores.churn : double
    Latest churn score, 0–1 (0.5 by default).
scores.engagement : double
    Engagement score decayed to the evaluation time (points, >= 0; see
    :mod:`clickpulse.features.engagement`).
scores.p_purchase : double
    Probability, 0–1, that the current session reaches a purchase given its latest event type
    (first-order Markov chain learned online by the trainer, :mod:`clickpulse.models.markov`).
tier : string
    Engagement tier of the current session: ``"high"``, ``"medium"`` or ``"low"`` (online
    k-means, :mod:`clickpulse.models.tiers`).
conversion.user : double
    The user's share of sessions with a purchase, Bayesian-smoothed towards the population's rate
    (beta-binomial posterior mean, :mod:`clickpulse.rules.smoothing`), 0–1.
segments : list<string>
    Names of the segments the user is in: ``"cart_builders" in segments``.
event : map<string, dyn>
    The event being evaluated: ``{"type": string, "timestamp_ms": int, "properties": map,
    "context": map}`` (``event.properties.category``); for a timer (no event) ``type`` is
    ``""`` and the maps are empty.

Examples
--------
>>> from clickpulse.state.user import StateConfig, UserState, apply
>>> from clickpulse.testing import event, ms
>>> st = UserState("u1")
>>> _ = apply(st, event("add_to_cart", at="2019-10-01T10:00:00Z", product_id="p1", price=30.0,
...                     currency="EUR", quantity=2), None, StateConfig())
>>> ns = namespace(st, ms("2019-10-01T10:05:00Z"))
>>> ns["count"]["add_to_cart"]["7d"], ns["cart"]["value"], ns["cart"]["units"], ns["session"]["idle_s"]
(1, 60.0, 2, 300)
>>> ns["scores"]["intent"], ns["lifetime"]["days_since_last_order"], ns["session"]["page_type_dwell_s"]
(0.5, -1, {})

Building only what is used
--------------------------
:func:`namespace` builds every name: it is the reference (documentation, tests). The rules
engine builds only the names its expressions read, with :func:`flat_namespace`, which returns
the flat ``{CEL variable: value}`` dict of just those names (a :class:`Deps`; for ``count``
possibly only some event types and spans). For every name it builds, the value equals that of
``flatten(namespace(...))`` with the same arguments (``count`` restricted to the requested types
and spans), which ``tests/unit/test_rules_incremental.py`` checks over many states.

>>> flat = flat_namespace(st, ms("2019-10-01T10:05:00Z"),
...                       Deps.of({"cart.value", "count"}, count_types={"add_to_cart"}, count_spans={"7d"}))
>>> flat
{'count': {'add_to_cart': {'7d': 1}}, 'cart.value': 60.0}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..events.contract import CANONICAL_TYPES
from ..events.contract import to_rfc3339
from ..state.localtime import local_clock
from ..state.user import UserState, cart_items, category_views
from ..state.windows import DAY_MS, SPANS

#: Every CEL name of the namespace and its CEL type (``cel.Type`` signature). A dotted name is
#: one CEL variable (``session.duration_s``), so the type checker rejects ``session.nope``.
VARIABLES: dict[str, str] = {
    "count": "map<string, map<string, int>>",
    "session.duration_s": "int",
    "session.events": "int",
    "session.counts": "map<string, int>",
    "session.max_scroll_pct": "double",
    "session.dwell_s": "int",
    "session.page_type_dwell_s": "map<string, int>",
    "session.products": "int",
    "session.path": "list<string>",
    "session.idle_s": "int",
    "cart.items": "list<map<string, dyn>>",
    "cart.count": "int",
    "cart.units": "int",
    "cart.value": "double",
    "cart.currency": "string",
    "cart.empty": "bool",
    "cart.idle_s": "int",
    "cart.last_update": "string",
    "lifetime.events": "int",
    "lifetime.sessions": "int",
    "lifetime.orders": "int",
    "lifetime.revenue": "double",
    "lifetime.days_since_last_order": "int",
    "lifetime.days_since_first_seen": "int",
    "traits": "map<string, dyn>",
    "local.date": "string",
    "local.hour": "int",
    "local.weekday": "int",
    "category_views": "map<string, int>",
    "consent": "map<string, bool>",
    "scores.intent": "double",
    "scores.churn": "double",
    "scores.engagement": "double",
    "scores.p_purchase": "double",
    "tier": "string",
    "conversion.user": "double",
    "segments": "list<string>",
    "event": "map<string, dyn>",
}

#: Score used for a model that has not scored this user yet (the models' own prior, S5).
DEFAULT_SCORE = 0.5
SCORE_NAMES = ("intent", "churn")
_TYPES = sorted(CANONICAL_TYPES)


def _secs(ms: int) -> int:
    return max(0, ms) // 1000


def _days(at_ms: int, then_ms: int | None) -> int:
    return -1 if then_ms is None else max(0, at_ms - then_ms) // DAY_MS


def _zero_filled(counts: Mapping[str, int]) -> dict[str, int]:
    out = dict.fromkeys(_TYPES, 0)
    out.update({str(k): int(v) for k, v in counts.items()})
    return out


_ZERO_COUNTS = dict.fromkeys(SPANS, 0)


def _window_counts(st: UserState, at_ms: int) -> dict[str, dict[str, int]]:
    seen: set[str] = set()
    for ring in st.windows.rings.values():
        seen.update(t for t, buckets in ring.items() if buckets)
    out = {t: _ZERO_COUNTS for t in _TYPES}  # shared read-only zeros for the types never seen
    for t in seen:
        out[t] = {span: st.windows.count(t, span, at_ms) for span in SPANS}
    return out


def _plain(v: Any) -> Any:
    """A JSON-like copy (str keys; str/int/float/bool/None leaves) for a ``dyn`` value."""
    if v is None or type(v) in (str, bool, int, float):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, str | bool | int | float):
        return v
    return str(v)


def namespace(state: UserState, at_ms: int, scores: Mapping[str, float] | None = None, *,
              segments: Iterable[str] = (), event: Mapping[str, Any] | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The CEL namespace of one user as of event time ``at_ms``: a nested plain dict.

    Parameters
    ----------
    state
        The user's state (after the current event, if any, was applied).
    at_ms
        Event time of the evaluation (epoch ms): the current event's time, or a timer's due time.
    scores
        Model scores by name (``intent``, ``churn``, 0–1); by default the state's latest scores.
        A missing score is :data:`DEFAULT_SCORE`.
    segments
        Names of the segments the user is currently in.
    event
        The canonical event being evaluated, or ``None`` for a timer.
    extra
        Values the engine computes from its models and population counts:
        ``{"engagement": float, "p_purchase": float, "tier": str, "conversion_user": float}``;
        each missing one gets its neutral default (0.0, 0.5, ``"medium"``, 0.5).

    Returns
    -------
    dict
        ``{"count": ..., "session": {...}, "cart": {...}, "lifetime": {...}, "traits": ...,
        "local": {...}, "category_views": ..., "consent": ..., "scores": {...}, "tier": ..., "conversion": {...},
        "segments": [...], "event": {...}}``; every name
        of :data:`VARIABLES` (a dotted name ``a.b`` is ``ns["a"]["b"]``), with exactly its type
        (``int`` for CEL int, ``float`` for CEL double). See the module docstring for units.
    """
    s = state.session
    if s is None:
        session = {"duration_s": 0, "events": 0, "counts": _zero_filled({}), "max_scroll_pct": 0.0,
                   "dwell_s": 0, "page_type_dwell_s": {}, "products": 0, "idle_s": 0, "path": []}
    else:
        session = {"duration_s": _secs(s.duration_ms), "events": int(s.events), "counts": _zero_filled(s.counts),
                   "max_scroll_pct": float(s.max_scroll_pct), "dwell_s": _secs(int(s.dwell_ms)),
                   "page_type_dwell_s": {k: _secs(v) for k, v in s.page_dwell_ms.items()},
                   "products": len(s.products), "idle_s": _secs(at_ms - s.last_ms), "path": list(s.path)}
    x = extra or {}
    cart = state.cart
    items = [{"product_id": i["product_id"], "quantity": int(i["quantity"]),
              "price": None if i["price"] is None else float(i["price"]), "category": i["category"]}
             for i in cart_items(cart)]
    life = state.life
    raw_scores = dict(state.ml.get("sc", {}))
    if scores is not None:
        raw_scores.update(scores)
    ev: dict[str, Any]
    if event is None:
        ev = {"type": "", "timestamp_ms": int(at_ms), "properties": {}, "context": {}}
    else:
        props = event.get("properties")
        ctx = event.get("context")
        ev = {"type": str(event.get("type", "")), "timestamp_ms": int(event.get("timestamp_ms", at_ms)),
              "properties": _plain(props) if isinstance(props, Mapping) else {},
              "context": _plain(ctx) if isinstance(ctx, Mapping) else {}}
    return {
        "count": _window_counts(state, at_ms),
        "session": session,
        "cart": {
            "items": items,
            "count": len(items),
            "units": sum(i["quantity"] for i in items),
            "value": float(cart.value),
            "currency": cart.currency or "",
            "empty": not items,
            "last_update": "" if cart.updated_ms is None else to_rfc3339(cart.updated_ms),
            "idle_s": -1 if cart.updated_ms is None and cart.closed_ms is None
            else _secs(at_ms - max(t for t in (cart.updated_ms, cart.closed_ms) if t is not None)),
        },
        "lifetime": {
            "events": int(life.events),
            "sessions": int(life.sessions),
            "orders": int(life.orders),
            "revenue": round(float(life.revenue), 2),
            # Cart.closed_ms is the latest purchase time of the user (any purchase closes the cart)
            "days_since_last_order": _days(at_ms, cart.closed_ms) if life.orders else -1,
            "days_since_first_seen": max(0, _days(at_ms, life.first_ms)),
        },
        "traits": _plain(state.traits),
        "local": dict(zip(("date", "hour", "weekday"), local_clock(at_ms), strict=True)),
        "category_views": category_views(state, at_ms),
        "consent": {str(k): bool(v[0]) for k, v in state.consent.items()},
        "scores": {**{k: float(raw_scores.get(k, DEFAULT_SCORE)) for k in SCORE_NAMES},
                   "engagement": float(x.get("engagement", 0.0)), "p_purchase": float(x.get("p_purchase", 0.5))},
        "tier": str(x.get("tier", "medium")),
        "conversion": {"user": float(x.get("conversion_user", 0.5))},
        "segments": [str(x) for x in segments],
        "event": ev,
    }


# --------------------------------------------------------------------------- only what is used


#: The names the engine computes from its models and population counts (``extra`` of
#: :func:`namespace`): CEL name -> key of the ``extra`` mapping.
EXTRA_KEYS: dict[str, str] = {"scores.engagement": "engagement", "scores.p_purchase": "p_purchase",
                              "tier": "tier", "conversion.user": "conversion_user"}


def _union(a: frozenset[Any] | None, b: frozenset[Any] | None) -> frozenset[Any] | None:
    return None if a is None or b is None else a | b


@dataclass(frozen=True)
class Deps:
    """The namespace names some CEL expressions read (what :func:`flat_namespace` must build).

    Attributes
    ----------
    names
        Keys of :data:`VARIABLES` (``"count"``, ``"cart.value"``, ``"event"``...).
    count_types
        When ``count`` is in ``names``: the event types read (``count.add_to_cart[...]``), or
        ``None`` for possibly any (a type that is not a constant, ``count.exists(...)``...).
        Empty when ``count`` is not read.
    count_spans
        Likewise the window keys read (``"7d"``), ``None`` for possibly any.
    event_paths
        When ``event`` is in ``names``: the paths of constant keys it is read through
        (``event.properties.category`` is ``("properties", "category")``; what is read beyond
        the end of a path may be anything), or ``None`` for all of it. Empty when ``event`` is
        not read.
    map_reads
        ``(name, "k", key)`` and ``(name, "e", event path)`` for the maps (``category_views``,
        ``traits``, ``consent``, ``session.counts``...) of ``partial_maps``: such a map is only
        read at those keys (a constant key; the key an event path gives), its entry's presence
        and value, never as a whole. (Its value is still the whole map: this only says what
        the result can depend on.)
    partial_maps
        The maps read only as ``map_reads`` says.

    ``a | b`` is the union (what either reads).
    """

    names: frozenset[str] = frozenset()
    count_types: frozenset[str] | None = frozenset()
    count_spans: frozenset[str] | None = frozenset()
    event_paths: frozenset[tuple[str, ...]] | None = frozenset()
    map_reads: frozenset[tuple[str, str, Any]] = frozenset()
    partial_maps: frozenset[str] = frozenset()

    @classmethod
    def of(cls, names: Iterable[str], count_types: Iterable[str] | None = None,
           count_spans: Iterable[str] | None = None, event_paths: Iterable[tuple[str, ...]] | None = None,
           map_reads: Mapping[str, Iterable[tuple[str, Any]]] | None = None) -> Deps:
        """Deps of ``names`` (``count``: the given types and spans, ``event``: the given paths;
        ``None`` = all; ``map_reads``: map name -> its ``("k", key)`` / ``("e", path)`` reads,
        for the maps read only so).

        Raises
        ------
        ValueError
            A name that is not in :data:`VARIABLES`.
        """
        names = frozenset(names)
        unknown = names - VARIABLES.keys()
        if unknown:
            raise ValueError(f"not namespace names: {', '.join(sorted(unknown))}")
        counted = "count" in names
        reads = {n: r for n, r in (map_reads or {}).items() if n in names}
        return cls(names,
                   frozenset() if not counted else None if count_types is None else frozenset(count_types),
                   frozenset() if not counted else None if count_spans is None else frozenset(count_spans),
                   frozenset() if "event" not in names else None if event_paths is None
                   else frozenset(tuple(p) for p in event_paths),
                   frozenset((n, kind, key) for n, r in reads.items() for kind, key in r),
                   frozenset(reads))

    def __or__(self, other: Deps) -> Deps:
        whole = (self.names - self.partial_maps) | (other.names - other.partial_maps)
        partial = (self.partial_maps | other.partial_maps) - whole
        return Deps(self.names | other.names, _union(self.count_types, other.count_types),
                    _union(self.count_spans, other.count_spans), _union(self.event_paths, other.event_paths),
                    frozenset(r for r in self.map_reads | other.map_reads if r[0] in partial), partial)

    def covers(self, other: Deps) -> bool:
        """True when everything ``other`` reads is built here too (map reads aside: a map is
        always built whole)."""
        return other.names <= self.names and all(
            mine is None or (theirs is not None and theirs <= mine)
            for mine, theirs in ((self.count_types, other.count_types), (self.count_spans, other.count_spans),
                                 (self.event_paths, other.event_paths)))

    @property
    def extra_keys(self) -> frozenset[str]:
        """Keys of the engine's ``extra`` mapping these names need (see :data:`EXTRA_KEYS`)."""
        return frozenset(EXTRA_KEYS[n] for n in self.names if n in EXTRA_KEYS)


#: Every name, every ``count`` type and span: what :func:`namespace` builds.
ALL = Deps.of(VARIABLES)
#: Nothing (a constant expression).
NONE = Deps()


_COUNT_PLANS: dict[tuple[Any, Any], tuple[Any, ...]] = {}


def _count_plan(types: Iterable[str] | None, spans: Iterable[str] | None) -> tuple[Any, ...]:
    """(span keys, shared zero counts, sorted types or None) for :func:`window_counts`."""
    key = (None if types is None else frozenset(types), None if spans is None else frozenset(spans))
    plan = _COUNT_PLANS.get(key)
    if plan is None:
        if len(_COUNT_PLANS) > 256:  # (a few per rules file; bounded all the same)
            _COUNT_PLANS.clear()
        keys = tuple(SPANS) if key[1] is None else tuple(s for s in SPANS if s in key[1])
        zero = _ZERO_COUNTS if len(keys) == len(SPANS) else dict.fromkeys(keys, 0)  # shared, read-only
        plan = _COUNT_PLANS[key] = (keys, zero, None if key[0] is None else tuple(sorted(key[0])))
    return plan


def window_counts(state: UserState, at_ms: int, types: Iterable[str] | None = None,
                  spans: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """The ``count`` name as of ``at_ms``, restricted to ``types`` and ``spans`` (``None``: all):
    ``{type: {span: n}}`` with the entries of ``namespace(state, at_ms)["count"]`` for those
    types and spans (a type that is neither canonical nor seen is absent there, so here too)."""
    keys, zero, wanted = _count_plan(types, spans)
    windows = state.windows
    rings = windows.rings.values()
    count = windows.count
    if wanted is None:
        seen: set[str] = set()
        for ring in rings:
            seen.update(t for t, buckets in ring.items() if buckets)
        out = dict.fromkeys(_TYPES, zero)
        for t in seen:
            out[t] = {span: count(t, span, at_ms) for span in keys}
        return out
    out = {}
    for t in wanted:
        for ring in rings:
            if ring.get(t):
                out[t] = {span: count(t, span, at_ms) for span in keys}
                break
        else:
            if t in CANONICAL_TYPES:
                out[t] = zero
    return out


_NO_SESSION_COUNTS = _zero_filled({})


def _event_value(event: Mapping[str, Any] | None, at_ms: int) -> dict[str, Any]:
    if event is None:
        return {"type": "", "timestamp_ms": int(at_ms), "properties": {}, "context": {}}
    props = event.get("properties")
    ctx = event.get("context")
    return {"type": str(event.get("type", "")), "timestamp_ms": int(event.get("timestamp_ms", at_ms)),
            "properties": _plain(props) if isinstance(props, Mapping) else {},
            "context": _plain(ctx) if isinstance(ctx, Mapping) else {}}


_STR = frozenset({str})


def _str_keys(d: dict[Any, Any]) -> bool:
    """Every key of ``d`` is exactly a ``str`` (then ``_plain(d)[k]`` is ``_plain(d[k])``)."""
    return set(map(type, d)) <= _STR  # (in C: no generator)


def _pruned(raw: Any, rest: tuple[str, ...], plain: bool) -> Any:
    """``_plain(raw)`` (``raw`` itself when ``plain``) keeping only what the key path ``rest``
    reaches: the value at its end whole; a map on the way with just that key (empty when absent);
    a value on the way that is not a map whole."""
    if not plain:
        if not rest:
            return _plain(raw)
        if type(raw) is dict and _str_keys(raw):  # _plain(raw)[k] == _plain(raw[k])
            k = rest[0]
            return {k: _pruned(raw[k], rest[1:], False)} if k in raw else {}
        raw = _plain(raw)
    if not rest:
        return raw
    if type(raw) is dict:
        k = rest[0]
        return {k: _pruned(raw[k], rest[1:], True)} if k in raw else {}
    return raw


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if k in dst and type(dst[k]) is dict and type(v) is dict:
            _merge(dst[k], v)
        else:
            dst[k] = v


_EVENT_PLANS: dict[frozenset[tuple[str, ...]], tuple[tuple[str, tuple[str, ...]], ...] | None] = {}


def _event_plan(paths: Iterable[tuple[str, ...]]) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    """((head, rest), ...) of the paths that are not under another one; None: the whole event."""
    key = paths if isinstance(paths, frozenset) else frozenset(tuple(p) for p in paths)
    if key in _EVENT_PLANS:
        return _EVENT_PLANS[key]
    plan: list[tuple[str, tuple[str, ...]]] | None = []
    taken: set[tuple[str, ...]] = set()
    for path in sorted(key, key=lambda x: (len(x), x)):  # a prefix taken whole covers the longer paths
        if not path:
            plan = None
            break
        if not any(path[:i] in taken for i in range(1, len(path))):
            taken.add(path)
            plan.append((path[0], path[1:]))  # type: ignore[union-attr]
    result = None if plan is None else tuple(plan)
    if len(_EVENT_PLANS) > 256:  # (a few per rules file; bounded all the same)
        _EVENT_PLANS.clear()
    _EVENT_PLANS[key] = result
    return result


def event_value(event: Mapping[str, Any] | None, at_ms: int,
                paths: Iterable[tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The ``event`` name (:func:`namespace`); with ``paths`` (see :attr:`Deps.event_paths`),
    only what they reach: the value at the end of each path whole, the maps on the way with
    only the path's keys (a key absent from a map is absent here too). An expression that reads
    ``event`` only through those paths gives the same result over either."""
    plan = None if paths is None else _event_plan(paths)
    if plan is None:
        return _event_value(event, at_ms)
    out: dict[str, Any] = {}
    for head, rest in plan:
        if head == "type":
            v = _pruned(str(event.get("type", "")) if event is not None else "", rest, True)
        elif head == "timestamp_ms":
            v = _pruned(int(event.get("timestamp_ms", at_ms)) if event is not None else int(at_ms), rest, True)
        elif head == "properties" or head == "context":
            raw = event.get(head) if event is not None else None
            v = _pruned(raw, rest, False) if isinstance(raw, Mapping) else {}
        else:
            continue  # not a key of the event map
        if head in out and type(out[head]) is dict and type(v) is dict:
            _merge(out[head], v)
        else:
            out[head] = v
    return out


def _cart_idle_s(state: UserState, at_ms: int) -> int:
    cart = state.cart
    if cart.updated_ms is None and cart.closed_ms is None:
        return -1
    return _secs(at_ms - max(t for t in (cart.updated_ms, cart.closed_ms) if t is not None))


_NO_SCORES: dict[str, float] = {}


def _score(state: UserState, scores: Mapping[str, float] | None, name: str) -> float:
    if scores is not None and name in scores:
        return float(scores[name])
    return float(state.ml.get("sc", {}).get(name, DEFAULT_SCORE))


# name -> builder(state, at_ms, session, scores, segments, event, extra); each gives exactly the
# value namespace() gives (see the module docstring's units)
_Builder = Callable[[UserState, int, Any, Any, Any, Any, Mapping[str, Any]], Any]
_BUILDERS: dict[str, _Builder] = {
    "session.duration_s": lambda st, at, s, *_: 0 if s is None else _secs(s.duration_ms),
    "session.events": lambda st, at, s, *_: 0 if s is None else int(s.events),
    "session.counts": lambda st, at, s, *_: dict(_NO_SESSION_COUNTS) if s is None else _zero_filled(s.counts),
    "session.max_scroll_pct": lambda st, at, s, *_: 0.0 if s is None else float(s.max_scroll_pct),
    "session.dwell_s": lambda st, at, s, *_: 0 if s is None else _secs(int(s.dwell_ms)),
    "session.page_type_dwell_s": lambda st, at, s, *_: {} if s is None else
    {k: _secs(v) for k, v in s.page_dwell_ms.items()},
    "session.products": lambda st, at, s, *_: 0 if s is None else len(s.products),
    "session.path": lambda st, at, s, *_: [] if s is None else list(s.path),
    "session.idle_s": lambda st, at, s, *_: 0 if s is None else _secs(at - s.last_ms),
    "cart.items": lambda st, *_: [{"product_id": i["product_id"], "quantity": int(i["quantity"]),
                                   "price": None if i["price"] is None else float(i["price"]),
                                   "category": i["category"]} for i in cart_items(st.cart)],
    "cart.count": lambda st, *_: len(st.cart.items),
    "cart.units": lambda st, *_: sum(int(i.quantity) for i in st.cart.items.values()),
    "cart.value": lambda st, *_: float(st.cart.value),
    "cart.currency": lambda st, *_: st.cart.currency or "",
    "cart.empty": lambda st, *_: not st.cart.items,
    "cart.last_update": lambda st, *_: "" if st.cart.updated_ms is None else to_rfc3339(st.cart.updated_ms),
    "cart.idle_s": lambda st, at, *_: _cart_idle_s(st, at),
    "lifetime.events": lambda st, *_: int(st.life.events),
    "lifetime.sessions": lambda st, *_: int(st.life.sessions),
    "lifetime.orders": lambda st, *_: int(st.life.orders),
    "lifetime.revenue": lambda st, *_: round(float(st.life.revenue), 2),
    "lifetime.days_since_last_order": lambda st, at, *_: -1 if not st.life.orders or st.cart.closed_ms is None
    else max(0, at - st.cart.closed_ms) // DAY_MS,  # _days(at, closed_ms), inlined
    "lifetime.days_since_first_seen": lambda st, at, *_: max(0, _days(at, st.life.first_ms)),
    "traits": lambda st, *_: _plain(st.traits),
    "local.date": lambda st, at, *_: local_clock(at)[0],
    "local.hour": lambda st, at, *_: local_clock(at)[1],
    "local.weekday": lambda st, at, *_: local_clock(at)[2],
    "category_views": lambda st, at, *_: category_views(st, at),
    "consent": lambda st, *_: {str(k): bool(v[0]) for k, v in st.consent.items()},
    "scores.intent": lambda st, at, s, sc, *_: float(sc["intent"]) if sc is not None and "intent" in sc
    else float(st.ml.get("sc", _NO_SCORES).get("intent", DEFAULT_SCORE)),  # _score(st, sc, "intent"), inlined
    "scores.churn": lambda st, at, s, sc, *_: float(sc["churn"]) if sc is not None and "churn" in sc
    else float(st.ml.get("sc", _NO_SCORES).get("churn", DEFAULT_SCORE)),
    "scores.engagement": lambda st, at, s, sc, seg, ev, x: float(x.get("engagement", 0.0)),
    "scores.p_purchase": lambda st, at, s, sc, seg, ev, x: float(x.get("p_purchase", 0.5)),
    "tier": lambda st, at, s, sc, seg, ev, x: str(x.get("tier", "medium")),
    "conversion.user": lambda st, at, s, sc, seg, ev, x: float(x.get("conversion_user", 0.5)),
    "segments": lambda st, at, s, sc, seg, ev, x: [str(v) for v in seg],
}
assert set(_BUILDERS) | {"count", "event"} == set(VARIABLES)


def flat_namespace(state: UserState, at_ms: int, deps: Deps | Iterable[str],
                   scores: Mapping[str, float] | None = None, *, segments: Iterable[str] = (),
                   event: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Only the names ``deps`` reads, flat: ``{CEL variable name: value}``.

    Parameters are those of :func:`namespace`; ``deps`` is a :class:`Deps` or an iterable of
    names of :data:`VARIABLES` (then ``count`` has every type and span). ``extra`` needs only
    the keys of the names asked for (:data:`EXTRA_KEYS`, :attr:`Deps.extra_keys`).

    Returns
    -------
    dict
        In :data:`VARIABLES` order, for each name of ``deps``, the value ``flatten(namespace(...))[name]`` has with the same
        arguments; ``count`` holds only ``deps.count_types`` and ``deps.count_spans``, ``event``
        only what ``deps.event_paths`` reach (:func:`event_value`).

    Raises
    ------
    ValueError
        A name that is not in :data:`VARIABLES`.
    """
    if not isinstance(deps, Deps):
        deps = Deps.of(deps)
    out: dict[str, Any] = {}
    fill_namespace(out, state, at_ms, [n for n in VARIABLES if n in deps.names], deps.count_types, deps.count_spans,
                   deps.event_paths, scores, segments, event, extra)
    return out


def fill_namespace(out: dict[str, Any], state: UserState, at_ms: int, names: Iterable[str],
                   count_types: Iterable[str] | None, count_spans: Iterable[str] | None,
                   event_paths: Iterable[tuple[str, ...]] | None, scores: Mapping[str, float] | None,
                   segments: Iterable[str], event: Mapping[str, Any] | None, extra: Mapping[str, Any] | None) -> None:
    """:func:`flat_namespace` into ``out`` (each of ``names`` set, nothing else touched), without
    checking the names (a KeyError for an unknown one): the evaluator's fast path."""
    s = state.session
    x = extra or {}
    for name in names:
        if name == "count":
            out[name] = window_counts(state, at_ms, count_types, count_spans)
        elif name == "event":
            out[name] = event_value(event, at_ms, event_paths)
        else:
            out[name] = _BUILDERS[name](state, at_ms, s, scores, segments, event, x)
