"""Collector throughput and accept latency beside a bare aiokafka produce loop, in the same run.

Four scenarios, interleaved per repetition, against the local broker (one fresh raw topic per
scenario and repetition, deleted at the end):

* ``produce single``  - a bare aiokafka producer configured as the collector's (idempotent,
  ``acks=all``, the same ``linger_ms``): ``--concurrency`` tasks each send one event and await
  its acknowledgement, again and again; the floor under ``collector single``.
* ``produce batch``   - the same with ``--batch`` events per acknowledgement wait.
* ``collector single`` - ``clickpulse collector`` (its own process) and an aiohttp client with
  ``--concurrency`` keep-alive connections, each POSTing ``/v1/track`` with one event and
  awaiting its 200 (every 200 means Kafka acknowledged the event).
* ``collector batch`` - the same POSTing ``/v1/batch`` with ``--batch`` events.

Each collector row is run once per event loop of ``--loops`` (``asyncio``, ``uvloop``:
``CLICKPULSE_COLLECTOR_EVENT_LOOP``).

The events are Segment ``Product Added`` track calls (about 420 bytes as published), distinct
``messageId``s, 1000 users. Figures: accepted events/s (events answered 200 or acknowledged,
over the wall time of the scenario), per-request latency (send to answer/acknowledgement)
p50/p99 in ms, and CPU time per event of the load generator (this process: the aiohttp client,
or the bare producer) and of the collector process (``/proc/<pid>/stat``). The load generator and the collector share the machine (and the broker): on a
small host the client's own CPU time is part of what limits ``collector`` rows.

Run: ``PYTHONPATH=src python benchmarks/collector.py [--events 20000 --concurrency 32 --batch 50 --reps 3 --loops asyncio,uvloop]``
(or ``make bench-collector ARGS="..."``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector
from aiokafka import AIOKafkaProducer

from benchkit import create_topics, delete_topics_containing, ensure_services, latency_stats, say, subprocess_env

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from clickpulse.runtime import free_port, stop_process_group  # noqa: E402
from clickpulse.settings import Settings  # noqa: E402

KEY = "wk-bench"


def make_events(n: int, run: str) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "Product Added", "userId": f"u{i % 1000}", "messageId": f"{run}-{i}",
             "timestamp": "2026-12-01T10:00:00.000Z",
             "properties": {"product_id": f"sku-{i % 500}", "price": 19.99, "quantity": 1, "currency": "EUR",
                            "category": "shoes"},
             "context": {"library": {"name": "analytics-python", "version": "2.4.0"},
                         "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"}}
            for i in range(n)]


async def bare_produce(bootstrap: str, topic: str, events: list[dict[str, Any]], batch: int, concurrency: int,
                       linger_ms: int) -> tuple[float, list[float]]:
    """``concurrency`` tasks, each: send ``batch`` events, await their acknowledgements, repeat."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=linger_ms,
                                max_batch_size=256 * 1024)
    await producer.start()
    chunks = [[(e["userId"].encode(), orjson.dumps(e)) for e in events[i:i + batch]]
              for i in range(0, len(events), batch)]
    lat: list[float] = []
    it = iter(chunks)

    async def worker() -> None:
        for chunk in it:
            t = time.perf_counter()
            futs = [await producer.send(topic, value=v, key=k) for k, v in chunk]
            await asyncio.gather(*futs)
            lat.append((time.perf_counter() - t) * 1000)
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await producer.stop()
    return wall, lat


