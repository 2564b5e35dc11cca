"""Per-user state in event time and the pure step that updates it.

``apply(state, event, watermark_ms, cfg) -> Applied`` is the whole per-event state transition
(rules, timers and actions are :mod:`clickpulse.rules.triggers`). No Kafka, no clocks: it takes
event time explicitly.

Rules (stated once, applied identically whatever the arrival order):

* **Late**: an event is late when its event time is earlier than the partition watermark at
  arrival. Late events are counted and do not touch window counts; they still update the
  session, the cart and lifetime totals (first/last seen, orders, revenue), which are
  order-insensitive.
* **Session boundary**: two events belong to the same session when their event times are less
  than ``session_gap_ms`` apart (a gap of exactly 30:00.000 starts a new session). An event
  within the gap of the current session extends it on either side; one at least a gap after it
  starts a new session; one at least a gap before it goes to the previous session (kept too), or
  starts an earlier one. So 10:05, 10:00, 10:10 is one 10-minute session, and 10:00:00.000 and
  10:30:00.000 are two sessions in either arrival order.
* **Cart**: ``add_to_cart`` adds quantity (default 1) of a product; ``remove_from_cart``
  subtracts. A ``purchase`` at time P removes every unit added at or before P (REES46-like
  sources do not list an order's items; any purchase means the user checked out). Cart
  abandonment itself is a rule (``on: {timeout: {after: add_to_cart, no: purchase, ...}}``, see
  :mod:`clickpulse.rules.triggers`), whose timers live in ``UserState.rules``.
* **Page-type dwell**: the time from an event to the user's next event in the same session is
  credited to the first event's page type (``properties.page_type``, else derived from the
  event type: ``checkout_start`` → ``checkout``, ``product_view`` → ``product``...), capped at
  the session gap; only for events arriving in event-time order (an out-of-order event is not
  credited, so a replay and a live run agree when the input is ordered).
* **Category views**: product views per ``properties.category`` per UTC day, for the 16 most
  recently viewed categories, not counting late events (like the windows).
* **Duplicates**: an event whose ``event_id`` is among the user's last ``dedup_ids_per_user``
  ids changes nothing. Ids are kept as 8-byte hashes (the first 8 bytes of BLAKE2b-72 of the
  UTF-8 id, see :class:`RecentIds`): two different ids collide with probability 2**-64, so with
  32 ids kept a new event is wrongly taken for a duplicate with probability about 32 / 2**64
  (1.7e-18): at a million events per second, one such event every ~20 000 years.

Serialized state (``UserState.to_bytes``, the table's changelog value)
--------------------------------------------------------------------------
**Version 2** (binary, written since this release): a MessagePack array (via ``msgspec``)
whose first element is the format version ``2``; trailing ``nil`` elements are left out::

    [2, key, partition, base, life, recent, windows, session, user_id, ml, categories,
     rules, cart, prev_session, traits, consent, anonymous_id, merged_into, merged]

``base`` is ``life.last_ms`` (epoch ms, or nil): every other time in the record is stored as
``time - base`` (small integers, 1-5 bytes instead of 9). Strings in known positions (event
types, page types, engagement signals, score names, the default rules' trigger and segment
names, trigger-state keys) are replaced by their index in :data:`VOCABULARY` (1 byte; the
tuple lives in :mod:`clickpulse.state.windows`); any other string is stored as is (an int in
such a position is always a code).

* ``life``: ``[first - base, events, sessions, orders, revenue, last_wall - base, converted]``
  (``revenue`` 0 when 0.0).
* ``recent``: one ``bin``: the 8-byte id hashes, oldest first.
* ``windows``: ``{type: [{minute: n}, {hour: n}, {day: n}]}`` (the in-memory layout of
  :class:`~clickpulse.state.windows.Windows`; absolute bucket indexes).
* ``session``, ``prev_session``: ``[start - base, last - start, events, {type: n}, products,
  max_scroll_pct, dwell_ms, ended, sid - start, {page_type: ms}, last_page, path, last_type]``.
* ``user_id``: ``true`` when equal to ``key``, else the string.
* ``ml``: ``[en, versions, pi, pc, sc, hi - base, cr - base, other]``: ``en`` =
  ``[t - base, {signal: points}]`` plus ``v`` only when it differs from the left-to-right sum of
  the points; ``versions`` = the model version strings, referenced by index from ``pi``
  (``[[sid - base, at - base, score, version, x], ...]``), ``pc`` (``[at - base, due - at,
  score, version, x]``) and ``sc`` (``{name: score or version}``); ``x`` = the feature values
  × 10 000 as integers (features are rounded to 4 decimals, so this is exact: checked, else the
  entry is kept in ``other``). ``other``: any key or value not of these shapes, as is.
* ``rules``: ``[t, bot, seg, cv, other]``: ``t`` = ``{trigger: {key: value}}`` with the times
  (keys ``e a b due lf ls fe``) relative to ``base``; ``bot`` = ``{key: value}`` with the first
  time of the ``e``/``c`` gap lists and ``at`` relative; ``seg``, ``cv`` = lists of names.
* ``cart``: ``[{product: [quantity, price, added - base, category, [t - base, q, ...]]},
  currency, updated - base, closed - base]``.
* ``categories``, ``traits``, ``consent``: the in-memory dicts as they are.
* ``merged_into`` (identity stitching, :mod:`clickpulse.engine.identity`): the customer key a
  guest's forwarding stub points to; ``merged``: ``[[guest_key, link_event_id], ...]`` the
  guests merged into this customer. Both were added to version 2 as optional trailing elements:
  a record without them reads as before (a release without them cannot read a record that has them).

Nothing is rounded: ``from_bytes(to_bytes(st)) == st`` and encoding that again gives the same
bytes (floats are stored as float64; ``-0.0`` may come back as ``0.0``).
:data:`VOCABULARY` is part of version 2: it may only change together with a new version number.

**Version 1** (orjson, written before): a JSON object, recognized by its first byte ``{``;
:meth:`UserState.from_bytes` still reads it (a changelog written by an older release restores)
and :meth:`UserState.to_bytes_json` still writes it (for comparisons).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

from ..events.contract import to_rfc3339
from ..features.engagement import EngagementConfig, top_contributors
from ..features.engagement import update as engagement_update
from ..features.engagement import value as engagement_value
from .localtime import local_day
from .windows import CODE, NAME, VOCABULARY, Windows  # noqa: F401 - VOCABULARY: part of this format

ACTION_NAMESPACE = uuid.UUID("6f0b1b0e-8a53-4c3e-9d3f-3c1c6a1c9e01")


@dataclass(frozen=True)
class StateConfig:
    """The settings the state step needs, in milliseconds (see :class:`clickpulse.settings.Settings`)."""

    session_gap_ms: int = 1_800_000
    dedup_ids_per_user: int = 32
    engagement: EngagementConfig = field(default_factory=EngagementConfig)

    @classmethod
    def from_settings(cls, s: Any) -> StateConfig:
        return cls(s.session_gap_ms, s.dedup_ids_per_user, EngagementConfig.from_settings(s))


@dataclass(slots=True)
class Session:
    """A session window: event-time span ``[start_ms, last_ms]`` and counts by type."""

    start_ms: int
    last_ms: int
    events: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    products: list[str] = field(default_factory=list)  # distinct product ids seen (first 32)
    max_scroll_pct: float = 0.0
    dwell_ms: int = 0
    ended: bool = False  # its end (last + gap) has been processed
    sid: int = -1  # identity: the event time it was created at (start_ms may move earlier)
    page_dwell_ms: dict[str, int] = field(default_factory=dict)  # page type -> ms (see module doc)
    last_page: str | None = None  # page type of the event at last_ms
    path: list[str] = field(default_factory=list)  # opening event types, event-time order, repeats collapsed (first 16)
    last_type: str | None = None  # type of the event at last_ms (the Markov state now)

    def __post_init__(self) -> None:
        if self.sid == -1:
            self.sid = self.start_ms

    @property
    def duration_ms(self) -> int:
        return self.last_ms - self.start_ms

    def to_obj(self) -> list[Any]:
        """Version 1 (JSON) form."""
        return [self.start_ms, self.last_ms, self.events, self.counts, self.products, self.max_scroll_pct,
                self.dwell_ms, self.ended, self.sid, self.page_dwell_ms, self.last_page, self.path,
                self.last_type]

    @classmethod
    def from_obj(cls, o: list[Any] | None) -> Session | None:
        return None if o is None else cls(*o[:13])


@dataclass(slots=True, order=True)
class Lot:
    """Units of a product added to the cart at one event time (epoch ms)."""

    added_ms: int
    quantity: int


@dataclass(slots=True)
class CartItem:
    """A product in the cart. ``lots``: when each unit was added (oldest first after
    :meth:`remove`), so a purchase at P settles exactly the units added at or before P (in any
    arrival order)."""

    quantity: int
    price: float | None
    added_ms: int
    category: str | None = None
    lots: list[Lot] = field(default_factory=list)

    def settle(self, purchase_ms: int) -> None:
        self.lots = [lot for lot in self.lots if lot.added_ms > purchase_ms]
        self.quantity = sum(lot.quantity for lot in self.lots)
        self.added_ms = max((lot.added_ms for lot in self.lots), default=self.added_ms)

    def remove(self, qty: int) -> None:
        """Remove ``qty`` units, newest first."""
        lots = self.lots
        lots.sort()
        while qty > 0 and lots:
            last = lots[-1]
            take = min(qty, last.quantity)
            last.quantity -= take
            qty -= take
            if last.quantity <= 0:
                lots.pop()
        self.quantity = sum(lot.quantity for lot in lots)


@dataclass(slots=True)
class Cart:
    """The user's cart (its abandonment timer is a rule's: :mod:`clickpulse.rules.triggers`)."""

    items: dict[str, CartItem] = field(default_factory=dict)
    currency: str | None = None
    updated_ms: int | None = None
    closed_ms: int | None = None  # latest purchase time: cart changes at or before it are settled

    @property
    def value(self) -> float:
        """Cart value: sum of quantity x unit price, in ``currency``."""
        return round(sum(i.quantity * (i.price or 0.0) for i in self.items.values()), 2)

    def is_empty_record(self) -> bool:
        """Nothing to store: no item, no currency, no update or purchase time."""
        return not self.items and self.updated_ms is None and self.closed_ms is None and self.currency is None

    def to_obj(self) -> dict[str, Any] | None:
        """Version 1 (JSON) form."""
        if not self.items and self.updated_ms is None and self.closed_ms is None:
            return None
        return {"i": {p: [i.quantity, i.price, i.added_ms, i.category, [[lot.added_ms, lot.quantity] for lot in i.lots]]
                      for p, i in self.items.items()},
                "c": self.currency, "u": self.updated_ms, "x": self.closed_ms}

    @classmethod
    def from_obj(cls, o: dict[str, Any] | None) -> Cart:
        if not o:
            return cls()
        items = {p: CartItem(*v[:4], [Lot(t, q) for t, q in v[4]] if len(v) > 4 else [])
                 for p, v in o["i"].items()}
        return cls(items, o["c"], o["u"], o.get("x"))


@dataclass(slots=True)
class Lifetime:
    """Totals over the user's whole history; times in epoch ms (event time unless noted)."""

    first_ms: int | None = None
    last_ms: int | None = None
    events: int = 0
    sessions: int = 0
    orders: int = 0
    revenue: float = 0.0
    last_wall_ms: int | None = None  # wall-clock arrival of the event with the highest event time
    converted_sessions: int = 0  # sessions with at least one purchase

    def to_obj(self) -> list[Any]:
        return [self.first_ms, self.last_ms, self.events, self.sessions, self.orders, self.revenue,
                self.last_wall_ms, self.converted_sessions]


