"""Engagement tiers: online k-means (River) over session features, clusters named by engagement.

:class:`EngagementTiers` learns from one feature dict per session (:func:`session_features`).
It keeps ``river.cluster.KMeans(n_clusters=3)`` and names the clusters by their centres'
``engagement`` coordinate: the highest is ``"high"``, the middle one ``"medium"`` and the lowest
``"low"``. The names are recomputed from the current centres on every call, so a cluster whose
centre moves past another one changes its name.

Warm start. River's KMeans starts each centre at random normal coordinates (``mu=0``,
``sigma=1``) and moves only the closest centre towards each example. On sessions that sit away
from the origin, one centre then takes every example and the other two never move. (On three
well-separated synthetic session groups, seeds 0–4 all left a cluster empty.) So the first
``warmup`` sessions are buffered, sorted by engagement and cut into thirds, and the mean of
each third becomes a starting centre. Online k-means then goes on from there. This is the usual
fix of seeding k-means from the data instead of at random. Until the warm start, :meth:`tier`
answers with the tertile of the session's engagement among the sessions buffered so far
(``"medium"`` before any session).

After the warm start, every feature coordinate of every centre has been set, and :meth:`tier`
and :meth:`learn` look only at the configured features (missing ones count 0.0, unknown ones are
ignored). River's random generator is then never drawn, so the assignments depend only on the
examples and their order. ``seed`` is still passed to River, so that any coordinate River
itself creates stays reproducible.

Snapshots are pickles (``to_bytes``/``from_bytes``), like :class:`clickpulse.models.online.OnlineModel`:
load them only from clickpulse's own snapshot topic.

Examples
--------
>>> m = EngagementTiers(seed=1, warmup=3)
>>> for e in (0.5, 2.0, 4.0):
...     m.learn({"events": e, "duration": e, "add_to_cart": 0.0, "engagement": e})
>>> m.tier({"events": 4.0, "duration": 4.0, "engagement": 4.2}), m.tier({"engagement": 0.1})
('high', 'low')
"""

from __future__ import annotations

import pickle
from math import log1p
from typing import Any

from river import cluster

from ..errors import ConfigError
from ..features.engagement import EngagementConfig, session_points

TIERS: tuple[str, ...] = ("high", "medium", "low")

#: The features of :func:`session_features`, all log1p-scaled, so their ranges are comparable
#: (k-means distances weigh every coordinate alike).
TIER_FEATURES: tuple[str, ...] = ("events", "duration", "add_to_cart", "engagement")


def session_features(session: Any, cfg: EngagementConfig | None = None) -> dict[str, float]:
    """The tier features of one session (a :class:`clickpulse.state.user.Session`).

    ==================  ===========================================================
    feature             meaning (unit)
    ==================  ===========================================================
    ``events``          log1p(events in the session)
    ``duration``        log1p(session duration, **minutes**: first to last event)
    ``add_to_cart``     log1p(add_to_cart events in the session)
    ``engagement``      log1p(undecayed engagement points of the session,
                        :func:`clickpulse.features.engagement.session_points`)
    ==================  ===========================================================

    >>> from clickpulse.state.user import Session
    >>> s = Session(0, 600_000, events=3, counts={"page_view": 2, "add_to_cart": 1})
    >>> {k: round(v, 3) for k, v in session_features(s).items()}
    {'events': 1.386, 'duration': 2.398, 'add_to_cart': 0.693, 'engagement': 1.946}
    """
    cfg = cfg or EngagementConfig()
    pts = session_points(session.counts, session.dwell_ms, session.max_scroll_pct, cfg)
    return {"events": log1p(session.events), "duration": log1p(max(0, session.duration_ms) / 60_000),
            "add_to_cart": log1p(session.counts.get("add_to_cart", 0)), "engagement": log1p(pts)}


