"""What one engine step returns: plain data, no side effects.

The worker publishes :attr:`Emitted.actions`, :attr:`Emitted.segment_changes` and
:attr:`Emitted.examples`, writes :attr:`Emitted.changed` to the state table (one write per
user per step), marks the changed users' Redis profiles, and applies :attr:`Emitted.counters`
to its Prometheus metrics (:meth:`Emitted.apply_metrics`) — all after the step returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..records import ActionRecord, ExampleRecord, ExperimentRecord, MergeRecord, QuarantineRecord, SegmentChangeRecord
from ..state.user import Applied, UserState

#: a counter's identity: (attribute name on :class:`clickpulse.observability.metrics.Metrics`, label values)
CounterKey = tuple[str, tuple[str, ...]]


@dataclass(slots=True)
class Failed:
    """An input event that could not be processed; it changed nothing (its user is untouched)."""

    index: int       # position in the step's input
    user_key: str
    error: str       # "<ExceptionType>: <message>"
    reason: str = "internal"  # the dead-letter reason (``state_too_large``: the state cap, see Engine)


@dataclass(slots=True)
class Emitted:
    """The output of :meth:`clickpulse.engine.Engine.step`.

    Attributes
    ----------
    actions
        Actions to publish on ``<ns>.actions`` (``schemas/action.v1.json``), in the order they
        were decided.
    segment_changes
        Segment entries/exits for ``<ns>.segments``.
    examples
        Labeled and session examples for ``<ns>.training``.
    changed
        ``user_key -> serialized state`` (``None``: the user was deleted) — the table writes of
        the step, one per user however many of the user's events the step held.
    states
        ``user_key -> UserState`` of the users in :attr:`changed` that still exist (for the
        Redis profiles; do not mutate).
    applied
        One :class:`clickpulse.state.user.Applied` per input event (``None`` for a failed one).
    failed
        Events that raised inside the engine; each was retried alone and changed nothing.
    quarantined
        ``user_key -> record`` of stored states that could not be processed (moved aside for
        ``<ns>.quarantine``; the user continues from a fresh state).
    erased
        What each erasure of the step removed (``user_key``, ``state``, ``timers``,
        ``predictions``, ``segments``), for the audit record.
    observed
        ``(before, after, event time ms)`` per applied event when :attr:`Engine.observe_user` is
        set: that function's view of the user's state just before and just after the event
        (for :mod:`clickpulse.metrics.business`).
    forwards
        Canonical events re-keyed to a customer by a guest's forwarding stub, for the valid
        topic (keyed by their ``user_key``; see :mod:`clickpulse.engine.identity`).
    merges
        Merge records (a guest's state for its customer), for ``<ns>.identity`` keyed by
        ``customer_key``.
    aliases
        ``guest_key -> customer_key`` links made or used by the step (``None``: the link was
        erased), for the Redis alias keys.
    experiments
        First exposures and attributed conversions for ``<ns>.experiments``
        (``schemas/experiment.v1.json``, :mod:`clickpulse.experiments.attribution`).
    counters
        ``(metric attribute, label values) -> increment``.
    gauges
        ``metric attribute -> value`` (unlabelled gauges).
    """

    actions: list[ActionRecord] = field(default_factory=list)
    segment_changes: list[SegmentChangeRecord] = field(default_factory=list)
    examples: list[ExampleRecord] = field(default_factory=list)
    changed: dict[str, bytes | None] = field(default_factory=dict)
    states: dict[str, UserState] = field(default_factory=dict)
    applied: list[Applied | None] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    quarantined: dict[str, QuarantineRecord] = field(default_factory=dict)
    erased: list[dict[str, Any]] = field(default_factory=list)
    observed: list[tuple[Any, Any, int]] = field(default_factory=list)
    forwards: list[dict[str, Any]] = field(default_factory=list)
    merges: list[MergeRecord] = field(default_factory=list)
    aliases: dict[str, str | None] = field(default_factory=dict)
    experiments: list[ExperimentRecord] = field(default_factory=list)
    counters: dict[CounterKey, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)

    def count(self, metric: str, *labels: str, n: float = 1) -> None:
        """Add ``n`` to counter ``metric`` with ``labels`` (applied by :meth:`apply_metrics`)."""
        key = (metric, labels)
        self.counters[key] = self.counters.get(key, 0) + n

    def merge(self, other: Emitted) -> None:
        """Append ``other`` (a later step) to this one."""
        self.actions += other.actions
        self.segment_changes += other.segment_changes
        self.examples += other.examples
        for k, v in other.changed.items():
            self.changed[k] = v
            if v is None:
                self.states.pop(k, None)
        self.states.update(other.states)
        self.applied += other.applied
        self.failed += other.failed
        self.quarantined.update(other.quarantined)
        self.erased += other.erased
        self.observed += other.observed
        self.forwards += other.forwards
        self.merges += other.merges
        self.aliases.update(other.aliases)
        self.experiments += other.experiments
        for k, n in other.counters.items():
            self.counters[k] = self.counters.get(k, 0) + n
        self.gauges.update(other.gauges)

    def apply_metrics(self, metrics: Any) -> None:
        """Increment the Prometheus counters and set the gauges of ``metrics``
        (:class:`clickpulse.observability.metrics.Metrics`)."""
        for (name, labels), n in self.counters.items():
            if n:
                m = getattr(metrics, name)
                (m.labels(*labels) if labels else m).inc(n)
        for name, v in self.gauges.items():
            getattr(metrics, name).set(v)
