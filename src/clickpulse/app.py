"""The Faust app: topics, the state table and thin agents around the batch engine step.

Nothing here decides anything: the agents read the stream in batches (``take_events``), call
:func:`clickpulse.events.contract.parse` and :meth:`clickpulse.engine.Engine.step`, write the
step's changed users to the table (one write per user per batch), and publish what it returned
without awaiting message by message (:class:`Publisher`: at most
``CLICKPULSE_MAX_IN_FLIGHT_BATCHES`` batches un-acknowledged, then the agent waits — so a commit
never waits behind an unbounded producer backlog).

* ``ingest``  (two-hop mode, the default) raw → parse/validate/normalize → valid (keyed by user)
              | dead-letter topic; signed control is forwarded to every valid partition, unsigned
              control is dead-lettered as ``forged_control``
* ``process`` valid (and, with ``CLICKPULSE_RAW_KEYED``, raw: one hop) → engine step → state
              table, actions, segment changes, training examples, Redis profiles; identity
              stitching (docs/identity.md): link events (identify/alias with both ids) are keyed by
              the guest at ingest, a linked guest's events are forwarded to the valid topic keyed
              by its customer, merge records go through ``<ns>.identity`` (keyed by the customer)
* timers      live mode: every second, fire timers of idle partitions (watermark follows wall
              clock); every ``redis_flush_interval_s``: flush profiles to Redis; every
              ``rules_poll_s``: reload the rules file when it changed; every 5 min: expire users
* segment sizes  every ``segment_sizes_interval_s``: publish this worker's partitions' segment
              member counts (when changed) to ``<ns>.segment-sizes``; a task reads the whole topic
              for the other partitions' counts (global ``min_size``, docs/scaling.md)
* web         ``/metrics``, ``/progress``, ``/segments``, ``/rules``, ``/business`` (business metrics, clickpulse.metrics.business), ``/recs``

Delivery: at least once, none lost (docs/delivery.md). A batch's actions are acknowledged by
the broker before its users' changelog records are sent, then each partition's clock log (its
input position, the raw positions of forwarded events, its clock) is written after them; a
restarted worker resumes each partition there and skips the re-read input up to it
(:meth:`clickpulse.engine.Engine.restore`, :meth:`~clickpulse.engine.Engine.redelivered`). Only
the batch a crash cut is processed again: its actions may be published again (the same
``action_id``, deterministic; consumers de-duplicate by it, e.g. ``clickpulse deliver``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import store as _store  # registers the clickpulse-rocksdb:// table store
from .store import key_partition
from .engine import CLOCK_KEY_PREFIX, Emitted, Engine, build_engine, clock_key
from .engine.factory import build_models, build_rules
from .engine.identity import route
from .errors import InvalidEvent
from .events.contract import parse
from .events.control import (
    CONTROL_HEADER,
    CONTROL_MAX_AGE_MS,
    CONTROL_SIG_HEADER,
    control_id,
    control_problem,
    verify_control,
)
from .events.dlq import dlq_record
from .events.pii import PiiPolicy
from .models.trainer import metric_samples
from .observability.health import KafkaProbe, ProgressWatch, Readiness, redis_ping
from .observability.latency import observe_step
from .observability.metrics import Metrics, type_label
from .serving.redis_sink import ProfileRefill, ProfileWriter, engine_profile
from .settings import Settings
from .state.user import UserState

log = logging.getLogger(__name__)


def header(headers: Any, name: str) -> bytes | None:
    """A Kafka header's value from Faust's list-of-pairs or mapping form."""
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if k == name:
            return v if isinstance(v, bytes) else str(v).encode()
    return None


#: header of an event the ingest stage forwarded to the valid topic: ``b"<raw partition>:<raw
#: offset>"``, so the process stage recognises the events the ingest forwards again after a
#: restart (:meth:`clickpulse.engine.Engine.redelivered`)
SOURCE_HEADER = "clickpulse-src"


def source_of(headers: Any) -> tuple[int, int] | None:
    """``(raw partition, raw offset)`` from a forwarded event's :data:`SOURCE_HEADER`; ``None``
    when absent or malformed (the valid topic is internal, but nothing read is trusted blindly)."""
    v = header(headers, SOURCE_HEADER)
    if v is None or len(v) > 40:
        return None
    part, _, off = v.partition(b":")
    if not (part.isdigit() and off.isdigit()):
        return None
    return int(part), int(off)


class InputGaps:
    """Detects input messages the consumer never delivered, and stops the worker before they can
    be committed.

    The raw and valid topics are neither compacted nor written in transactions, so a partition's
    offsets are contiguous: after offset ``n`` the next message must be ``n + 1``, and the first
    one at most the later of the committed offset and the saved position + 1 (messages up to the
    saved position are in the state already; a re-read of them is fine).
    A jump means the consumer skipped messages — seen with Faust under load, which then takes the
    hole for a compaction gap and commits past it once a later message is acknowledged, losing
    those events. :meth:`see` logs it as an ERROR, counts it
    (``clickpulse_input_gaps_total{topic}``) and returns False: the agent must end the process
    before acknowledging anything after the hole (exit code 75), so the commit stays before it and
    the successor reads the skipped messages. A hole seen again at the same place after a restart
    (a marker file in the data directory) is real — e.g. records deleted by retention — and is
    accepted with a WARNING, so a restart never loops on it.

    A rebalance (:meth:`reset`) does not forget where a partition had got to: the first message
    of a partition after it may be at most the latest of the committed offset, the saved position
    + 1 and the offset after the last one this worker saw of it. The consumer re-reads a retained
    partition from its committed offset, but a message fetched before the rebalance can still be
    delivered after it, beyond that offset while the commit of the ones before it is under way;
    judged against the committed offset alone it was a false alarm (the worker exited 75 on a
    rebalance). Messages this worker already saw are in its state, so no real skip is missed
    there.

    The committed offset comes from Faust's consumer, which learns it for a newly assigned
    partition only when its recovery seeks (``perform_seek``); a record can reach the agent just
    before that. A first message beyond the other bounds while the committed offset is still
    unknown is therefore not judged at once: :meth:`see` returns ``None`` and the agent awaits
    :meth:`confirm`, which asks the broker for the group's committed offset (``fetch_committed``)
    — a three-worker run exited 75 three times on such a false alarm (the saved position 1189,
    the commit 1551: the records between were duplicates skipped as already applied), and the
    third time took the "hole" as real. The same holds when nothing else bounds the first message
    (the raw topic has no saved position; nothing seen yet): it is judged against the broker's
    commit, not taken as the start — a restarted worker whose first raw[0] record was 1275 while
    the commit was 508 took 1275 as the start and lost 767 records unnoticed. Only with no commit
    at all (a new group) or no broker to ask is the first message the start."""

    def __init__(self, metrics: Metrics, committed: Any, data_dir: str, saved: Any = None,
                 fetch_committed: Any = None) -> None:
        self.metrics = metrics
        self.committed = committed  # (topic, partition) -> committed offset or None
        self.saved = saved  # (topic, partition) -> last offset the saved state holds, or None
        #: async (topic, partition) -> the group's committed offset from the broker, or None
        self.fetch_committed = fetch_committed
        self.marks = Path(data_dir) / "input-gaps"
        self.next: dict[tuple[str, int], int] = {}  # partition -> the offset after the last one seen
        self.checked: set[tuple[str, int]] = set()  # partitions whose first message since a rebalance came
        self.bounds: dict[tuple[str, int], str] = {}  # what the first message since a rebalance was judged on
        #: partitions whose first message awaits :meth:`confirm` -> the bound known without the broker
        self.floor: dict[tuple[str, int], int | None] = {}

    def reset(self) -> None:
        """A rebalance: the next message of each partition is checked against its start again."""
        self.checked.clear()

    def see(self, msg: Any) -> bool | None:
        """True: in order; False: a gap (logged, counted: end the process with exit 75); None:
        the first message since a rebalance lies beyond the bounds while the committed offset is
        unknown — await :meth:`confirm`."""
        key = (msg.topic, msg.partition)
        nxt = self.next.get(key)
        if key not in self.checked:  # the first message of this partition: where must it be at most?
            self.checked.add(key)
            last = None if nxt is None else nxt - 1
            starts = [] if nxt is None else [nxt]
            c = self.committed(msg.topic, msg.partition)
            if isinstance(c, int) and c >= 0:
                starts.append(c)
            pos = None if self.saved is None else self.saved(msg.topic, msg.partition)
            if isinstance(pos, int):
                starts.append(pos + 1)  # what the saved state holds needs no reading
            floor = max(starts) if starts else None
            nxt = self.next[key] = msg.offset if floor is None else floor
            self.bounds[key] = f"committed {c}, saved {pos}, last seen {last}, first {msg.offset}"
            if (not (isinstance(c, int) and c >= 0) and self.fetch_committed is not None
                    and (floor is None or msg.offset > floor)):
                self.floor[key] = floor
                return None
        return self._judge(msg, key, nxt)

    async def confirm(self, msg: Any) -> bool:
        """Judge the first message after :meth:`see` returned None, with the group's committed
        offset fetched from the broker (a failed fetch: judged without it)."""
        key = (msg.topic, msg.partition)
        try:
            c = await self.fetch_committed(msg.topic, msg.partition)
        except Exception as err:  # noqa: BLE001 - judged without it (as before the fetch)
            log.warning("input gap check: committed offset of %s[%d] not fetched (%s: %s)",
                        msg.topic, msg.partition, type(err).__name__, err)
            c = None
        floor = self.floor.pop(key, None)
        if isinstance(c, int) and c >= 0 and (floor is None or c > floor):
            log.info("input gap check: %s[%d] starts at the group's committed offset %d (fetched from the "
                     "broker; the other bounds: %s)", msg.topic, msg.partition, c, floor)
            floor = c
        nxt = self.next[key] = msg.offset if floor is None else floor
        return self._judge(msg, key, nxt)

    def _judge(self, msg: Any, key: tuple[str, int], nxt: int) -> bool:
        if msg.offset > nxt:
            self.metrics.input_gaps.labels(msg.topic).inc()
            mark = self.marks / f"{msg.topic}-{msg.partition}-{nxt}-{msg.offset}"
            if mark.exists():
                log.warning("input gap: %s[%d] offsets %d-%d are missing again after a restart: taken as a real "
                            "hole in the log", msg.topic, msg.partition, nxt, msg.offset - 1)
            else:
                log.error("input gap: %s[%d] offsets %d-%d never reached this worker (the consumer skipped them); "
                          "the next message is %d: exiting before it is acknowledged, so that they are read again "
                          "(since the last rebalance: %s)",
                          msg.topic, msg.partition, nxt, msg.offset - 1, msg.offset, self.bounds.get(key, "-"))
                try:
                    self.marks.mkdir(parents=True, exist_ok=True)
                    mark.touch()
                except OSError:
                    pass
                return False
        if msg.offset >= nxt:
            self.next[key] = msg.offset + 1
        return True


async def group_committed(settings: Settings, topic: str, partition: int, timeout_s: float = 10.0) -> int | None:
    """The worker group's committed offset of ``topic[partition]`` from the broker (a short-lived
    admin client; ``None``: nothing committed). Raises what the client raised, or
    ``asyncio.TimeoutError`` after ``timeout_s`` seconds."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    tp = TopicPartition(topic, partition)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        offs = await asyncio.wait_for(admin.list_consumer_group_offsets(settings.app_id, partitions=[tp]), timeout_s)
    finally:
        await admin.close()
    meta = offs.get(tp)
    return meta.offset if meta is not None and meta.offset >= 0 else None


