"""Next-item recommendation, one progressive pass (recommend top-10, score against the next item
viewed, then learn), on the bundled REES46 and Diginetica samples: the shipped co-occurrence
model beside a popularity baseline and plain cosine item-kNN baselines, in the same run.

    .venv/bin/python benchmarks/recs_eval.py [--dataset rees46|diginetica|all] [--k 10]
    (the same as: .venv/bin/clickpulse evaluate recs --dataset all)

Prints HR@k and MRR@k per method, the time each method spent (recommend + learn, µs per event of
the file) and the model's memory after the pass (tracemalloc). See docs/recommendations.md.
"""

from __future__ import annotations

import argparse

from clickpulse.recs.evaluate import run_cli


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="all", help="rees46 | diginetica | all")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    raise SystemExit(run_cli(args.dataset, args.k))


if __name__ == "__main__":
    main()
