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
  ids changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..events.contract import to_rfc3339
from ..features.engagement import EngagementConfig, top_contributors
from ..features.engagement import update as engagement_update
from ..features.engagement import value as engagement_value
from .windows import Windows

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


@dataclass
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
        return [self.start_ms, self.last_ms, self.events, self.counts, self.products, self.max_scroll_pct,
                self.dwell_ms, self.ended, self.sid, self.page_dwell_ms, self.last_page, self.path,
                self.last_type]

    @classmethod
    def from_obj(cls, o: list[Any] | None) -> Session | None:
        return None if o is None else cls(*o[:13])


@dataclass
class CartItem:
    """A product in the cart. ``lots`` = ``[[added_ms, quantity], ...]``: when each unit was added,
    so a purchase at P settles exactly the units added at or before P (in any arrival order)."""

    quantity: int
    price: float | None
    added_ms: int
    category: str | None = None
    lots: list[list[int]] = field(default_factory=list)

    def settle(self, purchase_ms: int) -> None:
        self.lots = [lot for lot in self.lots if lot[0] > purchase_ms]
        self.quantity = sum(q for _t, q in self.lots)
        self.added_ms = max((t for t, _q in self.lots), default=self.added_ms)

    def remove(self, qty: int) -> None:
        """Remove ``qty`` units, newest first."""
        self.lots.sort()
        while qty > 0 and self.lots:
            take = min(qty, self.lots[-1][1])
            self.lots[-1][1] -= take
            qty -= take
            if self.lots[-1][1] <= 0:
                self.lots.pop()
        self.quantity = sum(q for _t, q in self.lots)


@dataclass
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

    def to_obj(self) -> dict[str, Any] | None:
        if not self.items and self.updated_ms is None and self.closed_ms is None:
            return None
        return {"i": {p: [i.quantity, i.price, i.added_ms, i.category, i.lots] for p, i in self.items.items()},
                "c": self.currency, "u": self.updated_ms, "x": self.closed_ms}

    @classmethod
    def from_obj(cls, o: dict[str, Any] | None) -> Cart:
        if not o:
            return cls()
        return cls({p: CartItem(*v) for p, v in o["i"].items()}, o["c"], o["u"], o.get("x"))


@dataclass
class Lifetime:
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


