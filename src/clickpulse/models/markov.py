"""Next-action model: a first-order Markov chain over event types, learned online.

A session is a walk ``START -> s1 -> s2 -> ... -> outcome`` where ``s1, s2, ...`` are event (or
page) types and the outcome is one of two absorbing states: :data:`PURCHASE` (the session reached a
``purchase``) or :data:`END` (it ended without one). The chain counts transitions; transition
probabilities use additive (Laplace) smoothing, so an unseen transition keeps a small probability;
:meth:`MarkovChain.p_purchase` is the absorbing-chain probability that a session now at a state
reaches ``purchase`` before it ends — a 0–1 feature for rules (higher = more likely to purchase).

Learning, in event time (see :mod:`clickpulse.state.user` for the 30-minute session rule):

* whole sessions: :meth:`MarkovChain.learn_session` (replays, tests, :func:`report_paths`);
* one event at a time (the stream): keep a *cursor* per user session, start it at :data:`START`,
  ``cursor = chain.learn_step(cursor, event_type)`` on each event and
  ``chain.end_session(cursor)`` when the session ends (its gap has passed).

Self-transitions (``product_view -> product_view``) are learned: they do not change absorption
probabilities but keep :meth:`MarkovChain.p_next` honest. Events after a session's first purchase
are not learned: its outcome is decided. :func:`top_paths` / :func:`report_paths` list the opening
paths of sessions (consecutive repeats collapsed) that lead to a purchase, with conversion rates;
``clickpulse report paths`` prints the latter.

Examples
--------
>>> mc = MarkovChain(alpha=1.0)
>>> mc.learn_session(["product_view", "add_to_cart", "purchase"])
>>> mc.learn_session(["product_view"])
>>> mc.states
('add_to_cart', 'product_view')
>>> round(mc.p_next("add_to_cart")["purchase"], 3)  # (1 + 1) / (1 + 1 * 4)
0.4
>>> 0.0 < mc.p_purchase(["product_view"]) < mc.p_purchase(["product_view", "add_to_cart"]) < 1.0
True
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

START = "<start>"
"""Sentinel state every session starts from (never a target)."""
END = "<end>"
"""Absorbing state: the session ended without a purchase."""
PURCHASE = "purchase"
"""Absorbing state: the session reached a purchase (the canonical event type)."""
OTHER = "<other>"
"""Stands for every state beyond ``max_states`` (unbounded client-sent types stay bounded)."""

ABSORBING = (END, PURCHASE)
SESSION_GAP_MS = 1_800_000  # same session iff events are less than 30 min apart (clickpulse.state.user)


class MarkovChain:
    """First-order Markov chain over event types with absorbing ``<end>`` and ``purchase``.

    Parameters
    ----------
    alpha
        Additive smoothing pseudo-count added to every transition, > 0. ``1.0`` is Laplace's rule
        of succession: ``P(j | i) = (c_ij + alpha) / (n_i + alpha * K)``, with ``c_ij`` the count of
        ``i -> j``, ``n_i`` the transitions out of ``i`` and ``K`` the number of possible next
        states (every known state except ``<start>``, plus ``<end>`` and ``purchase``). A state
        never left is uniform over the K. Because ``alpha > 0`` every state reaches both absorbing
        states, so the absorption system is non-singular and ``p_purchase`` is strictly in (0, 1)
        for a transient state. Its weight fades as counts grow (it matters while ``n_i`` is
        comparable to ``alpha * K``).
    max_states
        Most distinct non-absorbing states kept (besides ``<start>``); further ones are counted as
        :data:`OTHER`, so a client sending arbitrary types cannot grow the model without bound.

    Notes
    -----
    Memory is one dict of counts per state (``K`` states, at most ``K*K`` ints); pickles drop the
    cached absorption solution, which is recomputed (one ``numpy.linalg.solve`` of size ``K``) on
    the first :meth:`p_purchase` after any learning.
    """

    def __init__(self, alpha: float = 1.0, max_states: int = 64) -> None:
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {max_states!r}")
        self.alpha = float(alpha)
        self.max_states = int(max_states)
        self.counts: dict[str, dict[str, int]] = {}  # prev -> next -> transitions
        self._known: set[str] = set()  # non-absorbing states other than START
        self._absorb: dict[str, float] | None = None  # cache: state -> P(purchase), cleared on learn

    # ------------------------------------------------------------------ learning
    def _state(self, s: str) -> str:
        s = str(s)  # plain str keys: numpy/str subclasses would bloat the pickle
        if s in (START, END, PURCHASE, OTHER) or s in self._known:
            return s
        if len(self._known) >= self.max_states:
            return OTHER
        self._known.add(s)
        return s

    def learn_transition(self, prev_state: str, next_state: str, count: int = 1) -> None:
        """Count ``count`` transitions ``prev_state -> next_state``.

        Raises
        ------
        ValueError
            ``prev_state`` is absorbing (``<end>``, ``purchase``), ``next_state`` is ``<start>``,
            or ``count < 1``.
        """
        if prev_state in ABSORBING:
            raise ValueError(f"{prev_state!r} is absorbing: no transition leaves it")
        if next_state == START:
            raise ValueError(f"{START!r} cannot be a next state")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        prev, nxt = self._state(prev_state), self._state(next_state)
        row = self.counts.setdefault(prev, {})
        row[nxt] = row.get(nxt, 0) + count
        self._absorb = None

    def learn_step(self, cursor: str, state: str) -> str:
        """Learn one event of a live session; returns the new cursor to keep for the session.

        ``cursor`` is :data:`START` for a new session, else the value the previous call returned.
        Once the session has purchased (cursor ``purchase``) nothing more is learned.

        >>> mc = MarkovChain()
        >>> c = mc.learn_step(START, "product_view")
        >>> c = mc.learn_step(c, "purchase"); c
        'purchase'
        >>> mc.learn_step(c, "product_view")  # after the purchase: not learned
        'purchase'
        >>> mc.transitions
        2
        """
        if cursor == PURCHASE:
            return PURCHASE
        self.learn_transition(cursor, state)
        return PURCHASE if state == PURCHASE else state

    def end_session(self, cursor: str) -> None:
        """Learn the end of a live session whose cursor is ``cursor`` (``<end>`` unless it purchased)."""
        if cursor not in (START, PURCHASE, END):
            self.learn_transition(cursor, END)

    def learn_session(self, states: Sequence[str]) -> None:
        """Learn a whole session: ``<start> -> states[0] -> ... -> <end>``, or up to its first
        ``purchase`` (absorbing; later events are not learned). An empty session is ignored.

        Raises
        ------
        ValueError
            A state is ``<start>`` or ``<end>``.
        """
        if not states:
            return
        cursor = START
        for s in states:
            if s in (START, END):
                raise ValueError(f"{s!r} is reserved and cannot appear in a session")
            cursor = self.learn_step(cursor, s)
            if cursor == PURCHASE:
                return
        self.end_session(cursor)

    # ------------------------------------------------------------------ queries
    @property
    def states(self) -> tuple[str, ...]:
        """Known non-absorbing states besides ``<start>`` (``<other>`` included once used), sorted."""
        used_other = any(OTHER in row for row in self.counts.values()) or OTHER in self.counts
        return tuple(sorted(self._known | ({OTHER} if used_other else set())))

    @property
    def transitions(self) -> int:
        """Total transitions learned."""
        return sum(sum(row.values()) for row in self.counts.values())

    def _targets(self) -> tuple[str, ...]:
        return (*self.states, END, PURCHASE)

    def _row(self, state: str, targets: tuple[str, ...]) -> list[float]:
        row = self.counts.get(state, {})
        denom = sum(row.values()) + self.alpha * len(targets)
        return [(row.get(t, 0) + self.alpha) / denom for t in targets]

    def p_next(self, state: str) -> dict[str, float]:
        """Smoothed next-state distribution from ``state`` (sums to 1), over every known state,
        ``<end>`` and ``purchase``. An absorbing state returns ``{state: 1.0}``; an unknown state
        the uniform distribution (see ``alpha``).

        >>> mc = MarkovChain(alpha=0.5)
        >>> mc.learn_transition("product_view", "add_to_cart", 3)
        >>> mc.p_next("product_view")  # K = 4: add_to_cart, product_view, <end>, purchase
        {'add_to_cart': 0.7, 'product_view': 0.1, '<end>': 0.1, 'purchase': 0.1}
        """
        if state in ABSORBING:
            return {state: 1.0}
        if state != START and state not in self._known:
            state = OTHER if len(self._known) >= self.max_states else state
        targets = self._targets()
        return dict(zip(targets, self._row(state, targets), strict=True))

    def _absorption(self) -> dict[str, float]:
        """P(absorbed in ``purchase``) for every transient state, from ``b = (I - Q)^-1 r``
        (Grinstead & Snell, *Introduction to Probability*, 2nd ed., §11.2, Theorem 11.6), solved
        with ``numpy.linalg.solve`` (LAPACK ``gesv``)."""
        if self._absorb is None:
            targets = self._targets()
            transient = [START, *self.states]  # START is transient but never a target
            idx = {s: i for i, s in enumerate(transient)}
            k = len(transient)
            q = np.zeros((k, k))
            r = np.zeros(k)
            for s in transient:
                for t, p in zip(targets, self._row(s, targets), strict=True):
                    if t == PURCHASE:
                        r[idx[s]] = p
                    elif t != END:
                        q[idx[s], idx[t]] = p
            b = np.linalg.solve(np.eye(k) - q, r)
            self._absorb = {s: float(min(1.0, max(0.0, b[idx[s]]))) for s in transient}
        return self._absorb

    def p_purchase(self, path: Sequence[str]) -> float:
        """Probability, in [0, 1], that a session now at ``path[-1]`` reaches ``purchase`` before
        it ends (first-order: only the last state matters; an empty path means a session about to
        start). ``purchase`` gives 1.0 and ``<end>`` 0.0; a state never seen is taken as one with
        a uniform next-state distribution.
        """
        state = path[-1] if len(path) else START
        if state == PURCHASE:
            return 1.0
        if state == END:
            return 0.0
        absorb = self._absorption()
        if state in absorb:
            return absorb[state]
        if len(self._known) >= self.max_states and OTHER in absorb:
            return absorb[OTHER]
        # unseen state, uniform over the K targets: mean of their absorption probabilities
        targets = self._targets()
        return sum(1.0 if t == PURCHASE else 0.0 if t == END else absorb[t] for t in targets) / len(targets)

    # ------------------------------------------------------------------ persistence
    def __getstate__(self) -> dict[str, Any]:
        return {"a": self.alpha, "m": self.max_states, "c": self.counts, "k": sorted(self._known)}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.alpha, self.max_states, self.counts = st["a"], st["m"], st["c"]
        self._known = set(st["k"])
        self._absorb = None

    def __repr__(self) -> str:
        return f"MarkovChain(alpha={self.alpha}, states={len(self.states)}, transitions={self.transitions})"


# ---------------------------------------------------------------------- paths
def collapse(states: Iterable[str]) -> list[str]:
    """Drop consecutive repeats: ``[a, a, b, a] -> [a, b, a]``.

    >>> collapse(["product_view", "product_view", "add_to_cart", "product_view"])
    ['product_view', 'add_to_cart', 'product_view']
    """
    out: list[str] = []
    for s in states:
        if not out or out[-1] != s:
            out.append(s)
    return out


def session_path(states: Sequence[str], max_len: int) -> tuple[tuple[str, ...], bool]:
    """``(path, converted)`` of one session: its event types before the first ``purchase``,
    consecutive repeats collapsed, cut to the first ``max_len`` steps; ``converted`` is True when
    the session has a purchase. A session opening with a purchase has the path ``()``."""
    c = collapse(states)
    converted = PURCHASE in c
    if converted:
        c = c[: c.index(PURCHASE)]
    return tuple(c[:max_len]), converted


def top_paths(sessions: Iterable[Sequence[str]], k: int = 10, max_len: int = 4
              ) -> list[tuple[tuple[str, ...], int, int, float]]:
    """The ``k`` opening paths (see :func:`session_path`) with the most purchases.

    Every non-empty session counts under exactly one path, so ``sessions`` over all paths is the
    number of sessions. Paths without any purchase are left out.

    Returns
    -------
    list of (path, sessions, purchases, conversion)
        ``sessions``: sessions with that opening path; ``purchases``: those of them that reached a
        purchase; ``conversion`` = purchases / sessions, 0–1. Sorted by purchases, then
        conversion, then sessions (all descending), then path.

    Examples
    --------
    >>> top_paths([["product_view", "product_view", "purchase"], ["product_view"],
    ...            ["product_view", "add_to_cart", "purchase"]], k=5, max_len=3)
    [(('product_view', 'add_to_cart'), 1, 1, 1.0), (('product_view',), 2, 1, 0.5)]
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len!r}")
    seen: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
    for states in sessions:
        if not states:
            continue
        path, converted = session_path(states, max_len)
        c = seen[path]
        c[0] += 1
        c[1] += converted
    rows = [(p, n, s, s / n) for p, (n, s) in seen.items() if s > 0]
    return heapq.nsmallest(max(k, 0), rows, key=lambda r: (-r[2], -r[3], -r[1], r[0]))


