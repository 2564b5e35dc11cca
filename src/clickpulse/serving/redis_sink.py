"""Write-behind of user profiles to Redis: coalesced, pipelined, never blocking the stream.

The stream calls :meth:`ProfileWriter.mark` (a dict assignment: the newest profile per user
wins); a background task calls :meth:`flush` every ``CLICKPULSE_REDIS_FLUSH_INTERVAL_S`` and
writes all pending profiles in one pipeline (``SET key json EX ttl``). When Redis is down the
profiles stay pending (bounded by ``CLICKPULSE_REDIS_MAX_PENDING``; the oldest are dropped and
counted beyond it) and are retried on the next flush.

Key: ``<namespace>:profile:<user_key>``; value: JSON per ``schemas/profile.v1.json``;
TTL: ``CLICKPULSE_USER_RETENTION_S``.

Identity links (docs/identity.md): ``<namespace>:alias:<guest_user_key>`` holds the customer's
user key (plain UTF-8) for a guest merged into a customer, with the same TTL (refreshed while the
guest's events keep being forwarded); a linked guest has no profile of its own (its key is
deleted with the link's first write). An erasure deletes the alias key.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from ..observability.metrics import Metrics

log = logging.getLogger(__name__)


def profile_key(namespace: str, user_key: str) -> str:
    return f"{namespace}:profile:{user_key}"


def alias_key(namespace: str, guest_user_key: str) -> str:
    """The Redis key of a guest's link to its customer: ``<namespace>:alias:<guest_user_key>``."""
    return f"{namespace}:alias:{guest_user_key}"


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
        self.aliases: dict[str, str | None] = {}  # guest key -> customer key (None: delete the link)
        self._failing = False

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
                await self.client.delete(*(profile_key(self.namespace, k) for k in gone))
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
            async with self.client.pipeline(transaction=False) as pipe:
                for user_key, prof in batch.items():
                    pipe.set(profile_key(self.namespace, user_key), orjson.dumps(prof), ex=self.ttl_s)
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
