"""Progressive evaluation of next-item recommendation on session datasets, beside baselines.

One pass over a dataset's events in event-time order. For each view of a session that has
already viewed something: every method recommends its top ``k`` (10) from what the session has
seen so far, the list is scored against the item viewed now, then every method learns the view
(recommend first, then learn: the target is never known when it is predicted). Consecutive
repeat views of the same item are collapsed first (a reload is not a "next item"). Metrics:

* **hit rate@k** (HR@k): the share of targets found in the top ``k``;
* **MRR@k**: the mean over targets of ``1 / rank`` (0 when not in the top ``k``)

(the protocol of Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks",
ICLR 2016, section 4, and Ludewig & Jannach, "Evaluation of session-based recommendation
algorithms", UMUAI 28, 2018, here progressive instead of a train/test split). Recommendations
never include the session's own items (a product recommendation shows something new), so a
target the session already viewed earlier (not just before) is a miss for every method; its
share is reported as ``revisits``.

Methods, all learning the same events in the same order:

* :class:`Popularity` — the most viewed items so far (views counted, no decay);
* :class:`ItemKNN` — cosine similarity of the items' session vectors,
  ``n(i, j) / sqrt(n(i) * n(j))`` with ``n`` = sessions containing the items, without decay or
  bounds (Hidasi et al. 2016's Item-KNN baseline: the last item only; ``context=True`` sums over
  the session's items with the same position weights as the model);
* :class:`~clickpulse.recs.cooccurrence.CoOccurrence` — the shipped model.

Datasets: the bundled REES46 sample (``view`` rows are views; ``cart`` rows fill the session's
cart; a ``purchase`` row is an order of the cart's items and the product, as in the engine) and
the Diginetica sample (views only; see ``tests/data/diginetica/README.md``).
"""

from __future__ import annotations

import csv
import heapq
import math
import time
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ..errors import DatasetError
from ..ingest.datasets import BUNDLED_SAMPLE, REES46_COLUMNS, rees46_time_ms
from .cooccurrence import CoOccurrence, RecsConfig

#: The Diginetica sample lives with the tests, outside the package (research-only terms: used for
#: evaluation and tests, never shipped): present in a source checkout only.
BUNDLED_DIGINETICA = (Path(__file__).resolve().parents[3] / "tests" / "data" / "diginetica"
                      / "sample_train-item-views.csv")
