#!/usr/bin/env python
"""Stream speed: one table comparing clickpulse with aiokafka, bare Faust and Quix Streams.

Run from the repository root, with the local services running (``deploy/local/services.sh start``)::

    .venv/bin/python benchmarks/pipeline.py [--events N] [--reps 3] [--json] [--keep]

Every system reads the same input (the bundled REES46 sample resampled to N events) from the
same broker. Repetitions are interleaved: rep 1 of every system, then rep 2, ... so that the
shared machine's drift hits every system alike. Systems (see ``benchmarks/README.md``):

1. ``aiokafka``      aiokafka consume -> produce passthrough, 1 hop, no decoding.
2. ``faust``         bare faust-streaming passthrough, batched (``take_events``), ``faust_tuning()``.
   ``faust-permsg``  the same, per message (``stream.events()`` + ``await send``), the worker's
                     current settings.
3. ``quix-alo``      Quix Streams peer: clickpulse's core per-user state step, RocksDB state,
   ``quix-eos``      at-least-once / exactly-once.
4. ``clickpulse``    the ``clickpulse worker`` (default rules, models, Redis), 2 hops.
5. produce -> action latency of clickpulse at 70 % of its median rate, and produce -> output of
   the tuned Faust passthrough at the same absolute rate.
6. worker RSS at the end of each rep, state bytes per user from the changelog.

Rates of 1-3: N / (first input message consumed -> last output record appended to the log,
broker ``LogAppendTime``); input published before the system starts. Rate of 4: N / (publish
start -> the worker has processed every raw and valid message), input published while it runs.
Topics created by the run (all names contain ``bench-<run>``) are deleted at the end unless
``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit as K  # noqa: E402  (puts this checkout's src/ on sys.path)
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.partitioner import DefaultPartitioner  # noqa: E402
from benchkit import say  # noqa: E402
from faust_passthrough import TAKE_MAX, TAKE_WITHIN_S, WORKER_CURRENT, faust_env, faust_tuning  # noqa: E402

from clickpulse.errors import ServiceError  # noqa: E402
from clickpulse.events.contract import parse  # noqa: E402
from clickpulse.ingest.replay import publish  # noqa: E402
from clickpulse.observability.metrics import Metrics  # noqa: E402
from clickpulse.runtime import WorkerProcess, free_port, read_topic, wait_caught_up  # noqa: E402
from clickpulse.settings import Settings  # noqa: E402
from clickpulse.state.user import StateConfig, UserState  # noqa: E402
from clickpulse.topics import ensure_topics  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve().parent
SYSTEMS = ("aiokafka", "faust", "faust-permsg", "quix-alo", "quix-eos", "clickpulse", "clickpulse-1hop")
DEFAULT_SYSTEMS = ("aiokafka", "faust", "faust-permsg", "quix-alo", "quix-eos", "clickpulse", "clickpulse-1hop")
LABELS = {
    "aiokafka": "1  aiokafka passthrough (1 hop, raw bytes)",
    "faust": "2  Faust passthrough, batched + faust_tuning()",
    "faust-permsg": "2b Faust passthrough, per message, untuned",
    "quix-alo": "3  Quix Streams state step, at-least-once",
    "quix-eos": "3b Quix Streams state step, exactly-once",
    "clickpulse": "4  clickpulse worker (2 hops, full) *",
    "clickpulse-1hop": "4b clickpulse worker, 1 hop (RAW_KEYED) *",
}
BASELINES = ("aiokafka", "faust", "quix-alo")


class Ctx:
    """What every rep needs: run id, broker, input, temp dir, timeouts."""

    def __init__(self, args: argparse.Namespace, settings: Settings, inp: K.Input, run: str, tmp: Path) -> None:
        self.args = args
        self.s = settings
        self.bootstrap = settings.kafka_bootstrap
        self.partitions = settings.partitions
        self.inp = inp
        self.n = len(inp.records)
        self.run = run
        self.tmp = tmp
        self.input_topic = f"bench-{run}.input"
        self.timeout = args.rep_timeout
        self.last_clickpulse: dict[str, Any] | None = None  # settings + metrics of the last worker rep


# -- 1. aiokafka passthrough -----------------------------------------------------------------------
async def aiokafka_rep(ctx: Ctx, rep: int) -> dict[str, Any]:
    out = f"bench-{ctx.run}.r{rep}.aiokafka.out"
    await K.create_topics(ctx.bootstrap, [out], ctx.partitions, K.LOG_APPEND)
    consumer = AIOKafkaConsumer(ctx.input_topic, bootstrap_servers=ctx.bootstrap,
                                group_id=f"bench-{ctx.run}-aiokafka-r{rep}", auto_offset_reset="earliest",
                                enable_auto_commit=True, auto_commit_interval_ms=1000)
    # acks=all and otherwise aiokafka's producer defaults (linger 0, 16 KiB batches)
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks="all")
    await producer.start()
    await consumer.start()
    done, t_first = 0, None
    deadline = time.monotonic() + ctx.timeout
    try:
        while done < ctx.n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"aiokafka passthrough: {done}/{ctx.n} messages after {ctx.timeout:.0f} s")
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                continue
            t_first = t_first or time.time()
            futs = [await producer.send(out, value=m.value, key=m.key) for msgs in batch.values() for m in msgs]
            await asyncio.gather(*futs)  # every message of the batch acked before the next fetch
            done += len(futs)
    finally:
        await consumer.stop()
        await producer.stop()
    t_end = await K.wait_output(ctx.bootstrap, out, ctx.partitions, ctx.n, 60)
    return {"seconds": t_end - t_first}


# -- 2. Faust passthroughs -------------------------------------------------------------------------
def faust_sub(ctx: Ctx, name: str, topic_in: str, topic_out: str, mode: str,
              tuning: dict[str, Any] | None = None) -> K.Sub:
    d = ctx.tmp / name
    argv = [PY, str(HERE / "faust_passthrough.py"), "--mode", mode, "--bootstrap", ctx.bootstrap,
            "--app-id", f"bench-{ctx.run}-{name}", "--in", topic_in, "--out", topic_out,
            "--partitions", str(ctx.partitions), "--status", str(d / "status.jsonl"), "--datadir", str(d / "data"),
            "--send", "gather", "--take", str(TAKE_MAX), "--within", str(TAKE_WITHIN_S)]
    if tuning:
        argv += ["--tuning", json.dumps(tuning)]
    return K.Sub(argv, d / "log.txt", d / "status.jsonl")


def sub_rep(ctx: Ctx, sub: K.Sub, out: str, **wait_kw: Any) -> dict[str, Any]:
    """Start a subprocess system over the pre-published input; rate from its first message to
    the last output."""
    try:
        sub.start()
        t_end = asyncio.run(K.wait_output(ctx.bootstrap, out, ctx.partitions, ctx.n, ctx.timeout + 60,
                                          alive=sub.alive, **wait_kw))
        t_first = sub.status().get("first")
        if t_first is None:
            raise RuntimeError(f"no first-message time from {sub.log_path}")
        return {"seconds": t_end - t_first, "log": str(sub.log_path)}
    finally:
        sub.stop()


def faust_rep(ctx: Ctx, rep: int, mode: str) -> dict[str, Any]:
    name = f"faust-r{rep}" if mode == "batch" else f"faust-permsg-r{rep}"
    out = f"bench-{ctx.run}.r{rep}.{name}.out"
    asyncio.run(K.create_topics(ctx.bootstrap, [out], ctx.partitions, K.LOG_APPEND))
    return sub_rep(ctx, faust_sub(ctx, name, ctx.input_topic, out, mode), out)


# -- 3. Quix Streams peer --------------------------------------------------------------------------
def quix_rep(ctx: Ctx, rep: int, guarantee: str) -> dict[str, Any]:
    name = f"quix-{'alo' if guarantee == 'at-least-once' else 'eos'}-r{rep}"
    out = f"bench-{ctx.run}.r{rep}.{name}.out"
    group = f"bench-{ctx.run}-{name}"
    asyncio.run(K.create_topics(ctx.bootstrap, [out], ctx.partitions, K.LOG_APPEND))
    d = ctx.tmp / name
    sub = K.Sub([PY, str(HERE / "quix_peer.py"), "--bootstrap", ctx.bootstrap, "--in", ctx.input_topic,
                 "--out", out, "--group", group, "--state-dir", str(d / "state"), "--status", str(d / "status.jsonl"),
                 "--guarantee", guarantee, "--commit-interval", "1.0"], d / "log.txt", d / "status.jsonl")
    # exactly-once: outputs become visible when the transaction (which carries the input
    # offsets) commits; the end is when the group's committed offsets cover the input
    wait_kw = {"group": group, "input_topic": ctx.input_topic} if guarantee == "exactly-once" else {}
    return sub_rep(ctx, sub, out, **wait_kw)


# -- 4. clickpulse worker --------------------------------------------------------------------------
def _total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def histogram_quantiles(m: dict[str, float], name: str, qs: tuple[float, ...]) -> dict[str, Any]:
    """Quantiles from a Prometheus histogram, interpolated linearly inside the bucket (as PromQL's
    ``histogram_quantile``). ``ms`` is ``None`` when the quantile is in the first bucket (only the
    upper bound is known) or in the +Inf bucket."""
    buckets = sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in m.items()
                     if k.startswith(name + "_bucket{"))
    count = m.get(name + "_count", 0.0)
    out: dict[str, Any] = {"count": int(count), "mean_ms": round(1000 * m.get(name + "_sum", 0.0) / count, 4)
                           if count else None}
    for q in qs:
        rank = q * count
        lo = prev_cum = 0.0
        for le, cum in buckets:
            if cum >= rank and count:
                if math.isinf(le):
                    out[f"p{round(q * 100)}"] = {"ms": None, "bucket_ms": [lo * 1000, None]}
                elif lo == 0.0:
                    out[f"p{round(q * 100)}"] = {"ms": None, "bucket_ms": [0.0, le * 1000]}
                else:
                    frac = (rank - prev_cum) / (cum - prev_cum) if cum > prev_cum else 1.0
                    out[f"p{round(q * 100)}"] = {"ms": round(1000 * (lo + (le - lo) * frac), 4),
                                                 "bucket_ms": [lo * 1000, le * 1000]}
                break
            lo, prev_cum = le, cum
    return out


async def wait_processed(worker: WorkerProcess, s: Settings, n: int, timeout_s: float,
                         poll_s: float = 0.1, one_hop: bool = False) -> tuple[float, float]:
    """Poll until the worker has read all ``n`` raw messages, published every valid one and
    processed every valid message. Returns ``time.perf_counter()`` of the first poll that saw the
    raw topic fully read and of the first poll that saw everything done."""
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        raw_ends = await K.end_offsets(s.kafka_bootstrap, s.topic_raw, s.partitions, consumer=c)
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
                    if one_hop:  # validated and processed in the same agent: count the step's outcomes
                        done = _total(m, "clickpulse_events_processed_total") + \
                            _total(m, "clickpulse_events_duplicate_total") + _total(m, "clickpulse_events_invalid_total")
                        if done >= n:
                            return t_raw, time.perf_counter()
                    elif valid + _total(m, "clickpulse_events_invalid_total") >= n:
                        valid_ends = await K.end_offsets(s.kafka_bootstrap, s.topic_valid, s.partitions, consumer=c)
                        if sum(valid_ends.values()) >= valid and seen_all(s.topic_valid, valid_ends, worker.progress()):
                            return t_raw, time.perf_counter()
            except OSError:
                pass
            await asyncio.sleep(poll_s)
        raise ServiceError(f"worker did not process {n} events within {timeout_s:.0f} s; log: {worker.log_path}")
    finally:
        await c.stop()


def start_worker(ctx: Ctx, name: str, one_hop: bool = False) -> tuple[WorkerProcess, Settings]:
    s = ctx.s.replace(namespace=f"bench-{ctx.run}-{name}", time_mode="replay", web_port=free_port(),
                      data_dir=str(ctx.tmp / name / "worker-data"), raw_keyed=one_hop)
    # actions stamped by the broker when appended: the end point of the produce -> action latency
    asyncio.run(K.create_topics(s.kafka_bootstrap, [s.topic_actions], s.partitions, K.LOG_APPEND))
    asyncio.run(ensure_topics(s))
    env = {"PYTHONPATH": K.subprocess_env()["PYTHONPATH"]}
    worker = WorkerProcess(s, ctx.tmp / name / "worker.log", extra_env=env)
    say(f"  {name}: starting worker (log {worker.log_path})")
    worker.start().wait_ready()
    return worker, s


def clickpulse_rep(ctx: Ctx, rep: int, one_hop: bool = False) -> dict[str, Any]:
    name = f"cp{'1' if one_hop else ''}{rep}"
    worker, s = start_worker(ctx, name, one_hop)
    try:
        t0 = time.perf_counter()
        pub = asyncio.run(publish(s.kafka_bootstrap, s.topic_raw, ctx.inp.records))
        t_pub = time.perf_counter()
        t_raw, t_done = asyncio.run(wait_processed(worker, s, ctx.n, ctx.timeout, one_hop=one_hop))
        rss = K.rss_bytes(worker.proc.pid)  # before the settle: the state the run built
        wait_caught_up(worker, s)  # the runtime's own check (+ settle), not timed
        m = worker.metrics()
    finally:
        rc = worker.stop()
        delete_redis_profiles(s)
    res = {"seconds": t_done - t0, "publish_seconds": round(pub.seconds, 3),
           "drain_after_publish_seconds": round(t_done - t_pub, 3), "raw_topic_read_seconds": round(t_raw - t0, 3),
           "rss_bytes": rss, "namespace": s.namespace, "worker_log": str(worker.log_path), "worker_exit_code": rc,
           "counters": {k: int(_total(m, "clickpulse_" + k)) for k in (
               "raw_messages_total", "events_valid_total", "events_invalid_total", "events_processed_total",
               "events_duplicate_total", "events_late_total", "users_new_total", "actions_total")},
           "process_latency": histogram_quantiles(m, "clickpulse_event_process_seconds", (0.5, 0.95, 0.99))}
    if not one_hop:
        ctx.last_clickpulse = {"settings": s, "result": res}
    return res


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


# -- 5. latency ------------------------------------------------------------------------------------
def immediate_triggers(s: Settings) -> dict[str, str | None]:
    """Trigger name -> event type it fires on, for triggers that fire on the event itself
    (``on: <type>``: the type; segment enter/exit: None = any type). Timeout triggers fire at a
    timer's due time, not on an event, and are left out."""
    if not s.rules_file:
        return {}
    from clickpulse.rules.ruleset import load_rules
    return {t.name: (t.on.event_type if t.on.kind == "event" else None)
            for t in load_rules(s.rules_file).triggers if t.on.kind != "timeout"}


