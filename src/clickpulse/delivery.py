"""``clickpulse deliver``: actions from ``<ns>.actions`` to a sink, once per ``action_id``.

The worker publishes actions **at least once**: after a crash it re-processes the uncommitted
tail of its input and publishes those actions again, with the same deterministic ``action_id``
and the same content (only ``created_at``, the wall-clock time of the publication, differs; see
``docs/delivery.md``). This adapter turns that into one delivery per ``action_id`` for a sink that
cannot de-duplicate by itself.

For every batch polled from ``<ns>.actions`` (consumer group ``<ns>-delivery``, offsets committed
by hand):

1. parse; a value that is not an action goes to ``<ns>.actions.dlq`` (reason ``invalid``);
2. skip the actions whose id Redis already has (``<ns>:delivered:<action_id>``) or that came
   earlier in the same batch: *duplicates*; skip the experiments' holdout decisions
   (``deliver: false``, docs/experiments.md): published to measure lift, never delivered;
3. **deliver** the others to the sink (:class:`JsonlSink`: append, one fsync per batch;
   :class:`WebhookSink`: HTTP POST with retries, in offset order per partition);
4. **mark** each delivered id: ``SET <ns>:delivered:<action_id> 1 NX EX <ttl>``;
5. the actions the sink refused (webhook: non-2xx or no answer after the retries) go to
   ``<ns>.actions.dlq`` with the status, acknowledged by the broker: never dropped silently;
6. **commit** the batch's offsets.

So a crash between 3 and 4 delivers that batch's actions again on restart (at least once at the
sink, the one window left; the webhook sends ``Idempotency-Key: <action_id>`` so a receiver can
close it), a crash between 4 and 6 only re-reads them (already marked: skipped), and an action
the worker publishes twice is delivered once as soon as the first copy was marked.

The pieces are separate so that they can be tested alone: :class:`Deliverer` (the steps above,
with the dead-letter producer and the offset commit passed in as callables), :class:`DedupStore`
(Redis), the sinks, and :func:`run` (the Kafka consumer loop).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client import CollectorRegistry, Counter

from .errors import ConfigError, ServiceError
from .runtime import stop_on_signals
from .settings import Settings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP answers a webhook POST is retried on (besides 5xx in general, connection errors and timeouts)."""


def delivered_key(namespace: str, action_id: str) -> str:
    """The Redis key that says ``action_id`` was delivered.

    >>> delivered_key("shop", "0b9c2d6e-2f3a-5d7e-9f1a-3c4b5d6e7f80")
    'shop:delivered:0b9c2d6e-2f3a-5d7e-9f1a-3c4b5d6e7f80'
    """
    return f"{namespace}:delivered:{action_id}"


def group_id(settings: Settings) -> str:
    """The adapter's consumer group: ``<ns>-delivery``."""
    return f"{settings.namespace}-delivery"


def dlq_topic(settings: Settings) -> str:
    """Where undeliverable actions go: ``<ns>.actions.dlq``."""
    return f"{settings.topic_actions}.dlq"


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One message of the actions topic (what the consumer returned, minus Kafka types)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    topic: str = ""


@dataclass(frozen=True)
class Item:
    """An action to deliver: its record (``value`` = the exact bytes on the topic) and parsed form."""

    record: Record
    action_id: str
    action: dict[str, Any]


@dataclass(frozen=True)
class Failure:
    """An action the sink did not take: ``status`` is the last HTTP status (``None``: no answer)."""

    item: Item
    reason: str  # http_3xx | http_4xx | http_5xx | connection
    status: int | None
    error: str
    attempts: int


