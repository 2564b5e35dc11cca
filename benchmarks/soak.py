#!/usr/bin/env python
"""Soak: the worker's memory growth per new user under a steady stream of new users.

    .venv/bin/python benchmarks/soak.py [--rate 200] [--minutes 10] [--interval 30] [--json] [--keep]

Starts a ``clickpulse worker`` (fresh namespace ``soak-<run>``, live time mode, default rules and
models, Redis) and publishes at a steady ``--rate`` events/s: the bundled REES46 sample's events
in file order, pass after pass, every pass with new user ids (``soak-<run>-<user>_<pass>``, so
every user is new; about 3 events each), new event ids and the current time as event time.
Every ``--interval`` seconds it prints the worker's RSS (psutil, the worker process and its
children) and the worker's count of new users (``clickpulse_users_new_total``); at the end, the
least-squares slope of RSS over users: the growth in KB per new user. Not a CI test: it runs for
``--minutes`` and stops by itself. Topics of the run are deleted at the end unless ``--keep``.
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
import orjson  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402
from benchkit import say  # noqa: E402

from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46  # noqa: E402
from clickpulse.runtime import WorkerProcess, free_port  # noqa: E402
from clickpulse.settings import Settings  # noqa: E402
from clickpulse.topics import ensure_topics  # noqa: E402


def _total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


async def soak(worker: WorkerProcess, s: Settings, run: str, rate: float, seconds: float,
               interval: float) -> list[dict[str, Any]]:
    base = list(read_rees46(BUNDLED_SAMPLE))
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    next_sample = 0.0
    i = 0
    pending: list[Any] = []
    try:
        while True:
            now = time.monotonic() - t0
            if now >= next_sample:
                if not worker.alive():
                    raise RuntimeError(f"worker exited; log: {worker.log_path}")
                m = await asyncio.to_thread(worker.metrics)
                smp = {"t_s": round(now, 1), "published": i, "users": int(_total(m, "clickpulse_users_new_total")),
                       "processed": int(_total(m, "clickpulse_events_processed_total")),
                       "rss_bytes": K.rss_bytes(worker.proc.pid)}
                samples.append(smp)
                rss = f"{smp['rss_bytes'] / 2**20:>7.1f} MiB" if smp["rss_bytes"] else "n/a (pip install psutil)"
                print(f"t={smp['t_s']:>6.0f} s  published {i:>8,}  processed {smp['processed']:>8,}  "
                      f"users {smp['users']:>7,}  RSS {rss}", flush=True)
                next_sample += interval
                if now >= seconds:
                    break
                continue
            if now >= seconds:  # publishing is over: wait for the last sample
                await asyncio.sleep(next_sample - now)
                continue
            due = i / rate
            if due > now:
                await asyncio.sleep(min(due, next_sample) - now)
                continue
            k, j = divmod(i, len(base))
            ev = dict(base[j])
            ev["user_id"] = f"soak-{run}-{ev['user_id']}_{k}"
            ev["event_id"] = f"{ev['event_id']}-soak-{k}"
            ev["timestamp"] = int(time.time() * 1000)
            pending.append(await producer.send(s.topic_raw, key=ev["user_id"].encode(), value=orjson.dumps(ev)))
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
            i += 1
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return samples


def growth(samples: list[dict[str, Any]]) -> dict[str, Any]:
    pts = [(x["users"], x["rss_bytes"] / 1024) for x in samples if x["rss_bytes"]]
    # the first sample is taken before any user: keep it, it anchors the intercept
    last = samples[-1] if samples else {"published": 0, "processed": 0}
    backlog = {"published": last["published"], "processed": last["processed"]}
    if len({u for u, _ in pts}) < 2:
        return {"kb_per_user": None, "points": len(pts), **backlog}
    xs, ys = zip(*pts, strict=True)
    fit = statistics.linear_regression(xs, ys)
    r = statistics.correlation(xs, ys) if len(set(ys)) > 1 else 0.0
    return {"kb_per_user": round(fit.slope, 3), "intercept_mib": round(fit.intercept / 1024, 1),
            "r2": round(r * r, 3), "points": len(pts), "users": xs[-1],
            "rss_growth_mib": round((ys[-1] - ys[0]) / 1024, 1), **backlog}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=200.0, help="events/s (default 200)")
    ap.add_argument("--minutes", type=float, default=10.0, help="publishing time (default 10)")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between RSS samples (default 30)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--keep", action="store_true", help="keep the run's topics, Redis keys and temp dir")
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.minutes <= 0 or args.interval <= 0:
        ap.error("--rate, --minutes and --interval must be > 0")
    s0 = Settings.from_env()
    K.ensure_services(s0.kafka_bootstrap)
    run = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
    tmp = Path(tempfile.mkdtemp(prefix=f"clickpulse-soak-{run}-"))
    s = s0.replace(namespace=f"soak-{run}", time_mode="live", web_port=free_port(), data_dir=str(tmp / "worker-data"))
    asyncio.run(ensure_topics(s))
    worker = WorkerProcess(s, tmp / "worker.log", extra_env={"PYTHONPATH": K.subprocess_env()["PYTHONPATH"]})
    ok = False
    try:
        say(f"soak {run}: starting worker (log {worker.log_path})")
        worker.start().wait_ready()
        say(f"publishing new users at {args.rate:g} events/s for {args.minutes:g} min, RSS every {args.interval:g} s")
        samples = asyncio.run(soak(worker, s, run, args.rate, args.minutes * 60, args.interval))
        ok = True
    finally:
        worker.stop()
        if not args.keep:
            from pipeline import delete_redis_profiles
            delete_redis_profiles(s)
            try:
                asyncio.run(K.delete_topics_containing(s.kafka_bootstrap, f"soak-{run}"))
            except Exception as err:  # noqa: BLE001
                say(f"could not delete the run's topics: {err}")
            if ok:
                shutil.rmtree(tmp, ignore_errors=True)
    g = growth(samples)
    if args.json:
        print(json.dumps({"run": run, "rate": args.rate, "minutes": args.minutes, "samples": samples, "growth": g}, indent=2))
    elif g["kb_per_user"] is None:
        print("growth: not enough samples with users")
    else:
        print(f"growth: {g['kb_per_user']:.2f} KB per new user (least squares over {g['points']} samples, "
              f"r² {g['r2']:.3f}); RSS +{g['rss_growth_mib']:.1f} MiB for {g['users']:,} users, "
              f"intercept {g['intercept_mib']:.1f} MiB")
        if g["processed"] < 0.95 * g["published"]:
            print(f"note: the worker processed {g['processed']:,} of {g['published']:,} published events: "
                  f"{args.rate:g} events/s is more than it sustains here (lower --rate for a steady state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
