"""Quarantined users, from the command line: list, show and repair (``clickpulse quarantine``).

A user whose stored state the engine could not process is moved aside to ``<ns>.quarantine``
(keyed by the user key; ``schemas/quarantine.v1.json``) and goes on from a fresh state (see
:meth:`clickpulse.engine.Engine._retry_fresh`). :func:`request_repair` asks the worker that owns
the user to put it back: it publishes a ``repair`` request (``schemas/privacy_request.v1.json``)
on the internal ``<ns>.privacy`` topic, keyed by the user key (so it is applied in order with the
user's events), carrying the quarantined state; the worker decides and writes
(:meth:`clickpulse.engine.Engine.repair_step`), tombstones the quarantine record when it worked,
and publishes an audit record on ``<ns>.privacy.audit``. Nothing here writes the state table.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from .settings import Settings

#: the parts of a user's state ``clickpulse quarantine repair --drop-field`` can reset to empty
#: (attributes of :class:`clickpulse.state.user.UserState`)
REPAIRABLE_FIELDS = frozenset({"windows", "session", "prev_session", "cart", "traits", "recent_ids", "ml",
                               "consent", "categories", "rules", "life"})


def quarantined(settings: Settings, timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """The latest quarantine record of every quarantined user (tombstoned ones left out)."""
    from .runtime import read_topic
    latest: dict[str, dict[str, Any]] = {}
    for key, value, _meta in asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_quarantine,
                                                    timeout_s=timeout_s)):
        if key is None:
            continue
        if value is None:
            latest.pop(key.decode(errors="replace"), None)
        else:
            latest[key.decode(errors="replace")] = orjson.loads(value)
    return latest


def request_repair(settings: Settings, user_key: str, record: dict[str, Any], *, mode: str = "retry",
                   drop_fields: list[str] | None = None, wait: bool = True,
                   timeout_s: float = 120.0) -> dict[str, Any]:
    """Ask the worker owning ``user_key`` to repair it from its quarantine ``record``; returns the
    audit record (``wait``) or the request.

    Raises
    ------
    ServiceError
        ``wait`` and no audit record for the request within ``timeout_s`` (no worker running?).
    """
    from .privacy import send_request
    req = {"schema_version": 1, "request": "repair", "request_id": str(uuid.uuid4()), "user_key": user_key,
           "requested_at": datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
           "mode": mode, "drop_fields": list(drop_fields or []), "quarantined_at": record.get("quarantined_at"),
           "state_b64": record.get("state_b64")}
    return send_request(settings, req, wait=wait, timeout_s=timeout_s)