async def http_load(url: str, events: list[dict[str, Any]], batch: int, concurrency: int) -> tuple[float, list[float], int]:
    """``concurrency`` keep-alive connections, each: POST one request, await the answer, repeat."""
    auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode(),
            "Content-Type": "application/json"}
    if batch == 1:
        bodies = [(url + "/v1/track", orjson.dumps(e)) for e in events]
    else:
        bodies = [(url + "/v1/batch", orjson.dumps({"batch": events[i:i + batch], "sentAt": "2026-12-01T10:00:01Z"}))
                  for i in range(0, len(events), batch)]
    lat: list[float] = []
    failed = 0
    it = iter(bodies)
    async with ClientSession(connector=TCPConnector(limit=concurrency), timeout=ClientTimeout(total=60)) as http:
        async def worker() -> None:
            nonlocal failed
            for u, body in it:
                t = time.perf_counter()
                async with http.post(u, data=body, headers=auth) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failed += 1
                        continue
                lat.append((time.perf_counter() - t) * 1000)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, lat, failed


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_collector(settings: Settings, log_path: str) -> tuple[subprocess.Popen, str]:
    """``clickpulse collector`` in its own process group; returns it and its URL once healthy."""
    env = subprocess_env(settings.env())
    fh = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "clickpulse.cli", "collector", "--no-create-topics",
                             "--loglevel", "warning"], env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{settings.collector_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited ({proc.returncode}); log {log_path}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    stop_process_group(proc)
    raise RuntimeError(f"collector not healthy after 60 s; log {log_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000, help="events per scenario and repetition")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    ap.add_argument("--batch", type=int, default=50, help="events per batch request")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print the result rows as JSON too")
    ap.add_argument("--loops", default="asyncio,uvloop",
                    help="collector event loops to measure (CLICKPULSE_COLLECTOR_EVENT_LOOP), comma-separated")
    args = ap.parse_args()

    base = Settings.from_env()
    ensure_services(base.kafka_bootstrap)
    run = f"bench-coll-{uuid.uuid4().hex[:8]}"
    settings = base.replace(namespace=run, collector_port=free_port(), collector_write_keys=KEY,
                            partitions=args.partitions)
    linger = settings.collector_linger_ms
    log_path = f"/tmp/{run}-collector.log"
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    scenarios = [("produce single", 1)] + [(f"collector/{lp} single", 1) for lp in loops] + \
                [("produce batch", args.batch)] + [(f"collector/{lp} batch", args.batch) for lp in loops]
    rows: dict[str, dict[str, list[float]]] = {name: {"eps": [], "lat": [], "failed": [], "cpu_load": [], "cpu_srv": []}
                                               for name, _ in scenarios}
    proc = None
    try:
        for rep in range(args.reps):
            for name, batch in scenarios:
                topic_ns = f"{run}-r{rep}-{name.replace(' ', '-').replace('/', '-')}"
                s = settings.replace(namespace=topic_ns)
                asyncio.run(create_topics(s.kafka_bootstrap, [s.topic_raw], args.partitions))
                events = make_events(args.events, topic_ns)
                cpu0 = time.process_time()
                srv_cpu = 0.0
                if name.startswith("produce"):
                    wall, lat = asyncio.run(bare_produce(s.kafka_bootstrap, s.topic_raw, events, batch,
                                                         args.concurrency, linger))
                    failed = 0
                else:
                    loop = name.split("/")[1].split()[0]
                    proc, url = start_collector(s.replace(collector_port=free_port(), collector_event_loop=loop), log_path)
                    warm = make_events(200, topic_ns + "-warm")
                    asyncio.run(http_load(url, warm, batch, args.concurrency))  # connections, metadata
                    srv0 = proc_cpu_s(proc.pid)
                    cpu0 = time.process_time()
                    wall, lat, failed = asyncio.run(http_load(url, events, batch, args.concurrency))
                    srv_cpu = proc_cpu_s(proc.pid) - srv0
                    stop_process_group(proc)
                    proc = None
                load_cpu = time.process_time() - cpu0
                accepted = args.events - failed * batch
                rows[name]["cpu_load"].append(load_cpu / args.events * 1e6)
                rows[name]["cpu_srv"].append(srv_cpu / args.events * 1e6)
                rows[name]["eps"].append(accepted / wall)
                rows[name]["lat"].extend(lat)
                rows[name]["failed"].append(failed)
                say(f"rep {rep + 1}/{args.reps} {name}: {accepted / wall:,.0f} events/s, "
                    f"p99 {latency_stats(lat).get('p99_ms')} ms, {failed} failed requests")
    finally:
        if proc is not None:
            stop_process_group(proc)
        deleted = asyncio.run(delete_topics_containing(base.kafka_bootstrap, run))
        say(f"deleted {len(deleted)} benchmark topics")

    print(f"\ncollector vs bare aiokafka produce loop: {args.events} events x {args.reps} reps per row, "
          f"{args.concurrency} requests in flight, batch {args.batch}, {args.partitions} partitions, "
          f"linger_ms {linger}, {os.cpu_count()} CPUs\n")
    print(f"{'scenario':<24} {'events/s (median)':>18} {'min..max':>18} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} "
          f"{'CPU us/event: load':>19} {'collector':>10}")
    out = []
    for name, batch in scenarios:
        r = rows[name]
        st = latency_stats(r["lat"])
        row = {"scenario": name, "batch": batch, "events_per_s": round(statistics.median(r["eps"])),
               "events_per_s_min": round(min(r["eps"])), "events_per_s_max": round(max(r["eps"])),
               "p50_ms": st.get("p50_ms"), "p99_ms": st.get("p99_ms"), "failed_requests": sum(r["failed"]),
               "cpu_us_per_event_load": round(statistics.median(r["cpu_load"]), 1),
               "cpu_us_per_event_collector": round(statistics.median(r["cpu_srv"]), 1)}
        out.append(row)
        print(f"{name:<24} {row['events_per_s']:>18,} {row['events_per_s_min']:>8,}..{row['events_per_s_max']:<8,} "
              f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['failed_requests']:>7} "
              f"{row['cpu_us_per_event_load']:>19} {row['cpu_us_per_event_collector'] if 'collector' in name else '-':>10}")
    for lp in loops:
        for kind in ("single", "batch"):
            c, p = rows[f"collector/{lp} {kind}"], rows[f"produce {kind}"]
            print(f"collector/{lp} {kind}: {statistics.median(c['eps']) / statistics.median(p['eps']):.0%} of the "
                  f"bare produce loop's events/s")
    if args.json:
        print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
