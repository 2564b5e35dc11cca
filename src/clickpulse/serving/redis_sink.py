"""Write-behind of user profiles to Redis: coalesced, pipelined, never blocking the stream.

The stream calls :meth:`ProfileWriter.mark` (a dict assignment: the newest profile per user
wins); a background task calls :meth:`flush` every ``CLICKPULSE_REDIS_FLUSH_INTERVAL_S`` and
writes all pending profiles in one pipeline (``SET key json EX ttl``). When Redis is down the
profiles stay pending (bounded by ``CLICKPULSE_REDIS_MAX_PENDING``; the oldest are dropped and
counted beyond it) and are retried on the next flush.

Key: ``<namespace>:profile:<user_key>``; value: JSON per ``schemas/profile.v1.json``;
TTL: ``CLICKPULSE_USER_RETENTION_S``.

Segment membership follows the profile written in the same pipeline: ``<namespace>:segment:<name>``
is a sorted set (every score 0, so members are ordered by user key: exact cursor paging with
``ZRANGE ... BYLEX``) holding the users whose newest profile lists the segment; each profile write
adds the user to its segments and removes it from every other known segment, so expiry, bot
flagging, quarantine and erasure (which leave segments without a segment-change record) are
followed too. ``<namespace>:segments`` (a set) names the segments of the rules file and those seen
in profiles. Served by :mod:`clickpulse.serving.api`.

Refill (:class:`ProfileRefill`): when Redis comes back empty (a restart without persistence), the
worker rewrites the profile of every user of its partitions from the state table, not only of
users who send new events. A per-partition sentinel ``<namespace>:epoch:<partition>`` is set once
a partition's profiles are all in Redis; the worker checks its partitions' sentinels every
``CLICKPULSE_REDIS_REFILL_CHECK_S`` and refills those that are missing.

Identity links (docs/identity.md): ``<namespace>:alias:<guest_user_key>`` holds the customer's
user key (plain UTF-8) for a guest merged into a customer, with the same TTL (refreshed while the
guest's events keep being forwarded); a linked guest has no profile of its own (its key is
deleted with the link's first write). An erasure deletes the alias key.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import orjson

from ..errors import error_text
from ..observability.metrics import Metrics

log = logging.getLogger(__name__)


def profile_key(namespace: str, user_key: str) -> str:
    return f"{namespace}:profile:{user_key}"


def segment_key(namespace: str, segment: str) -> str:
    """The sorted set of ``segment``'s members (user keys, score 0)."""
    return f"{namespace}:segment:{segment}"


def segments_index_key(namespace: str) -> str:
    """The set of segment names known to the workers."""
    return f"{namespace}:segments"


def alias_key(namespace: str, guest_user_key: str) -> str:
    """Written by identity stitching: a guest's user key -> its customer's user key (a string)."""
    return f"{namespace}:alias:{guest_user_key}"


def epoch_key(namespace: str, partition: int) -> str:
    """Refill sentinel of one partition of the valid topic (see :class:`ProfileRefill`)."""
    return f"{namespace}:epoch:{partition}"


