"""Exposure and outcome attribution in event time: pure functions over a user's state.

A user is **exposed** to an experiment the first time one of the experiment trigger's decisions
is made for them (delivered arm or holdout alike: intention to treat; a decision held for bot
detection counts at its decision time). The exposure is kept in the user's state,
``UserState.rules["x"]``::

    {experiment: [arm, exposure_ms, window_ms, conversions, revenue]}

so it is recorded **once per user** (later decisions of the same trigger do not move it) and
survives restarts (the state's changelog). An event of one of the experiment's conversion
types (default ``purchase``) with event time ``t``, ``exposure_ms <= t < exposure_ms +
window_ms``, is a **conversion** of that arm; a purchase's revenue is its
``properties.revenue``, else ``price * quantity`` (as the lifetime revenue counts it). The
window is event time: a late purchase inside it counts, a purchase after it does not, whatever
the order of arrival. A purchase before the exposure never counts. (When a user's behavioral
state expires, :meth:`clickpulse.engine.Engine.expire_step`, the exposure goes with it; the
report keeps each user's first exposure only.)

The engine step (:mod:`clickpulse.engine.step`) turns exposures and conversions into
``<ns>.experiments`` records (:func:`exposure_record`, :func:`conversion_record`,
``schemas/experiment.v1.json``) and Prometheus counters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..events.contract import to_rfc3339
from ..state.user import UserState, action_id
from .assignment import Experiment

KEY = "x"  # UserState.rules key of the exposures


def expose(st: UserState, exp: Experiment, arm: str, at_ms: int) -> bool:
    """Record the user's exposure to ``exp`` in ``arm`` at event time ``at_ms`` (epoch ms) unless
    one is recorded already; True when this is the first."""
    x = st.rules.setdefault(KEY, {})
    if exp.name in x:
        return False
    x[exp.name] = [arm, int(at_ms), int(exp.window_s * 1000), 0, 0.0]
    return True


def arm_counts(st: UserState) -> list[tuple[str, str, int]]:
    """``(experiment, arm, converted 0|1)`` of each of the user's exposures (for the engine's
    per-arm counts that a ``thompson`` allocation draws from)."""
    return [(name, e[0], 1 if e[3] else 0) for name, e in st.rules.get(KEY, {}).items()]


def exposure(st: UserState, name: str) -> tuple[str, int, int] | None:
    """``(arm, exposure_ms, window_ms)`` of the user in experiment ``name``, or None."""
    e = st.rules.get(KEY, {}).get(name)
    return None if e is None else (e[0], e[1], e[2])


def revenue_of(event: Mapping[str, Any]) -> float:
    """A purchase's revenue: ``properties.revenue``, else ``price * quantity`` (0.0 when neither
    is a finite number)."""
    if event.get("type") != "purchase":
        return 0.0
    props = event.get("properties") or {}
    rev = props.get("revenue")
    try:
        if rev is None and props.get("price") is not None:
            rev = float(props["price"]) * int(props.get("quantity") or 1)
        value = float(rev or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def attribute(st: UserState, event: Mapping[str, Any],
              experiments: Mapping[str, Experiment]) -> list[tuple[str, str, int, float, bool]]:
    """Attribute ``event`` to the user's exposures (updates the state's per-experiment counts).

    Parameters
    ----------
    st
        The user's state (with or without the event applied: only ``rules["x"]`` is read).
    event
        A canonical event (``type``, ``timestamp_ms``, ``properties``).
    experiments
        Experiment name -> the experiment (its conversion types; one no longer in the rules
        counts ``purchase``).

    Returns
    -------
    list of (experiment, arm, exposure_ms, revenue, first)
        One per experiment the event converts (inside its window); ``first``: the user's first
        conversion of that exposure.
    """
    x = st.rules.get(KEY)
    if not x:
        return []
    etype = event.get("type")
    t = int(event["timestamp_ms"])
    out = []
    for name, e in x.items():
        exp = experiments.get(name)
        if etype not in (("purchase",) if exp is None else exp.conversion):
            continue
        arm, at, window = e[0], e[1], e[2]
        if not at <= t < at + window:
            continue
        rev = revenue_of(event)
        e[3] += 1
        e[4] = float(e[4]) + rev
        out.append((name, arm, at, rev, e[3] == 1))
    return out


def exposure_record(user_key: str, experiment: str, arm: str, at_ms: int, source_id: str,
                    rules_version: str | None, share: float | None = None) -> dict[str, Any]:
    """The ``<ns>.experiments`` record of a first exposure (``source_id``: the action's id;
    ``share``: the arm's configured share of users, for the sample-ratio check)."""
    return {"schema_version": 1, "record_id": action_id(user_key, f"experiment:{experiment}", "exposure"),
            "kind": "exposure", "experiment": experiment, "variant": arm, "user_key": user_key,
            "event_time": to_rfc3339(at_ms), "event_time_ms": at_ms, "exposure_time_ms": at_ms, "revenue": None,
            "source_id": source_id, "rules_version": rules_version, "share": share}


def conversion_record(user_key: str, experiment: str, arm: str, exposure_ms: int, event: Mapping[str, Any],
                      revenue: float, rules_version: str | None) -> dict[str, Any]:
    """The ``<ns>.experiments`` record of an attributed conversion (``source_id``: the event's id)."""
    t = int(event["timestamp_ms"])
    eid = str(event.get("event_id"))
    return {"schema_version": 1, "record_id": action_id(user_key, f"experiment:{experiment}", f"conversion|{eid}"),
            "kind": "conversion", "experiment": experiment, "variant": arm, "user_key": user_key,
            "event_time": to_rfc3339(t), "event_time_ms": t, "exposure_time_ms": exposure_ms, "revenue": revenue,
            "source_id": eid, "rules_version": rules_version}
