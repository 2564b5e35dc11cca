"""Business metrics computed in the stream, from the engine step's output.

Fed with :attr:`clickpulse.engine.Emitted.observed` (the user's state just before and just after
each applied event, seen through :func:`user_view`, when ``Engine.observe_user = user_view``)
and the experiment counters of :attr:`Emitted.counters`. Pure and broker-free: no I/O, no wall
clock, no user id kept (only aggregates), memory bounded by the cohort caps.

Definitions (event time; a *session* is the engine's session window: events of one user with
gaps below ``CLICKPULSE_SESSION_GAP_S``, 30 min by default)
------------------------------------------------------------------------------------------------
``conversion_rate``
    sessions with at least one purchase / sessions (GA4's *session key event rate* with
    ``purchase`` as the key event).
``avg_session_duration_s``
    mean of (last event time - first event time) over sessions, in seconds; a one-event
    session lasts 0 s (Universal Analytics' *Avg. Session Duration* is measured the same way,
    between the first and the last hit).
``engagement_rate``
    engaged sessions / sessions. A session is **engaged** when it lasted 10 s or longer, had a
    key event (here: a purchase) or had 2 or more page or screen views (here ``page_view`` and
    ``product_view`` events) — Google Analytics 4, "[GA4] Engagement rate and bounce rate"
    (support.google.com/analytics/answer/12195621). GA4 measures the 10 s as foreground
    engagement time; clickpulse has event times only, so it uses the session's event-time span.
``clv``
    historical customer lifetime value: revenue so far / customers (users with at least one
    purchase). Revenue of a purchase is ``properties.revenue``, else ``price × quantity``
    (the engine's lifetime revenue). "Historical" as opposed to a predictive CLV (Gupta et al.,
    "Modeling Customer Lifetime Value", Journal of Service Research 9(2), 2006): nothing is
    forecast.
cohorts
    a user's **cohort** is the week (Monday 00:00 UTC, ISO 8601 week) of their first event.
    Per cohort: ``users``, ``customers``, ``revenue``, ``clv_per_user`` (cohort revenue / cohort
    users) and ``clv_per_customer``; ``retention[k]`` = share of the cohort's users with an
    event in week ``cohort + k`` (k = 0 is 1.0 by definition; the "classic" N-week retention of
    Amplitude's and Mixpanel's retention reports).
``lift``
    per experiment and variant: conversion rate of the variant's exposed users / that of the
    holdout - 1, from the experiment counters (``experiment_exposures`` and
    ``experiment_converters``, users with an attributed conversion; see docs/experiments.md).
``funnel``
    sessions that reached each step: ``product_view`` (or ``page_view``) → ``add_to_cart`` →
    ``checkout_start`` → ``purchase`` (a session counts at a step when it had an event of that
    type, whatever the order).

How the stream computes them exactly, in bounded memory
-------------------------------------------------------
Every session quantity above is monotone in the session's events, so each event adds
``contribution(session after) - contribution(session before)`` (sessions matched by the
engine's session id): a session counts once when it starts, its duration grows as it extends,
it becomes engaged or converted at most once. Activity in a week is new when the event's week
is later than the week of the user's latest event before it (the state's lifetime ``last``),
so a user counts once per week without any per-user memory here. Known approximations, all
from very late events: a late event that falls in an earlier week than the user's latest
event is not counted as activity in that week; two sessions merged by a late event stay
counted as two; an event that changes a user's first-seen week does not move them to the
earlier cohort.

Bounds: at most ``max_cohorts`` cohort weeks (the oldest dropped when a newer one appears) and
``max_weeks`` retention weeks per cohort; at most ``max_arms`` experiment arms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

#: one week in ms
WEEK_MS = 7 * 86_400_000
#: 1970-01-05 00:00 UTC, a Monday: weeks are counted from here
_MONDAY_MS = 4 * 86_400_000
#: the seconds of event-time span from which a session is engaged (GA4)
ENGAGED_DURATION_MS = 10_000
#: page and screen views (GA4's "2 or more page or screen views")
VIEW_TYPES = ("page_view", "product_view")
#: funnel steps and the event types that reach them (:func:`_session_view` reads these types)
FUNNEL = (("view", VIEW_TYPES), ("add_to_cart", ("add_to_cart",)), ("checkout", ("checkout_start",)),
          ("purchase", ("purchase",)))
HOLDOUT = "holdout"


class SessionView(NamedTuple):
    """What the metrics need of one session. :func:`user_view` builds plain tuples of this
    layout (cheaper on the worker's path); the names document the fields."""

    sid: int
    duration_ms: int
    views: int            # page and product views
    cart: bool            # had an add_to_cart
    checkout: bool        # had a checkout_start
    purchase: bool        # had a purchase


class UserView(NamedTuple):
    """What the metrics need of one user's state: lifetime first/last event time (ms, ``None``
    for a user without events), orders, revenue, and the user's last two sessions
    (:class:`SessionView` layout). Built as a plain tuple of this layout."""

    first_ms: int | None
    last_ms: int | None
    orders: int
    revenue: float
    sessions: tuple[tuple[int, int, int, bool, bool, bool], ...]


def _session_view(s: Any) -> tuple[int, int, int, bool, bool, bool]:
    g = s.counts.get
    return (s.sid, s.last_ms - s.start_ms, g("page_view", 0) + g("product_view", 0), g("add_to_cart", 0) > 0,
            g("checkout_start", 0) > 0, g("purchase", 0) > 0)


def user_view(st: Any) -> tuple[Any, ...]:
    """The :class:`UserView` (as a plain tuple) of a :class:`clickpulse.state.user.UserState`;
    set it as ``Engine.observe_user``."""
    life = st.life
    cur, prev = st.session, st.prev_session
    if prev is None:
        sessions: tuple[Any, ...] = () if cur is None else (_session_view(cur),)
    else:
        sessions = (_session_view(prev),) if cur is None else (_session_view(cur), _session_view(prev))
    return (life.first_ms, life.last_ms, life.orders, life.revenue, sessions)


def week_of(t_ms: int) -> int:
    """Week index of an event time (epoch ms): weeks start on Monday 00:00 UTC.

    >>> week_of(_MONDAY_MS), week_of(_MONDAY_MS - 1), week_of(_MONDAY_MS + WEEK_MS)
    (0, -1, 1)
    """
    return (t_ms - _MONDAY_MS) // WEEK_MS


def week_label(week: int) -> str:
    """The Monday (``YYYY-MM-DD``, UTC) that starts ``week``.

    >>> week_label(week_of(1569888000000))  # 2019-10-01, a Tuesday
    '2019-09-30'
    """
    return datetime.fromtimestamp((_MONDAY_MS + week * WEEK_MS) / 1000, tz=UTC).strftime("%Y-%m-%d")


def engaged(s: tuple[Any, ...]) -> bool:
    """GA4's engaged session (see the module docstring); ``s`` in :class:`SessionView` layout."""
    return s[1] >= ENGAGED_DURATION_MS or s[2] >= 2 or s[5]


def _steps(s: tuple[Any, ...]) -> tuple[bool, bool, bool, bool]:
    return (s[2] > 0, s[3], s[4], s[5])


@dataclass
class Cohort:
    """Aggregates of the users first seen in one week."""

    users: int = 0
    customers: int = 0
    revenue: float = 0.0
    active: list[int] = field(default_factory=list)  # users active in week k (k = 0 .. max_weeks-1)


@dataclass
class BusinessMetrics:
    """The running aggregates (see the module docstring for the definitions).

    Parameters
    ----------
    max_cohorts
        Cohort weeks kept (>= 1); the oldest is dropped when a newer one appears.
    max_weeks
        Retention weeks per cohort (k = 0 .. max_weeks - 1), >= 1.
    max_arms
        Experiment arms kept (further arms are ignored).
    """

    max_cohorts: int = 12
    max_weeks: int = 12
    max_arms: int = 64
    sessions: int = 0
    duration_ms: int = 0
    engaged_sessions: int = 0
    funnel: list[int] = field(default_factory=lambda: [0] * len(FUNNEL))
    users: int = 0
    customers: int = 0
    orders: int = 0
    revenue: float = 0.0
    cohorts: dict[int, Cohort] = field(default_factory=dict)
    arms: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # -> [exposed, converters]
    first_ms: int | None = None
    last_ms: int | None = None

    def __post_init__(self) -> None:
        if self.max_cohorts < 1 or self.max_weeks < 1:
            raise ValueError("max_cohorts and max_weeks must be >= 1")

    # -------------------------------------------------------------------------- updates
    def observe_emitted(self, em: Any) -> None:
        """Add one engine step's output (:class:`clickpulse.engine.Emitted`): its ``observed``
        views and its ``experiment_exposures`` / ``experiment_converters`` counters."""
        for before, after, t in em.observed:
            self.observe(before, after, t)
        for (name, labels), n in em.counters.items():
            if name in ("experiment_exposures", "experiment_converters") and len(labels) == 2 and n:
                self.observe_experiment(labels[0], labels[1], int(n) if name == "experiment_exposures" else 0,
                                        int(n) if name == "experiment_converters" else 0)

    def observe_experiment(self, experiment: str, variant: str, exposed: int = 0, converters: int = 0) -> None:
        """Count ``exposed`` users and ``converters`` (users with a first attributed
        conversion) of one experiment arm."""
        key = (experiment, variant)
        row = self.arms.get(key)
        if row is None:
            if len(self.arms) >= self.max_arms:
                return
            row = self.arms[key] = [0, 0]
        row[0] += exposed
        row[1] += converters

    def _cohort(self, week: int) -> Cohort | None:
        c = self.cohorts.get(week)
        if c is not None:
            return c
        if len(self.cohorts) >= self.max_cohorts:
            oldest = min(self.cohorts)
            if week < oldest:
                return None  # older than every cohort kept
            del self.cohorts[oldest]
        c = self.cohorts[week] = Cohort(active=[0] * self.max_weeks)
        return c

    def observe(self, before: tuple[Any, ...] | None, after: tuple[Any, ...], t_ms: int) -> None:
        """Add one applied event: the user's :class:`UserView` before and after it, and its
        event time (ms)."""
        if self.first_ms is None or t_ms < self.first_ms:
            self.first_ms = t_ms
        if self.last_ms is None or t_ms > self.last_ms:
            self.last_ms = t_ms
        old = () if before is None else before[4]
        funnel = self.funnel
        for s in after[4]:
            p = None
            for o in old:
                if o[0] == s[0]:
                    p = o
                    break
            if p is None:
                self.sessions += 1
                self.duration_ms += s[1]
                self.engaged_sessions += engaged(s)
                for i, reached in enumerate(_steps(s)):
                    funnel[i] += reached
            elif p != s:
                self.duration_ms += s[1] - p[1]
                self.engaged_sessions += engaged(s) - engaged(p)
                for i, (a, b) in enumerate(zip(_steps(p), _steps(s), strict=True)):
                    funnel[i] += b - a
        first_ms = after[0]
        new_user = before is None or before[0] is None
        b_orders, b_revenue = (0, 0.0) if before is None else (before[2], before[3])
        revenue = after[3] - b_revenue
        orders = after[2] - b_orders
        new_customer = orders > 0 and b_orders == 0
        self.users += new_user
        self.orders += orders
        self.revenue += revenue
        self.customers += new_customer
        if first_ms is None:
            return
        cw = (first_ms - _MONDAY_MS) // WEEK_MS
        c = self._cohort(cw) if new_user else self.cohorts.get(cw)
        if c is None:
            return
        if revenue:
            c.revenue += revenue
        c.customers += new_customer
        if new_user:
            c.users += 1
            c.active[0] += 1
            return
        prev = before[1]  # type: ignore[index]
        if prev is not None and t_ms > prev:
            w = (t_ms - _MONDAY_MS) // WEEK_MS
            if w > (prev - _MONDAY_MS) // WEEK_MS:
                k = w - cw
                if 0 < k < self.max_weeks:
                    c.active[k] += 1

    # -------------------------------------------------------------------------- results
    def snapshot(self) -> dict[str, Any]:
        """The metrics as plain data (JSON-serializable; ratios ``None`` when undefined).

        Keys: ``sessions``, ``conversion_rate``, ``avg_session_duration_s``, ``engaged_sessions``,
        ``engagement_rate``, ``users``, ``customers``, ``orders``, ``revenue``, ``clv``,
        ``funnel`` (``[{step, sessions}]``), ``cohorts`` (``[{cohort, users, customers, revenue,
        clv_per_user, clv_per_customer, active, retention}]``, oldest first), ``experiments``
        (``[{experiment, variant, exposed, converters, conversion_rate, lift}]``),
        ``first_event_ms``, ``last_event_ms``, ``definitions`` (text).
        """
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        conv = self.funnel[-1]
        cohorts = []
        for w in sorted(self.cohorts):
            c = self.cohorts[w]
            # weeks the stream has reached: a week after the last event is not a 0 % retention
            reached = 0 if self.last_ms is None else min(self.max_weeks, week_of(self.last_ms) - w + 1)
            cohorts.append({"cohort": week_label(w), "users": c.users, "customers": c.customers,
                            "revenue": round(c.revenue, 2), "clv_per_user": ratio(c.revenue, c.users),
                            "clv_per_customer": ratio(c.revenue, c.customers),
                            "active": c.active[:reached],
                            "retention": [ratio(a, c.users) for a in c.active[:reached]]})
        rates = {k: ratio(v[1], v[0]) for k, v in self.arms.items()}
        exps = []
        for (e, v), (n, x) in sorted(self.arms.items()):
            base = rates.get((e, HOLDOUT))
            r = rates[(e, v)]
            lift = None if v == HOLDOUT or not base or r is None else r / base - 1
            exps.append({"experiment": e, "variant": v, "exposed": n, "converters": x, "conversion_rate": r,
                         "lift": lift})
        return {
            "sessions": self.sessions, "converted_sessions": conv,
            "conversion_rate": ratio(conv, self.sessions),
            "avg_session_duration_s": ratio(self.duration_ms / 1000, self.sessions),
            "engaged_sessions": self.engaged_sessions,
            "engagement_rate": ratio(self.engaged_sessions, self.sessions),
            "users": self.users, "customers": self.customers, "orders": self.orders,
            "revenue": round(self.revenue, 2), "clv": ratio(self.revenue, self.customers),
            "funnel": [{"step": step, "sessions": n} for (step, _t), n in zip(FUNNEL, self.funnel, strict=True)],
            "cohorts": cohorts, "experiments": exps,
            "first_event_ms": self.first_ms, "last_event_ms": self.last_ms,
        }


class BusinessGauges:
    """The Prometheus gauges of :class:`BusinessMetrics` (``clickpulse_business_*``; labels are
    funnel steps, cohort weeks, week offsets and experiment arms — never a user).

    Counts are this worker's (its partitions, since it started); add the count gauges over
    workers and divide for a cluster-wide ratio (``sum(clickpulse_business_converted_sessions) /
    sum(clickpulse_business_sessions)``).
    """

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Gauge

        r = registry
        p = "clickpulse_business_"
        self.plain = {
            "sessions": Gauge(p + "sessions", "Sessions started (event time)", registry=r),
            "converted_sessions": Gauge(p + "converted_sessions", "Sessions with a purchase", registry=r),
            "conversion_rate": Gauge(p + "conversion_rate", "Sessions with a purchase / sessions", registry=r),
            "avg_session_duration_s": Gauge(p + "avg_session_duration_seconds",
                                            "Mean session duration, first to last event (event time)", registry=r),
            "engaged_sessions": Gauge(p + "engaged_sessions", "Engaged sessions (GA4: >= 10 s, a purchase or "
                                      ">= 2 page/product views)", registry=r),
            "engagement_rate": Gauge(p + "engagement_rate", "Engaged sessions / sessions", registry=r),
            "customers": Gauge(p + "customers", "Users with at least one purchase", registry=r),
            "revenue": Gauge(p + "revenue", "Purchase revenue (currency of the events)", registry=r),
            "clv": Gauge(p + "clv", "Historical customer lifetime value: revenue / customers", registry=r),
        }
        self.funnel = Gauge(p + "funnel_sessions", "Sessions that reached a funnel step", ["step"], registry=r)
        self.cohort_users = Gauge(p + "cohort_users", "Users first seen in the cohort week", ["cohort"], registry=r)
        self.cohort_clv = Gauge(p + "cohort_clv", "Cohort revenue / cohort users", ["cohort"], registry=r)
        self.retention = Gauge(p + "cohort_retention", "Share of the cohort active in week k after its first week",
                               ["cohort", "week"], registry=r)
        self.lift = Gauge(p + "experiment_lift", "Conversion rate of the arm / the holdout's - 1",
                          ["experiment", "variant"], registry=r)

    def set(self, snap: dict[str, Any]) -> None:
        """Set every gauge from a :meth:`BusinessMetrics.snapshot` (undefined ratios are left
        out; dropped cohorts disappear)."""
        for k, g in self.plain.items():
            v = snap.get(k)
            if v is not None:
                g.set(v)
        for row in snap["funnel"]:
            self.funnel.labels(row["step"]).set(row["sessions"])
        for g in (self.cohort_users, self.cohort_clv, self.retention, self.lift):
            g.clear()
        for c in snap["cohorts"]:
            self.cohort_users.labels(c["cohort"]).set(c["users"])
            if c["clv_per_user"] is not None:
                self.cohort_clv.labels(c["cohort"]).set(c["clv_per_user"])
            for k, r in enumerate(c["retention"]):
                if r is not None:
                    self.retention.labels(c["cohort"], str(k)).set(r)
        for e in snap["experiments"]:
            if e["lift"] is not None:
                self.lift.labels(e["experiment"], e["variant"]).set(e["lift"])


def from_prometheus(samples: dict[str, float]) -> dict[str, Any]:
    """The business gauges out of a scraped ``/metrics`` (``{"name{label=value,...}": value}``,
    as :meth:`clickpulse.runtime.WorkerProcess.metrics` returns it), as plain data:
    ``{plain metric: value, "funnel": {step: n}, "cohorts": {cohort: {"users", "clv",
    "retention": {k: share}}}, "lift": {"experiment/variant": lift}}``."""
    p = "clickpulse_business_"
    out: dict[str, Any] = {"funnel": {}, "cohorts": {}, "lift": {}}
    for key, v in samples.items():
        if not key.startswith(p):
            continue
        name, _, rest = key[len(p):].partition("{")
        labels = dict(x.split("=", 1) for x in rest.rstrip("}").split(",")) if rest else {}
        labels = {k: lv.strip('"') for k, lv in labels.items()}
        if name == "funnel_sessions":
            out["funnel"][labels["step"]] = v
        elif name in ("cohort_users", "cohort_clv", "cohort_retention"):
            c = out["cohorts"].setdefault(labels["cohort"], {"retention": {}})
            if name == "cohort_retention":
                c["retention"][int(labels["week"])] = v
            else:
                c["users" if name == "cohort_users" else "clv"] = v
        elif name == "experiment_lift":
            out["lift"][f"{labels['experiment']}/{labels['variant']}"] = v
        else:
            out[name] = v
    return out