class ProfileWriter:
    """Coalescing write-behind buffer.

    Parameters
    ----------
    client
        A ``redis.asyncio.Redis`` (or ``None`` to disable writing).
    namespace
        Key prefix.
    ttl_s
        Expiry of each profile key, seconds.
    max_pending
        Bound on buffered profiles.
    """

    def __init__(self, client: Any, namespace: str, ttl_s: int, max_pending: int, metrics: Metrics) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = max(1, int(ttl_s))
        self.max_pending = max_pending
        self.metrics = metrics
        self.pending: dict[str, dict[str, Any]] = {}
        self.forgotten: set[str] = set()  # erased users whose profile key must be deleted
        #: segment names whose sorted sets a profile write keeps in step (grows, never shrinks)
        self.known_segments: set[str] = set()
        #: serialises pipelines of the flush and of the refill, so an older refilled profile is never
        #: written after a newer flushed one
        self.lock = asyncio.Lock()
        self.aliases: dict[str, str | None] = {}  # guest key -> customer key (None: delete the link)
        self._failing = False

    def segment_names(self, names: Iterable[str]) -> None:
        """Declare the rules file's segment names (their sets are kept in step from now on)."""
        self.known_segments.update(names)

    def write(self, pipe: Any, user_key: str, prof: dict[str, Any]) -> None:
        """Queue on ``pipe`` the commands that store one profile and its segment memberships."""
        ns = self.namespace
        pipe.set(profile_key(ns, user_key), orjson.dumps(prof), ex=self.ttl_s)
        segs = prof.get("segments") or ()
        if segs:
            self.known_segments.update(segs)
        for seg in segs:
            pipe.zadd(segment_key(ns, seg), {user_key: 0})
        for seg in self.known_segments.difference(segs):
            pipe.zrem(segment_key(ns, seg), user_key)

    def forget(self, user_key: str) -> None:
        """An erased user: drop its pending profile and delete its key at the next flush (retried
        until Redis answers)."""
        self.pending.pop(user_key, None)
        self.forgotten.add(user_key)

    def alias(self, guest_key: str, customer_key: str | None) -> None:
        """Queue the guest's link to its customer (``None``: delete it) for the next flush (O(1))."""
        self.aliases[guest_key] = customer_key
        if customer_key is not None:
            self.pending.pop(guest_key, None)  # a stub has no profile

    def mark(self, user_key: str, profile: dict[str, Any]) -> None:
        """Queue the newest profile of a user (O(1), no I/O)."""
        if user_key in self.pending:
            del self.pending[user_key]  # re-insert at the end: dict order = age
        self.pending[user_key] = profile
        while len(self.pending) > self.max_pending:
            self.pending.pop(next(iter(self.pending)))
            self.metrics.redis_dropped.inc()
        self.metrics.redis_pending.set(len(self.pending))

    async def flush(self) -> int:
        """Delete erased users' profiles, then write every pending profile in one pipeline;
        returns how many profiles were written."""
        if self.client is None:
            return 0
        if self.forgotten:
            gone, self.forgotten = self.forgotten, set()
            try:
                async with self.lock, self.client.pipeline(transaction=False) as pipe:
                    pipe.delete(*(profile_key(self.namespace, k) for k in gone))
                    for seg in self.known_segments:
                        pipe.zrem(segment_key(self.namespace, seg), *gone)
                    await pipe.execute()
            except Exception as err:  # noqa: BLE001 - retried at the next flush
                self.forgotten |= gone
                self.metrics.redis_errors.inc()
                log.warning("redis delete of %d erased profiles failed (%s); retrying", len(gone), err)
        if self.aliases:
            links, self.aliases = self.aliases, {}
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for guest, customer in links.items():
                        if customer is None:
                            pipe.delete(alias_key(self.namespace, guest))
                        else:
                            pipe.set(alias_key(self.namespace, guest), customer, ex=self.ttl_s)
                            pipe.delete(profile_key(self.namespace, guest))
                    await pipe.execute()
            except Exception as err:  # noqa: BLE001 - retried at the next flush (newer links win)
                for k, v in links.items():
                    self.aliases.setdefault(k, v)
                self.metrics.redis_errors.inc()
                log.warning("redis write of %d identity links failed (%s); retrying", len(links), err)
        if not self.pending:
            return 0
        batch, self.pending = self.pending, {}
        try:
            async with self.lock, self.client.pipeline(transaction=False) as pipe:
                for user_key, prof in batch.items():
                    self.write(pipe, user_key, prof)
                if self.known_segments:
                    pipe.sadd(segments_index_key(self.namespace), *sorted(self.known_segments))
                await pipe.execute()
        except Exception as err:  # noqa: BLE001 - Redis outage must not stop the stream
            self.metrics.redis_errors.inc()
            if not self._failing:
                log.warning("redis write-behind failed (%s); %d profiles kept for retry", err, len(batch))
            self._failing = True
            for k, v in batch.items():  # keep newer marks made meanwhile
                self.pending.setdefault(k, v)
            while len(self.pending) > self.max_pending:
                self.pending.pop(next(iter(self.pending)))
                self.metrics.redis_dropped.inc()
            self.metrics.redis_pending.set(len(self.pending))
            return 0
        if self._failing:
            log.info("redis write-behind recovered")
            self._failing = False
        self.metrics.redis_writes.inc(len(batch))
        self.metrics.redis_pending.set(len(self.pending))
        return len(batch)


