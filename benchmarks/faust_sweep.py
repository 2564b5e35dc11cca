#!/usr/bin/env python
"""Sweep of the batched Faust passthrough's settings: how ``faust_tuning()`` was chosen.

    .venv/bin/python benchmarks/faust_sweep.py [--events 20000] [--reps 3] [--variants a,b,...] [--json]

Each variant is ``faust_tuning()`` with one thing changed (``defaults`` = Faust's defaults for
every tuned key, batched all the same). Variants run interleaved (rep 1 of every variant, then
rep 2, ..., each rep in a rotated order) over the same pre-published input; rate = N / (first message consumed -> last
output appended), as the ``faust`` row of ``pipeline.py``. Results and the choice are written up
in ``benchmarks/README.md`` ("Faust tuning").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit as K  # noqa: E402
from benchkit import say  # noqa: E402
from faust_passthrough import TAKE_MAX, TAKE_WITHIN_S, faust_tuning  # noqa: E402

from clickpulse.ingest.replay import publish  # noqa: E402
from clickpulse.settings import Settings  # noqa: E402

FAUST_DEFAULTS = {"broker_max_poll_records": None, "stream_buffer_maxsize": 4096, "producer_linger": 0.0,
                  "producer_max_batch_size": 16384, "broker_commit_every": 10_000, "broker_commit_interval": 2.8,
                  "consumer_max_fetch_size": 1024 ** 2}

#: name -> (faust_tuning() overrides, extra passthrough args)
VARIANTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "tuned": ({}, []),
    "defaults": (FAUST_DEFAULTS, []),
    "per-message": ({}, ["--mode", "per-message"]),
    "send_soon": ({}, ["--send", "soon"]),
    "take=100": ({}, ["--take", "100"]),
    "take=5000": ({}, ["--take", "5000"]),
    "linger=0": ({"producer_linger": 0.0}, []),
    "linger=20ms": ({"producer_linger": 0.02}, []),
    "batch=16KiB": ({"producer_max_batch_size": 16384}, []),
    "batch=1MiB": ({"producer_max_batch_size": 1024 ** 2, "producer_max_request_size": 4 * 1024 ** 2}, []),
    "poll=None": ({"broker_max_poll_records": None}, []),
    "poll=500": ({"broker_max_poll_records": 500}, []),
    "buffer=4096": ({"stream_buffer_maxsize": 4096}, []),
    "buffer=65536": ({"stream_buffer_maxsize": 65536}, []),
    "commit_every=1000": ({"broker_commit_every": 1000}, []),
    "fetch=1MiB": ({"consumer_max_fetch_size": 1024 ** 2}, []),
    "acks=1": ({"producer_acks": 1}, []),
}


def one(bootstrap: str, run: str, rep: int, name: str, topic_in: str, n: int, tmp: Path,
        timeout_s: float) -> float:
    tuning, extra = VARIANTS[name]
    slug = "".join(c if c.isalnum() else "-" for c in name)
    out = f"bench-{run}.r{rep}.{slug}.out"
    asyncio.run(K.create_topics(bootstrap, [out], 4, K.LOG_APPEND))
    d = tmp / f"{slug}-r{rep}"
    argv = [sys.executable, str(Path(__file__).resolve().parent / "faust_passthrough.py"), "--mode", "batch",
            "--bootstrap", bootstrap, "--app-id", f"bench-{run}-{slug}-r{rep}", "--in", topic_in, "--out", out,
            "--status", str(d / "status.jsonl"), "--datadir", str(d / "data"), "--send", "gather",
            "--take", str(TAKE_MAX), "--within", str(TAKE_WITHIN_S), "--tuning", json.dumps(tuning)] + extra
    sub = K.Sub(argv, d / "log.txt", d / "status.jsonl").start()
    try:
        t_end = asyncio.run(K.wait_output(bootstrap, out, 4, n, timeout_s, alive=sub.alive))
        return n / (t_end - sub.status()["first"])
    finally:
        sub.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    s = Settings.from_env()
    K.ensure_services(s.kafka_bootstrap)
    run = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
    tmp = Path(tempfile.mkdtemp(prefix=f"clickpulse-sweep-{run}-"))
    inp = K.resampled_rees46(args.events)
    topic_in = f"bench-{run}.input"
    res: dict[str, list[float | None]] = {v: [] for v in names}
    try:
        asyncio.run(K.create_topics(s.kafka_bootstrap, [topic_in], 4))
        asyncio.run(publish(s.kafka_bootstrap, topic_in, inp.records))
        for rep in range(1, args.reps + 1):
            shift = (rep - 1) * len(names) // args.reps  # rotate the order: no variant always first
            for v in names[shift:] + names[:shift]:
                try:
                    eps = one(s.kafka_bootstrap, run, rep, v, topic_in, len(inp.records), tmp, args.timeout)
                    say(f"rep {rep} {v}: {eps:,.0f} events/s")
                except Exception as err:  # noqa: BLE001
                    say(f"rep {rep} {v}: FAILED {err}")
                    eps = None
                res[v].append(eps)
    finally:
        asyncio.run(K.delete_topics_containing(s.kafka_bootstrap, f"bench-{run}"))
        shutil.rmtree(tmp, ignore_errors=True)
    base = res.get("tuned")
    out = {}
    for v, xs in res.items():
        ok = [x for x in xs if x]
        ratios = [x / y for x, y in zip(xs, base, strict=True) if x and y] if base else []
        out[v] = {"median": round(statistics.median(ok)) if ok else None, "reps": [round(x) if x else None for x in xs],
                  "vs_tuned": round(statistics.median(ratios), 3) if ratios else None}
    if args.json:
        print(json.dumps({"events": len(inp.records), "tuned": faust_tuning(), "variants": out}, indent=2))
    else:
        print(f"Faust passthrough sweep, {len(inp.records)} events, {args.reps} reps interleaved; tuned = {faust_tuning()}")
        print(f"{'variant':<20}{'median ev/s':>12}  {'vs tuned':>8}  reps")
        for v, row in out.items():
            print(f"{v:<20}{row['median'] or 0:>12,}  {row['vs_tuned'] or 0:>8.3f}  {row['reps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
