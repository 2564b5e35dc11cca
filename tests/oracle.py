"""Independent plain-Python computations over the datasets, to check clickpulse against."""

from __future__ import annotations

import csv
from bisect import bisect_right
from datetime import UTC, datetime

from clickpulse.ingest.datasets import BUNDLED_SAMPLE


def independent_abandoned_users(flush: bool, delay_s: int = 1800, lateness_s: int = 60) -> set[str]:
    """Plain-Python computation over the CSV: a user's cart episode is abandoned when no purchase
    follows within the delay of the last add, and the file's time (max time - lateness) is past it
    (or the input is flushed)."""
    with open(BUNDLED_SAMPLE, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    def t(r):
        return int(datetime.strptime(r["event_time"], "%Y-%m-%d %H:%M:%S %Z").replace(tzinfo=UTC).timestamp())

    end = max(t(r) for r in rows) - lateness_s
    last_add: dict[str, int] = {}
    abandoned = set()
    for r in rows:  # the file is in time order
        u, ts = r["user_id"], t(r)
        if u in last_add and ts - last_add[u] > delay_s and u not in abandoned:
            abandoned.add(u)  # a later event after the deadline: the episode was abandoned
            del last_add[u]
        if r["event_type"] == "cart":
            last_add[u] = ts
        elif r["event_type"] == "purchase":
            last_add.pop(u, None)
    for u, ts in last_add.items():
        if flush or end > ts + delay_s:
            abandoned.add(u)
    return abandoned


# --------------------------------------------------------------------------------------------
# The default rules' two timeout triggers on the bundled REES46 sample, modelled exactly.
#
# Plain Python over the CSV (no clickpulse code besides the sample's path). What is modelled,
# from the documented semantics (clickpulse.rules.triggers, clickpulse.state.user,
# clickpulse.state.clock, clickpulse.ingest.datasets):
#
# * Rows: view -> product_view, cart -> add_to_cart, purchase, remove_from_cart. A row identical
#   to one of the user's last 32 rows is a duplicate (event id = hash of the line): ignored.
# * Partitions and watermarks: each user's events go to one partition (``partition_of``); a
#   partition's watermark is (max event time seen on it) - lateness, raised after each event is
#   applied. An event is applied with the watermark *before* it, then the partition's timers
#   whose due time the new watermark is strictly past fire. So a timer due at D fires right
#   after the first event of its partition (file order) whose event time is > D + lateness —
#   or, when that event is the user's own, right *before* it is applied (a user's event never
#   re-arms or cancels a timer that the watermark it brings has passed).
#   End of input (flush) fires every pending timer; without it, a timer no event got past stays
#   pending.
# * Timeout {after A, no B, within T}: an A at or before the user's latest B is ignored; an A
#   (re)arms the timer at A + T (replacing a pending one); a B at or after the latest A cancels it
#   and ends the episode (the episode starts at the first A after the latest B). At the due time
#   the condition is evaluated on the cart with every applied event.
# * Cart: add_to_cart adds one unit; remove_from_cart removes one; a purchase at P removes every
#   unit added at or before P, and a later-arriving cart change at or before P is ignored.
# * Gates: bot (>20 add_to_cart within < 10 s, or >300 events within < 60 s: sticky from the
#   flagging event; no user agents in REES46), consent (marketing assumed), cooldown (event time
#   since the trigger last fired for the user, at the due time), once_per (episode: one action
#   per cart episode, and an A of an episode that already had its action arms nothing; session:
#   the 30-min-gap session the due time falls in, i.e. the session of the latest A).
# --------------------------------------------------------------------------------------------

LATENESS_S = 60
SESSION_GAP_MS = 1_800_000
DEDUP_IDS = 32
REES46_TYPES = {"view": "product_view", "cart": "add_to_cart", "purchase": "purchase",
                "remove_from_cart": "remove_from_cart"}
#: trigger name -> (action type, after, no, within_s, condition on the cart, once_per, cooldown_s)
DEFAULT_TIMEOUT_TRIGGERS = {
    "cart_abandonment": ("cart_abandoned", "add_to_cart", "purchase", 1800, "not_empty", "episode", 0),
    "browse_abandonment": ("assistance_offer", "product_view", "add_to_cart", 300, "empty", "session", 3600),
}


def _ms(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S %Z").replace(tzinfo=UTC).timestamp()) * 1000


def sample_events(path=BUNDLED_SAMPLE) -> list[tuple[int, str, str, str]]:
    """``(time_ms, user, type, product_id)`` of every non-duplicate row, in file order."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    recent: dict[str, list[tuple]] = {}
    out = []
    for r in rows:
        ident = tuple(r.values())
        seen = recent.setdefault(r["user_id"], [])
        if ident in seen:
            continue
        seen.append(ident)
        del seen[:-DEDUP_IDS]
        out.append((_ms(r["event_time"]), r["user_id"], REES46_TYPES.get(r["event_type"], r["event_type"]),
                    r["product_id"]))
    return out


def partition_mod4(user: str) -> int:
    """The partition tests/unit's in-memory replay uses: user id modulo 4."""
    return int(user) % 4


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as an unsigned 32-bit int."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    n = len(data)
    h = (0x9747B28C ^ n) & mask
    for i in range(0, n - n % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = n % 4
    base = n - tail
    if tail >= 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def kafka_partition(user: str, partitions: int = 4) -> int:
    """The partition the Kafka (Java / aiokafka) default partitioner gives the key ``user``."""
    return (murmur2(user.encode()) & 0x7FFFFFFF) % partitions


def _bot_flag_times(events: list[tuple[int, str, str, str]], max_adds=20, add_window_ms=10_000,
                    max_events=300, events_window_ms=60_000) -> dict[str, int]:
    """user -> event time of the event that makes them a bot (more than ``max`` within a span
    shorter than the window), for the users who are bots."""
    by_user: dict[str, list[tuple[int, str]]] = {}
    for t, u, ty, _p in events:
        by_user.setdefault(u, []).append((t, ty))
    flagged = {}
    for u, evs in by_user.items():
        adds: list[int] = []
        alls: list[int] = []
        for t, ty in evs:
            hit = False
            if ty == "add_to_cart":
                adds.append(t)
                hit = len([x for x in adds if t - x < add_window_ms]) > max_adds
            alls.append(t)
            hit = hit or len([x for x in alls if t - x < events_window_ms]) > max_events
            if hit:
                flagged[u] = t
                break
    return flagged


def expected_timeout_actions(flush: bool, partition_of=partition_mod4, lateness_s: int = LATENESS_S,
                             path=BUNDLED_SAMPLE) -> dict[str, list[tuple[str, int]]]:
    """Trigger name -> sorted ``[(user, due event time ms), ...]`` of the actions the default
    rules' ``cart_abandonment`` and ``browse_abandonment`` must produce on the sample (replay
    mode, the given partitioning and lateness; ``flush``: the input ends with end_of_input)."""
    events = sample_events(path)
    lateness = lateness_s * 1000
    bots = _bot_flag_times(events)
    # per partition: the watermark after each of its events (file order)
    marks: dict[int, list[int]] = {}
    where: list[tuple[int, int]] = []  # (partition, position in it) of each event
    for t, u, _ty, _p in events:
        p = partition_of(u)
        lst = marks.setdefault(p, [])
        wm = t - lateness if not lst else max(lst[-1], t - lateness)
        where.append((p, len(lst)))
        lst.append(wm)
    never, end = float("inf"), float(len(events) + 1)  # positions: no firing / end of input

    def fires_after(p: int, due: int) -> float:
        """Position in partition p after whose event a timer due at ``due`` fires: the first
        whose watermark is strictly past ``due`` (watermarks never decrease)."""
        pos = bisect_right(marks[p], due)
        return pos if pos < len(marks[p]) else (end if flush else never)

    # every user's events with their partition positions
    users: dict[str, list[tuple[int, int, str, str]]] = {}
    for (t, u, ty, prod), (p, pos) in zip(events, where, strict=True):
        users.setdefault(u, []).append((pos, t, ty, prod))
    out: dict[str, list[tuple[str, int]]] = {name: [] for name in DEFAULT_TIMEOUT_TRIGGERS}
    for u, evs in users.items():
        p = partition_of(u)
        sess_start: dict[int, int] = {}  # event time -> start of its 30-min-gap session
        start = last = None
        for _pos, t, _ty, _prod in evs:
            if last is None or t - last >= SESSION_GAP_MS:
                start = t
            sess_start[t] = start
            last = t
        cart: list[tuple[int, str]] = []  # (add time, product) of each unit in the cart
        closed = None             # latest purchase time
        st = {name: {"a": None, "b": None, "e": None, "due": None, "fe": None, "lf": None, "ls": None}
              for name in DEFAULT_TIMEOUT_TRIGGERS}
        applied_t = None          # event time of the last event applied

        def fire_due(before_pos: float) -> None:
            pending = sorted((s["due"], name) for name, s in st.items()
                             if s["due"] is not None and fires_after(p, s["due"]) < before_pos)
            for due, name in pending:
                _typ, _a, _b, _w, cond, once_per, cooldown_s = DEFAULT_TIMEOUT_TRIGGERS[name]
                s = st[name]
                s["due"] = None
                if cond == "not_empty" and not cart or cond == "empty" and cart:
                    continue
                if u in bots and applied_t is not None and applied_t >= bots[u]:
                    continue
                if cooldown_s and s["lf"] is not None and due - s["lf"] < cooldown_s * 1000:
                    continue
                session = sess_start[s["a"]]
                if once_per == "session" and s["ls"] == session:
                    continue
                if once_per == "episode" and s["fe"] is not None and s["fe"] == s["e"]:
                    continue
                s["lf"], s["ls"], s["fe"] = due, session, s["e"]
                out[name].append((u, due))

        for pos, t, ty, prod in evs:
            fire_due(pos + 0.25)  # timers that fired after an earlier event, or that this event passes
            if ty == "add_to_cart" and (closed is None or t > closed):
                cart.append((t, prod))
            elif ty == "remove_from_cart" and (closed is None or t > closed):
                units = [x for x in cart if x[1] == prod]
                if units:
                    cart.remove(max(units))  # newest unit first
            elif ty == "purchase":
                closed = t if closed is None else max(closed, t)
                cart = [x for x in cart if x[0] > t]
            applied_t = t
            for name, (_typ, after, no, within_s, _c, once_per, _cd) in DEFAULT_TIMEOUT_TRIGGERS.items():
                s = st[name]
                if ty == no:
                    s["b"] = t if s["b"] is None else max(s["b"], t)
                    if s["a"] is None or t >= s["a"]:
                        s["a"] = s["e"] = s["due"] = None
                elif ty == after and not (s["b"] is not None and t <= s["b"]):
                    s["e"] = t if s["e"] is None else s["e"]  # the episode's first A
                    s["a"] = t if s["a"] is None else max(s["a"], t)
                    due = s["a"] + within_s * 1000
                    if once_per == "episode" and s["fe"] == s["e"]:
                        s["due"] = None  # this episode had its action
                    elif not (pos > 0 and due < marks[p][pos - 1]):  # else: already behind the watermark
                        s["due"] = due
            fire_due(pos + 0.5)  # the tick after this event
        fire_due(never)  # flushed: end of input (fires_after = end); otherwise nothing more
    return {name: sorted(v) for name, v in out.items()}


def expected_actions_by_type(flush: bool, partition_of=partition_mod4, lateness_s: int = LATENESS_S
                             ) -> dict[str, list[tuple[str, int]]]:
    """Action type -> sorted ``[(user, event_time_ms)]`` (``cart_abandoned``, ``assistance_offer``)."""
    exp = expected_timeout_actions(flush, partition_of, lateness_s)
    return {DEFAULT_TIMEOUT_TRIGGERS[name][0]: v for name, v in exp.items()}


def comparable_action(action: dict) -> dict:
    """An action without its two fields that legitimately differ between publications of the
    same decision (the stated at-least-once guarantee, docs/delivery.md): ``created_at`` (the
    wall-clock publication time) and ``payload.recommendations`` (computed from the publishing
    worker's in-memory item-to-item model at publication, docs/recommendations.md)."""
    out = {k: v for k, v in action.items() if k != "created_at"}
    payload = out.get("payload")
    if isinstance(payload, dict) and "recommendations" in payload:
        out["payload"] = {k: v for k, v in payload.items() if k != "recommendations"}
    return out
