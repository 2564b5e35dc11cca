"""A broker-free model of the worker's crash recovery, to search kill points exhaustively.

It drives the real :class:`~clickpulse.engine.Engine` the way ``clickpulse.app`` does (batch
step, actions acknowledged before the changelog, the partition's clock log written last, offsets
committed only after the changelog is acknowledged) over the bundled REES46 sample, SIGKILLs it
at a chosen point, rebuilds a fresh engine from what a changelog topic would hold, and lets it
re-read from the committed offsets:

* the changelog of the batch in flight is cut at an arbitrary point of its per-partition send
  order (Kafka acknowledges a partition's records in order), the committed offsets are those of
  an earlier batch (Faust commits about once a second);
* ``hops=2``: the raw topic is forwarded by an ingest stage that had forwarded more than the
  process stage consumed and committed less than it forwarded; after the crash it forwards again
  from its committed raw offsets, so the valid topic holds each re-forwarded event twice;
* the stream interleaves partitions in chunks of random sizes (as a consumer's fetches do).

:func:`run` returns the actions published over both lives and the crash-free run's, so a test
can assert "none lost, duplicates identical except created_at".
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from clickpulse.engine import CLOCK_KEY_PREFIX, clock_key
from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.store import key_partition
from clickpulse.testing import memory_engine

RAW, VALID = "ns.events.raw", "ns.events.valid"


@functools.lru_cache(maxsize=2)
def sample(partitions: int) -> list[list[dict[str, Any]]]:
    """The sample's canonical events per partition (Kafka's murmur2 on the user key), file order."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(partitions)]
    for raw in read_rees46(BUNDLED_SAMPLE):
        ev = parse(orjson.dumps(raw), None)
        out[key_partition(ev["user_key"].encode(), partitions)].append(ev)
    return out


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    event: dict[str, Any]
    source: tuple[int, int] | None = None  # (raw partition, raw offset) of a forwarded event


