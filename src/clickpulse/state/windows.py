"""Bucketed event-time window counters ("how many X in the last 5 min / 1 h / 24 h / 7 d / today").

Counts are kept in sparse rings of fixed buckets: minutes (last 60), hours (last 24) and days
(last 7), per event type. A query "last N units as of time t" sums the buckets whose index is
in ``(b(t) - N, b(t)]`` with ``b(t) = floor(t / unit)``: the current, partly elapsed bucket plus
the N - 1 whole buckets before it (the usual tumbling-bucket approximation of a sliding window,
as in Redis/Prometheus-style rate counters). Spans: ``5m`` and ``1h`` use minute buckets,
``24h`` hour buckets, ``7d`` and ``today`` day buckets.

Day buckets are **local days of the site time zone** (:mod:`clickpulse.state.localtime`,
``CLICKPULSE_TIMEZONE``): ``b(t) = local_day(t)``, local midnight to local midnight, 23 or 25
hours on a daylight-saving transition day; in UTC (the default) that is ``t // 86 400 000``.
Minute and hour buckets are absolute (UTC) in every zone, so a transition neither merges nor
repeats an hour.

Buckets older than their ring's length before the newest bucket of the user are pruned, so a
record holds at most 60 + 24 + 7 buckets per event type; queries at or after the newest event
are exact under the rule above.

Layout in memory (it is also the serialized form, see :mod:`clickpulse.state.user`):
``types[code] = [minutes, hours, days]``, three dicts ``{bucket: count}`` with absolute bucket
indexes (epoch ms // 60 000, // 3 600 000, and the local epoch day), in ascending order. ``code`` is the
type's index in :data:`VOCABULARY` (the type itself when not listed), so the serialized record
names a known type in one byte. :attr:`Windows.rings` gives the same dicts by ring and type name.

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

from .localtime import local_day

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

#: span name -> (ring name, bucket width in ms, number of buckets summed)
SPANS: dict[str, tuple[str, int, int]] = {
    "5m": ("m", MINUTE_MS, 5),
    "1h": ("m", MINUTE_MS, 60),
    "24h": ("h", HOUR_MS, 24),
    "7d": ("d", DAY_MS, 7),
    "today": ("d", DAY_MS, 1),
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
#: span -> (ring position, bucket width in ms, buckets summed)
_SPAN_POS = {s: (_RING_NAMES.index(r), w, n) for s, (r, w, n) in SPANS.items()}
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
        Optional initial counts, in the shape of :attr:`rings`.
    """

    __slots__ = ("types",)

    def __init__(self, rings: dict[str, dict[str, dict[int, int]]] | None = None) -> None:
        self.types: dict[int | str, list[dict[int, int]]] = {}  # CODE.get(type, type) -> [m, h, d]
        for pos, ring in enumerate(_RING_NAMES):
            for t, buckets in ((rings or {}).get(ring) or {}).items():
                if buckets:
                    per = self.types.setdefault(CODE.get(t, t), [{}, {}, {}])
                    per[pos] = dict(sorted(buckets.items()))

    @property
    def rings(self) -> dict[str, dict[str, dict[int, int]]]:
        """The counts by ring and type name: ``{ring: {type: {bucket: n}}}`` for rings ``m``
        (bucket = epoch ms // 60 000), ``h`` (// 3 600 000) and ``d`` (the local epoch day), types with
        buckets in that ring. The outer dicts are built for each call; the bucket dicts are the
        counters themselves (read them, do not change them)."""
        m: dict[str, dict[int, int]] = {}
        h: dict[str, dict[int, int]] = {}
        d: dict[str, dict[int, int]] = {}
        for code, per in self.types.items():
            t = NAME.get(code, code)
            if per[0]:
                m[t] = per[0]
            if per[1]:
                h[t] = per[1]
            if per[2]:
                d[t] = per[2]
        return {"m": m, "h": h, "d": d}

    def add(self, etype: str, ts_ms: int, n: int = 1) -> None:
        """Count ``n`` events of ``etype`` at event time ``ts_ms`` (epoch ms)."""
        code = CODE.get(etype, etype)
        per = self.types.get(code)
        if per is None:
            self.types[code] = [{ts_ms // MINUTE_MS: n}, {ts_ms // HOUR_MS: n}, {local_day(ts_ms): n}]
        else:
            _bump(per[0], ts_ms // MINUTE_MS, n, 60)
            _bump(per[1], ts_ms // HOUR_MS, n, 24)
            _bump(per[2], local_day(ts_ms), n, 7)

    def count(self, etype: str, span: str, at_ms: int) -> int:
        """Events of ``etype`` in the last ``span`` (``5m``, ``1h``, ``24h``, ``7d``, ``today``) as of ``at_ms``.

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
        hi = at_ms // width if pos < 2 else local_day(at_ms)
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
    def to_wire(self) -> dict[int | str, list[dict[int, int]]] | None:
        """Compact form: ``types`` (the layout in memory, see the module docstring; not a copy),
        ``None`` when empty."""
        return self.types or None

    @classmethod
    def from_wire(cls, obj: dict[int | str, list[dict[int, int]]] | None) -> Windows:
        """Inverse of :meth:`to_wire` (takes ``obj`` over: not copied)."""
        w = _new(cls)
        w.types = obj or {}
        return w

    # version 1 (JSON) form: {"m": {"type": [idx, n, idx, n, ...]}, ...}
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
