"""Fixes to faust-streaming 0.15 / aiokafka 0.14 that lose input records around a rebalance.

What was seen (docs/operations.md, "Stall watchdog"): after a rebalance a worker keeps input
partitions that were **never committed** in its consumer group; aiokafka's position on them
reaches the log end (every record fetched) while Faust's agent receives none of them and nothing
is ever committed. The stall watchdog caught it in about 4 of 10 three-worker test runs and
restarted the worker (exit 75).

The defects (read in the installed sources; A and B combine, described upstream in
robinhood/faust PR #69 and aio-libs/aiokafka#1003):

A. Faust hands aiokafka's ``Fetcher.fetched_records`` its **live** set of active partitions
   (``AIOKafkaConsumerThread._fetch_records``), which the rebalance empties in place while the
   fetch waits (pausing the revoked and the newly assigned partitions). To aiokafka an empty set
   means *every* partition: the fetch drains the new assignment and advances its positions;
   Faust then drops those records (their partitions are not active) without seeking back.
B. Faust rewinds what it dropped with ``perform_seek`` → ``seek_to_committed`` after recovery
   and whenever it is handed records while its flow is stopped; but aiokafka's
   ``seek_to_committed`` seeks only partitions whose committed offset is **> 0**, so a partition
   never committed (or committed at 0) keeps the advanced position: its records are gone for
   this process.
C. A stream skips a message that waited in its buffer while the consumer generation changed (a
   rebalance) or flow stopped — and *acknowledges* it (``faust/streams.py``: the skip path
   acks "so that the lag does not grow"), so its offset can be committed although no agent saw
   it. A partition that stays with the worker is not rewound, so the record is lost; the next
   record of the partition shows the hole (the input-gap check, docs/delivery.md), but the skipped
   offset may already be committed by then, and a skipped *last* record shows nothing at all.
D. After the seek that ends a rebalance, a record fetched before it and delivered after it makes
   Faust record a *gap* from the committed offset to that record (``_add_gap``); those offsets are
   then read and acknowledged again, so the acknowledged list holds each twice, and
   ``Consumer._new_offset`` — which commits up to the end of the first run of consecutive
   offsets — advances **one offset per commit** (one per second): a partition's commit crawled
   for 2.5–4 minutes after a restart or rebalance while the worker was idle (found by a review
   that logged Faust's internals; the "commits stall after a restart" of docs/delivery.md).
E. Faust filters the records a fetch returned against its live set of active partitions *again*
   after the fetch: a partition that left the set in between (its ``clear()``/``update()``
   when the set is rebuilt, a pause) loses the records aiokafka already handed over, and nothing
   rewinds it — a restarted single worker stalled with its last record (an end-of-input control)
   fetched (aiokafka at the log end) and never delivered, in a clean-clone CI run.

:func:`install` patches all five, in clickpulse's own process only (the installed packages are not
changed): the fetch returns nothing when the active set is empty and reads it through a view
that is never falsy (:class:`LiveActive`: a copy would not do — a partition Faust pauses while the
fetch waits would be drained and then dropped, which a test run showed as input gaps) (A);
``seek_to_committed`` also seeks partitions committed at 0 to 0 and never-committed input
partitions to their beginning — where ``consumer_auto_offset_reset="earliest"`` starts them — so
every dropped record is read again (B). Changelog partitions are left to Faust's recovery.
Reading again is what a rewind to a committed offset already does; clickpulse's engine skips
what its state already holds (:meth:`clickpulse.engine.Engine.redelivered`). ``Consumer.ack``
leaves a message no stream tracked, on an acking topic, unacknowledged (a WARNING): Faust's
commits stop below it and the input-gap check or the stall watchdog restarts the worker, which
reads it again (C). ``Consumer._new_offset`` works on the acknowledged offsets without
duplicates, so a commit covers the whole run acknowledged (D). The records a fetch returned
are delivered whatever became of the active set since (stale ones are still discarded by
Faust's generation and flow checks, which C and B make safe) (E).

The stall watchdog stays as the backstop for any other cause. :func:`install` refuses (returns
``False`` and logs why) when the patched methods are not the ones it was written against.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from typing import Any

log = logging.getLogger(__name__)

_INSTALLED = "_clickpulse_fixed"


class LiveActive(Set[Any]):
    """Faust's live set of active partitions as aiokafka's fetch reads it: membership follows the
    live set (a partition paused while the fetch waits — a rebalance, or Faust's per-partition
    backpressure — is no longer drained), but it is never falsy, so an emptied set means *no*
    partition instead of aiokafka's *every* partition.

    >>> live = {"a"}
    >>> view = LiveActive(live)
    >>> live.clear()
    >>> bool(view), "a" in view, len(view)
    (True, False, 0)
    """

    __slots__ = ("_live",)

    def __init__(self, live: Set[Any]) -> None:
        self._live = live

    def __contains__(self, item: object) -> bool:
        return item in self._live

    def __iter__(self) -> Any:
        return iter(list(self._live))

    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return True


def _refuse_untracked_ack(orig: Any) -> Any:
    """Wrap ``Consumer.ack``: a message of an acking topic that no stream tracked is left
    unacknowledged (fix C, see :func:`install`)."""

    def ack(self: Any, message: Any) -> bool:
        if not getattr(message, "tracked", True) and self.app.topics.acks_enabled_for(message.topic):
            log.warning("faust skipped %s[%d]@%d before a stream took it (its consumer generation changed or "
                        "flow stopped while it waited): left unacknowledged, so it is not committed and is "
                        "read again", message.topic, message.partition, message.offset)
            return False
        return bool(orig(self, message))

    ack._clickpulse_original = orig  # type: ignore[attr-defined]
    return ack


def _keep_drained(orig: Any) -> Any:
    """Wrap ``Consumer._wait_next_records`` (fix E, see :func:`install`)."""

    async def _wait_next_records(self: Any, timeout: float) -> Any:
        records, active = await orig(self, timeout)
        if records and active is not None:  # drained while active: delivered, not dropped
            active = frozenset(active) | frozenset(records)
        return records, active

    _wait_next_records._clickpulse_original = orig  # type: ignore[attr-defined]
    return _wait_next_records


def _dedupe(acked: list[int]) -> bool:
    """Make ``acked`` sorted and free of duplicates, in place; True when it had duplicates."""
    uniq = sorted(set(acked))
    if len(uniq) == len(acked):
        return False
    acked[:] = uniq
    return True


def _whole_runs(orig: Any) -> Any:
    """Wrap ``Consumer._new_offset`` (fix D, see :func:`install`)."""

    def _new_offset(self: Any, tp: Any) -> int | None:
        acked = self._acked[tp]
        _dedupe(acked)
        offset = orig(self, tp)  # adds the recorded gap ranges to ``acked``: duplicates, maybe
        if offset is not None and acked and _dedupe(acked):
            again = orig(self, tp)
            if again is not None and again > offset:
                return int(again)
        return None if offset is None else int(offset)

    _new_offset._clickpulse_original = orig  # type: ignore[attr-defined]
    return _new_offset


async def _seek_to_committed_in_thread(thread: Any) -> Mapping[Any, int | None]:
    """Runs in the consumer thread: aiokafka's seek to the committed offsets, plus the partitions
    it leaves where they are (committed at 0, or never committed). Returns the committed offsets
    (``{TopicPartition: offset or None}``), as aiokafka's does."""
    consumer = thread._ensure_consumer()
    committed: Mapping[Any, int | None] = await consumer.seek_to_committed()  # seeks offsets > 0 only
    changelogs: Set[str] = thread.app.tables.changelog_topics
    fresh = []
    for tp, off in committed.items():
        if tp.topic in changelogs:
            continue
        if off == 0:
            consumer.seek(tp, 0)
        elif off is None:
            fresh.append(tp)
    if fresh:
        await consumer.seek_to_beginning(*fresh)
    return committed