def rees46_sessions(path: str | Path, session_gap_ms: int = SESSION_GAP_MS, sweep_every: int = 4096
                    ) -> Iterable[list[str]]:
    """Sessions (lists of canonical event types, event-time order) from a REES46 CSV.

    Per user, events sorted by event time (file order for ties), split where two consecutive
    events are ``session_gap_ms`` or more apart (the rule of :mod:`clickpulse.state.user`);
    identical rows (same event id) count once. The file is read as a stream: a user's buffered
    events are sessionized once the file's time has moved ``2 * session_gap_ms`` past their last
    event, so memory holds only recently active users. REES46 files are in time order, for which
    this is exact; an event more than a gap behind the file's time for a user already flushed
    starts a separate session. Idle users are swept every ``sweep_every`` rows.
    """
    from ..ingest.datasets import read_rees46

    buf: dict[str, list[tuple[int, int, str, str]]] = {}
    last: dict[str, int] = {}
    horizon = 2 * session_gap_ms
    max_ts = None
    n = 0

    def flush(user: str) -> Iterable[list[str]]:
        events = sorted(buf.pop(user))
        last.pop(user, None)
        ids: set[str] = set()
        cur: list[str] = []
        prev_ts = None
        for ts, _seq, etype, eid in events:
            if eid in ids:
                continue
            ids.add(eid)
            if prev_ts is not None and ts - prev_ts >= session_gap_ms:
                yield cur
                cur = []
            cur.append(etype)
            prev_ts = ts
        if cur:
            yield cur

    for ev in read_rees46(path):
        user, ts = ev["user_id"], int(ev["timestamp"])
        buf.setdefault(user, []).append((ts, n, ev["type"], ev["event_id"]))
        last[user] = max(last.get(user, ts), ts)
        n += 1
        if max_ts is None or ts > max_ts:
            max_ts = ts
        if n % sweep_every == 0:  # sweep users idle for two gaps of file time
            for u in [u for u, t in last.items() if t < max_ts - horizon]:
                yield from flush(u)
    for u in list(buf):
        yield from flush(u)


