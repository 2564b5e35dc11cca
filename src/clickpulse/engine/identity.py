"""Identity stitching: routing of link events and the merge of a guest's state into a customer's.

Pure and broker-free (the engine calls it; the design is in ``docs/identity.md``).

Keys
----
A *guest* is an anonymous key ``"anon:" + anonymous_id``; a *customer* is a user-id key
(``user_id``). A *link event* names both:

* ``identify`` with ``user_id`` and ``anonymous_id``: guest ``anon:<anonymous_id>`` → customer
  ``<user_id>``;
* ``alias`` (Segment's ``previousId`` → ``previous_id``; the contract copies it to
  ``anonymous_id`` when the message has none) with ``user_id`` and ``previous_id`` equal to
  ``anonymous_id``: guest ``anon:<previous_id>`` → customer ``<user_id>``. An alias whose
  ``previous_id`` differs from its ``anonymous_id`` renames one customer id into another; that
  is not a guest link and is applied as a plain event of ``user_id`` (counted
  ``clickpulse_identity_links_total{outcome="unsupported"}``).

Only guests are ever merged and only customers receive merges, so forwarding never chains and
never loops. A ``user_id`` starting with ``anon:`` (it would share the guest key space) never
links.

Flow
----
1. Ingest (:func:`route`) keys a link event by its **guest** key (``user_key`` = guest key).
2. The guest's partition applies it to the guest's state like any event of the guest, then
   turns the state into a *forwarding stub* (``UserState.merged_into`` = customer; identifiers
   and recent event ids only, durable like the dormant record) and emits a merge record
   (:class:`clickpulse.records.MergeRecord`, topic ``<ns>.identity``, keyed by the customer)
   carrying the guest's serialized state.
3. The customer's partition merges it once (:func:`merge_into`; ``UserState.merged`` remembers
   ``[guest_key, link_event_id]``).
4. An event that reaches a stub is forwarded: re-keyed to the customer (``user_key`` = customer)
   and published on the valid topic. A link event that reaches a stub is forwarded too (same
   customer: a repeated link; another customer: a *conflict*, first link wins, counted, no
   state moves) and applied there as a plain ``identify`` of its ``user_id``.

The merge (:func:`merge_into`) is commutative in what it keeps, so the result does not depend on
whether the merge record reaches the customer before or after the customer's own events
(see the rules in its docstring).
"""

from __future__ import annotations

import copy
from typing import Any

from ..features.engagement import EngagementConfig
from ..state.user import (
    MAX_CATEGORIES,
    MAX_PATH,
    MAX_SESSION_PRODUCTS,
    Cart,
    CartItem,
    Lifetime,
    Lot,
    RecentIds,
    Session,
    UserState,
)
from ..state.windows import _bump

GUEST_PREFIX = "anon:"
#: link event types
LINK_TYPES = frozenset({"identify", "alias"})
#: guests remembered per customer in ``UserState.merged`` (the oldest forgotten beyond)
MAX_MERGED = 64
#: ring sizes of :class:`clickpulse.state.windows.Windows` (minutes, hours, days kept)
_RING_KEEP = (60, 24, 7)
#: days of category views kept per category (as :func:`clickpulse.state.user._count_category`)
_CATEGORY_DAYS = 7


def link_keys(event: dict[str, Any]) -> tuple[str, str] | None:
    """``(guest_key, customer_key)`` of a link event (see the module docstring), else ``None``.

    >>> link_keys({"type": "identify", "user_id": "c-5", "anonymous_id": "g-77"})
    ('anon:g-77', 'c-5')
    >>> link_keys({"type": "alias", "user_id": "c-5", "anonymous_id": "g-77", "previous_id": "g-77"})
    ('anon:g-77', 'c-5')
    >>> link_keys({"type": "alias", "user_id": "c-5", "anonymous_id": "g-77", "previous_id": "c-4"}) is None
    True
    >>> link_keys({"type": "page_view", "user_id": "c-5", "anonymous_id": "g-77"}) is None
    True
    """
    etype = event.get("type")
    if etype not in LINK_TYPES:
        return None
    uid, aid = event.get("user_id"), event.get("anonymous_id")
    if not isinstance(uid, str) or not isinstance(aid, str) or not uid or not aid or uid.startswith(GUEST_PREFIX):
        return None
    if etype == "alias":
        prev = event.get("previous_id")
        if prev is not None and prev != aid:
            return None
    return GUEST_PREFIX + aid, uid