class EngagementTiers:
    """Online k-means with three clusters, named high / medium / low by engagement.

    Parameters
    ----------
    seed
        Passed to ``river.cluster.KMeans``. The same seed and the same examples in the same
        order give the same tiers.
    halflife
        River's step size: the fraction of the distance by which the closest centre moves
        towards each example, in (0, 1]. Default 0.05, clickpulse's choice: a centre follows
        roughly its last 20 sessions, so it is neither frozen nor jumpy. River's default of 0.5
        would let a centre swing halfway to every example.
    warmup
        Sessions buffered before the warm start (see the module docstring), >= 3. Default 30
        (ten per tier).
    features
        The feature names used (others are ignored; missing ones count 0.0).
    engagement_key
        The feature that orders the clusters; it must be in ``features``.

    Raises
    ------
    ConfigError
        ``halflife`` not in (0, 1], ``warmup`` < 3, or ``engagement_key`` not in ``features``.
    """

    def __init__(self, seed: int = 42, halflife: float = 0.05, warmup: int = 30,
                 features: tuple[str, ...] = TIER_FEATURES, engagement_key: str = "engagement") -> None:
        if not 0 < halflife <= 1:
            raise ConfigError(f"tiers halflife must be in (0, 1], got {halflife!r}")
        if warmup < len(TIERS):
            raise ConfigError(f"tiers warmup must be >= {len(TIERS)}, got {warmup!r}")
        if engagement_key not in features:
            raise ConfigError(f"tiers engagement_key {engagement_key!r} is not one of the features {features}")
        self.seed = seed
        self.warmup = warmup
        self.features = tuple(features)
        self.engagement_key = engagement_key
        self.model = cluster.KMeans(n_clusters=len(TIERS), halflife=halflife, seed=seed)
        self.buffer: list[dict[str, float]] = []
        self.initialised = False
        self.examples = 0

    @property
    def version(self) -> str:
        """``tiers-kmeans-<examples learned>``: changes with every example."""
        return f"tiers-kmeans-{self.examples}"

    def _project(self, x: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.features:
            v = x.get(k, 0.0)
            out[k] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v == v else 0.0
        return out

    def _warm_start(self) -> None:
        rows = sorted(self.buffer, key=lambda r: r[self.engagement_key])  # stable: ties keep arrival order
        n = len(rows)
        for c in range(len(TIERS)):
            part = rows[c * n // len(TIERS):(c + 1) * n // len(TIERS)]
            center = self.model.centers[c]
            for k in self.features:
                center[k] = sum(r[k] for r in part) / len(part)
        self.buffer = []
        self.initialised = True

    def learn(self, x: dict[str, Any]) -> None:
        """Learn one session's features (moves the closest centre; buffers before the warm start)."""
        z = self._project(x)
        self.examples += 1
        if not self.initialised:
            self.buffer.append(z)
            if len(self.buffer) >= self.warmup:
                self._warm_start()
            return
        self.model.learn_one(z)

    def names(self) -> dict[int, str]:
        """Cluster id -> tier name, from the current centres (highest engagement = ``"high"``;
        ties go to the lower cluster id)."""
        order = sorted(self.model.centers, key=lambda c: (-self.model.centers[c][self.engagement_key], c))
        return dict(zip(order, TIERS, strict=True))

    def centers(self) -> dict[str, dict[str, float]]:
        """Tier name -> centre coordinates (``{}`` before the warm start)."""
        if not self.initialised:
            return {}
        return {name: {k: self.model.centers[c][k] for k in self.features} for c, name in self.names().items()}

    def tier(self, x: dict[str, Any]) -> str:
        """``"high"``, ``"medium"`` or ``"low"`` for one session's features. Never raises for odd
        features."""
        z = self._project(x)
        if not self.initialised:
            if not self.buffer:
                return "medium"
            e = z[self.engagement_key]
            seen = [r[self.engagement_key] for r in self.buffer]
            q = (sum(v < e for v in seen) + 0.5 * sum(v == e for v in seen)) / len(seen)
            return "high" if q >= 2 / 3 else "low" if q < 1 / 3 else "medium"
        return self.names()[self.model.predict_one(z)]

    def to_bytes(self) -> bytes:
        """Pickle of the whole model (trusted storage only)."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(data: bytes) -> EngagementTiers:
        """Inverse of :meth:`to_bytes`. Only for snapshots from clickpulse's own topic."""
        obj = pickle.loads(data)  # noqa: S301 - documented: trusted snapshot topic only
        if not isinstance(obj, EngagementTiers):
            raise TypeError(f"snapshot holds {type(obj).__name__}, not EngagementTiers")
        return obj
