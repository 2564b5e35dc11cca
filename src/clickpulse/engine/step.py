"""The batch engine step: event-time state → models → rules for a batch of events, as plain data.

``Engine.step(batch, wall_ms) -> Emitted`` is the whole of clickpulse's per-event logic. It is
broker-free: the table is any mapping ``bytes -> bytes`` (a ``dict`` in tests, the Faust table
in the worker) that the step only **reads**; what changed comes back in
:class:`~clickpulse.engine.emitted.Emitted` (one serialized state per changed user, actions,
segment changes, examples, counters), and the caller writes it (:meth:`Engine.commit`). The
wall clock is passed in.

Unit of work (like a quix-streams state transaction, or bytewax's ``StatefulLogic``)
-------------------------------------------------------------------------------------
* Each user touched by the step is decoded once (or taken from a bounded cache of decoded hot
  users), changed in memory for all of its events in the batch, and encoded once at the end.
* The engine-wide aggregates (partition clocks, timer index, segment sizes, the population
  prior, the count of buffered predictions, the experiments' per-arm counts) are snapshotted at the start of the step and put
  back if the step raises: **a step that raises changes nothing.**
* An event whose processing raises does not take its batch down: the batch is rolled back and
  re-run one event at a time; the failing event is rolled back alone and reported in
  :attr:`Emitted.failed` (the worker dead-letters it with reason ``internal``); every other
  event's effect is as if the failing one had not been there.
* **State size net.** A step that would write a user's state larger than ``max_state_bytes``
  (``CLICKPULSE_MAX_STATE_BYTES``) raises :class:`StateTooLarge` inside the unit of work, so it
  is rolled back and re-run one event at a time like any failure: the event that would take the
  state over the cap is reported in :attr:`Emitted.failed` with reason ``state_too_large`` (the
  user's previous state stands, nothing is produced; the user is not quarantined).
* **Quarantine decision.** An event that fails over its user's stored state but not over a
  fresh one blames the stored state only when a *bare* copy of the event (its type, time and
  identity, without properties and context) fails over the stored state too; otherwise the
  combination of this event with the state is at fault (e.g. a number that overflows only when
  added to the stored total): the event is dead-lettered and the state kept.

Order and determinism
---------------------
Events are applied in input order; after each event the partition's due timers fire (as with
one event per step), so the actions, their ids and event times are the same whatever the batch
size (``tests/unit/test_engine_batch.py``).

Pending timers live inside each user's state (rule timeouts in ``UserState.rules``, model label
deadlines in ``UserState.ml``), so they are in the table's changelog and survive restarts; the
in-memory :class:`~clickpulse.state.clock.TimerIndex` and each partition's maximum event time are
rebuilt from the table by :meth:`Engine.restore` after a rebalance or recovery.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from ..experiments.attribution import arm_counts, attribute, conversion_record, exposure_record
from ..features.engagement import value as engagement_value
from ..models.labels import after_event, before_event, next_due, on_watermark
from ..models.labels import Outcome as ModelOutcome
from ..models.tiers import session_features
from ..observability.metrics import Metrics, type_label
from ..quarantine import REPAIRABLE_FIELDS
from ..records import ActionRecord
from ..rules import triggers
from ..rules.bots import BotConfig, is_bot
from ..rules.ruleset import Ruleset
from ..rules.smoothing import PopulationPrior, fit_prior, posterior_mean
from ..events.control import CONTROL_MAX_AGE_MS
from ..state.clock import END_OF_TIME, PartitionClock, TimerIndex, clock_candidate
from ..state.user import Applied, RecentIds, StateConfig, UserState, apply, id_hash, is_duplicate
from .emitted import Emitted, Failed
from .identity import LINK_TYPES, already_merged, link_keys, merge_into, stub, unsupported_alias

log = logging.getLogger(__name__)


class StateTooLarge(Exception):
    """A step would write a user's state larger than the engine's ``max_state_bytes``."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        super().__init__(f"the user's state would be {size} bytes, above the limit of {limit} "
                         "(CLICKPULSE_MAX_STATE_BYTES); the event was not applied")
        self.key, self.size, self.limit = key, size, limit


#: fields a bare probe event keeps (see Engine._state_at_fault)
_BARE_FIELDS = ("type", "timestamp", "timestamp_ms", "user_key", "user_id", "anonymous_id", "schema_version")
#: model action type -> the task whose model decides it
MODEL_ACTION_TASKS = {"high_intent": "intent", "churn_risk": "churn"}


#: table keys of the partitions' clock logs start with this byte string: never valid UTF-8, so
#: never a user key (user keys are encoded strings)
CLOCK_KEY_PREFIX = b"\xffclock:"
#: batches a partition's clock log remembers (only the newest is used by :meth:`Engine.restore`;
#: the others are kept for inspection)
CLOCK_LOG_LEN = 4


def clock_key(partition: int, place: Callable[[bytes], int]) -> bytes:
    """The table key of ``partition``'s clock log: ``CLOCK_KEY_PREFIX + b"<partition>:<n>"`` with
    the smallest ``n`` that ``place`` (the table's key partitioner) puts on ``partition``, so the
    log lives in the partition's own changelog partition and moves with it."""
    n = 0
    while True:
        key = CLOCK_KEY_PREFIX + f"{partition}:{n}".encode()
        if place(key) == partition:
            return key
        n += 1


def _int_map(obj: Any) -> dict[Any, int]:
    """A clock-log position map with its integer values only (a broken entry never raises)."""
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(v, int) and not isinstance(v, bool)}


def _control_ids(obj: Any) -> dict[str, tuple[int, int | None, int | None]]:
    """The accepted controls of a clock log: ``{"ctl": {id: [issued_at_ms, raw offset,
    source_partitions]}}`` (the last two null when unknown; logs written before they were kept:
    ``{id: issued_at_ms}`` or ``[issued_at_ms, raw offset]``); a broken entry is dropped, never
    raises."""
    if not isinstance(obj, dict):
        return {}

    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    out: dict[str, tuple[int, int | None, int | None]] = {}
    for k, v in obj.items():
        if ok(v):
            out[str(k)] = (v, None, None)
        elif (isinstance(v, list) and len(v) in (2, 3) and ok(v[0])
              and all(x is None or ok(x) for x in v[1:])):
            n = v[2] if len(v) == 3 else None
            out[str(k)] = (v[0], v[1], n if n is None or n >= 1 else None)
    return out


def is_dormant(st: UserState) -> bool:
    """A user whose behavioral state expired (see :meth:`Engine.expire_step`): no session at all."""
    return st.session is None and st.prev_session is None


def dormant(st: UserState) -> UserState:
    """The durable record of ``st``: identifiers, consent decisions and lifetime totals only
    (and its identity links: the guests merged into it, or, for a guest's stub, its customer)."""
    return UserState(key=st.key, partition=st.partition, user_id=st.user_id, anonymous_id=st.anonymous_id,
                     life=st.life, consent=st.consent, merged_into=st.merged_into, merged=st.merged,
                     recent_ids=st.recent_ids if st.merged_into is not None else RecentIds())


def merge_lifetimes(a: Any, b: Any) -> Any:
    """Totals over two disjoint parts of a user's history (before and after a quarantine):
    counts and revenue summed, first/last seen the extremes (``last_wall_ms`` follows last seen)."""
    out = copy.copy(a)
    firsts = [t for t in (a.first_ms, b.first_ms) if t is not None]
    out.first_ms = min(firsts) if firsts else None
    if b.last_ms is not None and (a.last_ms is None or b.last_ms > a.last_ms):
        out.last_ms, out.last_wall_ms = b.last_ms, b.last_wall_ms
    for name in ("events", "sessions", "orders", "converted_sessions"):
        setattr(out, name, getattr(a, name) + getattr(b, name))
    out.revenue = a.revenue + b.revenue
    return out


