"""Fixes to faust-streaming 0.15 / aiokafka 0.14 that lose input records around a rebalance.

What was seen (docs/operations.md, "Stall watchdog"): after a restart or a rebalance a worker's
aiokafka position on an input partition reaches the log end (the records were fetched) while
Faust's agent receives none of them and nothing is committed, or a partition shows a hole of one
record (the input-gap check, docs/delivery.md). The stall watchdog and the gap check caught these
and restarted the worker (exit 75).

The defects (read in the installed sources; A and B are described upstream in robinhood/faust
PR #69 and aio-libs/aiokafka#1003):

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
   record of the partition shows the hole, but the skipped offset may already be committed by
   then, and a skipped *last* record shows nothing at all.
D. After the seek that ends a rebalance, a record fetched before it and delivered after it makes
   Faust record a *gap* from the committed offset to that record (``_add_gap``); those offsets are
   then read and acknowledged again, so the acknowledged list holds each twice, and
   ``Consumer._new_offset`` — which commits up to the end of the first run of consecutive
   offsets — advances **one offset per commit** (one per second): a partition's commit crawled
   for 2.5–4 minutes after a restart or rebalance while the worker was idle.
F. Recovery ends (``faust/tables/recovery.py``, ``Recovery.on_recovery_completed``) by resuming the
   stream partitions, seeking them to the committed offsets, and *then* calling
   ``app.flow_control.resume()`` — although flow was already resumed when the changelogs began to
   be read. mode's ``FlowControlEvent.resume`` **clears every stream's queue**: a record fetched
   after the seek and put on a stream's queue before that call is thrown away, while Faust's read
   offset and aiokafka's position have moved past it. Nothing rewinds it. A single restarted
   worker in a clean-clone CI run lost that way the one record a test published as soon as the
   worker said it was ready (aiokafka at the log end, Faust's read offset there, nothing
   acknowledged, the stall watchdog exited 75 after 185 s); a record lost in the middle of a
   partition is an input gap.
G. That same end of recovery resumes the stream partitions *before* ``perform_seek`` asks the
   broker for the committed offsets; records processed and committed while the answer is on its
   way are then overwritten in Faust's ``_committed_offset`` by the older answer. Their offsets
   have left the acknowledged list (committed), so ``_new_offset`` sees a hole between that
   stale commit and the oldest acknowledged offset and returns nothing: the partition's commits
   stop until the stall watchdog restarts the worker (a reviewer's three-worker run, 4 times; the
   old commit always equal to the broker's at the seek, the oldest acknowledged to its later one).

:func:`install` patches all six, in clickpulse's own process only (the installed packages are
not changed):

- A: the fetch is handed a view of the live set that follows it but is never falsy
  (:class:`LiveActive`), and an empty set fetches nothing.
- B: ``seek_to_committed`` also seeks the input partitions aiokafka leaves where they are: to 0
  when committed at 0, to their first offset (asked of the broker, then an explicit seek) when
  never committed (clickpulse's ``auto_offset_reset`` is ``earliest``). Changelog partitions are
  left to recovery. (A first version used aiokafka's ``seek_to_beginning``, which leaves the
  position unset until a lookup runs; Faust's ``verify_event_path`` read it in between and the
  worker crashed with an AssertionError — a reviewer's three-worker run, twice.)
- C: ``Consumer.ack`` leaves a message no stream tracked, on an acking topic, unacknowledged (a
  WARNING): Faust's commits stop below it and the consumer's rewind, the input-gap check or the
  stall watchdog has it read again.
- D: ``Consumer._new_offset`` works on the acknowledged offsets without duplicates, so a commit
  covers the whole run acknowledged.
- G: ``Consumer.perform_seek`` never moves Faust's record of a partition's committed offset
  backwards: a commit this process made — before the seek or while its question to the broker
  was on its way (``Consumer._commit_offsets`` remembers each) — stays its commit (the broker
  holds it; nobody else commits a partition this worker owns). The first version kept only the
  commits known when the seek began, and a reviewer's run still stalled once on a commit that
  landed during it.
- F: ``FlowControlEvent.resume`` clears the queues only when flow was *suspended* (what they hold
  then is from before the rebalance, and the seek that follows re-reads it); resuming a flow that
  is already running keeps them. A stale message left in a queue is still skipped by the stream
  (its consumer generation differs) and, by C, not acknowledged.

An earlier attempt also delivered every record a fetch returned, even for a partition that left
the active set meanwhile (E); it made more records reach the queues before F's clear and was
dropped. The stall watchdog and the gap check stay as the backstop for any other cause.
:func:`install` refuses (returns ``False`` and logs why) when the patched methods are not the ones
it was written against.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from typing import Any

log = logging.getLogger(__name__)

_INSTALLED = "_clickpulse_fixed"


class LiveActive(Set[Any]):
    """Faust's live set of active partitions as aiokafka's fetch reads it (fix A): membership
    follows the live set (a partition paused while the fetch waits — a rebalance, or Faust's
    per-partition backpressure — is no longer drained), but it is never falsy, so an emptied set
    means *no* partition instead of aiokafka's *every* partition.

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