def unsupported_alias(event: dict[str, Any]) -> bool:
    """An ``alias`` that is not a guest link (a customer id renamed into another)."""
    return event.get("type") == "alias" and link_keys(event) is None


def route_key(event: dict[str, Any]) -> str:
    """The key an ingested event is processed under: a link event's guest key, else its ``user_key``."""
    link = link_keys(event)
    return event["user_key"] if link is None else link[0]


def route(event: dict[str, Any]) -> dict[str, Any]:
    """Key a freshly ingested event for processing (in place): a link event gets its guest key
    as ``user_key`` (the guest's partition links it first). Returns ``event``."""
    link = link_keys(event)
    if link is not None:
        event["user_key"] = link[0]
    return event


def is_stub(st: UserState) -> bool:
    """A guest's forwarding stub."""
    return st.merged_into is not None


def stub(g: UserState, customer: str, partition: int) -> UserState:
    """The forwarding stub left on the guest's key: identifiers, the recent event ids (replays of
    the guest's events are recognised as duplicates) and the first/last event times (for the
    dormant retention); everything else moved to the customer."""
    life = Lifetime(first_ms=g.life.first_ms, last_ms=g.life.last_ms, last_wall_ms=g.life.last_wall_ms)
    return UserState(key=g.key, partition=partition, anonymous_id=g.anonymous_id, life=life,
                     recent_ids=RecentIds(g.recent_ids.blob), merged_into=customer)


def already_merged(c: UserState, guest_key: str, link_event_id: str) -> bool:
    """This merge (guest and link event) was applied to ``c`` before."""
    return [guest_key, link_event_id] in c.merged


# --------------------------------------------------------------------------- the merge
def _merge_windows(c: UserState, g: UserState) -> None:
    types = c.windows.types
    for code, per in g.windows.types.items():
        mine = types.get(code)
        if mine is None:
            types[code] = [dict(r) for r in per]
            continue
        for pos, keep in enumerate(_RING_KEEP):
            for i, n in sorted(per[pos].items()):
                _bump(mine[pos], i, n, keep)


def _combine(a: Session, b: Session) -> Session:
    """One session from two that are less than a gap apart (``a`` starts first)."""
    late = a if (a.last_ms, 1) >= (b.last_ms, 0) else b
    counts = dict(a.counts)
    for k, n in b.counts.items():
        counts[k] = counts.get(k, 0) + n
    products = list(a.products)
    for p in b.products:
        if len(products) >= MAX_SESSION_PRODUCTS:
            break
        if p not in products:
            products.append(p)
    dwell = dict(a.page_dwell_ms)
    for k, ms in b.page_dwell_ms.items():
        dwell[k] = dwell.get(k, 0) + ms
    path: list[str] = []
    for x in list(a.path) + list(b.path):
        if len(path) >= MAX_PATH:
            break
        if not path or path[-1] != x:
            path.append(x)
    return Session(start_ms=min(a.start_ms, b.start_ms), last_ms=max(a.last_ms, b.last_ms),
                   events=a.events + b.events, counts=counts, products=products,
                   max_scroll_pct=max(a.max_scroll_pct, b.max_scroll_pct), dwell_ms=a.dwell_ms + b.dwell_ms,
                   ended=a.ended and b.ended, sid=min(a.sid, b.sid), page_dwell_ms=dwell,
                   last_page=late.last_page, path=path, last_type=late.last_type)


