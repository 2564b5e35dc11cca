"""Running clickpulse: local services, worker processes, progress and topic reads.

Used by ``clickpulse demo`` and by the integration tests; nothing here is on the stream's path.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from .errors import ConfigError, ServiceError
from .settings import Settings

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_SH = REPO_ROOT / "deploy" / "local" / "services.sh"


def services(cmd: str) -> bool:
    """Run ``deploy/local/services.sh start|stop|status``; True on exit code 0.

    Raises
    ------
    ServiceError
        ``start`` failed, or the script is missing (clickpulse not run from a source checkout).
    """
    if not SERVICES_SH.exists():
        raise ServiceError(f"{SERVICES_SH} not found: run from a clickpulse source checkout")
    res = subprocess.run(["bash", str(SERVICES_SH), cmd], check=False, capture_output=cmd == "status")
    if cmd == "start" and res.returncode != 0:
        raise ServiceError("deploy/local/services.sh start failed; see .local/logs/")
    return res.returncode == 0


def stop_process_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
                       timeout_s: float = 30.0) -> int | None:
    """Send ``sig`` to the process group of ``proc`` (started with ``start_new_session``), wait
    ``timeout_s`` seconds, then SIGKILL; returns the exit code (``None`` when never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def check_port_free(host: str, port: int, setting: str) -> None:
    """Raise if a server cannot listen on ``host:port`` (bound as the servers bind: with
    ``SO_REUSEADDR``, so a port in TIME_WAIT counts as free).

    Raises
    ------
    ServiceError
        The port is in use (another worker or program); names ``setting``, the variable that
        chooses it.
    ConfigError
        The address cannot be bound here (not this host's, not resolvable, a privileged port).
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ServiceError(f"port {port} on {host} is already in use (another clickpulse process?); "
                                   f"choose another with {setting}") from err
            # an address that is not this host's, cannot be resolved, or a privileged port: invalid input
            raise ConfigError(f"port {port} on {host} cannot be bound: {err.strerror or err}; choose another "
                              f"address or port ({setting})") from err


T = TypeVar("T")


class Progress(Generic[T]):
    """Iterate ``items`` and print ``"<label>: N <unit> (R/s)"`` to ``out`` (stderr) at most
    every ``every_s`` seconds, and a final line from :meth:`done`. ``every_s <= 0``: silent."""

    def __init__(self, items: Iterable[T], label: str, unit: str = "records", every_s: float = 2.0,
                 out: IO[str] | None = None, clock: Any = time.monotonic) -> None:
        self.items, self.label, self.unit, self.every_s = items, label, unit, every_s
        self.out = out if out is not None else sys.stderr
        self.clock = clock
        self.count = 0
        self.t0 = clock()
        self._next = self.t0 + every_s

    def __iter__(self) -> Iterator[T]:
        for item in self.items:
            self.count += 1
            if self.every_s > 0:  # every item (~60 ns): a paced replay yields a few per second
                now = self.clock()
                if now >= self._next:
                    self._next = now + self.every_s
                    self._print(now)
            yield item

    def _print(self, now: float) -> None:
        rate = self.count / max(now - self.t0, 1e-9)
        print(f"{self.label}: {self.count:,} {self.unit} ({rate:,.0f}/s, {now - self.t0:.0f} s)",
              file=self.out, flush=True)

    def done(self) -> None:
        if self.every_s > 0:
            self._print(self.clock())


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """``stop`` (a new event when None), set on SIGTERM or SIGINT; call from the running loop.
    Where the loop cannot install handlers (not the main thread, Windows) nothing is installed."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    return stop


def free_port() -> int:
    """A loopback TCP port nobody listens on now, for a process started next.

    Chosen at random below the kernel's ephemeral range (``ip_local_port_range``, 32768–60999
    on Linux): a port the kernel hands out itself (``bind(0)``) is also what it gives the local
    side of outgoing connections, and with many Kafka clients on the machine one of them took
    such a port between the choice and the worker's bind (a worker exited 3, "already in use",
    in a CI run). Falls back to ``bind(0)`` when no port of the range is free after 50 tries."""
    import random
    rng = random.SystemRandom()
    for _ in range(50):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WorkerProcess:
    """A ``clickpulse worker`` subprocess with its own settings (env) and log file."""

    settings: Settings
    log_path: Path
    proc: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    command: str = "worker"

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.web_host}:{self.settings.web_port}"

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.settings.env(), **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "clickpulse.cli", self.command], env=env,
                                     stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Wait until the worker's web server answers and it owns partitions.

        Raises
        ------
        ServiceError
            The worker exited or did not become ready in time (its log path is in the message).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServiceError(f"worker exited with {self.proc.returncode if self.proc else None}; log: {self.log_path}")
            try:
                if self.command == "trainer":
                    if b"clickpulse trainer ready" in self.log_path.read_bytes():
                        return
                elif "clickpulse_raw_messages_total" in self.get("/metrics").decode():
                    if b"clickpulse ready" in self.log_path.read_bytes():
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise ServiceError(f"worker not ready after {timeout_s:.0f} s; log: {self.log_path}")

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base_url + path, timeout=5) as resp:
            return resp.read()

    def progress(self) -> dict[str, Any]:
        return orjson.loads(self.get("/progress"))

    def metrics(self) -> dict[str, float]:
        """Scrape ``/metrics``: ``{"name{label=value}": value}`` (labels sorted), plus bare names."""
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(self.get("/metrics").decode()):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Stop the worker (SIGTERM, then SIGKILL after ``timeout_s``); returns its exit code."""
        return stop_process_group(self.proc, sig, timeout_s)

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        self.stop(signal.SIGKILL, timeout_s=10)


async def _stop(consumer: AIOKafkaConsumer) -> None:
    # aiokafka raises CancelledError from stop() right after start() without a group
    # (aio-libs/aiokafka#647); the consumer is closed all the same.
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        pass


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    """Partition numbers of ``topic`` (empty when it does not exist). Never creates it: the
    metadata request says ``allow_auto_topic_creation=False`` (aiokafka's ``describe_topics``
    lets a broker with ``auto.create.topics.enable`` create the topic it is asked about)."""
    from aiokafka.protocol.metadata import MetadataRequest

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin._send_request(MetadataRequest([topic], allow_auto_topic_creation=False))
    finally:
        await admin.close()
    desc = resp.to_object()["topics"]
    return sorted(p["partition"] for d in desc if d["error_code"] == 0 for p in d["partitions"])


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Next offset to be written on each partition of ``topic``."""
    parts = await partitions_of(bootstrap, topic)
    if not parts:
        return {}
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = await c.end_offsets(tps) if tps else {}
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await _stop(c)


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[tuple[bytes | None, bytes, dict]]:
    """Every message currently in ``topic``, from the beginning to the end offsets:
    ``(key, value, {"partition", "offset", "headers"})``."""
    ends = await end_offsets(bootstrap, topic)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    await c.start()
    out: list[tuple[bytes | None, bytes, dict]] = []
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        if not tps:
            return out
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        remaining = {tp for tp in tps if ends[tp.partition] > 0}
        begins = await c.beginning_offsets(tps)
        remaining = {tp for tp in remaining if begins[tp] < ends[tp.partition]}
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=500)
            for tp, msgs in batch.items():
                for m in msgs:
                    if m.offset < ends[tp.partition]:
                        out.append((m.key, m.value, {"partition": tp.partition, "offset": m.offset,
                                                     "headers": list(m.headers or [])}))
                    if m.offset >= ends[tp.partition] - 1:
                        remaining.discard(tp)
        if remaining:
            raise ServiceError(f"timed out reading {topic}: {len(remaining)} partitions unfinished")
    finally:
        await _stop(c)
    out.sort(key=lambda r: (r[2]["partition"], r[2]["offset"]))
    return out