def parse_action(rec: Record) -> Item | str:
    """The record as an :class:`Item`, or why it is not an action (a string).

    >>> parse_action(Record(0, 1, b"u", b'{"action_id": "a1", "type": "x"}')).action_id
    'a1'
    >>> parse_action(Record(0, 2, b"u", b"{"))
    'not JSON: unexpected end of data: line 1 column 2 (char 1)'
    """
    if rec.value is None:
        return "no value (tombstone)"
    try:
        obj = orjson.loads(rec.value)
    except orjson.JSONDecodeError as err:
        return f"not JSON: {err}"
    if not isinstance(obj, dict) or not isinstance(obj.get("action_id"), str) or not obj["action_id"]:
        return "not an action: no action_id"
    return Item(rec, obj["action_id"], obj)


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dlq_record(rec: Record, *, reason: str, status: int | None, error: str, attempts: int, sink: str,
               action: dict[str, Any] | None) -> dict[str, Any]:
    """The value written to ``<ns>.actions.dlq`` for an action that was not delivered (keyed like
    the action, so re-publishing ``action`` to ``<ns>.actions`` puts it back on its partition;
    the adapter's de-duplication makes that safe)."""
    return {
        "schema_version": 1,
        "action_id": None if action is None else action.get("action_id"),
        "reason": reason,
        "status": status,
        "error": error[:1000],
        "attempts": attempts,
        "sink": sink,
        "source": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
        "action": action,
        # an unparseable value is kept as it was (base64), a parsed action is in ``action``
        "value_b64": base64.b64encode(rec.value).decode() if action is None and rec.value is not None else None,
        "failed_at": _now(),
    }