def exit_leaving_group(app: Any, code: int, timeout_s: float = 2.0) -> None:
    """End the process at once with ``code`` (``os._exit``: nothing more is acknowledged,
    committed or flushed), after a best-effort LeaveGroup request from the Faust consumer's
    aiokafka consumer (at most ``timeout_s``; no offset is committed by it), so the group
    rebalances the worker's partitions now rather than after the session timeout
    (``CLICKPULSE_KAFKA_SESSION_TIMEOUT_S``, 30 s by default) — found by an operator review: an
    exit 75 used to leave the partitions unowned that long."""
    try:
        thread = app.consumer._thread
        consumer = thread._consumer
        if consumer is not None:
            fut = asyncio.run_coroutine_threadsafe(consumer._coordinator._maybe_leave_group(), thread.thread_loop)
            fut.result(timeout=timeout_s)
    except BaseException:  # noqa: BLE001 - exiting anyway
        pass
    finally:
        logging.shutdown()
        os._exit(code)


def _now_ms() -> int:
    return int(time.time() * 1000)


def faust_tuning() -> dict[str, Any]:
    """Tuned ``faust.App`` settings for a high-rate consume -> produce agent (faust-streaming 0.15).

    The worker's and the benchmarks' bare Faust passthrough's. Chosen by the sweep in ``benchmarks/README.md`` ("Faust tuning"): each value against the
    defaults, interleaved, on this 2-core host.

    * ``broker_max_poll_records`` (default None: unbounded): records per ``getmany`` of the
      aiokafka consumer. Bounding it keeps one poll's work short (fairer between partitions,
      shorter pauses of timers and the web server); the sweep saw no throughput cost at 1000+.
    * ``stream_buffer_maxsize`` (default 4096): messages a stream may prefetch before the
      conductor stops fetching for it (back pressure). Larger lets fetches overlap processing.
    * ``producer_linger`` (seconds; ``producer_linger_ms`` is the deprecated alias; default 0):
      how long the producer waits to fill a batch. A few ms turn many tiny produce requests into
      few larger ones; it adds at most that much to the produce -> output latency.
    * ``producer_max_batch_size`` (bytes per partition batch, default 16384): with ~400-byte
      events the default holds ~40 messages; a larger batch means fewer requests.
    * ``broker_commit_every`` (default 10000) / ``broker_commit_interval`` (s, default 2.8):
      commit offsets after this many acked messages / this often. Commits are cheap but not
      free; they bound the re-processing after a crash (at-least-once).
    * ``stream_wait_empty=False`` (default True): do not wait for in-flight events before a
      rebalance or shutdown (the worker's processing is idempotent per event id).
    * ``producer_acks=-1`` (``all``, Faust's default): the leader waits for the in-sync replicas;
      the durability clickpulse wants for actions and the table changelog.
    * ``consumer_max_fetch_size`` (bytes per partition per fetch, default 1 MiB).
    """
    return {
        "broker_max_poll_records": 2000,
        "stream_buffer_maxsize": 16384,
        "producer_linger": 0.005,
        "producer_max_batch_size": 256 * 1024,
        "broker_commit_every": 10_000,
        "broker_commit_interval": 1.0,
        "stream_wait_empty": False,
        "producer_acks": -1,
        "consumer_max_fetch_size": 4 * 1024 * 1024,
    }