async def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """The consumer group's committed offsets (next offset to read) per (topic, partition)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offs = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offs.items()}


async def lag(settings: Settings) -> dict[str, int]:
    """Messages not yet committed by the worker's consumer group, per input topic."""
    committed = await committed_offsets(settings.kafka_bootstrap, settings.app_id)
    out = {}
    for topic in (settings.topic_raw, settings.topic_valid):
        ends = await end_offsets(settings.kafka_bootstrap, topic)
        out[topic] = sum(max(0, end - max(0, committed.get((topic, p), 0))) for p, end in ends.items())
    return out


def wait_caught_up(worker: WorkerProcess, settings: Settings, timeout_s: float = 300.0,
                   settle_s: float = 1.0, progress: IO[str] | None = None, every_s: float = 5.0) -> None:
    """Block until the worker's consumer group has committed everything on the raw and valid
    topics (checked twice, ``settle_s`` apart, so actions and Redis writes triggered by the last
    events have been flushed). With ``progress``, prints the remaining lag there every
    ``every_s`` seconds.

    Raises
    ------
    ServiceError
        Not caught up within ``timeout_s``, or the worker died.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    next_report = t0 + every_s
    confirmations = 0
    while time.monotonic() < deadline:
        if not worker.alive():
            raise ServiceError(f"worker died; log: {worker.log_path}")
        remaining = asyncio.run(lag(settings))
        if sum(remaining.values()) == 0:
            confirmations += 1
            if confirmations >= 2:
                return
            time.sleep(settle_s)
            continue
        confirmations = 0
        if progress is not None and time.monotonic() >= next_report:
            next_report = time.monotonic() + every_s
            print(f"  worker catching up: {sum(remaining.values()):,} messages to go "
                  f"({time.monotonic() - t0:.0f} s)", file=progress, flush=True)
        time.sleep(0.3)
    raise ServiceError(f"worker did not catch up within {timeout_s:.0f} s (lag {remaining}); log: {worker.log_path}")