@dataclass
class Life:
    """One worker process: its engine and what it published."""

    partitions: int
    table: dict[bytes, bytes]
    dedup: int = 32
    actions: list[dict[str, Any]] = field(default_factory=list)
    changelog: list[list[tuple[bytes, bytes | None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = memory_engine(live=False, dedup=self.dedup)
        self.engine.table = self.table
        if not self.changelog:
            self.changelog = [[] for _ in range(self.partitions)]

    def place(self, key: bytes) -> int:
        return key_partition(key, self.partitions)

    def batch(self, msgs: list[Msg], cut: float | None = None) -> None:
        """Process one batch as ``clickpulse.app`` does; ``cut``: the fraction of the batch's
        changelog records (in send order) the broker acknowledged before the SIGKILL."""
        eng = self.engine
        items = [(m.partition, m.event) for m in msgs
                 if not eng.redelivered(m.partition, m.topic, m.offset, m.source)]
        em = eng.step(items, 0)
        assert not em.failed, em.failed
        eng.commit(em)
        self.actions += em.actions
        last: dict[int, dict[str, int]] = {}
        for m in msgs:
            last.setdefault(m.partition, {})[m.topic] = m.offset
        recs: list[tuple[bytes, bytes | None]] = [(k.encode(), v) for k, v in em.changed.items()]
        for p, offs in last.items():
            blob = eng.checkpoint(p, offs)
            k = clock_key(p, self.place)
            self.table[k] = blob
            recs.append((k, blob))
        if cut is not None:
            recs = recs[:int(len(recs) * cut)]
        for k, v in recs:
            self.changelog[self.place(k)].append((k, v))


def recovered(changelog: list[list[tuple[bytes, bytes | None]]]) -> dict[bytes, bytes]:
    table: dict[bytes, bytes] = {}
    for part in changelog:
        for k, v in part:
            if v is None:
                table.pop(k, None)
            else:
                table[k] = v
    return table


def interleave(queues: dict[int, list[Msg]], rng: random.Random, chunk: int) -> list[Msg]:
    """The partitions' messages merged in chunks of 1..chunk (a consumer's fetches)."""
    pos = {p: 0 for p in queues}
    out: list[Msg] = []
    while any(pos[p] < len(q) for p, q in queues.items()):
        p = rng.choice([p for p, q in queues.items() if pos[p] < len(q)])
        n = rng.randint(1, chunk)
        out += queues[p][pos[p]:pos[p] + n]
        pos[p] += n
    return out


def batches(stream: list[Msg], rng: random.Random, size: int, per_user: int = 32) -> list[list[Msg]]:
    """Batches of 1..size messages, cut earlier where a user would have more than ``per_user``
    events in one (as the worker does: ``clickpulse.app``, the de-duplication depth)."""
    out, i = [], 0
    while i < len(stream):
        n = rng.randint(1, size)
        users: dict[str, int] = {}
        b = []
        for m in stream[i:i + n]:
            u = m.event["user_key"]
            if users.get(u, 0) >= per_user:
                break
            users[u] = users.get(u, 0) + 1
            b.append(m)
        out.append(b)
        i += len(b)
    return out


def end_of_input(life: Life) -> None:
    for p in range(life.partitions):
        for src in range(life.partitions):
            em = life.engine.end_of_input_step(p, src, life.partitions, 0)
            life.engine.commit(em)
            life.actions += em.actions


def crash_free(partitions: int, dedup: int = 32) -> list[dict[str, Any]]:
    return crash_free_run(partitions, dedup)[0]


@functools.lru_cache(maxsize=4)
def crash_free_run(partitions: int, dedup: int = 32) -> tuple[list[dict[str, Any]], dict[bytes, bytes]]:
    """The actions and the final user states of a run without a crash."""
    eng = memory_engine(live=False, dedup=dedup)
    out = []
    for raw in read_rees46(BUNDLED_SAMPLE):
        ev = parse(orjson.dumps(raw), None)
        out += eng.process(key_partition(ev["user_key"].encode(), partitions), ev, 0)[1]
    for p in range(partitions):
        for src in range(partitions):
            out += eng.end_of_input(p, src, partitions, 0)
    return out, {k: v for k, v in eng.table.items() if not k.startswith(CLOCK_KEY_PREFIX)}


def run(seed: int, hops: int = 2, partitions: int = 4, chunk: int = 400, batch: int = 300,
        dedup: int = 32) -> tuple[list, list]:
    """Kill one worker at a random point, restart, flush; returns ``(published, crash_free)``
    actions (published over both lives, in order). ``dedup``: the engine's de-duplication depth
    (``CLICKPULSE_DEDUP_IDS_PER_USER``; the worker keeps a user's events per batch within it)."""
    rng = random.Random(seed)
    events = sample(partitions)
    topic = VALID if hops == 2 else RAW
    # -- first life: the process stage reads a prefix of what was forwarded --------------------
    if hops == 2:
        forwarded = {p: rng.randint(len(events[p]) // 10, len(events[p])) for p in range(partitions)}
        valid = {p: [Msg(VALID, p, i, ev, (p, i)) for i, ev in enumerate(events[p][:forwarded[p]])]
                 for p in range(partitions)}
    else:
        valid = {p: [Msg(RAW, p, i, ev) for i, ev in enumerate(events[p])] for p in range(partitions)}
    stream = interleave(valid, rng, chunk)
    stream = stream[:rng.randint(len(stream) // 10, len(stream) * 9 // 10)]
    bs = batches(stream, rng, batch, dedup)
    one = Life(partitions, {}, dedup)
    kill = len(bs) - 1
    commit_at = rng.randint(max(0, kill - 30), kill) if kill > 0 else 0  # batches before this one committed
    committed: dict[tuple[str, int], int] = {}
    for i, b in enumerate(bs):
        one.batch(b, cut=rng.random() if i == kill else None)
        if i < commit_at:
            for m in b:
                committed[(m.topic, m.partition)] = m.offset + 1
    # -- second life: recovered table, re-read from the committed offsets ----------------------
    table = recovered(one.changelog)
    two = Life(partitions, table, dedup, changelog=[list(c) for c in one.changelog])
    two.engine.restore(range(partitions), list(table.items()), 0, committed)
    if hops == 2:  # the ingest forwards again from its committed raw offsets, then the rest
        for p in range(partitions):
            ingest_committed = rng.randint(0, forwarded[p])
            again = events[p][ingest_committed:]
            base = len(valid[p])
            valid[p] = valid[p] + [Msg(VALID, p, base + j, ev, (p, ingest_committed + j)) for j, ev in enumerate(again)]
    rest = {p: [m for m in q if m.offset >= committed.get((topic, p), 0)] for p, q in valid.items()}
    for b in batches(interleave(rest, rng, chunk), rng, batch, dedup):
        two.batch(b)
    end_of_input(two)
    global last_states
    last_states = {k: v for k, v in two.table.items() if not k.startswith(CLOCK_KEY_PREFIX)}
    return one.actions + two.actions, crash_free(partitions, dedup)


#: the user states at the end of the last :func:`run` (after the restart and the flush)
last_states: dict[bytes, bytes] = {}
