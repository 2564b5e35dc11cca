"""Dead-letter records (``schemas/dlq.v1.json``) for messages that cannot become events."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidEvent


def dlq_record(err: InvalidEvent, *, key: bytes | None, value: bytes | None, topic: str, partition: int,
               offset: int, timestamp_ms: int | None, max_payload_bytes: int) -> dict[str, Any]:
    """Build the dead-letter record for one rejected message.

    The value is copied base64-encoded up to ``max_payload_bytes`` (``value_truncated`` says
    whether it was cut; ``value_sha256`` identifies the full value, which stays readable at
    ``source.topic/partition/offset`` for the raw topic's retention). The PII policy's
    :meth:`~clickpulse.events.pii.PiiPolicy.redact_dead_letter` may then leave the payload out
    (``value_b64`` null): ``value_truncated`` stays true for a non-empty value, meaning "the
    record does not hold the whole value" in both cases (``schemas/dlq.v1.json``).

    >>> r = dlq_record(InvalidEvent("not_json", "x"), key=None, value=b"{", topic="t", partition=0,
    ...                offset=7, timestamp_ms=None, max_payload_bytes=10)
    >>> r["reason"], r["source"]["offset"], r["value_b64"]
    ('not_json', 7, 'ew==')
    """
    v = value or b""
    return {
        "schema_version": 1,
        "reason": err.reason,
        "detail": err.detail[:1000],
        "source": {"topic": topic, "partition": partition, "offset": offset, "timestamp_ms": timestamp_ms},
        "key_b64": None if key is None else base64.b64encode(key[:max_payload_bytes]).decode(),
        "value_b64": None if value is None else base64.b64encode(v[:max_payload_bytes]).decode(),
        "value_size": len(v),
        "value_truncated": len(v) > max_payload_bytes,
        "value_sha256": hashlib.sha256(v).hexdigest() if value is not None else None,
        "failed_at": datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


class DeadLetterLog:
    """Logging of dead letters that a bad replay cannot flood: each at DEBUG, and a summary
    (counts by reason over the interval, and the latest example) at most every ``every_s``
    seconds at WARNING. The first dead letter after a quiet interval is summarized at once; the
    ones within the next ``every_s`` are summarized when it ends (a timer on the running event
    loop; without a loop, at the next dead letter after it). Every dead letter is also counted
    in ``clickpulse_events_invalid_total{reason}`` and kept on the dead-letter topic.

    >>> lines = []
    >>> class L:
    ...     def debug(self, *a): pass
    ...     def warning(self, msg, *a): lines.append(msg % a)
    >>> t = [0.0]
    >>> d = DeadLetterLog(L(), every_s=10, clock=lambda: t[0])
    >>> for i in range(3): d.record("not_json", f"raw[0]@{i}", "bad")
    >>> t[0] = 11.0; d.record("schema", "raw[0]@3", "no type")
    >>> lines[0]
    'dead-lettered 1 message in the last 10 s: not_json 1 (latest: not_json at raw[0]@0: bad)'
    >>> lines[1]
    'dead-lettered 3 messages in the last 10 s: not_json 2, schema 1 (latest: schema at raw[0]@3: no type)'
    """

    def __init__(self, logger: Any, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.every_s, self.clock = logger, float(every_s), clock
        self.counts: Counter[str] = Counter()
        self.latest = ""
        self.last = float("-inf")
        self.timer: Any = None

    def record(self, reason: str, where: str, detail: str) -> None:
        """One dead letter: ``reason`` (``dlq.v1.json``), ``where`` (``topic[partition]@offset``)."""
        self.log.debug("dead-letter %s at %s: %s", reason, where, detail)
        self.counts[reason] += 1
        self.latest = f"{reason} at {where}: {detail}"
        wait = self.last + self.every_s - self.clock()
        if wait <= 0:
            self.flush()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(wait, self.flush)
            except RuntimeError:  # no running loop: summarized at the next dead letter after the interval
                pass

    def flush(self) -> None:
        """Log the summary of the dead letters not yet summarized (nothing when there are none)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.counts:
            return
        n = sum(self.counts.values())
        by = ", ".join(f"{r} {c}" for r, c in sorted(self.counts.items()))
        self.log.warning("dead-lettered %d message%s in the last %g s: %s (latest: %s)", n, "" if n == 1 else "s",
                         self.every_s, by, self.latest)
        self.counts.clear()
        self.last = self.clock()


#: logger of the dead-letter summaries (the worker's)
log = logging.getLogger("clickpulse.dlq")
