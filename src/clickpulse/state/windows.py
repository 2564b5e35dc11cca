"""Bucketed event-time window counters ("how many X in the last 5 min / 1 h / 24 h / 7 d").

Counts are kept in sparse rings of fixed buckets: minutes (last 60), hours (last 24) and days
(last 7), per event type. A query "last N units as of time t" sums the buckets whose index is
in ``(b(t) - N, b(t)]`` with ``b(t) = floor(t / unit)``: the current, partly elapsed bucket plus
the N - 1 whole buckets before it (the usual tumbling-bucket approximation of a sliding window,
as in Redis/Prometheus-style rate counters). Spans: ``5m`` and ``1h`` use minute buckets,
``24h`` hour buckets, ``7d`` day buckets.

Buckets older than their ring's length before the newest bucket of the user are pruned, so a
record holds at most 60 + 24 + 7 buckets per event type; queries at or after the newest event
are exact under the rule above.

Examples
--------
>>> w = Windows()
>>> for ts in (0, 30_000, 61_000, 400_000):
...     w.add("product_view", ts)
>>> w.count("product_view", "5m", at_ms=400_000)   # minute 6 covers minutes 2..6
1
>>> w.count("product_view", "1h", at_ms=400_000)
4
"""

from __future__ import annotations

from typing import Any

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

#: span name -> (ring name, bucket width in ms, number of buckets summed)
SPANS: dict[str, tuple[str, int, int]] = {
    "5m": ("m", MINUTE_MS, 5),
    "1h": ("m", MINUTE_MS, 60),
    "24h": ("h", HOUR_MS, 24),
    "7d": ("d", DAY_MS, 7),
}
#: ring name -> (bucket width in ms, buckets kept)
RINGS: dict[str, tuple[int, int]] = {"m": (MINUTE_MS, 60), "h": (HOUR_MS, 24), "d": (DAY_MS, 7)}


class Windows:
    """Per-type bucketed counters for one user. Not thread-safe; one per user state."""

    __slots__ = ("rings",)

    def __init__(self, rings: dict[str, dict[str, dict[int, int]]] | None = None) -> None:
        self.rings: dict[str, dict[str, dict[int, int]]] = rings or {"m": {}, "h": {}, "d": {}}

    def add(self, etype: str, ts_ms: int, n: int = 1) -> None:
        """Count ``n`` events of ``etype`` at event time ``ts_ms`` (epoch ms)."""
        for ring, (width, keep) in RINGS.items():
            buckets = self.rings[ring].setdefault(etype, {})
            idx = ts_ms // width
            newest = max(buckets) if buckets else idx
            if idx <= newest - keep:
                continue  # older than anything this ring answers for
            buckets[idx] = buckets.get(idx, 0) + n
            if idx > newest:
                floor = idx - keep
                for old in [b for b in buckets if b <= floor]:
                    del buckets[old]

    def count(self, etype: str, span: str, at_ms: int) -> int:
        """Events of ``etype`` in the last ``span`` (``5m``, ``1h``, ``24h``, ``7d``) as of ``at_ms``.

        Raises
        ------
        KeyError
            Unknown span.
        """
        ring, width, n = SPANS[span]
        buckets = self.rings[ring].get(etype)
        if not buckets:
            return 0
        hi = at_ms // width
        lo = hi - n
        return sum(c for b, c in buckets.items() if lo < b <= hi)

    def counts(self, at_ms: int) -> dict[str, dict[str, int]]:
        """Every type's counts for every span as of ``at_ms``: ``{type: {span: n}}``."""
        types = set(self.rings["m"]) | set(self.rings["h"]) | set(self.rings["d"])
        return {t: {s: self.count(t, s, at_ms) for s in SPANS} for t in sorted(types)}

    # compact serialization: {"m": {"type": [idx, n, idx, n, ...]}, ...}
    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ring, per_type in self.rings.items():
            packed = {t: [v for kv in sorted(b.items()) for v in kv] for t, b in per_type.items() if b}
            if packed:
                out[ring] = packed
        return out

    @classmethod
    def from_obj(cls, obj: dict[str, Any] | None) -> Windows:
        rings: dict[str, dict[str, dict[int, int]]] = {"m": {}, "h": {}, "d": {}}
        for ring, per_type in (obj or {}).items():
            rings[ring] = {t: dict(zip(flat[::2], flat[1::2], strict=True)) for t, flat in per_type.items()}
        return cls(rings)
