"""The feature extractor: a user's state at an event time -> ``dict[str, float]``.

Heavy-tailed counts and durations are log-scaled with ``log1p`` (noted ``log1p`` below), so a
linear model sees comparable ranges. All features are floats rounded to 4 decimals (the
stored predictions stay small) and always present (0.0 when there is nothing to count).

=============================  =================================================================
feature                        meaning (unit)
=============================  =================================================================
``s_events``                   log1p(events in the current session)
``s_<type>``                   log1p(session count of a canonical type: page_view, product_view,
                               add_to_cart, remove_from_cart, checkout_start, search, scroll_depth)
``s_duration``                 log1p(session duration, seconds: first to last event)
``s_age``                      log1p(seconds from session start to the scoring time)
``s_products``                 log1p(distinct products seen in the session)
``s_max_scroll``               max scroll depth in the session, fraction 0–1
``s_dwell``                    log1p(summed dwell in the session, seconds)
``cart_items``                 log1p(units in the cart)
``cart_value``                 log1p(cart value, in the cart's currency)
``recency_days``               log1p(days from the previous session's last event to this
                               session's start); 0 for a first session
``frequency``                  log1p(lifetime sessions − 1)
``orders``                     log1p(lifetime orders)
``monetary``                   log1p(lifetime revenue)
``returning``                  1.0 when the user had an earlier session or order, else 0.0
``tenure_days``                log1p(days since first seen)
``w_product_view_1h``          log1p(product views in the last hour)
``w_add_to_cart_24h``          log1p(add_to_cart in the last 24 h)
``w_add_to_cart_7d``           log1p(add_to_cart in the last 7 days)
``w_purchase_7d``              log1p(purchases in the last 7 days)
``device_<d>``                 one-hot of the user's last device trait: desktop, mobile,
                               tablet, other (all 0.0 when unknown)
=============================  =================================================================

Examples
--------
>>> from clickpulse.testing import event
>>> from clickpulse.state.user import StateConfig, UserState, apply
>>> st = UserState(key="u1")
>>> _ = apply(st, event("product_view", product_id="p1", at="2019-10-01T10:00:00Z"), None, StateConfig())
>>> _ = apply(st, event("add_to_cart", product_id="p1", price=9.0, at="2019-10-01T10:02:00Z"), None, StateConfig())
>>> x = features(st, st.life.last_ms)
>>> round(x["s_duration"], 3), x["returning"], round(x["cart_value"], 3)
(4.796, 0.0, 2.303)
"""

from __future__ import annotations

from math import log1p

from ..state.user import UserState

SESSION_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start",
                 "search", "scroll_depth")
DAY_MS = 86_400_000


DEVICES = ("desktop", "mobile", "tablet")


def features(st: UserState, at_ms: int) -> dict[str, float]:
    """Features of ``st`` as of event time ``at_ms`` (epoch ms). Pure; never raises on a valid state.

    Every feature is always present (0.0 when there is nothing to count): River's
    ``StandardScaler`` only tracks keys it sees, so a key written only when non-zero would be
    standardized against its non-zero values alone, and a one-hot key seen only as 1.0 would
    always scale to 0.
    """
    x: dict[str, float] = {}
    s = st.session
    x["s_events"] = log1p(s.events) if s else 0.0
    for t in SESSION_TYPES:
        x[f"s_{t}"] = log1p(s.counts.get(t, 0)) if s else 0.0
    x["s_duration"] = log1p(s.duration_ms / 1000) if s else 0.0
    x["s_age"] = log1p(max(0, at_ms - s.start_ms) / 1000) if s else 0.0
    x["s_products"] = log1p(len(s.products)) if s else 0.0
    x["s_max_scroll"] = s.max_scroll_pct / 100 if s else 0.0
    x["s_dwell"] = log1p(s.dwell_ms / 1000) if s else 0.0
    prev = st.prev_session
    x["recency_days"] = log1p((s.start_ms - prev.last_ms) / DAY_MS) \
        if s is not None and prev is not None and prev.last_ms < s.start_ms else 0.0
    units = sum(i.quantity for i in st.cart.items.values())
    x["cart_items"] = log1p(units)
    x["cart_value"] = log1p(st.cart.value) if units else 0.0
    life = st.life
    x["frequency"] = log1p(max(0, life.sessions - 1))
    x["orders"] = log1p(life.orders)
    x["monetary"] = log1p(max(0.0, life.revenue))
    x["returning"] = 1.0 if life.sessions > 1 or life.orders > 0 else 0.0
    x["tenure_days"] = log1p(max(0, at_ms - life.first_ms) / DAY_MS) if life.first_ms is not None else 0.0
    w = st.windows
    for name, etype, span in (("w_product_view_1h", "product_view", "1h"), ("w_add_to_cart_24h", "add_to_cart", "24h"),
                              ("w_add_to_cart_7d", "add_to_cart", "7d"), ("w_purchase_7d", "purchase", "7d")):
        x[name] = log1p(w.count(etype, span, at_ms))
    device = st.traits.get("device")
    device = device.lower() if isinstance(device, str) else ""
    for d in DEVICES:
        x[f"device_{d}"] = 1.0 if device == d else 0.0
    x["device_other"] = 1.0 if device and device not in DEVICES else 0.0
    # 4 decimals: far below the models' sensitivity, and stored predictions stay small
    return {k: round(v, 4) for k, v in x.items()}


FEATURE_NAMES: tuple[str, ...] = (
    "s_events", *(f"s_{t}" for t in SESSION_TYPES), "s_duration", "s_age", "s_products", "s_max_scroll",
    "s_dwell", "recency_days", "cart_items", "cart_value", "frequency", "orders", "monetary", "returning",
    "tenure_days", "w_product_view_1h", "w_add_to_cart_24h", "w_add_to_cart_7d", "w_purchase_7d",
    *(f"device_{d}" for d in DEVICES), "device_other")


def pack(x: dict[str, float]) -> list[float]:
    """Feature dict -> values in :data:`FEATURE_NAMES` order (how predictions are stored in a
    user's state: a list is a third of the size of the dict).

    >>> from math import isclose
    >>> unpack(pack({"orders": 1.5}))["orders"]
    1.5
    """
    return [x.get(name, 0.0) for name in FEATURE_NAMES]


def unpack(values: list[float]) -> dict[str, float]:
    """Inverse of :func:`pack`."""
    return dict(zip(FEATURE_NAMES, values, strict=False))