def engine_profile(engine: Any) -> Callable[[bytes], dict[str, Any] | None]:
    """``raw state -> profile`` as the worker's flush builds it (``UserState.profile`` with the
    engine's extra fields), for :class:`ProfileRefill`."""
    from ..state.user import UserState

    ecfg = engine.cfg.engagement

    def build(raw: bytes) -> dict[str, Any] | AliasLink | None:
        st = UserState.from_bytes(raw)
        if st.merged_into is not None:  # a guest merged into a customer: its link, no profile
            return AliasLink(st.merged_into)
        return st.profile(engagement=ecfg, extra=engine.profile_extra(st))
    return build


class AliasLink(NamedTuple):
    """What a refill writes for a guest merged into a customer (identity stitching): the link
    ``<namespace>:alias:<guest>`` -> ``customer``, not a profile."""

    customer: str


class ProfileRefill:
    """Rewrites every profile of the worker's partitions after Redis lost them.

    Detection: one sentinel per partition, ``<namespace>:epoch:<partition>``. :meth:`check` reads
    the sentinels of the partitions the worker owns (one ``MGET``); a partition whose sentinel is
    missing (Redis restarted empty, or the namespace is new) or still says ``refilling`` (its
    refill did not finish, e.g. the worker died) is refilled: the sentinel is set to
    ``refilling:<token>``, every user of the partition in the state table is written (profile and
    segment sets, :meth:`ProfileWriter.write`) in batches of ``batch``, at most ``rate_per_s``
    profiles per second so the stream keeps running, and the sentinel is then set to ``done`` only
    if it still exists (``SET ... XX``): if Redis lost its data again meanwhile, the next check
    refills again. A user with a profile pending in the writer is skipped (the pending, newer
    profile is written by the next flush; the writer's lock orders the two).

    The keys of the partitions are listed first (``O(users)`` key bytes in memory), then each batch
    reads the users' *current* states from the table, so a user deleted or changed meanwhile is
    not written stale. A state that cannot be decoded or profiled is skipped and counted in
    ``clickpulse_profile_errors_total``.

    Metrics: ``clickpulse_redis_refills_total`` (partitions refilled),
    ``clickpulse_redis_profiles_refilled_total``, ``clickpulse_redis_refill_in_progress``.
    """

    def __init__(self, writer: ProfileWriter, *, rate_per_s: float = 5000.0, batch: int = 500) -> None:
        from prometheus_client import Counter, Gauge

        if not rate_per_s > 0 or batch < 1:
            raise ValueError(f"rate_per_s must be > 0 and batch >= 1, got {rate_per_s!r}, {batch!r}")
        self.writer = writer
        self.rate_per_s = float(rate_per_s)
        self.batch = int(batch)
        self.busy = False
        r = writer.metrics.registry
        self.refills = Counter("clickpulse_redis_refills_total",
                               "Partitions whose profiles were all rewritten to Redis because its sentinel "
                               "<ns>:epoch:<partition> was missing (Redis lost its data, or first start)", registry=r)
        self.refilled = Counter("clickpulse_redis_profiles_refilled_total",
                                "Profiles rewritten to Redis by refills", registry=r)
        self.in_progress = Gauge("clickpulse_redis_refill_in_progress", "1 while a refill runs", registry=r)

    async def missing(self, partitions: list[int]) -> list[int]:
        """The partitions among ``partitions`` whose sentinel is missing or unfinished."""
        client, ns = self.writer.client, self.writer.namespace
        if client is None or not partitions:
            return []
        values = await client.mget([epoch_key(ns, p) for p in partitions])
        return [p for p, v in zip(partitions, values, strict=True) if v is None or v.startswith(b"refilling")]

    async def check(self, partitions: Callable[[], Iterable[int]], table: Any,
                    partition_of: Callable[[bytes], int], build: Callable[[bytes], dict[str, Any] | AliasLink | None],
                    skip_key: Callable[[bytes], bool] = lambda k: False) -> dict[int, int]:
        """Refill the owned partitions whose sentinel is missing; returns ``{partition: profiles
        written}`` (empty when nothing was missing, Redis is unreachable or a refill is running).

        ``partitions()``: the partitions this worker owns now (asked again before each batch: a
        partition revoked meanwhile is no longer written). ``table``: the state table (a mapping
        ``bytes -> bytes``); ``partition_of(key)``: a key's partition; ``build(raw)``: its
        profile; ``skip_key(key)``: keys that are not users (the clock logs). Redis errors are
        logged and counted (``clickpulse_redis_errors_total``); the next check retries.
        """
        if self.busy or self.writer.client is None:
            return {}
        self.busy = True
        try:
            todo = await self.missing(sorted(set(partitions())))
            if not todo:
                return {}
            return await self._refill(todo, partitions, table, partition_of, build, skip_key)
        except Exception as err:  # noqa: BLE001 - Redis unavailable: retried at the next check
            self.writer.metrics.redis_errors.inc()
            log.warning("redis profile refill check failed (%s); retrying later", error_text(err))
            return {}
        finally:
            self.busy = False
            self.in_progress.set(0)

    async def _refill(self, todo: list[int], partitions: Callable[[], Iterable[int]], table: Any,
                      partition_of: Callable[[bytes], int], build: Callable[[bytes], dict[str, Any] | AliasLink | None],
                      skip_key: Callable[[bytes], bool]) -> dict[int, int]:
        w, ns, client = self.writer, self.writer.namespace, self.writer.client
        self.in_progress.set(1)
        token = uuid.uuid4().hex
        async with client.pipeline(transaction=False) as pipe:
            for p in todo:
                pipe.set(epoch_key(ns, p), f"refilling:{token}")
            await pipe.execute()
        want = set(todo)
        keys: dict[int, list[bytes]] = {p: [] for p in todo}
        for k in list(table.keys()):
            if skip_key(k):
                continue
            p = partition_of(k)
            if p in want:
                keys[p].append(k)
        n_users = sum(len(v) for v in keys.values())
        if n_users:
            log.warning("redis has no profile sentinel for partitions %s (Redis lost its data, or a new namespace "
                        "had events before this first check): rewriting %d users' profiles at <= %.0f/s",
                        todo, n_users, self.rate_per_s)
        else:  # a new namespace (or no user yet): nothing was lost, one line at INFO
            log.info("redis profiles of partitions %s: no sentinel and no user yet (a new namespace); "
                     "sentinels written", todo)
        written = {p: 0 for p in todo}
        started = time.monotonic()
        total = 0
        for p in todo:
            ks = keys[p]
            for i in range(0, len(ks), self.batch):
                if p not in set(partitions()):
                    log.info("partition %d revoked during its refill; stopped", p)
                    break
                profiles: dict[str, dict[str, Any] | AliasLink] = {}
                for k in ks[i:i + self.batch]:
                    user = k.decode(errors="replace")
                    if user in w.pending:
                        continue  # a newer profile is waiting for the next flush
                    raw = table.get(k)
                    if raw is None:
                        continue  # deleted meanwhile
                    try:
                        prof = build(raw)
                    except Exception as err:  # noqa: BLE001 - one bad state never stops the refill
                        w.metrics.profile_errors.inc()
                        log.warning("profile of %r could not be built for the refill (%s)", user, err)
                        continue
                    if prof is not None:
                        profiles[user] = prof
                if profiles:
                    async with w.lock, client.pipeline(transaction=False) as pipe:
                        for user, prof in profiles.items():
                            if isinstance(prof, AliasLink):
                                pipe.set(alias_key(ns, user), prof.customer, ex=w.ttl_s)
                            else:
                                w.write(pipe, user, prof)
                        if w.known_segments:
                            pipe.sadd(segments_index_key(ns), *sorted(w.known_segments))
                        await pipe.execute()
                    written[p] += len(profiles)
                    total += len(profiles)
                    self.refilled.inc(len(profiles))
                # rate limit: never ahead of rate_per_s since the start (also yields to the stream)
                await asyncio.sleep(max(0.0, total / self.rate_per_s - (time.monotonic() - started)))
            else:
                ok = await client.set(epoch_key(ns, p), f"done:{token}", xx=True)
                if ok:
                    self.refills.inc()
                    if n_users:
                        log.warning("partition %d: %d profiles refilled to redis", p, written[p])
                else:
                    log.warning("partition %d: redis lost its data again during the refill; will refill again", p)
        return written
