"""Per-event cost of ``clickpulse.events.contract.parse`` on the bundled REES46 events: the compiled
validator (the default) beside the jsonschema-only reference path (``parse(..., reference=True)``),
in the same run, over the same messages.

    .venv/bin/python benchmarks/parse_cost.py [--repeat 5]

Prints µs per event (mean over the 4,999 events, best of ``--repeat`` passes, after one warm-up
pass that also compiles the validators) for both paths, and their ratio. No Kafka: raw bytes in,
canonical events out, as the worker's ingest agent calls it.
"""

from __future__ import annotations

import argparse
import time

import orjson

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46


def cost_us(values: list[bytes], received_ms: int, repeat: int, reference: bool) -> float:
    """Best-of-``repeat`` mean µs per ``parse`` call over ``values``."""
    for v in values:  # warm-up: compiles the validator, fills caches
        parse(v, None, received_ms=received_ms, reference=reference)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for v in values:
            parse(v, None, received_ms=received_ms, reference=reference)
        best = min(best, (time.perf_counter_ns() - t0) / len(values) / 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed passes per path (best is printed)")
    args = ap.parse_args()
    raw = list(read_rees46(BUNDLED_SAMPLE))
    values = [orjson.dumps(e) for e in raw]
    received_ms = max(e["timestamp"] for e in raw)  # the sample's last event time: no clamping
    old = cost_us(values, received_ms, args.repeat, reference=True)
    new = cost_us(values, received_ms, args.repeat, reference=False)
    print(f"contract.parse over {len(values)} REES46 events (best of {args.repeat} passes):")
    print(f"  jsonschema (reference=True)  {old:8.1f} µs/event")
    print(f"  compiled (default)           {new:8.1f} µs/event")
    print(f"  speed-up                     {old / new:8.1f} x")


if __name__ == "__main__":
    main()
