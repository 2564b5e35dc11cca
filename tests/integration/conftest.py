"""Integration fixtures: the real Kafka broker and Redis of deploy/local (started if needed),
one namespace (topics, consumer group, Redis keys) per test, worker subprocesses."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from aiokafka import AIOKafkaProducer

from clickpulse.events.schemas import validation_errors
from clickpulse.runtime import WorkerProcess, free_port, read_topic, services
from clickpulse.settings import Settings
from clickpulse.events.control import control_headers
from clickpulse.topics import CONTROL_HEADER, ensure_topics

pytestmark = pytest.mark.integration


#: the namespaces this test session created (their topics are deleted at its end)
CREATED: set[str] = set()


async def _delete_topics_of(base: Settings, namespaces: set[str]) -> int:
    from clickpulse.topics import kafka_admin, namespace_of
    async with kafka_admin(base) as admin:
        names = [t for t in await admin.list_topics() if namespace_of(t) in namespaces]
        for i in range(0, len(names), 100):
            await admin.delete_topics(names[i:i + 100])
    return len(names)


@pytest.fixture(scope="session")
def local_services() -> Iterator[Settings]:
    """Kafka and Redis on loopback (deploy/local/services.sh start is idempotent). At the end
    of the session the topics of every namespace it created are deleted (a shared broker does
    not pile up thousands of test partitions; consumer groups expire with their offsets)."""
    services("start")
    base = Settings.from_env()
    redis.Redis.from_url(base.redis_url).ping()
    yield base
    if CREATED:
        try:
            n = asyncio.run(_delete_topics_of(base, CREATED))
            print(f"\n[integration] deleted the {n} topics of the session's {len(CREATED)} namespaces")
        except Exception as err:  # noqa: BLE001 - a cleanup never fails the run
            print(f"\n[integration] could not delete the session's topics: {err}")


@pytest.fixture
def make_settings(local_services: Settings, tmp_path: Path) -> Callable[..., Settings]:
    def make(**over) -> Settings:
        ns = f"it-{uuid.uuid4().hex[:10]}"
        over.setdefault("kafka_session_timeout_s", 8)  # a SIGKILLed worker's partitions move quickly
        over.setdefault("assume_consent", "marketing")  # the test data sends no consent events
        over.setdefault("control_key", uuid.uuid4().hex)  # signs end_of_input (replay --flush)
        delay = over.pop("cart_abandon_after_s", None)
        if delay is not None:  # the default rules with a shorter cart-abandonment delay
            rules = Path(Settings().rules_file).read_text()
            assert rules.count("within_s: 1800") == 1
            path = tmp_path / f"rules-{ns}.yaml"
            path.write_text(rules.replace("within_s: 1800", f"within_s: {delay}"))
            over["rules_path"] = str(path)
        CREATED.add(ns)
        s = local_services.replace(namespace=ns, web_port=free_port(), data_dir=str(tmp_path / ns), **over)
        asyncio.run(ensure_topics(s))
        return s
    return make


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{settings.namespace}-{len(started)}.log").start()
        started.append(w)
        w.wait_ready()
        return w
    yield start
    for w in started:
        w.stop()


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, list | None]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * 1024 * 1024, acks="all")
    await p.start()
    try:
        for key, value, headers in records:
            await (await p.send(topic, key=key, value=value, headers=headers))
    finally:
        await p.stop()


def produce(settings: Settings, records: list) -> None:
    """Publish ``[(key, value[, headers])]`` (values dict -> JSON) to the raw topic, in order."""
    norm = []
    for r in records:
        key, value = r[0], r[1]
        headers = r[2] if len(r) > 2 else None
        if isinstance(value, dict):
            value = orjson.dumps(value)
        if isinstance(key, str):
            key = key.encode()
        norm.append((key, value, headers))
    asyncio.run(_produce(settings.kafka_bootstrap, settings.topic_raw, norm))


def end_of_input(settings: Settings) -> None:
    """What ``replay --flush`` sends: end_of_input on every raw partition."""
    import time
    run = uuid.uuid4().hex[:8]
    bodies = [orjson.dumps({"schema_version": 1, "control": "end_of_input", "source_partition": p,
                            "source_partitions": settings.partitions, "run_id": run,
                            "namespace": settings.namespace, "issued_at_ms": int(time.time() * 1000)})
              for p in range(settings.partitions)]
    recs = [(None, body, control_headers(settings.control_key, body)) for body in bodies]
    asyncio.run(_produce_partitioned(settings, recs))


async def _produce_partitioned(settings: Settings, recs: list) -> None:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await p.start()
    try:
        for part, (key, value, headers) in enumerate(recs):
            await (await p.send(settings.topic_raw, key=key, value=value, headers=headers, partition=part))
    finally:
        await p.stop()


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.3):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after
    ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def topic_values(settings: Settings, topic: str) -> list[dict]:
    return [orjson.loads(v) for _k, v, _m in asyncio.run(read_topic(settings.kafka_bootstrap, topic))]


def cart_actions(settings: Settings) -> list[dict]:
    """The cart_abandoned actions on the actions topic (model actions filtered out)."""
    return [a for a in topic_values(settings, settings.topic_actions) if a["type"] == "cart_abandoned"]


def assert_topics_match_schemas(settings: Settings) -> dict[str, int]:
    """Every message on the valid, dead-letter, actions, training, models and experiments topics
    validates against schemas/."""
    counts = {}
    for topic, schema in ((settings.topic_valid, None), (settings.topic_dlq, "dlq"), (settings.topic_actions, "action"),
                          (settings.topic_segments, "segment_change"), (settings.topic_training, "example"),
                          (settings.topic_models, "snapshot"), (settings.topic_experiments, "experiment")):
        msgs = asyncio.run(read_topic(settings.kafka_bootstrap, topic))
        for _k, v, meta in msgs:
            obj = orjson.loads(v)
            name = schema or ("control" if any(h[0] == CONTROL_HEADER for h in meta["headers"]) else "event")
            errs = validation_errors(name, obj)
            assert errs == [], f"{topic}@{meta['partition']}:{meta['offset']} violates {name}.v1: {errs}"
        counts[topic] = len(msgs)
    return counts