def clickpulse_latency(ctx: Ctx, rate: float, m: int) -> dict[str, Any]:
    """Publish the first ``m`` events at ``rate``/s to a fresh worker; latency = action's
    LogAppendTime - the producer's send time of its triggering event."""
    records = ctx.inp.records[:m]
    worker, s = start_worker(ctx, "cplat")
    try:
        time.sleep(2.0)  # let the fetch loops settle after the first rebalance
        say(f"  latency: publishing {m} events at {rate:.0f}/s to {s.topic_raw}")
        sent = asyncio.run(K.paced_publish(s.kafka_bootstrap, s.topic_raw, records, rate))
        asyncio.run(wait_processed(worker, s, m, ctx.timeout))
        time.sleep(1.5)  # actions of the last events: published after processing
        actions = asyncio.run(K.read_with_timestamps(s.kafka_bootstrap, s.topic_actions, s.partitions))
    finally:
        worker.stop()
        delete_redis_profiles(s)
    by_event: dict[tuple[str, int], list[tuple[float, str, int]]] = {}
    for i, ((key, value, ts_ms), t_sent, typ) in enumerate(zip(records, sent, ctx.inp.types, strict=False)):
        by_event.setdefault((key.decode(), ts_ms), []).append((t_sent, typ, i))
    immediate = immediate_triggers(s)
    lat: list[tuple[float, float]] = []
    first_copy: list[float] = []  # triggering event in the input's first copy: before any event-time jump
    kinds: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for _k, value, ts_ms in actions:
        a = json.loads(value)
        trig = a.get("trigger")
        if trig is not None and trig not in immediate:
            skipped["timeout trigger"] += 1
            continue
        want = immediate.get(trig) if trig is not None else None
        cands = [c for c in by_event.get((a["user_key"], a["event_time_ms"]), []) if want is None or c[1] == want]
        if not cands:
            skipped["no event with that (user_key, event_time_ms)"] += 1
            continue
        if len(cands) > 1:
            skipped["ambiguous (several events, same user and ms)"] += 1
            continue
        lat.append((cands[0][0], ts_ms - 1000 * cands[0][0]))
        if cands[0][2] < ctx.inp.info["source_events"]:
            first_copy.append(ts_ms - 1000 * cands[0][0])
        kinds[a["type"]] += 1
    return {"events": m, "rate": round(rate, 1), "publish_seconds": round(sent[-1] - sent[0], 2) if sent else 0,
            "actions": len(actions), "matched_by_type": dict(kinds), "unmatched": dict(skipped),
            **K.latency_stats([x for _t, x in lat]), "p50_ms_by_tenth": K.latency_timeline(lat),
            "first_copy": K.latency_stats(first_copy)}


