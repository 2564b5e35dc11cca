"""Per-event cost of an experiment in the rules, on the bundled REES46 sample through the
in-memory engine step (replay mode, 4 partitions by user id % 4, end of input closed):

* baseline: the default rules as released before experiments (``tests/unit/fixtures/default_rules_2026-11-29.yaml``);
* with the example experiment: the current default rules (``browse_abandonment`` with a 20%
  holdout and two variants: assignment at every decision and timer arming, exposure records,
  attribution of every purchase of an exposed user);
* the same with a ``delay_s`` override on one variant (assignment at every ``product_view``
  that arms the timeout).

    PYTHONPATH=src .venv/bin/python benchmarks/experiment_cost.py [--repeat 5]

Prints µs per event (best of ``--repeat`` full replays) side by side, and the decisions.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import orjson

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.rules.ruleset import Ruleset, load_rules, parse_rules
from clickpulse.testing import default_rules, memory_engine

ROOT = Path(__file__).resolve().parent.parent


def replay(rules: Ruleset, events: list[dict]) -> tuple[float, Counter]:
    eng = memory_engine(rules=rules)
    out: Counter = Counter()
    t0 = time.perf_counter_ns()
    for ev in events:
        em = eng.step([(int(ev["user_id"]) % 4, ev)], 0)
        eng.commit(em)
        out.update(a.get("variant", a["type"]) for a in em.actions)
        out.update(f"record:{r['kind']}" for r in em.experiments)
    for p in range(4):
        em = eng.end_of_input_step(p, 0, 1, 0)
        eng.commit(em)
        out.update(a.get("variant", a["type"]) for a in em.actions)
        out.update(f"record:{r['kind']}" for r in em.experiments)
    return (time.perf_counter_ns() - t0) / len(events) / 1000, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    events = [parse(orjson.dumps(e), None) for e in read_rees46(BUNDLED_SAMPLE)]
    base = load_rules(ROOT / "tests" / "unit" / "fixtures" / "default_rules_2026-11-29.yaml")
    with_exp = default_rules()
    text = Path(with_exp.path or "").read_text().replace("""          offer: '"SAVE5"'\n""",
                                                          """          offer: '"SAVE5"'\n          delay_s: 600\n""")
    with_delay = parse_rules(text, "<delay variant>")
    cases = [("baseline (no experiment)", base), ("example experiment", with_exp), ("with a delay_s variant", with_delay)]
    best = {name: float("inf") for name, _ in cases}
    counts = {}
    replay(base, events)  # warm-up
    for _ in range(args.repeat):
        for name, rs in cases:  # interleaved: the same machine load for each
            us, c = replay(rs, events)
            best[name] = min(best[name], us)
            counts[name] = c
    b = best[cases[0][0]]
    for name, _ in cases:
        print(f"{name:<28} {best[name]:7.1f} µs/event  ({best[name] / b:.2f}x baseline)  "
              f"{dict(sorted(counts[name].items()))}")


if __name__ == "__main__":
    main()