ID_HASH_BYTES = 8


def id_hash(event_id: str) -> bytes:
    """The 8-byte hash of an event id kept for de-duplication: the first 8 bytes of
    BLAKE2b with a 9-byte digest (the version 1 format kept all 9, base64-encoded, so its ids
    convert exactly)."""
    return hashlib.blake2b(event_id.encode(), digest_size=9).digest()[:ID_HASH_BYTES]


_last_id: tuple[Any, bytes] = (None, b"")  # the last event id hashed and its hash (is_duplicate, then apply)


def _id_hash_cached(event_id: str) -> bytes:
    global _last_id
    last = _last_id
    if event_id is last[0]:
        return last[1]
    h = hashlib.blake2b(event_id.encode(), digest_size=9).digest()[:ID_HASH_BYTES]
    _last_id = (event_id, h)
    return h


class RecentIds:
    """The hashes (:func:`id_hash`, 8 bytes each) of a user's most recent event ids, oldest
    first, in one ``bytes`` object (``blob``). ``len()`` is the number of ids; ``in`` tests a
    hash; iteration yields the hashes."""

    __slots__ = ("blob",)

    def __init__(self, ids: bytes | Iterable[bytes] = b"") -> None:
        self.blob: bytes = ids if isinstance(ids, bytes) else b"".join(ids)
        if len(self.blob) % ID_HASH_BYTES:
            raise ValueError(f"recent ids must be a multiple of {ID_HASH_BYTES} bytes, got {len(self.blob)}")

    def __len__(self) -> int:
        return len(self.blob) >> 3

    def __contains__(self, h: object) -> bool:
        blob = self.blob
        i = blob.find(h)  # type: ignore[arg-type]
        while i > 0 and i & 7:  # a match across two hashes does not count
            i = blob.find(h, i + 1)  # type: ignore[arg-type]
        return i >= 0

    def __iter__(self) -> Iterator[bytes]:
        blob = self.blob
        return (blob[i:i + 8] for i in range(0, len(blob), 8))

    def add(self, h: bytes, keep: int) -> None:
        """Append hash ``h`` and keep only the last ``keep`` hashes."""
        blob = self.blob + h
        if len(blob) > keep << 3:
            blob = blob[len(blob) - (keep << 3):]
        self.blob = blob

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecentIds):
            return NotImplemented
        return self.blob == other.blob

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RecentIds({[h.hex() for h in self]!r})"