class Publisher:
    """Sends a batch's records through Faust's producer without awaiting each acknowledgement.

    Keeps the acknowledgement futures of the last ``max_in_flight`` batches; when a new batch
    would exceed that, waits for the oldest (backpressure). A failed send is logged and counted
    (``clickpulse_publish_errors_total``). A send that failed for a reason a restart can get
    past — the broker unreachable or timing out after the producer's own retries
    (:func:`transient`) — **ends the process at once** (exit code 75, ``on_fatal``), before Faust
    can commit the input it came from: the successor processes that input again (at least
    once). A record the broker can never take (too large, not authorized) is counted and logged
    and the worker goes on: restarting would fail on it forever.
    """

    def __init__(self, app: faust.App, metrics: Metrics, max_in_flight: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.in_flight: collections.deque[list[Any]] = collections.deque()
        self.on_fatal: Any = lambda code: exit_leaving_group(app, code)
        #: output (not changelog) records were sent since the last :meth:`drain`
        self.output_in_flight = False

    async def send(self, records: Sequence[tuple[Any, ...]], output: bool = True) -> None:
        """``records``: ``(topic, key, value, partition or None, headers or None[, timestamp])``;
        the optional timestamp (epoch seconds, float) becomes the record's Kafka timestamp;
        ``output``: False for the state changelog."""
        if not records:
            return
        self.output_in_flight = self.output_in_flight or output
        producer = self.app.producer
        futs = [await producer.send(r[0], r[1], r[2], r[3], r[5] if len(r) > 5 else None, r[4]) for r in records]
        for fut in futs:  # runs as soon as the broker answers, before a flush (and commit) resumes
            fut.add_done_callback(self._check)
        self.in_flight.append(futs)
        while len(self.in_flight) > self.max_in_flight:
            await self._settle(self.in_flight.popleft())

    async def drain(self) -> None:
        """Wait for every in-flight batch."""
        self.output_in_flight = False
        while self.in_flight:
            await self._settle(self.in_flight.popleft())

    async def _settle(self, futs: list[Any]) -> None:
        for res in await asyncio.gather(*futs, return_exceptions=True):
            if isinstance(res, BaseException):
                self.metrics.publish_errors.inc()
                log.error("publish failed: %s: %s", type(res).__name__, res)

    def _check(self, fut: Any) -> None:
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None and transient(err):
            log.critical("publish failed after the producer's retries (%s: %s): exiting before the input is "
                         "committed, so that it is processed again", type(err).__name__, err)
            logging.shutdown()
            self.on_fatal(75)


def transient(err: BaseException) -> bool:
    """True for a publish failure a restart can get past: aiokafka's retriable errors (no
    leader, not enough replicas...), connection errors and the delivery timeout."""
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
    return bool(getattr(err, "retriable", False)) or isinstance(err, KafkaConnectionError | KafkaTimeoutError
                                                                 | asyncio.TimeoutError)


def _dead_letter_log() -> Any:
    from .events.dlq import DeadLetterLog
    return DeadLetterLog(log)


@dataclass
class Worker:
    """What the wiring functions share."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    engine: Engine
    writer: ProfileWriter
    publisher: Publisher
    topics: dict[str, Any]
    progress: dict[str, dict[int, int]]
    pii: PiiPolicy | None = None
    #: ids (events.control.control_id) of the end-of-input messages accepted in the last
    #: CONTROL_MAX_AGE_MS -> (their issue time, epoch ms; the raw offset they were read at);
    #: durably: Engine.control_seen
    controls_seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: business metrics fed by every step (clickpulse.metrics.business; see _wire_business)
    business: Any = None
    #: dead letters logged at DEBUG, summarized at most every 10 s (clickpulse.events.dlq.DeadLetterLog)
    dead_letters: Any = field(default_factory=lambda: _dead_letter_log())

    # -- output ------------------------------------------------------------------------------
    def records(self, em: Emitted) -> list[tuple[str, bytes | None, bytes, int | None, Any]]:
        s = self.settings
        out: list[tuple[str, bytes | None, bytes, int | None, Any]] = []
        dumps = orjson.dumps
        for a in em.actions:
            out.append((s.topic_actions, a["user_key"].encode(), dumps(a), None, None))
        for ch in em.segment_changes:
            out.append((s.topic_segments, ch["user_key"].encode(), dumps(ch), None, None))
        for ex in em.examples:
            out.append((s.topic_training, ex["user_key"].encode(), dumps(ex), None, None))
        for xr in em.experiments:  # experiment exposures and conversions (clickpulse.experiments)
            out.append((s.topic_experiments, xr["user_key"].encode(), dumps(xr), None, None))
        for key, q in em.quarantined.items():
            out.append((s.topic_quarantine, key.encode(), dumps(q), None, None))
        for ev in em.forwards:  # a linked guest's events, re-keyed to its customer
            out.append((s.topic_valid, ev["user_key"].encode(), dumps(ev), None, None))
        for m in em.merges:     # a guest's state for its customer
            out.append((s.topic_identity, m["customer_key"].encode(), dumps(m), None, None))
        return out

    async def emit(self, em: Emitted, extra: list[Any] | None = None,
                   clocks: dict[int, bytes] | None = None) -> None:
        """Commit a step (local store writes, metrics), mark profiles and publish: first the
        step's records (actions, segment changes, examples, quarantine, ``extra``), **waiting for
        the broker's acknowledgement**, then the changelog records of the changed users (one per
        user; ``None``: a tombstone), which Faust flushes before it commits the input offsets.

        This order is the at-least-once guarantee: the changelog never holds a state whose
        actions are not on the broker, and ``clocks`` (the partitions' clock logs, marking the
        input position the batch reached) go after the users' records, so a crash at any point
        either re-processes the events (their actions are published again, with the same ids)
        or finds them applied *and* their actions published (docs/delivery.md)."""
        if self.business is not None:
            self.business.observe_emitted(em)
        self.engine.commit(em)
        mark = self.writer.mark
        for key, st in em.states.items():
            if st.merged_into is None:  # a linked guest's stub has no profile (its alias key below)
                mark(key, st)
        for guest, customer in em.aliases.items():
            self.writer.alias(guest, customer)
        out = self.records(em) + (extra or [])
        if not em.changed and not clocks:
            await self.publisher.send(out)
            return
        topic, n = self.settings.changelog_topic, self.settings.partitions
        changelog = []
        for key, raw in em.changed.items():
            k = key.encode()
            changelog.append((topic, k, raw, key_partition(k, n), None))
        for p, blob in (clocks or {}).items():  # the partitions' clock logs (Engine.checkpoint)
            k = self.clock_key(p)
            self.engine.table[k] = blob
            changelog.append((topic, k, blob, p, None))
        if out:
            await self.publisher.send(out)
        # every output sent before (this step's, and earlier forwards or dead letters whose input
        # the clock records below mark as done) is acknowledged before the changelog goes
        if self.publisher.output_in_flight:
            await self.publisher.drain()
        await self.publisher.send(changelog, output=False)

    def clock_key(self, partition: int) -> bytes:
        """The table key of ``partition``'s clock log (cached)."""
        cache = self.__dict__.setdefault("_clock_keys", {})
        if partition not in cache:
            n = self.settings.partitions
            cache[partition] = clock_key(partition, lambda k: key_partition(k, n))
        return cache[partition]

    def dead_letter(self, err: InvalidEvent, msg: Any) -> tuple[str, bytes | None, bytes, int | None, Any]:
        """The dead-letter record of ``msg``, redacted by the PII policy (without
        ``dlq.keep_payload`` neither the original key nor value nor quoted values are kept)."""
        self.metrics.events_invalid.labels(err.reason).inc()
        rec = dlq_record(err, key=msg.key, value=msg.value, topic=msg.topic, partition=msg.partition,
                         offset=msg.offset, timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                         max_payload_bytes=self.settings.dlq_max_payload_bytes)
        key = msg.key
        if self.pii is not None:
            rec = self.pii.redact_dead_letter(rec)
            if not self.pii.keep_dlq_payload:
                key = None
        self.dead_letters.record(err.reason, f"{msg.topic}[{msg.partition}]@{msg.offset}", rec["detail"])
        return (self.settings.topic_dlq, key, orjson.dumps(rec), None, None)

    # -- privacy ---------------------------------------------------------------------------------
    async def privacy(self, msg: Any) -> None:
        """Carry out a privacy request (``schemas/privacy_request.v1.json``) and publish its audit
        record; a malformed request is dead-lettered."""
        import hashlib
        s = self.settings
        try:
            req = orjson.loads(msg.value)
            if not isinstance(req, dict) or req.get("request") not in ("erase", "repair") \
                    or not isinstance(req.get("user_key"), str) or not req["user_key"]:
                raise ValueError("not an erase or repair request with a user_key")
        except (orjson.JSONDecodeError, ValueError) as err:
            await self.publisher.send([self.dead_letter(InvalidEvent("schema", f"privacy request: {err}"), msg)])
            return
        if req["request"] == "repair":
            await self.repair(req, msg)
            return
        key = req["user_key"]
        em = self.engine.erase_step(key, _now_ms())
        done = em.erased[0]
        self.writer.forget(key)
        audit = {"schema_version": 1, "request": "erase", "request_id": str(req.get("request_id", ""))[:128],
                 "user_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                 "completed_at": datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "removed": {"state": done["state"], "timers": done["timers"], "predictions": done["predictions"],
                             "segments": len(done["segments"]), "redis_profile": True, "quarantine": True}}
        audit["removed"]["identity_links"] = len(done.get("linked", []))
        log.info("erased user (sha256 %s…): %s", audit["user_key_sha256"][:12], audit["removed"])
        extra = [(s.topic_quarantine, key.encode(), None, None, None),  # tombstone
                 (s.topic_privacy_audit, audit["request_id"].encode(), orjson.dumps(audit), None, None)]
        for guest in done.get("linked", []):  # the stubs of its merged guests live on their own partitions
            sub = {"schema_version": 1, "request": "erase", "user_key": guest, "requested_at": audit["completed_at"],
                   "request_id": f"{audit['request_id'][:80]}/link-{hashlib.sha256(guest.encode()).hexdigest()[:16]}"}
            extra.append((s.topic_privacy, guest.encode(), orjson.dumps(sub), None, None))
        await self.emit(em, extra, self.done(msg))
        self.progress.setdefault(s.topic_privacy, {})[msg.partition] = msg.offset

    def done(self, msg: Any) -> dict[int, bytes]:
        """The clock log recording ``msg`` (a privacy request) as applied, for :meth:`emit`: after
        a restart it is skipped, not applied twice (a repair merges lifetime totals)."""
        return {msg.partition: self.engine.checkpoint(msg.partition, {msg.topic: msg.offset})}

    async def repair(self, req: dict[str, Any], msg: Any) -> None:
        """Put a quarantined user back (``clickpulse quarantine repair``; a ``repair`` request on
        the privacy topic, so the worker that owns the user applies it in order with its events):
        :meth:`clickpulse.engine.Engine.repair_step` over the quarantined state the request
        carries; on success the user's quarantine record is tombstoned. Either way an audit record
        goes to the privacy audit topic."""
        import base64
        import binascii
        import hashlib
        s = self.settings
        key = req["user_key"]
        drop = req.get("drop_fields") or []
        try:
            if not isinstance(drop, list) or not all(isinstance(f, str) for f in drop):
                raise ValueError("drop_fields must be a list of field names")
            blob = base64.b64decode(str(req.get("state_b64") or ""), validate=True)
            if not blob:
                raise ValueError("the request carries no quarantined state (state_b64)")
            em, summary = self.engine.repair_step(key, msg.partition, blob, str(req.get("mode", "retry")), drop,
                                                  _now_ms())
        except (ValueError, binascii.Error) as err:
            em, summary = Emitted(), {"outcome": "failed", "mode": str(req.get("mode", "retry"))[:16],
                                      "drop_fields": [str(f)[:64] for f in drop][:16] if isinstance(drop, list) else [],
                                      "error": f"{type(err).__name__}: {err}"[:1000], "merged_with_current": False}
            em.count("users_repaired", "failed")
        summary["quarantined_at"] = str(req.get("quarantined_at") or "")[:64] or None
        audit = {"schema_version": 1, "request": "repair", "request_id": str(req.get("request_id", ""))[:128],
                 "user_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                 "completed_at": datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "repair": summary}
        if summary["outcome"] == "repaired":
            log.info("quarantined user (sha256 %s…) repaired: %s", audit["user_key_sha256"][:12], summary)
        else:
            log.warning("quarantined user (sha256 %s…) not repaired: %s", audit["user_key_sha256"][:12], summary)
        extra = [(s.topic_privacy_audit, audit["request_id"].encode(), orjson.dumps(audit), None, None)]
        if summary["outcome"] == "repaired":
            extra.insert(0, (s.topic_quarantine, key.encode(), None, None, None))  # tombstone: back in service
        await self.emit(em, extra, self.done(msg))
        self.progress.setdefault(s.topic_privacy, {})[msg.partition] = msg.offset

    # -- raw input -----------------------------------------------------------------------------
    def control(self, msg: Any, kind: bytes, out: list[Any]) -> None:
        """A raw message with the control header: verified → forwarded to every valid partition;
        otherwise dead-lettered as ``forged_control``."""
        s = self.settings
        if not verify_control(s.control_key, kind, msg.value, header(msg.headers, CONTROL_SIG_HEADER)):
            self.metrics.control_forged.inc()
            why = "no CLICKPULSE_CONTROL_KEY is configured" if not s.control_key else "missing or invalid signature"
            out.append(self.dead_letter(InvalidEvent("forged_control", f"control header {kind[:64]!r}: {why}"), msg))
            return
        try:
            body = orjson.loads(msg.value)
        except orjson.JSONDecodeError:
            out.append(self.dead_letter(InvalidEvent("not_json", "control message value is not JSON"), msg))
            return
        if kind != b"end_of_input" or not isinstance(body, dict) or body.get("control") != "end_of_input":
            out.append(self.dead_letter(InvalidEvent("schema", f"unknown control message {kind[:64]!r}"), msg))
            return
        # a genuine signature on a captured message: bound to this namespace, this raw partition,
        # fresh, used once (remembered with its raw offset in memory and, durably, in the
        # partitions' clock logs). The same raw record read again — its offset was not committed
        # before a rebalance or a restart — is a redelivery, not a replay: forwarded again (the
        # valid step applies it idempotently); the same body at another offset is a replay.
        now = _now_ms()
        problem = control_problem(body, namespace=s.namespace, partition=msg.partition, now_ms=now)
        cid = control_id(body)
        if problem is None:
            for old in [c for c, (t, _) in self.controls_seen.items() if now - t > CONTROL_MAX_AGE_MS]:
                del self.controls_seen[old]
            mem = self.controls_seen.get(cid)
            seen = ("new" if mem is None else "redelivered" if mem[1] == msg.offset else "replayed")
            if seen != "replayed" and self.engine is not None:
                durable = self.engine.control_seen(cid, msg.offset)
                seen = durable if durable != "new" else seen
            if seen == "replayed":
                problem = f"control {cid!r} was already accepted (replayed)"
            elif seen == "redelivered":
                log.info("control %r read again at %s[%d]@%d (redelivered); forwarded again",
                         cid, msg.topic, msg.partition, msg.offset)
        if problem is not None:
            self.metrics.control_forged.inc()
            out.append(self.dead_letter(InvalidEvent("forged_control", problem), msg))
            return
        self.controls_seen[cid] = (int(body["issued_at_ms"]), msg.offset)
        n_src = body.get("source_partitions")
        if not isinstance(n_src, int) or n_src < 1:
            n_src = s.partitions  # the raw topic is created with this many partitions
        fwd = {"schema_version": 1, "control": "end_of_input", "source_partition": msg.partition,
               "source_partitions": n_src, "issued_at_ms": int(body["issued_at_ms"]), "raw_offset": msg.offset}
        if body.get("run_id"):
            fwd["run_id"] = str(body["run_id"])
        value = orjson.dumps(fwd)
        for p in range(s.partitions):
            out.append((s.topic_valid, None, value, p, [(CONTROL_HEADER, b"end_of_input")]))

    def ingest_one(self, msg: Any, out: list[Any]) -> dict[str, Any] | None:
        """Validate one raw message: returns the canonical event, or appends its dead-letter /
        control records to ``out`` and returns ``None``."""
        s = self.settings
        self.metrics.raw_in.inc()
        try:
            kind = header(msg.headers, CONTROL_HEADER)
            if kind is not None:
                self.control(msg, kind, out)
                return None
            ts_ms = int(msg.timestamp * 1000) if msg.timestamp else None
            now = _now_ms()
            received = now if ts_ms is None else min(ts_ms, now)
            try:
                ev = parse(msg.value, msg.key, max_bytes=s.max_event_bytes, received_ms=received,
                           max_future_skew_ms=s.max_future_skew_ms, max_money=s.max_money,
                           max_quantity=s.max_quantity)
            except InvalidEvent as err:
                out.append(self.dead_letter(err, msg))
                return None
            if ev.get("context", {}).get("clock_corrected"):
                self.metrics.clock_corrected.inc()
            if self.pii is not None:
                ev, counts = self.pii.apply(ev)
                for action, n in counts.items():
                    if n:
                        self.metrics.pii_fields.labels(action).inc(n)
            self.metrics.events_valid.labels(type_label(ev["type"])).inc()
            return route(ev)  # a link event (identify/alias with both ids) goes to its guest first
        except Exception as err:  # noqa: BLE001 - one bad message never stops the stream
            log.exception("ingest failed at %s[%d]@%d", msg.topic, msg.partition, msg.offset)
            out.append(self.dead_letter(InvalidEvent("internal", f"{type(err).__name__}: {err}"), msg))
            return None
        finally:
            self.progress[s.topic_raw][msg.partition] = msg.offset


def _app(settings: Settings) -> faust.App:
    from . import faust_fixes
    faust_fixes.install()  # records lost after a rebalance (see the module)
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        store=f"{_store.SCHEME}://" if settings.state_store == "rocksdb" else "memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        datadir=str(data_dir),
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=settings.standby_replicas,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 3),
        logging_config=None,
        **faust_tuning(),
    )