def _merge_sessions(c: UserState, g: UserState, gap_ms: int) -> dict[int, int]:
    """Sessions of both, those less than a gap apart joined (event-time rule of
    :mod:`clickpulse.state.user`); the two latest are kept. Adjusts the lifetime session and
    converted-session counts; returns the old -> new session ids."""
    parts = [(s.start_ms, s.last_ms, tag, s) for tag, st in ((0, c), (1, g))
             for s in (st.session, st.prev_session) if s is not None]
    parts.sort(key=lambda x: (x[0], x[1], x[2]))
    groups: list[list[Session]] = []
    for _start, _last, _tag, s in parts:
        if groups and s.start_ms < max(x.last_ms for x in groups[-1]) + gap_ms:
            groups[-1].append(s)
        else:
            groups.append([s])
    sid_map: dict[int, int] = {}
    merged: list[Session] = []
    joined = converted_joined = 0
    for grp in groups:
        s = grp[0]
        if len(grp) > 1:
            s = copy.deepcopy(s)
            for other in grp[1:]:
                s = _combine(s, other)
            joined += len(grp) - 1
            bought = sum(1 for x in grp if x.counts.get("purchase", 0) > 0)
            converted_joined += max(0, bought - 1)
        for x in grp:
            sid_map[x.sid] = s.sid
        merged.append(s)
    c.session = merged[-1] if merged else None
    c.prev_session = merged[-2] if len(merged) > 1 else None
    c.life.sessions = max(0, c.life.sessions + g.life.sessions - joined)
    c.life.converted_sessions = max(0, c.life.converted_sessions + g.life.converted_sessions - converted_joined)
    return sid_map


def _merge_cart(c: Cart, g: Cart) -> None:
    """Items of both (units kept by when they were added), then every unit added at or before
    the latest purchase of either is settled: the guest's units added before the customer's
    purchase count as bought, whatever the arrival order."""
    for pid, item in g.items.items():
        mine = c.items.get(pid)
        lots = [Lot(x.added_ms, x.quantity) for x in item.lots]
        if mine is None:
            c.items[pid] = CartItem(item.quantity, item.price, item.added_ms, item.category, lots)
        else:
            mine.lots = sorted(mine.lots + lots)
            mine.quantity = sum(x.quantity for x in mine.lots)
            if item.added_ms > mine.added_ms and item.price is not None:
                mine.price = item.price
            mine.added_ms = max(mine.added_ms, item.added_ms)
            mine.category = mine.category or item.category
    c.currency = c.currency or g.currency
    for attr in ("updated_ms", "closed_ms"):
        vals = [v for v in (getattr(c, attr), getattr(g, attr)) if v is not None]
        setattr(c, attr, max(vals) if vals else None)
    if c.closed_ms is not None:
        for pid, item in list(c.items.items()):
            item.settle(c.closed_ms)
            if item.quantity <= 0:
                del c.items[pid]


def _merge_trigger(a: dict[str, Any], b: dict[str, Any], sid_map: dict[int, int]) -> dict[str, Any]:
    """One trigger's state from the customer's (``a``) and the guest's (``b``), as if one user
    had sent both event streams: the latest B (``b``) answers every A at or before it; the
    episode is the side's with the latest A (if after that B), its timer with it; cooldown and
    once_per history: the latest firing, the firings added up."""
    out = dict(b)
    out.update(a)  # anything not handled below: the customer's
    bs = [x["b"] for x in (a, b) if x.get("b") is not None]
    last_b = max(bs) if bs else None
    if last_b is not None:
        out["b"] = last_b
    src = max((x for x in (a, b) if x.get("a") is not None), key=lambda x: x["a"], default=None)
    for k in ("e", "a", "due", "fe"):
        out.pop(k, None)
    if src is not None and (last_b is None or src["a"] > last_b):
        out["a"] = src["a"]
        es = [x["e"] for x in (a, b) if x.get("e") is not None and x.get("a") is not None
              and (last_b is None or x["a"] > last_b) and (last_b is None or x["e"] > last_b)]
        out["e"] = min(es) if es else src.get("e", src["a"])
        if src.get("due") is not None:
            out["due"] = src["due"]
        if src.get("fe") is not None and src.get("fe") == src.get("e") and out["e"] == src.get("e"):
            out["fe"] = src["fe"]
    fes = [x["fe"] for x in (a, b) if x.get("fe") is not None]
    if "fe" not in out and fes:
        out["fe"] = max(fes)
    lfs = [x for x in (a, b) if x.get("lf") is not None]
    if lfs:
        last = max(lfs, key=lambda x: x["lf"])
        out["lf"] = last["lf"]
        if last.get("ls") is not None:
            out["ls"] = sid_map.get(last["ls"], last["ls"])
    n = int(a.get("n", 0)) + int(b.get("n", 0))
    if n:
        out["n"] = n
    if a.get("m") or b.get("m"):
        out["m"] = 1
    return out