# --------------------------------------------------------------------------------------- metrics
class DeliveryMetrics:
    """The adapter's metrics, in their own registry (``--metrics-port`` serves it)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.delivered = Counter("clickpulse_delivery_delivered_total",
                                 "Actions delivered to the sink (then marked in Redis)", ["sink"], registry=r)
        self.duplicates = Counter("clickpulse_delivery_duplicates_total",
                                  "Actions skipped because their action_id was already delivered (Redis) or came "
                                  "earlier in the same batch", registry=r)
        self.failures = Counter("clickpulse_delivery_failures_total",
                                "Actions sent to <ns>.actions.dlq instead of the sink, by reason (http_3xx, "
                                "http_4xx, http_5xx, connection, invalid)", ["reason"], registry=r)
        self.retries = Counter("clickpulse_delivery_retries_total", "Webhook POSTs retried", registry=r)
        self.mark_conflicts = Counter("clickpulse_delivery_mark_conflicts_total",
                                      "Delivered actions whose id was already marked when marking (another adapter "
                                      "delivered it meanwhile, e.g. around a rebalance): delivered twice", registry=r)
        self.batches = Counter("clickpulse_delivery_batches_total", "Batches committed", registry=r)
        self.holdout = Counter("clickpulse_delivery_holdout_skipped_total",
                               "Actions not delivered because they are an experiment's holdout decisions "
                               "(deliver: false)", registry=r)


# ----------------------------------------------------------------------------------- dedup store
class DedupStore:
    """Which action ids were delivered, in Redis (``redis.asyncio`` client, or a fake in tests).

    Uses ``MGET`` to look ids up and a non-transactional pipeline of ``SET key 1 NX EX ttl`` to
    mark them: one round trip each per batch.
    """

    def __init__(self, redis: Any, namespace: str, ttl_s: float) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_s = max(1, int(ttl_s))

    async def delivered(self, ids: Sequence[str]) -> set[str]:
        """The ids among ``ids`` that are marked delivered."""
        if not ids:
            return set()
        values = await self.redis.mget([delivered_key(self.namespace, i) for i in ids])
        return {i for i, v in zip(ids, values, strict=True) if v is not None}

    async def mark(self, ids: Sequence[str]) -> list[bool]:
        """Mark ``ids`` delivered; per id, whether this call set the key (``False``: already set)."""
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.set(delivered_key(self.namespace, i), b"1", nx=True, ex=self.ttl_s)
            res = await pipe.execute()
        return [bool(r) for r in res]


# ------------------------------------------------------------------------------------------ sinks
class Sink(Protocol):
    """Where actions go. ``deliver`` returns the actions it could not deliver (anything raised
    means the whole batch is in doubt: nothing is marked or committed)."""

    name: str

    async def start(self) -> None: ...

    async def deliver(self, items: Sequence[Item]) -> list[Failure]: ...

    async def close(self) -> None: ...


class JsonlSink:
    """Append each action (its exact bytes from the topic) as one line to ``path``; the batch is
    flushed and fsynced before :meth:`deliver` returns, so a marked action is on disk.

    At start, a last line without its newline (a write cut by a crash; it was never marked, so it
    will be delivered again) is truncated away.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: Any = None

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fh = self.path.open("a+b")
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                # find the end of the last complete line
                pos, chunk = size, 65536
                cut = 0
                while pos > 0:
                    start = max(0, pos - chunk)
                    fh.seek(start)
                    data = fh.read(pos - start)
                    nl = data.rfind(b"\n")
                    if nl >= 0:
                        cut = start + nl + 1
                        break
                    pos = start
                log.warning("%s: truncating %d bytes of a line cut by a crash (its action is delivered again)",
                            self.path, size - cut)
                fh.truncate(cut)
                os.fsync(fh.fileno())
        self._fh = fh
        if created:  # make the new file's directory entry durable too
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _write(self, items: Sequence[Item]) -> None:
        self._fh.write(b"".join(it.record.value + b"\n" for it in items))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    async def deliver(self, items: Sequence[Item]) -> list[Failure]:
        if items:
            await asyncio.to_thread(self._write, items)
        return []

    async def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _HttpStatus(Exception):
    def __init__(self, status: int, body: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUS or self.status >= 500


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date).

    >>> _retry_after("3"), _retry_after(None), _retry_after("soon")
    (3.0, None, None)
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(tz=UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


class WebhookSink:
    """POST each action (its exact bytes from the topic, ``Content-Type: application/json``,
    ``Idempotency-Key: <action_id>``) to ``url`` with aiohttp; 2xx is delivered.

    Connection errors, timeouts, 408, 425, 429 and 5xx are retried (tenacity: exponential backoff
    with jitter from ``backoff_s`` up to ``backoff_max_s``, ``Retry-After`` honoured up to that
    maximum) until ``attempts`` tries; any other answer (3xx: redirects are not followed, 4xx) is
    final at once. A final failure is returned as a :class:`Failure` (the action goes to the
    dead-letter topic). Actions of one partition are sent one after the other, in offset order
    (so per user); partitions go in parallel.
    """

    name = "webhook"

    def __init__(self, url: str, *, attempts: int = 5, timeout_s: float = 10.0, backoff_s: float = 0.5,
                 backoff_max_s: float = 30.0, metrics: DeliveryMetrics | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook URL must be http:// or https://, got {url!r}")
        self.url = url
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.metrics = metrics
        self._session: Any = None

    async def start(self) -> None:
        import aiohttp

        from . import __version__
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers={"User-Agent": f"clickpulse-deliver/{__version__}"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver(self, items: Sequence[Item]) -> list[Failure]:
        by_partition: dict[int, list[Item]] = {}
        for it in items:
            by_partition.setdefault(it.record.partition, []).append(it)

        async def one_partition(its: list[Item]) -> list[Failure]:
            out = []
            for it in its:
                f = await self._post(it)
                if f is not None:
                    out.append(f)
            return out

        results = await asyncio.gather(*(one_partition(v) for v in by_partition.values()))
        return [f for fs in results for f in fs]

    def _wait(self, state: Any) -> float:
        from tenacity import wait_exponential_jitter
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _HttpStatus) and exc.retry_after is not None:
            return min(exc.retry_after, self.backoff_max_s)
        return wait_exponential_jitter(initial=self.backoff_s, max=self.backoff_max_s,
                                       jitter=self.backoff_s)(state)

    def _retryable(self, exc: BaseException) -> bool:
        import aiohttp
        if isinstance(exc, _HttpStatus):
            return exc.retryable
        return isinstance(exc, (aiohttp.ClientError, TimeoutError))

    async def _post_once(self, it: Item) -> None:
        async with self._session.post(self.url, data=it.record.value, allow_redirects=False,
                                      headers={"Content-Type": "application/json",
                                               "Idempotency-Key": it.action_id}) as resp:
            if 200 <= resp.status < 300:
                await resp.read()
                return
            body = (await resp.content.read(500)).decode("utf-8", "replace")
            raise _HttpStatus(resp.status, body, _retry_after(resp.headers.get("Retry-After")))

    async def _post(self, it: Item) -> Failure | None:
        import aiohttp
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        def before_sleep(state: Any) -> None:
            if self.metrics is not None:
                self.metrics.retries.inc()
            log.info("webhook POST of action %s failed (%s), try %d of %d", it.action_id,
                     state.outcome.exception(), state.attempt_number, self.attempts)

        attempt_no = 0
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.attempts), wait=self._wait,
                                               retry=retry_if_exception(self._retryable),
                                               before_sleep=before_sleep, reraise=True):
                with attempt:
                    attempt_no = attempt.retry_state.attempt_number
                    await self._post_once(it)
            return None
        except _HttpStatus as err:
            reason = "http_5xx" if err.status >= 500 else "http_4xx" if err.status >= 400 else "http_3xx"
            return Failure(it, reason, err.status, str(err), attempt_no)
        except (aiohttp.ClientError, TimeoutError) as err:  # no (valid) answer after the retries
            return Failure(it, "connection", None, f"{type(err).__name__}: {err}", attempt_no)


