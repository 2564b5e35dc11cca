"""End-to-end latency of one engine step: produce -> processed and produce -> action.

The Kafka timestamp of an input record is its producer's publish time (``CreateTime``; the
ingest agent copies the raw record's timestamp onto the valid record it writes, so in two-hop
mode too it is the time the event entered Kafka). Latencies are wall-clock differences between
hosts, so they include the clock offset between the producer and the worker; a negative
difference (the producer's clock ahead) is recorded as 0.

Examples
--------
>>> from types import SimpleNamespace as M
>>> from clickpulse.observability.metrics import Metrics
>>> m = Metrics()
>>> items = [(0, {"user_key": "u1"}), (0, {"user_key": "u2"})]
>>> msgs = [M(timestamp=100.0), M(timestamp=101.5)]
>>> observe_step(m, [{"user_key": "u2", "type": "cart_abandoned"}], items, msgs, wall_ms=103_000)
(3.0, 1)
>>> m.registry.get_sample_value("clickpulse_action_latency_seconds_sum", {"type": "cart_abandoned"})
1.5

A producer clock ahead of the worker's counts as 0; an action of a user with no record in the
step (a timer fired by another user's event time) and records without a timestamp are skipped:

>>> observe_step(m, [{"user_key": "u9", "type": "incentive"}], items[:1], [M(timestamp=200.0)], wall_ms=103_000)
(0.0, 0)
>>> observe_step(m, [], items[:1], [M(timestamp=None)], wall_ms=103_000)
(None, 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .metrics import Metrics


def observe_step(metrics: Metrics, actions: Sequence[dict[str, Any]], items: Sequence[tuple[int, dict[str, Any]]],
                 msgs: Sequence[Any], wall_ms: int) -> tuple[float | None, int]:
    """Record a step's latencies.

    Parameters
    ----------
    actions
        The step's actions (``user_key``, ``type``); ``created_at`` is the step's ``wall_ms``.
    items, msgs
        The step's input, parallel: ``(partition, canonical event)`` and the Kafka message it came
        from (``timestamp``: epoch seconds, float, or ``None``/0 when the broker gave none).
    wall_ms
        The step's wall clock (epoch ms), the actions' ``created_at``.

    Returns
    -------
    (event latency, actions observed)
        The produce -> processed latency recorded for the step's oldest input (seconds,
        ``None`` when no input had a timestamp) and how many actions had a triggering record of
        their user in the step (actions of other users, fired by timers, are not observed).
    """
    wall_s = wall_ms / 1000
    oldest = min([m.timestamp for m in msgs if m.timestamp], default=None)
    event_latency = None
    if oldest is not None:
        event_latency = max(0.0, wall_s - oldest)
        metrics.event_latency.observe(event_latency)
    observed = 0
    if actions:
        wanted = {a.get("user_key") for a in actions}
        latest: dict[str, float] = {}  # acting user -> newest input timestamp of the user in the step
        for (_p, ev), m in zip(items, msgs):
            key = ev.get("user_key")
            if key in wanted:
                ts = m.timestamp
                if ts and ts > latest.get(key, 0.0):
                    latest[key] = ts
        for a in actions:
            ts = latest.get(a.get("user_key"))  # type: ignore[arg-type]
            if ts is not None:
                metrics.action_latency.labels(a["type"]).observe(max(0.0, wall_s - ts))
                observed += 1
    return event_latency, observed