@dataclass
class UserState:
    """Everything clickpulse knows about one user. Serialized with :meth:`to_bytes` (orjson,
    a few hundred bytes for a typical shopper)."""

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
    recent_ids: list[str] = field(default_factory=list)
    #: model bookkeeping (see clickpulse.models.labels): "pi" pending intent predictions
    #: [[session_start_ms, at_ms, score, version, x], ...]; "pc" pending churn prediction
    #: [at_ms, due_ms, score, version, x]; "sc" latest scores; "hi" session start of the last
    #: high_intent action; "cr" event time of the last churn_risk action
    ml: dict[str, Any] = field(default_factory=dict)
    #: consent purpose -> [granted, event time ms of the decision] (latest decision wins)
    consent: dict[str, list[Any]] = field(default_factory=dict)
    #: category -> [[UTC day number, product views], ...] (see :func:`category_views`)
    categories: dict[str, list[list[int]]] = field(default_factory=dict)
    #: rule bookkeeping (see clickpulse.rules.triggers): "seg" segment membership, "t" per-trigger
    #: state (timers, cooldowns, once_per), "bot" bot detection, "cs" sessions with a purchase
    rules: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {"k": self.key, "p": self.partition, "w": self.windows.to_obj(),
                               "l": self.life.to_obj(), "r": self.recent_ids}
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
        return orjson.dumps(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        o = orjson.loads(data)
        return cls(key=o["k"], partition=o.get("p", -1), user_id=o.get("u"), anonymous_id=o.get("a"),
                   windows=Windows.from_obj(o.get("w")), session=Session.from_obj(o.get("s")),
                   prev_session=Session.from_obj(o.get("ps")), cart=Cart.from_obj(o.get("c")),
                   life=Lifetime(*o["l"][:8]), traits=o.get("t", {}), recent_ids=o.get("r", []),
                   ml=o.get("m", {}), consent=o.get("co", {}), categories=o.get("cv", {}), rules=o.get("ru", {}))

    def profile(self, at_ms: int | None = None, engagement: EngagementConfig | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The summary served from Redis (``schemas/profile.v1.json``); ``engagement`` is the
        config the score was accumulated with (its half-life decays it to ``at_ms``); ``extra``
        holds what the engine computes from its models and population (``tier``, ``p_purchase``,
        ``conversion_user``: see :meth:`clickpulse.engine.Engine.profile_extra`)."""
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
        }


@dataclass
class Applied:
    """What one :func:`apply` call did."""

    duplicate: bool = False
    late: bool = False
    session_started: bool = False


def _short_id(event_id: str) -> str:
    return base64.b64encode(hashlib.blake2b(event_id.encode(), digest_size=9).digest()).decode()


def is_duplicate(st: UserState, event: dict[str, Any]) -> bool:
    """True when the event's id is among the user's recent ids (it would change nothing)."""
    return _short_id(event["event_id"]) in st.recent_ids


def _in_session(s: Session, t: int, gap: int) -> bool:
    return s.start_ms - gap < t < s.last_ms + gap


MAX_SESSION_PRODUCTS = 32


#: Page type of an event without ``properties.page_type``.
PAGE_TYPES = {"page_view": "page", "product_view": "product", "add_to_cart": "cart", "remove_from_cart": "cart",
              "checkout_start": "checkout", "purchase": "confirmation", "search": "search"}
MAX_PATH = 16
MAX_CATEGORIES = 16


def page_type(etype: str, props: dict[str, Any] | None) -> str | None:
    """The page type of an event: ``properties.page_type`` (a string, at most 64 characters), else
    :data:`PAGE_TYPES` of its type, else ``None`` (scroll, dwell, identify... keep the page)."""
    pt = (props or {}).get("page_type")
    if isinstance(pt, str) and pt:
        return pt[:64]
    return PAGE_TYPES.get(etype)


def _extend(s: Session, t: int, etype: str, props: dict[str, Any] | None = None, gap: int = 1_800_000) -> None:
    if t >= s.last_ms:  # in order: credit the time since the previous event to its page type
        if s.events and s.last_page is not None and t > s.last_ms:
            s.page_dwell_ms[s.last_page] = s.page_dwell_ms.get(s.last_page, 0) + min(t - s.last_ms, gap)
        pt = page_type(etype, props)
        if pt is not None:
            s.last_page = pt
        if len(s.path) < MAX_PATH and (not s.path or s.path[-1] != etype):
            s.path.append(etype)
        s.last_type = etype
    s.start_ms = min(s.start_ms, t)
    s.last_ms = max(s.last_ms, t)
    s.events += 1
    s.counts[etype] = s.counts.get(etype, 0) + 1
    if props:
        pid = props.get("product_id")
        if pid is not None and len(s.products) < MAX_SESSION_PRODUCTS and str(pid) not in s.products:
            s.products.append(str(pid))
        scroll = props.get("scroll_pct")
        if isinstance(scroll, int | float) and scroll > s.max_scroll_pct:
            s.max_scroll_pct = float(scroll)
        dwell = props.get("dwell_ms")
        if isinstance(dwell, int) and dwell > 0:
            s.dwell_ms += dwell


def _apply_session(st: UserState, t: int, etype: str, gap: int, props: dict[str, Any] | None = None) -> bool:
    """Assign the event to a session; return True when it started a new one."""
    cur = st.session
    if cur is None:
        st.session = Session(t, t)
        _extend(st.session, t, etype, props, gap)
        return True
    if _in_session(cur, t, gap):
        _extend(cur, t, etype, props, gap)
        return False
    if t >= cur.last_ms + gap:
        st.prev_session = cur
        st.session = Session(t, t)
        _extend(st.session, t, etype, props, gap)
        return True
    prev = st.prev_session  # t <= cur.start - gap: an earlier session
    if prev is not None and _in_session(prev, t, gap):
        _extend(prev, t, etype, props, gap)
        return False
    if prev is None or t >= prev.last_ms + gap:
        st.prev_session = Session(t, t)
        _extend(st.prev_session, t, etype, props, gap)
    return True


def _props(event: dict[str, Any]) -> dict[str, Any]:
    p = event.get("properties")
    return p if isinstance(p, dict) else {}


def _apply_cart(cart: Cart, event: dict[str, Any], t: int) -> None:
    etype = event["type"]
    props = _props(event)
    if etype == "add_to_cart" or etype == "remove_from_cart":
        if cart.closed_ms is not None and t <= cart.closed_ms:
            return  # arrived after a purchase that already settled it: same result in any order
        pid = str(props.get("product_id", "unknown"))
        qty = props.get("quantity")
        qty = 1 if qty is None else int(qty)
        if etype == "add_to_cart":
            if qty <= 0:
                return
            item = cart.items.get(pid)
            if item is None:
                cart.items[pid] = CartItem(qty, props.get("price"), t, props.get("category"), [[t, qty]])
            else:
                item.lots.append([t, qty])
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
    else:
        return


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
    sid = _short_id(event["event_id"])
    if sid in st.recent_ids:
        return Applied(duplicate=True)
    st.recent_ids.append(sid)
    if len(st.recent_ids) > cfg.dedup_ids_per_user:
        del st.recent_ids[: len(st.recent_ids) - cfg.dedup_ids_per_user]
    t = int(event["timestamp_ms"])
    etype = event["type"]
    res = Applied()
    res.late = watermark_ms is not None and t < watermark_ms
    if not res.late:
        st.windows.add(etype, t)
    if event.get("user_id") and st.user_id is None:
        st.user_id = event["user_id"]
    if event.get("anonymous_id") and st.anonymous_id is None:
        st.anonymous_id = event["anonymous_id"]
    res.session_started = _apply_session(st, t, etype, cfg.session_gap_ms, _props(event))
    if res.session_started:
        st.life.sessions += 1
    _apply_cart(st.cart, event, t)
    life = st.life
    if wall_ms is not None and (life.last_ms is None or t >= life.last_ms):
        life.last_wall_ms = wall_ms
    life.first_ms = t if life.first_ms is None else min(life.first_ms, t)
    life.last_ms = t if life.last_ms is None else max(life.last_ms, t)
    life.events += 1
    props = _props(event)
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
    st.ml["en"] = engagement_update(st.ml.get("en", {}), event, cfg.engagement) or st.ml.get("en", {})
    if not st.ml["en"]:
        del st.ml["en"]
    ctx = event.get("context") if isinstance(event.get("context"), dict) else {}
    for k in ("device", "country"):
        if isinstance(ctx.get(k), str):
            st.traits[k] = ctx[k]
    if etype == "consent" and isinstance(props.get("consent"), dict):
        for purpose, granted in list(props["consent"].items())[:16]:
            if isinstance(granted, bool) and len(str(purpose)) <= 64:
                prev = st.consent.get(str(purpose))
                if prev is None or t >= prev[1]:
                    st.consent[str(purpose)] = [granted, t]
    if etype == "product_view" and not res.late and isinstance(props.get("category"), str) and props["category"]:
        _count_category(st.categories, props["category"][:256], t)
    if etype == "identify" and isinstance(props.get("traits"), dict):
        for k, v in list(props["traits"].items())[:16]:
            if isinstance(v, str | int | float | bool) and len(str(k)) <= 64:
                st.traits[str(k)] = v if not isinstance(v, str) else v[:256]
    return res


def _count_category(cats: dict[str, list[list[int]]], category: str, t: int) -> None:
    day = t // 86_400_000
    days = cats.setdefault(category, [])
    if days and days[-1][0] == day:
        days[-1][1] += 1
    else:
        days.append([day, 1])
        days.sort()
        del days[: max(0, len(days) - 7)]
    if len(cats) > MAX_CATEGORIES:  # forget the category viewed least recently
        del cats[min(cats, key=lambda c: cats[c][-1][0] if cats[c] else -1)]


def category_views(st: UserState, at_ms: int, days: int = 7) -> dict[str, int]:
    """Product views per category over the UTC day of ``at_ms`` and the ``days - 1`` before it.

    >>> st = UserState("u"); _count_category(st.categories, "shoes", 0); _count_category(st.categories, "shoes", 1)
    >>> category_views(st, 3 * 86_400_000), category_views(st, 7 * 86_400_000)
    ({'shoes': 2}, {})
    """
    today = at_ms // 86_400_000
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
