"""Engagement score: weighted behavioural signals with exponential recency decay, in event time.

Each event yields zero or more *signals*, each worth ``weight × amount`` points at the event's
time. A point earned at ``t_i`` is worth half as much ``half_life_s`` later:

    value(t) = Σ_i w_i · a_i · 2^(−(t − t_i) / half_life)

This is an exponentially time-decayed sum. Cormode, Shkapenyuk, Srivastava and Xu, "Forward
Decay: A Practical Time Decay Model for Streaming Systems" (ICDE 2009) show that with an
exponential decay the sum can be kept as one number per key, and that events may arrive in any
order. clickpulse uses that property. The stored state is the sum *as of the latest event time
seen* (``t``). A newer event first decays the stored sum to its own time, then adds its points.
An older event adds its points already decayed to ``t``. So any arrival order gives the same
value (up to float rounding).

Signals (event type → signal; the default weights are clickpulse's own choice, not fitted to
data. Active signals are worth more than passive ones, in order of funnel depth):

==================  ==============================================  =======  =======
signal              from                                            kind     default
==================  ==============================================  =======  =======
``purchase``        a ``purchase`` event                            active   10
``checkout_start``  a ``checkout_start`` event                      active   6
``add_to_cart``     an ``add_to_cart`` event                        active   5
``form_submit``     a ``form_submit`` event                         active   4
``search``          a ``search`` event                              active   3
``click``           a ``click`` or ``product_click`` event          active   2
``product_view``    a ``product_view`` event                        passive  1
``page_view``       a ``page_view`` event                           passive  0.5
``dwell``           per minute of any event's ``dwell_ms`` property passive  0.5
                    (capped at ``max_dwell_s`` per event)
``scroll_25`` …     a ``scroll_depth`` event: the highest milestone passive  0.25
``scroll_100``      of 25/50/75/100 at or below its ``scroll_pct``           each
``hover``           a ``hover`` event                               passive  0.1
==================  ==============================================  =======  =======

Each ``scroll_depth`` event counts as **one** milestone: the highest of 25/50/75/100 % that its
``scroll_pct`` reaches (below 25 % gives nothing). Scroll trackers such as Google Tag Manager's
scroll-depth trigger send one event per threshold crossed per page. With such a tracker, a page
read to the bottom earns each milestone once. The compact state does not de-duplicate per page:
a tracker that sends the same threshold twice gets it credited twice. The session-level view
(:func:`session_points`, used for the engagement tiers) counts each milestone up to the
session's ``max_scroll_pct`` exactly once per session.

Other event types (``remove_from_cart``, ``identify``, ``consent``, …) give no signal and leave
the state unchanged.

State (stored per user, a few hundred bytes as JSON)::

    {"t": <latest event time, epoch ms>, "v": <total as of t>, "c": {<signal>: <points as of t>}}

``{}`` is the state of a user with no signal yet (value 0.0).

Examples
--------
>>> from clickpulse.testing import event, ms
>>> cfg = EngagementConfig(half_life_s=3600)
>>> s = update({}, event("add_to_cart", at="2019-10-01T10:00:00Z"), cfg)
>>> s = update(s, event("page_view", at="2019-10-01T11:00:00Z"), cfg)
>>> value(s, ms("2019-10-01T11:00:00Z"), cfg)  # 5 · 2^-1 + 0.5
3.0
>>> top_contributors(s, ms("2019-10-01T12:00:00Z"), cfg)
[['add_to_cart', 1.25], ['page_view', 0.25]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

#: Event type -> signal, for the signals one event of that type always gives (1 unit).
EVENT_SIGNALS: dict[str, str] = {
    "purchase": "purchase",
    "checkout_start": "checkout_start",
    "add_to_cart": "add_to_cart",
    "form_submit": "form_submit",
    "search": "search",
    "click": "click",
    "product_click": "click",
    "product_view": "product_view",
    "page_view": "page_view",
    "hover": "hover",
}

_NO_PROPS: dict[str, Any] = {}

#: Scroll-depth milestones, in percent.
SCROLL_MILESTONES: tuple[int, ...] = (25, 50, 75, 100)

ACTIVE_SIGNALS: tuple[str, ...] = ("purchase", "checkout_start", "add_to_cart", "form_submit", "search", "click")
PASSIVE_SIGNALS: tuple[str, ...] = ("product_view", "page_view", "dwell",
                                    *(f"scroll_{m}" for m in SCROLL_MILESTONES), "hover")

#: Default points per signal (``dwell``: per minute). clickpulse's chosen defaults (see the module
#: docstring): every active signal is worth more than every passive one.
DEFAULT_WEIGHTS: dict[str, float] = {
    "purchase": 10.0, "checkout_start": 6.0, "add_to_cart": 5.0, "form_submit": 4.0, "search": 3.0, "click": 2.0,
    "product_view": 1.0, "page_view": 0.5, "dwell": 0.5,
    **{f"scroll_{m}": 0.25 for m in SCROLL_MILESTONES}, "hover": 0.1,
}

WEEK_S = 7 * 86_400.0


@dataclass(frozen=True)
class EngagementConfig:
    """Weights and decay of the engagement score.

    Parameters
    ----------
    weights
        Points per signal (``dwell``: per minute). The values given override
        :data:`DEFAULT_WEIGHTS` one by one. A new signal name can be added this way, but it only
        counts once some event produces it. Every weight must be finite and >= 0.
    half_life_s
        Seconds after which an event's points are worth half as much. Must be > 0. Default
        7 days, clickpulse's choice: a visit one week ago counts half, which matches the
        longest count window (``7d``).
    max_dwell_s
        Upper bound on the dwell of one event, in seconds. A page left open in a background tab
        then earns no more than ``max_dwell_s / 60 × weights["dwell"]`` points. Default 600
        (10 min), clickpulse's choice.

    Raises
    ------
    ConfigError
        A negative or non-finite weight, or a half-life or dwell cap that is not > 0.
    """

    weights: dict[str, float] = field(default_factory=dict)
    half_life_s: float = WEEK_S
    max_dwell_s: float = 600.0

    def __post_init__(self) -> None:
        merged = {**DEFAULT_WEIGHTS, **{str(k): float(v) for k, v in dict(self.weights).items()}}
        for name, w in merged.items():
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"engagement weight {name!r} must be a finite number >= 0, got {w!r}")
        if not (math.isfinite(self.half_life_s) and self.half_life_s > 0):
            raise ConfigError(f"engagement half_life_s must be > 0, got {self.half_life_s!r}")
        if not (math.isfinite(self.max_dwell_s) and self.max_dwell_s > 0):
            raise ConfigError(f"engagement max_dwell_s must be > 0, got {self.max_dwell_s!r}")
        object.__setattr__(self, "weights", merged)

    @property
    def half_life_ms(self) -> float:
        return self.half_life_s * 1000.0

    @classmethod
    def from_settings(cls, s: Any) -> EngagementConfig:
        """From :class:`clickpulse.settings.Settings`. Reads ``engagement_half_life_s`` and
        ``engagement_weights`` (a mapping, or the env form ``"purchase=12,hover=0"``) when the
        settings have them; otherwise the defaults apply.

        Raises
        ------
        ValueError
            A weight that is not ``name=number``.
        """
        raw = getattr(s, "engagement_weights", None) or {}
        if isinstance(raw, str):
            pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
            bad = [p for p in pairs if len(p) != 2]
            if bad:
                raise ValueError(f"engagement weights must be name=number pairs, got {raw!r}")
            raw = {k.strip(): float(v) for k, v in pairs}
        return cls(weights=dict(raw),
                   half_life_s=float(getattr(s, "engagement_half_life_s", WEEK_S)))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def signals(event: dict[str, Any], cfg: EngagementConfig) -> list[tuple[str, float]]:
    """The signals of one canonical event, as ``[(signal, points), ...]``. Points are
    ``weight × amount`` and are not decayed.

    >>> from clickpulse.testing import event
    >>> signals(event("page_view", dwell_ms=120_000), EngagementConfig())
    [('page_view', 0.5), ('dwell', 1.0)]
    >>> signals(event("scroll_depth", scroll_pct=80), EngagementConfig())
    [('scroll_75', 0.25)]
    """
    out: list[tuple[str, float]] = []
    etype = event.get("type")
    props = event.get("properties")
    if not isinstance(props, dict):
        props = _NO_PROPS
    weights = cfg.weights
    sig = EVENT_SIGNALS.get(etype) if isinstance(etype, str) else None
    if sig is not None:
        p = weights.get(sig, 0.0)
        if p > 0:
            out.append((sig, p))
    if etype == "scroll_depth":
        pct = _number(props.get("scroll_pct"))
        reached = [m for m in SCROLL_MILESTONES if pct is not None and pct >= m]
        if reached:
            sig = f"scroll_{reached[-1]}"
            p = weights.get(sig, 0.0)
            if p > 0:
                out.append((sig, p))
    dwell = props.get("dwell_ms")
    if dwell is not None:
        dwell_ms = _number(dwell)
        if dwell_ms is not None and dwell_ms > 0:
            minutes = min(dwell_ms, cfg.max_dwell_s * 1000) / 60_000
            p = weights.get("dwell", 0.0) * minutes
            if p > 0:
                out.append(("dwell", p))
    return out


def _decay(dt_ms: float, cfg: EngagementConfig) -> float:
    """2^(−dt / half_life): the factor by which points lose worth over ``dt_ms`` (>= 0)."""
    return 2.0 ** (-dt_ms / cfg.half_life_ms)


def update(score_state: dict[str, Any], event: dict[str, Any], cfg: EngagementConfig) -> dict[str, Any]:
    """The engagement state after one canonical event (pure: ``score_state`` is not mutated).

    Parameters
    ----------
    score_state
        The user's state (see the module docstring), ``{}`` for a new user.
    event
        A canonical event. ``timestamp_ms`` (epoch ms) is its event time.
    cfg
        Weights and half-life.

    Returns
    -------
    dict
        The new state. When the event gives no signal, this is ``score_state`` itself, unchanged.
        An event newer than the state's time ``t`` moves ``t`` to the event's time. An older
        (out-of-order) event adds its points decayed to ``t`` and leaves ``t`` unchanged.
    """
    etype = event.get("type")
    props = event.get("properties")
    if etype != "scroll_depth" and (type(props) is not dict or "dwell_ms" not in props):
        # the common case, one signal from the event type (what signals() gives then)
        sig = EVENT_SIGNALS.get(etype) if isinstance(etype, str) else None
        p = 0.0 if sig is None else cfg.weights.get(sig, 0.0)
        if not p > 0:
            return score_state
        sigs: Any = ((sig, p),)
    else:
        sigs = signals(event, cfg)
        if not sigs:
            return score_state
    te = int(event["timestamp_ms"])
    if not score_state:
        t, total, contrib, g = te, 0.0, {}, 1.0  # g = 2^(-0 / half_life)
    else:
        t = int(score_state["t"])
        total = float(score_state["v"])
        contrib = {}
        if te > t:  # newer: bring what is stored forward to the event's time
            f = _decay(te - t, cfg)
            total *= f
            for s, v in score_state["c"].items():
                contrib[s] = v * f
            t, g = te, 1.0
        else:  # same time or older: its points, already decayed to t
            contrib.update(score_state["c"])
            g = _decay(t - te, cfg)
    for s, p in sigs:
        pg = p * g
        total += pg
        contrib[s] = contrib.get(s, 0.0) + pg
    return {"t": t, "v": total, "c": contrib}


def value(score_state: dict[str, Any], at_ms: int, cfg: EngagementConfig) -> float:
    """The engagement score as of event time ``at_ms`` (epoch ms): points, >= 0, unbounded, higher
    = more engaged. A score of 0.0 means no signal yet. For an ``at_ms`` earlier than the
    state's time, the score as of the state's time is returned (points cannot be taken back)."""
    if not score_state:
        return 0.0
    return float(score_state["v"]) * _decay(max(0, at_ms - int(score_state["t"])), cfg)


def top_contributors(score_state: dict[str, Any], at_ms: int, cfg: EngagementConfig,
                     k: int = 3) -> list[list[Any]]:
    """The ``k`` signals contributing most to :func:`value` at ``at_ms``, as
    ``[[signal, points], ...]``. Sorted by points (descending), then by name; rounded to 4
    decimals; signals worth 0 at that precision are left out."""
    if not score_state:
        return []
    f = _decay(max(0, at_ms - int(score_state["t"])), cfg)
    items = [[s, round(float(v) * f, 4)] for s, v in score_state["c"].items()]
    items.sort(key=lambda c: (-c[1], c[0]))
    return [c for c in items[:k] if c[1] > 0]


def session_points(counts: dict[str, int], dwell_ms: int, max_scroll_pct: float, cfg: EngagementConfig) -> float:
    """Undecayed engagement points of one session, from its counts by event type, its summed
    dwell and its deepest scroll (the fields of :class:`clickpulse.state.user.Session`).

    Each scroll milestone at or below ``max_scroll_pct`` counts once for the session. Dwell is
    capped at ``max_dwell_s`` for the whole session, because per-event dwell is not kept in the
    session.

    >>> session_points({"page_view": 2, "add_to_cart": 1}, 90_000, 60.0, EngagementConfig())
    7.25
    """
    pts = 0.0
    for etype, n in counts.items():
        sig = EVENT_SIGNALS.get(etype)
        if sig is not None:
            pts += cfg.weights.get(sig, 0.0) * n
    pts += cfg.weights.get("dwell", 0.0) * min(max(0, dwell_ms), cfg.max_dwell_s * 1000) / 60_000
    pts += sum(cfg.weights.get(f"scroll_{m}", 0.0) for m in SCROLL_MILESTONES if max_scroll_pct >= m)
    return pts
