"""Consumer lag and readiness: the worker's view of Kafka and Redis.

:class:`KafkaProbe` reads the consumer group's committed offsets and the log-end offsets of the
worker's input partitions (one admin request and one list-offsets request per poll, with its own
long-lived clients, independent of the Faust consumer), which gives the lag and doubles as the
Kafka reachability check. :func:`redis_ping` is the Redis check. :class:`Readiness` keeps the
last result of each check for ``/ready`` (HTTP 503 while one failed or is older than its
horizon) — a request never waits for a check.

Lag is the standard consumer-group lag (as ``kafka-consumer-groups.sh --describe`` and
kafka-lag-exporter report it): log-end offset minus committed offset, per partition. A
partition without a committed offset counts from its log-start offset (the group reads from the
earliest record). It includes the up to ``broker_commit_interval`` (1 s) of records processed but
not yet committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

TP = tuple[str, int]


def consumer_lag(ends: Mapping[TP, int], committed: Mapping[TP, int | None],
                 begins: Mapping[TP, int]) -> dict[TP, int]:
    """Lag per ``(topic, partition)`` in ``ends`` (records, ≥ 0).

    Examples
    --------
    >>> consumer_lag({("t", 0): 10, ("t", 1): 5}, {("t", 0): 7}, {("t", 0): 0, ("t", 1): 2})
    {('t', 0): 3, ('t', 1): 3}
    """
    out = {}
    for tp, end in ends.items():
        c = committed.get(tp)
        start = c if c is not None and c >= 0 else begins.get(tp, 0)
        out[tp] = max(0, end - start)
    return out


@dataclass
class Stall:
    """An input partition that has not moved for ``seconds``: ``lag`` records waiting, the
    committed offset stuck at ``committed``, and no new record delivered (the last one the
    worker saw ends at ``seen``, the next offset; None: none since the start or a rebalance)."""

    topic: str
    partition: int
    lag: int
    committed: int | None
    seen: int | None
    seconds: float


@dataclass
class ProgressWatch:
    """Liveness of the worker's own input partitions (a watchdog, as a Kubernetes liveness probe
    is for a process).

    A partition *makes progress* when its committed offset moves or the worker is handed a record
    of it it had not seen. A partition with lag (records waiting: log end beyond the committed
    offset) that makes no progress for ``timeout_s`` seconds is *stalled*: the consumer stopped
    fetching it or the commits of what was processed stopped. Both were seen with Faust after a
    rebalance or a restart on a loaded machine, and in both a restart resumes it (the worker then
    exits 75 for its supervisor; docs/operations.md). A partition without lag is idle, never
    stalled; :meth:`reset` (at each rebalance) starts every partition's clock again.

    Examples
    --------
    >>> w = ProgressWatch(timeout_s=60)
    >>> w.check(0, {("t", 0): 5}, {("t", 0): 10}, {("t", 0): 11})     # first look
    []
    >>> w.check(30, {("t", 0): 5}, {("t", 0): 10}, {("t", 0): 11})
    []
    >>> [s.partition for s in w.check(61, {("t", 0): 5}, {("t", 0): 10}, {("t", 0): 11})]
    [0]
    >>> w.check(62, {("t", 0): 4}, {("t", 0): 11}, {("t", 0): 11})    # the commit moved
    []
    """

    timeout_s: float
    _last: dict[TP, tuple[Any, float]] = field(default_factory=dict)

    def reset(self) -> None:
        self._last.clear()

    def check(self, now_s: float, lags: Mapping[TP, int], committed: Mapping[TP, int | None],
              seen: Mapping[TP, int | None]) -> list[Stall]:
        """The partitions of ``lags`` stalled at ``now_s`` (seconds, any monotonic clock);
        ``committed`` and ``seen`` as in :class:`Stall`. Partitions no longer in ``lags`` are
        forgotten."""
        out = []
        for tp in list(self._last):
            if tp not in lags:
                del self._last[tp]
        for tp, lag in lags.items():
            state = (committed.get(tp), seen.get(tp))
            prev = self._last.get(tp)
            if lag <= 0 or prev is None or prev[0] != state:
                self._last[tp] = (state, now_s)
                continue
            if now_s - prev[1] >= self.timeout_s:
                out.append(Stall(tp[0], tp[1], lag, state[0], state[1], round(now_s - prev[1], 1)))
        return out


class KafkaProbe:
    """Polls a consumer group's lag on given partitions; a failed poll means Kafka is unreachable.

    Parameters
    ----------
    bootstrap
        ``host:port[,host:port]``.
    group
        The consumer group (the worker's Faust app id).
    timeout_s
        A poll taking longer fails (``asyncio.TimeoutError``) and the clients are rebuilt.
    """

    def __init__(self, bootstrap: str, group: str, timeout_s: float = 5.0) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.timeout_s = timeout_s
        self._admin: Any = None
        self._consumer: Any = None
        #: the group's committed offset of each partition of the last successful poll (None: none yet)
        self.committed: dict[TP, int | None] = {}

    async def _clients(self) -> tuple[Any, Any]:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap,
                                        request_timeout_ms=int(self.timeout_s * 1000))
            await admin.start()
            self._admin = admin
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                        request_timeout_ms=max(int(self.timeout_s * 1000), 1000))
            await consumer.start()
            self._consumer = consumer
        return self._admin, self._consumer

    async def lag(self, partitions: Iterable[TP]) -> dict[TP, int]:
        """Lag of ``partitions`` (empty input: only checks that the broker answers).

        Raises
        ------
        Exception
            Whatever the broker or the connection raised, or ``asyncio.TimeoutError`` after
            ``timeout_s``; the clients are closed and rebuilt at the next poll.
        """
        try:
            return await asyncio.wait_for(self._lag(list(partitions)), self.timeout_s)
        except BaseException:
            await self.close()
            raise

    async def _lag(self, tps: list[TP]) -> dict[TP, int]:
        from aiokafka import TopicPartition
        admin, consumer = await self._clients()
        if not tps:
            await admin.describe_cluster()
            return {}
        offs = await admin.list_consumer_group_offsets(self.group)
        committed = {(tp.topic, tp.partition): meta.offset for tp, meta in offs.items()}
        kt = [TopicPartition(t, p) for t, p in tps]
        ends = {(tp.topic, tp.partition): o for tp, o in (await consumer.end_offsets(kt)).items()}
        begins = {(tp.topic, tp.partition): o for tp, o in (await consumer.beginning_offsets(kt)).items()}
        self.committed = {tp: committed.get(tp) for tp in tps}  # for ProgressWatch
        return consumer_lag(ends, committed, begins)

    async def close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        for closer in ((admin.close if admin is not None else None), (consumer.stop if consumer is not None else None)):
            if closer is None:
                continue
            try:
                await asyncio.wait_for(closer(), 5.0)
            except BaseException:  # noqa: BLE001 - closing a broken client
                pass


async def redis_ping(client: Any, timeout_s: float = 2.0) -> None:
    """``PING`` through ``client`` (``redis.asyncio``); raises when Redis does not answer in time."""
    await asyncio.wait_for(client.ping(), timeout_s)


@dataclass
class Check:
    """The last result of one dependency check."""

    ok: bool = False
    error: str | None = "not checked yet"
    checked_at: float | None = None  # time.time()


@dataclass
class Readiness:
    """Last check results per dependency; ready when every required one passed recently.

    ``max_age_s``: a result older than this counts as failed (the checking task itself stalled).

    Examples
    --------
    >>> r = Readiness(["kafka", "redis"], max_age_s=30)
    >>> r.record("kafka", None, now=100.0); r.record("redis", "ConnectionError: refused", now=100.0)
    >>> r.ready(now=101.0)
    False
    >>> r.record("redis", None, now=102.0); r.ready(now=103.0), r.ready(now=200.0)
    (True, False)
    """

    required: list[str]
    max_age_s: float = 30.0
    checks: dict[str, Check] = field(default_factory=dict)
    recovered: bool = True  # the worker's own start-up (state recovery) is done

    def __post_init__(self) -> None:
        for name in self.required:
            self.checks.setdefault(name, Check())

    def record(self, name: str, error: str | None, now: float | None = None) -> None:
        self.checks[name] = Check(ok=error is None, error=error, checked_at=time.time() if now is None else now)

    def ready(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if not self.recovered:
            return False
        for name in self.required:
            c = self.checks[name]
            if not c.ok or c.checked_at is None or now - c.checked_at > self.max_age_s:
                return False
        return True

    def report(self, now: float | None = None) -> dict[str, Any]:
        """The ``/ready`` body: ``ready`` and each check's ``ok``, ``error``, ``age_s``."""
        now = time.time() if now is None else now
        return {"ready": self.ready(now), "recovered": self.recovered,
                "checks": {n: {"ok": c.ok, "error": c.error,
                               "age_s": None if c.checked_at is None else round(now - c.checked_at, 3)}
                           for n, c in self.checks.items()}}