def merge_consent(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Consent decisions of both: per purpose, the one with the later event time (``[granted,
    time ms]``; ``b`` wins a tie: it is the newer history)."""
    out = {k: list(v) for k, v in a.items()}
    for purpose, dec in b.items():
        mine = out.get(purpose)
        if mine is None or not isinstance(mine[1], int) or (isinstance(dec[1], int) and dec[1] >= mine[1]):
            out[purpose] = list(dec)
    return out


@functools.lru_cache(maxsize=4)
def wall_rfc3339(wall_ms: int) -> str:
    """Wall-clock epoch ms -> RFC 3339 (cached: called with the same value for a whole batch)."""
    return datetime.fromtimestamp(wall_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Tx:
    """The working set of one step: touched users and a snapshot of the aggregates."""

    __slots__ = ("users", "dirty", "deleted", "snapshot")

    def __init__(self, engine: Engine) -> None:
        self.users: dict[str, UserState] = {}   # decoded/working states of users touched
        self.dirty: set[str] = set()             # users whose state must be written
        self.deleted: set[str] = set()
        self.snapshot = engine._aggregates()


class Engine:
    """Event-time processing of one worker's partitions (see the module docstring).

    Parameters
    ----------
    table
        Mapping from ``user_key`` (UTF-8 bytes) to ``UserState.to_bytes()``; read by the step,
        written by :meth:`commit`.
    cfg
        Session gap, de-duplication depth, engagement weights (ms).
    allowed_lateness_ms, idle_timeout_ms, live
        Watermark settings (see :class:`~clickpulse.state.clock.PartitionClock`).
    metrics
        Where :meth:`commit` applies the counters (a fresh registry when ``None``).
    models, model_cfg
        A :class:`clickpulse.models.registry.ModelRegistry` and
        :class:`clickpulse.models.labels.ModelConfig` to score intent/churn and resolve labels;
        ``None`` disables models.
    pending_total_cap
        Bound on buffered unlabeled predictions over all users of this worker.
    rules
        A :class:`clickpulse.rules.ruleset.Ruleset`, or an object with ``current() -> Ruleset``
        (a :class:`clickpulse.rules.ruleset.RulesFile`, reloaded by the worker); ``None``: no
        rules.
    assumed_consent
        Consent purposes taken as granted for users who never sent a ``consent`` event.
    bots
        Bot-detection thresholds (:class:`clickpulse.rules.bots.BotConfig`).
    model_min_class_examples
        A model's actions (``high_intent``, ``churn_risk``) are published only once the model in
        use has learned at least this many examples of each class (0: always).
    model_actions_consent
        The consent purpose a model action (``high_intent``, ``churn_risk``) requires, like a
        rule's ``requires_consent`` (empty: none); bots never get one either.
    cache_users
        Decoded states kept in memory for hot users (least recently used evicted), so a user
        with several events in a row is decoded once; the table stays the source of truth.
    recs, recs_triggers, recs_k
        A :class:`clickpulse.recs.CoOccurrence` learned from this worker's sessions (views
        paired within a session, a purchase's basket: the cart's items and the product; not from
        bots), ``None``: no recommendations; the triggers whose actions get ``recs_k``
        recommended items in their payload (``recommendations``), also on the profile
        (:meth:`profile_extra`). Learned after the event's rules ran (recommend, then learn); a
        step that raises takes its learning back (the model's journal).
    max_state_bytes
        Largest serialized user state an event step may write, bytes (``CLICKPULSE_MAX_STATE_BYTES``;
        see the module docstring, *State size net*).
    """

    def __init__(self, table: MutableMapping[bytes, bytes], cfg: StateConfig, *, allowed_lateness_ms: int,
                 idle_timeout_ms: int, live: bool, metrics: Metrics | None = None,
                 models: Any = None, model_cfg: Any = None, pending_total_cap: int = 1_000_000,
                 rules: Any = None, assumed_consent: frozenset[str] = frozenset(),
                 bots: BotConfig | None = None, model_min_class_examples: int = 0,
                 cache_users: int = 50_000, model_actions_consent: str = "marketing", recs: Any = None,
                 recs_triggers: frozenset[str] = frozenset(), recs_k: int = 5,
                 max_state_bytes: int = 262_144) -> None:
        self.table = table
        self.max_state_bytes = max_state_bytes
        #: while a failed batch is re-run event by event: the states its earlier events wrote
        #: (not committed to the table yet), read before the table (see :meth:`_stored`)
        self._overlay: dict[str, bytes | None] | None = None
        self.cfg = cfg
        self.lateness = allowed_lateness_ms
        self.idle = idle_timeout_ms
        self.live = live
        if metrics is None:
            from prometheus_client import CollectorRegistry
            metrics = Metrics(CollectorRegistry())
        self.metrics = metrics
        self.clocks: dict[int, PartitionClock] = {}
        self.timers: dict[int, TimerIndex] = {}
        self.models = models
        self.mcfg = model_cfg
        self.pending_total_cap = pending_total_cap
        self.pending_predictions = 0
        self.model_min_class_examples = model_min_class_examples
        self.model_consent = model_actions_consent
        self.rules = rules
        self.assumed_consent = frozenset(assumed_consent)
        self.bots = bots or BotConfig()
        self.segment_members: dict[int, dict[str, int]] = {}
        #: other workers' last published member counts per partition (set_remote_segment_counts)
        self.remote_segment_members: dict[int, dict[str, int]] = {}
        self.segment_entries: dict[str, int] = {}      # membership stints started (since start/restore)
        self.segment_conversions: dict[str, int] = {}  # stints with a purchase
        #: partition -> experiment -> arm -> (exposed users, converted users) over the users held
        #: (what a ``thompson`` allocation draws from; rebuilt from the table by :meth:`restore`)
        self.arms: dict[int, dict[str, dict[str, tuple[int, int]]]] = {}
        self.population: dict[int, PopulationPrior] = {}  # users' (converted sessions, sessions)
        self.population_total = PopulationPrior()
        self._prior_key: tuple[float, ...] | None = None
        self._prior = (1.0, 1.0)
        self.rule_errors = 0
        self._logged_rule_errors: set[str] = set()
        self.clock_log: dict[int, collections.deque[dict[str, Any]]] = {}
        #: per partition: {input topic: offset of the newest event whose effect the saved states
        #: hold} (restored from the clock log; see :meth:`redelivered`)
        self.positions: dict[int, dict[str, int]] = {}
        #: per partition: {raw partition: highest raw offset of a forwarded event applied}
        self.sources: dict[int, dict[int, int]] = {}
        self.cache_users = cache_users
        self._cache: dict[str, UserState] = {}
        #: when set (``UserState -> view``, e.g. :func:`clickpulse.metrics.business.user_view`),
        #: each applied event adds ``(view before, view after, event time)`` to ``Emitted.observed``
        self.observe_user: Callable[[UserState], Any] | None = None
        # what the single-event conveniences (process/tick/end_of_input) committed, for drain_*()
        self._examples_out: list[dict[str, Any]] = []
        self._changes_out: list[dict[str, Any]] = []
        self.recs = recs
        self.recs_triggers = frozenset(recs_triggers)
        self.recs_k = recs_k

    # ------------------------------------------------------------------ the step
    def step(self, batch: Sequence[tuple[int, dict[str, Any]]], wall_ms: int, *,
             tick: Iterable[int] = (), received: Sequence[int | None] | None = None) -> Emitted:
        """Process a batch of canonical events, then fire the due timers of ``tick`` partitions.

        Parameters
        ----------
        batch
            ``[(partition, canonical event), ...]`` in arrival order (events of one partition in
            offset order); each event as returned by :func:`clickpulse.events.contract.parse`.
        wall_ms
            Wall-clock time of the step (epoch ms): the actions' ``created_at`` and the live
            clocks' idle advance.
        tick
            Partitions whose due timers should fire after the batch (live mode: idle advance).
        received
            Receive time of each event of ``batch`` (epoch ms: the Kafka record timestamp capped
            at the wall clock; ``None`` or no list: unknown). An event moves its partition's
            watermark to ``min(event time, receive time)`` at most
            (:func:`clickpulse.state.clock.clock_candidate`): no producer can move the engine's
            time ahead of real time.

        Returns
        -------
        Emitted
            Everything the step decided; nothing has been written yet (see :meth:`commit`).

        Raises
        ------
        Exception
            Only from outside an event's own processing (e.g. a timer of the ``tick`` phase);
            then nothing changed.
        """
        tx = _Tx(self)
        em = Emitted()
        try:
            for i, (p, ev) in enumerate(batch):
                em.applied.append(self._event(tx, p, ev, wall_ms, em, None if received is None else received[i]))
            for p in tick:
                self._fire(tx, p, wall_ms, em)
            self._finish(tx, em, self.max_state_bytes if batch else None)
            return em
        except Exception as err:  # noqa: BLE001 - isolate below
            self._rollback(tx)
            if not batch:
                raise
            failure = f"{type(err).__name__}: {err}"
            too_large = isinstance(err, StateTooLarge)
            if len(batch) == 1 and not too_large:
                log.exception("event %s of user %s failed; rolled back", batch[0][1].get("event_id"),
                              batch[0][1].get("user_key"))
        if len(batch) == 1 and too_large:  # the event is refused, the user's state stands
            log.warning("event %s dead-lettered: %s", batch[0][1].get("event_id"), failure)
            em = Emitted(applied=[None])
            em.failed.append(Failed(0, str(batch[0][1].get("user_key")), failure, "state_too_large"))
            if tick:
                em.merge(self.step([], wall_ms, tick=tick))
            return em
        if len(batch) == 1:
            em = self._retry_fresh(batch[0], wall_ms, failure, None if received is None else received[0])
            if em is None:  # the event fails on a fresh state too: the event is at fault
                em = Emitted(applied=[None])
                em.failed.append(Failed(0, str(batch[0][1].get("user_key")), failure))
                em.count("engine_errors")
            if tick:
                em.merge(self.step([], wall_ms, tick=tick))
            return em
        # one event of the batch raised: re-run them one by one, each its own unit of work
        # (later events of a user see the states its earlier ones wrote: the overlay, because a
        # failing event's rollback reloads its user from the stored state)
        out = Emitted()
        self._overlay = {}
        try:
            for i, item in enumerate(batch):
                one = self.step([item], wall_ms, received=None if received is None else [received[i]])
                self._overlay.update(one.changed)
                for f in one.failed:
                    f.index = i
                out.merge(one)
            if tick:
                out.merge(self.step([], wall_ms, tick=tick))
        finally:
            self._overlay = None
        return out

    def _stored(self, key: str) -> bytes | None:
        """The stored state of ``key``: the re-run overlay's, else the table's."""
        ov = self._overlay
        if ov is not None and key in ov:
            return ov[key]
        return self.table.get(key.encode())

    def _retry_fresh(self, item: tuple[int, dict[str, Any]], wall_ms: int, failure: str,
                     received_ms: int | None = None) -> Emitted | None:
        """An event failed over its user's stored state: try it on a fresh state. If that works,
        the stored state is what is broken: it is quarantined (kept in
        :attr:`Emitted.quarantined` for the quarantine topic, counted, logged) and the user goes
        on from the fresh state — one poisoned state never dead-letters all the user's future
        events. Returns ``None`` when the event fails on a fresh state too (or there was no
        stored state): then the event itself is at fault."""
        p, ev = item
        key = ev.get("user_key")
        if not isinstance(key, str):
            return None
        old = self._stored(key)
        if old is None:
            return None
        if not self._state_at_fault(p, ev, wall_ms):
            return None
        tx = _Tx(self)
        em = Emitted()
        try:
            tx.users[key] = UserState(key=key, partition=p)
            em.applied.append(self._event(tx, p, ev, wall_ms, em, received_ms))
            self._quarantine(tx, key, old, failure, "event", wall_ms, em)
            tx.users[key] = tx.users.get(key) or UserState(key=key, partition=p)
            tx.dirty.add(key)
            self._finish(tx, em)
        except Exception:  # noqa: BLE001 - the event is at fault, not the state
            self._rollback(tx)
            return None
        return em

    def _state_at_fault(self, p: int, ev: dict[str, Any], wall_ms: int) -> bool:
        """Whether a bare copy of ``ev`` (:data:`_BARE_FIELDS`, a new event id) fails over the
        user's stored state (decoding, the state step, rules and models, encoding): then the state
        is broken, else ``ev`` is at fault. Changes nothing (rolled back)."""
        bare = {k: ev[k] for k in _BARE_FIELDS if k in ev}
        bare["event_id"] = f"{ev.get('event_id')}#probe"
        tx = _Tx(self)
        try:
            self._event(tx, p, bare, wall_ms, Emitted())
            for key in tx.dirty:
                tx.users[key].to_bytes()
        except Exception:  # noqa: BLE001 - the answer
            return True
        finally:
            self._rollback(tx)
        return False

    def _quarantine(self, tx: _Tx, key: str, old: bytes | None, error: str, stage: str, wall_ms: int,
                    em: Emitted) -> None:
        """Move a user's stored state aside (see :meth:`_retry_fresh`); its contributions to the
        aggregates are taken back when it can still be decoded."""
        log.error("user %s quarantined (%s failed over its stored state: %s); it continues from a fresh state, "
                  "the old one is on the quarantine topic", key, stage, error)
        try:
            prev = None if old is None else UserState.from_bytes(old)
        except Exception:  # noqa: BLE001 - undecodable: nothing to take back
            prev = None
        if prev is not None:
            self._count_population(prev, -1)
            self._count_arms(prev, -1)
            members = self.segment_members.setdefault(prev.partition, {})
            for seg in prev.rules.get("seg", []):
                members[seg] = max(0, members.get(seg, 0) - 1)
        import base64
        em.quarantined[key] = {"schema_version": 1, "user_key": key, "stage": stage, "error": error[:1000],
                               "quarantined_at": wall_rfc3339(wall_ms),
                               "state_b64": None if old is None else base64.b64encode(old).decode()}
        em.count("users_quarantined")

    def commit(self, em: Emitted) -> None:
        """Write a step's state changes to the table and apply its counters to :attr:`metrics`.

        The worker calls this right after :meth:`step` (the table is then the Faust table:
        one changelog record per changed user)."""
        for key, raw in em.changed.items():
            k = key.encode()
            if raw is None:
                if k in self.table:
                    del self.table[k]
            else:
                self.table[k] = raw
        em.apply_metrics(self.metrics)

    # ------------------------------------------------------------------ unit of work
    def _aggregates(self) -> tuple[Any, ...]:
        if self.recs is not None:  # a new unit of work: journal the model's changes
            self.recs.begin()
        clocks = {p: (c.max_ts, c.last_event_wall, c.wm, set(c.eoi_sources), c.closed, dict(c.controls))
                  for p, c in self.clocks.items()}
        return (clocks, {p: dict(m) for p, m in self.segment_members.items()}, dict(self.segment_entries),
                dict(self.segment_conversions), {p: copy.copy(pp) for p, pp in self.population.items()},
                copy.copy(self.population_total), self.pending_predictions, self.rule_errors,
                {p: {e: dict(d) for e, d in m.items()} for p, m in self.arms.items()})  # (counts: tuples)

    def _rollback(self, tx: _Tx) -> None:
        clocks, members, entries, conversions, population, total, pending, errors, arms = tx.snapshot
        self.arms = arms
        for p in list(self.clocks):
            if p not in clocks:
                del self.clocks[p]
                self.timers.pop(p, None)
        for p, (max_ts, last_wall, wm, eoi, closed, controls) in clocks.items():
            c = self.clocks[p]
            c.max_ts, c.last_event_wall, c.wm, c.eoi_sources, c.closed = max_ts, last_wall, wm, eoi, closed
            c.controls = controls
        self.segment_members, self.segment_entries, self.segment_conversions = members, entries, conversions
        self.population, self.population_total = population, total
        self.pending_predictions, self.rule_errors = pending, errors
        if self.recs is not None:
            self.recs.rollback()
        for key in tx.users:  # the committed state and its timer come back from the table
            self._cache.pop(key, None)
            st = self.load(key)
            if st is not None and st.partition in self.timers:
                self.timers[st.partition].set(key, self._due(st))
            else:
                for ti in self.timers.values():
                    ti.set(key, None)

    def _finish(self, tx: _Tx, em: Emitted, limit: int | None = None) -> None:
        for key in tx.dirty:
            st = tx.users[key]
            raw = em.changed[key] = st.to_bytes()
            if limit is not None and len(raw) > limit and key not in tx.deleted:
                raise StateTooLarge(key, len(raw), limit)
            em.states[key] = st
        for key in tx.deleted:
            em.changed[key] = None
            em.states.pop(key, None)
        cache = self._cache
        for key, st in tx.users.items():
            cache.pop(key, None)
            if key not in tx.deleted:
                cache[key] = st  # most recently used last
        while len(cache) > self.cache_users:
            del cache[next(iter(cache))]
        if self.models is not None:
            em.gauges["predictions_pending"] = self.pending_predictions
        if self.recs is not None:
            self.recs.commit()

    def _get(self, tx: _Tx, key: str) -> UserState | None:
        st = tx.users.get(key)
        if st is None:
            st = self._cache.get(key)
            if st is None:
                raw = self._stored(key)
                if raw is None:
                    return None
                st = UserState.from_bytes(raw)
            tx.users[key] = st
        return st

    def load(self, user_key: str) -> UserState | None:
        """The committed state of ``user_key`` (a fresh copy decoded from the table)."""
        raw = self._stored(user_key)
        return None if raw is None else UserState.from_bytes(raw)

    # ------------------------------------------------------------------ rules
    def ruleset(self) -> Ruleset | None:
        r = self.rules
        return r if r is None or isinstance(r, Ruleset) else r.current()

    def segment_size(self, name: str) -> int:
        """Members of segment ``name`` over all partitions: this engine's own partitions' live
        counts plus, for every other partition, the count last set by
        :meth:`set_remote_segment_counts` (what the worker owning it published). A partition this
        engine owns (it is in :attr:`segment_members`) always uses its live count, whatever was
        published for it. With no remote counts (one worker, or the in-memory engine) this is the
        count over this engine's partitions, deterministic under replay."""
        own = self.segment_members
        return (sum(m.get(name, 0) for m in own.values())
                + sum(m.get(name, 0) for p, m in self.remote_segment_members.items() if p not in own))

    def local_segment_size(self, name: str) -> int:
        """Members of segment ``name`` over this engine's own partitions only."""
        return sum(m.get(name, 0) for m in self.segment_members.values())

    def set_remote_segment_counts(self, partition: int, counts: Mapping[str, int] | None) -> None:
        """Record the member counts another worker published for ``partition``
        (``{segment: members}``, members >= 0; ``None``: forget the partition). Used by
        :meth:`segment_size` for partitions this engine does not own; ignored while it owns them.

        Raises
        ------
        ValueError
            A count that is not a non-negative integer, or a negative partition.
        """
        if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
            raise ValueError(f"partition must be an int >= 0, got {partition!r}")
        if counts is None:
            self.remote_segment_members.pop(partition, None)
            return
        clean: dict[str, int] = {}
        for seg, n in counts.items():
            if not isinstance(seg, str) or not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"segment count {seg!r}: {n!r} is not a non-negative integer")
            clean[seg] = n
        self.remote_segment_members[partition] = clean

    def segment_counts(self) -> dict[int, dict[str, int]]:
        """This engine's own partitions' live member counts, ``{partition: {segment: members}}``
        (segments with no member left out): what the worker publishes for the others."""
        return {p: {seg: n for seg, n in sorted(m.items()) if n > 0} for p, m in sorted(self.segment_members.items())}

    def segment_active(self, name: str) -> bool:
        rs = self.ruleset()
        if rs is None:
            return False
        try:
            seg = rs.segment(name)
        except KeyError:
            return False
        return self.segment_size(name) >= seg.min_size

    def user_prior(self) -> tuple[float, float]:
        """Beta prior of users' session conversion, fitted over this worker's users (O(1))."""
        key = (self.population_total.g, self.population_total.w, self.population_total.s)
        if self._prior_key != key:
            self._prior_key = key
            self._prior = self.population_total.prior()
        return self._prior

    def conversion_user(self, st: UserState) -> float:
        """The user's smoothed session conversion rate (posterior mean), 0-1."""
        a, b = self.user_prior()
        n = st.life.sessions
        return posterior_mean(min(st.life.converted_sessions, n), n, a, b)

    def segment_conversion(self) -> dict[str, dict[str, float]]:
        """Per segment: stints, conversions, raw and smoothed conversion rate (prior over segments)."""
        names = sorted(set(self.segment_entries) | set(self.segment_conversions))
        s = [min(self.segment_conversions.get(n, 0), self.segment_entries.get(n, 0)) for n in names]
        n = [self.segment_entries.get(x, 0) for x in names]
        a, b = fit_prior(s, n)
        return {name: {"members": self.segment_size(name), "stints": ni, "conversions": si,
                       "rate": si / ni if ni else 0.0, "rate_smoothed": posterior_mean(si, ni, a, b)}
                for name, si, ni in zip(names, s, n, strict=True)}

    def _extra(self, st: UserState, at_ms: int, names: frozenset[str]) -> dict[str, Any]:
        """The engine-computed namespace values among ``names`` (``engagement``, ``conversion_user``,
        ``p_purchase``, ``tier``: see :attr:`clickpulse.rules.triggers.RuleContext.extra`), as of
        ``at_ms``; only those asked for are computed."""
        out: dict[str, Any] = {}
        if "engagement" in names:
            en = st.ml.get("en")
            out["engagement"] = engagement_value(en, at_ms, self.cfg.engagement) if en else 0.0
        if "conversion_user" in names:
            out["conversion_user"] = self.conversion_user(st)
        if self.models is not None and st.session is not None:
            if "p_purchase" in names and hasattr(self.models, "p_purchase"):
                last = st.session.last_type
                out["p_purchase"] = float(self.models.p_purchase([last] if last else []))
            if "tier" in names and hasattr(self.models, "tier"):
                out["tier"] = str(self.models.tier(session_features(st.session, self.cfg.engagement)))
        return out

    def profile_extra(self, st: UserState) -> dict[str, Any]:
        """Engine-computed profile fields (tier, p_purchase, smoothed conversion, recommended
        items) for ``st``."""
        out = self._extra(st, st.life.last_ms or 0, triggers.EXTRA_NAMES)
        if self.recs is not None:
            out["recommendations"] = self.recommendations(st, st.life.last_ms or 0)
        return out

    # ------------------------------------------------------------------ recommendations
    def recommendations(self, st: UserState, at_ms: int) -> list[dict[str, Any]]:
        """``recs_k`` items for ``st`` from the worker's co-occurrence model, best first:
        ``[{"item_id", "score", "why"}]``; the context is the user's latest session's products
        (first views, at most 32) and cart, which are never recommended themselves. ``score``:
        co-occurrence sessions decayed to ``at_ms`` and weighted by context position (0 for a
        popularity fill). ``[]`` without a model."""
        if self.recs is None:
            return []
        s = st.session or st.prev_session
        ctx = list(s.products) if s is not None else []
        ctx += [p for p in st.cart.items if p not in ctx]
        return [{"item_id": j, "score": round(sc, 6), "why": why}
                for j, sc, why in self.recs.recommend(ctx, self.recs_k, at_ms=at_ms)]

    def _recommend_action(self, st: UserState, trigger: str, at_ms: int) -> list[dict[str, Any]] | None:
        return self.recommendations(st, at_ms) if trigger in self.recs_triggers else None

    def _recs_learn(self, st: UserState, event: dict[str, Any], before: tuple[Any, ...]) -> None:
        """Learn the event (after its rules ran): a product view new to its session is paired
        with the session's earlier products (:meth:`clickpulse.recs.CoOccurrence.observe_view`);
        a purchase's basket was taken before the event (``before``). Bots teach nothing."""
        if is_bot(st.rules.get("bot", {})):
            return
        t = int(event["timestamp_ms"])
        if before[0] == "basket":
            self.recs.observe_basket(before[1], t)
            return
        pid = before[1]
        for s, n0 in ((st.session, before[2]), (st.prev_session, before[3])):
            if s is None:
                continue
            n = n0[1] if n0 is not None and n0[0] is s else 0
            prods = s.products
            if len(prods) > n and prods[-1] == pid:
                self.recs.observe_view(prods[:-1], pid, t)
                return

    def _recs_before(self, st: UserState, event: dict[str, Any]) -> tuple[Any, ...] | None:
        """What :meth:`_recs_learn` needs from the state before the event, or ``None``."""
        etype = event["type"]
        if etype != "product_view" and etype != "purchase":
            return None
        pid = (event.get("properties") or {}).get("product_id")
        if pid is None:
            return None
        pid = str(pid)
        if etype == "purchase":
            return ("basket", [*st.cart.items, pid])
        s, ps = st.session, st.prev_session
        return ("view", pid, None if s is None else (s, len(s.products)),
                None if ps is None else (ps, len(ps.products)))

    def _context(self, rs: Ruleset, created: str, partition: int) -> triggers.RuleContext:
        members = self.segment_members.setdefault(partition, {})

        def count_member(seg: str, delta: int) -> None:
            members[seg] = max(0, members.get(seg, 0) + delta)
        return triggers.RuleContext(rs, self.segment_active, self._extra, count_member, self.assumed_consent,
                                    self.bots, created, arm_counts=self.arm_counts,
                                    recommend=self._recommend_action if self.recs is not None and self.recs_triggers
                                    else None)

    def arm_counts(self, experiment: str) -> dict[str, tuple[int, int]]:
        """Arm -> (exposed users, converted users) of ``experiment`` over this worker's partitions."""
        out: dict[str, tuple[int, int]] = {}
        for by_exp in self.arms.values():
            for arm, (n, x) in by_exp.get(experiment, {}).items():
                a = out.get(arm, (0, 0))
                out[arm] = (a[0] + n, a[1] + x)
        return out

    def _count_arm(self, partition: int, experiment: str, arm: str, exposed: int, converted: int) -> None:
        by_arm = self.arms.setdefault(partition, {}).setdefault(experiment, {})
        n, x = by_arm.get(arm, (0, 0))
        by_arm[arm] = (max(0, n + exposed), max(0, x + converted))

    def _count_arms(self, st: UserState, sign: int) -> None:
        """Add (sign +1) or take back (-1) the user's exposures and conversions in :attr:`arms`."""
        if "x" in st.rules:
            for name, arm, converted in arm_counts(st):
                self._count_arm(st.partition, name, arm, sign, sign * converted)

    def _count_population(self, st: UserState, sign: int) -> None:
        pp = self.population.setdefault(st.partition, PopulationPrior())
        s, n = min(st.life.converted_sessions, st.life.sessions), st.life.sessions
        for target in (pp, self.population_total):
            (target.add if sign > 0 else target.remove)(s, n)

    def _take_rules(self, st: UserState, out: triggers.Outcome, partition: int, em: Emitted) -> list[ActionRecord]:
        """Account for a rules outcome (counters, segment counts and changes); returns its actions."""
        members = self.segment_members.setdefault(partition, {})  # counted by the context's count_member
        if out.bot_flagged:  # the bot leaves its segments now: its stints do not count in conversion
            for ch in out.changes:
                if ch.change == "exited":
                    self.segment_entries[ch.segment] = max(0, self.segment_entries.get(ch.segment, 0) - 1)
            for seg in st.rules.pop("cv", []):
                self.segment_conversions[seg] = max(0, self.segment_conversions.get(seg, 0) - 1)
            em.count("bots")
            log.info("user %s flagged as a bot: %s", st.key, out.bot_flagged)
        for ch in out.changes:
            if ch.change == "entered":
                self.segment_entries[ch.segment] = self.segment_entries.get(ch.segment, 0) + 1
            else:
                conv = st.rules.get("cv")
                if conv and ch.segment in conv:
                    conv.remove(ch.segment)
                    if not conv:
                        del st.rules["cv"]
            rec = ch.to_record()
            rec["segment_size"] = members.get(ch.segment, 0)
            em.segment_changes.append(rec)  # type: ignore[arg-type]
            em.count("segment_changes", ch.change)
        for trig, outcome in out.decisions:
            em.count("rule_decisions", trig, outcome)
        for err in out.errors:
            self.rule_errors += 1
            em.count("rule_errors", err.rule)
            if err.rule not in self._logged_rule_errors:  # the first of each rule, then only counted
                self._logged_rule_errors.add(err.rule)
                log.warning("rule %s failed at run time (counted as false; further failures only counted in "
                            "clickpulse_rule_errors_total): %s", err.rule, err)
        if out.timer_skipped_late:
            em.count("timers_skipped_late", n=out.timer_skipped_late)
        if out.exposures:
            rs = self.ruleset()
            for name, arm, at, aid in out.exposures:
                exp = rs.experiments.get(name) if rs is not None else None
                share = exp.expected_shares().get(arm) if exp is not None else None
                em.experiments.append(exposure_record(st.key, name, arm, at, aid, rs.version if rs else None,  # type: ignore[arg-type]
                                                      share))
                em.count("experiment_exposures", name, arm)
                self._count_arm(st.partition, name, arm, 1, 0)
        return out.actions  # type: ignore[return-value]

    def _attribute(self, st: UserState, event: dict[str, Any], rs: Ruleset | None, em: Emitted) -> None:
        """Conversions of the user's experiment exposures by ``event`` -> records and counters."""
        for name, arm, at, rev, first in attribute(st, event, {} if rs is None else rs.experiments):
            if first:
                self._count_arm(st.partition, name, arm, 0, 1)
                em.count("experiment_converters", name, arm)
            em.experiments.append(conversion_record(st.key, name, arm, at, event, rev,  # type: ignore[arg-type]
                                                    rs.version if rs else None))
            em.count("experiment_conversions", name, arm)
            if rev:
                em.count("experiment_revenue", name, arm, n=rev)

    def _segment_purchase(self, st: UserState) -> None:
        """A purchase converts the user's current membership stints (each counted once)."""
        segs = st.rules.get("seg")
        if not segs:
            return
        conv = st.rules.setdefault("cv", [])
        for seg in segs:
            if seg not in conv:
                conv.append(seg)
                self.segment_conversions[seg] = self.segment_conversions.get(seg, 0) + 1

    def _session_examples(self, st: UserState, session: Any, em: Emitted) -> None:
        """Examples of a session that just ended (its last event + the gap passed, or the user
        came back) for the trainer's engagement tiers and Markov chain."""
        if self.models is None:
            return
        base = {"schema_version": 1, "user_key": st.key, "event_time_ms": int(session.last_ms)}
        em.examples.append({**base, "task": "tiers", "x": session_features(session, self.cfg.engagement)})  # type: ignore[typeddict-item]
        # the opening path (first 16 state changes; a longer session is learned up to there)
        em.examples.append({**base, "task": "markov", "path": list(session.path)})  # type: ignore[typeddict-item]

    # ------------------------------------------------------------------ models
    def _due(self, st: UserState, closed: bool = False) -> int | None:
        rule_due = triggers.next_due(st)
        model_due = None if self.models is None else next_due(st, self.mcfg, closed)
        if rule_due is None:
            return model_due
        return rule_due if model_due is None else min(rule_due, model_due)

    def _gate_models(self, st: UserState, actions: list[ActionRecord], em: Emitted) -> list[ActionRecord]:
        """The model actions (``high_intent``, ``churn_risk``) that pass the same gates as a
        rule's, in the same order: not a bot (``bot``), the consent purpose
        ``model_actions_consent`` granted (``consent``), then the model in use is ready
        (``not_ready``: it has learned ``model_min_class_examples`` of each class). Each decision
        is counted in ``clickpulse_rule_decisions_total{trigger="model:<type>", outcome}``."""
        keep = []
        for a in actions:
            verdict = "fired"
            task = MODEL_ACTION_TASKS.get(a["type"])
            if is_bot(st.rules.get("bot", {})):
                verdict = "bot"
            elif self.model_consent and not triggers.consent_granted(st, self.model_consent, self.assumed_consent):
                verdict = "consent"
            elif self.model_min_class_examples > 0 and task is not None \
                    and not self.models.ready(task, self.model_min_class_examples):
                verdict = "not_ready"
                em.count("model_actions_suppressed", a["type"])
            em.count("rule_decisions", f"model:{a['type']}", verdict)
            if verdict == "fired":
                keep.append(a)
        return keep

    def _take(self, st: UserState, outcome: ModelOutcome, em: Emitted, gate: bool = True) -> list[ActionRecord]:
        """Account for a models outcome (examples, dropped and buffered predictions); returns its
        actions, through :meth:`_gate_models` unless ``gate`` is false (the caller gates them
        later, e.g. after the event's bot detection ran)."""
        if gate and outcome.actions:
            outcome.actions = self._gate_models(st, outcome.actions, em)  # type: ignore[arg-type]
        if not (outcome.examples or outcome.dropped or outcome.buffered):
            return outcome.actions  # type: ignore[return-value]
        for ex in outcome.examples:
            em.count("examples", ex["task"])
        em.examples.extend(outcome.examples)  # type: ignore[arg-type]
        for reason, n in outcome.dropped.items():
            em.count("predictions_dropped", reason, n=n)
        self.pending_predictions = max(0, self.pending_predictions + outcome.buffered)
        return outcome.actions  # type: ignore[return-value]

    # ------------------------------------------------------------------ per event, per timer
    def clock(self, partition: int) -> PartitionClock:
        c = self.clocks.get(partition)
        if c is None:
            c = self.clocks[partition] = PartitionClock(self.lateness, self.idle, self.live)
            self.timers.setdefault(partition, TimerIndex())
        return c

    def _event(self, tx: _Tx, partition: int, event: dict[str, Any], wall_ms: int, em: Emitted,
               received_ms: int | None = None) -> Applied:
        """Apply one canonical event, then fire the partition's due timers. The event moves the
        watermark to its :func:`~clickpulse.state.clock.clock_candidate` at most (its own
        timestamp stays the event time of its state)."""
        clock = self.clock(partition)
        wm_before = clock.watermark(wall_ms)
        key = event["user_key"]
        link = None
        if event["type"] in LINK_TYPES:
            link = link_keys(event)
            if link is not None and key != link[0]:
                link = None  # the customer's copy (forwarded): a plain event of the customer
            elif link is None and unsupported_alias(event):
                em.count("identity_links", "unsupported")
        st = self._get(tx, key)
        if st is not None and st.merged_into is not None:
            return self._forward(tx, partition, st, event, link, wall_ms, em, received_ms)
        if st is None:
            st = tx.users[key] = UserState(key=key, partition=partition)
            em.count("users_new")
        if is_duplicate(st, event):
            em.count("duplicates")
            # it moves the clock as its first copy did: after a crash, the re-read events of a
            # batch whose states were partly saved are duplicates for the users saved, and the
            # watermark must advance through them as it did the first time (see restore; the
            # re-read copy has the same record timestamp, so the same receive time)
            clock.observe(int(event["timestamp_ms"]), wall_ms, received_ms)
            self._fire(tx, partition, wall_ms, em)
            return Applied(duplicate=True)
        tx.dirty.add(key)
        tx.deleted.discard(key)
        actions: list[ActionRecord] = []
        created = wall_rfc3339(wall_ms)
        st.partition = partition
        t = int(event["timestamp_ms"])
        rs = self.ruleset()
        ctx = None
        if rs is not None:
            ctx = self._context(rs, created, partition)
            # The watermark this event moves the partition to: the user's own timers it passes
            # fire first, over the state before the event (so "after A, no B within T" does not
            # depend on whether another user's event moved the watermark a moment earlier).
            cand = clock_candidate(t, received_ms) - self.lateness
            wm_after = cand if wm_before is None else max(wm_before, cand)
            due = triggers.next_due(st)
            if due is not None and due < wm_after:
                actions += self._take_rules(st, triggers.on_timers(st, wm_after, ctx), partition, em)
        if self.models is not None:
            open_session = st.session if st.session is not None and not st.session.ended else None
            actions += self._take(st, before_event(st, t, self.models.score, self.mcfg, created), em)
            if open_session is not None and open_session.ended:  # the user's return ended it
                self._session_examples(st, open_session, em)
        self._count_population(st, -1)
        observe = self.observe_user
        seen = None if observe is None else observe(st)
        recs_before = None if self.recs is None else self._recs_before(st, event)
        res = apply(st, event, wm_before, self.cfg, wall_ms)
        if observe is not None:
            em.observed.append((seen, observe(st), t))
        self._count_population(st, +1)
        model_actions: list[ActionRecord] = []
        if self.models is not None:  # gated below, once this event's bot detection has run
            model_actions = self._take(st, after_event(st, event, self.models.score, self.mcfg, created, res.late,
                                                       allow_buffer=self.pending_predictions < self.pending_total_cap),
                                       em, gate=False)
        rule_actions: list[ActionRecord] = []
        if "x" in st.rules:  # experiment outcomes, in event time (clickpulse.experiments.attribution)
            self._attribute(st, event, rs, em)
        if ctx is not None:
            if event["type"] == "purchase":
                self._segment_purchase(st)
            rule_actions = self._take_rules(st, triggers.on_event(st, event, res.late, wm_before, ctx), partition, em)
        if model_actions:
            actions += self._gate_models(st, model_actions, em)
        actions += rule_actions
        if recs_before is not None:  # recommend (the actions above), then learn
            self._recs_learn(st, event, recs_before)
        for a in actions:
            em.count("actions", a["type"])
        em.actions += actions
        st.partition = partition
        em.count("events_in", type_label(event["type"]))
        if res.late:
            em.count("late")
        if res.session_started:
            em.count("sessions")
        clock.observe(t, wall_ms, received_ms)
        self.timers[partition].set(key, self._due(st))
        if link is not None:
            self._link(tx, partition, st, event, link[1], em)
        self._fire(tx, partition, wall_ms, em)
        return res

    # ------------------------------------------------------------------ identity stitching
    def _link(self, tx: _Tx, partition: int, g: UserState, event: dict[str, Any], customer: str,
              em: Emitted) -> None:
        """The guest ``g`` (the link event just applied to it) becomes a forwarding stub; its state
        goes to ``customer`` in a merge record (see :mod:`clickpulse.engine.identity`)."""
        import base64
        em.merges.append({"schema_version": 1, "guest_key": g.key, "customer_key": customer,
                          "link_event": event, "linked_at_ms": int(event["timestamp_ms"]),
                          "state_b64": base64.b64encode(g.to_bytes()).decode()})
        segs = list(g.rules.get("seg", []))
        if segs:  # the guest leaves its segments (the customer's are re-evaluated at its next event)
            members = self.segment_members.setdefault(partition, {})
            rs = self.ruleset()
            for seg in segs:
                members[seg] = max(0, members.get(seg, 0) - 1)
                em.segment_changes.append({"schema_version": 1, "user_key": g.key, "segment": seg,
                                           "change": "exited", "event_time": event["timestamp"],
                                           "event_time_ms": int(event["timestamp_ms"]),
                                           "rules_version": "" if rs is None else rs.version,
                                           "segment_size": members.get(seg, 0)})
                em.count("segment_changes", "exited")
        self._count_population(g, -1)
        self.pending_predictions = max(0, self.pending_predictions - len(g.ml.get("pi", [])))
        tx.users[g.key] = stub(g, customer, partition)
        tx.dirty.add(g.key)
        self.timers[partition].set(g.key, None)
        em.aliases[g.key] = customer
        em.count("identity_links", "linked")

    def _forward(self, tx: _Tx, partition: int, st: UserState, event: dict[str, Any],
                 link: tuple[str, str] | None, wall_ms: int, em: Emitted, received_ms: int | None = None) -> Applied:
        """An event that reached a guest's stub: re-keyed to the stub's customer (a link event to
        another customer: a conflict, first link wins; it goes to its own ``user_id`` as a plain
        event and moves no state)."""
        if is_duplicate(st, event):
            em.count("duplicates")
            self._fire(tx, partition, wall_ms, em)
            return Applied(duplicate=True)
        st.recent_ids.add(id_hash(str(event["event_id"])), self.cfg.dedup_ids_per_user)
        t = int(event["timestamp_ms"])
        life = st.life
        if life.last_ms is None or t >= life.last_ms:
            life.last_ms, life.last_wall_ms = t, wall_ms
        tx.dirty.add(st.key)
        target = st.merged_into
        if link is not None:
            if link[1] != target:
                em.count("identity_links", "conflict")
                log.info("identity conflict: %s is linked to %s; a link to %s moves no state", st.key, target, link[1])
                target = link[1]
            else:
                em.count("identity_links", "repeat")
        em.forwards.append({**event, "user_key": target})
        em.aliases[st.key] = st.merged_into
        em.count("identity_forwarded")
        self.clock(partition).observe(t, wall_ms, received_ms)
        self._fire(tx, partition, wall_ms, em)
        return Applied()

    def merge_step(self, partition: int, record: Mapping[str, Any], wall_ms: int) -> Emitted:
        """Apply a merge record (:class:`clickpulse.records.MergeRecord`) to its customer, once per
        ``(guest_key, link event id)``; the customer's timers (the guest's included) are re-armed
        and those already due fire.

        Raises
        ------
        ValueError
            A malformed record (wrong types, a state that does not decode or is not the guest's);
            nothing changed.
        """
        import base64
        tx = _Tx(self)
        em = Emitted()
        try:
            guest, customer, ev = record.get("guest_key"), record.get("customer_key"), record.get("link_event")
            if not isinstance(guest, str) or not isinstance(customer, str) or not isinstance(ev, Mapping) \
                    or not isinstance(record.get("state_b64"), str) or guest == customer:
                raise ValueError("not a merge record (guest_key, customer_key, link_event, state_b64)")
            self.clock(partition)
            c = self._get(tx, customer)
            if c is None:
                c = tx.users[customer] = UserState(key=customer, partition=partition, user_id=customer)
                em.count("users_new")
            if c.merged_into is not None:
                raise ValueError(f"merge target {customer!r} is itself a guest's stub")
            eid = str(ev.get("event_id"))
            if already_merged(c, guest, eid):
                em.count("identity_links", "merge_duplicate")
            else:
                g = UserState.from_bytes(base64.b64decode(record["state_b64"], validate=True))
                if g.key != guest:
                    raise ValueError(f"merge record state is of {g.key!r}, not of guest {guest!r}")
                before = len(c.ml.get("pi", []))
                self._count_population(c, -1)
                dropped = merge_into(c, g, eid, gap_ms=self.cfg.session_gap_ms, dedup_ids=self.cfg.dedup_ids_per_user,
                                     engagement=self.cfg.engagement,
                                     pending_per_user=self.mcfg.pending_per_user if self.mcfg is not None else 8)
                self._count_population(c, +1)
                self.pending_predictions = max(0, self.pending_predictions + len(c.ml.get("pi", [])) - before)
                if dropped:
                    em.count("predictions_dropped", "merge", n=dropped)
                c.partition = partition
                if c.user_id is None:
                    c.user_id = customer
                tx.dirty.add(customer)
                self.timers[partition].set(customer, self._due(c))
                em.count("identity_links", "merged")
            self._fire(tx, partition, wall_ms, em)
            self._finish(tx, em)
        except Exception:
            self._rollback(tx)
            raise
        return em

    def _fire(self, tx: _Tx, partition: int, wall_ms: int, em: Emitted) -> None:
        """Fire every timer of ``partition`` the watermark is past (live mode: idle advance)."""
        clock = self.clock(partition)
        wm = clock.watermark(wall_ms)
        due_keys = self.timers[partition].pop_due(wm)
        if not due_keys or wm is None:
            return
        created = wall_rfc3339(wall_ms)
        out: list[ActionRecord] = []
        rs = self.ruleset()
        ctx = None if rs is None else self._context(rs, created, partition)
        for key in due_keys:
            mark = (len(em.actions), len(em.examples), len(em.segment_changes), len(out))
            try:
                st = self._get(tx, key)
                if st is None:
                    continue
                actions: list[ActionRecord] = []
                if ctx is not None:
                    actions += self._take_rules(st, triggers.on_timers(st, wm, ctx), partition, em)
                if self.models is not None:
                    open_session = st.session if st.session is not None and not st.session.ended else None
                    actions += self._take(st, on_watermark(st, wm, self.models.score, self.mcfg, created), em)
                    if open_session is not None and open_session.ended:  # the watermark passed its end
                        self._session_examples(st, open_session, em)
                # what did not fire (e.g. the cart changed) is re-armed from the state
                self.timers[partition].set(key, self._due(st, closed=wm == END_OF_TIME))
            except Exception as err:  # noqa: BLE001 - one user's broken state never stops the timers
                del em.actions[mark[0]:], em.examples[mark[1]:], em.segment_changes[mark[2]:], out[mark[3]:]
                self._quarantine(tx, key, self._stored(key), f"{type(err).__name__}: {err}", "timer",
                                 wall_ms, em)
                tx.users[key] = UserState(key=key, partition=partition)
                tx.dirty.add(key)
                self.timers[partition].set(key, None)
                continue
            tx.dirty.add(key)  # it was due: a timer fired, a session ended or a label resolved
            for a in actions:
                em.count("actions", a["type"])
            out.extend(actions)
        out.sort(key=lambda a: (a["event_time_ms"], a["user_key"]))
        em.actions += out

    # ------------------------------------------------------------------ control, recovery, retention
    def end_of_input_step(self, partition: int, source_partition: int, source_partitions: int,
                          wall_ms: int, *, control: str | None = None, issued_at_ms: int | None = None,
                          raw_offset: int | None = None) -> Emitted:
        """A bounded input ended on one source partition; when all have, close the partition's
        event time (watermark = end of time) and fire every pending timer. With ``control``, the
        sources are counted per run from the accepted controls, which the clock log keeps for
        :data:`~clickpulse.events.control.CONTROL_MAX_AGE_MS`: a restart or a rebalance in that
        window closes the partition again (:meth:`restore`), later it reopens (a closed time is
        never permanent); without, in memory only.

        ``control`` (:func:`clickpulse.events.control.control_id`), ``issued_at_ms`` and
        ``raw_offset`` (the offset of the signed record on its raw partition): the control's
        identity. Each is accepted once per partition: the ids accepted in the last
        :data:`~clickpulse.events.control.CONTROL_MAX_AGE_MS` are remembered in the clock with
        their raw offset (written durably with :meth:`checkpoint`, restored by :meth:`restore`),
        so a replayed control — also after a restart — changes nothing and is counted
        (``control_forged``), while the same raw record forwarded again (a redelivery, see
        :meth:`~clickpulse.state.clock.PartitionClock.accept_control`) is applied again: ending
        a source partition's input twice is idempotent."""
        tx = _Tx(self)
        em = Emitted()
        try:
            clock = self.clock(partition)
            verdict = "accepted" if control is None else clock.accept_control(
                control, issued_at_ms if issued_at_ms is not None else wall_ms, wall_ms, CONTROL_MAX_AGE_MS,
                raw_offset, source_partitions)
            if verdict == "replayed":
                log.warning("partition %d: end of input %r was already accepted (replayed); ignored", partition, control)
                em.count("control_forged")
                self._finish(tx, em)
                return em
            if verdict == "redelivered":
                log.info("partition %d: end of input %r read again from raw offset %s (redelivered)",
                         partition, control, raw_offset)
            if control is None:
                ended = clock.end_of_input(source_partition, source_partitions)
            elif clock.input_ended():  # the run's controls (durable: restore closes it again)
                clock.close()
                ended = True
            else:
                ended = False
            if ended:
                log.info("partition %d: end of input from all %d source partitions; watermark closed",
                         partition, source_partitions)
                self._fire(tx, partition, wall_ms, em)
            self._finish(tx, em)
        except Exception:
            self._rollback(tx)
            raise
        return em

    def control_seen(self, control: str, raw_offset: int | None = None) -> Literal["new", "redelivered", "replayed"]:
        """Whether an end-of-input control with id ``control``, read at ``raw_offset`` of its raw
        partition, was accepted on any partition this engine holds (in the last
        :data:`~clickpulse.events.control.CONTROL_MAX_AGE_MS`; restored from the clock logs after
        a restart): ``"new"`` (never), ``"redelivered"`` (accepted from the same raw offset: the
        same record read again), ``"replayed"`` (accepted from another or an unknown offset)."""
        verdict: Literal["new", "redelivered", "replayed"] = "new"
        for c in self.clocks.values():
            seen = c.controls.get(control)
            if seen is not None:
                if raw_offset is None or seen[1] != raw_offset:
                    return "replayed"
                verdict = "redelivered"
        return verdict

    def restore(self, partitions: Iterable[int], items: Iterable[tuple[bytes, bytes]], wall_ms: int,
                committed: Mapping[tuple[str, int], int | None] | None = None) -> int:
        """Rebuild clocks, timer indexes, positions and aggregates of ``partitions`` from the
        recovered table.

        A partition's clock log (:meth:`checkpoint`, stored in the table under
        :func:`clock_key`) is written after the state records of its batch, in the same changelog
        partition, so the newest entry recovered marks an input position whose effects **all**
        saved states hold: the clock restarts there (the watermark as it was at that position),
        and :meth:`redelivered` skips the input up to it when it is read again — the states, the
        timers and the watermark agree, whatever the committed offsets. Only the records of the
        one batch the crash interrupted can be ahead of it (some of its users saved, others
        not); re-read, their events are duplicates for the saved users (the worker keeps a
        user's events per batch within the de-duplication depth) and move the clock as they did
        the first time. A partition without a clock log restarts without a watermark (the re-read
        sets it); a table without any clock log (written before they existed) restarts from the
        newest event time in the partition's states.

        ``committed`` (the consumer group's offsets) is accepted for compatibility and not used.

        Returns the number of pending timers restored.
        """
        keep = set(partitions)
        self._cache.clear()
        self.pending_predictions = 0
        for p in list(self.clocks):
            if p not in keep:
                del self.clocks[p]
                self.timers.pop(p, None)
        for per in (self.segment_members, self.population, self.positions, self.sources, self.clock_log):
            for p in list(per):
                if p not in keep:
                    del per[p]
        self.arms = {p: {} for p in keep}
        for p in keep:  # rebuilt below from the recovered table
            self.segment_members[p] = {}
            self.population[p] = PopulationPrior()
        self.population_total = PopulationPrior()
        max_ts: dict[int, int] = {}
        max_wall: dict[int, int | None] = {}
        due: dict[int, list[tuple[str, int]]] = {p: [] for p in keep}
        logs: dict[int, list[dict[str, Any]]] = {}
        ctl: dict[int, dict[str, tuple[int, int | None, int | None]]] = {}
        for key, raw in items:
            if key.startswith(CLOCK_KEY_PREFIX):
                try:
                    log_p = orjson.loads(raw)
                    ctl[int(log_p["p"])] = _control_ids(log_p.get("ctl"))
                    entries = [e for e in log_p["log"] if isinstance(e, dict)]
                    if entries:
                        logs[int(log_p["p"])] = entries
                except Exception:  # noqa: BLE001 - a broken clock log: restore from the states
                    log.warning("ignoring an undecodable clock log under %r", key)
                continue
            try:
                st = UserState.from_bytes(raw)
            except Exception:  # noqa: BLE001 - one corrupt record must not stop recovery
                log.exception("skipping undecodable state record for key %r", key)
                continue
            if st.partition not in keep:
                continue
            members = self.segment_members[st.partition]
            for seg in st.rules.get("seg", []):
                members[seg] = members.get(seg, 0) + 1
            self._count_population(st, +1)
            self._count_arms(st, +1)
            if st.life.last_ms is not None and st.life.last_ms >= max_ts.get(st.partition, st.life.last_ms):
                max_ts[st.partition] = st.life.last_ms
                max_wall[st.partition] = st.life.last_wall_ms
            d = self._due(st)
            if d is not None:
                due[st.partition].append((st.key, d))
            self.pending_predictions += len(st.ml.get("pi", []))
        for p in keep:
            clock = self.clock(p)
            if not clock.closed:  # restarts from the recovered table alone (a closed time stays closed)
                clock.max_ts = clock.wm = clock.last_event_wall = None
            entries = logs.get(p)
            self.clock_log[p] = collections.deque(entries or (), maxlen=CLOCK_LOG_LEN)
            if entries:
                newest = entries[-1]
                t = newest.get("t")
                clock.restore(t if isinstance(t, int) else None, wall_ms,
                              newest.get("w") if isinstance(newest.get("w"), int) else None)
                self.positions[p] = {str(k): v for k, v in _int_map(newest.get("o")).items()}
                self.sources[p] = {int(k): v for k, v in _int_map(newest.get("s")).items()
                                   if str(k).lstrip("-").isdigit()}
            else:
                # no clock log: nothing of this partition was saved completely (the crash cut its
                # first batch: the re-read events set the clock), or the table predates clock
                # logs (none at all: the newest event time in the states, as before them)
                clock.restore(None if logs else max_ts.get(p), wall_ms, None if logs else max_wall.get(p))
                self.positions[p] = {}
                self.sources[p] = {}
            clock.controls = {**ctl.get(p, {}), **clock.controls}  # the accepted controls (durable)
            clock.forget_controls(wall_ms, CONTROL_MAX_AGE_MS)
            if not clock.closed and clock.input_ended():  # its run's end of input was accepted here
                clock.close()
                log.info("partition %d: event time closed again from the clock log (end of input accepted "
                         "before the restart or rebalance); every timer fires", p)
            self.timers[p].rebuild(due[p])
        return sum(len(v) for v in due.values())

    def redelivered(self, partition: int, topic: str, offset: int, source: tuple[int, int] | None = None) -> bool:
        """True when an input message must be skipped because its effect is already in the state:

        * ``offset`` is at or before the partition's restored position on ``topic`` (a re-read
          after a restart: the saved states hold it, see :meth:`restore`);
        * ``source`` (``(raw partition, raw offset)`` of an event the ingest stage forwarded) is
          at or before the highest raw offset of that raw partition applied on this partition:
          the ingest forwarded it again after a restart (it resumes from its own committed
          offsets). A raw partition's events reach a valid partition in raw-offset order, so
          this is exact.

        Otherwise records ``source`` as applied and returns False. Not transactional: call it
        for the messages of a batch right before :meth:`step`, and checkpoint after it.
        """
        pos = self.positions.get(partition)
        if pos:
            done = pos.get(topic)
            if done is not None and offset <= done:
                return True
        if source is not None:
            hw = self.sources.setdefault(partition, {})
            src_p, src_off = source
            if src_off <= hw.get(src_p, -1):
                return True
            hw[src_p] = src_off
        return False

    def checkpoint(self, partition: int, offsets: Mapping[str, int]) -> bytes:
        """Record the partition's input position after a batch: ``offsets`` (``{topic: offset of
        the last message of the batch}``, merged into the previous position), the raw positions
        of the forwarded events applied (:meth:`redelivered`) and the clock, in its clock log (the
        last :data:`CLOCK_LOG_LEN` batches). Returns the log serialized, for the table under
        :func:`clock_key`, to be written **after** the batch's state records of this partition
        (see :meth:`restore`)."""
        c = self.clock(partition)
        pos = self.positions.setdefault(partition, {})
        for topic, off in offsets.items():
            if off > pos.get(topic, -1):
                pos[topic] = off
        q = self.clock_log.setdefault(partition, collections.deque(maxlen=CLOCK_LOG_LEN))
        q.append({"o": dict(pos), "s": {str(k): v for k, v in self.sources.get(partition, {}).items()},
                  "t": c.max_ts, "w": c.last_event_wall})
        # "ctl": the end-of-input controls accepted (end_of_input_step), refused when replayed
        return orjson.dumps({"p": partition, "log": list(q), "ctl": c.controls})

    def expire_step(self, partition: int, retention_ms: int, wall_ms: int, limit: int = 10_000,
                    dormant_retention_ms: int | None = None) -> Emitted:
        """Retention of ``partition``'s users, two-tiered (event time, against the watermark).

        * A user whose newest event is more than ``retention_ms`` behind the watermark and who
          has no pending **rule** timer loses its behavioral state and becomes *dormant*: only
          its identifiers, consent decisions and lifetime totals stay (a small durable record, so
          an opted-out user who returns is still opted out and a customer keeps its history).
          A pending model label does not keep the state alive: the user's model timers are run
          at the watermark first (a session end labels its intent predictions, a churn horizon
          passed labels churn: the examples are emitted), and what is still unresolved is
          dropped and counted in ``clickpulse_predictions_dropped_total{reason="retention"}``.
          The user leaves its segments. Counted in ``clickpulse_users_expired_total``.
        * A dormant user whose newest event is more than ``dormant_retention_ms`` behind is
          deleted (``clickpulse_users_deleted_total``); ``None``: never.

        Scans the table (O(users)); the worker runs it every few minutes, not per event.
        """
        em = Emitted()
        wm = self.clock(partition).watermark(wall_ms)
        if wm is None or wm == END_OF_TIME:
            return em
        horizon = wm - retention_ms
        gone = None if dormant_retention_ms is None else wm - dormant_retention_ms
        stale: list[str] = []
        forget: list[str] = []
        for key, raw in list(self.table.items()):
            if key.startswith(CLOCK_KEY_PREFIX):
                continue
            try:
                st = UserState.from_bytes(raw)
            except Exception:  # noqa: BLE001 - left to quarantine at the user's next event
                continue
            if st.partition != partition or st.life.last_ms is None:
                continue
            if is_dormant(st):
                if gone is not None and st.life.last_ms < gone:
                    forget.append(st.key)
            elif st.life.last_ms < horizon and triggers.next_due(st) is None:
                stale.append(st.key)
            if len(stale) + len(forget) >= limit:
                break
        if not stale and not forget:
            return em
        tx = _Tx(self)
        try:
            members = self.segment_members.setdefault(partition, {})
            created = wall_rfc3339(wall_ms)
            for key in stale:
                st = self._get(tx, key)
                if st is None:
                    continue
                if self.models is not None:
                    self._take(st, on_watermark(st, wm, self.models.score, self.mcfg, created), em)
                    pending = len(st.ml.get("pi", []))
                    dropped = pending + (1 if st.ml.get("pc") is not None else 0)
                    if dropped:
                        em.count("predictions_dropped", "retention", n=dropped)
                        self.pending_predictions = max(0, self.pending_predictions - pending)
                em.actions.clear()  # an expiring user gets no action (its session ended long ago)
                for seg in st.rules.get("seg", []):
                    members[seg] = max(0, members.get(seg, 0) - 1)
                self._count_arms(st, -1)
                tx.users[key] = dormant(st)
                tx.dirty.add(key)
                self.timers.setdefault(partition, TimerIndex()).set(key, None)
            for key in forget:
                st = self._get(tx, key)
                if st is None:
                    continue
                self._count_population(st, -1)
                self.timers.setdefault(partition, TimerIndex()).set(key, None)
                tx.deleted.add(key)
            em.count("users_expired", n=len(stale))
            em.count("users_deleted", n=len(tx.deleted))
            self._finish(tx, em)
        except Exception:
            self._rollback(tx)
            raise
        return em

    def erase_step(self, user_key: str, wall_ms: int) -> Emitted:
        """Erase a user (a privacy request): its state (a changelog tombstone when committed), its
        timers, its pending predictions and its contribution to segment sizes and the population
        prior. :attr:`Emitted.erased` describes what was removed (for the audit record); the
        worker also deletes the Redis profile and tombstones the user's quarantine record."""
        em = Emitted()
        tx = _Tx(self)
        summary: dict[str, Any] = {"user_key": user_key, "state": False, "timers": 0, "predictions": 0,
                                   "segments": [], "linked": []}
        em.aliases[user_key] = None  # its own alias key, if it was a guest
        try:
            st = self._get(tx, user_key)
            if st is not None:
                summary["state"] = True
                # identity links: a customer's merged guests' stubs live on their own partitions;
                # the worker sends each an erase request (their Redis alias keys go now)
                summary["linked"] = [m[0] for m in st.merged]
                for guest in summary["linked"]:
                    em.aliases[guest] = None
                summary["predictions"] = len(st.ml.get("pi", [])) + (1 if st.ml.get("pc") is not None else 0)
                self.pending_predictions = max(0, self.pending_predictions - len(st.ml.get("pi", [])))
                summary["segments"] = list(st.rules.get("seg", []))
                members = self.segment_members.setdefault(st.partition, {})
                for seg in summary["segments"]:
                    members[seg] = max(0, members.get(seg, 0) - 1)
                self._count_population(st, -1)
                self._count_arms(st, -1)
                for ti in self.timers.values():
                    if user_key in ti._due:
                        summary["timers"] += 1
                    ti.set(user_key, None)
                tx.deleted.add(user_key)
            em.erased.append(summary)
            em.count("users_erased")
            self._finish(tx, em)
        except Exception:
            self._rollback(tx)
            raise
        return em

    def repair_step(self, user_key: str, partition: int, quarantined: bytes, mode: str = "retry",
                    drop_fields: Iterable[str] = (), wall_ms: int = 0) -> tuple[Emitted, dict[str, Any]]:
        """Put a quarantined user's state back (``clickpulse quarantine repair``).

        ``quarantined`` is the state moved aside (the quarantine record's ``state_b64``). It is
        decoded with the running code, then:

        * ``mode="retry"`` (after a code fix): used as it is, minus the parts named in
          ``drop_fields`` (each reset to empty: one of :data:`REPAIRABLE_FIELDS`);
        * ``mode="reset"``: only its durable record is kept (identifiers, consent decisions,
          lifetime totals; :func:`dormant`).

        The result must survive what failed before: a round trip through the codec, the profile,
        its timers (:meth:`_due`) and the engine's profile fields; otherwise nothing changes.
        It is then merged with the state the user went on with since the quarantine (the
        current one): with ``retry`` the repaired behavioral state replaces the current one,
        with ``reset`` the current one stays; in both, consent decisions (the later one per
        purpose) and lifetime totals (summed: the two histories are disjoint) of both are kept.

        Returns ``(Emitted, summary)``; ``summary["outcome"]`` is ``"repaired"`` (the step holds
        the new state) or ``"failed"`` (``summary["error"]`` says why; the step is empty).
        """
        drop = sorted(set(drop_fields))
        summary: dict[str, Any] = {"outcome": "failed", "mode": mode, "drop_fields": drop, "error": None,
                                   "merged_with_current": False}
        em = Emitted()
        try:
            if mode not in ("retry", "reset"):
                raise ValueError(f"unknown repair mode {mode!r} (retry, reset)")
            unknown = [f for f in drop if f not in REPAIRABLE_FIELDS]
            if unknown:
                raise ValueError(f"cannot drop {unknown}: one of {sorted(REPAIRABLE_FIELDS)}")
            old = UserState.from_bytes(quarantined)
            if old.key != user_key:
                raise ValueError(f"the quarantined state is user {old.key!r}'s, not {user_key!r}'s")
            fixed = dormant(old) if mode == "reset" else old
            blank = UserState(key=user_key)
            for name in drop:
                setattr(fixed, name, copy.deepcopy(getattr(blank, name)))
            fixed.partition = partition
            self._check(fixed)                                # what failed before, tried now
            fixed = UserState.from_bytes(fixed.to_bytes())
        except Exception as err:  # noqa: BLE001 - the reason goes to the audit record
            summary["error"] = f"{type(err).__name__}: {err}"[:1000]
            em.count("users_repaired", "failed")
            return em, summary
        tx = _Tx(self)
        try:
            try:
                current = self._get(tx, user_key)
            except Exception:  # noqa: BLE001 - the current state is broken too: the repaired one replaces it
                current = None
            if current is not None:
                summary["merged_with_current"] = True
                self._count_population(current, -1)
                members = self.segment_members.setdefault(current.partition, {})
                for seg in current.rules.get("seg", []):
                    members[seg] = max(0, members.get(seg, 0) - 1)
                self.pending_predictions = max(0, self.pending_predictions - len(current.ml.get("pi", [])))
                base, other = (current, fixed) if mode == "reset" else (fixed, current)
                merged = copy.deepcopy(base)
                merged.life = merge_lifetimes(fixed.life, current.life)
                merged.consent = merge_consent(fixed.consent, current.consent)
                for attr in ("user_id", "anonymous_id"):
                    if getattr(merged, attr) is None:
                        setattr(merged, attr, getattr(other, attr))
                merged.partition = partition
                fixed = UserState.from_bytes(merged.to_bytes())
                self._check(fixed)
            self._count_population(fixed, +1)
            members = self.segment_members.setdefault(partition, {})
            for seg in fixed.rules.get("seg", []):
                members[seg] = members.get(seg, 0) + 1
            self.pending_predictions += len(fixed.ml.get("pi", []))
            tx.users[user_key] = fixed
            tx.dirty.add(user_key)
            tx.deleted.discard(user_key)
            self.timers.setdefault(partition, TimerIndex()).set(user_key, self._due(fixed))
            self._finish(tx, em)
        except Exception as err:  # noqa: BLE001
            self._rollback(tx)
            summary["error"] = f"{type(err).__name__}: {err}"[:1000]
            em = Emitted()
            em.count("users_repaired", "failed")
            return em, summary
        summary["outcome"] = "repaired"
        em.count("users_repaired", "repaired")
        log.info("user %s repaired from quarantine (%s%s)", user_key, mode,
                 f", dropped {', '.join(drop)}" if drop else "")
        return em, summary

    def _check(self, st: UserState) -> None:
        """Raise when ``st`` cannot be processed: codec round trip, profile, timers, profile fields,
        finite lifetime totals (what the quarantined states failed at)."""
        UserState.from_bytes(st.to_bytes())
        st.profile(engagement=self.cfg.engagement, extra=self.profile_extra(st))
        self._due(st)
        life = st.life
        for name in ("events", "sessions", "orders", "converted_sessions"):
            v = getattr(life, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"lifetime {name} is {v!r}")
        if not isinstance(life.revenue, int | float) or not math.isfinite(life.revenue):
            raise ValueError(f"lifetime revenue is {life.revenue!r}")

    def pending_timers(self) -> int:
        return sum(len(t) for t in self.timers.values())

    def min_watermark(self, wall_ms: int) -> int | None:
        marks = [c.watermark(wall_ms) for c in self.clocks.values()]
        marks = [m for m in marks if m is not None and m != END_OF_TIME]
        return min(marks) if marks else None

    # ------------------------------------------------------------------ single-event conveniences
    def _commit_collect(self, em: Emitted) -> Emitted:
        self.commit(em)
        self._examples_out += em.examples
        self._changes_out += em.segment_changes
        return em

    def process(self, partition: int, event: dict[str, Any], wall_ms: int) -> tuple[Applied, list[ActionRecord]]:
        """One event as a step of one, committed at once (tests, tools): ``(Applied, actions)``.
        Its examples and segment changes are kept for :meth:`drain_examples` /
        :meth:`drain_segment_changes`.

        Raises
        ------
        Exception
            The event's processing raised (it changed nothing).
        """
        em = self._commit_collect(self.step([(partition, event)], wall_ms))
        if em.failed:
            raise RuntimeError(f"processing failed: {em.failed[0].error}")
        return em.applied[0] or Applied(), em.actions

    def tick(self, partition: int, wall_ms: int) -> list[ActionRecord]:
        """Fire ``partition``'s due timers and commit (tests, tools); returns the actions."""
        return self._commit_collect(self.step([], wall_ms, tick=[partition])).actions

    def end_of_input(self, partition: int, source_partition: int, source_partitions: int,
                     wall_ms: int) -> list[ActionRecord]:
        """:meth:`end_of_input_step`, committed at once (tests, tools); returns the actions."""
        return self._commit_collect(self.end_of_input_step(partition, source_partition, source_partitions,
                                                           wall_ms)).actions

    def expire_users(self, partition: int, retention_ms: int, wall_ms: int, limit: int = 10_000,
                     dormant_retention_ms: int | None = None) -> int:
        """:meth:`expire_step`, committed at once; returns how many users changed (expired to
        dormant, or deleted)."""
        return len(self._commit_collect(self.expire_step(partition, retention_ms, wall_ms, limit,
                                                         dormant_retention_ms)).changed)

    def merge(self, partition: int, record: Mapping[str, Any], wall_ms: int) -> Emitted:
        """:meth:`merge_step`, committed at once (tests, tools)."""
        return self._commit_collect(self.merge_step(partition, record, wall_ms))

    def erase(self, user_key: str, wall_ms: int) -> dict[str, Any]:
        """:meth:`erase_step`, committed at once; returns what was removed."""
        return self._commit_collect(self.erase_step(user_key, wall_ms)).erased[0]

    def drain_examples(self) -> list[dict[str, Any]]:
        """Examples committed by the single-event conveniences since the last call."""
        out, self._examples_out = self._examples_out, []
        return out

    def drain_segment_changes(self) -> list[dict[str, Any]]:
        """Segment changes committed by the single-event conveniences since the last call."""
        out, self._changes_out = self._changes_out, []
        return out