def faust_latency(ctx: Ctx, rate: float, m: int) -> dict[str, Any]:
    records = ctx.inp.records[:m]
    tin, tout = f"bench-{ctx.run}.lat.faust.in", f"bench-{ctx.run}.lat.faust.out"
    asyncio.run(K.create_topics(ctx.bootstrap, [tin], ctx.partitions))
    asyncio.run(K.create_topics(ctx.bootstrap, [tout], ctx.partitions, K.LOG_APPEND))
    sub = faust_sub(ctx, "faust-lat", tin, tout, "batch")
    try:
        sub.start()
        sub.wait_status("ready", 90)
        time.sleep(2.0)
        say(f"  latency: publishing {m} events at {rate:.0f}/s to {tin}")
        sent = asyncio.run(K.paced_publish(ctx.bootstrap, tin, records, rate))
        asyncio.run(K.wait_output(ctx.bootstrap, tout, ctx.partitions, m, ctx.timeout, alive=sub.alive))
        outs = asyncio.run(K.read_with_timestamps(ctx.bootstrap, tout, ctx.partitions))
    finally:
        sub.stop()
    count = Counter(v for _k, v, _t in records)
    sent_at = {v: t for (_k, v, _t), t in zip(records, sent, strict=False) if count[v] == 1}
    lat = [(sent_at[v], ts - 1000 * sent_at[v]) for _k, v, ts in outs if v in sent_at]
    return {"events": m, "rate": round(rate, 1), "publish_seconds": round(sent[-1] - sent[0], 2) if sent else 0,
            "outputs": len(outs), "unmatched": {"duplicate input values": len(records) - len(sent_at)},
            **K.latency_stats([x for _t, x in lat]), "p50_ms_by_tenth": K.latency_timeline(lat)}


