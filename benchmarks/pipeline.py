#!/usr/bin/env python
"""Throughput, processing latency and state size of the clickpulse pipeline vs. a bare Kafka passthrough.

Run from the repository root, with the local services running (``deploy/local/services.sh start``)::

    .venv/bin/python benchmarks/pipeline.py [--events N] [--json]

Both measurements use the same broker, the same input records and run one after the other in
the same invocation. See ``benchmarks/README.md`` for what every figure means.

1. **baseline**: an aiokafka consumer group reads a fresh 4-partition topic that was filled
   *before* timing started and produces every message unchanged (``acks=all``) to another
   4-partition topic. Rate = N / (first batch consumed -> last message produced and acked).
2. **clickpulse**: a ``clickpulse worker`` subprocess (fresh namespace, ``time_mode=replay``) is
   started and ready; N events are then published to its raw topic. Rate = N / (publish start
   -> the worker has processed every raw and every valid message, polled via ``/progress``).
   Latency percentiles come from the worker's ``clickpulse_event_process_seconds`` histogram.
3. **bytes per user**: ``len(UserState.to_bytes())`` per user, from the latest value per key of
   the table changelog topic, and recomputed offline with the same engine as a cross-check.

Input: the bundled REES46 sample repeated with user ids suffixed ``_k`` and timestamps shifted
by the file's span (+1 s) per copy, so events stay unique and in event-time order.
Nothing is written under the repository; topics are left on the broker, Redis profile keys of
the run are deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runnable without an installed package too
    sys.path.insert(0, str(REPO / "src"))

from clickpulse.errors import ServiceError  # noqa: E402
from clickpulse.events.contract import parse  # noqa: E402
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46  # noqa: E402
from clickpulse.ingest.replay import publish  # noqa: E402
from clickpulse.observability.metrics import Metrics  # noqa: E402
from clickpulse.runtime import WorkerProcess, free_port, read_topic, services, wait_caught_up  # noqa: E402
from clickpulse.settings import Settings  # noqa: E402
from clickpulse.engine import Engine  # noqa: E402
from clickpulse.state.user import StateConfig, UserState  # noqa: E402
from clickpulse.topics import ensure_topics  # noqa: E402

Record = tuple[bytes | None, bytes, int | None]


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- input ---------------------------------------------------------------------------------------
def resampled_rees46(n: int) -> tuple[list[Record], dict[str, Any]]:
    """N raw events: the bundled sample repeated; copy k has user ids ``<id>_k``, event ids
    ``<id>-k`` and timestamps shifted by k x (file span + 1 s)."""
    base = list(read_rees46(BUNDLED_SAMPLE))
    ts = [e["timestamp"] for e in base]
    shift = max(ts) - min(ts) + 1000
    out: list[Record] = []
    k = 0
    while len(out) < n:
        for ev in base:
            if len(out) >= n:
                break
            e = dict(ev)
            e["user_id"] = f"{ev['user_id']}_{k}"
            e["event_id"] = f"{ev['event_id']}-{k}"
            e["timestamp"] = ev["timestamp"] + k * shift
            out.append((e["user_id"].encode(), orjson.dumps(e), e["timestamp"]))
        k += 1
    info = {"source": BUNDLED_SAMPLE.name, "source_events": len(base), "copies": k,
            "span_s": (shift - 1000) / 1000,
            "mean_value_bytes": round(statistics.fmean(len(v) for _k, v, _t in out), 1)}
    return out, info


# -- 1. baseline ---------------------------------------------------------------------------------
async def baseline(bootstrap: str, run: str, records: list[Record], partitions: int,
                   timeout_s: float = 300.0) -> dict[str, Any]:
    n = len(records)
    t_in, t_out = f"bench-{run}.passthrough.in", f"bench-{run}.passthrough.out"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in (t_in, t_out)])
    finally:
        await admin.close()
    say(f"baseline: pre-publishing {n} events to {t_in}")
    pub = await publish(bootstrap, t_in, records)  # same publisher as `clickpulse replay`

    consumer = AIOKafkaConsumer(t_in, bootstrap_servers=bootstrap, group_id=f"bench-{run}-passthrough",
                                auto_offset_reset="earliest", enable_auto_commit=True,
                                auto_commit_interval_ms=1000)
    # acks=all and otherwise aiokafka's producer defaults (linger 0, 16 KiB batches), as the
    # worker's Faust producer (producer_acks=-1, Faust defaults linger 0, 16 KiB batches).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    await consumer.start()
    say("baseline: consume -> produce passthrough running")
    done = 0
    t_first = t_last = None
    deadline = time.monotonic() + timeout_s
    try:
        while done < n:
            if time.monotonic() > deadline:
                raise ServiceError(f"baseline passthrough: only {done}/{n} messages after {timeout_s:.0f} s")
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                continue
            if t_first is None:
                t_first = time.perf_counter()
            futs = [await producer.send(t_out, value=m.value, key=m.key)
                    for msgs in batch.values() for m in msgs]
            await asyncio.gather(*futs)  # every message of the batch acked before the next fetch
            done += len(futs)
        t_last = time.perf_counter()
    finally:
        await consumer.stop()
        await producer.stop()
    seconds = t_last - t_first
    return {"events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds, 1),
            "publish_seconds": round(pub.seconds, 3), "publish_events_per_s": round(n / pub.seconds, 1),
            "topics": [t_in, t_out]}


# -- 2. clickpulse -------------------------------------------------------------------------------
def _total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def histogram_quantiles(m: dict[str, float], name: str, qs: tuple[float, ...]) -> dict[str, Any]:
    """Quantiles from a Prometheus histogram, interpolated linearly inside the bucket (as PromQL's
    ``histogram_quantile``), with the bucket each quantile fell in. ``ms`` is ``None`` when the
    quantile is in the first bucket (only the upper bound is known) or in the +Inf bucket."""
    buckets = sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in m.items()
                     if k.startswith(name + "_bucket{"))
    count = m.get(name + "_count", 0.0)
    out: dict[str, Any] = {"count": int(count), "mean_ms": round(1000 * m.get(name + "_sum", 0.0) / count, 4)
                           if count else None}
    for q in qs:
        rank = q * count
        lo = 0.0
        prev_cum = 0.0
        for le, cum in buckets:
            if cum >= rank and count:
                if math.isinf(le):
                    out[f"p{round(q * 100)}"] = {"ms": None, "bucket_ms": [lo * 1000, None]}
                elif lo == 0.0:  # interpolating from 0 would invent precision: report the bound only
                    out[f"p{round(q * 100)}"] = {"ms": None, "bucket_ms": [0.0, le * 1000]}
                else:
                    frac = (rank - prev_cum) / (cum - prev_cum) if cum > prev_cum else 1.0
                    out[f"p{round(q * 100)}"] = {"ms": round(1000 * (lo + (le - lo) * frac), 4),
                                                 "bucket_ms": [lo * 1000, le * 1000]}
                break
            lo, prev_cum = le, cum
    return out


async def _end_offsets(c: AIOKafkaConsumer, topic: str, partitions: int) -> dict[int, int]:
    ends = await c.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    return {tp.partition: off for tp, off in ends.items()}


async def wait_processed(worker: WorkerProcess, s: Settings, n: int, timeout_s: float = 600.0,
                         poll_s: float = 0.1) -> tuple[float, float]:
    """Poll until the worker has read all ``n`` raw messages, published every valid one and
    processed every valid message. Returns ``time.perf_counter()`` of the first poll that saw the
    raw topic fully read (ingest agent done) and of the first poll that saw everything done."""
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        raw_ends = await _end_offsets(c, s.topic_raw, s.partitions)
        deadline = time.monotonic() + timeout_s
        t_raw = None

        def seen_all(topic: str, ends: dict[int, int], prog: dict[str, Any]) -> bool:
            seen = prog["topics"].get(topic, {})
            return all(end == 0 or seen.get(str(p), -1) >= end - 1 for p, end in ends.items())

        while time.monotonic() < deadline:
            if not worker.alive():
                raise ServiceError(f"worker died; log: {worker.log_path}")
            try:
                prog = worker.progress()
                if seen_all(s.topic_raw, raw_ends, prog):
                    t_raw = t_raw or time.perf_counter()
                    m = worker.metrics()
                    valid = _total(m, "clickpulse_events_valid_total")
                    if valid + _total(m, "clickpulse_events_invalid_total") >= n:
                        valid_ends = await _end_offsets(c, s.topic_valid, s.partitions)
                        if sum(valid_ends.values()) >= valid and seen_all(s.topic_valid, valid_ends, worker.progress()):
                            return t_raw, time.perf_counter()
            except OSError:
                pass
            await asyncio.sleep(poll_s)
        raise ServiceError(f"worker did not process {n} events within {timeout_s:.0f} s; log: {worker.log_path}")
    finally:
        await c.stop()


def clickpulse_run(run: str, records: list[Record], tmp: Path) -> tuple[dict[str, Any], Settings]:
    n = len(records)
    s = Settings.from_env().replace(namespace=f"bench-{run}", time_mode="replay", web_port=free_port(),
                                    data_dir=str(tmp / "worker-data"))
    asyncio.run(ensure_topics(s))
    worker = WorkerProcess(s, tmp / "worker.log")
    try:
        say(f"clickpulse: starting worker (namespace {s.namespace}, log {worker.log_path})")
        worker.start().wait_ready()
        say(f"clickpulse: publishing {n} events to {s.topic_raw} while the worker runs")
        t0 = time.perf_counter()
        pub = asyncio.run(publish(s.kafka_bootstrap, s.topic_raw, records))
        t_pub = time.perf_counter()
        t_raw, t_done = asyncio.run(wait_processed(worker, s, n))
        wait_caught_up(worker, s)  # the runtime's own check (+1.5 s settle), not timed
        m = worker.metrics()
    finally:
        say("clickpulse: stopping worker")
        rc = worker.stop()
    lat = histogram_quantiles(m, "clickpulse_event_process_seconds", (0.5, 0.95, 0.99))
    seconds = t_done - t0
    return {
        "events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds, 1),
        "publish_seconds": round(pub.seconds, 3), "publish_events_per_s": round(n / pub.seconds, 1),
        "drain_after_publish_seconds": round(t_done - t_pub, 3),
        "raw_topic_read_seconds": round(t_raw - t0, 3),
        "raw_messages": int(_total(m, "clickpulse_raw_messages_total")),
        "events_valid": int(_total(m, "clickpulse_events_valid_total")),
        "events_invalid": int(_total(m, "clickpulse_events_invalid_total")),
        "events_processed": int(_total(m, "clickpulse_events_processed_total")),
        "duplicates": int(_total(m, "clickpulse_events_duplicate_total")),
        "late": int(_total(m, "clickpulse_events_late_total")),
        "users": int(_total(m, "clickpulse_users_new_total")),
        "actions": int(_total(m, "clickpulse_actions_total")),
        "process_latency": lat,
        "namespace": s.namespace, "worker_log": str(worker.log_path), "worker_exit_code": rc,
    }, s


# -- 3. bytes per user ---------------------------------------------------------------------------
def size_stats(sizes: list[int]) -> dict[str, Any]:
    if not sizes:
        return {"users": 0}
    xs = sorted(sizes)

    def pct(q: float) -> int:  # nearest-rank percentile
        return xs[max(0, math.ceil(q * len(xs)) - 1)]

    return {"users": len(xs), "mean": round(statistics.fmean(xs), 1), "p50": pct(0.5), "p95": pct(0.95),
            "max": xs[-1], "total_bytes": sum(xs)}


def changelog_states(s: Settings) -> tuple[str, dict[bytes, bytes]]:
    topic = f"{s.app_id}-{s.state_table}-changelog"
    latest: dict[bytes, bytes | None] = {}
    for key, value, _meta in asyncio.run(read_topic(s.kafka_bootstrap, topic, timeout_s=120.0)):
        latest[key] = value
    return topic, {k: v for k, v in latest.items() if v is not None}


def offline_states(s: Settings, records: list[Record]) -> tuple[dict[bytes, bytes], list[float], list[float]]:
    """Apply the same events with the worker's engine, in per-partition order, no Kafka; also
    returns the wall time of each ``Engine.process`` and of each ``contract.parse`` call (s)."""
    table: dict[bytes, bytes] = {}
    from clickpulse.models.labels import ModelConfig
    from clickpulse.models.registry import ModelRegistry
    registry = ModelRegistry({"intent": s.intent_pipeline, "churn": s.churn_pipeline}, s.model_seed) \
        if s.models_enabled else None   # the worker's configuration, models included
    from clickpulse.rules.bots import BotConfig
    from clickpulse.rules.ruleset import load_rules
    engine = Engine(table, StateConfig.from_settings(s), allowed_lateness_ms=s.allowed_lateness_ms,
                    idle_timeout_ms=s.idle_timeout_ms, live=s.time_mode == "live", metrics=Metrics(),
                    models=registry, model_cfg=ModelConfig.from_settings(s), pending_total_cap=s.pending_total,
                    rules=load_rules(s.rules_file) if s.rules_file else None,  # the worker's rules too
                    assumed_consent=s.assumed_consent, bots=BotConfig.from_settings(s))
    parts = list(range(s.partitions))
    partition_of = DefaultPartitioner()
    now = int(time.time() * 1000)
    timings: list[float] = []
    parse_timings: list[float] = []
    for key, value, _ts in records:
        t0 = time.perf_counter()
        ev = parse(value, key, max_bytes=s.max_event_bytes, received_ms=now, max_future_skew_ms=s.max_future_skew_ms)
        parse_timings.append(time.perf_counter() - t0)
        p = partition_of(ev["user_key"].encode(), parts, parts)  # murmur2, as the valid topic's producer
        t0 = time.perf_counter()
        engine.process(p, ev, now)
        timings.append(time.perf_counter() - t0)
    return table, timings, parse_timings


def exact_percentiles_ms(xs: list[float]) -> dict[str, float]:
    ys = sorted(xs)
    if not ys:
        return {}

    def pct(q: float) -> float:  # nearest-rank percentile
        return round(1000 * ys[max(0, math.ceil(q * len(ys)) - 1)], 4)

    return {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": round(1000 * ys[-1], 4),
            "mean": round(1000 * statistics.fmean(ys), 4)}


def delete_redis_profiles(s: Settings) -> int | None:
    if not s.redis_url:
        return None
    try:
        import redis
        r = redis.Redis.from_url(s.redis_url, socket_timeout=5)
        n = 0
        batch: list[bytes] = []
        for k in r.scan_iter(match=f"{s.namespace}:profile:*", count=1000):
            batch.append(k)
            if len(batch) >= 1000:
                n += r.delete(*batch)
                batch.clear()
        if batch:
            n += r.delete(*batch)
        return n
    except Exception as err:  # noqa: BLE001 - cleanup is best effort
        say(f"could not delete Redis profiles of {s.namespace}: {err}")
        return None


# -- report --------------------------------------------------------------------------------------
def _ms(p: dict[str, Any] | None) -> str:
    if not p:
        return "n/a"
    lo, hi = p["bucket_ms"]
    if hi is None:
        return f"> {lo:g} ms (in the +Inf bucket)"
    if lo == 0:
        return f"<= {hi:g} ms (first bucket 0-{hi:g} ms: the histogram resolves nothing finer)"
    return f"{p['ms']:.3f} ms (interpolated in bucket {lo:g}-{hi:g} ms)"


def render(r: dict[str, Any]) -> str:
    b, c, inp = r["baseline"], r["clickpulse"], r["input"]
    lat = c["process_latency"]
    cl, off = r["bytes_per_user"]["changelog"], r["bytes_per_user"]["offline"]
    rows = [
        ("input", f"{inp['events']} events: {inp['source']} ({inp['source_events']} events, "
                  f"{inp['span_s']:.0f} s span) x {inp['copies']} copies, mean {inp['mean_value_bytes']:.0f} B/value"),
        ("broker", f"{r['broker']} (partitions {r['partitions']}), host CPUs {r['cpus']}"),
        ("", ""),
        ("baseline events/s", f"{b['events_per_s']:,.0f}  (aiokafka consume->produce, {b['events']} events "
                              f"in {b['seconds']:.2f} s, input pre-published)"),
        ("clickpulse events/s", f"{c['events_per_s']:,.0f}  ({c['events']} events in {c['seconds']:.2f} s "
                                f"from publish start to caught up)"),
        ("ratio clickpulse/baseline", f"{r['ratio']:.3f}  (baseline is {1 / r['ratio']:.1f}x faster)"
         if r["ratio"] else "n/a"),
        ("  publisher alone", f"{b['publish_events_per_s']:,.0f} events/s (baseline pre-publish, "
                              f"{b['publish_seconds']:.2f} s); clickpulse run: publish {c['publish_seconds']:.2f} s "
                              f"+ drain {c['drain_after_publish_seconds']:.2f} s; raw topic fully read at "
                              f"{c['raw_topic_read_seconds']:.2f} s"),
        ("  worker counters", f"raw {c['raw_messages']}, valid {c['events_valid']}, invalid {c['events_invalid']}, "
                              f"processed {c['events_processed']}, duplicates {c['duplicates']}, late {c['late']}, "
                              f"users {c['users']}, actions {c['actions']}"),
        ("", ""),
        ("process latency p50", _ms(lat.get("p50"))),
        ("process latency p95", _ms(lat.get("p95"))),
        ("process latency p99", _ms(lat.get("p99"))),
        ("process latency mean", f"{lat['mean_ms']:.3f} ms over {lat['count']} valid messages (histogram _sum/_count)"
         if lat["mean_ms"] is not None else "n/a"),
        ("offline Engine.process", "p50 {p50:.3f} ms, p95 {p95:.3f} ms, p99 {p99:.3f} ms, max {max:.3f} ms, mean {mean:.3f} ms"
         " (exact, same events, in this process, no Kafka/Faust)".format(**r["offline_engine_process_ms"])
         if r["offline_engine_process_ms"] else "n/a"),
        ("offline contract.parse", "p50 {p50:.3f} ms, p95 {p95:.3f} ms, p99 {p99:.3f} ms, max {max:.3f} ms, mean {mean:.3f} ms"
         " (exact; the ingest agent's validation step)".format(**r["offline_contract_parse_ms"])
         if r["offline_contract_parse_ms"] else "n/a"),
        ("", ""),
        ("bytes/user (changelog)", f"mean {cl['mean']}, p50 {cl['p50']}, p95 {cl['p95']}, max {cl['max']}  "
                                   f"({cl['users']} users, latest value per key of {r['bytes_per_user']['changelog_topic']})"
         if cl.get("users") else "n/a"),
        ("bytes/user (offline)", f"mean {off['mean']}, p50 {off['p50']}, p95 {off['p95']}, max {off['max']}  "
                                 f"({off['users']} users, same events through state.engine in-process)"
         if off.get("users") else "n/a"),
        ("  changelog vs offline", r["bytes_per_user"]["agreement"]),
        ("  events/user", f"mean {r['bytes_per_user']['events_per_user_mean']:.2f}, "
                          f"max {r['bytes_per_user']['events_per_user_max']}"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"clickpulse pipeline benchmark  (run {r['run']}, {r['events']} events)", "-" * 78]
    lines += [f"{k:<{w}}  {v}".rstrip() for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=50_000, help="events per measurement (default 50000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if args.events <= 0:
        ap.error("--events must be > 0")
    if not services("status"):
        say("local Kafka/Redis not running: deploy/local/services.sh start")
        services("start")

    run = time.strftime("%Y%m%d%H%M%S")
    base_settings = Settings.from_env()
    records, info = resampled_rees46(args.events)
    info["events"] = len(records)
    tmp = Path(tempfile.mkdtemp(prefix=f"clickpulse-bench-{run}-"))

    b = asyncio.run(baseline(base_settings.kafka_bootstrap, run, records, base_settings.partitions))
    say(f"baseline: {b['events_per_s']:.0f} events/s")
    c, s = clickpulse_run(run, records, tmp)
    say(f"clickpulse: {c['events_per_s']:.0f} events/s")

    say("bytes/user: reading the table changelog and recomputing offline")
    cl_topic, cl = changelog_states(s)
    off, timings, parse_timings = offline_states(s, records)
    same = sum(1 for k, v in off.items() if cl.get(k) == v)
    agreement = (f"{same} of {len(off)} offline states byte-identical to the changelog's latest value"
                 f" ({len(cl)} keys in the changelog)")
    ev_per_user = [UserState.from_bytes(v).life.events for v in off.values()]
    removed = delete_redis_profiles(s)

    result = {
        "run": run, "events": len(records), "broker": s.kafka_bootstrap, "partitions": s.partitions,
        "cpus": os.cpu_count(), "input": info, "baseline": b, "clickpulse": c,
        "ratio": round(c["events_per_s"] / b["events_per_s"], 4) if b["events_per_s"] else None,
        "bytes_per_user": {"changelog_topic": cl_topic, "changelog": size_stats([len(v) for v in cl.values()]),
                           "offline": size_stats([len(v) for v in off.values()]), "agreement": agreement,
                           "events_per_user_mean": round(statistics.fmean(ev_per_user), 3) if ev_per_user else 0,
                           "events_per_user_max": max(ev_per_user, default=0)},
        "offline_engine_process_ms": exact_percentiles_ms(timings),
        "offline_contract_parse_ms": exact_percentiles_ms(parse_timings),
        "redis_profiles_deleted": removed,
        "tmp_dir": str(tmp),
    }
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