def _merge_rules(c: UserState, g: UserState, sid_map: dict[int, int]) -> None:
    cr, gr = c.rules, g.rules
    gt = gr.get("t") or {}
    ct = cr.get("t") or {}
    for name in list(ct):
        if name not in gt and ct[name].get("ls") is not None:
            ct[name]["ls"] = sid_map.get(ct[name]["ls"], ct[name]["ls"])
    if gt:
        ct = cr.setdefault("t", {})
        for name, ts in gt.items():
            ct[name] = _merge_trigger(ct.get(name, {}), ts, sid_map)
    held = gr.get("held")
    if held:  # decided for the guest, not yet published: now the customer's
        out = cr.setdefault("held", [])
        for due, action in held:
            out.append([due, {**action, "user_key": c.key, "user_id": c.user_id}])
        out.sort(key=lambda h: (h[0], h[1].get("action_id", "")))
    gbot = gr.get("bot") or {}
    if "flag" in gbot and "flag" not in cr.get("bot", {}):  # a bot on either key is a bot
        bot = cr.setdefault("bot", {})
        bot["flag"] = gbot["flag"]
        if "at" in gbot:
            bot["at"] = gbot["at"]
    # segment membership ("seg", "cv") stays the customer's: the guest left its segments when it
    # became a stub, and the customer's is re-evaluated at its next event or timer


def _merge_engagement(a: dict[str, Any] | None, b: dict[str, Any] | None, cfg: EngagementConfig) -> dict[str, Any] | None:
    """Both scores brought to the later time (exponential decay, half-life ``cfg``) and added."""
    if not b:
        return a
    if not a:
        return dict(b)
    t = max(int(a["t"]), int(b["t"]))
    fa = 2.0 ** (-(t - int(a["t"])) / cfg.half_life_ms)
    fb = 2.0 ** (-(t - int(b["t"])) / cfg.half_life_ms)
    contrib: dict[str, float] = {}
    for src, f in ((a, fa), (b, fb)):
        for s, v in src["c"].items():
            contrib[s] = contrib.get(s, 0.0) + float(v) * f
    total = 0.0
    for v in contrib.values():
        total += v
    return {"t": t, "v": total, "c": contrib}


def _merge_ml(c: UserState, g: UserState, sid_map: dict[int, int], cfg: EngagementConfig,
              pending_per_user: int) -> int:
    """Returns the pending predictions dropped (beyond ``pending_per_user``, or the earlier of
    two pending churn predictions)."""
    cm, gm = c.ml, g.ml
    dropped = 0
    en = _merge_engagement(cm.get("en"), gm.get("en"), cfg)
    if en:
        cm["en"] = en
    pi = [[sid_map.get(p[0], p[0]), *p[1:]] for p in cm.get("pi", []) + gm.get("pi", [])]
    if pi:
        pi.sort(key=lambda p: (p[1], p[0]))
        if len(pi) > pending_per_user:
            dropped += len(pi) - pending_per_user
            del pi[:len(pi) - pending_per_user]
        cm["pi"] = pi
    pcs = [p for p in (cm.get("pc"), gm.get("pc")) if p is not None]
    if pcs:
        cm["pc"] = max(pcs, key=lambda p: p[0])  # the customer's on a tie (max keeps the first)
        dropped += len(pcs) - 1
    if gm.get("sc"):
        cm["sc"] = {**gm["sc"], **cm.get("sc", {})}
    for k in ("hi", "cr"):
        vals = [v for v in (cm.get(k), gm.get(k)) if v is not None]
        if vals:
            cm[k] = max(sid_map.get(v, v) if k == "hi" else v for v in vals)
    return dropped


