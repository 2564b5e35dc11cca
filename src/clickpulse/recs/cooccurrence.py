"""Item-to-item co-occurrence learned online, with exponential decay in event time and bounded memory.

Pure, typed and broker-free (no Kafka, no clock: event time is passed in). The engine keeps one
:class:`CoOccurrence` per worker (see ``docs/recommendations.md`` for that design and its
consequence); :mod:`clickpulse.recs.evaluate` runs it over the bundled datasets.

What is learned
---------------
* **Viewed together.** When a session views an item ``x`` for the first time, ``x`` and each of
  the items the session viewed before (the last ``context`` of them, distinct) get one
  *session co-occurrence*, in both directions: a pair counts at most once per session.
* **Bought together.** A purchase's basket (the items of the order: the cart's items and the
  purchased product) gives each pair of its items one *basket co-occurrence*, weighted
  ``buy_weight`` in scores.
* **Popularity.** Each item counts the sessions that viewed it (once per session), for the
  cosine normalisation and for filling a recommendation list when the context has too few
  neighbours.

Decay (forward decay)
---------------------
A co-occurrence seen at event time ``t`` weighs ``2 ** (-(T - t) / h)`` at a later time ``T``
(``h`` = :attr:`RecsConfig.half_life_ms`: after one half-life it counts half). It is stored as
*forward decay* (Cormode, Shkapenyuk, Srivastava and Xu, "Forward Decay: A Practical Time Decay
Model for Streaming Systems", ICDE 2009, section 3): the stored weight of an occurrence is
``g(t) = 2 ** ((t - L) / h)`` for a landmark time ``L``; the decayed weight at ``T`` is the
stored sum divided by ``g(T)``. Every stored weight is divided by the same ``g(T)``, so they can
be compared and ranked as stored, nothing needs to be rewritten as time passes, and the sum is
the same whatever order the events arrive in (late events are simply added with their own
``t``). When ``(t - L) / h`` would exceed :data:`REBASE_AT` half-lives, every stored weight is
multiplied by ``2 ** -REBASE_AT`` and ``L`` moves forward (exact in binary floating point; once
per ``REBASE_AT`` half-lives). ``half_life_ms = 0`` turns decay off (every occurrence weighs 1).

Bounds and memory
-----------------
* **Neighbours per item:** at most ``neighbours + neighbours // 2`` entries; when an item has
  more, it keeps its ``neighbours`` strongest (by decayed weight) and drops the rest (their
  counts are forgotten: a pair dropped and seen again starts from zero, like the space-saving
  family of heavy-hitter sketches without their error bound). Recommendations use what is kept.
* **Items:** at most ``max_items``; beyond, the item updated least recently is evicted with its
  neighbours (least recently updated = the smallest decayed weights, when decay is on). An
  evicted item can still appear as another item's neighbour.
* **Memory** (``tracemalloc``, CPython 3.11): about 170 bytes per item (its node) plus about
  100-150 bytes per neighbour entry (a tuple of two floats and two ints and its dict slot; the
  upper figure with decay, whose weights are distinct floats), plus the id strings (about 60
  bytes each for 9-digit ids). At the bounds an item costs at most about
  ``170 + 1.5 * neighbours * 150 + 60`` bytes: ≈ 4.7 KB with 20 neighbours, so ≈ 235 MB for the
  default 50,000 items. Measured after the Diginetica sample (7,139 items, 52,062 entries):
  6.9 MB, 961 bytes per item (``clickpulse evaluate recs`` prints it).

Transactions
------------
:meth:`CoOccurrence.begin` starts journaling every change; :meth:`CoOccurrence.rollback` undoes
them (the engine's "a step that raises changes nothing": every weight, count and popularity comes
back exactly; only the least-recently-updated order of the items may differ),
:meth:`CoOccurrence.commit` forgets the journal. Without :meth:`begin` nothing is journaled (evaluation runs).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: half-lives after which the landmark moves forward (2 ** 512 ≈ 1.3e154, far from overflow)
REBASE_AT = 512
#: item ids longer than this (characters) are ignored
MAX_ID_CHARS = 256

#: one neighbour entry: (view weight, basket weight, view sessions, baskets) - weights forward-decayed
Entry = tuple[float, float, int, int]
#: one recommendation: (item id, score, why)
Rec = tuple[str, float, str]


@dataclass(frozen=True)
class RecsConfig:
    """Settings of :class:`CoOccurrence`.

    Attributes
    ----------
    half_life_ms
        Event-time half-life of a co-occurrence (ms, >= 0; 0: no decay). Default 7 days.
    neighbours
        Neighbours kept per item (top by decayed weight; up to 1.5x between prunings), >= 1.
    max_items
        Items kept (least recently updated evicted), >= 1.
    context
        The most recent distinct session items a new view is paired with, and a recommendation
        is computed from, >= 1.
    buy_weight
        Weight of a basket co-occurrence relative to a view co-occurrence in scores, >= 0.
    cosine
        Normalise scores by ``sqrt(popularity(i) * popularity(j))`` (cosine similarity of the
        items' session vectors) rather than raw co-occurrence. Default off: raw co-occurrence
        scored higher on both bundled samples (``docs/recommendations.md``; chosen on those same
        samples, there is no held-out data).
    position_decay
        Context items weigh ``position_decay ** r`` where ``r`` = 0 for the most recent, 1 for
        the one before... (0 < position_decay <= 1).
    fill_popular
        Fill a list the neighbours cannot fill with the most popular items (decayed).
    """

    half_life_ms: int = 7 * 86_400_000
    neighbours: int = 20
    max_items: int = 50_000
    context: int = 10
    buy_weight: float = 3.0
    cosine: bool = False
    position_decay: float = 0.7
    fill_popular: bool = True

    def __post_init__(self) -> None:
        if self.half_life_ms < 0:
            raise ValueError(f"half_life_ms must be >= 0, got {self.half_life_ms}")
        for name in ("neighbours", "max_items", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.buy_weight >= 0 or math.isinf(self.buy_weight):
            raise ValueError(f"buy_weight must be a finite number >= 0, got {self.buy_weight}")
        if not 0 < self.position_decay <= 1:
            raise ValueError(f"position_decay must be in (0, 1], got {self.position_decay}")


class _Item:
    """One item: popularity (forward-decayed and counted sessions) and its neighbours."""

    __slots__ = ("pop", "n", "nb")

    def __init__(self) -> None:
        self.pop = 0.0
        self.n = 0
        self.nb: dict[str, Entry] = {}


_ABSENT: Any = None  # journal marker: the key was absent


class CoOccurrence:
    """Online item-to-item co-occurrence (see the module docstring for the semantics).

    Examples
    --------
    >>> m = CoOccurrence(RecsConfig(half_life_ms=0))
    >>> m.observe_view([], "a", 0); m.observe_view(["a"], "b", 1000)
    >>> m.observe_view([], "a", 5000); m.observe_view(["a"], "c", 6000); m.observe_view(["a", "c"], "b", 7000)
    >>> [(item, why) for item, _, why in m.recommend(["a"], 2)]
    [('b', 'viewed with a in 2 sessions'), ('c', 'viewed with a in 1 session')]
    """

    def __init__(self, cfg: RecsConfig | None = None) -> None:
        self.cfg = cfg or RecsConfig()
        self.items: dict[str, _Item] = {}   # least recently updated first
        self.landmark: int | None = None    # L (epoch ms)
        self.top: dict[str, float] = {}     # the most popular items (stored popularity), see _bump_top
        self.top_size = 32  # kept: between 32 and 64 items (enough to fill k = 10 past a session's items)
        self.pairs = 0                      # neighbour entries kept (both directions)
        self.evicted_items = 0
        self.pruned_entries = 0
        self._journal: list[tuple[Any, ...]] | None = None

    # ------------------------------------------------------------------ transactions
    def begin(self) -> None:
        """Start journaling changes (a new transaction; an open one is committed)."""
        self._journal = []

    def commit(self) -> None:
        """Keep the changes since :meth:`begin` and stop journaling."""
        self._journal = None

    def rollback(self) -> None:
        """Undo every change since :meth:`begin` (exactly) and stop journaling; no-op without one."""
        j, self._journal = self._journal, None
        if not j:
            return
        for op in reversed(j):
            kind = op[0]
            if kind == "nb":       # ("nb", item node, neighbour, old entry or _ABSENT)
                _, node, y, old = op
                if old is _ABSENT:
                    if node.nb.pop(y, None) is not None:
                        self.pairs -= 1
                else:
                    if y not in node.nb:
                        self.pairs += 1
                    node.nb[y] = old
            elif kind == "pop":    # ("pop", node, old pop, old n)
                op[1].pop, op[1].n = op[2], op[3]
            elif kind == "item":   # ("item", id, old node or _ABSENT)
                _, x, old = op
                if old is _ABSENT:
                    node = self.items.pop(x, None)
                    if node is not None:
                        self.pairs -= len(node.nb)
                else:
                    self.items[x] = old
                    self.pairs += len(old.nb)
            elif kind == "top":    # ("top", id, old stored popularity or _ABSENT)
                _, x, old = op
                if old is _ABSENT:
                    self.top.pop(x, None)
                else:
                    self.top[x] = old
            elif kind == "topall":  # ("topall", old dict)
                self.top = op[1]
            elif kind == "rebase":  # ("rebase", old landmark, factor applied)
                self._scale(1.0 / op[2])
                self.landmark = op[1]
            elif kind == "counters":  # ("counters", evicted_items, pruned_entries)
                self.evicted_items, self.pruned_entries = op[1], op[2]

    # ------------------------------------------------------------------ decay
    def _g(self, t_ms: int) -> float:
        """Forward-decay weight of an occurrence at ``t_ms`` (1.0 without decay)."""
        h = self.cfg.half_life_ms
        if h == 0:
            return 1.0
        if self.landmark is None:
            if self._journal is not None:
                self._journal.append(("rebase", None, 1.0))
            self.landmark = t_ms
        x = (t_ms - self.landmark) / h
        if x > REBASE_AT:
            steps = int(x // REBASE_AT)
            factor = 2.0 ** (-REBASE_AT * steps)
            if self._journal is not None:
                self._journal.append(("rebase", self.landmark, factor))
            self._scale(factor)
            self.landmark += steps * REBASE_AT * h
            x = (t_ms - self.landmark) / h
        return 2.0 ** x if x > -1000 else 0.0

    def _scale(self, f: float) -> None:
        for node in self.items.values():
            node.pop *= f
            node.nb = {y: (e[0] * f, e[1] * f, e[2], e[3]) for y, e in node.nb.items()}
        self.top = {x: v * f for x, v in self.top.items()}

    def decayed(self, stored: float, at_ms: int) -> float:
        """A stored (forward-decayed) weight as of event time ``at_ms``."""
        h = self.cfg.half_life_ms
        if h == 0 or self.landmark is None:
            return stored
        return stored / 2.0 ** ((at_ms - self.landmark) / h)

    # ------------------------------------------------------------------ learning
    def _node(self, x: str) -> _Item:
        """The item's node, created if needed and moved to the most recently updated end."""
        items = self.items
        node = items.pop(x, None)
        if node is None:
            node = _Item()
            if self._journal is not None:
                self._journal.append(("item", x, _ABSENT))
        items[x] = node
        if len(items) > self.cfg.max_items:
            self._evict()
        return node

    def _evict(self) -> None:
        items = self.items
        while len(items) > self.cfg.max_items:
            old = next(iter(items))
            node = items.pop(old)
            if self._journal is not None:
                self._journal.append(("counters", self.evicted_items, self.pruned_entries))
                self._journal.append(("item", old, node))
                if old in self.top:
                    self._journal.append(("top", old, self.top[old]))
            self.pairs -= len(node.nb)
            self.top.pop(old, None)
            self.evicted_items += 1

    def _add(self, node: _Item, y: str, wv: float, wb: float, nv: int, nb: int) -> None:
        d = node.nb
        old = d.get(y)
        if self._journal is not None:
            self._journal.append(("nb", node, y, _ABSENT if old is None else old))
        if old is None:
            d[y] = (wv, wb, nv, nb)
            self.pairs += 1
            if len(d) > self.cfg.neighbours + self.cfg.neighbours // 2:
                self._prune(node)
        else:
            d[y] = (old[0] + wv, old[1] + wb, old[2] + nv, old[3] + nb)

    def _prune(self, node: _Item) -> None:
        """Keep the item's ``neighbours`` strongest entries (ties: the smaller id first)."""
        bw = self.cfg.buy_weight
        d = node.nb
        keep = heapq.nsmallest(self.cfg.neighbours, d.items(), key=lambda kv: (-(kv[1][0] + bw * kv[1][1]), kv[0]))
        dropped = len(d) - len(keep)
        if self._journal is not None:
            self._journal.append(("counters", self.evicted_items, self.pruned_entries))
            for y, e in d.items():  # replayed in reverse: every entry comes back as it was
                self._journal.append(("nb", node, y, e))
        node.nb = dict(keep)
        self.pairs -= dropped
        self.pruned_entries += dropped

    def _bump_top(self, x: str, pop: float) -> None:
        """Keep :attr:`top` = the ``top_size`` most popular items (an item's stored popularity
        only grows, so it is enough to check the item whose popularity just grew)."""
        top = self.top
        if x in top or len(top) < 2 * self.top_size or pop > min(top.values()):
            if self._journal is not None:
                self._journal.append(("top", x, top.get(x, _ABSENT)))
            top[x] = pop
            if len(top) > 2 * self.top_size:
                if self._journal is not None:
                    self._journal.append(("topall", dict(top)))
                self.top = dict(heapq.nlargest(self.top_size, top.items(), key=lambda kv: (kv[1], kv[0])))

    def observe_view(self, context: Sequence[str], item: str, t_ms: int) -> None:
        """A session viewed ``item`` at event time ``t_ms`` (epoch ms) after viewing ``context``
        (its earlier distinct items, oldest first). Only a first view in the session counts:
        when ``item`` is in ``context`` nothing changes. ``item`` is paired with the last
        :attr:`RecsConfig.context` items of ``context`` (once per session and pair, if the
        caller passes each session's items as they come). Ids that are not strings of 1 to
        :data:`MAX_ID_CHARS` characters are ignored.
        """
        if not _ok(item) or item in context:
            return
        g = self._g(int(t_ms))
        node = self._node(item)
        if self._journal is not None:
            self._journal.append(("pop", node, node.pop, node.n))
        node.pop += g
        node.n += 1
        self._bump_top(item, node.pop)
        ctx = [y for y in context[-self.cfg.context:] if _ok(y) and y != item]
        for y in dict.fromkeys(ctx):
            self._add(node, y, g, 0.0, 1, 0)
            other = self._node(y)
            self._add(other, item, g, 0.0, 1, 0)

    def observe_basket(self, items: Iterable[str], t_ms: int) -> None:
        """An order of ``items`` (distinct ids, at most the first :attr:`RecsConfig.context` + 1)
        at event time ``t_ms``: each pair gets one basket co-occurrence."""
        basket = list(dict.fromkeys(x for x in items if _ok(x)))[:self.cfg.context + 1]
        if len(basket) < 2:
            return
        g = self._g(int(t_ms))
        for x in basket:
            node = self._node(x)
            for y in basket:
                if y != x:
                    self._add(node, y, 0.0, g, 0, 1)

    # ------------------------------------------------------------------ recommending
    def recommend(self, items_context: Sequence[str], k: int, exclude: Iterable[str] = (),
                  at_ms: int | None = None) -> list[Rec]:
        """The ``k`` items most co-occurring with ``items_context`` (oldest first: the last
        items weigh most), best first: ``[(item_id, score, why), ...]``.

        ``score`` = Σ over the last :attr:`RecsConfig.context` context items ``i`` of
        ``position_decay ** r(i) * (v(i, j) + buy_weight * b(i, j)) / norm`` where ``v``, ``b``
        are the stored view and basket co-occurrences and ``norm`` = ``sqrt(pop(i) * pop(j))``
        with :attr:`RecsConfig.cosine` (else 1); the scores of one call are comparable with each
        other, not across calls. ``why`` names the context item that contributed most, e.g.
        ``"viewed with p123 in 14 sessions"`` or ``"bought with p123 in 2 orders"``. Items of the
        context and of ``exclude`` are never recommended. With
        :attr:`RecsConfig.fill_popular`, the rest of the list is the most popular items
        (``why`` = ``"popular: viewed in N sessions"``, score 0). Read-only; ties are broken by
        item id (deterministic). With ``at_ms`` (epoch ms) and without cosine, scores are
        decayed to that event time (a score is then a position-weighted count of decayed
        co-occurrences); else they are as stored (forward-decayed: comparable within the call).
        """
        if k <= 0:
            return []
        cfg = self.cfg
        ctx = [x for x in dict.fromkeys(reversed(items_context)) if isinstance(x, str)][:cfg.context]  # newest first
        banned = set(items_context)
        banned.update(exclude)
        bw = cfg.buy_weight
        scores: dict[str, float] = {}
        get = scores.get
        items = self.items
        pd = cfg.position_decay
        w = 1.0
        nodes: list[tuple[str, _Item, float]] = []  # (context item, its node, its position weight)
        for i in ctx:
            node = items.get(i)
            if node is not None and node.nb:
                nodes.append((i, node, w))
                if cfg.cosine:
                    pi = node.pop
                    for j, e in node.nb.items():
                        other = items.get(j)
                        pj = other.pop if other is not None else 0.0
                        denom = math.sqrt(pi * pj) if pi > 0 and pj > 0 else 1.0
                        scores[j] = get(j, 0.0) + w * (e[0] + bw * e[1]) / denom
                elif bw:
                    for j, e in node.nb.items():
                        scores[j] = get(j, 0.0) + w * (e[0] + bw * e[1])
                else:
                    for j, e in node.nb.items():
                        scores[j] = get(j, 0.0) + w * e[0]
            w *= pd
        for j in banned:
            scores.pop(j, None)
        ranked = heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))
        f = 1.0
        if at_ms is not None and not cfg.cosine and cfg.half_life_ms and self.landmark is not None:
            f = 2.0 ** (-(at_ms - self.landmark) / cfg.half_life_ms)
        out: list[Rec] = []
        for j, sc in ranked:  # the reason: the context item that contributed most (the first on a tie)
            top_c, why = -1.0, ""
            for i, node, wi in nodes:
                e = node.nb.get(j)
                if e is not None:
                    c = wi * (e[0] + bw * e[1])
                    if cfg.cosine:
                        other = items.get(j)
                        pj = other.pop if other is not None else 0.0
                        c /= math.sqrt(node.pop * pj) if node.pop > 0 and pj > 0 else 1.0
                    if c > top_c:
                        top_c, why = c, _why(i, e, bw)
            out.append((j, sc * f, why))
        if len(out) < k and cfg.fill_popular and self.top:
            have = {j for j, _, _ in out} | banned
            need = k - len(out) + len(have)
            for j, _p in heapq.nsmallest(need, self.top.items(), key=lambda kv: (-kv[1], kv[0])):
                if len(out) >= k:
                    break
                if j in have:
                    continue
                node = items.get(j)
                n = node.n if node is not None else 0
                out.append((j, 0.0, f"popular: viewed in {n} session{'s' if n != 1 else ''}"))
        return out

    def neighbours(self, item: str) -> dict[str, Entry]:
        """The stored neighbours of ``item`` (a copy): ``{id: (view weight, basket weight, view
        sessions, baskets)}``, weights forward-decayed (see :meth:`decayed`)."""
        node = self.items.get(item)
        return {} if node is None else dict(node.nb)

    def top_pairs(self, n: int = 10) -> list[tuple[str, str, int, int]]:
        """The ``n`` pairs seen in the most sessions (each unordered pair once):
        ``[(a, b, view sessions, baskets), ...]`` (for reports)."""
        seen = []
        for a, node in self.items.items():
            for b, e in node.nb.items():
                if a < b:
                    seen.append((a, b, e[2], e[3]))
        return heapq.nsmallest(n, seen, key=lambda r: (-(r[2] + r[3]), r[0], r[1]))

    def stats(self) -> dict[str, int]:
        """Items, neighbour entries, evicted items and pruned entries so far."""
        return {"items": len(self.items), "pairs": self.pairs, "evicted_items": self.evicted_items,
                "pruned_entries": self.pruned_entries}


def _ok(x: object) -> bool:
    return isinstance(x, str) and 0 < len(x) <= MAX_ID_CHARS


def _why(i: str, e: Entry, bw: float) -> str:
    if bw > 0 and e[3] > 0 and (e[2] == 0 or bw * e[1] >= e[0]):
        n = e[3]
        return f"bought with {i} in {n} order{'s' if n != 1 else ''}"
    n = e[2]
    return f"viewed with {i} in {n} session{'s' if n != 1 else ''}"
