"""Per-event cost of the business metrics (clickpulse.metrics.business) on the worker's path:
the engine step over the REES46 sample with and without ``Engine.observe_user = user_view``
(+ ``BusinessMetrics.observe_emitted``), interleaved in the same run, CPU time of this thread.

    .venv/bin/python benchmarks/business_cost.py [--repeat 7]

The baseline is the same engine (default rules, recommendations, no models) without the
observer; the figure is the difference of the medians, in µs per event.
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.metrics.business import BusinessMetrics, user_view
from clickpulse.testing import memory_engine

BATCH = 500


def run(events: list[dict], observe: bool) -> float:
    """CPU seconds of one replay (steps, commits and, when ``observe``, the metrics)."""
    eng = memory_engine()
    bm = BusinessMetrics()
    if observe:
        eng.observe_user = user_view
    items = [(int(e["user_id"]) % 4, e) for e in events]
    t0 = time.thread_time()
    for i in range(0, len(items), BATCH):
        em = eng.step(items[i:i + BATCH], 0)
        eng.commit(em)
        if observe:
            bm.observe_emitted(em)
    elapsed = time.thread_time() - t0
    if observe:
        assert bm.snapshot()["sessions"] == 1753
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    events = [parse(orjson.dumps(raw), None) for raw in read_rees46(BUNDLED_SAMPLE)]
    n = len(events)
    run(events, False), run(events, True)  # warm-up
    base, with_bm = [], []
    for _ in range(args.repeat):
        base.append(run(events, False))
        with_bm.append(run(events, True))
    b, w = statistics.median(base), statistics.median(with_bm)
    print(f"REES46 sample, {n} events, batch {BATCH}, {args.repeat} interleaved runs, CPU time (median)")
    print(f"  engine step (default rules, recs), baseline   {1e6 * b / n:7.1f} µs/event")
    print(f"  + business metrics (observe_user, observe)    {1e6 * w / n:7.1f} µs/event")
    print(f"  business metrics' share                       {1e6 * (w - b) / n:+7.1f} µs/event "
          f"({100 * (w - b) / b:+.1f} %)")


if __name__ == "__main__":
    main()