def _topics(app: faust.App, s: Settings) -> dict[str, Any]:
    def raw_topic(name: str, partitions: int) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=partitions)
    return {"raw": raw_topic(s.topic_raw, s.partitions), "valid": raw_topic(s.topic_valid, s.partitions),
            "dlq": raw_topic(s.topic_dlq, 1), "actions": raw_topic(s.topic_actions, s.partitions),
            "segments": raw_topic(s.topic_segments, s.partitions), "training": raw_topic(s.topic_training, 1)}


def create_app(settings: Settings, metrics: Metrics | None = None) -> faust.App:
    """Build the Faust app for ``settings`` (one app per namespace = consumer group)."""
    metrics = metrics or Metrics()
    app = _app(settings)
    topics = _topics(app, settings)
    # use_partitioner: the changelog partition comes from the key (same murmur2 partitioner as
    # the valid topic, so the table stays co-partitioned) and the table can be written after a
    # batch and from the timer task, outside stream iteration; bytes key/value -> raw codec
    # compaction within a day (segments roll hourly), so an erased user's superseded state leaves
    # the changelog within max.compaction.lag.ms; tombstones themselves are kept a day
    users = app.Table(settings.state_table, default=None, key_type=bytes, value_type=bytes,
                      partitions=settings.partitions, use_partitioner=True,
                      # RocksDB memory per partition: 2 x 4 MiB memtables + an 8 MiB block cache
                      # (Faust's defaults, 3 x 64 MiB + 2 GiB, let RSS grow by ~10 KB per user)
                      options={"write_buffer_size": 4 * 1024 * 1024, "max_write_buffer_number": 2,
                               "block_cache_size": 8 * 1024 * 1024},
                      extra_topic_configs={"segment.ms": "3600000", "max.compaction.lag.ms": "86400000",
                                           "delete.retention.ms": "86400000", "min.cleanable.dirty.ratio": "0.1"})
    rules = build_rules(settings)  # an invalid file at start is a RulesError (nothing to fall back on)
    if rules is not None:
        metrics.rules_info.labels(rules.current().version).set(1)
        log.info("rules %s: version %s (%d segments, %d triggers)", rules.path, rules.current().version,
                 len(rules.current().segments), len(rules.current().triggers))
    registry = build_models(settings, metrics)
    # The engine reads and writes the table's store directly and the worker publishes the
    # changelog records itself, batched with the step's other output (Faust's Table.__setitem__
    # would send each one through its ProducerBuffer, one await per message, and throttle the
    # stream while more than 100 wait). Recovery is Faust's own: it reads the same changelog.
    engine = build_engine(settings, users.data, metrics=metrics, models=registry, rules=rules)
    writer = ProfileWriter(None, settings.namespace, int(settings.user_retention_s), settings.redis_max_pending,
                           metrics)
    w = Worker(app, settings, metrics, engine, writer, Publisher(app, metrics, settings.max_in_flight_batches),
               topics, {settings.topic_raw: {}, settings.topic_valid: {}}, PiiPolicy.from_settings(settings))
    app.clickpulse = {"engine": engine, "metrics": metrics, "writer": writer, "settings": settings,  # type: ignore[attr-defined]
                      "progress": w.progress, "worker": w}
    if not settings.raw_keyed:
        _wire_ingest(w)
    _wire_process(w)
    _wire_timers(w, users)
    _wire_refill(w)
    if rules is not None:
        _wire_rules(w, rules)
        _wire_segment_sizes(w)
    if registry is not None:
        _wire_models(w, registry)
    _wire_web(w, rules, registry)
    _wire_business(w)
    _wire_health(w)
    return app