# -------------------------------------------------------------------------------------- deliverer
@dataclass
class BatchResult:
    """What one batch did (also counted in :class:`DeliveryMetrics`)."""

    delivered: list[str] = field(default_factory=list)
    duplicates: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    mark_conflicts: int = 0
    committed: dict[int, int] = field(default_factory=dict)
    holdout: int = 0  # actions with ``deliver: false`` (an experiment's holdout): skipped


class Deliverer:
    """The steps of one batch: parse, skip duplicates, deliver, mark, dead-letter, commit.

    Parameters
    ----------
    sink, store, metrics
        See :class:`JsonlSink` / :class:`WebhookSink`, :class:`DedupStore`, :class:`DeliveryMetrics`.
    dead_letter
        ``await dead_letter([(key, value_bytes), ...])`` publishes to ``<ns>.actions.dlq`` and
        returns once the broker acknowledged.
    commit
        ``await commit({partition: next_offset})`` commits the consumer group's offsets.
    """

    def __init__(self, sink: Sink, store: DedupStore, metrics: DeliveryMetrics, *,
                 dead_letter: Callable[[list[tuple[bytes | None, bytes]]], Awaitable[None]],
                 commit: Callable[[dict[int, int]], Awaitable[None]]) -> None:
        self.sink = sink
        self.store = store
        self.metrics = metrics
        self.dead_letter = dead_letter
        self.commit = commit

    async def handle(self, records: Sequence[Record]) -> BatchResult:
        res = BatchResult()
        if not records:
            return res
        dlq: list[tuple[bytes | None, bytes]] = []
        fresh: list[Item] = []
        in_batch: set[str] = set()
        for rec in records:
            item = parse_action(rec)
            if isinstance(item, str):
                log.error("%s@%d:%d is not an action (%s): dead-lettered", rec.topic, rec.partition, rec.offset, item)
                d = dlq_record(rec, reason="invalid", status=None, error=item, attempts=0, sink=self.sink.name,
                               action=None)
                dlq.append((rec.key, orjson.dumps(d)))
                res.failed.append(d)
                self.metrics.failures.labels("invalid").inc()
            elif item.action.get("deliver") is False:  # an experiment's holdout: measured, never delivered
                res.holdout += 1
            elif item.action_id in in_batch:
                res.duplicates += 1
            else:
                in_batch.add(item.action_id)
                fresh.append(item)
        done = await self.store.delivered([it.action_id for it in fresh])
        new = [it for it in fresh if it.action_id not in done]
        res.duplicates += len(fresh) - len(new)
        # 1. deliver
        failures = await self.sink.deliver(new) if new else []
        failed = {id(f.item) for f in failures}
        ok = [it for it in new if id(it) not in failed]
        self.metrics.delivered.labels(self.sink.name).inc(len(ok))
        # 2. mark (only what the sink has: a dead-lettered action re-published later is tried again)
        if ok:
            marks = await self.store.mark([it.action_id for it in ok])
            res.mark_conflicts = marks.count(False)
            if res.mark_conflicts:
                self.metrics.mark_conflicts.inc(res.mark_conflicts)
                log.warning("%d delivered action(s) were already marked by someone else (delivered twice)",
                            res.mark_conflicts)
        res.delivered = [it.action_id for it in ok]
        for f in failures:
            log.error("action %s not delivered (%s, status %s, %d tries): dead-lettered", f.item.action_id,
                      f.reason, f.status, f.attempts)
            d = dlq_record(f.item.record, reason=f.reason, status=f.status, error=f.error, attempts=f.attempts,
                           sink=self.sink.name, action=f.item.action)
            dlq.append((f.item.record.key, orjson.dumps(d)))
            res.failed.append(d)
            self.metrics.failures.labels(f.reason).inc()
        if dlq:
            await self.dead_letter(dlq)
        self.metrics.duplicates.inc(res.duplicates)
        self.metrics.holdout.inc(res.holdout)
        # 3. commit
        offsets: dict[int, int] = {}
        for rec in records:
            offsets[rec.partition] = max(offsets.get(rec.partition, 0), rec.offset + 1)
        await self.commit(offsets)
        res.committed = offsets
        self.metrics.batches.inc()
        return res