# -- 6. bytes per user -----------------------------------------------------------------------------
def size_stats(sizes: list[int]) -> dict[str, Any]:
    if not sizes:
        return {"users": 0}
    xs = sorted(sizes)
    return {"users": len(xs), "mean": round(statistics.fmean(xs), 1), "p50": K.pct(xs, 0.5), "p95": K.pct(xs, 0.95),
            "max": xs[-1], "total_bytes": sum(xs)}


def changelog_states(s: Settings) -> tuple[str, dict[bytes, bytes]]:
    topic = f"{s.app_id}-{s.state_table}-changelog"
    latest: dict[bytes, bytes | None] = {}
    for key, value, _meta in asyncio.run(read_topic(s.kafka_bootstrap, topic, timeout_s=120.0)):
        latest[key] = value
    return topic, {k: v for k, v in latest.items() if v is not None}


def offline_states(s: Settings, records: list[K.Record]) -> tuple[dict[bytes, bytes], list[float], list[float]]:
    """Apply the same events with the worker's engine, in per-partition order, no Kafka; also
    returns the wall time of each ``Engine.process`` and of each ``contract.parse`` call (s)."""
    from clickpulse.engine import build_engine
    table: dict[bytes, bytes] = {}
    engine = build_engine(s, table, metrics=Metrics())  # the worker's factory: same rules, models, settings
    parts = list(range(s.partitions))
    partition_of = DefaultPartitioner()
    now = int(time.time() * 1000)
    timings: list[float] = []
    parse_timings: list[float] = []
    for key, value, _ts in records:
        t0 = time.perf_counter()
        ev = parse(value, key, max_bytes=s.max_event_bytes, received_ms=now, max_future_skew_ms=s.max_future_skew_ms)
        parse_timings.append(time.perf_counter() - t0)
        p = partition_of(ev["user_key"].encode(), parts, parts)
        t0 = time.perf_counter()
        engine.process(p, ev, now)
        timings.append(time.perf_counter() - t0)
    return table, timings, parse_timings


