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

:func:`install` patches C and D, in clickpulse's own process only (the installed packages are not
changed): ``Consumer.ack`` leaves a message no stream tracked, on an acking topic,
unacknowledged (a WARNING): Faust's commits stop below it and the input-gap check or the stall
watchdog restarts the worker, which reads it again (C). ``Consumer._new_offset`` works on the
acknowledged offsets without duplicates, so a commit covers the whole run acknowledged (D).

A, B and E are **not** patched. Patches for them (a never-falsy live view of the active set for
the fetch, a rewind of never-committed partitions to their beginning in ``seek_to_committed``,
delivering every record a fetch returned) removed the stalls from 23 three-worker runs (4 in 8
without them), but with them a restarted single worker twice in three clean-clone CI runs never
received a record fetched right after its start (aiokafka at the log end, Faust's read offset at
the commit, nothing acknowledged) — a regression whose path was not found in the time left, so
they were taken out; the stall watchdog turns those stalls into a restart again.

The stall watchdog stays as the backstop for any other cause. :func:`install` refuses (returns
``False`` and logs why) when the patched methods are not the ones it was written against.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_INSTALLED = "_clickpulse_fixed"


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


def install() -> bool:
    """Patch :class:`faust.transport.consumer.Consumer` with fixes C and D (idempotent).
    Returns ``True`` when they are in place, ``False`` (with a WARNING) when this Faust does not
    have the methods they replace."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer, _INSTALLED, False):
        return True
    if not hasattr(Consumer, "ack") or not hasattr(Consumer, "_new_offset"):
        log.warning("this faust's Consumer has no ack/_new_offset; the rebalance fixes are not installed")
        return False
    Consumer.ack = _refuse_untracked_ack(getattr(Consumer.ack, "_clickpulse_original", Consumer.ack))
    Consumer._new_offset = _whole_runs(getattr(Consumer._new_offset, "_clickpulse_original", Consumer._new_offset))
    setattr(Consumer, _INSTALLED, True)
    return True
