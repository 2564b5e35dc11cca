"""Dead-letter records (``schemas/dlq.v1.json``) for messages that cannot become events."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidEvent


def dlq_record(err: InvalidEvent, *, key: bytes | None, value: bytes | None, topic: str, partition: int,
               offset: int, timestamp_ms: int | None, max_payload_bytes: int) -> dict[str, Any]:
    """Build the dead-letter record for one rejected message.

    The value is copied base64-encoded up to ``max_payload_bytes`` (``value_truncated`` says
    whether it was cut; ``value_sha256`` identifies the full value, which stays readable at
    ``source.topic/partition/offset`` for the raw topic's retention).

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
