"""The Faust app: topics, the state table and the agents that wire the pipeline stages.

Nothing here decides anything: agents call :func:`clickpulse.events.contract.parse` and the
:class:`clickpulse.state.engine.Engine`, and publish what they return.

* ``ingest``   raw -> parse/validate/normalize -> valid (keyed by user) | dead-letter topic
* ``process``  valid -> user state (table ``users``) -> rules -> actions, segment changes;
               fires timers after each event
* timers       live mode: every second, fire timers of idle partitions (watermark follows wall
               clock); every ``redis_flush_interval_s``: flush profiles to Redis; every
               ``rules_poll_s``: reload the rules file when it changed
* web          ``/metrics`` (Prometheus text format), ``/progress`` (last processed offsets),
               ``/segments`` (segment sizes and smoothed conversion rates), ``/rules`` (active
               rules version, last reload error)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import InvalidEvent
from .events.contract import parse
from .events.dlq import dlq_record
from .observability.metrics import Metrics, type_label
from .serving.redis_sink import ProfileWriter
from .settings import Settings
from .models.labels import ModelConfig
from .models.registry import ModelRegistry
from .models.trainer import metric_samples
from .rules.bots import BotConfig
from .rules.ruleset import RulesFile
from .state.engine import Engine
from .state.user import StateConfig, UserState
from .topics import CONTROL_HEADER

log = logging.getLogger(__name__)


def header(headers: Any, name: str) -> bytes | None:
    """A Kafka header's value from Faust's list-of-pairs or mapping form."""
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if k == name:
            return v if isinstance(v, bytes) else str(v).encode()
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


class ProfileSink:
    """Adapter: engine state changes -> Redis write-behind (profile built at flush time)."""

    def __init__(self, writer: ProfileWriter) -> None:
        self.writer = writer

    def __call__(self, st: UserState) -> None:
        self.writer.mark(st.key, st)


def create_app(settings: Settings, metrics: Metrics | None = None) -> faust.App:
    """Build the Faust app for ``settings`` (one app per namespace = consumer group)."""
    metrics = metrics or Metrics()
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        datadir=str(data_dir),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        table_standby_replicas=0,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 3),
        logging_config=None,
    )
    raw_topic = app.topic(settings.topic_raw, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=settings.partitions)
    valid_topic = app.topic(settings.topic_valid, key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw", partitions=settings.partitions)
    dlq_topic = app.topic(settings.topic_dlq, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=1)
    actions_topic = app.topic(settings.topic_actions, key_type=bytes, value_type=bytes, key_serializer="raw",
                              value_serializer="raw", partitions=settings.partitions)
    # use_partitioner: the changelog partition comes from the key (same murmur2 partitioner as
    # the valid topic, so the table stays co-partitioned) and the table can be written from the
    # timer task, outside stream iteration.
    # key_type/value_type bytes -> Faust uses the "raw" codec for the changelog (no JSON wrapping)
    users = app.Table(settings.state_table, default=None, key_type=bytes, value_type=bytes,
                      partitions=settings.partitions, use_partitioner=True)

    training_topic = app.topic(settings.topic_training, key_type=bytes, value_type=bytes, key_serializer="raw",
                               value_serializer="raw", partitions=1)
    writer = ProfileWriter(None, settings.namespace, int(settings.user_retention_s),
                           settings.redis_max_pending, metrics)
    registry = ModelRegistry({"intent": settings.intent_pipeline, "churn": settings.churn_pipeline},
                             settings.model_seed) if settings.models_enabled else None
    segments_topic = app.topic(settings.topic_segments, key_type=bytes, value_type=bytes, key_serializer="raw",
                               value_serializer="raw", partitions=settings.partitions)
    # an invalid rules file at start is a RulesError (nothing to fall back on); later reloads
    # that fail keep the previous rules
    rules = RulesFile(settings.rules_file) if settings.rules_file else None
    if rules is not None:
        metrics.rules_info.labels(rules.current().version).set(1)
        log.info("rules %s: version %s (%d segments, %d triggers)", rules.path, rules.current().version,
                 len(rules.current().segments), len(rules.current().triggers))
    engine = Engine(users, StateConfig.from_settings(settings), allowed_lateness_ms=settings.allowed_lateness_ms,
                    idle_timeout_ms=settings.idle_timeout_ms, live=settings.time_mode == "live",
                    metrics=metrics, on_state=ProfileSink(writer), models=registry,
                    model_cfg=ModelConfig.from_settings(settings), pending_total_cap=settings.pending_total,
                    rules=rules, assumed_consent=settings.assumed_consent, bots=BotConfig.from_settings(settings),
                    model_min_class_examples=settings.model_min_class_examples)
    progress: dict[str, dict[int, int]] = {settings.topic_raw: {}, settings.topic_valid: {}}
    app.clickpulse = {"engine": engine, "metrics": metrics, "writer": writer, "settings": settings,  # type: ignore[attr-defined]
                      "progress": progress}

    async def publish(actions: list[dict[str, Any]]) -> None:
        for a in actions:
            await actions_topic.send(key=a["user_key"].encode(), value=orjson.dumps(a))
        for ex in engine.drain_examples():
            await training_topic.send(key=ex["user_key"].encode(), value=orjson.dumps(ex))
        for ch in engine.drain_segment_changes():
            await segments_topic.send(key=ch["user_key"].encode(), value=orjson.dumps(ch))

    @app.agent(raw_topic, name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            metrics.raw_in.inc()
            try:
                control = header(msg.headers, CONTROL_HEADER)
                if control is not None:
                    await _forward_control(msg, control)
                    continue
                ts_ms = int(msg.timestamp * 1000) if msg.timestamp else None
                now = _now_ms()
                received = now if ts_ms is None else min(ts_ms, now)
                try:
                    ev = parse(msg.value, msg.key, max_bytes=settings.max_event_bytes, received_ms=received,
                               max_future_skew_ms=settings.max_future_skew_ms)
                except InvalidEvent as err:
                    await _dead_letter(err, msg)
                    continue
                if ev.get("context", {}).get("clock_corrected"):
                    metrics.clock_corrected.inc()
                metrics.events_valid.labels(type_label(ev["type"])).inc()
                await valid_topic.send(key=ev["user_key"].encode(), value=orjson.dumps(ev))
            except Exception as err:  # noqa: BLE001 - one bad message never stops the stream
                log.exception("ingest failed at %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                await _dead_letter(InvalidEvent("internal", f"{type(err).__name__}: {err}"), msg)
            finally:
                progress[settings.topic_raw][msg.partition] = msg.offset

    async def _dead_letter(err: InvalidEvent, msg: Any) -> None:
        metrics.events_invalid.labels(err.reason).inc()
        rec = dlq_record(err, key=msg.key, value=msg.value, topic=msg.topic, partition=msg.partition,
                         offset=msg.offset, timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                         max_payload_bytes=settings.dlq_max_payload_bytes)
        log.info("dead-letter %s at %s[%d]@%d: %s", err.reason, msg.topic, msg.partition, msg.offset, err.detail)
        try:
            await dlq_topic.send(key=msg.key, value=orjson.dumps(rec))
        except Exception:  # noqa: BLE001
            metrics.dlq_publish_errors.inc()
            log.exception("could not publish dead-letter record for %s[%d]@%d", msg.topic, msg.partition, msg.offset)

    async def _forward_control(msg: Any, control: bytes) -> None:
        try:
            body = orjson.loads(msg.value)
        except orjson.JSONDecodeError:
            await _dead_letter(InvalidEvent("not_json", "control message value is not JSON"), msg)
            return
        if control != b"end_of_input" or not isinstance(body, dict) or body.get("control") != "end_of_input":
            await _dead_letter(InvalidEvent("schema", f"unknown control message {control[:64]!r}"), msg)
            return
        n_src = body.get("source_partitions")
        if not isinstance(n_src, int) or n_src < 1:
            n_src = settings.partitions  # the raw topic is created with this many partitions
        fwd = {"schema_version": 1, "control": "end_of_input", "source_partition": msg.partition,
               "source_partitions": n_src}
        if body.get("run_id"):
            fwd["run_id"] = str(body["run_id"])
        for p in range(settings.partitions):
            await valid_topic.send(value=orjson.dumps(fwd), partition=p, headers={CONTROL_HEADER: b"end_of_input"})

    @app.agent(valid_topic, name="process")
    async def process(stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            started = time.perf_counter()
            try:
                if header(msg.headers, CONTROL_HEADER) is not None:
                    body = orjson.loads(msg.value)
                    actions = engine.end_of_input(msg.partition, int(body["source_partition"]),
                                                  int(body["source_partitions"]), _now_ms())
                else:
                    ev = orjson.loads(msg.value)
                    _, actions = engine.process(msg.partition, ev, _now_ms())
                await publish(actions)
            except Exception as err:  # noqa: BLE001 - one message never stops the stream
                log.exception("processing failed at %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                await _dead_letter(InvalidEvent("internal", f"{type(err).__name__}: {err}"), msg)
            finally:
                metrics.process_latency.observe(time.perf_counter() - started)
                progress[settings.topic_valid][msg.partition] = msg.offset

    @app.timer(interval=1.0)
    async def fire_idle_timers() -> None:
        now = _now_ms()
        for tp in app.assignor.assigned_actives():
            if tp.topic == settings.topic_valid:
                await publish(engine.tick(tp.partition, now))
        metrics.timers_pending.set(engine.pending_timers())
        wm = engine.min_watermark(now)
        if wm is not None:
            metrics.watermark.set(wm / 1000)

    @app.timer(interval=300.0)
    async def expire_idle_users() -> None:
        now = _now_ms()
        for tp in app.assignor.assigned_actives():
            if tp.topic == settings.topic_valid:
                n = engine.expire_users(tp.partition, settings.user_retention_ms, now)
                if n:
                    log.info("partition %d: expired %d idle users", tp.partition, n)

    @app.timer(interval=settings.redis_flush_interval_s)
    async def flush_profiles() -> None:
        if writer.client is None and settings.redis_url:
            import redis.asyncio as aioredis
            writer.client = aioredis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        # build profiles lazily, once per user per flush (coalescing)
        ecfg = engine.cfg.engagement
        writer.pending = {k: (v.profile(engagement=ecfg, extra=engine.profile_extra(v)) if isinstance(v, UserState)
                              else v)
                          for k, v in writer.pending.items()}
        await writer.flush()

    if rules is not None:
        @app.timer(interval=settings.rules_poll_s)
        async def reload_rules() -> None:
            old = rules.current().version
            failures = rules.failures
            try:
                changed = await app.loop.run_in_executor(None, rules.poll)  # compiling can take a while
            except Exception:  # noqa: BLE001 - a reload problem never stops the worker
                log.exception("rules reload failed; keeping version %s", old)
                return
            if changed:  # RulesFile logged it (INFO); a rejection was logged once (WARNING)
                metrics.rules_reloads.labels("ok").inc()
                metrics.rules_info.labels(old).set(0)
                metrics.rules_info.labels(rules.current().version).set(1)
            elif rules.failures != failures:
                metrics.rules_reloads.labels("rejected").inc()

    @app.timer(interval=10.0)
    async def segment_gauges() -> None:
        for name, row in engine.segment_conversion().items():
            metrics.segment_conversion.labels(name, "raw").set(row["rate"])
            metrics.segment_conversion.labels(name, "smoothed").set(row["rate_smoothed"])
        rs = engine.ruleset()
        for seg in (rs.segments if rs is not None else ()):
            metrics.segment_members.labels(seg.name).set(engine.segment_size(seg.name))

    if registry is not None:
        @app.task
        async def follow_models() -> None:
            """Load every new model snapshot from the compacted models topic (hot swap)."""
            from aiokafka import AIOKafkaConsumer, TopicPartition
            consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                        auto_offset_reset="earliest", max_partition_fetch_bytes=32 * 1024 * 1024,
                                        fetch_max_bytes=64 * 1024 * 1024)
            await consumer.start()
            try:
                tp = TopicPartition(settings.topic_models, 0)
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                while True:
                    for _tp, msgs in (await consumer.getmany(timeout_ms=1000)).items():
                        for m in msgs:
                            try:
                                env = orjson.loads(m.value)
                                if registry.install(env):
                                    for task, name, scope, v in metric_samples(env):
                                        metrics.model_metric.labels(task, name, scope).set(v)
                                    metrics.model_examples.labels(env["task"]).set(env["examples"])
                            except Exception:  # noqa: BLE001 - a bad snapshot keeps the current model
                                log.exception("could not install model snapshot at offset %d", m.offset)
            finally:
                try:
                    await consumer.stop()
                except BaseException:  # noqa: BLE001 - shutting down
                    pass

    @app.on_rebalance_complete.connect
    async def on_rebalance_complete(sender: Any = None, **kwargs: Any) -> None:
        parts = [tp.partition for tp in app.assignor.assigned_actives() if tp.topic == settings.topic_valid]
        n = engine.restore(parts, list(users.items()), _now_ms())
        log.info("clickpulse ready: partitions %s of %s recovered, %d pending timers",
                 sorted(parts), settings.topic_valid, n)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/segments")
    async def segments_page(web: Any, request: Any) -> Any:
        rs = engine.ruleset()
        conv = engine.segment_conversion()
        a, b = engine.user_prior()
        return web.json({"rules_version": None if rs is None else rs.version,
                         "user_conversion_prior": {"alpha": a, "beta": b, "mean": a / (a + b)},
                         "segments": {s.name: {"min_size": s.min_size, "members": engine.segment_size(s.name),
                                               "active": engine.segment_active(s.name),
                                               **{k: v for k, v in conv.get(s.name, {}).items() if k != "members"}}
                                      for s in (rs.segments if rs is not None else ())}})

    @app.page("/rules")
    async def rules_page(web: Any, request: Any) -> Any:
        if rules is None:
            return web.json({"path": None, "version": None})
        rs = rules.current()
        return web.json({"path": str(rules.path), "version": rs.version, "reloads": rules.reloads,
                         "rejected": rules.failures, "error": None if rules.error is None else str(rules.error),
                         "warnings": list(rs.warnings), "evaluation_errors": engine.rule_errors,
                         "segments": [{"name": g.name, "when": g.when.source, "min_size": g.min_size}
                                      for g in rs.segments],
                         "triggers": [{"name": t.name, "on": t.on.kind if t.on.kind != "event" else t.on.event_type,
                                       "segment": t.on.segment,
                                       "timeout": None if t.on.timeout is None else
                                       {"after": t.on.timeout.after, "no": list(t.on.timeout.no),
                                        "within_s": t.on.timeout.within_s},
                                       "when": t.when.source, "action": t.action.type, "cooldown_s": t.cooldown_s,
                                       "once_per": t.once_per, "requires_consent": t.requires_consent}
                                      for t in rs.triggers]})

    @app.page("/progress")
    async def progress_page(web: Any, request: Any) -> Any:
        return web.json({"topics": {t: {str(p): o for p, o in parts.items()} for t, parts in progress.items()},
                         "models": registry.snapshot_versions if registry is not None else {},
                         "pending_timers": engine.pending_timers(),
                         "redis_pending": len(writer.pending)})

    return app
