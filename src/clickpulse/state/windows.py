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

Layout in memory (it is also the serialized form, see :mod:`clickpulse.state.user`):
``types[code] = [minutes, hours, days]``, three dicts ``{bucket: count}`` in ascending bucket
order. ``code`` is the type's index in :data:`VOCABULARY` (the type itself when not listed).
Bucket indexes are *relative* to an origin minute ``base`` (epoch ms // 60 000): minute ``k`` is
absolute minute ``base + k``, hour ``k`` is ``base // 60 + k``, day ``k`` is ``base // 1440 +
k``; the origin moves forward when indexes grow past 2**15 (about 23 days). Small indexes and
codes keep the serialized state small. :attr:`Windows.rings` gives the counts by type name with
absolute indexes.

Examples
--------
>>> w = Windows()
>>> for ts in (0, 30_000, 61_000, 400_000):
...     w.add("product_view", ts)
>>> w.count("product_view", "5m", at_ms=400_000)   # minute 6 covers minutes 2..6
1
>>> w.count("product_view", "1h", at_ms=400_000)
4
>>> w.rings["m"]["product_view"]
{0: 2, 1: 1, 6: 1}
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

#: Strings stored as small int codes (their index) in the binary state format: event types here,
#: and in :mod:`clickpulse.state.user` page types, signals, score and rule names too. Part of
#: format version 2: extending it needs a new format version.
VOCABULARY: tuple[str, ...] = (
    # event types: canonical, then other common ones
    "page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start", "purchase",
    "search", "scroll_depth", "dwell", "identify", "consent", "click", "product_click", "form_submit",
    "hover", "cart_view", "checkout_step", "payment_info", "refund", "order_cancelled",
    # page types
    "page", "product", "cart", "checkout", "confirmation", "home", "category",
    # engagement signals other than event types
    "scroll_25", "scroll_50", "scroll_75", "scroll_100",
    # model scores
    "churn", "churn_version", "intent", "intent_version",
    # the default rules' triggers and segments
    "cart_abandonment", "browse_abandonment", "repeat_cart_incentive", "checkout_help", "category_interest",
    "hesitant_buyers", "high_intent_shoppers", "highly_engaged", "lapsed_customers",
    # trigger and bot state keys
    "e", "a", "b", "due", "lf", "ls", "fe", "n", "m", "c", "flag", "at",
)
CODE: dict[str, int] = {s: i for i, s in enumerate(VOCABULARY)}
NAME: dict[int, str] = dict(enumerate(VOCABULARY))  # NAME.get(x, x): the string of a code, a string as is

_RING_NAMES = ("m", "h", "d")
_MINUTES_PER = (1, 60, 1440)  # minutes per bucket of each ring
#: span -> (ring position, bucket width in ms, buckets summed)
_SPAN_POS = {s: (_RING_NAMES.index(r), w, n) for s, (r, w, n) in SPANS.items()}
#: relative minute index past which :meth:`Windows.add` moves the origin (keeps indexes < 2**15)
_REBASE_AFTER = 0x7FFF
_new = object.__new__


def _bump(b: dict[int, int], i: int, n: int, keep: int) -> None:
    """Add ``n`` at bucket ``i`` of one ring kept in ascending order; prune what falls out."""
    c = b.get(i)
    if c is not None:  # an existing bucket: newest - keep < i <= newest, nothing to prune
        b[i] = c + n
        return
    if not b:
        b[i] = n
        return
    newest = next(reversed(b))
    if i > newest:
        b[i] = n
        floor = i - keep
        if next(iter(b)) <= floor:
            for old in [k for k in b if k <= floor]:
                del b[old]
    elif i > newest - keep:  # out of order, still answered for: insert, keep the order
        b[i] = n
        items = sorted(b.items())
        b.clear()
        b.update(items)
    # else: older than anything this ring answers for


class Windows:
    """Per-type bucketed counters for one user. Not thread-safe; one per user state.

    Parameters
    ----------
    rings
        Optional initial counts with absolute bucket indexes, in the shape of :attr:`rings`.
    """

    __slots__ = ("base", "_hb", "_db", "types")

    def __init__(self, rings: dict[str, dict[str, dict[int, int]]] | None = None) -> None:
        self.base: int | None = None  # origin minute (epoch ms // 60_000); None before the first count
        self._hb = self._db = 0       # origin hour and day: base // 60, base // 1440
        self.types: dict[int | str, list[dict[int, int]]] = {}  # CODE.get(type, type) -> rings
        if rings:
            self._load_absolute(rings)

    def _set_base(self, base: int) -> None:
        self.base, self._hb, self._db = base, base // 60, base // 1440

    def _load_absolute(self, rings: dict[str, dict[str, dict[int, int]]]) -> None:
        minutes = [b for per_type in (rings.get("m") or {}).values() for b in per_type]
        if minutes:
            base = max(minutes)
        else:
            hours = [b * 60 for per_type in (rings.get("h") or {}).values() for b in per_type]
            days = [b * 1440 for per_type in (rings.get("d") or {}).values() for b in per_type]
            base = max(hours + days, default=0)
        self._set_base(base)
        origin = (self.base, self._hb, self._db)
        for pos, ring in enumerate(_RING_NAMES):
            for t, buckets in (rings.get(ring) or {}).items():
                if buckets:
                    per = self.types.setdefault(CODE.get(t, t), [{}, {}, {}])
                    per[pos] = {b - origin[pos]: c for b, c in sorted(buckets.items())}

    @property
    def rings(self) -> dict[str, dict[str, dict[int, int]]]:
        """A snapshot of the counts with absolute bucket indexes: ``{ring: {type: {bucket: n}}}``
        for rings ``m`` (epoch ms // 60 000), ``h`` (// 3 600 000), ``d`` (// 86 400 000);
        only types with buckets in that ring. Changing it does not change the counters."""
        out: dict[str, dict[str, dict[int, int]]] = {"m": {}, "h": {}, "d": {}}
        if self.base is None:
            return out
        origin = (self.base, self._hb, self._db)
        for code, per in self.types.items():
            t = NAME.get(code, code)
            for pos, ring in enumerate(_RING_NAMES):
                if per[pos]:
                    o = origin[pos]
                    out[ring][t] = {b + o: c for b, c in per[pos].items()}
        return out

    def add(self, etype: str, ts_ms: int, n: int = 1) -> None:
        """Count ``n`` events of ``etype`` at event time ``ts_ms`` (epoch ms)."""
        base = self.base
        if base is None:
            self._set_base(ts_ms // MINUTE_MS)
            base = self.base
        m = ts_ms // MINUTE_MS - base
        code = CODE.get(etype, etype)
        per = self.types.get(code)
        if per is None:
            self.types[code] = [{m: n}, {ts_ms // HOUR_MS - self._hb: n}, {ts_ms // DAY_MS - self._db: n}]
        else:
            _bump(per[0], m, n, 60)
            _bump(per[1], ts_ms // HOUR_MS - self._hb, n, 24)
            _bump(per[2], ts_ms // DAY_MS - self._db, n, 7)
        if m > _REBASE_AFTER:
            self._rebase(base + m)

    def _rebase(self, base: int) -> None:
        """Move the origin to minute ``base`` (indexes shift, counts unchanged)."""
        shift = (base - self.base, base // 60 - self._hb, base // 1440 - self._db)
        for per in self.types.values():
            for pos in range(3):
                d = shift[pos]
                per[pos] = {b - d: c for b, c in per[pos].items()}
        self._set_base(base)

    def count(self, etype: str, span: str, at_ms: int) -> int:
        """Events of ``etype`` in the last ``span`` (``5m``, ``1h``, ``24h``, ``7d``) as of ``at_ms``.

        Raises
        ------
        KeyError
            Unknown span.
        """
        pos, width, n = _SPAN_POS[span]
        per = self.types.get(CODE.get(etype, etype))
        if per is None:
            return 0
        buckets = per[pos]
        if not buckets:
            return 0
        hi = at_ms // width - (self.base, self._hb, self._db)[pos]
        lo = hi - n
        return sum(c for b, c in buckets.items() if lo < b <= hi)

    def counts(self, at_ms: int) -> dict[str, dict[str, int]]:
        """Every type's counts for every span as of ``at_ms``: ``{type: {span: n}}``."""
        return {t: {s: self.count(t, s, at_ms) for s in SPANS} for t in sorted(NAME.get(c, c) for c in self.types)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Windows):
            return NotImplemented
        return self.rings == other.rings

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Windows({self.rings!r})"

    # -- serialization ---------------------------------------------------------------------------
    def to_wire(self) -> list[Any] | None:
        """Compact form: ``[base, types]`` (the layout in memory, see the module docstring; not a
        copy), ``None`` when empty."""
        if self.base is None:
            return None
        return [self.base, self.types]

    @classmethod
    def from_wire(cls, obj: list[Any] | None) -> Windows:
        """Inverse of :meth:`to_wire` (takes ``obj`` over: not copied)."""
        w = _new(cls)
        if not obj:
            w.base = None
            w._hb = w._db = 0
            w.types = {}
            return w
        w.base = base = obj[0]
        w._hb = base // 60
        w._db = base // 1440
        w.types = obj[1]
        return w

    # version 1 (JSON) form: {"m": {"type": [idx, n, idx, n, ...]}, ...}, absolute indexes
    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ring, per_type in self.rings.items():
            packed = {t: [v for kv in sorted(b.items()) for v in kv] for t, b in per_type.items() if b}
            if packed:
                out[ring] = packed
        return out

    @classmethod
    def from_obj(cls, obj: dict[str, Any] | None) -> Windows:
        rings: dict[str, dict[str, dict[int, int]]] = {}
        for ring, per_type in (obj or {}).items():
            rings[ring] = {t: dict(zip(flat[::2], flat[1::2], strict=True)) for t, flat in per_type.items()}
        return cls(rings)