def exact_percentiles_ms(xs: list[float]) -> dict[str, float]:
    ys = sorted(xs)
    if not ys:
        return {}
    return {"p50": round(1000 * K.pct(ys, 0.5), 4), "p95": round(1000 * K.pct(ys, 0.95), 4),
            "p99": round(1000 * K.pct(ys, 0.99), 4), "max": round(1000 * ys[-1], 4),
            "mean": round(1000 * statistics.fmean(ys), 4)}


def state_sizes(ctx: Ctx) -> dict[str, Any]:
    s = ctx.last_clickpulse["settings"]
    cl_topic, cl = changelog_states(s)
    off, timings, parse_timings = offline_states(s, ctx.inp.records)
    def comparable(v: bytes) -> bytes:  # last_wall_ms is the arrival wall clock: differs by design
        st = UserState.from_bytes(v)
        st.life.last_wall_ms = None
        return st.to_bytes()

    same = sum(1 for k, v in off.items() if k in cl and comparable(cl[k]) == comparable(v))
    ev_per_user = [UserState.from_bytes(v).life.events for v in off.values()]
    return {"changelog_topic": cl_topic, "changelog": size_stats([len(v) for v in cl.values()]),
            "offline": size_stats([len(v) for v in off.values()]),
            "agreement": f"{same} of {len(off)} offline states byte-identical to the changelog's latest value "
                         f"(but for lifetime.last_wall_ms; {len(cl)} keys in the changelog)",
            "events_per_user_mean": round(statistics.fmean(ev_per_user), 3) if ev_per_user else 0,
            "events_per_user_max": max(ev_per_user, default=0),
            "offline_engine_process_ms": exact_percentiles_ms(timings),
            "offline_contract_parse_ms": exact_percentiles_ms(parse_timings)}