# ------------------------------------------------------------------------------------------ kafka
async def ensure_dlq_topic(settings: Settings) -> None:
    """Create ``<ns>.actions.dlq`` if missing (1 partition, 30 days) and warn when the actions
    topic keeps messages longer than the de-duplication TTL."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        if settings.topic_actions not in existing:
            raise ServiceError(f"topic {settings.topic_actions} does not exist: is CLICKPULSE_NAMESPACE "
                               f"({settings.namespace}) the worker's?")
        if dlq_topic(settings) not in existing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(dlq_topic(settings), 1, settings.replication_factor, topic_configs={
                    "retention.ms": str(30 * 86400 * 1000)})])
        try:
            resp = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.topic_actions)])
            entries = resp[0].to_object()["resources"][0]["config_entries"]
            retention_ms = int(next(e["config_value"] for e in entries if e["config_names"] == "retention.ms"))
        except Exception as err:  # noqa: BLE001 - only a warning depends on it
            log.debug("could not read the retention of %s: %s", settings.topic_actions, err)
            return
        if retention_ms < 0 or retention_ms > settings.delivery_dedup_ttl_s * 1000:
            log.warning("%s keeps messages %s but CLICKPULSE_DELIVERY_DEDUP_TTL_S is %g s: an action re-read after "
                        "its id expired in Redis is delivered again", settings.topic_actions,
                        "forever" if retention_ms < 0 else f"{retention_ms / 1000:g} s", settings.delivery_dedup_ttl_s)
    finally:
        await admin.close()


def check_sink_args(kind: str, out: str | None, url: str | None) -> None:
    """The CLI's sink arguments are complete (checked before any broker is contacted).

    Raises
    ------
    ConfigError
        An unknown sink, ``jsonl`` without ``--out`` or ``webhook`` without ``--url``.
    """
    if kind == "jsonl" and not out:
        raise ConfigError("--sink jsonl needs --out FILE")
    if kind == "webhook" and not url:
        raise ConfigError("--sink webhook needs --url URL")
    if kind not in ("jsonl", "webhook"):
        raise ConfigError(f"unknown sink {kind!r} (jsonl, webhook)")


def make_sink(kind: str, *, out: str | None, url: str | None, settings: Settings,
              metrics: DeliveryMetrics) -> Sink:
    """A sink from the CLI's ``--sink jsonl --out FILE`` / ``--sink webhook --url URL``
    (:func:`check_sink_args` raises ``ConfigError`` for incomplete ones)."""
    check_sink_args(kind, out, url)
    if kind == "jsonl":
        return JsonlSink(out)  # type: ignore[arg-type]
    if kind == "webhook":
        return WebhookSink(url, attempts=settings.delivery_webhook_attempts,
                           timeout_s=settings.delivery_webhook_timeout_s,
                           backoff_s=settings.delivery_webhook_backoff_s,
                           backoff_max_s=settings.delivery_webhook_backoff_max_s, metrics=metrics)
    raise AssertionError(kind)  # check_sink_args refused it


def _max_poll_interval_ms(settings: Settings, sink: Sink) -> int:
    """A batch must finish before the group coordinator gives the partitions away: for a webhook
    that is down, one partition's share of a batch can take every retry of every action."""
    if not isinstance(sink, WebhookSink):
        return 300_000
    per_action = sink.attempts * (sink.timeout_s + sink.backoff_max_s)
    return int(min(3600.0, max(300.0, settings.delivery_batch_max * per_action)) * 1000)


