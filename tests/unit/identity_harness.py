"""A broker-free model of the worker's two identity hops, for the identity tests.

One :class:`clickpulse.engine.Engine` owns ``partitions`` partitions (as one worker does); each
partition has a FIFO of the valid topic and one of the identity topic. Events are routed as the
worker's ingest routes them (:func:`clickpulse.engine.identity.route`, Kafka's murmur2
partitioner); the step's forwarded events go back to the valid FIFO of their customer's
partition and its merge records to the identity FIFO (or are held back, to deliver a merge
record after the customer's own later events).
"""

from __future__ import annotations

import collections
from typing import Any

from clickpulse.engine import Emitted, Engine
from clickpulse.engine.identity import route
from clickpulse.store import key_partition
from clickpulse.testing import memory_engine


class Cluster:
    def __init__(self, partitions: int = 4, engine: Engine | None = None, batch: int = 500, **kw: Any) -> None:
        self.engine = engine if engine is not None else memory_engine(**kw)
        self.n = partitions
        self.batch = batch
        self.valid: dict[int, collections.deque] = {p: collections.deque() for p in range(partitions)}
        self.identity: dict[int, collections.deque] = {p: collections.deque() for p in range(partitions)}
        self.hold_merges = False
        self.held: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.merges: list[dict[str, Any]] = []
        self.forwards: list[dict[str, Any]] = []
        self.aliases: dict[str, str | None] = {}
        self.segment_changes: list[dict[str, Any]] = []
        self.examples: list[dict[str, Any]] = []

    def partition(self, key: str) -> int:
        return key_partition(key.encode(), self.n)

    def send(self, *events: dict[str, Any], run: bool = True) -> None:
        """Ingest canonical events (copies, routed like the worker's ingest), then :meth:`run`."""
        for ev in events:
            ev = route(dict(ev))
            self.valid[self.partition(ev["user_key"])].append(ev)
        if run:
            self.run()

    def take(self, em: Emitted) -> Emitted:
        self.engine.commit(em)
        self.actions += em.actions
        self.segment_changes += em.segment_changes
        self.examples += em.examples
        self.aliases.update(em.aliases)
        for f in em.forwards:
            self.forwards.append(f)
            self.valid[self.partition(f["user_key"])].append(f)
        for m in em.merges:
            self.merges.append(m)
            if self.hold_merges:
                self.held.append(m)
            else:
                self.identity[self.partition(m["customer_key"])].append(m)
        return em

    def run(self) -> None:
        """Process every FIFO until all are empty (the valid topic in batches of ``batch``)."""
        busy = True
        while busy:
            busy = False
            for p in range(self.n):
                q = self.valid[p]
                if q:
                    busy = True
                    items = [(p, q.popleft()) for _ in range(min(self.batch, len(q)))]
                    em = self.take(self.engine.step(items, 0))
                    assert not em.failed, em.failed
                iq = self.identity[p]
                while iq:
                    busy = True
                    self.take(self.engine.merge_step(p, iq.popleft(), 0))

    def release(self) -> None:
        """Deliver the held merge records now."""
        self.hold_merges = False
        held, self.held = self.held, []
        for m in held:
            self.identity[self.partition(m["customer_key"])].append(m)
        self.run()

    def flush(self) -> None:
        """End of input on every partition: every pending timer fires."""
        for p in range(self.n):
            for src in range(self.n):
                self.take(self.engine.end_of_input_step(p, src, self.n, 0))
        self.run()

    def state(self, key: str) -> Any:
        return self.engine.load(key)

    def counter(self, name: str, *labels: str) -> float:
        m = getattr(self.engine.metrics, name)
        v = (m.labels(*labels) if labels else m)._value.get()
        return float(v)
