"""Shared pieces of the benchmarks: input, topics, subprocesses, timing and latency helpers.

Nothing here is clickpulse's stream path; ``pipeline.py`` and ``soak.py`` use it. Times are
wall-clock ``time.time()`` seconds unless a name says ``_ms``; the broker runs on the same host,
so its ``LogAppendTime`` timestamps (ms) are on the same clock.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:  # runnable without an installed package too
    sys.path.insert(0, str(SRC))

from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46  # noqa: E402

Record = tuple[bytes | None, bytes, int | None]
LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` with this checkout's ``src`` first on ``PYTHONPATH`` (the venv may hold an
    editable install of another checkout) plus ``extra``."""
    pp = os.environ.get("PYTHONPATH", "")
    parts = [str(SRC)] + [p for p in pp.split(os.pathsep) if p and Path(p).resolve() != SRC]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), **(extra or {})}


def reachable(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when the first ``host:port`` of ``bootstrap`` accepts a TCP connection."""
    import socket
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def ensure_services(bootstrap: str) -> None:
    """Start the local services (``deploy/local/services.sh start``) only when the broker does
    not answer: services started from another checkout keep their pid files there."""
    if reachable(bootstrap):
        return
    from clickpulse.runtime import services
    say(f"no broker at {bootstrap}: deploy/local/services.sh start")
    services("start")


# -- input ---------------------------------------------------------------------------------------
@dataclass
class Input:
    records: list[Record]
    types: list[str]          # event type of each record (for latency matching)
    info: dict[str, Any]


def resampled_rees46(n: int) -> Input:
    """N raw events: the bundled sample repeated; copy k has user ids ``<id>_k``, event ids
    ``<id>-k`` and timestamps shifted by k x (file span + 1 s)."""
    base = list(read_rees46(BUNDLED_SAMPLE))
    ts = [e["timestamp"] for e in base]
    shift = max(ts) - min(ts) + 1000
    out: list[Record] = []
    types: list[str] = []
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
            types.append(e["type"])
        k += 1
    info = {"source": BUNDLED_SAMPLE.name, "source_events": len(base), "copies": k, "events": len(out),
            "users": len({r[0] for r in out}), "span_s": (shift - 1000) / 1000,
            "mean_value_bytes": round(statistics.fmean(len(v) for _k, v, _t in out), 1)}
    return Input(out, types, info)


# -- topics --------------------------------------------------------------------------------------
async def create_topics(bootstrap: str, names: Iterable[str], partitions: int,
                        config: dict[str, str] | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1, topic_configs=dict(config or {})) for t in names])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def delete_topics_containing(bootstrap: str, marker: str) -> list[str]:
    """Delete every topic whose name contains ``marker`` (the run id: benchmark, worker, Faust
    and Quix internal topics all carry it). Returns the names."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        names = sorted(t for t in await admin.list_topics() if marker in t)
        for i in range(0, len(names), 50):
            await admin.delete_topics(names[i:i + 50], timeout_ms=30000)
        return names
    finally:
        await admin.close()


async def _stop_consumer(c: AIOKafkaConsumer) -> None:
    try:
        await c.stop()
    except asyncio.CancelledError:  # aio-libs/aiokafka#647: stop() right after start() without a group
        pass


async def end_offsets(bootstrap: str, topic: str, partitions: int,
                      consumer: AIOKafkaConsumer | None = None) -> dict[int, int]:
    c = consumer or AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    if consumer is None:
        await c.start()
    try:
        ends = await c.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        if consumer is None:
            await _stop_consumer(c)


async def last_timestamps_ms(bootstrap: str, topic: str, ends: dict[int, int]) -> dict[int, int]:
    """Timestamp of the last record of every non-empty partition (``ends`` = end offsets)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    out: dict[int, int] = {}
    try:
        tps = [TopicPartition(topic, p) for p, e in ends.items() if e > 0]
        if not tps:
            return out
        c.assign(tps)
        for tp in tps:
            c.seek(tp, ends[tp.partition] - 1)
        deadline = time.monotonic() + 30
        while len(out) < len(tps) and time.monotonic() < deadline:
            for tp, msgs in (await c.getmany(timeout_ms=500)).items():
                for m in msgs:
                    if m.offset == ends[tp.partition] - 1:
                        out[tp.partition] = m.timestamp
        return out
    finally:
        await _stop_consumer(c)


async def committed_total(bootstrap: str, group: str, topic: str, admin: AIOKafkaAdminClient | None = None) -> int:
    """Sum of ``group``'s committed offsets on ``topic``."""
    a = admin or AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    if admin is None:
        await a.start()
    try:
        offs = await a.list_consumer_group_offsets(group)
    finally:
        if admin is None:
            await a.close()
    return sum(max(0, meta.offset) for tp, meta in offs.items() if tp.topic == topic)


async def read_with_timestamps(bootstrap: str, topic: str, partitions: int,
                               timeout_s: float = 120.0) -> list[tuple[bytes | None, bytes, int]]:
    """Every record now in ``topic`` (read_committed): ``(key, value, timestamp_ms)``."""
    ends = await end_offsets(bootstrap, topic, partitions)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         isolation_level="read_committed", max_partition_fetch_bytes=8 * 1024 * 1024)
    await c.start()
    out: list[tuple[bytes | None, bytes, int]] = []
    try:
        tps = [TopicPartition(topic, p) for p, e in ends.items() if e > 0]
        if not tps:
            return out
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        remaining = set(tps)
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            for tp, msgs in (await c.getmany(timeout_ms=500)).items():
                for m in msgs:
                    if m.offset < ends[tp.partition]:
                        out.append((m.key, m.value, m.timestamp))
            for tp in list(remaining):  # control records (transactions) occupy offsets too
                if await c.position(tp) >= ends[tp.partition]:
                    remaining.discard(tp)
        return out
    finally:
        await _stop_consumer(c)