async def run(settings: Settings, sink: Sink, *, metrics: DeliveryMetrics | None = None,
              stop: asyncio.Event | None = None, start_from: str = "earliest") -> None:
    """Consume ``<ns>.actions`` and deliver until ``stop`` is set (the batch in hand is finished).

    ``start_from``: where a group without committed offsets starts (``earliest``: every retained
    action; ``latest``: only new ones).

    Raises
    ------
    ServiceError
        Redis is not configured or not reachable, or the actions topic does not exist.
    """
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.errors import CommitFailedError, IllegalStateError

    if not settings.redis_url:
        raise ServiceError("clickpulse deliver needs Redis (CLICKPULSE_REDIS_URL) to remember delivered actions")
    metrics = metrics or DeliveryMetrics()
    stop = stop or asyncio.Event()
    await ensure_dlq_topic(settings)
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        await r.ping()
    except Exception as err:  # noqa: BLE001
        await r.aclose()
        raise ServiceError(f"Redis at {settings.redis_url} is not reachable: {err}") from err
    topic = settings.topic_actions
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka_bootstrap, group_id=group_id(settings),
        enable_auto_commit=False, auto_offset_reset=start_from, isolation_level="read_committed",
        session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
        heartbeat_interval_ms=max(1000, int(settings.kafka_session_timeout_s * 1000) // 3),
        max_poll_interval_ms=_max_poll_interval_ms(settings, sink))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)

    async def dead_letter(recs: list[tuple[bytes | None, bytes]]) -> None:
        futs = [await producer.send(dlq_topic(settings), key=k, value=v) for k, v in recs]
        for f in futs:
            await f

    async def commit(offsets: dict[int, int]) -> None:
        try:
            await consumer.commit({TopicPartition(topic, p): o for p, o in offsets.items()})
        except (CommitFailedError, IllegalStateError) as err:
            # the partitions moved during the batch: their new owner re-reads it and finds every
            # delivered action marked (dead-lettered ones are tried again)
            log.warning("offset commit failed (%s); the batch's new owner skips what was delivered", err)

    deliverer = Deliverer(sink, DedupStore(r, settings.namespace, settings.delivery_dedup_ttl_s), metrics,
                          dead_letter=dead_letter, commit=commit)
    await sink.start()
    started: list[Any] = []
    try:
        await producer.start()
        started.append(producer)
        await consumer.start()
        started.append(consumer)
        log.info("clickpulse deliver ready: %s -> %s sink (group %s, dead letters to %s)", topic, sink.name,
                 group_id(settings), dlq_topic(settings))
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500, max_records=settings.delivery_batch_max)
            records = [Record(tp.partition, m.offset, m.key, m.value, tp.topic)
                       for tp, msgs in batch.items() for m in msgs]
            if records:
                await deliverer.handle(records)
    finally:
        for c in reversed(started):
            with contextlib.suppress(asyncio.CancelledError):  # aiokafka#647
                await c.stop()
        await sink.close()
        await r.aclose()


def run_cli(kind: str, *, out: str | None, url: str | None, metrics_port: int | None,
            start_from: str = "earliest", settings: Settings | None = None) -> int:
    """``clickpulse deliver``: run until SIGTERM/SIGINT (the batch in hand is finished first)."""
    settings = settings or Settings.from_env()
    metrics = DeliveryMetrics()
    sink = make_sink(kind, out=out, url=url, settings=settings, metrics=metrics)
    if metrics_port is not None:
        from prometheus_client import start_http_server
        start_http_server(metrics_port, addr=settings.web_host, registry=metrics.registry)

    async def main() -> None:
        stop = stop_on_signals()
        if kind == "jsonl":
            where = out
        else:  # no credentials in the line: user:password@ and the query string are left out
            from urllib.parse import urlsplit
            u = urlsplit(url or "")
            where = f"{u.scheme}://{u.hostname}{f':{u.port}' if u.port else ''}{u.path}"
        print(f"delivering {settings.topic_actions} to {kind} {where} (group {group_id(settings)}"
              + (f", metrics on http://{settings.web_host}:{metrics_port}/metrics" if metrics_port is not None else "")
              + ")", flush=True)
        await run(settings, sink, metrics=metrics, stop=stop, start_from=start_from)

    asyncio.run(main())
    return 0