def _wire_business(w: Worker) -> None:
    """Business metrics (clickpulse.metrics.business) from every step's output: gauges
    ``clickpulse_business_*`` on ``/metrics`` (refreshed every 5 s and on each scrape of
    ``/business``) and the full snapshot as JSON on ``/business``; the recommendation model's
    top item pairs on ``/recs`` (for the run report)."""
    from .metrics.business import BusinessGauges, BusinessMetrics, user_view

    w.engine.observe_user = user_view
    w.business = BusinessMetrics()
    gauges = BusinessGauges(w.metrics.registry)

    @w.app.timer(interval=5.0)
    async def business_gauges() -> None:
        gauges.set(w.business.snapshot())

    @w.app.page("/business")
    async def business_page(web: Any, request: Any) -> Any:
        snap = w.business.snapshot()
        gauges.set(snap)
        return web.json(snap)

    @w.app.page("/recs")
    async def recs_page(web: Any, request: Any) -> Any:
        """The recommendation model's top pairs, for the run report (item ids and counts only)."""
        recs = getattr(w.engine, "recs", None)
        if recs is None:
            return web.json({"pairs": [], "stats": None})
        return web.json({"pairs": [{"a": a, "b": b, "sessions": n, "baskets": k}
                                   for a, b, n, k in recs.top_pairs(20)], "stats": recs.stats()})