# -- the run ---------------------------------------------------------------------------------------
def run_reps(ctx: Ctx, systems: list[str]) -> dict[str, list[dict[str, Any]]]:
    runners: dict[str, Callable[[int], dict[str, Any]]] = {
        "aiokafka": lambda r: asyncio.run(aiokafka_rep(ctx, r)),
        "faust": lambda r: faust_rep(ctx, r, "batch"),
        "faust-permsg": lambda r: faust_rep(ctx, r, "per-message"),
        "quix-alo": lambda r: quix_rep(ctx, r, "at-least-once"),
        "quix-eos": lambda r: quix_rep(ctx, r, "exactly-once"),
        "clickpulse": lambda r: clickpulse_rep(ctx, r),
        "clickpulse-1hop": lambda r: clickpulse_rep(ctx, r, one_hop=True),
    }
    reps: dict[str, list[dict[str, Any]]] = {k: [] for k in systems}
    for rep in range(1, ctx.args.reps + 1):
        for name in systems:
            say(f"rep {rep}/{ctx.args.reps}: {name}")
            t0 = time.monotonic()
            try:
                res = runners[name](rep)
                res["events_per_s"] = round(ctx.n / res["seconds"], 1)
                res["seconds"] = round(res["seconds"], 3)
                say(f"  {name}: {res['events_per_s']:,.0f} events/s ({res['seconds']:.2f} s; "
                    f"rep took {time.monotonic() - t0:.0f} s)")
            except Exception as err:  # noqa: BLE001 - one failed rep is reported, the table goes on
                say(f"  {name} rep {rep} FAILED: {type(err).__name__}: {err}")
                traceback.print_exc(file=sys.stderr)
                res = {"error": f"{type(err).__name__}: {err}"}
            res["rep"] = rep
            reps[name].append(res)
    return reps


def summarize(reps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rs in reps.items():
        eps = [r.get("events_per_s") for r in rs]
        ok = [x for x in eps if x]
        row: dict[str, Any] = {"label": LABELS[name].split(" ", 1)[1].strip(), "events_per_s_reps": eps,
                               "events_per_s_median": round(statistics.median(ok), 1) if ok else None,
                               "ratios": {}}
        for b in BASELINES:
            if b not in reps:
                continue
            # paired: rep i of this system / rep i of the baseline (same stretch of the machine's load)
            pairs = [x / y for x, y in zip(eps, [r.get("events_per_s") for r in reps[b]], strict=True) if x and y]
            row["ratios"][b] = round(statistics.median(pairs), 4) if pairs else None
        rss = [r.get("rss_bytes") for r in rs if r.get("rss_bytes")]
        if rss:
            row["rss_mib_reps"] = [round(x / 2**20, 1) for x in rss]
            row["rss_mib_median"] = round(statistics.median(rss) / 2**20, 1)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=50_000, help="events per measurement (default 50000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each system, interleaved (default 3)")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    ap.add_argument("--latency-load", type=float, default=0.7,
                    help="latency test rate as a fraction of clickpulse's median events/s (default 0.7)")
    ap.add_argument("--latency-seconds", type=float, default=60.0,
                    help="publish for about this long in the latency test (at most --events events; default 60)")
    ap.add_argument("--latency-rate", type=float, default=0.0,
                    help="latency test rate in events/s, instead of --latency-load x clickpulse's median")
    ap.add_argument("--no-latency", action="store_true", help="skip the produce -> action latency test")
    ap.add_argument("--rep-timeout", type=float, default=600.0, help="seconds one rep may take (default 600)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--keep", action="store_true", help="keep the run's topics and temp dir")
    args = ap.parse_args(argv)
    if args.events <= 0 or args.reps <= 0:
        ap.error("--events and --reps must be > 0")
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]

    if bad := [x for x in systems if x not in SYSTEMS]:
        ap.error(f"unknown systems {bad}; choose from {SYSTEMS}")
    import importlib.util
    if importlib.util.find_spec("quixstreams") is None and any(x.startswith("quix") for x in systems):
        say("quixstreams not installed (pip install -e '.[bench]'): skipping the Quix rows")
        systems = [x for x in systems if not x.startswith("quix")]
    settings = Settings.from_env()
    K.ensure_services(settings.kafka_bootstrap)

    run = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
    inp = K.resampled_rees46(args.events)
    tmp = Path(tempfile.mkdtemp(prefix=f"clickpulse-bench-{run}-"))
    ctx = Ctx(args, settings, inp, run, tmp)
    failed = False
    result: dict[str, Any] = {"run": run, "events": ctx.n, "reps": args.reps, "broker": ctx.bootstrap,
                              "partitions": ctx.partitions, "cpus": os.cpu_count(), "input": inp.info,
                              "faust_tuning": faust_tuning(), "faust_take": {"max": TAKE_MAX, "within_s": TAKE_WITHIN_S},
                              "worker_current_faust_settings": WORKER_CURRENT, "tmp_dir": str(tmp)}
    try:
        say(f"run {run}: {ctx.n} events, {args.reps} reps of {', '.join(systems)}")
        asyncio.run(K.create_topics(ctx.bootstrap, [ctx.input_topic], ctx.partitions))
        pub = asyncio.run(publish(ctx.bootstrap, ctx.input_topic, inp.records))
        result["publisher_alone_events_per_s"] = round(ctx.n / pub.seconds, 1)
        say(f"input: {ctx.n} events on {ctx.input_topic} ({ctx.n / pub.seconds:,.0f} events/s publishing)")

        reps = run_reps(ctx, systems)
        summary = summarize(reps)
        result["systems"] = {k: {**summary[k], "reps": reps[k]} for k in systems}
        failed = any("error" in r for rs in reps.values() for r in rs)

        cp = summary.get("clickpulse", {}).get("events_per_s_median")
        if (cp or args.latency_rate) and not args.no_latency:
            rate = args.latency_rate or args.latency_load * cp
            m = max(100, min(ctx.n, round(rate * args.latency_seconds)))
            result["latency"] = {"load": rate / cp if cp else None, "rate": round(rate, 1), "events": m,
                                 "clickpulse_median_events_per_s": cp}
            for name, fn in (("clickpulse", clickpulse_latency), ("faust", faust_latency)):
                say(f"latency: {name} at {rate:.0f} events/s ({m} events)")
                try:
                    result["latency"][name] = fn(ctx, rate, m)
                except Exception as err:  # noqa: BLE001
                    failed = True
                    say(f"  latency {name} FAILED: {type(err).__name__}: {err}")
                    traceback.print_exc(file=sys.stderr)
                    result["latency"][name] = {"error": f"{type(err).__name__}: {err}"}
        if ctx.last_clickpulse is not None:
            say("bytes/user: reading the table changelog and recomputing offline")
            result["clickpulse_detail"] = {k: ctx.last_clickpulse["result"][k] for k in
                                           ("counters", "process_latency", "namespace")}
            result["clickpulse_detail"]["rep"] = reps["clickpulse"][-1]["rep"]
            result["bytes_per_user"] = state_sizes(ctx)
    finally:
        if not args.keep:
            try:
                deleted = asyncio.run(K.delete_topics_containing(ctx.bootstrap, f"bench-{run}"))
                result["topics_deleted"] = len(deleted)
                say(f"deleted {len(deleted)} topics containing bench-{run}")
            except Exception as err:  # noqa: BLE001
                say(f"could not delete the run's topics: {err}")
            if not failed:
                shutil.rmtree(tmp, ignore_errors=True)
                result["tmp_dir"] = None
    print(json.dumps(result, indent=2, default=str) if args.json else render(result))
    return 1 if failed else 0