DATASETS: dict[str, Path] = {"rees46": BUNDLED_SAMPLE, "diginetica": BUNDLED_DIGINETICA}
DIGINETICA_COLUMNS = ["session_id", "user_id", "item_id", "timeframe", "eventdate"]


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One event of a session dataset: ``kind`` is ``view``, ``cart`` or ``purchase``."""

    session: str
    t_ms: int
    kind: str
    item: str


def rees46_sessions(path: str | Path = BUNDLED_SAMPLE) -> list[SessionEvent]:
    """The REES46 rows as session events, in file (event-time) order.

    Raises
    ------
    DatasetError
        Missing file, a header that is not REES46's, or a bad row.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"no such file: {p}")
    out = []
    kinds = {"view": "view", "cart": "cart", "purchase": "purchase"}
    with p.open(newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header != REES46_COLUMNS:
            raise DatasetError(f"{p}: header {header} is not the REES46 header {REES46_COLUMNS}")
        for n, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(REES46_COLUMNS):
                raise DatasetError(f"{p}:{n}: {len(row)} fields, expected {len(REES46_COLUMNS)}")
            kind = kinds.get(row[1])
            if kind is None or not row[2] or not row[8]:
                continue
            out.append(SessionEvent(row[8], rees46_time_ms(row[0]), kind, row[2]))
    return out


def diginetica_sessions(path: str | Path = BUNDLED_DIGINETICA) -> list[SessionEvent]:
    """The Diginetica views as session events, ordered by (day, session id, timeframe); event
    time = the day at 00:00 UTC + ``timeframe`` ms.

    Raises
    ------
    DatasetError
        Missing file, a header that is not Diginetica's, or a bad row.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"no such file: {p} (the Diginetica sample is research-only: it is in a source checkout, "
                           "tests/data/diginetica/, never in the package; see its README.md there)")
    rows: list[tuple[int, int, int, str]] = []
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=";")
        header = next(reader, None)
        if header != DIGINETICA_COLUMNS:
            raise DatasetError(f"{p}: header {header} is not the Diginetica header {DIGINETICA_COLUMNS}")
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                sid, item, tf = int(row[0]), row[2], int(row[3])
                day = datetime.strptime(row[4], "%Y-%m-%d").replace(tzinfo=UTC)
            except (ValueError, IndexError) as err:
                raise DatasetError(f"{p}:{n}: {err}") from err
            rows.append((int(day.timestamp() * 1000), sid, tf, item))
    rows.sort()
    return [SessionEvent(str(sid), day + tf, "view", item) for day, sid, tf, item in rows]


def load(dataset: str) -> list[SessionEvent]:
    """``rees46`` or ``diginetica`` (the bundled samples).

    Raises
    ------
    DatasetError
        An unknown name.
    """
    if dataset == "rees46":
        return rees46_sessions()
    if dataset == "diginetica":
        return diginetica_sessions()
    raise DatasetError(f"unknown dataset {dataset!r}: rees46 or diginetica")


class Method(Protocol):
    def recommend(self, items_context: Sequence[str], k: int) -> list[Any]: ...
    def observe_view(self, context: Sequence[str], item: str, t_ms: int) -> None: ...
    def observe_basket(self, items: Iterable[str], t_ms: int) -> None: ...


class Popularity:
    """The most viewed items so far (every view counts; no decay); the session's items excluded."""

    def __init__(self, keep: int = 256) -> None:
        self.counts: dict[str, int] = {}
        self.top: dict[str, int] = {}
        self.keep = keep

    def observe_view(self, context: Sequence[str], item: str, t_ms: int) -> None:
        c = self.counts[item] = self.counts.get(item, 0) + 1
        top = self.top
        if item in top or len(top) < 2 * self.keep or c > min(top.values()):
            top[item] = c
            if len(top) > 2 * self.keep:
                self.top = dict(heapq.nlargest(self.keep, top.items(), key=lambda kv: (kv[1], kv[0])))

    def observe_basket(self, items: Iterable[str], t_ms: int) -> None:
        return None

    def recommend(self, items_context: Sequence[str], k: int) -> list[tuple[str, float, str]]:
        banned = set(items_context)
        pool = self.top if len(self.top) >= k + len(banned) else self.counts
        ranked = heapq.nsmallest(k + len(banned), pool.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(j, float(c), "popular") for j, c in ranked if j not in banned][:k]


class ItemKNN:
    """Cosine item-kNN on session co-occurrence, no decay, no bounds (see the module docstring)."""

    def __init__(self, context: bool = False, position_decay: float = 0.7, window: int = 10) -> None:
        self.n: dict[str, int] = {}
        self.co: dict[str, dict[str, int]] = {}
        self.context = context
        self.position_decay = position_decay
        self.window = window

    def observe_view(self, context: Sequence[str], item: str, t_ms: int) -> None:
        if item in context:
            return
        self.n[item] = self.n.get(item, 0) + 1
        mine = self.co.setdefault(item, {})
        for y in dict.fromkeys(context[-self.window:]):
            mine[y] = mine.get(y, 0) + 1
            other = self.co.setdefault(y, {})
            other[item] = other.get(item, 0) + 1

    def observe_basket(self, items: Iterable[str], t_ms: int) -> None:
        return None

    def recommend(self, items_context: Sequence[str], k: int) -> list[tuple[str, float, str]]:
        ctx = list(dict.fromkeys(reversed(items_context)))[:self.window if self.context else 1]
        banned = set(items_context)
        scores: dict[str, float] = {}
        w = 1.0
        for i in ctx:
            ni = self.n.get(i, 0)
            for j, c in self.co.get(i, {}).items():
                if j in banned:
                    continue
                nj = self.n.get(j, 0)
                if ni and nj:
                    scores[j] = scores.get(j, 0.0) + w * c / math.sqrt(ni * nj)
            w *= self.position_decay
        return [(j, s, "") for j, s in heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclass
class Result:
    """One method's figures over one pass."""

    label: str
    targets: int = 0
    hits: int = 0
    rr: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.targets if self.targets else 0.0

    @property
    def mrr(self) -> float:
        return self.rr / self.targets if self.targets else 0.0


@dataclass
class Pass:
    """What :func:`progressive` saw: events, sessions, items, targets, revisits, and per method."""

    events: int = 0
    sessions: int = 0
    items: int = 0
    targets: int = 0
    revisits: int = 0
    results: list[Result] = field(default_factory=list)


def progressive(events: Iterable[SessionEvent], methods: Sequence[tuple[str, Method]], k: int = 10) -> Pass:
    """One progressive pass (see the module docstring): for each view with a non-empty session
    context, each method recommends ``k`` from the context, is scored on the viewed item, then
    learns the view. ``cart`` events add to the session's cart; a ``purchase`` is an order of the
    cart's items and the product (``observe_basket``), and empties the cart.

    Returns
    -------
    Pass
        Figures per method in the order given; ``seconds`` = time in that method's
        ``recommend`` + ``observe_*`` calls.
    """
    out = Pass(results=[Result(label) for label, _ in methods])
    seen: dict[str, dict[str, None]] = {}   # session -> its items, least recently viewed first
    last: dict[str, str] = {}               # session -> item viewed last
    carts: dict[str, dict[str, None]] = {}
    items: set[str] = set()
    clock = time.perf_counter
    for ev in events:
        out.events += 1
        items.add(ev.item)
        s = ev.session
        if ev.kind == "cart":
            carts.setdefault(s, {})[ev.item] = None
            continue
        if ev.kind == "purchase":
            basket = [*carts.pop(s, {}), ev.item]
            for (_, m), r in zip(methods, out.results, strict=True):
                t0 = clock()
                m.observe_basket(basket, ev.t_ms)
                r.seconds += clock() - t0
            continue
        if last.get(s) == ev.item:
            continue  # a repeat view of the item just viewed
        ctx_d = seen.get(s)
        if ctx_d is None:
            ctx_d = seen[s] = {}
            out.sessions += 1
        ctx = list(ctx_d)
        if ctx:
            out.targets += 1
            if ev.item in ctx_d:
                out.revisits += 1
            for (_, m), r in zip(methods, out.results, strict=True):
                t0 = clock()
                recs = m.recommend(ctx, k)
                r.seconds += clock() - t0
                r.targets += 1
                for rank, rec in enumerate(recs[:k], start=1):
                    if rec[0] == ev.item:
                        r.hits += 1
                        r.rr += 1.0 / rank
                        break
        for (_, m), r in zip(methods, out.results, strict=True):
            t0 = clock()
            m.observe_view(ctx, ev.item, ev.t_ms)
            r.seconds += clock() - t0
        ctx_d.pop(ev.item, None)
        ctx_d[ev.item] = None
        last[s] = ev.item
    out.items = len(items)
    return out


def default_methods(cfg: RecsConfig | None = None) -> list[tuple[str, Method]]:
    """The table's rows: the baselines, the shipped model and two ablations of it."""
    cfg = cfg or RecsConfig()
    days = cfg.half_life_ms / 86_400_000
    return [
        ("popularity (views so far)", Popularity()),
        ("item-kNN cosine, last item (no decay)", ItemKNN(context=False)),
        ("item-kNN cosine, session (no decay)", ItemKNN(context=True, position_decay=cfg.position_decay,
                                                        window=cfg.context)),
        (f"co-occurrence (shipped: half-life {days:g} d, {cfg.neighbours} nbrs)", CoOccurrence(cfg)),
        ("co-occurrence without decay", CoOccurrence(RecsConfig(**{**_fields(cfg), "half_life_ms": 0}))),
        ("co-occurrence with cosine normalisation", CoOccurrence(RecsConfig(**{**_fields(cfg), "cosine": True}))),
        ("co-occurrence without the popular fill", CoOccurrence(RecsConfig(**{**_fields(cfg), "fill_popular": False}))),
    ]


def _fields(cfg: RecsConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in RecsConfig.__dataclass_fields__}


def memory_per_item(events: Sequence[SessionEvent], cfg: RecsConfig | None = None) -> dict[str, float]:
    """Bytes the model allocates (``tracemalloc``) after learning ``events``: per item and per
    neighbour entry (a least-squares split of the two is not attempted: per item = total / items)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        m = CoOccurrence(cfg or RecsConfig())
        res = progressive(events, [("m", m)], k=10)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    st = m.stats()
    del res
    return {"bytes": float(used), "items": float(st["items"]), "pairs": float(st["pairs"]),
            "per_item": used / max(1, st["items"]), "per_pair": used / max(1, st["pairs"])}


def format_table(name: str, p: Pass, k: int = 10) -> str:
    """A fixed-width table of one pass (one line per method)."""
    head = (f"dataset {name}: {p.events:,} events, {p.sessions:,} sessions, {p.items:,} items, {p.targets:,} targets "
            f"(next item viewed; {p.revisits:,} = {100 * p.revisits / max(1, p.targets):.1f} % revisit an item "
            f"the session already viewed: a miss for every method)")
    w = max(len(r.label) for r in p.results)
    lines = [head, f"{'method':<{w}}  HR@{k:<3}  MRR@{k:<3} µs/event", f"{'-' * w}  ------  ------  --------"]
    for r in p.results:
        us = 1e6 * r.seconds / max(1, p.events)
        lines.append(f"{r.label:<{w}}  {r.hit_rate:6.3f}  {r.mrr:6.3f}  {us:8.1f}")
    return "\n".join(lines)


def run(datasets: Sequence[str], k: int = 10, cfg: RecsConfig | None = None) -> list[tuple[str, Pass]]:
    """:func:`progressive` with :func:`default_methods` on each dataset."""
    return [(d, progressive(load(d), default_methods(cfg), k)) for d in datasets]


def iter_datasets(choice: str) -> Iterator[str]:
    """``all`` -> both bundled datasets; a name -> itself."""
    yield from (("rees46", "diginetica") if choice == "all" else (choice,))


def run_cli(dataset: str = "all", k: int = 10, cfg: RecsConfig | None = None) -> int:
    """``clickpulse evaluate recs``: print the table for each dataset, then the model's memory."""
    names = list(iter_datasets(dataset))
    for name in names:
        if name not in DATASETS:
            raise DatasetError(f"unknown dataset {name!r}: rees46, diginetica or all")
    cfg = cfg or RecsConfig()
    for name, p in run(names, k, cfg):
        print(format_table(name, p, k))
        print()
    mem = memory_per_item(load(names[-1]), cfg)
    print(f"model memory after {names[-1]} ({int(mem['items']):,} items, {int(mem['pairs']):,} neighbour entries): "
          f"{mem['bytes'] / 1e6:.2f} MB = {mem['per_item']:.0f} B per item, {mem['per_pair']:.0f} B per entry "
          f"(tracemalloc, ids included)")
    print(f"bounds: <= {cfg.max_items:,} items x <= {cfg.neighbours + cfg.neighbours // 2} neighbours each; "
          "HR@k / MRR@k: recommend first, then learn; the session's own items are never recommended.")
    return 0