def _wire_ingest(w: Worker) -> None:
    s = w.settings

    gaps = InputGaps(w.metrics, lambda topic, p: _committed(w, topic, p), s.data_dir,
                     fetch_committed=lambda topic, p: group_committed(s, topic, p))
    w.__dict__.setdefault("input_gaps", []).append(gaps)  # reset at each rebalance

    @w.app.agent(w.topics["raw"], name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(s.batch_max_events, within=s.batch_within_s):
            out: list[Any] = []
            for event in batch:
                msg = event.message
                ok = gaps.see(msg)
                if ok is None:  # a first message beyond the saved position, the commit not known yet
                    ok = await gaps.confirm(msg)
                if not ok:
                    w.publisher.on_fatal(75)
                    return
                ev = w.ingest_one(msg, out)
                if ev is not None:  # the raw record's timestamp (producer publish) carried over
                    out.append((s.topic_valid, ev["user_key"].encode(), orjson.dumps(ev), None,
                                [(SOURCE_HEADER, f"{msg.partition}:{msg.offset}".encode())], msg.timestamp or None))
            await w.publisher.send(out)


def _wire_process(w: Worker) -> None:
    s = w.settings
    engine = w.engine
    # the privacy topic is co-partitioned with the state: an erasure is processed in order with
    # the user's events, by the worker that owns the user
    names = (s.topic_raw, s.topic_valid, s.topic_privacy, s.topic_identity) if s.raw_keyed \
        else (s.topic_valid, s.topic_privacy, s.topic_identity)
    source = w.app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    # messages handled since the last step, per partition: {topic: offset of the last one}; the
    # step's checkpoint records them as done (their dead letters and forwards are in ``out``,
    # acknowledged before the checkpoint is sent)
    seen: dict[int, dict[str, int]] = {}
    # events per user in the batch being built: kept within the de-duplication depth, so the
    # events of a batch whose states were only partly saved at a crash are all recognised as
    # duplicates by the users that were saved (Engine.restore)
    per_user: collections.Counter[str] = collections.Counter()
    per_user_max = max(1, s.dedup_ids_per_user)

    async def run_step(items: list[tuple[int, dict[str, Any]]], msgs: list[Any], out: list[Any]) -> None:
        per_user.clear()
        if not items:
            return
        started = time.perf_counter()
        wall_ms = _now_ms()
        # each event's receive time (its Kafka timestamp, never past the wall clock): how far it
        # may move the watermark (Engine.step: no producer moves the engine's time ahead)
        received = [min(int(m.timestamp * 1000), wall_ms) if m.timestamp and m.timestamp > 0 else wall_ms
                    for m in msgs]
        em = engine.step(items, wall_ms, received=received)
        for f in em.failed:  # rolled back alone; the rest of the batch stands
            msg = msgs[f.index]
            log.error("processing failed at %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, f.error)
            out.append(w.dead_letter(InvalidEvent(f.reason, f.error), msg))
        elapsed = time.perf_counter() - started
        w.metrics.process_latency.observe(elapsed / len(items))
        w.metrics.batch_size.observe(len(items))
        observe_step(w.metrics, em.actions, items, msgs, wall_ms)  # produce -> processed / -> action
        # the input position each partition's states and clock now include
        clocks = {p: engine.checkpoint(p, offs) for p, offs in seen.items()}
        seen.clear()
        await w.emit(em, out, clocks)
        out.clear()
        items.clear()
        msgs.clear()

    def handled(msg: Any) -> None:
        seen.setdefault(msg.partition, {})[msg.topic] = msg.offset

    gaps = InputGaps(w.metrics, lambda topic, p: _committed(w, topic, p), s.data_dir,
                     lambda topic, p: engine.positions.get(p, {}).get(topic),
                     fetch_committed=lambda topic, p: group_committed(s, topic, p))
    w.__dict__.setdefault("input_gaps", []).append(gaps)  # reset at each rebalance

    def skipped(msg: Any) -> None:
        w.metrics.redelivered.labels(msg.topic).inc()
        handled(msg)

    @w.app.agent(source, name="process")
    async def process(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(s.batch_max_events, within=s.batch_within_s):
            items: list[tuple[int, dict[str, Any]]] = []
            msgs: list[Any] = []
            out: list[Any] = []

            async def admit(msg: Any, ev: Any, source: tuple[int, int] | None = None) -> None:
                key = ev.get("user_key") if isinstance(ev, dict) else None
                if isinstance(key, str) and per_user[key] >= per_user_max:
                    await run_step(items, msgs, out)  # before the source is recorded as applied
                if source is not None and engine.redelivered(msg.partition, msg.topic, msg.offset, source):
                    skipped(msg)
                    return
                if isinstance(key, str):
                    per_user[key] += 1
                items.append((msg.partition, ev))
                msgs.append(msg)
                handled(msg)

            for event in batch:
                msg = event.message
                if msg.topic != s.topic_privacy:
                    ok = gaps.see(msg)
                    if ok is None:  # a first message beyond the saved position, the commit not known yet
                        ok = await gaps.confirm(msg)
                    if not ok:
                        w.publisher.on_fatal(75)
                        return
                if msg.topic == s.topic_raw:  # one hop: validate here, re-key only what must be
                    if engine.redelivered(msg.partition, msg.topic, msg.offset):
                        skipped(msg)
                        continue
                    ev = w.ingest_one(msg, out)
                    if ev is None:
                        handled(msg)
                        continue
                    key = ev["user_key"].encode()
                    if msg.key != key or key_partition(key, s.partitions) != msg.partition:
                        out.append((s.topic_valid, key, orjson.dumps(ev), None,
                                    [(SOURCE_HEADER, f"{msg.partition}:{msg.offset}".encode())], msg.timestamp or None))
                        handled(msg)
                        continue
                    await admit(msg, ev)
                    continue
                if msg.topic == s.topic_privacy:  # internal topic: trusted
                    await run_step(items, msgs, out)
                    if engine.redelivered(msg.partition, msg.topic, msg.offset):  # applied before a restart
                        skipped(msg)
                    else:
                        await w.privacy(msg)
                    continue
                if msg.topic == s.topic_identity:  # internal topic: a guest's state for its customer
                    await run_step(items, msgs, out)
                    try:
                        em = engine.merge_step(msg.partition, orjson.loads(msg.value), _now_ms())
                    except Exception as err:  # noqa: BLE001 - a malformed record changes nothing
                        log.exception("merge record at %s[%d]@%d not applied", msg.topic, msg.partition, msg.offset)
                        out.append(w.dead_letter(InvalidEvent("internal", f"merge: {type(err).__name__}: {err}"), msg))
                        continue
                    await w.emit(em, None, {msg.partition: engine.checkpoint(msg.partition, {msg.topic: msg.offset})})
                    w.progress.setdefault(s.topic_identity, {})[msg.partition] = msg.offset
                    continue
                try:
                    if header(msg.headers, CONTROL_HEADER) is not None:  # internal topic: trusted
                        await run_step(items, msgs, out)
                        body = orjson.loads(msg.value)
                        if engine.redelivered(msg.partition, msg.topic, msg.offset):  # re-read: in the state
                            skipped(msg)
                            continue
                        issued = body.get("issued_at_ms")
                        raw_off = body.get("raw_offset")
                        em = engine.end_of_input_step(msg.partition, int(body["source_partition"]),
                                                      int(body["source_partitions"]), _now_ms(),
                                                      control=control_id(body) if isinstance(issued, int) else None,
                                                      issued_at_ms=issued if isinstance(issued, int) else None,
                                                      raw_offset=raw_off if isinstance(raw_off, int) else None)
                        if em.counters.get(("control_forged", ())):  # accepted here before (a replay)
                            out.append(w.dead_letter(InvalidEvent(
                                "forged_control", f"control {control_id(body)!r} was already accepted on "
                                                  f"partition {msg.partition} (replayed)"), msg))
                        # the accepted control's id goes to the clock log (durable: refused after a restart)
                        await w.emit(em, None, {msg.partition: engine.checkpoint(msg.partition, {msg.topic: msg.offset})})
                    elif engine.redelivered(msg.partition, msg.topic, msg.offset):  # re-read: in the state
                        skipped(msg)
                    else:
                        await admit(msg, orjson.loads(msg.value), source_of(msg.headers))
                except Exception as err:  # noqa: BLE001 - one message never stops the stream
                    log.exception("processing failed at %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                    out.append(w.dead_letter(InvalidEvent("internal", f"{type(err).__name__}: {err}"), msg))
                finally:
                    w.progress[s.topic_valid][msg.partition] = msg.offset
            await run_step(items, msgs, out)
            await w.publisher.send(out)


def _seen(w: Worker) -> dict[tuple[str, int], int]:
    """The offset after the last input record of each partition the agents were handed."""
    out: dict[tuple[str, int], int] = {}
    for gaps in w.__dict__.get("input_gaps", ()):
        out.update(gaps.next)
    return out


def _consumer_state(app: Any, topic: str, partition: int) -> str:
    """Faust's and aiokafka's bookkeeping of one partition, for the stall log line (best effort:
    private attributes of faust-streaming 0.15 / aiokafka 0.14)."""
    from faust.types import TP
    tp = TP(topic, partition)
    parts = []
    try:
        c = app.consumer
        parts.append(f"faust: paused={tp in c._paused_partitions} active={tp in (c._active_partitions or ())} "
                     f"read={c._read_offset.get(tp)} committed={c._committed_offset.get(tp)} "
                     f"acked={len(c._acked.get(tp, ()))} unacked={sum(1 for m in list(c._unacked_messages) if m.tp == tp)} "
                     f"flow={'on' if app.flow_control.is_active() else 'off'} "
                     f"consumer_flow={'on' if c.flow_active else 'off'} buffered={tp in c._buffered_partitions}")
        from aiokafka import TopicPartition
        ak = c._thread._ensure_consumer()
        st = ak._fetcher._subscriptions.subscription.assignment.state_value(TopicPartition(topic, partition))
        if st is None:
            parts.append("aiokafka: not assigned")
        else:
            parts.append(f"aiokafka: paused={st.paused} position={getattr(st, '_position', None)} "
                         f"highwater={st.highwater} fetched_at_ms={st.timestamp}")
    except Exception as err:  # noqa: BLE001 - a diagnostic never fails the exit
        parts.append(f"({type(err).__name__}: {err})")
    return "; ".join(parts)


def _committed(w: Worker, topic: str, partition: int) -> int | None:
    """The offset Faust's consumer resumed ``topic[partition]`` from (its committed offset)."""
    from faust.types import TP
    try:
        return w.app.consumer._committed_offset.get(TP(topic, partition))
    except AttributeError:  # another Faust version
        return None


def _valid_partitions(w: Worker) -> list[int]:
    return sorted(tp.partition for tp in w.app.assignor.assigned_actives() if tp.topic == w.settings.topic_valid)


def recovery_superseded(app: Any) -> bool:
    """True when the table recovery Faust just reported complete was cut short by a newer
    rebalance, so the table holds only part of its changelog.

    Faust 0.15 ends a recovery whose changelog reading a rebalance interrupted as if it had read
    everything ("Done reading from changelog topics", "Restore complete!") and sends
    ``on_rebalance_complete`` before it compares generations; the newer rebalance's recovery is
    then pending: ``Recovery.signal_recovery_start`` stays set until the recovery loop picks it
    up. A worker that took that state lost events for good: its timers fired on the stale users
    and wrote them to the changelog *after* their newer records, and the full recovery that
    followed restored those stale users with the newer input position (docs/delivery.md).

    >>> from types import SimpleNamespace
    >>> import asyncio
    >>> pending = asyncio.Event(); pending.set()
    >>> recovery_superseded(SimpleNamespace(tables=SimpleNamespace(recovery=SimpleNamespace(
    ...     signal_recovery_start=pending))))
    True
    >>> recovery_superseded(SimpleNamespace())          # another Faust: nothing to look at
    False
    """
    rec = getattr(getattr(app, "tables", None), "recovery", None)
    try:
        return bool(rec is not None and rec.signal_recovery_start.is_set())
    except AttributeError:
        return False


def _settled_partitions(w: Worker) -> list[int]:
    """The valid partitions this worker owns with their state restored by the current
    assignment's recovery: none while a rebalance or its recovery is under way (Faust's
    ``app.rebalancing``), so timers and other writers never act on a state that is not, or no
    longer, the whole changelog."""
    return [] if w.app.rebalancing else _valid_partitions(w)


def _tick_inputs(w: Worker, parts: list[int]) -> list[tuple[str, int]]:
    """The input partitions whose backlog decides whether ``parts`` are idle (:func:`_caught_up`):
    the valid partitions (and with one hop their raw ones), plus with two hops every raw
    partition this worker owns."""
    s = w.settings
    if s.raw_keyed:
        return [(t, p) for p in parts for t in (s.topic_valid, s.topic_raw)]
    own_raw = [(s.topic_raw, tp.partition) for tp in w.app.assignor.assigned_actives() if tp.topic == s.topic_raw]
    return [(s.topic_valid, p) for p in parts] + own_raw


def _caught_up(w: Worker, parts: list[int], ends: dict[tuple[str, int], int | None]) -> list[int]:
    """Of ``parts``, the partitions whose input the processing agent has been handed up to the
    broker's end offset (``ends``: ``{(topic, partition): end offset}`` of :func:`_tick_inputs`,
    asked of the broker just before) — a partition with records still to read is not idle,
    whatever the wall clock says. Its event time then moves with those records; the idle advance
    (and with it the tick's timers) waits until they are read.

    Without this, a worker that took over a partition with a backlog (a restart, or a reassignment
    after others died) moved event time over the whole downtime at its first idle tick and fired
    timers the unread events would have cancelled (27 wrong ``assistance_offer`` actions in a
    reviewer's three-worker run). With two hops the raw partitions this worker owns count for
    every valid partition (the ingest forwards a raw record to any of them: 7 wrong actions in a
    third run). The consumer's own highwater is not enough: it changes only with fetch answers,
    and the worker's own forwards made a partition with thousands of unread records look read to
    its end (42 wrong actions in a fourth run). Raw partitions owned by another worker are not
    seen. An end offset unknown, or a partition with records of which nothing was handed and
    nothing committed: not caught up; a partition never written to (end 0): caught up."""
    seen = _seen(w)

    def read_to_end(topic: str, p: int) -> bool:
        end = ends.get((topic, p))
        if end == 0:
            return True
        starts = [x for x in (seen.get((topic, p)), _committed(w, topic, p)) if isinstance(x, int)]
        return end is not None and bool(starts) and max(starts) >= end

    s = w.settings
    if not s.raw_keyed and not all(read_to_end(t, p) for t, p in ends if t == s.topic_raw):
        return []
    topics = (s.topic_valid, s.topic_raw) if s.raw_keyed else (s.topic_valid,)
    return [p for p in parts if all(read_to_end(topic, p) for topic in topics)]


async def _end_offsets(w: Worker, inputs: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
    """The broker's end offsets of ``inputs`` (one ListOffsets request through Faust's consumer);
    empty when it cannot answer (a rebalance under way): nothing is then taken as caught up."""
    from faust.types import TP
    if not inputs:
        return {}
    try:
        got = await w.app.consumer.highwaters(*(TP(t, p) for t, p in inputs))
    except Exception as err:  # noqa: BLE001 - the next tick asks again
        log.debug("end offsets for the idle tick not available (%s: %s)", type(err).__name__, err)
        return {}
    return {(tp.topic, tp.partition): (off if isinstance(off, int) else None) for tp, off in got.items()}


def _wire_timers(w: Worker, users: Any) -> None:
    app, s, engine, metrics = w.app, w.settings, w.engine, w.metrics

    @app.timer(interval=1.0)
    async def fire_idle_timers() -> None:
        now = _now_ms()
        parts = _settled_partitions(w)
        if parts and s.time_mode != "replay":  # live mode: the idle advance needs an idle partition
            ends = await _end_offsets(w, _tick_inputs(w, parts))
            now = _now_ms()
            parts = _caught_up(w, parts, ends)
        await w.emit(engine.step([], now, tick=parts))
        metrics.timers_pending.set(engine.pending_timers())
        wm = engine.min_watermark(now)
        if wm is not None:
            metrics.watermark.set(wm / 1000)

    @app.timer(interval=300.0)
    async def expire_idle_users() -> None:
        for p in _settled_partitions(w):
            em = engine.expire_step(p, s.user_retention_ms, _now_ms(), dormant_retention_ms=s.dormant_retention_ms)
            await w.emit(em)
            if em.changed:
                log.info("partition %d: %d idle users expired to their durable record or deleted", p, len(em.changed))

    @app.timer(interval=s.redis_flush_interval_s)
    async def flush_profiles() -> None:
        writer = w.writer
        if writer.client is None and s.redis_url:
            import redis.asyncio as aioredis
            writer.client = aioredis.from_url(s.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        # build profiles lazily, once per user per flush (coalescing); one user's profile that
        # cannot be built is skipped and counted, never a crash of the worker
        ecfg = engine.cfg.engagement
        built: dict[str, Any] = {}
        for k, v in writer.pending.items():
            if not isinstance(v, UserState):
                built[k] = v
                continue
            try:
                built[k] = v.profile(engagement=ecfg, extra=engine.profile_extra(v))
            except Exception as err:  # noqa: BLE001
                metrics.profile_errors.inc()
                log.warning("profile of %s could not be built (%s: %s); skipped", k, type(err).__name__, err)
        writer.pending = built
        rs = engine.ruleset()  # the segment sets of the rules' segments are kept in step
        if rs is not None:
            writer.segment_names(g.name for g in rs.segments)
        await writer.flush()

    @app.timer(interval=10.0)
    async def segment_gauges() -> None:
        for name, row in engine.segment_conversion().items():
            metrics.segment_conversion.labels(name, "raw").set(row["rate"])
            metrics.segment_conversion.labels(name, "smoothed").set(row["rate_smoothed"])
        rs = engine.ruleset()
        for seg in (rs.segments if rs is not None else ()):
            metrics.segment_members.labels(seg.name).set(engine.segment_size(seg.name))

    @app.timer(interval=30.0)
    async def commit_gap_check() -> None:
        """Log (and count) input partitions whose commits cannot advance: the oldest offset not
        yet committed was never acknowledged by the stream while later ones were (Faust commits
        the contiguous acknowledged run only). A diagnostic for a stall seen after restarts under
        heavy load (docs/delivery.md)."""
        consumer = app.consumer
        try:
            acked, committed = consumer._acked, consumer._committed_offset
            unacked = consumer._unacked_messages
        except AttributeError:  # another Faust version: nothing to look at
            return
        for tp, offs in list(acked.items()):
            c = committed.get(tp)
            if not offs or c is None or min(offs) - c <= 1:
                continue
            pending = sorted(m.offset for m in list(unacked) if m.tp == tp)[:5]
            metrics.commit_stalls.inc()
            log.warning("commits of %s[%d] cannot advance: committed %d, oldest acknowledged %d, %d acknowledged "
                        "waiting; delivered but not acknowledged: %s; read offset %s", tp.topic, tp.partition, c,
                        min(offs), len(offs), pending or "none", consumer._read_offset.get(tp))

    @app.on_rebalance_complete.connect
    async def on_rebalance_complete(sender: Any = None, **kwargs: Any) -> None:
        if recovery_superseded(app):
            log.warning("a table recovery ended after a newer rebalance had begun (Faust cut its changelog reading "
                        "short): its state is not taken; the partitions are restored when the current recovery "
                        "completes")
            return
        parts = _valid_partitions(w)
        # clocks, positions and timers from the recovered table (its clock logs): see
        # Engine.restore; the re-read up to each partition's position is skipped
        n = engine.restore(parts, list(users.data.items()), _now_ms())
        for gaps in w.__dict__.get("input_gaps", ()):
            gaps.reset()
        log.info("clickpulse ready: partitions %s of %s recovered, %d pending timers; positions %s", parts,
                 s.topic_valid, n, {p: engine.positions.get(p) for p in parts})


def _wire_refill(w: Worker) -> None:
    """Every ``CLICKPULSE_REDIS_REFILL_CHECK_S``: refill the profiles of owned partitions whose
    Redis sentinel is gone (Redis restarted empty; :class:`clickpulse.serving.redis_sink.ProfileRefill`)."""
    s, engine = w.settings, w.engine
    refill = ProfileRefill(w.writer, rate_per_s=s.redis_refill_rate)
    n = s.partitions
    build = engine_profile(engine)

    recovered = {"gen": -1}  # the rebalance whose table recovery completed: refill only from a recovered table

    @w.app.on_rebalance_complete.connect
    async def table_recovered(sender: Any = None, **kwargs: Any) -> None:
        if not recovery_superseded(w.app):
            recovered["gen"] = w.app.rebalancing_count

    def owned() -> list[int]:  # nothing while a rebalance or a recovery is under way
        app = w.app
        return [] if app.rebalancing or recovered["gen"] != app.rebalancing_count else _valid_partitions(w)

    @w.app.timer(interval=s.redis_refill_check_s)
    async def refill_profiles() -> None:
        await refill.check(owned, engine.table, lambda k: key_partition(k, n), build,
                           lambda k: k.startswith(CLOCK_KEY_PREFIX))


def _wire_rules(w: Worker, rules: Any) -> None:
    metrics = w.metrics

    @w.app.timer(interval=w.settings.rules_poll_s)
    async def reload_rules() -> None:
        old = rules.current().version
        failures = rules.failures
        try:
            changed = await w.app.loop.run_in_executor(None, rules.poll)  # compiling can take a while
        except Exception:  # noqa: BLE001 - a reload problem never stops the worker
            log.exception("rules reload failed; keeping version %s", old)
            return
        if changed:  # RulesFile logged it (INFO); a rejection was logged once (WARNING)
            metrics.rules_reloads.labels("ok").inc()
            metrics.rules_info.labels(old).set(0)
            metrics.rules_info.labels(rules.current().version).set(1)
        elif rules.failures != failures:
            metrics.rules_reloads.labels("rejected").inc()


def segment_sizes_entry(key: bytes | None, value: bytes | None, partitions: int) -> tuple[int, dict[str, int] | None]:
    """Decode one message of ``<ns>.segment-sizes``: ``(partition, {segment: members})``, or
    ``(partition, None)`` for a tombstone (the partition's counts withdrawn).

    Raises
    ------
    ValueError
        The key is not a partition number below ``partitions``, the value is not JSON or not a
        ``schemas/segment_sizes.v1.json`` record, or its ``partition`` is not the key's.
    """
    from .events.schemas import validation_errors
    try:
        p = int(key.decode()) if key and len(key) <= 10 and key.isdigit() else -1
    except (UnicodeDecodeError, ValueError):
        p = -1
    if not 0 <= p < partitions:
        raise ValueError(f"key {key[:32] if key else key!r} is not a partition number below {partitions}")
    if value is None:
        return p, None
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ValueError("value is not JSON") from None
    errs = validation_errors("segment_sizes", rec)
    if errs:
        raise ValueError(f"not a segment_sizes.v1 record: {errs[0]}")
    if rec["partition"] != p:
        raise ValueError(f"record of partition {rec['partition']} under key {p}")
    return p, rec["counts"]


def _wire_segment_sizes(w: Worker) -> None:
    """Global segment sizes (docs/scaling.md): publish this worker's partitions' member counts to
    the compacted ``<ns>.segment-sizes`` (keyed by partition; when they changed, at most every
    ``CLICKPULSE_SEGMENT_SIZES_INTERVAL_S``, and all of them again after a rebalance), and read
    the whole topic into :meth:`Engine.set_remote_segment_counts`, so ``min_size`` gates on the
    sum over every partition. Eventually consistent: the other partitions' counts are as of their
    owners' last publication."""
    from .records import SegmentSizesRecord
    s, engine = w.settings, w.engine
    topic = s.topic_segment_sizes
    published: dict[int, dict[str, int]] = {}  # what this worker last published, per partition

    @w.app.on_rebalance_complete.connect
    async def republish_after_rebalance(sender: Any = None, **kwargs: Any) -> None:
        published.clear()  # the new owners announce every partition they hold, changed or not

    @w.app.timer(interval=s.segment_sizes_interval_s)
    async def publish_segment_sizes() -> None:
        rs = engine.ruleset()
        counts = engine.segment_counts()
        # only partitions the group assigned to this worker *and* the engine counts (restored):
        # a partition just assigned but not yet recovered would publish a false zero
        owned = [p for p in _settled_partitions(w) if p in counts]
        out = []
        now = _now_ms()
        for p in owned:
            if published.get(p) == counts[p]:
                continue
            rec: SegmentSizesRecord = {"schema_version": 1, "partition": p, "counts": counts[p],
                                       "published_at_ms": now, "rules_version": None if rs is None else rs.version}
            out.append((topic, str(p).encode(), orjson.dumps(rec), 0, None))
            published[p] = counts[p]
        for p in [p for p in published if p not in owned]:
            del published[p]
        if out:
            await w.publisher.send(out)

    @w.app.task
    async def follow_segment_sizes() -> None:
        """Read every partition's latest counts (the whole compacted topic, no consumer group)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        warned: set[str] = set()

        def take(m: Any) -> None:
            try:
                p, counts = segment_sizes_entry(m.key, m.value, s.partitions)
                engine.set_remote_segment_counts(p, counts)
            except ValueError as err:  # internal topic: logged (a few kinds), skipped, never a crash
                if str(err) not in warned and len(warned) < 20:
                    warned.add(str(err))
                    log.warning("ignoring %s[%d]@%d: %s", topic, m.partition, m.offset, err)

        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False,
                                        auto_offset_reset="earliest")
            try:
                await consumer.start()
                await consumer.topics()  # metadata of every topic, so the partitions are known
                parts = consumer.partitions_for_topic(topic) or {0}
                tps = [TopicPartition(topic, p) for p in sorted(parts)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while True:
                    for _tp, msgs in (await consumer.getmany(timeout_ms=1000)).items():
                        for m in msgs:
                            take(m)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the last counts; read the topic again shortly
                log.warning("reading %s failed; retrying in 5 s", topic, exc_info=True)
                await asyncio.sleep(5.0)
            finally:
                try:
                    await consumer.stop()
                except BaseException:  # noqa: BLE001 - shutting down
                    pass


def _wire_models(w: Worker, registry: Any) -> None:
    s, metrics = w.settings, w.metrics

    @w.app.task
    async def follow_models() -> None:
        """Load every new model snapshot from the compacted models topic (hot swap)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=32 * 1024 * 1024,
                                    fetch_max_bytes=64 * 1024 * 1024)
        await consumer.start()
        try:
            tp = TopicPartition(s.topic_models, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while True:
                for _tp, msgs in (await consumer.getmany(timeout_ms=1000)).items():
                    for m in msgs:
                        try:
                            env = orjson.loads(m.value)
                            if registry.install(env):
                                for task, name, scope, v in metric_samples(env):
                                    metrics.model_metric.labels(task, name, scope).set(v)
                                metrics.model_examples.labels(env["task"]).set(env["examples"])
                        except Exception:  # noqa: BLE001 - a bad snapshot keeps the current model
                            log.exception("could not install model snapshot at offset %d", m.offset)
        finally:
            try:
                await consumer.stop()
            except BaseException:  # noqa: BLE001 - shutting down
                pass


def _wire_web(w: Worker, rules: Any, registry: Any) -> None:
    app, engine, metrics = w.app, w.engine, w.metrics

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/segments")
    async def segments_page(web: Any, request: Any) -> Any:
        rs = engine.ruleset()
        conv = engine.segment_conversion()
        a, b = engine.user_prior()
        return web.json({"rules_version": None if rs is None else rs.version,
                         "user_conversion_prior": {"alpha": a, "beta": b, "mean": a / (a + b)},
                         "segments": {g.name: {"min_size": g.min_size, "members": engine.segment_size(g.name),
                                               "local_members": engine.local_segment_size(g.name),
                                               "active": engine.segment_active(g.name),
                                               **{k: v for k, v in conv.get(g.name, {}).items() if k != "members"}}
                                      for g in (rs.segments if rs is not None else ())}})

    @app.page("/rules")
    async def rules_page(web: Any, request: Any) -> Any:
        if rules is None:
            return web.json({"path": None, "version": None})
        rs = rules.current()
        return web.json({"path": str(rules.path), "version": rs.version, "reloads": rules.reloads,
                         "rejected": rules.failures, "error": None if rules.error is None else str(rules.error),
                         "warnings": list(rs.warnings), "evaluation_errors": engine.rule_errors,
                         "segments": [{"name": g.name, "when": g.when.source, "min_size": g.min_size}
                                      for g in rs.segments],
                         "triggers": [{"name": t.name, "on": t.on.kind if t.on.kind != "event" else t.on.event_type,
                                       "segment": t.on.segment,
                                       "timeout": None if t.on.timeout is None else
                                       {"after": t.on.timeout.after, "no": list(t.on.timeout.no),
                                        "within_s": t.on.timeout.within_s},
                                       "when": t.when.source, "action": t.action.type, "cooldown_s": t.cooldown_s,
                                       "once_per": t.once_per, "requires_consent": t.requires_consent}
                                      for t in rs.triggers]})

    @app.page("/progress")
    async def progress_page(web: Any, request: Any) -> Any:
        return web.json({"topics": {t: {str(p): o for p, o in parts.items()} for t, parts in w.progress.items()},
                         "models": registry.snapshot_versions if registry is not None else {},
                         "pending_timers": engine.pending_timers(),
                         "redis_pending": len(w.writer.pending)})


def _wire_health(w: Worker) -> None:
    """Every ``health_poll_s``: Kafka (the consumer lag of this worker's input partitions, which
    also proves the broker answers) and Redis (PING); ``/ready`` answers from the last results
    (HTTP 503 until the first recovery is done and while a check fails), ``/health`` is liveness
    (200 while the event loop answers). See docs/operations.md."""
    app, s, metrics = w.app, w.settings, w.metrics
    required = ["kafka"] + (["redis"] if s.redis_url else [])
    readiness = Readiness(required, max_age_s=max(15.0, 3 * s.health_poll_s), recovered=False)
    app.clickpulse["readiness"] = readiness  # type: ignore[attr-defined]
    probe = KafkaProbe(s.kafka_bootstrap, s.app_id, timeout_s=max(2.0, min(10.0, s.health_poll_s)))
    inputs = {s.topic_raw, s.topic_valid, s.topic_privacy}
    reported: set[tuple[str, int]] = set()
    redis_client: list[Any] = []

    def record(name: str, error: str | None) -> None:
        readiness.record(name, error)
        metrics.dependency_up.labels(name).set(0 if error else 1)
        metrics.dependency_checks.labels(name, "error" if error else "ok").inc()

    lock = asyncio.Lock()

    watch = ProgressWatch(s.stall_timeout_s) if s.stall_timeout_s > 0 else None

    @app.on_rebalance_complete.connect
    async def health_recovered(sender: Any = None, **kwargs: Any) -> None:
        if recovery_superseded(app):
            return
        readiness.recovered = True
        if watch is not None:
            watch.reset()
        asyncio.ensure_future(check())  # ready without waiting a whole period

    @app.timer(interval=s.health_poll_s)
    async def check_dependencies() -> None:
        await check()

    async def check() -> None:
        async with lock:
            await _check()

    async def _check() -> None:
        tps = sorted((tp.topic, tp.partition) for tp in app.assignor.assigned_actives() if tp.topic in inputs)
        try:
            lags = await probe.lag(tps)
        except Exception as err:  # noqa: BLE001 - a failed check is a result, never a crash
            record("kafka", f"{type(err).__name__}: {err}"[:300] or type(err).__name__)
        else:
            record("kafka", None)
            for (topic, part), n in lags.items():
                metrics.consumer_lag.labels(topic, str(part)).set(n)
            for topic, part in reported - set(lags):  # partitions that moved to another worker
                metrics.consumer_lag.remove(topic, str(part))
            reported.clear()
            reported.update(lags)
            if watch is not None and not app.rebalancing:
                stalled(watch.check(time.monotonic(), lags, probe.committed, _seen(w)))
        if s.redis_url:
            try:
                if not redis_client:
                    import redis.asyncio as aioredis
                    redis_client.append(aioredis.from_url(s.redis_url, socket_timeout=2.0,
                                                          socket_connect_timeout=2.0))
                await redis_ping(redis_client[0], 3.0)
            except Exception as err:  # noqa: BLE001
                record("redis", f"{type(err).__name__}: {err}"[:300])
            else:
                record("redis", None)

    def stalled(stalls: list[Any]) -> None:
        if not stalls:
            return
        for st in stalls:
            metrics.input_stalls.labels(st.topic).inc()
            log.error("input stalled: %s[%d] has %d records waiting but made no progress for %.0f s (committed offset "
                      "%s, next offset delivered %s; consumer state: %s): exiting 75 so that a restart resumes it "
                      "(CLICKPULSE_STALL_TIMEOUT_S)", st.topic, st.partition, st.lag, st.seconds, st.committed,
                      st.seen, _consumer_state(app, st.topic, st.partition))
        w.publisher.on_fatal(75)

    @app.page("/ready")
    async def ready_page(web: Any, request: Any) -> Any:
        body = readiness.report()
        return web.json(body, status=200 if body["ready"] else 503)

    @app.page("/health")
    async def health_page(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})
