"""Bytes per user of the state table, version 1 (orjson) vs version 2 (binary), and the codec's cost.

    PYTHONPATH=src .venv/bin/python benchmarks/state_size.py [--repeat 5] [--breakdown]

Replays the bundled REES46 sample through the worker's engine offline (default rules, default
untrained models, ``marketing`` consent assumed, partition = user id mod 4, as
``benchmarks/engine_cost.py``), then for the table's values (the latest state of each user,
what the changelog topic keeps):

* mean / p50 / p95 / max bytes per user in the version 1 format (``UserState.to_bytes_json``,
  what earlier releases wrote) and in the version 2 format (``UserState.to_bytes``);
* µs per ``to_bytes`` and per ``from_bytes`` of each format over all users: CPU time of the
  thread (steadier than wall time on a shared machine), best of ``--repeat`` passes. The binary
  encoder keeps a small cache of the stored predictions' feature vectors (the same vectors are
  written again at every event of the user until their label arrives): ``to_bytes`` is given
  cold (cache emptied before each pass: every vector converted) and warm (the engine's steady
  state);
* with ``--breakdown``: mean bytes per user of each top-level element of both formats.

No Kafka, nothing written.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import msgspec
import orjson
from prometheus_client import CollectorRegistry

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.models.labels import ModelConfig
from clickpulse.models.registry import ModelRegistry
from clickpulse.observability.metrics import Metrics
from clickpulse.state import user
from clickpulse.engine import Engine
from clickpulse.state.user import StateConfig, UserState
from clickpulse.testing import default_rules

V2_FIELDS = ("version", "key", "partition", "base", "life", "recent", "windows", "session", "user_id", "ml",
             "categories", "rules", "cart", "prev_session", "traits", "consent", "anonymous_id")


def replay_table() -> dict[bytes, bytes]:
    events = [parse(orjson.dumps(e), None) for e in read_rees46(BUNDLED_SAMPLE)]
    table: dict[bytes, bytes] = {}
    eng = Engine(table, StateConfig(), allowed_lateness_ms=60_000, idle_timeout_ms=5000, live=False,
                 metrics=Metrics(CollectorRegistry()), models=ModelRegistry({}), model_cfg=ModelConfig(),
                 rules=default_rules(), assumed_consent=frozenset({"marketing"}))
    for ev in events:
        eng.process(int(ev["user_id"]) % 4, ev, 0)
    return table


def stats(sizes: list[int]) -> dict[str, Any]:
    xs = sorted(sizes)

    def pct(q: float) -> int:  # nearest rank
        return xs[max(0, math.ceil(q * len(xs)) - 1)]

    return {"mean": statistics.fmean(xs), "p50": pct(0.5), "p95": pct(0.95), "max": xs[-1]}


def per_call_us(fn: Any, args: list[Any], repeat: int, cold: bool = True) -> float:
    best = math.inf
    for _ in range(repeat):
        if cold:
            user._X_CACHE.clear()  # noqa: SLF001 - the cold encode of prediction vectors
        t0 = time.thread_time_ns()
        for a in args:
            fn(a)
        best = min(best, (time.thread_time_ns() - t0) / len(args) / 1000)
    return best


def breakdown(v1: list[bytes], v2: list[bytes]) -> None:
    n = len(v1)
    old: dict[str, int] = {}
    for raw in v1:
        for k, x in orjson.loads(raw).items():
            old[k] = old.get(k, 0) + len(orjson.dumps({k: x})) - 1  # '"k":value,'
    new: dict[str, int] = {}
    for raw in v2:
        for name, x in zip(V2_FIELDS, msgspec.msgpack.decode(raw), strict=False):
            new[name] = new.get(name, 0) + len(msgspec.msgpack.encode(x))
    print("  version 1 (JSON), mean bytes per user by key:")
    for k, b in sorted(old.items(), key=lambda kv: -kv[1]):
        print(f"    {k:14s} {b / n:7.1f}")
    print("  version 2 (binary), mean bytes per user by element (array header not counted):")
    for k, b in sorted(new.items(), key=lambda kv: -kv[1]):
        print(f"    {k:14s} {b / n:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    table = replay_table()
    states = [UserState.from_bytes(v) for v in table.values()]
    v1 = [st.to_bytes_json() for st in states]
    v2 = [st.to_bytes() for st in states]
    assert all(UserState.from_bytes(b) == st for b, st in zip(v2, states, strict=True))
    s1, s2 = stats([len(b) for b in v1]), stats([len(b) for b in v2])
    enc1 = per_call_us(UserState.to_bytes_json, states, args.repeat)
    enc2 = per_call_us(UserState.to_bytes, states, args.repeat)
    enc2_warm = per_call_us(UserState.to_bytes, states, args.repeat, cold=False)
    dec1 = per_call_us(UserState.from_bytes, v1, args.repeat)
    dec2 = per_call_us(UserState.from_bytes, v2, args.repeat)
    print(f"{len(states)} users after the REES46 sample (default rules and models), bytes per user "
          f"and µs per call (best of {args.repeat})")
    print(f"  {'format':20s} {'mean':>7s} {'p50':>6s} {'p95':>6s} {'max':>6s}  {'to_bytes':>9s} "
          f"{'(warm)':>7s} {'from_bytes':>11s}")
    for name, s, e, w, d in (("version 1 (orjson)", s1, enc1, enc1, dec1),
                             ("version 2 (binary)", s2, enc2, enc2_warm, dec2)):
        print(f"  {name:20s} {s['mean']:7.1f} {s['p50']:6d} {s['p95']:6d} {s['max']:6d}  {e:9.2f} {w:7.2f} {d:11.2f}")
    print(f"  version 2 / version 1: {s2['mean'] / s1['mean']:.2f} of the bytes")
    if args.breakdown:
        breakdown(v1, v2)


if __name__ == "__main__":
    main()