_CODE = CODE  # string -> code (VOCABULARY, defined with the windows that use it most)
_NAME = NAME  # _NAME.get(x, x): the string of a code, a string as is
_new = object.__new__  # decoding sets every slot itself (no __init__ / __post_init__ run)
FORMAT_VERSION = 2
_FIELDS = 19  # elements of a version 2 record (the last two optional, see merged_into)
_PAD = [None] * _FIELDS
_TS_KEYS = frozenset({"e", "a", "b", "due", "lf", "ls", "fe"})  # trigger-state keys holding times
_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder()


def _session_wire(s: Session, b: int) -> list[Any]:
    c = _CODE
    start = s.start_ms
    counts = {}
    for k, v in s.counts.items():
        counts[c.get(k, k)] = v
    pd = {}
    for k, v in s.page_dwell_ms.items():
        pd[c.get(k, k)] = v
    path = []
    for k in s.path:
        path.append(c.get(k, k))
    lp, lt = s.last_page, s.last_type
    return [start - b, s.last_ms - start, s.events, counts, s.products, s.max_scroll_pct or 0, s.dwell_ms, s.ended,
            s.sid - start, pd, c.get(lp, lp), path, c.get(lt, lt)]


def _session_unwire(w: list[Any], b: int) -> Session:
    n = _NAME
    s = _new(Session)
    s.start_ms = start = w[0] + b
    s.last_ms = start + w[1]
    s.events = w[2]
    counts = {}
    for k, v in w[3].items():
        counts[n.get(k, k)] = v
    s.counts = counts
    s.products = w[4]
    s.max_scroll_pct = float(w[5])
    s.dwell_ms = w[6]
    s.ended = w[7]
    s.sid = start + w[8]
    pd = {}
    for k, v in w[9].items():
        pd[n.get(k, k)] = v
    s.page_dwell_ms = pd
    x = w[10]
    s.last_page = n.get(x, x)
    path = []
    for k in w[11]:
        path.append(n.get(k, k))
    s.path = path
    x = w[12]
    s.last_type = n.get(x, x)
    return s


def _cart_wire(cart: Cart, b: int) -> list[Any] | None:
    if cart.is_empty_record():
        return None
    items = {}
    for p, i in cart.items.items():
        lots = []
        for lot in i.lots:
            lots.append(lot.added_ms - b)
            lots.append(lot.quantity)
        items[p] = [i.quantity, i.price, i.added_ms - b, i.category, lots]
    u, x = cart.updated_ms, cart.closed_ms
    return [items, cart.currency, u - b if type(u) is int else u, x - b if type(x) is int else x]


def _cart_unwire(w: list[Any] | None, b: int) -> Cart:
    if w is None:
        return Cart()
    items = {}
    for p, (q, price, added, cat, flat) in w[0].items():
        items[p] = CartItem(q, price, added + b, cat, [Lot(flat[k] + b, flat[k + 1]) for k in range(0, len(flat), 2)])
    u, x = w[2], w[3]
    return Cart(items, w[1], u + b if type(u) is int else u, x + b if type(x) is int else x)


_X_CACHE: dict[tuple[Any, ...], list[int] | None] = {}  # feature values -> _x_wire (the same vectors recur)
_X_CACHE_MAX = 4096


def _x_wire(x: Any) -> list[int] | None:
    """Feature values (4 decimals) as integers x 10 000, or None when that is not exact. The
    result may be shared: do not change it."""
    if type(x) is not list:
        return None
    try:
        key = tuple(x)
        ks = _X_CACHE.get(key, _X_CACHE)
    except TypeError:  # an unhashable value: not a number
        return None
    if ks is not _X_CACHE:
        return ks  # type: ignore[return-value]
    try:
        ks = [int(v * 10000.0 + 0.5) for v in x]
    except (TypeError, ValueError, OverflowError):
        ks = None
    else:
        if ks and (max(ks) >= 1 << 62 or min(ks) < 0) or [k / 10000 for k in ks] != x:
            ks = None
    if len(_X_CACHE) >= _X_CACHE_MAX:
        _X_CACHE.clear()
    _X_CACHE[key] = ks
    return ks


def _en_wire(en: Any, b: int) -> list[Any] | None:
    if type(en) is not dict or len(en) != 3:
        return None
    t, v, c = en.get("t"), en.get("v"), en.get("c")
    if type(t) is not int or type(c) is not dict or "v" not in en:
        return None
    code = _CODE
    cw = {}
    total = 0.0
    for k, x in c.items():
        if type(k) is not str or type(x) is not float:
            return None
        total += x
        cw[code.get(k, k)] = x
    return [t - b, cw] if type(v) is float and v == total else [t - b, cw, v]


