"""Publishing a dataset to the raw topic, preserving event time.

Each message is keyed by the event's user (``user_id`` or ``anon:`` + ``anonymous_id``), so a
user's events stay in file order on one partition. Event time travels in the payload's
``timestamp``; the Kafka message timestamp stays the publish time (a 2019 CreateTime would make
the broker's time-based retention delete the replayed data at once). ``speed`` paces publication by event time (``60`` = one hour of data per minute);
``0`` publishes as fast as the broker takes it. ``flush=True`` ends with an ``end_of_input``
control message on every raw partition, which closes the input's event time in the worker (all
pending timers fire), like the final watermark of a bounded stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from ..errors import DatasetError
from ..events.control import control_headers
from .datasets import event_time_of, read_jsonl, read_rees46

log = logging.getLogger(__name__)
FORMATS = ("rees46", "jsonl")


@dataclass
class ReplayResult:
    published: int
    first_event_ms: int | None
    last_event_ms: int | None
    seconds: float
    flushed: bool


def _key_of(obj: Any) -> bytes | None:
    if not isinstance(obj, dict):
        return None
    uid = obj.get("user_id", obj.get("userId"))
    if uid not in (None, ""):
        return str(uid).encode()
    aid = obj.get("anonymous_id", obj.get("anonymousId"))
    if aid not in (None, ""):
        return ("anon:" + str(aid)).encode()
    return None


@dataclass
class JsonlStats:
    """What :func:`messages` saw in a JSON-lines file: ``lines`` (non-empty), ``not_objects``
    (lines that are not a JSON object: not JSON at all, or an array/number/...) and the 1-based
    number of the first such line (``first_bad``; counting non-empty lines)."""

    lines: int = 0
    not_objects: int = 0
    first_bad: int | None = None


def messages(fmt: str, path: str | Path, stats: JsonlStats | None = None,
             strict: bool = False) -> Iterator[tuple[bytes | None, bytes, int | None]]:
    """``(key, value, event_time_ms)`` for every record of a dataset file.

    ``jsonl``: a line that is not a JSON object is published as it is (ingest dead-letters it as
    ``not_json``/``not_object``) and counted in ``stats``; with ``strict`` it raises instead.

    Raises
    ------
    DatasetError
        Unknown format, missing file or malformed file header; ``strict`` and a line of a
        ``jsonl`` file that is not a JSON object.
    """
    if fmt == "rees46":
        for ev in read_rees46(path):
            yield _key_of(ev), orjson.dumps(ev), ev["timestamp"]
    elif fmt == "jsonl":
        stats = stats if stats is not None else JsonlStats()
        for line in read_jsonl(path):
            stats.lines += 1
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None  # published as-is: ingest sends it to the dead-letter topic
            if not isinstance(obj, dict):
                stats.not_objects += 1
                if stats.first_bad is None:
                    stats.first_bad = stats.lines
                if strict:
                    raise DatasetError(f"{path}: line {stats.lines} (non-empty lines counted) is not a JSON object; "
                                       "a jsonl file has one event object per line")
            yield _key_of(obj), line, event_time_of(line)
    else:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {FORMATS}")


async def publish(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes, int | None]], *,
                  speed: float = 0.0, flush: bool = False, run_id: str = "", control_key: str = "",
                  namespace: str = "") -> ReplayResult:
    """Publish ``records`` to ``topic``; see the module docstring. Returns counts and timing.

    Raises
    ------
    ValueError
        ``flush`` without a ``control_key`` (``CLICKPULSE_CONTROL_KEY``): an unsigned end of
        input would be dead-lettered as ``forged_control``.
    """
    if flush and not control_key:
        raise ValueError("--flush needs CLICKPULSE_CONTROL_KEY (the worker's control key) to sign the end of input")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_batch_size=256 * 1024, max_request_size=4 * 1024 * 1024,
                                enable_idempotence=True)
    await producer.start()
    n = 0
    first = last = None
    t0 = time.monotonic()
    try:
        pending = []
        for key, value, ts in records:
            if speed > 0 and ts is not None:
                if first is None:
                    first = ts
                due = (ts - first) / 1000 / speed
                delay = due - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
            first = ts if first is None else first
            last = ts if ts is not None else last
            pending.append(await producer.send(topic, value=value, key=key))
            n += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        if flush:
            parts = sorted(await producer.partitions_for(topic))
            for p in parts:
                body = orjson.dumps({"schema_version": 1, "control": "end_of_input", "source_partition": p,
                                     "source_partitions": len(parts), "run_id": run_id or str(int(time.time())),
                                     "namespace": namespace or topic.removesuffix(".events.raw"),
                                     "issued_at_ms": int(time.time() * 1000)})
                await (await producer.send(topic, value=body, partition=p,
                                           headers=control_headers(control_key, body)))
        await producer.flush()
    finally:
        await producer.stop()
    return ReplayResult(n, first, last, time.monotonic() - t0, flush)
