#!/usr/bin/env python
"""Per-event CPU cost of the online models: ``OnlineModel.score`` (predict) and ``OnlineModel.learn``.

Run from the repository root (no services needed)::

    .venv/bin/python benchmarks/model_cost.py [--pipelines logreg,arf,hoeffding] [--learn 2000]
                                              [--calls 20000] [--seed 42] [--json]

For each pipeline of ``clickpulse.models.online.PIPELINES``:

1. The bundled UCI Online Shoppers file (``clickpulse.models.evaluate.uci_rows``, 76 features per
   session) is shuffled with ``random.Random(seed)``.
2. A fresh ``OnlineModel("intent", pipeline, seed)`` learns the first ``--learn`` rows (default
   2,000); every ``learn`` call is timed on its own -> **learn** mean / p50 / p99.
3. 1,000 untimed warm-up calls, then ``--calls`` (default 20,000) ``score`` calls on the held-out
   rows (cycled), each timed on its own with ``time.perf_counter_ns`` -> **predict** mean / p50 /
   p99. The model does not learn during this phase, so every call sees the same model.

Percentiles are nearest-rank. The timer's own cost (two back-to-back ``perf_counter_ns`` calls,
median) is printed and **not** subtracted. Garbage collection stays enabled, as in the worker.
The target for the default pipeline (``logreg``) is <= 20 µs per predict. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runnable without an installed package too
    sys.path.insert(0, str(REPO / "src"))

from clickpulse.models.evaluate import BUNDLED_UCI, uci_rows  # noqa: E402
from clickpulse.models.online import PIPELINES, OnlineModel  # noqa: E402

TARGET_PREDICT_US = {"logreg": 20.0}


def nearest_rank(sorted_values: list[int], q: float) -> int:
    """The q-quantile (0 < q <= 1) of an ascending list, nearest-rank method."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summary_us(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {"mean_us": statistics.fmean(s) / 1e3, "p50_us": nearest_rank(s, 0.50) / 1e3,
            "p99_us": nearest_rank(s, 0.99) / 1e3, "max_us": s[-1] / 1e3, "n": len(s)}


def timer_overhead_ns(n: int = 20_000) -> int:
    clock = time.perf_counter_ns
    d = []
    for _ in range(n):
        t0 = clock()
        d.append(clock() - t0)
    return int(statistics.median(d))


def measure(pipeline: str, rows: list[tuple[dict[str, float], bool]], learn_n: int, calls: int,
            seed: int) -> dict[str, Any]:
    clock = time.perf_counter_ns
    model = OnlineModel("intent", pipeline, seed=seed)
    learn_ns = []
    for x, y in rows[:learn_n]:
        t0 = clock()
        model.learn(x, y)
        learn_ns.append(clock() - t0)
    held_out = [x for x, _ in rows[learn_n:]] or [x for x, _ in rows]
    for i in range(1000):
        model.score(held_out[i % len(held_out)])
    predict_ns = []
    append = predict_ns.append
    score = model.score
    for i in range(calls):
        x = held_out[i % len(held_out)]
        t0 = clock()
        score(x)
        append(clock() - t0)
    return {"pipeline": pipeline, "learned": model.examples, "learn": summary_us(learn_ns),
            "predict": summary_us(predict_ns), "target_predict_us": TARGET_PREDICT_US.get(pipeline)}


def table(results: list[dict[str, Any]]) -> str:
    head = ["pipeline", "predict mean µs", "p50", "p99", "learn mean µs", "p50", "p99", "predict target"]
    lines = [head]
    for r in results:
        p, ln, tgt = r["predict"], r["learn"], r["target_predict_us"]
        verdict = "" if tgt is None else f"<= {tgt:g} µs: {'met' if p['mean_us'] <= tgt else 'NOT met'} (mean)"
        lines.append([r["pipeline"], f"{p['mean_us']:.1f}", f"{p['p50_us']:.1f}", f"{p['p99_us']:.1f}",
                      f"{ln['mean_us']:.1f}", f"{ln['p50_us']:.1f}", f"{ln['p99_us']:.1f}", verdict])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(c.ljust(widths[i]) if i in (0, 7) else c.rjust(widths[i]) for i, c in enumerate(line)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated names (default: all)")
    ap.add_argument("--learn", type=int, default=2000, help="UCI rows learned before predicting (default 2000)")
    ap.add_argument("--calls", type=int, default=20_000, help="timed score calls per pipeline (default 20000)")
    ap.add_argument("--seed", type=int, default=42, help="shuffle and model seed (default 42)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in PIPELINES]
    if unknown:
        ap.error(f"unknown pipelines {unknown}; choose from {sorted(PIPELINES)}")
    rows = list(uci_rows(BUNDLED_UCI))
    random.Random(args.seed).shuffle(rows)
    results = [measure(n, rows, args.learn, args.calls, args.seed) for n in names]
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "timer_overhead_ns": timer_overhead_ns(), "features_per_row": len(rows[0][0]),
            "learned_rows": args.learn, "predict_calls": args.calls, "seed": args.seed}
    if args.json:
        print(json.dumps({"info": info, "results": results}, indent=2))
        return 0
    import river
    print(f"OnlineModel cost per event: learn on {args.learn:,} shuffled UCI rows (each call timed), then "
          f"{args.calls:,} timed score calls on held-out rows; {info['features_per_row']} features per row; "
          f"Python {info['python']}, River {river.__version__}, {info['machine']}; "
          f"timer overhead ~{info['timer_overhead_ns']} ns per measurement (not subtracted)")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