async def wait_output(bootstrap: str, topic: str, partitions: int, n: int, timeout_s: float,
                      alive: Any = None, group: str | None = None, input_topic: str | None = None,
                      poll_s: float = 0.1) -> float:
    """Wait until ``topic`` holds ``n`` records and return the time the last one was appended
    (max ``LogAppendTime`` of the partitions' last records, seconds).

    With ``group`` (a transactional writer: end offsets also count commit markers) it waits
    instead until ``group`` has committed ``n`` offsets of ``input_topic`` (committed in the same
    transaction as the outputs) and returns the first poll time that saw it."""
    deadline = time.monotonic() + timeout_s
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError("the system under test exited early")
            if group is not None:
                if await committed_total(bootstrap, group, input_topic, admin) >= n:
                    return time.time()
            else:
                ends = await end_offsets(bootstrap, topic, partitions, consumer=c)
                if sum(ends.values()) >= n:
                    ts = await last_timestamps_ms(bootstrap, topic, ends)
                    return max(ts.values()) / 1000
            await asyncio.sleep(poll_s)
    finally:
        await _stop_consumer(c)
        await admin.close()
    raise TimeoutError(f"{topic}: fewer than {n} records after {timeout_s:.0f} s")


# -- subprocesses --------------------------------------------------------------------------------
@dataclass
class Sub:
    """A benchmark subprocess (own session, log file) that reports to a JSON-lines status file."""

    argv: list[str]
    log_path: Path
    status_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> Sub:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, env=subprocess_env(self.env), stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(REPO))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            for line in self.status_path.read_bytes().splitlines():
                if line.strip():
                    out.update(orjson.loads(line))
        except (OSError, orjson.JSONDecodeError):
            pass
        return out

    def wait_status(self, key: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status()
            if key in st:
                return st[key]
            if not self.alive():
                raise RuntimeError(f"{self.argv[1]} exited with {self.proc.returncode}; log: {self.log_path}")
            time.sleep(0.1)
        raise TimeoutError(f"no {key!r} from {self.argv[1]} within {timeout_s:.0f} s; log: {self.log_path}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        from clickpulse.runtime import stop_process_group
        return stop_process_group(self.proc, signal.SIGTERM, timeout_s)


def write_status(path: str | Path, **kv: Any) -> None:
    """Append one JSON line to a subprocess status file (used by the systems under test)."""
    with open(path, "ab") as fh:
        fh.write(orjson.dumps(kv) + b"\n")


# -- steady-rate publishing ----------------------------------------------------------------------
async def paced_publish(bootstrap: str, topic: str, records: Sequence[Record], rate: float) -> list[float]:
    """Publish ``records`` at ``rate`` messages/s, spread evenly (message i is due at t0 + i/rate);
    returns each message's send time (``time.time()`` just before ``producer.send``). The
    producer does not linger (``linger_ms=0``), ``acks=all``, as the replay publisher."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                                max_request_size=4 * 1024 * 1024)
    await producer.start()
    sent: list[float] = []
    futs = []
    try:
        t0 = time.monotonic() + 0.05
        for i, (key, value, _ts) in enumerate(records):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(time.time())
            futs.append(await producer.send(topic, value=value, key=key))
            if len(futs) >= 2000:
                await asyncio.gather(*futs)
                futs.clear()
        await asyncio.gather(*futs)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


# -- statistics ----------------------------------------------------------------------------------
def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``xs``."""
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


def latency_stats(ms: list[float]) -> dict[str, Any]:
    ys = sorted(ms)
    if not ys:
        return {"pairs": 0}
    return {"pairs": len(ys), "p50_ms": round(pct(ys, 0.5), 1), "p95_ms": round(pct(ys, 0.95), 1),
            "p99_ms": round(pct(ys, 0.99), 1), "max_ms": round(ys[-1], 1), "mean_ms": round(statistics.fmean(ys), 1)}


def latency_timeline(pairs: list[tuple[float, float]], slices: int = 10) -> list[float]:
    """Median latency (ms) of each tenth (``slices``) of the run, by send time: flat when the
    system kept up, growing when a backlog built up."""
    if len(pairs) < slices:
        return []
    xs = sorted(pairs)
    size = len(xs) / slices
    return [round(statistics.median(lat for _t, lat in xs[round(i * size):round((i + 1) * size)]), 1)
            for i in range(slices)]


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` and its children (psutil; None without it)."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        p = psutil.Process(pid)
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
    except psutil.Error:
        return None