def _fmt_path(path: tuple[str, ...]) -> str:
    return " > ".join(path) if path else "(purchase first)"


def report_paths(path_to_rees46_csv: str | Path, k: int = 10, max_len: int = 4,
                 session_gap_ms: int = SESSION_GAP_MS, alpha: float = 1.0) -> str:
    """A printable table of the ``k`` opening paths with the most purchases in a REES46 replay
    file (:func:`rees46_sessions`, :func:`top_paths`), followed by the Markov chain's
    P(purchase before the session ends | current state) learned from the same sessions.

    Raises
    ------
    clickpulse.errors.DatasetError
        The file is missing or not a REES46 CSV.
    """
    sessions = list(rees46_sessions(path_to_rees46_csv, session_gap_ms))
    chain = MarkovChain(alpha=alpha)
    for s in sessions:
        chain.learn_session(s)
    rows = top_paths(sessions, k=k, max_len=max_len)
    total = len(sessions)
    events = sum(len(s) for s in sessions)
    converted = sum(PURCHASE in s for s in sessions)
    rate = converted / total if total else 0.0
    name = Path(path_to_rees46_csv).name
    lines = [
        f"Paths to purchase in {name}: {events} events, {total} sessions "
        f"({session_gap_ms // 60000}-min inactivity rule), {converted} with a purchase ({rate:.2%}).",
        f"Path = a session's event types before its first purchase, repeats collapsed, first {max_len} steps.",
        "",
    ]
    if not rows:
        lines.append("No session reached a purchase.")
    else:
        width = max(28, *(len(_fmt_path(p)) for p, *_ in rows))
        lines.append(f"{'#':>3}  {'opening path':<{width}}  {'sessions':>8}  {'purchases':>9}  {'conversion':>10}")
        for i, (p, n, s, cr) in enumerate(rows, start=1):
            lines.append(f"{i:>3}  {_fmt_path(p):<{width}}  {n:>8}  {s:>9}  {cr:>10.2%}")
    lines += ["", f"Markov chain (additive smoothing alpha={alpha:g}, {chain.transitions} transitions): "
                  "P(purchase before the session ends | current state)"]
    for st in (START, *chain.states):
        lines.append(f"  {st:<24} {chain.p_purchase([st]) if st != START else chain.p_purchase([]):.4f}")
    return "\n".join(lines)
