"""Segments and triggers of a :class:`~clickpulse.rules.ruleset.Ruleset`, evaluated per user in event time.

Pure and broker-free, like :mod:`clickpulse.state.user`: :func:`on_event` runs after an event
was applied to the user's state, :func:`on_timers` when the partition's watermark passes one of
the user's timers (:func:`next_due`). Everything a decision depends on is in the user's state
(``UserState.rules``, kept in the table's changelog), so a restart or a rules reload neither loses
nor repeats a decision.

Semantics (stated once, applied the same way live and in a replay)
------------------------------------------------------------------
* **Segments.** Membership is re-evaluated after each of the user's events and when one of the
  user's timers fires (a segment whose condition depends only on time passing, e.g.
  ``lifetime.days_since_last_order > 30``, is re-evaluated at the user's next event or timer).
  An entry or exit is a :class:`SegmentChange` (published on ``<ns>.segments``). A segment with
  fewer than ``min_size`` members (``Engine.segment_size``: its partitions plus the counts other
  workers published for theirs, docs/scaling.md; the user who just
  entered included, the one who just left excluded) is *inactive*: it
  is missing from the ``segments`` name of the namespace and its ``segment_enter`` /
  ``segment_exit`` triggers do not fire (outcome ``segment_too_small``).
* **``on: <event type>``.** The condition is evaluated on each (not late) event of that type;
  the trigger fires when it holds and did not hold at the user's previous event of that type
  (not-met → met). A firing suppressed by a gate below still consumes the transition.
  Late events (behind the watermark) fire nothing.
* **``on: {segment_enter|segment_exit: S}``.** Fires on the transition itself (condition checked
  at that moment).
* **``on: {timeout: {after: A, no: B, within_s: T}}``.** An *episode* starts at the first A that
  follows the user's latest B and ends at the next B. Each A of the episode (re)arms a timer due
  ``T`` seconds after the latest A (event time); a B at or after the latest A cancels it and
  closes the episode (also when it arrives after the due time but before the watermark passed it:
  the user did answer, within the allowed lateness). An A older than the latest B is ignored.
  The user's own event that moves the partition's watermark past a pending due time first fires
  that timer (over the state before the event; the engine does this), so the outcome does not
  depend on whether another user's event moved the watermark a moment earlier. An A whose timer would already
  be behind the watermark does not arm it (counted ``timer_skipped_late``). When the watermark
  passes the due time the condition is evaluated over the state as of the due time (with every
  event up to the watermark applied) and the trigger fires.
* **Gates**, in this order, each an outcome counted per trigger: the user is a bot (``bot``, see
  :mod:`clickpulse.rules.bots`: no rule action ever fires for a bot, and a bot is in no segment); the consent purpose of
  ``requires_consent`` is not granted (``consent``: the user's latest ``consent`` event decides;
  with none, the purposes of ``assumed_consent`` count as granted, no other); ``cooldown_s`` of
  event time has not passed since the trigger last fired for the user (``cooldown``);
  ``once_per`` (``episode``: a timeout's episode, ``session``: the session the decision's event
  time falls in, ``day``: the local day of the site time zone the decision's event time falls
  in, DST-correct, see :mod:`clickpulse.state.localtime`, ``lifetime``) already used (``once_per``).
* **Held marketing decisions.** A bot is only recognised by its rate once it has been fast for a
  while (the 21st add within 10 s), but an ``on: add_to_cart`` trigger could fire at its 3rd
  add. So a decision of a trigger with ``requires_consent`` that is not a timeout (an event or
  segment trigger) is *held* for the bot-detection window (the larger of the two rate windows,
  60 s of event time by default) and published when the watermark passes that (outcome
  ``fired``), unless in the meantime the user was flagged as a bot (``bot``), withdrew the
  consent (``consent``) or a reload removed the trigger (``removed``). Its action keeps the
  deciding event's time, id, payload and rules version. Timeouts are not held (their own delay covers it).
* **Action ids** are UUIDv5 of ``user_key | trigger | occurrence`` where the occurrence is the
  event id (event triggers), the due time (timeouts) or ``enter|exit`` and the event id or time
  (segment triggers): re-processing the same input gives the same id whatever the rules
  version. Each action records the ``rules_version`` that decided it and its ``trigger``.
* **Experiments.** A trigger with an ``experiment`` (:mod:`clickpulse.experiments`) decides
  as without one (every gate alike for every arm); the action then carries ``experiment``,
  ``variant`` (the user's arm, :meth:`~clickpulse.experiments.assignment.Experiment.assign`)
  and ``deliver`` (``False`` for the holdout), its payload is the variant's, a timeout's delay
  the variant's ``delay_s`` when it has one, and the first decision for the user records the
  exposure (:attr:`Outcome.exposures`, :func:`clickpulse.experiments.attribution.expose`).
* **Reloads.** Per-trigger state is keyed by trigger name: a trigger kept across a reload keeps
  its timers, cooldown and once_per history (no double firing); a removed trigger's state is
  dropped at the user's next evaluation; a new one starts fresh.
* **What is computed.** Each compiled expression knows what it reads
  (:attr:`clickpulse.rules.ruleset.Expr.deps`, from the type-checked AST): the namespace names,
  ``count`` down to its constant types and spans, ``event`` down to its constant key paths
  (``event.properties.category``), a map read only at single keys (``traits.age_band``,
  ``category_views[event.properties.category]``) down to those keys. An evaluation (one event, or
  the timers due at one time) builds only the names its conditions read
  (:func:`clickpulse.rules.namespace.flat_namespace`), asks the engine's
  :attr:`RuleContext.extra` only for the model/population values those read (not at all when
  none does), builds a payload's names only when its trigger fires, and makes at most one CEL
  activation for the conditions (another only when a trigger reads ``segments`` and the
  membership changed, or a firing payload reads more).
* **Incremental evaluation.** A condition's result depends only on the values it reads (CEL
  evaluation is a pure function of them; cel-cpp has no clock or randomness). So the results
  of each group of conditions evaluated together (the segments' conditions; the conditions of
  the triggers on one event type; one timeout or segment trigger's condition; one payload) are
  remembered, per ruleset, keyed by an exact image of those values: every value a condition
  reads, compared by type and value (1, 1.0 and ``true`` differ; so do 0.0 and -0.0; the
  order of a list's or a map's entries counts), only what ``deps`` says can matter (the
  ``count`` entries, the ``event`` paths, the map entries read). At each evaluation the image
  is computed from the user's state (the same builders as the namespace, without building the
  values) and looked up: found, the remembered results (with their runtime errors, reported
  again) are the results; not found, the conditions are evaluated and remembered. So a
  condition is evaluated again exactly when one of its inputs differs from every input set
  remembered, for this user or any other: whatever changed it (an event of a relevant type,
  time alone moving ``session.idle_s``, ``cart.idle_s``, ``lifetime.days_since_*``, a window
  count or a ``category_views`` day bucket past a boundary, the engagement decay, a model or
  the population behind ``tier``, ``scores.p_purchase``, ``conversion.user``). Nothing is
  skipped on a guess: the inputs are recomputed at every evaluation, only CEL is saved. A
  condition reading all of ``event`` (``size(event.properties)``: every event differs) is
  always evaluated. The memory is per ruleset (a reload starts empty), at most
  :data:`MEMO_ENTRIES` input sets per group (the oldest dropped), in this process only and
  never in ``UserState``: after a restart, a rebalance or an eviction there is less to re-use
  and more is evaluated, with the same decisions. :data:`INCREMENTAL` (or
  ``RuleContext.incremental``) ``False`` evaluates every condition every time (the decisions
  are the same: ``tests/unit/test_rules_incremental.py`` replays REES46 both ways).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..events.contract import CANONICAL_TYPES, to_rfc3339
from ..experiments.assignment import HOLDOUT
from ..experiments.attribution import expose, exposure
from ..experiments.bandit import thompson_arm
from ..state.user import ACTION_NAMESPACE, UserState, action_id
from ..state.localtime import local_day
from ..state.windows import SPANS
from .bots import BotConfig, is_bot
from .bots import observe as observe_bot
from .namespace import (
    _BUILDERS,
    EXTRA_KEYS,
    NONE,
    VARIABLES,
    Deps,
    _plain,
    _STR,
    _str_keys,
    event_value,
    fill_namespace,
    namespace,
    window_counts,
)
from .ruleset import EvalError, Expr, Ruleset, Trigger, _json, _template_exprs, cel_env, flatten, render_payload

#: Reuse a condition's result when its inputs equal those of an earlier evaluation (see
#: "Incremental evaluation" in the module docstring). ``False``: evaluate every condition every time.
INCREMENTAL = True
#: Build only the names the expressions read (``False``: the full :func:`namespace` at every
#: evaluation, the reference behaviour; for tests).
LAZY_NAMESPACE = True
#: Distinct inputs remembered per group of expressions (the segments' conditions, the conditions
#: of one event type's triggers, one trigger's condition; a quarter of it for one payload), per
#: ruleset.
MEMO_ENTRIES = 4096
#: Every key the engine's ``extra`` can be asked for (:data:`clickpulse.rules.namespace.EXTRA_KEYS`).
EXTRA_NAMES: frozenset[str] = frozenset(EXTRA_KEYS.values())


@dataclass(frozen=True)
class SegmentChange:
    """A user entered or left a segment (``schemas/segment_change.v1.json``)."""

    user_key: str
    segment: str
    change: str  # "entered" | "exited"
    at_ms: int
    rules_version: str

    def to_record(self) -> dict[str, Any]:
        return {"schema_version": 1, "user_key": self.user_key, "segment": self.segment, "change": self.change,
                "event_time": to_rfc3339(self.at_ms), "event_time_ms": self.at_ms,
                "rules_version": self.rules_version}


@dataclass
class RuleContext:
    """What an evaluation needs besides the user's state.

    Attributes
    ----------
    ruleset
        The active rules.
    segment_active
        ``name -> bool``: the segment has at least ``min_size`` members (the engine's counts).
    extra
        ``extra(state, at_ms, names) -> Mapping``: the namespace values the engine computes from
        its models and population, as of event time ``at_ms`` (epoch ms). ``names`` is a non-empty
        ``frozenset`` of the keys wanted, a subset of :data:`EXTRA_NAMES`: ``"engagement"``
        (``scores.engagement``, float >= 0), ``"p_purchase"`` (``scores.p_purchase``, 0-1),
        ``"tier"`` (``tier``, str), ``"conversion_user"`` (``conversion.user``, 0-1). The
        mapping holds at least those of ``names`` the engine can compute (a missing one gets
        its neutral default: 0.0, 0.5, ``"medium"``, 0.5); each value must not depend on which
        other names were asked for. It is called only when an expression being evaluated reads
        one of them (never with an empty set), possibly more than once per evaluation with
        different names. ``None``: every one is its default.
    assumed_consent
        Consent purposes taken as granted for a user who never sent a ``consent`` event.
    bots
        Bot-detection thresholds.
    created_at
        Wall-clock publication time of the actions (RFC 3339); with ``payload.recommendations`` (from
        the worker's in-memory model) their only fields that can differ when a decision is re-published.
    incremental
        Reuse unchanged conditions' results (module docstring); ``None``: :data:`INCREMENTAL`.
    recommend
        ``recommend(state, trigger name, at_ms) -> list | None``: recommended items for the
        action a trigger is firing (the engine's item-to-item model, :mod:`clickpulse.recs`), put
        in its payload as ``recommendations`` (after the rules file's payload, which it
        overrides under that key); ``None`` (returned, or as the field): nothing added.
    """

    ruleset: Ruleset
    segment_active: Callable[[str], bool] = lambda _name: True
    extra: Callable[[UserState, int, frozenset[str]], Mapping[str, Any]] | None = None
    #: ``(segment, +1 | -1)`` as soon as a user enters / leaves it, so that the size the gate
    #: sees includes the user who just entered
    count_member: Callable[[str, int], None] | None = None
    assumed_consent: frozenset[str] = frozenset()
    bots: BotConfig = field(default_factory=BotConfig)
    created_at: str = ""
    incremental: bool | None = None
    recommend: Callable[[UserState, str, int], list[Any] | None] | None = None
    #: ``experiment -> {arm: (exposed users, converted users)}`` over the engine's users, for a
    #: ``thompson`` allocation (:mod:`clickpulse.experiments.bandit`); ``None``: no data yet
    arm_counts: Callable[[str], Mapping[str, tuple[int, int]]] | None = None

    @property
    def hold_ms(self) -> int:
        """How long a marketing (``requires_consent``) event/segment decision is held (ms)."""
        return max(self.bots.cart_window_ms, self.bots.events_window_ms)


@dataclass
class Outcome:
    """What one evaluation decided."""

    actions: list[dict[str, Any]] = field(default_factory=list)
    changes: list[SegmentChange] = field(default_factory=list)
    decisions: list[tuple[str, str]] = field(default_factory=list)  # (trigger, outcome)
    errors: list[EvalError] = field(default_factory=list)
    timer_skipped_late: int = 0
    bot_flagged: str | None = None  # the reason, when this event made the user a bot
    #: first exposures of the user to an experiment decided here:
    #: ``(experiment, arm, at_ms, action_id)`` (:mod:`clickpulse.experiments.attribution`)
    exposures: list[tuple[str, str, int, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- one evaluation


def _strict(v: Any) -> Any:
    """A hashable image of a ``dyn`` value that tells apart what CEL tells apart (1, 1.0 and
    true; 0.0 and -0.0; the order of a list or a map)."""
    t = type(v)
    if t is dict:
        return dict, tuple((k, _strict(x)) for k, x in v.items())
    if t is list:
        return list, tuple(_strict(x) for x in v)
    if t is float:
        return float, v, math.copysign(1.0, v)
    return t, v


def _double(v: float) -> Any:
    return v if v else (v, math.copysign(1.0, v))


def _items(v: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(v.items())


#: CEL type -> hashable image of a value of that type, exact for CEL (None: the value itself; the
#: namespace gives these types exactly: int, str, bool); other types: :func:`_strict`
_IMAGES: dict[str, Callable[[Any], Any] | None] = {
    "int": None, "string": None, "bool": None, "double": _double, "list<string>": tuple,
    "map<string, int>": _items, "map<string, bool>": _items,
}


def _count_image(types: frozenset[str] | None, spans: frozenset[str] | None) -> Callable[[Any], Any]:
    tkeys = None if types is None else tuple(sorted(types))
    skeys = None if spans is None else tuple(sorted(spans))

    def image(counts: dict[str, dict[str, int]]) -> Any:
        out = []
        for t in (counts if tkeys is None else tkeys):
            d = counts.get(t)
            if d is None:
                out.append((t, None))
            else:
                out.append((t, tuple(d.items()) if skeys is None else tuple([d.get(s) for s in skeys])))
        return tuple(out)
    return image


def _walk(v: Any, path: tuple[str, ...]) -> Any:
    """Image of what the key path ``path`` reaches in the plain map ``v``."""
    for i, k in enumerate(path):
        if type(v) is not dict:
            return "leaf", i, _strict(v)
        if k not in v:
            return "absent", i
        v = v[k]
    return _strict(v)


def _event_image(paths: frozenset[tuple[str, ...]]) -> Callable[[Any], Any]:
    ordered = tuple(sorted(paths))
    return lambda v: tuple([_walk(v, path) for path in ordered])


def _count_key(types: frozenset[str] | None, spans: frozenset[str] | None) -> Callable[..., Any]:
    """Image of ``window_counts(st, at, types, spans)`` (:func:`_count_image` of it), computed
    without building it."""
    if types is None:
        image = _count_image(types, spans)
        return lambda st, at, *_: image(window_counts(st, at, types, spans))
    keys = tuple(sp for sp in SPANS if spans is None or sp in spans)
    picked = tuple(sorted(spans)) if spans is not None else None
    zero = tuple(0 for _ in keys) if picked is None else tuple(0 if sp in keys else None for sp in picked)
    # per type: (type, the image when the user never had it)
    plan = tuple((t, (t, (tuple(zip(keys, zero)) if picked is None else zero) if t in CANONICAL_TYPES else None))
                 for t in sorted(types))
    wanted = keys if picked is None else tuple(sp if sp in keys else None for sp in picked)
    if picked is not None and types <= CANONICAL_TYPES:
        # the common case (count.add_to_cart["7d"]...): canonical types, known spans. Seen or
        # not, a canonical type's image is its counts (0 when unseen), so no ring is scanned;
        # each count is Windows.count's sum, inlined (tests check it equals window_counts')
        spec = tuple((t, tuple(None if sp is None else SPANS[sp] for sp in wanted)) for t in sorted(types))

        def canonical_key(st: UserState, at: int, *_: Any) -> Any:
            rings = st.windows.rings
            out = []
            for t, spans_of in spec:
                counts = []
                for span in spans_of:
                    if span is None:
                        counts.append(None)
                        continue
                    ring, width, n = span
                    buckets = rings[ring].get(t)
                    if not buckets:
                        counts.append(0)
                        continue
                    hi = at // width if ring != "d" else local_day(at)
                    lo = hi - n
                    counts.append(sum([c for b, c in buckets.items() if lo < b <= hi]))
                out.append((t, tuple(counts)))
            return tuple(out)
        return canonical_key

    def key(st: UserState, at: int, *_: Any) -> Any:
        windows = st.windows
        rings = windows.rings.values()
        count = windows.count
        out = []
        for t, unseen in plan:
            for ring in rings:
                if ring.get(t):
                    if picked is None:
                        out.append((t, tuple([(sp, count(t, sp, at)) for sp in wanted])))
                    else:
                        out.append((t, tuple([None if sp is None else count(t, sp, at) for sp in wanted])))
                    break
            else:
                out.append(unseen)
        return tuple(out)
    return key


def _raw_walk(v: Any, path: tuple[str, ...], plain: bool, depth: int = 0) -> Any:
    """``_walk(_plain(v), path)`` (``_walk(v, path)`` when ``plain``) without copying ``v``; the
    positions it reports count from ``depth``."""
    for i, k in enumerate(path, depth):
        if not plain:
            if type(v) is dict and _str_keys(v):  # _plain(v)[k] is _plain(v[k])
                if k not in v:
                    return "absent", i
                v = v[k]
                continue
            v = _plain(v)
            plain = True
        if type(v) is not dict:
            return "leaf", i, _strict(v)
        if k not in v:
            return "absent", i
        v = v[k]
    return _strict(v if plain else _plain(v))


def _event_key(paths: frozenset[tuple[str, ...]]) -> Callable[..., Any]:
    """Image of ``event_value(ev, at, paths)`` (:func:`_event_image` of it), without building it."""
    ordered = tuple(sorted(paths))

    def path_image(ev: Mapping[str, Any] | None, at: int, path: tuple[str, ...]) -> Any:
        head, rest = path[0], path[1:]
        if head == "type":
            return _raw_walk(str(ev.get("type", "")) if ev is not None else "", rest, True, 1)
        if head == "timestamp_ms":
            return _raw_walk(int(ev.get("timestamp_ms", at)) if ev is not None else int(at), rest, True, 1)
        if head == "properties" or head == "context":
            raw = ev.get(head) if ev is not None else None
            return _raw_walk(raw, rest, False, 1) if isinstance(raw, Mapping) else _raw_walk({}, rest, True, 1)
        return "absent", 0

    if len(ordered) == 1 and len(ordered[0]) == 2 and ordered[0][0] in ("properties", "context"):
        (head, key), = ordered  # e.g. event.properties.category: the common case, faster

        def one(st: UserState, at: int, s: Any, sc: Any, segs: Any, ev: Mapping[str, Any] | None, x: Any) -> Any:
            raw = ev.get(head) if ev is not None else None
            if type(raw) is dict and set(map(type, raw)) <= _STR:  # (_str_keys, inlined)
                v = raw.get(key, _UNREAD)
                if v is _UNREAD:
                    return (("absent", 1),)
                t = type(v)
                if t is str or t is int or t is bool or v is None:
                    return ((t, v),)
            return (path_image(ev, at, ordered[0]),)
        return one
    return lambda st, at, s, sc, segs, ev, x: tuple([path_image(ev, at, path) for path in ordered])


def _raw_get(v: Any, path: tuple[str, ...], plain: bool) -> Any:
    """What ``_plain(v)`` (``v`` when ``plain``) has at the key path ``path``, or ``_UNREAD``."""
    for k in path:
        if not plain:
            if type(v) is dict and _str_keys(v):
                if k not in v:
                    return _UNREAD
                v = v[k]
                continue
            v = _plain(v)
            plain = True
        if type(v) is not dict or k not in v:
            return _UNREAD
        v = v[k]
    return v if plain else _plain(v)


def _event_path_value(ev: Mapping[str, Any] | None, at: int, path: tuple[str, ...]) -> Any:
    """The value of the ``event`` name at ``path`` (``_UNREAD`` when it has none)."""
    head, rest = path[0], path[1:]
    if head == "type":
        return _raw_get(str(ev.get("type", "")) if ev is not None else "", rest, True)
    if head == "timestamp_ms":
        return _raw_get(int(ev.get("timestamp_ms", at)) if ev is not None else int(at), rest, True)
    if head == "properties" or head == "context":
        raw = ev.get(head) if ev is not None else None
        return _raw_get(raw, rest, False) if isinstance(raw, Mapping) else _raw_get({}, rest, True)
    return _UNREAD


_NO_ENTRY = ("no entry",)  # (an image: never equal to a value's image)


def _key_fn(deps: Deps) -> Callable[[_Point], Any]:
    """``point -> hashable image of the values of the names deps reads`` at that point, computed
    from the state with the namespace's own builders (equal images: the same values for CEL;
    ``event`` only along ``deps.event_paths``, which must not be None; a map of
    ``deps.partial_maps`` only at the keys it is read at)."""
    getters: list[Callable[..., Any]] = []
    maps: list[tuple[Callable[..., Any], tuple[str, ...], tuple[tuple[str, ...], ...], Any, Any]] = []
    event_get = None
    ordered: tuple[tuple[str, ...], ...] = ()
    for n in sorted(deps.names):
        if n == "count":
            getters.append(_count_key(deps.count_types, deps.count_spans))
        elif n == "event":
            assert deps.event_paths is not None
            event_get = _event_key(deps.event_paths)
            ordered = tuple(sorted(deps.event_paths))  # the order of its images
        elif n in deps.partial_maps:
            sig = VARIABLES[n]
            reads = [(kind, k) for name, kind, k in deps.map_reads if name == n]
            maps.append((_BUILDERS[n], tuple(sorted(k for kind, k in reads if kind == "k")),
                         tuple(sorted(k for kind, k in reads if kind == "e")),
                         _strict if sig.endswith("dyn>") else _identity, _IMAGES.get(sig) or _strict))
        else:
            build = _BUILDERS[n]
            conv = _IMAGES.get(VARIABLES[n], _strict)
            if conv is None:
                getters.append(build)
            elif conv is _double:  # (inlined: one call less)
                getters.append(lambda st, at, s, sc, segs, ev, x, b=build:
                               v if (v := b(st, at, s, sc, segs, ev, x)) else (v, math.copysign(1.0, v)))
            else:
                getters.append(lambda st, at, s, sc, segs, ev, x, b=build, c=conv: c(b(st, at, s, sc, segs, ev, x)))
    keys = deps.extra_keys
    reads_segments = "segments" in deps.names
    parts = tuple(getters)
    if not maps and event_get is None:
        if len(parts) == 1:
            only = parts[0]
            return lambda p: only(p.st, p.at, p.st.session, None, p.visible() if reads_segments else (), p.event,
                                  p.extras(keys) if keys else _NO_EXTRA)
        if len(parts) == 2 and not reads_segments:  # unrolled (a frequent shape)
            first, second = parts

            def key2(p: _Point) -> Any:
                st, at, ev = p.st, p.at, p.event
                s = st.session
                x = p.extras(keys) if keys else _NO_EXTRA
                return first(st, at, s, None, (), ev, x), second(st, at, s, None, (), ev, x)
            return key2
    where = {path: i for i, path in enumerate(ordered)}
    if not parts and not keys and not reads_segments and event_get is not None and len(ordered) == 1 \
            and len(maps) == 1 and not maps[0][1] and maps[0][2] == ordered:
        # event.P and a map read only at the key event.P gives (category_views[event.properties.category]):
        # the same image as key() below, with less work
        (build, _consts, _paths, entry, whole), = maps

        def key_one_map(p: _Point) -> Any:
            st, at, ev = p.st, p.at, p.event
            images = event_get(st, at, None, None, (), ev, _NO_EXTRA)
            image = images[0]
            m = build(st, at, st.session, None, (), ev, _NO_EXTRA)
            if type(image) is tuple and len(image) == 2 and image[0] is str:
                item = entry(m[image[1]]) if image[1] in m else _NO_ENTRY
            else:
                item = ("whole", whole(m))
            return (item,), images
        return key_one_map

    def key(p: _Point) -> Any:
        st, at, ev = p.st, p.at, p.event
        s = st.session
        segs = p.visible() if reads_segments else ()
        x = p.extras(keys) if keys else _NO_EXTRA
        out = []
        for get in parts:
            out.append(get(st, at, s, None, segs, ev, x))
        images = event_get(st, at, s, None, segs, ev, x) if event_get is not None else ()
        for build, consts, paths, entry, whole in maps:
            m = build(st, at, s, None, segs, ev, x)
            items = [entry(m[k]) if k in m else _NO_ENTRY for k in consts]
            for path in paths:
                i = where.get(path)
                image = images[i] if i is not None else _strict(_event_path_value(ev, at, path))
                # an exact string key: its entry; anything else (absent, not a string): the whole map
                if type(image) is tuple and len(image) == 2 and image[0] is str:
                    items.append(entry(m[image[1]]) if image[1] in m else _NO_ENTRY)
                else:
                    items.append(("whole", whole(m)))
            out.append(tuple(items))
        out.append(images)
        return tuple(out)
    return key


_NO_EXTRA: dict[str, Any] = {}


def _identity(v: Any) -> Any:
    return v


def _union_deps(exprs: Any) -> Deps:
    out = NONE
    for e in exprs:
        out = out | e.deps
    return out


_UNREAD: Any = object()  # a name not read / not built


def _whole_event(e: Expr) -> bool:
    return "event" in e.deps.names and e.deps.event_paths is None


class _Group:
    """Expressions evaluated together at one point, and their results remembered by their
    inputs: the segments' conditions, the conditions of one event type's triggers, one
    trigger's condition, one payload's values. One that reads all of ``event`` (not only through
    constant keys) is never remembered: every event differs."""

    __slots__ = ("all_names", "builders", "cache", "count", "covers", "event", "exprs", "extra", "guards", "key",
                 "live", "live_names", "memo", "memo_names", "plain", "segments")

    def __init__(self, exprs: Sequence[Expr], covers: Sequence[_Group] = ()) -> None:
        self.exprs = tuple(exprs)
        self.covers = (self, *covers)  # groups whose names building this one builds
        deps = _union_deps(self.exprs)
        self.all_names = deps.names
        self.plain = tuple(sorted(n for n in deps.names if n not in ("count", "event")))
        self.builders = tuple((n, _BUILDERS[n]) for n in self.plain)
        self.extra = deps.extra_keys
        self.segments = "segments" in deps.names
        self.count = (deps.count_types, deps.count_spans) if "count" in deps.names else None
        self.event = deps.event_paths if "event" in deps.names else _UNREAD  # None: all of it
        self.memo = tuple(i for i, e in enumerate(self.exprs) if not _whole_event(e))
        self.live = tuple(i for i, e in enumerate(self.exprs) if _whole_event(e))
        mdeps = _union_deps(self.exprs[i] for i in self.memo)
        self.memo_names = mdeps.names
        self.live_names = _union_deps(self.exprs[i] for i in self.live).names
        self.key = _key_fn(mdeps)
        self.cache: dict[Any, Any] = {}
        # one condition with has(event.P) conjuncts: (the image of P when absent, its image function)
        self.guards = tuple(((("absent", len(path) - 1),), _event_key(frozenset({path})))
                            for path in sorted(self.exprs[0].guards)) if len(self.exprs) == 1 else ()

    def remember(self, key: Any, value: Any, share: int = 1) -> None:
        """Remember ``value`` for ``key`` (at most ``MEMO_ENTRIES // share`` entries: the oldest go)."""
        cache = self.cache
        while len(cache) >= max(1, MEMO_ENTRIES // share):
            try:
                del cache[next(iter(cache))]  # the oldest
            except (KeyError, RuntimeError, StopIteration):  # changed by another thread: try again
                continue
        cache[key] = value


def _runtime(rs: Ruleset) -> dict[str, Any]:
    """The evaluator's per-ruleset data (groups and their remembered results)."""
    rt = rs.runtime
    if not rt:
        seg_exprs = [seg.when for seg in rs.segments]
        segments = _Group(seg_exprs)
        events = {etype: _Group([t.when for t in trigs]) for etype, trigs in rs.event_triggers.items()}
        when = {t.name: _Group([t.when]) for t in rs.triggers}
        rt.update(
            by_name={t.name: t for t in rs.triggers},
            timeouts=tuple((trig, trig.on.timeout) for trig in rs.triggers if trig.on.timeout is not None),
            timeout_names=tuple(trig.name for trig in rs.triggers if trig.on.timeout is not None),
            # event type -> the timeouts it arms or answers: (trigger, timeout, delay ms, answers?)
            timeouts_on={},
            segments=segments,
            events=events,
            when=when,
            payload={t.name: _Group(_template_exprs(t.action.payload)) for t in rs.triggers},
            # (trigger, variant) -> its payload group, for experiment variants with their own payload
            vpayload={(t.name, v.name): _Group(_template_exprs(v.payload)) for t in rs.triggers
                      if t.experiment is not None for v in t.experiment.variants if v.payload is not None},
        )
    return rt


def _within(need: frozenset[Any] | None, have: frozenset[Any] | None) -> bool:
    return have is None or (need is not None and need <= have)


def _or(a: frozenset[Any] | None, b: frozenset[Any] | None) -> frozenset[Any] | None:
    return None if a is None or b is None else a | b


class _Point:
    """One evaluation of a user: the state as of ``at`` (after ``event``, or at a timer's due
    time with ``event`` None), the names built so far (flat) and a CEL activation over them."""

    # what is not set per instance starts as these (few attributes to set: one per evaluation)
    act: Any = None
    act_names: frozenset[str] = frozenset()
    act_count: Any = None  # the flat["count"] and flat["event"] objects the activation holds
    act_event: Any = None
    count_cov: tuple[Any, Any] | None = None  # types and spans flat["count"] has
    event_cov: Any = _UNREAD  # paths flat["event"] has (None: all)
    done: set[_Group] | None = None  # groups whose names are all built
    x: Mapping[str, Any] | None = None  # the engine's extra values given so far (never changed)
    asked: frozenset[str] | None = None  # and the keys asked for
    shown: list[str] | None = None  # the active segments of ``seg``

    def __init__(self, st: UserState, at: int, ctx: RuleContext, event: Mapping[str, Any] | None,
                 incremental: bool) -> None:
        self.st = st
        self.at = at
        self.ctx = ctx
        self.event = event
        self.incremental = incremental
        self.seg: list[str] = st.rules.get("seg", _NOTHING)  # membership the ``segments`` name shows
        self.flat: dict[str, Any] = {}

    def visible(self) -> list[str]:
        """The user's segments that are active (the ``segments`` name)."""
        if self.shown is None:
            active = self.ctx.segment_active
            self.shown = [s for s in self.seg if active(s)]
        return self.shown

    def _visible(self) -> list[str]:
        return list(self.visible())

    def extras(self, keys: frozenset[str]) -> Mapping[str, Any]:
        """The engine's extra values, having asked for ``keys`` (each key asked once per point)."""
        asked = self.asked
        extra = self.ctx.extra
        if asked is None:  # the first time (the common case): just these
            self.asked = keys
            self.x = x = extra(self.st, self.at, keys) if extra is not None else _NO_EXTRA
            return x
        if keys <= asked:
            return self.x  # type: ignore[return-value]
        missing = keys - asked
        self.asked = asked | missing
        if extra is not None:
            merged = dict(self.x or ())
            merged.update(extra(self.st, self.at, frozenset(missing)))
            self.x = merged
        return self.x  # type: ignore[return-value]

    def need(self, g: _Group) -> None:
        """Build the names ``g`` reads that are not built yet."""
        done = self.done
        if done is None:
            done = self.done = set()
        elif g in done:
            return
        done.update(g.covers)
        flat = self.flat
        if not flat and LAZY_NAMESPACE:  # the first group of this point (the common case): all of it
            st, at, ev = self.st, self.at, self.event
            x = self.extras(g.extra) if g.extra else _NO_EXTRA
            s = st.session
            segs = self._visible() if g.segments else ()
            for name, build in g.builders:
                flat[name] = build(st, at, s, None, segs, ev, x)
            if g.count is not None:
                flat["count"] = window_counts(st, at, g.count[0], g.count[1])
                self.count_cov = g.count
            if g.event is not _UNREAD:
                flat["event"] = event_value(ev, at, g.event)
                self.event_cov = g.event
            return
        missing = [n for n in g.plain if n not in flat]
        count = g.count
        if count is not None:
            cov = self.count_cov
            if cov is None:
                missing.append("count")
            elif not (_within(count[0], cov[0]) and _within(count[1], cov[1])):
                count = (_or(cov[0], count[0]), _or(cov[1], count[1]))  # rebuilt with both
                missing.append("count")
        paths = g.event
        if paths is not _UNREAD:
            cov = self.event_cov
            if cov is _UNREAD:
                missing.append("event")
            elif not _within(paths, cov):
                paths = _or(cov, paths)
                missing.append("event")
        if not missing:
            return
        ctx = self.ctx
        if not LAZY_NAMESPACE:  # the reference: everything, once
            extra = ctx.extra(self.st, self.at, EXTRA_NAMES) if ctx.extra is not None else None
            self.flat = flatten(namespace(self.st, self.at, segments=self._visible(), event=self.event, extra=extra))
            self.count_cov = (None, None)
            self.event_cov = None
            return
        keys = frozenset([EXTRA_KEYS[n] for n in missing if n in EXTRA_KEYS])
        extra = self.extras(keys) if keys else None
        fill_namespace(flat, self.st, self.at, missing, None if count is None else count[0],
                       None if count is None else count[1], paths, None,
                       self._visible() if "segments" in missing else (), self.event, extra)
        if "count" in missing:
            self.count_cov = count
        if "event" in missing:
            self.event_cov = paths

    def activation(self, names: frozenset[str]) -> Any:
        """A CEL activation holding at least ``names`` (built: call :meth:`need` first)."""
        flat = self.flat
        if self.act is not None:
            if names <= self.act_names and ("count" not in names or flat["count"] is self.act_count) \
                    and ("event" not in names or flat["event"] is self.act_event):
                return self.act
            names = names | self.act_names
        if not LAZY_NAMESPACE:
            names = frozenset(flat)
        self.act = cel_env().Activation({n: flat[n] for n in names})
        self.act_names = names
        self.act_count = flat.get("count")
        self.act_event = flat.get("event")
        return self.act

    def set_segments(self, seg: list[str]) -> None:
        """The membership changed (the engine's counts were updated already)."""
        self.seg = seg
        self.shown = None
        if "segments" in self.flat:
            if LAZY_NAMESPACE:
                del self.flat["segments"]
                self.done = None
            else:
                self.flat["segments"] = self._visible()
        if "segments" in self.act_names:
            self.act = None
            self.act_names = frozenset()


def _eval_bool(expr: Expr, act: Any) -> tuple[bool, str | None]:
    """(value, runtime error) of a condition: exactly what
    :func:`~clickpulse.rules.ruleset.evaluate_condition` answers and reports."""
    try:
        value = expr.program.eval(act)
        plain = value.plain_value()
        if type(plain) is bool:  # a bool value (an error's plain value is its message)
            return plain, None
        if value.type().name() == "ERROR":
            return False, str(value.value())
        result = _json(plain)
    except Exception as err:  # noqa: BLE001 - a rule must never take the stream down
        return False, f"{type(err).__name__}: {err}"
    if isinstance(result, bool):
        return result, None
    return False, f"the condition gave {result!r}, not a bool"


def _results(p: _Point, g: _Group) -> Sequence[tuple[bool, str | None]]:
    """(value, runtime error) of each condition of ``g`` at ``p``, re-used when remembered."""
    exprs = g.exprs
    if not p.incremental:
        p.need(g)
        act = p.activation(g.all_names)
        return [_eval_bool(e, act) for e in exprs]
    if g.guards:  # has(event.P) && ...: false, without reading anything else, when P is absent
        st, at, ev = p.st, p.at, p.event
        for absent, image in g.guards:
            if image(st, at, None, None, (), ev, None) == absent:
                return _FALSE
    hit = None
    if g.memo:
        key = g.key(p)
        try:
            hit = g.cache.get(key)
        except TypeError:  # an unhashable odd value (not from the namespace's builders): not remembered
            key = _UNREAD
        if hit is None:
            p.need(g)
            act = p.activation(g.memo_names)
            hit = tuple([_eval_bool(exprs[i], act) for i in g.memo])
            if key is not _UNREAD:
                g.remember(key, hit)
        if not g.live:
            return hit
    p.need(g)
    out: list[Any] = [None] * len(exprs)
    if hit is not None:
        for j, i in enumerate(g.memo):
            out[i] = hit[j]
    act = p.activation(g.live_names)
    for i in g.live:
        out[i] = _eval_bool(exprs[i], act)
    return out


_FALSE = ((False, None),)


def _evaluate(p: _Point, g: _Group) -> list[tuple[bool, str | None]]:
    p.need(g)
    act = p.activation(g.all_names)
    return [_eval_bool(e, act) for e in g.exprs]


def _condition(p: _Point, trig: Trigger, out: Outcome) -> bool:
    met, reason = _results(p, _runtime(p.ctx.ruleset)["when"][trig.name])[0]
    if reason is not None:
        out.errors.append(EvalError(trig.when.rule, trig.when.field, reason))
    return met


def _copy(v: Any) -> Any:
    t = type(v)
    if t is dict:
        return {k: _copy(x) for k, x in v.items()}
    if t is list:
        return [_copy(x) for x in v]
    return v


def _payload(p: _Point, trig: Trigger, errors: list[EvalError], variant: Any = None) -> Any:
    """The trigger's payload at ``p`` (:func:`~clickpulse.rules.ruleset.render_payload`),
    re-used (a copy) when its inputs equal remembered ones. ``variant``: an experiment
    :class:`~clickpulse.experiments.assignment.Variant` with its own payload template."""
    if variant is not None and variant.payload is not None:
        template = variant.payload
        g = _runtime(p.ctx.ruleset)["vpayload"][(trig.name, variant.name)]
    else:
        template = trig.action.payload
        g = _runtime(p.ctx.ruleset)["payload"][trig.name]
    if not g.exprs:
        return render_payload(template, None, errors)
    key = None
    if p.incremental and not g.live:
        key = g.key(p)
        try:
            hit = g.cache.get(key)
        except TypeError:  # an unhashable odd value: not remembered
            key = hit = None
        if hit is not None:
            if hit[1]:
                errors.extend(hit[1])
            return dict(hit[0]) if hit[2] else _copy(hit[0])
    p.need(g)
    mine: list[EvalError] = []
    payload = render_payload(template, p.activation(g.all_names), mine)
    errors.extend(mine)
    if key is not None:  # (a map of plain values is copied with dict(); payloads can be large: fewer of them)
        flat = type(payload) is dict and all(type(v) in _SCALARS for v in payload.values())
        g.remember(key, (_copy(payload), tuple(mine), flat), 4)
    return payload


_SCALARS = frozenset({str, int, float, bool, type(None)})


# --------------------------------------------------------------------------- decisions


def _tstate(st: UserState, name: str) -> dict[str, Any]:
    return st.rules.setdefault("t", {}).setdefault(name, {})


def _session_id(st: UserState, at_ms: int) -> int | None:
    """The id of the session ``at_ms`` falls in (or the latest one that started before it)."""
    for s in (st.session, st.prev_session):
        if s is not None and s.start_ms <= at_ms:
            return s.sid
    return None if st.session is None else st.session.sid


def consent_granted(st: UserState, purpose: str, assumed: frozenset[str] = frozenset()) -> bool:
    """True when the user's latest consent decision for ``purpose`` grants it (or, with no
    decision at all for it, when ``purpose`` is in ``assumed``)."""
    d = st.consent.get(purpose)
    return purpose in assumed if d is None else bool(d[0])


def _gate(st: UserState, trig: Trigger, at_ms: int, ctx: RuleContext) -> str | None:
    if "flag" in st.rules.get("bot", _EMPTY):  # is_bot
        return "bot"
    if trig.requires_consent is not None and not consent_granted(st, trig.requires_consent, ctx.assumed_consent):
        return "consent"
    ts = _tstate(st, trig.name)
    if trig.cooldown_s > 0 and ts.get("lf") is not None and at_ms - ts["lf"] < trig.cooldown_s * 1000:
        return "cooldown"
    once = trig.once_per
    if once is None:
        return None
    if once == "lifetime" and ts.get("n"):
        return "once_per"
    if once == "session" and ts.get("n") and ts.get("ls") == _session_id(st, at_ms):
        return "once_per"
    if once == "day" and ts.get("lf") is not None and local_day(ts["lf"]) == local_day(at_ms):
        return "once_per"
    if once == "episode" and ts.get("e") is not None and ts.get("fe") == ts.get("e"):
        return "once_per"
    return None


_EMPTY: dict[str, Any] = {}


_RFC3339_END = 253_402_300_800_000  # 10000-01-01T00:00:00Z


_DAYS: dict[int, str] = {}  # UTC day number -> "YYYY-MM-DD"


def _rfc3339(ts_ms: int) -> str:
    """:func:`~clickpulse.events.contract.to_rfc3339`, exactly, faster (years 1970-9999)."""
    if type(ts_ms) is not int or not 0 <= ts_ms < _RFC3339_END:
        return to_rfc3339(ts_ms)
    sec, milli = divmod(ts_ms, 1000)
    day, sec = divmod(sec, 86_400)
    date = _DAYS.get(day)
    if date is None:
        if len(_DAYS) > 4096:
            _DAYS.clear()
        date = _DAYS[day] = time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))
    hour, sec = divmod(sec, 3600)
    minute, sec = divmod(sec, 60)
    return f"{date}T{hour:02d}:{minute:02d}:{sec:02d}.{milli:03d}Z"


_ACTION_NS = ACTION_NAMESPACE.bytes
_V5_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_V5_SET = (0x8000 << 48) | (5 << 76)


def _action_id_v5(user_key: str, name: str, occurrence: str) -> str:
    """:func:`clickpulse.state.user.action_id` (UUIDv5 of ``user_key|name|occurrence`` in
    ``ACTION_NAMESPACE``, as :func:`uuid.uuid5` computes it), without building a UUID object."""
    digest = hashlib.sha1(_ACTION_NS + f"{user_key}|{name}|{occurrence}".encode()).digest()
    h = "%032x" % ((int.from_bytes(digest[:16], "big") & _V5_CLEAR) | _V5_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# the state's own function unless this one gives exactly its ids (checked once, at import)
_action_id = _action_id_v5 if all(
    _action_id_v5(*x) == action_id(*x) for x in (("u1", "cart_abandonment", "1000"), ("ü-🙂", "t", "e|1"),
                                                  ("", "", ""), ("541312140", "browse_abandonment", "1569888671000"))
) else action_id


def _reason(trig: Trigger, detail: str) -> str:
    return f"trigger {trig.name}: {detail}" + (f" ({trig.description})" if trig.description else "")


def _fire(st: UserState, trig: Trigger, at_ms: int, occurrence: str, detail: str, p: _Point, ctx: RuleContext,
          out: Outcome, at_text: str | None = None) -> None:
    """Gate, then build the action (its payload over ``p``) and record the firing (``at_text``:
    ``at_ms`` in RFC 3339 when known)."""
    blocked = _gate(st, trig, at_ms, ctx)
    if blocked is not None:
        out.decisions.append((trig.name, blocked))
        return
    ts = _tstate(st, trig.name)
    ts["lf"] = at_ms
    ts["ls"] = _session_id(st, at_ms)
    ts["n"] = int(ts.get("n", 0)) + 1
    if ts.get("e") is not None:
        ts["fe"] = ts["e"]
    exp = trig.experiment
    arm = variant = None
    if exp is not None:  # deterministic, sticky arm (clickpulse.experiments.assignment)
        arm = _arm(st, exp, ctx)
        variant = exp.by_name.get(arm)
    payload = _payload(p, trig, out.errors, variant)
    if ctx.recommend is not None:
        recs = ctx.recommend(st, trig.name, at_ms)
        if recs is not None:
            payload = {**(payload if isinstance(payload, dict) else {"value": payload}), "recommendations": recs}
    action = {
        "schema_version": 1,
        "action_id": _action_id(st.key, trig.name, occurrence),
        "type": trig.action.type,
        "user_key": st.key,
        "user_id": st.user_id,
        "anonymous_id": st.anonymous_id,
        "event_time": at_text or _rfc3339(at_ms),
        "event_time_ms": at_ms,
        "reason": _reason(trig, detail),
        "payload": payload if isinstance(payload, dict) else {"value": payload},
        "trigger": trig.name,
        "model_version": None,
        "rules_version": ctx.ruleset.version,
        "created_at": ctx.created_at,
    }
    if exp is not None:  # the holdout's decision is published, flagged not to be delivered
        action["experiment"] = exp.name
        action["variant"] = arm
        action["deliver"] = arm != HOLDOUT
        if expose(st, exp, arm, at_ms):  # type: ignore[arg-type]
            out.exposures.append((exp.name, arm, at_ms, action["action_id"]))  # type: ignore[arg-type]
    if trig.requires_consent is not None and trig.on.kind != "timeout" and ctx.hold_ms > 0:
        st.rules.setdefault("held", []).append([at_ms + ctx.hold_ms, action])
        out.decisions.append((trig.name, "held"))
        return
    out.actions.append(action)
    out.decisions.append((trig.name, "fired"))


def _segments(p: _Point, out: Outcome) -> tuple[list[str], list[str]]:
    """Re-evaluate membership at ``p`` (which then holds the new one); returns (entered, exited)."""
    st, ctx = p.st, p.ctx
    rs = ctx.ruleset
    before = p.seg
    now: list[str] = []
    if not rs.segments and not before:
        return _NOTHING, _NOTHING
    if "flag" not in st.rules.get("bot", _EMPTY) and rs.segments:  # not is_bot
        g = rs.runtime["segments"]
        key = hit = None
        if p.incremental and not g.live:  # the memberships and errors remembered, not the results
            key = g.key(p)
            try:
                hit = g.cache.get(key)
            except TypeError:  # an unhashable odd value: not remembered
                key = None
        if hit is None:
            errors = []
            for seg, (ok, reason) in zip(rs.segments, _results(p, g) if key is None else _evaluate(p, g), strict=True):
                if reason is not None:
                    errors.append(EvalError(seg.when.rule, seg.when.field, reason))
                if ok:
                    now.append(seg.name)
            hit = (now, tuple(errors))  # (the list is never changed: copied below)
            if key is not None:
                g.remember(key, hit)
        if hit[1]:
            out.errors.extend(hit[1])
        if hit[0] == before:
            return _NOTHING, _NOTHING  # unchanged (the common case)
        now = list(hit[0])
    entered = [s for s in now if s not in before]
    exited = [s for s in before if s not in now]
    if entered or exited:
        if now:
            st.rules["seg"] = now
        else:
            st.rules.pop("seg", None)
        for s in entered:
            out.changes.append(SegmentChange(st.key, s, "entered", p.at, rs.version))
            if ctx.count_member is not None:
                ctx.count_member(s, +1)
        for s in exited:
            out.changes.append(SegmentChange(st.key, s, "exited", p.at, rs.version))
            if ctx.count_member is not None:
                ctx.count_member(s, -1)
        p.set_segments(now)  # only membership changed
    return entered, exited


_NOTHING: list[str] = []  # (never appended to)


def _segment_triggers(p: _Point, entered: list[str], exited: list[str], occurrence: str, out: Outcome) -> None:
    if not (entered or exited):
        return
    st, ctx = p.st, p.ctx
    for trig in ctx.ruleset.triggers:
        kind = trig.on.kind
        if kind not in ("segment_enter", "segment_exit"):
            continue
        seg = trig.on.segment
        if seg not in (entered if kind == "segment_enter" else exited):
            continue
        if not ctx.segment_active(seg):  # the size counts the user who just entered / not the one who left
            out.decisions.append((trig.name, "segment_too_small"))
            continue
        if _condition(p, trig, out):
            verb = "entered" if kind == "segment_enter" else "left"
            _fire(st, trig, p.at, f"{kind}|{occurrence}", f"{verb} segment {seg}", p, ctx, out)


def _prune(st: UserState, rs: Ruleset) -> None:
    t = st.rules.get("t")
    if t and not rs.trigger_names.issuperset(t):
        names = rs.trigger_names
        for name in [n for n in t if n not in names]:
            del t[name]
        if not t:
            del st.rules["t"]


def on_event(st: UserState, event: Mapping[str, Any], late: bool, watermark_ms: int | None,
             ctx: RuleContext) -> Outcome:
    """Evaluate the rules after ``event`` was applied to ``st`` (in place: updates ``st.rules``).

    Parameters
    ----------
    st
        The user's state, with the event already applied.
    event
        The canonical event (``type``, ``timestamp_ms``, ``event_id``, ``properties``, ``context``).
    late
        The event was behind the watermark (:class:`clickpulse.state.user.Applied`): it still
        updates bot detection and timeouts, fires nothing.
    watermark_ms
        The partition's watermark before the event (``None`` before any event).
    ctx
        The ruleset and the engine's view (segment sizes, extra namespace values).

    Returns
    -------
    Outcome
        Actions (``schemas/action.v1.json``), segment changes, per-trigger decisions, runtime
        evaluation errors (a failing condition is false, never an exception).
    """
    out = Outcome()
    rs = ctx.ruleset
    t = int(event["timestamp_ms"])
    etype = event["type"]
    rules = st.rules
    rt = rs.runtime or _runtime(rs)
    tmap = rules.get("t")
    if tmap and not rs.trigger_names.issuperset(tmap):
        _prune(st, rs)
    bot = rules.setdefault("bot", {})
    out.bot_flagged = observe_bot(bot, event, ctx.bots)  # type: ignore[arg-type]  (it only reads the event)
    if not bot:
        del rules["bot"]
    # timeouts: arm on A, cancel on B (also for late events: they are facts about the episode)
    relevant = rt["timeouts_on"].get(etype)
    if relevant is None:
        relevant = tuple((trig, to, int(to.within_s * 1000), etype in to.no) for trig, to in rt["timeouts"]
                         if etype == to.after or etype in to.no)
        if len(rt["timeouts_on"]) < 1024:  # (event types are open-ended)
            rt["timeouts_on"][etype] = relevant
    if len(relevant) < len(rt["timeouts"]):  # the others: nothing to do, but drop an emptied state
        tmap = rules.get("t")
        if tmap and {} in tmap.values():
            for name in rt["timeout_names"]:
                if not tmap.get(name, True) and all(name != r[0].name for r in relevant):
                    del tmap[name]
    for trig, to, within_ms, answers in relevant:
        ts = rules.setdefault("t", {}).setdefault(trig.name, {})
        if answers:
            ts["b"] = max(t, ts.get("b", t))
            if ts.get("a") is None or t >= ts["a"]:  # answers every A so far: the episode ends
                for k in ("due", "e", "a"):
                    ts.pop(k, None)
        elif etype == to.after:
            if ts.get("b") is not None and t <= ts["b"]:
                continue  # answered already
            if ts.get("e") is None:  # the episode's identity: its first A to arrive (never moves)
                ts["e"] = t
            ts["a"] = max(t, ts.get("a", t))
            due = ts["a"] + (within_ms if trig.experiment is None else _delay_ms(trig, st, within_ms))
            if trig.once_per == "episode" and ts.get("fe") == ts["e"]:
                ts.pop("due", None)  # this episode has had its action
            elif watermark_ms is not None and due < watermark_ms:
                out.timer_skipped_late += 1  # the window passed unobserved
            else:
                ts["due"] = due
        if not ts:
            del rules["t"][trig.name]
    if rules.get("t") == {}:
        del rules["t"]
    trigs = rs.event_triggers.get(etype, ())
    if not rs.segments and not trigs and "seg" not in rules:
        return out  # nothing to evaluate
    p = _Point(st, t, ctx, event, INCREMENTAL if ctx.incremental is None else ctx.incremental)
    entered, exited = _segments(p, out)
    if late:
        for trig in trigs:
            out.decisions.append((trig.name, "late"))
        return out
    if trigs:
        results = _results(p, rt["events"][etype])
        for trig, (met, reason) in zip(trigs, results):
            if reason is not None:
                out.errors.append(EvalError(trig.when.rule, trig.when.field, reason))
            ts = rules.setdefault("t", {}).setdefault(trig.name, {})
            was = bool(ts.get("m"))
            if met:
                ts["m"] = 1
            else:
                ts.pop("m", None)
            if met and not was:
                at_text = _rfc3339(t)
                _fire(st, trig, t, str(event["event_id"]), f"{etype} at {at_text} and {trig.when.source}", p,
                      ctx, out, at_text)
            if not ts:
                rules["t"].pop(trig.name, None)
    if entered or exited:
        _segment_triggers(p, entered, exited, str(event["event_id"]), out)
    if rules.get("t") == {}:
        del rules["t"]
    return out


def _arm(st: UserState, exp: Any, ctx: RuleContext | None) -> str:
    """The user's arm: the one of their exposure (sticky, also across a reload that changed the
    weights), else the hash's (:meth:`~clickpulse.experiments.assignment.Experiment.assign`),
    with a ``thompson`` allocation drawn over the variants (not for the holdout)."""
    prev = exposure(st, exp.name)
    if prev is not None and (prev[0] in exp.by_name or (prev[0] == HOLDOUT and exp.holdout > 0)):
        return prev[0]
    arm = exp.assign(st.key)
    if exp.allocation == "thompson" and arm != HOLDOUT:
        counts = ctx.arm_counts(exp.name) if ctx is not None and ctx.arm_counts is not None else {}
        arm = thompson_arm(counts, [v.name for v in exp.variants], exp.salt, st.key)
    return arm


def _delay_ms(trig: Trigger, st: UserState, within_ms: int) -> int:
    """A timeout's delay for the user's experiment arm (a variant's ``delay_s``, else ``within_ms``)."""
    exp = trig.experiment
    v = exp.by_name.get(_arm(st, exp, None)) if exp is not None else None
    return within_ms if v is None or v.delay_s is None else int(v.delay_s * 1000)


def next_due(st: UserState) -> int | None:
    """The earliest pending timeout of the user (event time, epoch ms), ``None`` when none."""
    rules = st.rules
    best = None
    t = rules.get("t")
    if t:
        for ts in t.values():
            due = ts.get("due")
            if due is not None and (best is None or due < best):
                best = due
    held = rules.get("held")
    if held:
        for h in held:
            if best is None or h[0] < best:
                best = h[0]
    return best


def on_timers(st: UserState, watermark_ms: int, ctx: RuleContext) -> Outcome:
    """Fire the user's timeouts that ``watermark_ms`` is strictly past, in due-time order, then
    re-evaluate segments as of the latest fired due time. Updates ``st.rules`` in place."""
    out = Outcome()
    rs = ctx.ruleset
    _prune(st, rs)
    held = st.rules.get("held", [])
    if held:
        keep = []
        current = _runtime(rs)["by_name"]
        for due, action in held:
            name = action["trigger"]
            trig = current.get(name)
            if not watermark_ms > due:
                keep.append([due, action])
            elif trig is None:  # removed by a reload while held: a stopped campaign sends nothing
                out.decisions.append((name, "removed"))
            elif is_bot(st.rules.get("bot", {})):
                out.decisions.append((name, "bot"))
            elif trig.requires_consent is not None and \
                    not consent_granted(st, trig.requires_consent, ctx.assumed_consent):
                out.decisions.append((name, "consent"))  # withdrawn while held
            else:
                out.actions.append({**action, "created_at": ctx.created_at})
                out.decisions.append((name, "fired"))
        if keep:
            st.rules["held"] = keep
        else:
            del st.rules["held"]
    due_now = sorted((ts["due"], name) for name, ts in st.rules.get("t", {}).items()
                     if "due" in ts and watermark_ms > ts["due"])
    if not due_now:
        return out
    by_name = _runtime(rs)["by_name"]
    incremental = INCREMENTAL if ctx.incremental is None else ctx.incremental
    last_at = due_now[-1][0]
    p: _Point | None = None
    for due, name in due_now:
        trig = by_name[name]
        ts = _tstate(st, name)
        ts.pop("due", None)
        to = trig.on.timeout
        if to is None:  # no longer a timeout after a reload: its pending timer is dropped
            continue
        if p is None or p.at != due:  # timers due at the same time share one evaluation
            p = _Point(st, due, ctx, None, incremental)
        if _condition(p, trig, out):
            no = " or ".join(to.no)
            a = ts.get("a", due)
            _fire(st, trig, due, str(due),  # the delay the timer was armed with (rules may have changed)
                  f"no {no} within {(due - a) / 1000:g} s after {to.after} at {_rfc3339(a)}", p, ctx, out)
    if p is None or p.at != last_at:
        p = _Point(st, last_at, ctx, None, incremental)
    entered, exited = _segments(p, out)
    _segment_triggers(p, entered, exited, str(last_at), out)
    return out
