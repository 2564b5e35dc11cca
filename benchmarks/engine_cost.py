"""Per-event cost of the rules and of the models on the worker's path, measured as the difference
between the engine with and without them over the same REES46 events.

    .venv/bin/python benchmarks/engine_cost.py [--repeat 5] [--cpu]

Prints µs per event for: the state step alone, the state step + the default rules (4 segments,
5 triggers: namespace, CEL evaluation, timers), the state step + models (default pipelines,
untrained and trained on the replay's own examples), the models' share per event and per
scoring point, and the share of the item-to-item recommendations (clickpulse.recs). No Kafka: the same Engine the worker runs, over a dict table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson
from prometheus_client import CollectorRegistry

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.models.labels import ModelConfig
from clickpulse.models.registry import ModelRegistry
from clickpulse.observability.metrics import Metrics
from clickpulse.engine import Engine
from clickpulse.state.user import StateConfig
from clickpulse.recs import CoOccurrence, RecsConfig
from clickpulse.testing import default_rules

RECS_TRIGGERS = frozenset({"cart_abandonment", "browse_abandonment"})


BATCH = 500
_clock = time.perf_counter_ns  # --cpu: time.thread_time_ns


def run(events, models, rules=None, recs=False):
    recs_kw = {}
    if recs:  # the worker's default: a fresh model, recommendations in the two abandonment payloads
        recs_kw = {"recs": CoOccurrence(RecsConfig()), "recs_triggers": RECS_TRIGGERS}
    eng = Engine({}, StateConfig(), allowed_lateness_ms=60_000, idle_timeout_ms=5000, live=False,
                 metrics=Metrics(CollectorRegistry()), models=models, model_cfg=ModelConfig(), rules=rules,
                 assumed_consent=frozenset({"marketing"}), **recs_kw)
    batch = [(int(ev["user_id"]) % 4, ev) for ev in events]
    examples = []
    t0 = _clock()
    for i in range(0, len(batch), BATCH):  # the worker's path: one step per batch, then commit
        em = eng.step(batch[i:i + BATCH], 0)
        eng.commit(em)
        examples += em.examples
    elapsed = _clock() - t0
    return elapsed / len(events) / 1000, examples, eng


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpu", action="store_true",
                    help="time with the thread's CPU time (time.thread_time_ns) instead of the wall clock: "
                         "steadier when other jobs load the machine")
    args = ap.parse_args()
    global _clock
    if args.cpu:
        _clock = time.thread_time_ns
    events = [parse(orjson.dumps(e), None) for e in read_rees46(BUNDLED_SAMPLE)]
    base = [run(events, None)[0] for _ in range(args.repeat)]
    rules = default_rules()
    with_rules = [run(events, None, rules)[0] for _ in range(args.repeat)]
    fresh = [run(events, ModelRegistry({}))[0] for _ in range(args.repeat)]
    # a trained registry: learn the replay's own examples first
    _, examples, eng = run(events, ModelRegistry({}))
    trained = ModelRegistry({})
    for ex in examples:
        if ex["task"] not in trained.models:
            continue  # session examples for the tiers / Markov chain
        trained.models[ex["task"]].learn(ex["x"], ex["y"])
    calls = [0]
    inner = trained.score

    def counting(task, x):
        calls[0] += 1
        return inner(task, x)
    trained.score = counting
    warm = [run(events, trained)[0] for _ in range(args.repeat)]
    calls_warm = calls[0]
    full, full_recs = [], []
    for _ in range(args.repeat):  # interleaved, so load on the machine hits both alike
        full.append(run(events, trained, rules)[0])  # the worker's engine: both
        full_recs.append(run(events, trained, rules, recs=True)[0])  # ... and recommendations
    calls[0] = calls_warm
    scoring_points = calls[0] // args.repeat or 1
    b, f, w = statistics.median(base), statistics.median(fresh), statistics.median(warm)
    r = statistics.median(with_rules)
    fl = statistics.median(full)
    print(f"{len(events)} REES46 events, median of {args.repeat} runs, µs per event (no Kafka)"
          + (", CPU time of the thread" if args.cpu else ""))
    print(f"  state step only                      {b:7.1f}")
    print(f"  state + default rules                {r:7.1f}   rules' share {r - b:5.1f} µs/event")
    print(f"  state + models (untrained)           {f:7.1f}   models' share {f - b:5.1f} µs/event")
    print(f"  state + models (trained logreg)      {w:7.1f}   models' share {w - b:5.1f} µs/event")
    print(f"  scoring points per replay: {scoring_points} (intent + churn), labeled examples: {len(examples)}; "
          f"models' share per scoring point ≈ {(w - b) * len(events) / scoring_points:.0f} µs "
          f"(features + predict + top contributions + label bookkeeping)")
    print(f"  state + default rules + trained models {fl:7.1f}   the worker's engine step (target <= 60 µs/event)")
    fr = statistics.median(full_recs)
    print(f"  ... + recommendations (co-occurrence)  {fr:7.1f}   recommendations' share {fr - fl:5.1f} µs/event "
          "(learning views and baskets, recommending in the abandonment payloads)")


if __name__ == "__main__":
    main()
