"""Per-partition event-time clocks (watermarks) and the event-time timer index.

Watermark of a partition = highest *clock candidate* seen on it − allowed lateness (never moves
back). An event's clock candidate is ``min(event time, receive time)`` (:func:`clock_candidate`;
the receive time is the Kafka record timestamp capped at the worker's wall clock, the same time
the contract clamps future-skewed event times against): an event may advance the partition's
event time only up to when it arrived, so no single producer — a skewed client clock within
``CLICKPULSE_MAX_FUTURE_SKEW_S``, or a hostile one — can move the engine's time ahead of real
time and make the honest events that follow late. The event itself keeps its timestamp (its
state, its own timers). Historical data (replay: receive time far after event time) is
unaffected: there the candidate is the event time. In ``live`` mode, once the partition has had no event for ``idle_timeout_ms`` of wall
clock, its event time advances with the wall clock from its newest event: ``max event time +
(wall now − wall time that event arrived)``, so timers fire without further traffic (SCENARIOS
S1). Anchoring on the partition's own newest event (not on the wall clock itself) keeps client
clock skew and replays of old data in live mode from making everything late; ``replay`` mode
never looks at the wall clock. A bounded input
can close its time with ``end_of_input`` from every source partition: the watermark becomes
:data:`END_OF_TIME` and every pending timer fires (like the final watermark of a bounded stream
in Flink or Beam).

Examples
--------
>>> c = PartitionClock(allowed_lateness_ms=10_000, idle_timeout_ms=5_000, live=True)
>>> c.observe(60_000, wall_ms=1_000_000); c.watermark(wall_ms=1_000_000)
50000
>>> c.watermark(wall_ms=1_000_000 + 4_000)   # not idle long enough
50000
>>> c.watermark(wall_ms=1_000_000 + 30_000)  # idle: event time advances with the wall clock
80000
>>> c.observe(95_000, wall_ms=2_000_000)
>>> c.watermark(wall_ms=2_000_000)
85000
>>> c.observe(400_000, wall_ms=2_000_100, received_ms=100_000)  # 300 s ahead of its arrival
>>> c.watermark(wall_ms=2_000_100)                              # moves time to the arrival only
90000

End-of-input controls accepted on the partition are remembered by id with the raw offset they
were read at (:meth:`PartitionClock.accept_control`), durably (the clock log, see
:meth:`clickpulse.engine.Engine.checkpoint`), so a captured control replayed — even after a
restart — is refused, while the same raw record read again (a redelivery: its offset was not
committed before a rebalance or a restart) is told apart and applied again (idempotent):

>>> c.accept_control("run-1:0:1000", issued_ms=1_000, wall_ms=2_000, max_age_ms=600_000, raw_offset=41)
'accepted'
>>> c.accept_control("run-1:0:1000", issued_ms=1_000, wall_ms=3_000, max_age_ms=600_000, raw_offset=41)
'redelivered'
>>> c.accept_control("run-1:0:1000", issued_ms=1_000, wall_ms=3_000, max_age_ms=600_000, raw_offset=97)
'replayed'
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Literal

END_OF_TIME = 2**62


def clock_candidate(ts_ms: int, received_ms: int | None) -> int:
    """How far an event may move its partition's event time: ``min(event time, receive time)``
    (epoch ms; the event time alone when the receive time is unknown).

    >>> clock_candidate(1_000, 900), clock_candidate(1_000, 5_000), clock_candidate(1_000, None)
    (900, 1000, 1000)
    """
    return ts_ms if received_ms is None or received_ms >= ts_ms else received_ms


class PartitionClock:
    """Watermark of one partition.

    Parameters
    ----------
    allowed_lateness_ms
        Milliseconds of event time an event may be behind the partition's maximum and still count.
    idle_timeout_ms
        Wall-clock milliseconds without events after which a live partition follows the wall clock.
    live
        ``True`` for live mode (idle advance), ``False`` for replay mode.
    """

    __slots__ = ("lateness", "idle", "live", "max_ts", "last_event_wall", "wm", "eoi_sources", "closed", "controls",
                 "restored_wall")

    def __init__(self, allowed_lateness_ms: int, idle_timeout_ms: int, live: bool) -> None:
        self.lateness = allowed_lateness_ms
        self.idle = idle_timeout_ms
        self.live = live
        self.max_ts: int | None = None
        self.last_event_wall: int | None = None
        self.wm: int | None = None
        self.eoi_sources: set[int] = set()
        self.closed = False
        #: ids of the end-of-input controls accepted (:meth:`accept_control`) -> (their issue time,
        #: epoch ms; the raw offset they were read at; their run's number of source partitions —
        #: ``None`` when unknown)
        self.controls: dict[str, tuple[int, int | None, int | None]] = {}
        #: wall-clock time of the last :meth:`restore` (epoch ms): idleness is counted from it
        self.restored_wall: int | None = None

    def observe(self, ts_ms: int, wall_ms: int, received_ms: int | None = None) -> None:
        """Record an event with event time ``ts_ms`` processed at wall time ``wall_ms``; it moves
        the clock to :func:`clock_candidate` ``(ts_ms, received_ms)`` at most (``received_ms``:
        when it reached the broker, epoch ms; ``None``: unknown, the event time counts)."""
        cand = clock_candidate(ts_ms, received_ms)
        if self.max_ts is None or cand > self.max_ts:
            self.max_ts = cand
        self.last_event_wall = wall_ms
        self._raise(self.max_ts - self.lateness)

    def restore(self, max_ts: int | None, wall_ms: int, max_ts_wall_ms: int | None = None) -> None:
        """After a restart: the highest event time in the recovered state and the wall-clock time
        it arrived at (so the idle clock keeps counting through the downtime); ``wall_ms`` is now.

        The partition is not *idle* before ``idle_timeout_ms`` has passed since the restore
        without an event (:meth:`watermark`): the input that arrived during the downtime is read
        first. Counted from the last event alone, a worker restarted after 25 s moved event time
        past that backlog at its first tick and fired timers its unread events would have cancelled
        (5 wrong ``assistance_offer`` actions in a reviewer's three-worker run)."""
        self.restored_wall = wall_ms
        if max_ts is not None:
            self.max_ts = max_ts if self.max_ts is None else max(self.max_ts, max_ts)
            self._raise(self.max_ts - self.lateness)
        if self.last_event_wall is None:
            self.last_event_wall = max_ts_wall_ms if max_ts_wall_ms is not None else wall_ms

    def end_of_input(self, source_partition: int, source_partitions: int) -> bool:
        """One source partition reports the end of a bounded input; returns True once all have."""
        self.eoi_sources.add(source_partition)
        if len(self.eoi_sources) >= source_partitions:
            self.close()
        return self.closed

    def accept_control(self, control_id: str, issued_ms: int, wall_ms: int, max_age_ms: int,
                       raw_offset: int | None = None,
                       source_partitions: int | None = None) -> Literal["accepted", "redelivered", "replayed"]:
        """Whether the end-of-input control ``control_id``, read at ``raw_offset`` of its raw
        partition, may take effect on this partition:

        * ``"accepted"`` — the first time (then it is remembered, with ``source_partitions``: how
          many source partitions its run has, for :meth:`input_ended`);
        * ``"redelivered"`` — seen before *at the same raw offset*: the same raw record read again
          (its offset was not committed before a rebalance or a restart); applying it again
          changes nothing it had not already changed;
        * ``"replayed"`` — seen before at another raw offset, or with an unknown offset: the same
          signed message sent again (refused).

        Ids issued more than ``max_age_ms`` before ``wall_ms`` are forgotten
        (:meth:`forget_controls`): a control that old is refused as stale before it gets here
        (``CONTROL_MAX_AGE_MS``), so the memory stays bounded by the controls of one window."""
        self.forget_controls(wall_ms, max_age_ms)
        seen = self.controls.get(control_id)
        if seen is None:
            self.controls[control_id] = (issued_ms, raw_offset, source_partitions)
            return "accepted"
        return "redelivered" if raw_offset is not None and seen[1] == raw_offset else "replayed"

    def forget_controls(self, wall_ms: int, max_age_ms: int) -> None:
        """Forget the accepted controls issued more than ``max_age_ms`` before ``wall_ms``."""
        for cid in [c for c, v in self.controls.items() if wall_ms - v[0] > max_age_ms]:
            del self.controls[cid]

    def input_ended(self) -> bool:
        """True when the accepted controls (:meth:`accept_control`) hold an end of input from
        every source partition ``0 … n-1`` of one run (ids ``"<run_id>:<source>:<issued_at_ms>"``,
        :func:`clickpulse.events.control.control_id`; ``n`` = the run's ``source_partitions``).
        The controls are durable (the clock log), so a restart or a rebalance within their
        freshness window closes the partition again; controls of different runs never combine.

        >>> c = PartitionClock(1_000, 1_000, live=False)
        >>> for src in (0, 1):
        ...     _ = c.accept_control(f"a:{src}:5", 5, 10, 600_000, raw_offset=9, source_partitions=3)
        >>> _ = c.accept_control("b:2:7", 7, 10, 600_000, raw_offset=4, source_partitions=3)
        >>> c.input_ended()            # run a lacks source 2; run b's source 2 does not count
        False
        >>> _ = c.accept_control("a:2:5", 5, 10, 600_000, raw_offset=12, source_partitions=3)
        >>> c.input_ended()
        True
        """
        runs: dict[str, tuple[set[int], int]] = {}
        for cid, (_issued, _off, n) in self.controls.items():
            run, _, rest = cid.rpartition(":")
            run, _, src = run.rpartition(":")
            if n is None or not src.isdigit():
                continue
            have, want = runs.get(run, (set(), n))
            have.add(int(src))
            runs[run] = (have, max(want, n))
        return any(have >= set(range(n)) for have, n in runs.values())

    def close(self) -> None:
        """Close the partition's event time: the watermark becomes :data:`END_OF_TIME`."""
        self.closed = True
        self.wm = END_OF_TIME

    def _raise(self, candidate: int) -> None:
        if self.wm is None or candidate > self.wm:
            self.wm = candidate

    def watermark(self, wall_ms: int | None = None) -> int | None:
        """The current watermark (epoch ms), ``None`` before any event; ``END_OF_TIME`` once closed.

        Live mode: once no event has come for ``idle_timeout_ms`` (counted from the later of the
        last event and the last :meth:`restore`), event time follows the wall clock from the last
        event on."""
        if self.live and wall_ms is not None and self.last_event_wall is not None and self.max_ts is not None \
                and wall_ms - max(self.last_event_wall, self.restored_wall or 0) >= self.idle:
            self._raise(self.max_ts + (wall_ms - self.last_event_wall) - self.lateness)
        return self.wm


class TimerIndex:
    """Pending event-time timers of one partition: which user is due when.

    A min-heap with lazy deletion; ``set(key, due)`` replaces the key's timer, ``set(key, None)``
    cancels it. ``pop_due(wm)`` returns the keys whose due time is strictly before ``wm``.

    >>> ti = TimerIndex(); ti.set("a", 10); ti.set("b", 5); ti.set("a", 20)
    >>> ti.pop_due(15), len(ti)
    (['b'], 1)
    """

    __slots__ = ("_heap", "_due")

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._due: dict[str, int] = {}

    def set(self, key: str, due_ms: int | None) -> None:
        if due_ms is None:
            self._due.pop(key, None)
            return
        if self._due.get(key) == due_ms:
            return
        self._due[key] = due_ms
        heapq.heappush(self._heap, (due_ms, key))
        if len(self._heap) > 4 * len(self._due) + 64:
            self._heap = [(d, k) for k, d in self._due.items()]
            heapq.heapify(self._heap)

    def pop_due(self, watermark_ms: int | None) -> list[str]:
        out: list[str] = []
        if watermark_ms is None:
            return out
        while self._heap and self._heap[0][0] < watermark_ms:
            due, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                out.append(key)
        return out

    def rebuild(self, items: Iterable[tuple[str, int]]) -> None:
        self._due = dict(items)
        self._heap = [(d, k) for k, d in self._due.items()]
        heapq.heapify(self._heap)

    def next_due(self) -> int | None:
        return min(self._due.values()) if self._due else None

    def __len__(self) -> int:
        return len(self._due)