def _merge_categories(c: dict[str, list[list[int]]], g: dict[str, list[list[int]]]) -> None:
    for cat, days in g.items():
        mine = {d: n for d, n in c.get(cat, [])}
        for d, n in days:
            mine[d] = mine.get(d, 0) + n
        c[cat] = [[d, mine[d]] for d in sorted(mine)][-_CATEGORY_DAYS:]
    while len(c) > MAX_CATEGORIES:  # forget the categories viewed least recently
        del c[min(c, key=lambda k: (c[k][-1][0] if c[k] else -1, k))]


def merge_into(c: UserState, g: UserState, link_event_id: str, *, gap_ms: int, dedup_ids: int,
               engagement: EngagementConfig, pending_per_user: int = 8) -> int:
    """Merge guest state ``g`` into customer state ``c`` (in place), once.

    As if one user had sent both event streams:

    * windows: bucket counts added; sessions: joined when less than ``gap_ms`` apart (the
      lifetime session and converted-session counts corrected), the two latest kept;
    * cart: items and their units added; the latest purchase of either settles every unit added
      at or before it (so a guest's items bought by the customer later are converted, in any
      arrival order); each timeout trigger: the latest answer (B) cancels every A at or before
      it, otherwise the latest A's episode and timer are kept (see ``_merge_trigger``); a
      guest's held marketing actions become the customer's;
    * engagement: both scores decayed to the later time and added; pending intent predictions:
      both (session ids remapped), the newest ``pending_per_user`` kept; pending churn
      prediction: the later one;
    * consent: per purpose, the decision with the later event time (the customer's on a tie);
      traits: those of the one with the later last event win, the other fills gaps;
    * lifetime: first/last seen min/max, events, orders, revenue added; recent event ids: the
      customer's, then the guest's up to ``dedup_ids`` in all (the guest's own stay on its stub,
      where a re-read of the guest's input arrives);
    * ``c.merged`` records ``[g.key, link_event_id]`` (the newest :data:`MAX_MERGED`).

    Returns the pending predictions dropped (for ``clickpulse_predictions_dropped_total``).
    """
    sid_map = _merge_sessions(c, g, gap_ms)
    _merge_windows(c, g)
    _merge_cart(c.cart, g.cart)
    _merge_rules(c, g, sid_map)
    dropped = _merge_ml(c, g, sid_map, engagement, pending_per_user)
    for purpose, d in g.consent.items():
        mine = c.consent.get(purpose)
        if mine is None or d[1] > mine[1]:
            c.consent[purpose] = list(d)
    g_newer = (g.life.last_ms or 0) > (c.life.last_ms or 0)
    c.traits = {**c.traits, **g.traits} if g_newer else {**g.traits, **c.traits}
    _merge_categories(c.categories, g.categories)
    cl, gl = c.life, g.life
    if gl.first_ms is not None and (cl.first_ms is None or gl.first_ms < cl.first_ms):
        cl.first_ms = gl.first_ms
    if gl.last_ms is not None and (cl.last_ms is None or gl.last_ms > cl.last_ms):
        cl.last_ms, cl.last_wall_ms = gl.last_ms, gl.last_wall_ms
    cl.events += gl.events
    cl.orders += gl.orders
    cl.revenue += gl.revenue
    ids = RecentIds(g.recent_ids.blob)
    for h in c.recent_ids:
        if h not in ids:
            ids.add(h, dedup_ids)
    c.recent_ids = RecentIds(ids.blob[-(dedup_ids << 3):]) if dedup_ids > 0 else RecentIds()
    if c.anonymous_id is None:
        c.anonymous_id = g.anonymous_id
    c.merged.append([g.key, link_event_id])
    del c.merged[:-MAX_MERGED]
    return dropped