# -- report ----------------------------------------------------------------------------------------
def _eps(x: float | None) -> str:
    return f"{x:,.0f}" if x else "failed"


def _ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x >= 0.1 else f"{x:.4f}"


def _hist_ms(p: dict[str, Any] | None) -> str:
    if not p:
        return "n/a"
    lo, hi = p["bucket_ms"]
    if hi is None:
        return f"> {lo:g} ms"
    if lo == 0:
        return f"<= {hi:g} ms"
    return f"{p['ms']:.2f} ms"


def render(r: dict[str, Any]) -> str:
    inp = r["input"]
    lines = [f"clickpulse stream-speed benchmark  (run {r['run']})",
             f"input  {r['events']:,} events: {inp['source']} x {inp['copies']} copies, {inp['users']:,} users, "
             f"mean {inp['mean_value_bytes']:.0f} B/value; broker {r['broker']}, {r['partitions']} partitions, "
             f"{r['cpus']} CPUs shared by broker, systems and harness",
             f"{r['reps']} reps per system, interleaved; publisher alone "
             f"{r.get('publisher_alone_events_per_s', 0):,.0f} events/s", ""]
    systems = r.get("systems", {})
    if systems:
        bases = [b for b in BASELINES if b in systems]
        w = max(len(LABELS[k]) for k in systems)
        head = f"{'events/s':<{w}}  {'median':>8}" + "".join(f"  {'rep ' + str(i + 1):>8}" for i in range(r["reps"]))
        head += "".join(f"  {'÷' + b:>10}" for b in bases)
        lines += [head, "-" * len(head)]
        for k, row in systems.items():
            line = f"{LABELS[k]:<{w}}  {_eps(row['events_per_s_median']):>8}"
            line += "".join(f"  {_eps(x):>8}" for x in row["events_per_s_reps"])
            line += "".join(f"  {_ratio(row['ratios'].get(b)):>10}" for b in bases)
            lines.append(line)
        lines += ["ratios: median over reps of (row's rep i ÷ baseline's rep i).",
                  "rates 1-3: N / (first input message consumed -> last output appended), input pre-published;",
                  "* clickpulse: N / (publish start -> every raw and valid message processed), published while running.",
                  ""]
        for k in ("clickpulse", "clickpulse-1hop"):
            if systems.get(k, {}).get("rss_mib_median"):
                row = systems[k]
                lines.append(f"worker RSS at the end ({k}): median {row['rss_mib_median']:.0f} MiB "
                             f"(reps: {' / '.join(f'{x:.0f}' for x in row['rss_mib_reps'])} MiB)")
    lat = r.get("latency")
    if lat:
        load = f"{lat['load']:.0%} of clickpulse's median" if lat.get("load") else "--latency-rate"
        lines += ["", f"produce -> output latency at {lat['rate']:,.0f} events/s ({load}), first {lat['events']:,} "
                      f"events spread evenly over {lat['events'] / lat['rate']:.0f} s",
                  f"{'(ms)':<44}{'pairs':>7}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}"]
        for name, label in (("clickpulse", "clickpulse: event sent -> action appended"),
                            ("faust", "Faust passthrough (tuned): sent -> out appended")):
            x = lat.get(name, {})
            if "error" in x or not x.get("pairs"):
                lines.append(f"{label:<44}{x.get('error', 'no matched pairs')}")
                continue
            lines.append(f"{label:<44}{x['pairs']:>7}" + "".join(f"{x[q]:>10,.0f}" if x[q] >= 100 else f"{x[q]:>10.1f}"
                                                                  for q in ("p50_ms", "p95_ms", "p99_ms", "max_ms")))
        for name in ("clickpulse", "faust"):
            tl = lat.get(name, {}).get("p50_ms_by_tenth")
            if tl:
                lines.append(f"  {name} p50 by tenth of the run (ms): {' '.join(f'{x:.0f}' for x in tl)}")
        c = lat.get("clickpulse", {})
        fc = c.get("first_copy", {})
        if fc.get("pairs"):
            lines.append(f"  clickpulse, events of the first copy only (before the input's first event-time jump): "
                         f"{fc['pairs']} pairs, p50 {fc['p50_ms']:.1f}, p95 {fc['p95_ms']:.1f}, p99 {fc['p99_ms']:.1f} ms")
        if c.get("pairs"):
            lines.append(f"  clickpulse: {c['actions']} actions; matched {c['matched_by_type']}; not matched {c['unmatched']}")
    b = r.get("bytes_per_user")
    if b:
        cl, off, d = b["changelog"], b["offline"], r["clickpulse_detail"]
        lat_h = d["process_latency"]
        cnt = d["counters"]
        ep, cp = b["offline_engine_process_ms"], b["offline_contract_parse_ms"]
        lines += ["",
                  f"state bytes/user (changelog)   mean {cl.get('mean')}, p50 {cl.get('p50')}, p95 {cl.get('p95')}, "
                  f"max {cl.get('max')} ({cl.get('users')} users, {b['changelog_topic']})",
                  f"  offline recomputation       mean {off.get('mean')}, p50 {off.get('p50')}; {b['agreement']}; "
                  f"{b['events_per_user_mean']:.2f} events/user",
                  f"worker counters (rep {d['rep']})      raw {cnt['raw_messages_total']}, valid {cnt['events_valid_total']}, "
                  f"invalid {cnt['events_invalid_total']}, processed {cnt['events_processed_total']}, duplicates "
                  f"{cnt['events_duplicate_total']}, late {cnt['events_late_total']}, users {cnt['users_new_total']}, "
                  f"actions {cnt['actions_total']}",
                  f"process agent time per event   p50 {_hist_ms(lat_h.get('p50'))}, p95 {_hist_ms(lat_h.get('p95'))}, "
                  f"p99 {_hist_ms(lat_h.get('p99'))}, mean {lat_h['mean_ms']:.3f} ms (histogram)",
                  f"offline Engine.process         p50 {ep['p50']:.3f} ms, p99 {ep['p99']:.3f} ms, mean {ep['mean']:.3f} ms; "
                  f"contract.parse p50 {cp['p50']:.3f} ms, mean {cp['mean']:.3f} ms"]
    errors = [f"{k} rep {x['rep']}: {x['error']}" for k, row in systems.items() for x in row["reps"] if "error" in x]
    if errors:
        lines += ["", "FAILED reps:"] + [f"  {e}" for e in errors]
    if r.get("tmp_dir"):
        lines.append(f"logs: {r['tmp_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
