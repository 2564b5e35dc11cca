"""The keyed event-time engine: per-partition clocks and timers over a user-state table.

Broker-free: the table is any mutable mapping ``bytes -> bytes`` (a ``dict`` in tests, the
Faust table in the worker), the wall clock is passed in. The Faust agents in
:mod:`clickpulse.app` are thin loops over :meth:`Engine.process`, :meth:`Engine.tick` and
:meth:`Engine.end_of_input`.

Pending timers live inside each user's state (rule timeouts in ``UserState.rules``, model label
deadlines in ``UserState.ml``), so they are in the table's changelog and survive restarts; the in-memory :class:`TimerIndex` and each partition's maximum
event time are rebuilt from the table by :meth:`Engine.restore` after a rebalance/recovery.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from ..features.engagement import value as engagement_value
from ..models.labels import after_event, before_event, next_due, on_watermark
from ..models.tiers import session_features
from ..observability.metrics import Metrics, type_label
from ..rules import triggers
from ..rules.bots import BotConfig
from ..rules.ruleset import Ruleset
from ..rules.smoothing import PopulationPrior, fit_prior, posterior_mean
from .clock import END_OF_TIME, PartitionClock, TimerIndex
from .user import Applied, StateConfig, UserState, apply, is_duplicate

log = logging.getLogger(__name__)
#: model action type -> the task whose model decides it
MODEL_ACTION_TASKS = {"high_intent": "intent", "churn_risk": "churn"}


@functools.lru_cache(maxsize=4)
def wall_rfc3339(wall_ms: int) -> str:
    """Wall-clock epoch ms -> RFC 3339 (cached: called with the same value for a whole batch)."""
    return datetime.fromtimestamp(wall_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Engine:
    """Event-time processing of one worker's partitions.

    Parameters
    ----------
    table
        Mapping from ``user_key`` (UTF-8 bytes) to ``UserState.to_bytes()``.
    cfg
        Session gap, abandonment delay, de-duplication depth (ms).
    allowed_lateness_ms, idle_timeout_ms, live
        Watermark settings (see :class:`PartitionClock`).
    metrics
        Where counters go.
    on_state
        Called with each changed ``UserState`` (the Redis write-behind); must not block.
    models, model_cfg
        A :class:`clickpulse.models.registry.ModelRegistry` and
        :class:`clickpulse.models.labels.ModelConfig` to score intent/churn and resolve labels;
        ``None`` disables models.
    pending_total_cap
        Bound on buffered unlabeled predictions over all users of this worker.
    rules
        The segments and triggers: a :class:`clickpulse.rules.ruleset.Ruleset`, or an object with
        ``current() -> Ruleset`` (a :class:`clickpulse.rules.ruleset.RulesFile`, reloaded by the
        worker); ``None``: no rules (no actions from rules, no segments).
    assumed_consent
        Consent purposes taken as granted for users who never sent a ``consent`` event.
    bots
        Bot-detection thresholds (:class:`clickpulse.rules.bots.BotConfig`).
    model_min_class_examples
        A model's actions (``high_intent``, ``churn_risk``) are published only once the model in
        use has learned at least this many examples of each class (0: always).
    """

    def __init__(self, table: MutableMapping[bytes, bytes], cfg: StateConfig, *, allowed_lateness_ms: int,
                 idle_timeout_ms: int, live: bool, metrics: Metrics,
                 on_state: Callable[[UserState], None] | None = None,
                 models: Any = None, model_cfg: Any = None, pending_total_cap: int = 1_000_000,
                 rules: Any = None, assumed_consent: frozenset[str] = frozenset(),
                 bots: BotConfig | None = None, model_min_class_examples: int = 0) -> None:
        self.table = table
        self.cfg = cfg
        self.lateness = allowed_lateness_ms
        self.idle = idle_timeout_ms
        self.live = live
        self.metrics = metrics
        self.on_state = on_state
        self.clocks: dict[int, PartitionClock] = {}
        self.timers: dict[int, TimerIndex] = {}
        # models (optional): a ModelRegistry and a ModelConfig; examples wait in an outbox
        self.models = models
        self.mcfg = model_cfg
        self.pending_total_cap = pending_total_cap
        self.pending_predictions = 0
        self.examples: list[dict[str, Any]] = []
        self.model_min_class_examples = model_min_class_examples
        # rules: segments' members per partition, population statistics for smoothing
        self.rules = rules
        self.assumed_consent = frozenset(assumed_consent)
        self.bots = bots or BotConfig()
        self.segment_members: dict[int, dict[str, int]] = {}
        self.segment_entries: dict[str, int] = {}      # membership stints started (since start/restore)
        self.segment_conversions: dict[str, int] = {}  # stints with a purchase
        self.population: dict[int, PopulationPrior] = {}  # users' (converted sessions, sessions)
        self.population_total = PopulationPrior()
        self._prior_key: tuple[float, ...] | None = None
        self._prior = (1.0, 1.0)
        self.segment_changes: list[dict[str, Any]] = []
        self.rule_errors = 0
        self._logged_rule_errors: set[str] = set()

    # -- rules ----------------------------------------------------------------------------
    def ruleset(self) -> Ruleset | None:
        r = self.rules
        return r if r is None or isinstance(r, Ruleset) else r.current()

    def segment_size(self, name: str) -> int:
        """Members of segment ``name`` over this worker's partitions."""
        return sum(m.get(name, 0) for m in self.segment_members.values())

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
        """Beta prior of users' session conversion, fitted over this worker's users (O(1): from
        sums kept as users change)."""
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
        """Engine-computed profile fields (tier, p_purchase, smoothed conversion) for ``st``."""
        return self._extra(st, st.life.last_ms or 0, triggers.EXTRA_NAMES)

    def _context(self, rs: Ruleset, created: str, partition: int) -> triggers.RuleContext:
        members = self.segment_members.setdefault(partition, {})

        def count_member(seg: str, delta: int) -> None:
            members[seg] = max(0, members.get(seg, 0) + delta)
        return triggers.RuleContext(rs, self.segment_active, self._extra, count_member, self.assumed_consent,
                                    self.bots, created)

    def _count_population(self, st: UserState, sign: int) -> None:
        pp = self.population.setdefault(st.partition, PopulationPrior())
        s, n = min(st.life.converted_sessions, st.life.sessions), st.life.sessions
        for target in (pp, self.population_total):
            (target.add if sign > 0 else target.remove)(s, n)

    def _take_rules(self, st: UserState, out: triggers.Outcome, partition: int) -> list[dict[str, Any]]:
        """Account for a rules outcome (metrics, segment counts and changes); returns its actions."""
        members = self.segment_members.setdefault(partition, {})  # counted by the context's count_member
        if out.bot_flagged:  # the bot leaves its segments now: its stints do not count in conversion
            for ch in out.changes:
                if ch.change == "exited":
                    self.segment_entries[ch.segment] = max(0, self.segment_entries.get(ch.segment, 0) - 1)
            for seg in st.rules.pop("cv", []):
                self.segment_conversions[seg] = max(0, self.segment_conversions.get(seg, 0) - 1)
            self.metrics.bots.inc()
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
            self.segment_changes.append(rec)
            self.metrics.segment_changes.labels(ch.change).inc()
        for trig, outcome in out.decisions:
            self.metrics.rule_decisions.labels(trig, outcome).inc()
        for err in out.errors:
            self.rule_errors += 1
            self.metrics.rule_errors.labels(err.rule).inc()
            if err.rule not in self._logged_rule_errors:  # the first of each rule, then only counted
                self._logged_rule_errors.add(err.rule)
                log.warning("rule %s failed at run time (counted as false; further failures only counted in "
                            "clickpulse_rule_errors_total): %s", err.rule, err)
        if out.timer_skipped_late:
            self.metrics.timers_skipped_late.inc(out.timer_skipped_late)
        return out.actions

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

    def _session_examples(self, st: UserState, session: Any) -> None:
        """Examples of a session that just ended (its last event + the gap passed, or the user
        came back) for the trainer's engagement tiers and Markov chain."""
        if self.models is None:
            return
        base = {"schema_version": 1, "user_key": st.key, "event_time_ms": int(session.last_ms)}
        self.examples.append({**base, "task": "tiers", "x": session_features(session, self.cfg.engagement)})
        # the opening path (first 16 state changes; a longer session is learned up to there)
        self.examples.append({**base, "task": "markov", "path": list(session.path)})

    def drain_segment_changes(self) -> list[dict[str, Any]]:
        """Segment entry/exit records since the last call (for the segments topic)."""
        out, self.segment_changes = self.segment_changes, []
        return out

    # -- helpers ----------------------------------------------------------------------------
    def clock(self, partition: int) -> PartitionClock:
        c = self.clocks.get(partition)
        if c is None:
            c = self.clocks[partition] = PartitionClock(self.lateness, self.idle, self.live)
            self.timers.setdefault(partition, TimerIndex())
        return c

    def load(self, user_key: str) -> UserState | None:
        raw = self.table.get(user_key.encode())
        return None if raw is None else UserState.from_bytes(raw)

    def _save(self, st: UserState) -> None:
        self.table[st.key.encode()] = st.to_bytes()
        if self.on_state is not None:
            self.on_state(st)

    def pending_timers(self) -> int:
        return sum(len(t) for t in self.timers.values())

    def drain_examples(self) -> list[dict[str, Any]]:
        """Labeled examples produced since the last call (for the training topic)."""
        out, self.examples = self.examples, []
        return out

    def _due(self, st: UserState, closed: bool = False) -> int | None:
        dues = [d for d in (triggers.next_due(st), self._model_due(st, closed)) if d is not None]
        return min(dues) if dues else None

    def _model_due(self, st: UserState, closed: bool) -> int | None:
        if self.models is None:
            return None
        return next_due(st, self.mcfg, closed)

    def _take(self, outcome: Any) -> list[dict[str, Any]]:
        """Account for a models outcome; returns its actions (those of a model not yet ready dropped)."""
        if outcome.actions and self.model_min_class_examples > 0:
            keep = []
            for a in outcome.actions:
                task = MODEL_ACTION_TASKS.get(a["type"])
                if task is not None and not self.models.ready(task, self.model_min_class_examples):
                    self.metrics.model_actions_suppressed.labels(a["type"]).inc()
                else:
                    keep.append(a)
            outcome.actions = keep
        if not (outcome.examples or outcome.dropped or outcome.buffered):
            return outcome.actions
        for ex in outcome.examples:
            self.metrics.examples.labels(ex["task"]).inc()
        self.examples.extend(outcome.examples)
        for reason, n in outcome.dropped.items():
            self.metrics.predictions_dropped.labels(reason).inc(n)
        self.pending_predictions = max(0, self.pending_predictions + outcome.buffered)
        self.metrics.predictions_pending.set(self.pending_predictions)
        return outcome.actions

    # -- the three entry points ---------------------------------------------------------------
    def process(self, partition: int, event: dict[str, Any], wall_ms: int) -> tuple[Applied, list[dict[str, Any]]]:
        """Apply one canonical event, then fire the partition's due timers.

        Returns the :class:`Applied` flags and the actions to publish (in due-time order).
        """
        clock = self.clock(partition)
        wm_before = clock.watermark(wall_ms)
        key = event["user_key"]
        st = self.load(key)
        if st is None:
            st = UserState(key=key, partition=partition)
            self.metrics.users_new.inc()
        if is_duplicate(st, event):
            self.metrics.duplicates.inc()
            return Applied(duplicate=True), self.tick(partition, wall_ms)
        actions: list[dict[str, Any]] = []
        created = wall_rfc3339(wall_ms)
        st.partition = partition
        rs = self.ruleset()
        if rs is not None:
            # The watermark this event moves the partition to: the user's own timers it passes
            # fire first, over the state before the event (so "after A, no B within T" does not
            # depend on whether another user's event moved the watermark a moment earlier).
            t = int(event["timestamp_ms"])
            wm_after = t - self.lateness if wm_before is None else max(wm_before, t - self.lateness)
            due = triggers.next_due(st)
            if due is not None and due < wm_after:
                actions += self._take_rules(st, triggers.on_timers(st, wm_after, self._context(rs, created, partition)),
                                            partition)
        if self.models is not None:
            open_session = st.session if st.session is not None and not st.session.ended else None
            actions += self._take(before_event(st, int(event["timestamp_ms"]), self.models.score, self.mcfg, created))
            if open_session is not None and open_session.ended:  # the user's return ended it
                self._session_examples(st, open_session)
        self._count_population(st, -1)
        res = apply(st, event, wm_before, self.cfg, wall_ms)
        self._count_population(st, +1)
        if self.models is not None:
            actions += self._take(after_event(st, event, self.models.score, self.mcfg, created, res.late,
                                              allow_buffer=self.pending_predictions < self.pending_total_cap))
        if rs is not None:
            if event["type"] == "purchase":
                self._segment_purchase(st)
            actions += self._take_rules(st, triggers.on_event(st, event, res.late, wm_before,
                                                              self._context(rs, created, partition)), partition)
        for a in actions:
            self.metrics.actions.labels(a["type"]).inc()
        st.partition = partition
        self.metrics.events_in.labels(type_label(event["type"])).inc()
        if res.late:
            self.metrics.late.inc()
        if res.session_started:
            self.metrics.sessions.inc()
        clock.observe(int(event["timestamp_ms"]), wall_ms)
        self.timers[partition].set(key, self._due(st))
        self._save(st)
        return res, actions + self.tick(partition, wall_ms)

    def tick(self, partition: int, wall_ms: int) -> list[dict[str, Any]]:
        """Fire every timer of ``partition`` the watermark is past (live mode: idle advance)."""
        clock = self.clock(partition)
        wm = clock.watermark(wall_ms)
        due_keys = self.timers[partition].pop_due(wm)
        if not due_keys or wm is None:
            return []
        created = wall_rfc3339(wall_ms)
        out: list[dict[str, Any]] = []
        rs = self.ruleset()
        ctx = None if rs is None else self._context(rs, created, partition)
        for key in due_keys:
            st = self.load(key)
            if st is None:
                continue
            actions: list[dict[str, Any]] = []
            if ctx is not None:
                actions += self._take_rules(st, triggers.on_timers(st, wm, ctx), partition)
            if self.models is not None:
                open_session = st.session if st.session is not None and not st.session.ended else None
                actions += self._take(on_watermark(st, wm, self.models.score, self.mcfg, created))
                if open_session is not None and open_session.ended:  # the watermark passed its end
                    self._session_examples(st, open_session)
            # what did not fire (e.g. the cart changed) is re-armed from the state
            self.timers[partition].set(key, self._due(st, closed=wm == END_OF_TIME))
            self._save(st)  # it was due: a timer fired, a session ended or a label resolved
            for a in actions:
                self.metrics.actions.labels(a["type"]).inc()
            out.extend(actions)
        out.sort(key=lambda a: (a["event_time_ms"], a["user_key"]))
        return out

    def end_of_input(self, partition: int, source_partition: int, source_partitions: int,
                     wall_ms: int) -> list[dict[str, Any]]:
        """A bounded input ended on one source partition; when all have, close time and fire all."""
        if self.clock(partition).end_of_input(source_partition, source_partitions):
            log.info("partition %d: end of input from all %d source partitions; watermark closed",
                     partition, source_partitions)
            return self.tick(partition, wall_ms)
        return []

    def restore(self, partitions: Iterable[int], items: Iterable[tuple[bytes, bytes]], wall_ms: int) -> int:
        """Rebuild clocks and timer indexes of ``partitions`` from the recovered table.

        Returns the number of pending timers restored.
        """
        keep = set(partitions)
        self.pending_predictions = 0
        for p in list(self.clocks):
            if p not in keep:
                del self.clocks[p]
                self.timers.pop(p, None)
        for p in list(self.segment_members):
            if p not in keep:
                del self.segment_members[p]
        for p in list(self.population):
            if p not in keep:
                del self.population[p]
        for p in keep:  # rebuilt below from the recovered table
            self.segment_members[p] = {}
            self.population[p] = PopulationPrior()
        self.population_total = PopulationPrior()
        max_ts: dict[int, int] = {}
        max_wall: dict[int, int | None] = {}
        due: dict[int, list[tuple[str, int]]] = {p: [] for p in keep}
        for key, raw in items:
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
            if st.life.last_ms is not None and st.life.last_ms >= max_ts.get(st.partition, st.life.last_ms):
                max_ts[st.partition] = st.life.last_ms
                max_wall[st.partition] = st.life.last_wall_ms
            d = self._due(st)
            if d is not None:
                due[st.partition].append((st.key, d))
            self.pending_predictions += len(st.ml.get("pi", []))
        for p in keep:
            clock = self.clock(p)
            clock.restore(max_ts.get(p), wall_ms, max_wall.get(p))
            self.timers[p].rebuild(due[p])
        return sum(len(v) for v in due.values())

    def expire_users(self, partition: int, retention_ms: int, wall_ms: int, limit: int = 10_000) -> int:
        """Delete users of ``partition`` whose newest event is more than ``retention_ms`` of event
        time behind the partition's watermark and who have no pending timer; returns how many.

        Scans the table (O(users)); the worker runs it every few minutes, not per event.
        """
        wm = self.clock(partition).watermark(wall_ms)
        if wm is None or wm == END_OF_TIME:
            return 0
        horizon = wm - retention_ms
        stale = []
        for key, raw in list(self.table.items()):
            try:
                st = UserState.from_bytes(raw)
            except Exception:  # noqa: BLE001 - leave undecodable records to an operator
                continue
            if st.partition == partition and st.life.last_ms is not None and st.life.last_ms < horizon \
                    and self._due(st) is None:
                stale.append(key)
                if len(stale) >= limit:
                    break
        for key in stale:
            st = UserState.from_bytes(self.table[key])
            self._count_population(st, -1)
            members = self.segment_members.setdefault(partition, {})
            for seg in st.rules.get("seg", []):
                members[seg] = max(0, members.get(seg, 0) - 1)
            del self.table[key]
        if stale:
            self.metrics.users_expired.inc(len(stale))
        return len(stale)

    def min_watermark(self, wall_ms: int) -> int | None:
        marks = [c.watermark(wall_ms) for c in self.clocks.values()]
        marks = [m for m in marks if m is not None and m != END_OF_TIME]
        return min(marks) if marks else None