def _en_unwire(w: list[Any], b: int) -> dict[str, Any]:
    n = _NAME
    c = {}
    total = 0.0
    for k, x in w[1].items():
        c[n.get(k, k)] = x
        total += x
    return {"t": w[0] + b, "v": w[2] if len(w) > 2 else total, "c": c}


def _version(vs: list[str], v: str) -> int:
    if v in vs:
        return vs.index(v)
    vs.append(v)
    return len(vs) - 1


def _pred_wire(p: Any, vs: list[str], b: int, pending: bool) -> list[Any] | None:
    """One stored prediction: ``[sid, at, score, version, x]`` (pending intent) or
    ``[at, due, score, version, x]`` (churn)."""
    if type(p) is not list or len(p) != 5 or type(p[0]) is not int or type(p[1]) is not int or type(p[3]) is not str:
        return None
    x = _x_wire(p[4])
    if x is None:
        return None
    return [p[0] - b, p[1] - b if pending else p[1] - p[0], p[2], _version(vs, p[3]), x]


def _pred_unwire(w: list[Any], vs: list[str], b: int, pending: bool) -> list[Any]:
    first = w[0] + b
    return [first, w[1] + b if pending else first + w[1], w[2], vs[w[3]], [k / 10000 for k in w[4]]]


_ML_KEYS = ("en", "pi", "pc", "sc", "hi", "cr")


def _sc_wire(sc: Any, vs: list[str]) -> dict[Any, Any] | None:
    if type(sc) is not dict:
        return None
    out = {}
    for k, x in sc.items():
        if type(k) is not str:
            return None
        if k.endswith("_version"):
            if type(x) is not str:
                return None
            x = _version(vs, x)
        out[_CODE.get(k, k)] = x
    return out


def _ml_wire(ml: dict[str, Any], b: int) -> list[Any] | None:
    if not ml:
        return None
    en = ml.get("en")
    if len(ml) == 1 and en is not None:  # the state step alone: engagement only
        w = _en_wire(en, b)
        if w is not None:
            return [w]
    out: list[Any] = [None] * 8
    vs: list[str] = []  # model versions, in the order met below (a fixed order: same bytes again)
    rest = {}
    for k, v in ml.items():
        if k not in _ML_KEYS:
            rest[k] = v
    if en is not None or "en" in ml:
        out[0] = w = _en_wire(en, b)
        if w is None:
            rest["en"] = en
    if "pi" in ml:
        v = ml["pi"]
        w = None
        if type(v) is list:
            w = []
            for p in v:
                x = _pred_wire(p, vs, b, True)
                if x is None:
                    w = None
                    break
                w.append(x)
        if w is None:
            rest["pi"] = v
        out[2] = w
    if "pc" in ml:
        v = ml["pc"]
        out[3] = w = _pred_wire(v, vs, b, False)
        if w is None:
            rest["pc"] = v
    if "sc" in ml:
        v = ml["sc"]
        out[4] = w = _sc_wire(v, vs)
        if w is None:
            rest["sc"] = v
    for slot, k in ((5, "hi"), (6, "cr")):
        if k in ml:
            v = ml[k]
            if type(v) is int:
                out[slot] = v - b
            else:
                rest[k] = v
    if vs:
        out[1] = vs
    if rest:
        out[7] = rest
    while out[-1] is None:
        out.pop()
    return out


def _ml_unwire(w: list[Any] | None, b: int) -> dict[str, Any]:
    if not w:
        return {}
    ml: dict[str, Any] = {}
    if w[0] is not None:
        ml["en"] = _en_unwire(w[0], b)
    if len(w) == 1:
        return ml
    w = w + [None] * (8 - len(w))
    vs = w[1] or []
    if w[2] is not None:
        ml["pi"] = [_pred_unwire(p, vs, b, True) for p in w[2]]
    if w[3] is not None:
        ml["pc"] = _pred_unwire(w[3], vs, b, False)
    if w[4] is not None:
        n = _NAME
        sc = {}
        for s, x in w[4].items():
            name = n.get(s, s)
            sc[name] = vs[x] if name.endswith("_version") else x
        ml["sc"] = sc
    if w[5] is not None:
        ml["hi"] = w[5] + b
    if w[6] is not None:
        ml["cr"] = w[6] + b
    if w[7]:
        ml.update(w[7])
    return ml


def _names_wire(v: Any) -> list[Any] | None:
    if type(v) is not list:
        return None
    out = []
    for s in v:
        if type(s) is not str:
            return None
        out.append(_CODE.get(s, s))
    return out


def _triggers_wire(v: Any, b: int) -> dict[Any, Any] | None:
    if type(v) is not dict:
        return None
    c = _CODE
    ts_keys = _TS_KEYS
    out = {}
    for name, ts in v.items():
        if type(name) is not str or type(ts) is not dict:
            return None
        d = {}
        for x, y in ts.items():
            if type(x) is not str:
                return None
            d[c.get(x, x)] = y - b if type(y) is int and x in ts_keys else y
        out[c.get(name, name)] = d
    return out


def _bot_wire(v: Any, b: int) -> dict[Any, Any] | None:
    if type(v) is not dict:
        return None
    c = _CODE
    out = {}
    for x, y in v.items():
        if type(x) is not str:
            return None
        if (x == "e" or x == "c") and type(y) is list and y and type(y[0]) is int:
            y = [y[0] - b, *y[1:]]
        elif x == "at" and type(y) is int:
            y = y - b
        out[c.get(x, x)] = y
    return out


_RULES_KEYS = ("t", "bot", "seg", "cv")


def _rules_wire(ru: dict[str, Any], b: int) -> list[Any] | None:
    if not ru:
        return None
    out: list[Any] = [None] * 5
    rest = {}
    for k, v in ru.items():
        if k not in _RULES_KEYS:
            rest[k] = v
    for slot, k in enumerate(_RULES_KEYS):
        if k in ru:
            v = ru[k]
            w = _triggers_wire(v, b) if slot == 0 else _bot_wire(v, b) if slot == 1 else _names_wire(v)
            if w is None:
                rest[k] = v
            else:
                out[slot] = w
    if rest:
        out[4] = rest
    while out[-1] is None:
        out.pop()
    return out