async def _seek_to_committed(self: Any) -> Mapping[Any, int | None]:
    return await self.call_thread(_seek_to_committed_in_thread, self)


def install() -> bool:
    """Patch :class:`faust.transport.drivers.aiokafka.AIOKafkaConsumerThread` (idempotent).
    Returns ``True`` when the fixes are in place, ``False`` (with a WARNING) when this Faust does
    not have the methods they replace."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, _INSTALLED, False):
        return True
    fetch = getattr(cls, "_clickpulse_original_fetch", None) or getattr(cls, "_fetch_records", None)
    if fetch is None or not hasattr(cls, "seek_to_committed") or not hasattr(cls, "call_thread"):
        log.warning("faust %s: AIOKafkaConsumerThread has no _fetch_records/seek_to_committed; "
                    "the rebalance fixes are not installed", getattr(driver, "__version__", "?"))
        return False

    async def _fetch_records(self: Any, consumer: Any, active_partitions: Set[Any],
                             timeout: float | None = None, max_records: int | None = None) -> Any:
        if not active_partitions:  # to aiokafka an empty set means every partition
            return {}
        return await fetch(self, consumer, LiveActive(active_partitions), timeout=timeout, max_records=max_records)

    from faust.transport.consumer import Consumer
    ack = getattr(Consumer.ack, "_clickpulse_original", Consumer.ack)
    new_offset = getattr(Consumer._new_offset, "_clickpulse_original", Consumer._new_offset)
    wait_next = getattr(Consumer._wait_next_records, "_clickpulse_original", Consumer._wait_next_records)

    cls._clickpulse_original_fetch = fetch
    cls._fetch_records = _fetch_records
    cls.seek_to_committed = _seek_to_committed
    Consumer.ack = _refuse_untracked_ack(ack)
    Consumer._new_offset = _whole_runs(new_offset)
    Consumer._wait_next_records = _keep_drained(wait_next)
    setattr(cls, _INSTALLED, True)
    return True