def _fetch_live(orig: Any) -> Any:
    """Wrap ``AIOKafkaConsumerThread._fetch_records`` (fix A)."""

    async def _fetch_records(self: Any, consumer: Any, active_partitions: Set[Any],
                             timeout: float | None = None, max_records: int | None = None) -> Any:
        if not active_partitions:  # to aiokafka an empty set means every partition
            return {}
        return await orig(self, consumer, LiveActive(active_partitions), timeout=timeout, max_records=max_records)

    _fetch_records._clickpulse_original = orig  # type: ignore[attr-defined]
    return _fetch_records


async def _seek_to_committed_in_thread(thread: Any) -> Mapping[Any, int | None]:
    """Runs in the consumer thread (fix B): aiokafka's seek to the committed offsets, plus the
    input partitions it leaves where they are (committed at 0, or never committed). Returns the
    committed offsets (``{TopicPartition: offset or None}``), as aiokafka's does."""
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
    if fresh:  # an explicit offset: aiokafka's seek_to_beginning leaves the position unset until its
        # lookup runs, and Faust's event-path check crashed the worker (AssertionError) in between
        for tp, off in (await consumer.beginning_offsets(fresh)).items():
            consumer.seek(tp, off)
    return committed


async def _seek_to_committed(self: Any) -> Mapping[Any, int | None]:
    return await self.call_thread(_seek_to_committed_in_thread, self)


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


_COMMITS = "_clickpulse_commits"  # per consumer: {tp: the highest offset this process committed}


def _record_commits(orig: Any) -> Any:
    """Wrap ``Consumer._commit_offsets`` (fix G): remember the highest offset each successful
    commit of this process set, also one that lands while a seek's question is on its way."""

    async def _commit_offsets(self: Any, offsets: Any, *args: Any, **kwargs: Any) -> bool:
        did = await orig(self, offsets, *args, **kwargs)
        if did:
            mine = self.__dict__.setdefault(_COMMITS, {})
            for tp in offsets:
                off = self._committed_offset.get(tp)
                if off is not None and off > mine.get(tp, -1):
                    mine[tp] = off
        return bool(did)

    _commit_offsets._clickpulse_original = orig  # type: ignore[attr-defined]
    return _commit_offsets


def _keep_newer_commits(orig: Any) -> Any:
    """Wrap ``Consumer.perform_seek`` (fix G): a committed offset the seek read before a commit
    of this process landed does not replace that commit."""

    async def perform_seek(self: Any) -> None:
        before = {tp: off for tp, off in self._committed_offset.items() if off is not None}
        await orig(self)
        for tp, off in [*before.items(), *self.__dict__.get(_COMMITS, {}).items()]:
            now = self._committed_offset.get(tp)
            if now is None or now < off:
                self._committed_offset[tp] = off

    perform_seek._clickpulse_original = orig  # type: ignore[attr-defined]
    return perform_seek


def _resume_keeping_live_queues(orig: Any) -> Any:
    """Wrap ``mode.utils.queues.FlowControlEvent.resume`` (fix F): the queues are cleared only
    when flow was suspended."""

    def resume(self: Any) -> None:
        if not self._suspend.is_set():  # already flowing: the queues hold live records
            self._resume.set()
            return
        orig(self)

    resume._clickpulse_original = orig  # type: ignore[attr-defined]
    return resume


def _original(fn: Any) -> Any:
    return getattr(fn, "_clickpulse_original", fn)


def install() -> bool:
    """Patch Faust's aiokafka consumer thread (A, B), :class:`faust.transport.consumer.Consumer`
    (C, D, G) and mode's ``FlowControlEvent`` (F); idempotent. Returns ``True`` when they are in
    place, ``False`` (with a WARNING, nothing patched) when this Faust or mode does not have the
    methods they replace."""
    from faust.transport.consumer import Consumer
    from faust.transport.drivers import aiokafka as driver
    from mode.utils.queues import FlowControlEvent

    thread = driver.AIOKafkaConsumerThread
    if getattr(Consumer, _INSTALLED, False):
        return True
    needed = {thread: ("_fetch_records", "seek_to_committed", "call_thread"), Consumer: ("ack", "_new_offset", "perform_seek", "_commit_offsets"),
              FlowControlEvent: ("resume",)}
    missing = [f"{cls.__name__}.{name}" for cls, names in needed.items() for name in names if not hasattr(cls, name)]
    if missing or not hasattr(FlowControlEvent(), "_suspend"):
        log.warning("this faust/mode lacks %s; the rebalance fixes are not installed",
                    ", ".join(missing) or "FlowControlEvent._suspend")
        return False
    thread._fetch_records = _fetch_live(_original(thread._fetch_records))
    thread.seek_to_committed = _seek_to_committed
    Consumer.ack = _refuse_untracked_ack(_original(Consumer.ack))
    Consumer._new_offset = _whole_runs(_original(Consumer._new_offset))
    Consumer.perform_seek = _keep_newer_commits(_original(Consumer.perform_seek))
    Consumer._commit_offsets = _record_commits(_original(Consumer._commit_offsets))
    FlowControlEvent.resume = _resume_keeping_live_queues(_original(FlowControlEvent.resume))
    setattr(Consumer, _INSTALLED, True)
    return True