def _rules_unwire(w: list[Any] | None, b: int) -> dict[str, Any]:
    if not w:
        return {}
    n = _NAME
    w = w + [None] * (5 - len(w))
    ru: dict[str, Any] = {}
    if w[0] is not None:
        t = {}
        for name, ts in w[0].items():
            d = {}
            for x, y in ts.items():
                key = n.get(x, x)
                d[key] = y + b if type(y) is int and key in _TS_KEYS else y
            t[n.get(name, name)] = d
        ru["t"] = t
    if w[1] is not None:
        bot = {}
        for x, y in w[1].items():
            key = n.get(x, x)
            if (key == "e" or key == "c") and type(y) is list and y and type(y[0]) is int:
                y[0] += b
            elif key == "at" and type(y) is int:
                y += b
            bot[key] = y
        ru["bot"] = bot
    if w[2] is not None:
        ru["seg"] = [n.get(s, s) for s in w[2]]
    if w[3] is not None:
        ru["cv"] = [n.get(s, s) for s in w[3]]
    if w[4]:
        ru.update(w[4])
    return ru


@dataclass(slots=True)
class UserState:
    """Everything clickpulse knows about one user. Serialized with :meth:`to_bytes` (binary,
    version 2: see the module docstring; about 100-300 bytes for a typical shopper)."""

    key: str
    partition: int = -1
    user_id: str | None = None
    anonymous_id: str | None = None
    windows: Windows = field(default_factory=Windows)
    session: Session | None = None
    prev_session: Session | None = None
    cart: Cart = field(default_factory=Cart)
    life: Lifetime = field(default_factory=Lifetime)
    traits: dict[str, Any] = field(default_factory=dict)
    #: hashes of the last ``dedup_ids_per_user`` event ids (see :class:`RecentIds`)
    recent_ids: RecentIds = field(default_factory=RecentIds)
    #: model bookkeeping (see clickpulse.models.labels): "pi" pending intent predictions
    #: [[session_start_ms, at_ms, score, version, x], ...]; "pc" pending churn prediction
    #: [at_ms, due_ms, score, version, x]; "sc" latest scores; "hi" session start of the last
    #: high_intent action; "cr" event time of the last churn_risk action; "en" engagement
    ml: dict[str, Any] = field(default_factory=dict)
    #: consent purpose -> [granted, event time ms of the decision] (latest decision wins)
    consent: dict[str, list[Any]] = field(default_factory=dict)
    #: category -> [[UTC day number, product views], ...] (see :func:`category_views`)
    categories: dict[str, list[list[int]]] = field(default_factory=dict)
    #: rule bookkeeping (see clickpulse.rules.triggers): "seg" segment membership, "t" per-trigger
    #: state (timers, cooldowns, once_per), "bot" bot detection, "cs" sessions with a purchase
    rules: dict[str, Any] = field(default_factory=dict)
    #: identity stitching (:mod:`clickpulse.engine.identity`): set on a guest's forwarding stub,
    #: the customer key its state was merged into and its later events are forwarded to
    merged_into: str | None = None
    #: identity stitching: ``[[guest_key, link_event_id], ...]`` merged into this customer (the
    #: newest :data:`MAX_MERGED`), so a merge record delivered twice is merged once
    merged: list[list[str]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """The state as a version 2 record (MessagePack, see the module docstring).

        Raises
        ------
        TypeError, OverflowError
            A value in ``traits``, ``ml``, ``rules``... that MessagePack cannot hold (an int
            beyond 64 bits, an object that is not None/bool/int/float/str/bytes/list/dict).
        """
        life = self.life
        base = life.last_ms
        b = base if type(base) is int else 0
        first, wall = life.first_ms, life.last_wall_ms
        s, uid = self.session, self.user_id
        rec = [FORMAT_VERSION, self.key, self.partition, base,
               [first - b if type(first) is int else first, life.events, life.sessions, life.orders,
                life.revenue or 0, wall - b if type(wall) is int else wall, life.converted_sessions],
               self.recent_ids.blob or None, self.windows.to_wire(),
               None if s is None else _session_wire(s, b),
               True if uid is not None and uid == self.key else uid]
        ml, cats, ru, cart, ps = self.ml, self.categories, self.rules, self.cart, self.prev_session
        traits, consent, aid = self.traits, self.consent, self.anonymous_id
        mi, mg = self.merged_into, self.merged
        # the elements after user_id, up to the last one that is not empty (omitted: nil)
        n = 10 if mg else 9 if mi is not None else 8 if aid is not None else 7 if consent else 6 if traits \
            else 5 if ps is not None else 4 if not cart.is_empty_record() else 3 if ru else 2 if cats \
            else 1 if ml else 0
        if n:
            tail = [_ml_wire(ml, b) if ml else None, cats or None, _rules_wire(ru, b) if ru else None,
                    _cart_wire(cart, b) if n >= 4 else None, None if ps is None else _session_wire(ps, b),
                    traits or None, consent or None, aid, mi, mg or None]
            rec += tail[:n]
        return _ENC.encode(rec)

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        """Inverse of :meth:`to_bytes`; also reads the version 1 (JSON) format.

        Raises
        ------
        ValueError
            Not a state record of version 1 or 2, or a corrupt one (``msgspec.DecodeError`` and
            ``orjson.JSONDecodeError`` are ``ValueError`` too).
        """
        if data[:1] == b"{":
            return cls.from_json(data)
        o = _DEC.decode(data)
        if type(o) is not list or not o or o[0] != FORMAT_VERSION:
            raise ValueError(f"not a clickpulse user state record (version {o[0] if type(o) is list and o else '?'})")
        if len(o) < _FIELDS:
            o += _PAD[len(o):]
        try:
            _v, key, partition, base, lw, rid, ww, sw, uid, mlw, cats, ruw, cw, psw, traits, consent, aid, mi, mg = o
            b = base if type(base) is int else 0
            st = _new(cls)
            st.key = key
            st.partition = partition
            st.user_id = key if uid is True else uid
            st.anonymous_id = aid
            st.windows = Windows.from_wire(ww)
            st.session = None if sw is None else _session_unwire(sw, b)
            st.prev_session = None if psw is None else _session_unwire(psw, b)
            if cw is None:
                cart = st.cart = _new(Cart)
                cart.items = {}
                cart.currency = cart.updated_ms = cart.closed_ms = None
            else:
                st.cart = _cart_unwire(cw, b)
            life = st.life = _new(Lifetime)
            x = lw[0]
            life.first_ms = x + b if type(x) is int else x
            life.last_ms = base
            life.events, life.sessions, life.orders = lw[1], lw[2], lw[3]
            life.revenue = float(lw[4])
            x = lw[5]
            life.last_wall_ms = x + b if type(x) is int else x
            life.converted_sessions = lw[6]
            st.traits = traits or {}
            ids = st.recent_ids = _new(RecentIds)
            ids.blob = rid or b""
            st.ml = _ml_unwire(mlw, b) if mlw else {}
            st.consent = consent or {}
            st.categories = cats or {}
            st.rules = _rules_unwire(ruw, b) if ruw else {}
            st.merged_into = mi
            st.merged = mg or []
        except (TypeError, IndexError, KeyError, AttributeError) as e:  # a corrupt record
            raise ValueError(f"not a version 2 user state record: {e!r}") from e
        return st

    def to_bytes_json(self) -> bytes:
        """The state in the version 1 (orjson) format written by earlier releases (event-id
        hashes as base64 of their 8 bytes). For size comparisons and compatibility tests."""
        obj: dict[str, Any] = {"k": self.key, "p": self.partition, "w": self.windows.to_obj(),
                               "l": self.life.to_obj(),
                               "r": [base64.b64encode(h).decode() for h in self.recent_ids]}
        if self.user_id is not None:
            obj["u"] = self.user_id
        if self.anonymous_id is not None:
            obj["a"] = self.anonymous_id
        if self.session is not None:
            obj["s"] = self.session.to_obj()
        if self.prev_session is not None:
            obj["ps"] = self.prev_session.to_obj()
        cart = self.cart.to_obj()
        if cart is not None:
            obj["c"] = cart
        if self.traits:
            obj["t"] = self.traits
        if self.ml:
            obj["m"] = self.ml
        if self.consent:
            obj["co"] = self.consent
        if self.categories:
            obj["cv"] = self.categories
        if self.rules:
            obj["ru"] = self.rules
        if self.merged_into is not None:
            obj["mi"] = self.merged_into
        if self.merged:
            obj["mg"] = self.merged
        return orjson.dumps(obj)

    @classmethod
    def from_json(cls, data: bytes) -> UserState:
        """Read a version 1 (orjson) record.

        Raises
        ------
        ValueError
            Not JSON, or not a version 1 record.
        """
        o = orjson.loads(data)
        try:
            return cls(key=o["k"], partition=o.get("p", -1), user_id=o.get("u"), anonymous_id=o.get("a"),
                       windows=Windows.from_obj(o.get("w")), session=Session.from_obj(o.get("s")),
                       prev_session=Session.from_obj(o.get("ps")), cart=Cart.from_obj(o.get("c")),
                       life=Lifetime(*o["l"][:8]), traits=o.get("t", {}),
                       recent_ids=RecentIds([base64.b64decode(x)[:ID_HASH_BYTES] for x in o.get("r", [])]),
                       ml=o.get("m", {}), consent=o.get("co", {}), categories=o.get("cv", {}), rules=o.get("ru", {}),
                       merged_into=o.get("mi"), merged=o.get("mg", []))
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"not a version 1 user state record: {e!r}") from e

    def profile(self, at_ms: int | None = None, engagement: EngagementConfig | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The summary served from Redis (``schemas/profile.v1.json``); ``engagement`` is the
        config the score was accumulated with (its half-life decays it to ``at_ms``); ``extra``
        holds what the engine computes from its models and population (``tier``, ``p_purchase``,
        ``conversion_user``, ``recommendations``: see :meth:`clickpulse.engine.Engine.profile_extra`); the
        ``recommendations`` key is there only when ``extra`` has it."""
        x = extra or {}
        at = at_ms if at_ms is not None else (self.life.last_ms or 0)
        ecfg = engagement or EngagementConfig()
        en = self.ml.get("en", {})
        s = self.session
        return {
            "schema_version": 1,
            "user_key": self.key,
            "user_id": self.user_id,
            "anonymous_id": self.anonymous_id,
            "as_of": to_rfc3339(at),
            "counts": self.windows.counts(at),
            "session": None if s is None else {"start": to_rfc3339(s.start_ms), "last": to_rfc3339(s.last_ms),
                                               "duration_s": s.duration_ms / 1000, "events": s.events,
                                               "counts": s.counts},
            "cart": {"items": cart_items(self.cart), "value": self.cart.value, "currency": self.cart.currency},
            "lifetime": {"first_seen": None if self.life.first_ms is None else to_rfc3339(self.life.first_ms),
                         "last_seen": None if self.life.last_ms is None else to_rfc3339(self.life.last_ms),
                         "events": self.life.events, "sessions": self.life.sessions,
                         "orders": self.life.orders, "revenue": round(self.life.revenue, 2),
                         "converted_sessions": self.life.converted_sessions},
            "traits": self.traits,
            "scores": self.ml.get("sc", {}),
            "engagement": {"score": round(engagement_value(en, at, ecfg), 4) if en else 0.0,
                           "top": top_contributors(en, at, ecfg) if en else []},
            "segments": list(self.rules.get("seg", [])),
            "timers": {name: to_rfc3339(ts["due"]) for name, ts in sorted(self.rules.get("t", {}).items())
                       if "due" in ts},
            "consent": {k: bool(v[0]) for k, v in self.consent.items()},
            "bot": self.rules.get("bot", {}).get("flag"),
            "tier": x.get("tier"),
            "p_purchase": None if x.get("p_purchase") is None else round(float(x["p_purchase"]), 4),
            "conversion": {"sessions": self.life.sessions, "converted": self.life.converted_sessions,
                           "rate": round(self.life.converted_sessions / self.life.sessions, 4)
                           if self.life.sessions else None,
                           "rate_smoothed": None if x.get("conversion_user") is None
                           else round(float(x["conversion_user"]), 4)},
            **({"recommendations": x["recommendations"]} if "recommendations" in x else {}),
        }


@dataclass(slots=True)
class Applied:
    """What one :func:`apply` call did."""

    duplicate: bool = False
    late: bool = False
    session_started: bool = False


def is_duplicate(st: UserState, event: dict[str, Any]) -> bool:
    """True when the event's id is among the user's recent ids (it would change nothing)."""
    return _id_hash_cached(event["event_id"]) in st.recent_ids


def _in_session(s: Session, t: int, gap: int) -> bool:
    return s.start_ms - gap < t < s.last_ms + gap


MAX_SESSION_PRODUCTS = 32


#: Page type of an event without ``properties.page_type``.
PAGE_TYPES = {"page_view": "page", "product_view": "product", "add_to_cart": "cart", "remove_from_cart": "cart",
              "checkout_start": "checkout", "purchase": "confirmation", "search": "search"}
MAX_PATH = 16
MAX_CATEGORIES = 16
#: Caps of the per-user collections whose keys come from events (each user's state stays small
#: whatever the user sends; the engine's last resort is ``CLICKPULSE_MAX_STATE_BYTES``):
#: distinct event types counted in the windows and in a session's counts (canonical types are
#: always counted; a custom type beyond the cap is not counted there, the event still applies)
MAX_EVENT_TYPES = 64
#: distinct page types in a session's page dwell (the canonical ones always credited)
MAX_PAGE_TYPES = 32
#: distinct products in the cart; adding one more drops the one added longest ago
MAX_CART_ITEMS = 100
#: add-lots per cart item; one more merges the two oldest (the later time of the two, so a
#: purchase settles their units together: never earlier than the units were added)
MAX_LOTS = 32
#: trait names kept; a new name beyond the cap is ignored (known names are still updated)
MAX_TRAITS = 64
#: consent purposes kept; a new purpose beyond the cap drops the oldest granted decision
#: (a refusal is only dropped when every kept decision is a refusal: the oldest one)
MAX_CONSENT_PURPOSES = 32
#: characters kept of a product id, category, page type and trait value (the contract rejects
#: longer ones: schemas/event.v1.json)
MAX_ID_CHARS = 256
_CANONICAL_PAGE_TYPES = frozenset(PAGE_TYPES.values())


def page_type(etype: str, props: dict[str, Any] | None) -> str | None:
    """The page type of an event: ``properties.page_type`` (a string, at most 64 characters), else
    :data:`PAGE_TYPES` of its type, else ``None`` (scroll, dwell, identify... keep the page)."""
    pt = (props or {}).get("page_type")
    if isinstance(pt, str) and pt:
        return pt[:64]
    return PAGE_TYPES.get(etype)


def _extend(s: Session, t: int, etype: str, props: dict[str, Any] | None = None, gap: int = 1_800_000) -> None:
    last = s.last_ms
    if t >= last:  # in order: credit the time since the previous event to its page type
        lp = s.last_page
        if t > last and lp is not None and s.events:
            pd = s.page_dwell_ms
            if lp in pd or len(pd) < MAX_PAGE_TYPES or lp in _CANONICAL_PAGE_TYPES:
                pd[lp] = pd.get(lp, 0) + min(t - last, gap)
        pt = props.get("page_type") if props else None
        if isinstance(pt, str) and pt:
            s.last_page = pt[:64]
        else:
            pt = PAGE_TYPES.get(etype)
            if pt is not None:
                s.last_page = pt
        path = s.path
        if len(path) < MAX_PATH and (not path or path[-1] != etype):
            path.append(etype)
        s.last_type = etype
        s.last_ms = t
    if t < s.start_ms:
        s.start_ms = t
    s.events += 1
    counts = s.counts
    if etype in counts or len(counts) < MAX_EVENT_TYPES or etype in _CODE:
        counts[etype] = counts.get(etype, 0) + 1
    if props:
        pid = props.get("product_id")
        if pid is not None:
            products = s.products
            if len(products) < MAX_SESSION_PRODUCTS:
                pid = str(pid)[:MAX_ID_CHARS]
                if pid not in products:
                    products.append(pid)
        scroll = props.get("scroll_pct")
        if isinstance(scroll, (int, float)) and scroll > s.max_scroll_pct:
            s.max_scroll_pct = float(scroll)
        dwell = props.get("dwell_ms")
        if isinstance(dwell, int) and dwell > 0:
            s.dwell_ms += dwell


def _apply_session(st: UserState, t: int, etype: str, gap: int, props: dict[str, Any] | None = None) -> bool:
    """Assign the event to a session; return True when it started a new one."""
    cur = st.session
    if cur is None:
        st.session = s = Session(t, t)
        _extend(s, t, etype, props, gap)
        return True
    if cur.start_ms - gap < t < cur.last_ms + gap:
        _extend(cur, t, etype, props, gap)
        return False
    if t >= cur.last_ms + gap:
        st.prev_session = cur
        st.session = s = Session(t, t)
        _extend(s, t, etype, props, gap)
        return True
    prev = st.prev_session  # t <= cur.start - gap: an earlier session
    if prev is not None and _in_session(prev, t, gap):
        _extend(prev, t, etype, props, gap)
        return False
    if prev is None or t >= prev.last_ms + gap:
        st.prev_session = s = Session(t, t)
        _extend(s, t, etype, props, gap)
    return True


_CART_TYPES = frozenset({"add_to_cart", "remove_from_cart", "purchase"})


def _apply_cart(cart: Cart, etype: str, props: dict[str, Any], t: int) -> None:
    if etype == "add_to_cart" or etype == "remove_from_cart":
        if cart.closed_ms is not None and t <= cart.closed_ms:
            return  # arrived after a purchase that already settled it: same result in any order
        pid = str(props.get("product_id", "unknown"))[:MAX_ID_CHARS]
        qty = props.get("quantity")
        qty = 1 if qty is None else int(qty)
        if etype == "add_to_cart":
            if qty <= 0:
                return
            item = cart.items.get(pid)
            if item is None:
                items = cart.items
                if len(items) >= MAX_CART_ITEMS:  # drop the product added longest ago
                    del items[min(items, key=lambda p: items[p].added_ms)]
                cat = props.get("category")
                items[pid] = CartItem(qty, props.get("price"), t, cat[:MAX_ID_CHARS] if isinstance(cat, str) else cat,
                                      [Lot(t, qty)])
            else:
                lots = item.lots
                if len(lots) >= MAX_LOTS:  # merge the two oldest lots at the later time of the two
                    lots.sort()
                    first = lots.pop(0)
                    lots[0].quantity += first.quantity
                item.lots.append(Lot(t, qty))
                item.quantity += qty
                item.added_ms = max(item.added_ms, t)
                if props.get("price") is not None:
                    item.price = props["price"]
            if props.get("currency"):
                cart.currency = props["currency"]
        else:
            item = cart.items.get(pid)
            if item is not None:
                item.remove(qty if qty > 0 else item.quantity)
                if item.quantity <= 0:
                    del cart.items[pid]
        cart.updated_ms = t if cart.updated_ms is None else max(cart.updated_ms, t)
    elif etype == "purchase":
        cart.closed_ms = t if cart.closed_ms is None else max(cart.closed_ms, t)
        for pid, item in list(cart.items.items()):
            item.settle(t)
            if item.quantity <= 0:
                del cart.items[pid]


def apply(st: UserState, event: dict[str, Any], watermark_ms: int | None, cfg: StateConfig,
          wall_ms: int | None = None) -> Applied:
    """Apply one canonical event to the user's state, in place.

    Parameters
    ----------
    st
        The user's state (``UserState(key=event["user_key"])`` for a new user).
    event
        A canonical event (output of :func:`clickpulse.events.contract.parse`).
    watermark_ms
        The partition's watermark before this event (epoch ms), ``None`` before the first event.
    cfg
        Session gap, de-duplication depth, engagement weights.
    wall_ms
        Wall-clock arrival time (epoch ms), kept for the idle-advance clock across restarts.

    Returns
    -------
    Applied
        Flags: duplicate (nothing changed), late (not counted in windows), session_started.
    """
    h = _id_hash_cached(event["event_id"])
    recent = st.recent_ids
    if h in recent:
        return Applied(True)
    recent.add(h, cfg.dedup_ids_per_user)
    t = int(event["timestamp_ms"])
    etype = event["type"]
    late = watermark_ms is not None and t < watermark_ms
    if not late:
        types = st.windows.types
        code = _CODE.get(etype, etype)
        if code in types or len(types) < MAX_EVENT_TYPES or code is not etype:
            st.windows.add(etype, t)
    if st.user_id is None:
        uid = event.get("user_id")
        if uid:
            st.user_id = uid
    if st.anonymous_id is None:
        aid = event.get("anonymous_id")
        if aid:
            st.anonymous_id = aid
    props = event.get("properties")
    if not isinstance(props, dict):
        props = {}
    started = _apply_session(st, t, etype, cfg.session_gap_ms, props)
    life = st.life
    if started:
        life.sessions += 1
    if etype in _CART_TYPES:
        _apply_cart(st.cart, etype, props, t)
    last = life.last_ms
    if wall_ms is not None and (last is None or t >= last):
        life.last_wall_ms = wall_ms
    if last is None or t > last:
        life.last_ms = t
    first = life.first_ms
    if first is None or t < first:
        life.first_ms = t
    life.events += 1
    if etype == "purchase":
        life.orders += 1
        for sess in (st.session, st.prev_session):
            if sess is not None and sess.start_ms <= t <= sess.last_ms:
                if sess.counts.get("purchase") == 1:  # the session's first purchase
                    life.converted_sessions += 1
                break
        rev = props.get("revenue")
        if rev is None and props.get("price") is not None:
            rev = props["price"] * int(props.get("quantity") or 1)
        life.revenue += float(rev or 0.0)
    ml = st.ml
    en = ml.get("en")
    new = engagement_update(en or {}, event, cfg.engagement)
    if new:
        if new is not en:
            ml["en"] = new
    elif "en" in ml:
        del ml["en"]
    ctx = event.get("context")
    if isinstance(ctx, dict):
        for k in ("device", "country"):
            v = ctx.get(k)
            if isinstance(v, str):
                st.traits[k] = v[:64]
    if etype == "product_view":
        cat = props.get("category")
        if not late and isinstance(cat, str) and cat:
            _count_category(st.categories, cat[:256], t)
    elif etype == "consent" and isinstance(props.get("consent"), dict):
        consent = st.consent
        for purpose, granted in list(props["consent"].items())[:16]:
            if isinstance(granted, bool) and len(str(purpose)) <= 64:
                prev = consent.get(str(purpose))
                if prev is None or t >= prev[1]:
                    if prev is None and len(consent) >= MAX_CONSENT_PURPOSES:
                        granted_ones = [p for p, d in consent.items() if d[0]] or list(consent)
                        del consent[min(granted_ones, key=lambda p: consent[p][1])]
                    consent[str(purpose)] = [granted, t]
    elif etype == "identify" and isinstance(props.get("traits"), dict):
        traits = st.traits
        for k, v in list(props["traits"].items())[:16]:
            if isinstance(v, str | int | float | bool) and len(str(k)) <= 64 \
                    and (str(k) in traits or len(traits) < MAX_TRAITS):
                traits[str(k)] = v if not isinstance(v, str) else v[:MAX_ID_CHARS]
    return Applied(False, late, started)


def _count_category(cats: dict[str, list[list[int]]], category: str, t: int) -> None:
    day = local_day(t)
    days = cats.get(category)
    if days is None:
        days = cats[category] = []
    if days and days[-1][0] == day:
        days[-1][1] += 1
    else:
        days.append([day, 1])
        if len(days) > 1 and days[-2][0] > day:
            days.sort()
        if len(days) > 7:
            del days[: len(days) - 7]
    if len(cats) > MAX_CATEGORIES:  # forget the category viewed least recently
        del cats[min(cats, key=lambda c: cats[c][-1][0] if cats[c] else -1)]


def category_views(st: UserState, at_ms: int, days: int = 7) -> dict[str, int]:
    """Product views per category over the local day (site time zone) of ``at_ms`` and the
    ``days - 1`` before it.

    >>> st = UserState("u"); _count_category(st.categories, "shoes", 0); _count_category(st.categories, "shoes", 1)
    >>> category_views(st, 3 * 86_400_000), category_views(st, 7 * 86_400_000)
    ({'shoes': 2}, {})
    """
    today = local_day(at_ms)
    out = {}
    for cat, buckets in st.categories.items():
        n = sum(c for d, c in buckets if today - days < d <= today)
        if n:
            out[cat] = n
    return out


def cart_items(cart: Cart) -> list[dict[str, Any]]:
    return [{"product_id": p, "quantity": i.quantity, "price": i.price, "category": i.category}
            for p, i in sorted(cart.items.items())]


def action_id(user_key: str, action_type: str, discriminator: str) -> str:
    """Deterministic action id: UUIDv5 of ``user_key|type|discriminator``; re-processing the
    same input gives the same id.

    >>> action_id("u1", "cart_abandoned", "1000") == action_id("u1", "cart_abandoned", "1000")
    True
    """
    return str(uuid.uuid5(ACTION_NAMESPACE, f"{user_key}|{action_type}|{discriminator}"))
