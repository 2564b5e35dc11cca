"""The single trainer: labeled examples in, versioned model snapshots out.

Workers publish examples to ``<ns>.training`` (one partition, so one consumer of the group
``<ns>-trainer`` owns it: a single trainer, and a second one waits as a hot standby). For each
example the trainer first scores it with its current model (progressive validation: predict,
then learn), updates the metrics, then learns. Every ``snapshot_every`` examples or
``snapshot_interval_s`` seconds it publishes, per task, a snapshot (model pickle + metrics +
example count + the training offset it covers) to the compacted ``<ns>.models`` topic.

Every snapshot is signed (HMAC-SHA256 under ``CLICKPULSE_SNAPSHOT_KEY``, see
:mod:`clickpulse.models.registry`); the trainer verifies its own snapshots as the workers do
before resuming from them, so a forged snapshot on the topic can neither run code here nor reset
the trainer's offsets.

Restart without loss or double learning: at start the trainer reads the newest validly signed
snapshot per task and resumes each model from it; on partition assignment it seeks to the smallest
``training_offset + 1`` of those snapshots and skips, per task, any example at or below that
task's own snapshot offset. Group offsets are not used for this (they could be ahead of the
last snapshot after a crash).

Besides the labeled ``intent``/``churn`` examples, the topic carries one example per ended session
for each auxiliary task (:data:`clickpulse.models.registry.AUX_TASKS`, ``schemas/example.v1.json``):

* ``{"task": "tiers", "x": <session_features dict>, ...}``: learned by
  :class:`~clickpulse.models.tiers.EngagementTiers` (online k-means);
* ``{"task": "markov", "path": [<event types, event-time order>], "converted": <bool, optional>, ...}``:
  learned by :class:`~clickpulse.models.markov.MarkovChain` (see :func:`markov_states`).

They are learned without progressive validation; their snapshots carry model statistics as
``metrics`` (:meth:`Trainer.aux_metrics`). Offsets, resume and skipping work per task exactly as
for ``intent``/``churn``, with one difference: an auxiliary task appears in
:attr:`Trainer.offsets`/:attr:`Trainer.versions` (and gets snapshots) only once it has learned an
example or resumed from a snapshot, so a task that never had an example does not hold the start
offset back at 0. Its snapshots are published before the ``intent``/``churn`` ones, so after a
crash mid-publish a missing auxiliary snapshot still means no auxiliary example below the other
tasks' offsets.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import pickle
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ..runtime import stop_on_signals
from ..settings import Settings
from .markov import END, PURCHASE, START, MarkovChain
from .online import OnlineModel, safe_loads
from .registry import (AUX_TASKS, TASKS, Rejections, SnapshotRejected, aux_envelope, aux_from_bytes, b64_field,
                       envelope, sign_snapshot, snapshot_key, verify_snapshot)
from .tiers import TIERS, EngagementTiers
from .validation import ProgressiveValidation

log = logging.getLogger(__name__)


def markov_states(ex: dict[str, Any]) -> list[str]:
    """The states a ``markov`` example teaches
    :meth:`MarkovChain.learn_session <clickpulse.models.markov.MarkovChain.learn_session>`.

    ``ex["path"]`` is the session's event types in event-time order, collapsed or not (not
    collapsing is preferred: self-transitions are part of the chain, as when it learns one event at
    a time). A purchase is an absorbing *state* of the chain, so it belongs in the path where it
    happened; what follows the first one is dropped. ``ex["converted"]`` (optional) is True for a
    session that purchased: when the path has no ``"purchase"`` (e.g. it was cut before it),
    ``"purchase"`` is appended. A path holding a ``"purchase"`` converted whatever ``converted`` says.

    Raises
    ------
    ValueError
        ``path`` is not a list of strings, or holds ``<start>``/``<end>`` (checked before anything is
        learned, so a bad example never leaves a half-learned session).
    """
    path = ex["path"]
    if not isinstance(path, list | tuple) or not all(isinstance(s, str) for s in path):
        raise ValueError("markov example: path must be a list of event-type strings")
    if START in path or END in path:
        raise ValueError(f"markov example: {START!r} and {END!r} are reserved states")
    states = list(path)
    if PURCHASE in states:
        return states[: states.index(PURCHASE) + 1]
    if ex.get("converted") is True:
        states.append(PURCHASE)
    return states


class Trainer:
    """Broker-free trainer state: models, validation, snapshot bookkeeping.

    Parameters
    ----------
    pipelines
        Task -> pipeline name.
    thresholds
        Task -> action threshold (for F1/precision/recall).
    seed, window
        Model seed (also the tiers' k-means seed); rolling validation window (examples).
    tiers_warmup, tiers_halflife
        :class:`~clickpulse.models.tiers.EngagementTiers` ``warmup`` and ``halflife``.
    markov_alpha, markov_max_states
        :class:`~clickpulse.models.markov.MarkovChain` ``alpha`` and ``max_states``.
    key
        The snapshot signing key (:func:`clickpulse.models.registry.snapshot_key`): snapshots are
        signed with it, and only snapshots it verifies are resumed from.
    on_reject
        Called with the reason of each rejected snapshot (a Prometheus counter).

    A model resumed from a snapshot keeps the parameters it was created with.
    """

    def __init__(self, pipelines: dict[str, str], thresholds: dict[str, float], seed: int = 42,
                 window: int = 1000, *, key: bytes, tiers_warmup: int = 30, tiers_halflife: float = 0.05,
                 markov_alpha: float = 1.0, markov_max_states: int = 64,
                 on_reject: Callable[[str], None] | None = None) -> None:
        if not isinstance(key, bytes) or not key:
            raise TypeError("Trainer needs the snapshot signing key (bytes)")
        self.key = key
        self.rejections = Rejections("trainer", on_reject)
        self.pipelines = dict(pipelines)
        self.models = {t: OnlineModel(t, pipelines.get(t, "logreg"), seed) for t in TASKS}
        self.validation = {t: ProgressiveValidation(thresholds.get(t, 0.5), window) for t in TASKS}
        # last training offset learned and last snapshot version, per task; an auxiliary task
        # has an entry once it has learned an example or resumed from a snapshot
        self.offsets: dict[str, int] = {t: -1 for t in TASKS}
        self.versions: dict[str, int] = {t: 0 for t in TASKS}
        self.aux: dict[str, Any] = {
            "tiers": EngagementTiers(seed=seed, halflife=tiers_halflife, warmup=tiers_warmup),
            "markov": MarkovChain(alpha=markov_alpha, max_states=markov_max_states)}
        self.aux_examples = {t: 0 for t in AUX_TASKS}   # sessions learned, per auxiliary task
        self.tier_sessions = {t: 0 for t in TIERS}     # sessions by the tier they got when learned
        self.converted = 0                             # markov sessions that reached a purchase
        self.since_snapshot = 0
        self.skipped = 0

    def resume(self, env: Any) -> bool:
        """Continue from a snapshot envelope (model, metrics object, offsets, version) when it is
        validly signed under :attr:`key`, of a known task and newer than what this trainer has.
        True when resumed; a rejected snapshot is counted and logged (:attr:`rejections`), one not
        newer is skipped silently, and nothing changes in either case."""
        try:
            verify_snapshot(env, self.key)
            task = env["task"]
            if task not in AUX_TASKS and task not in self.models:
                raise SnapshotRejected("unknown_task", f"task {task!r} is not trained here")
            if env["version"] <= self.versions.get(task, 0):
                return False
            try:
                if task in AUX_TASKS:
                    self._resume_aux(env)
                else:
                    self._resume_model(env)
            except SnapshotRejected:
                raise
            except Exception as err:  # noqa: BLE001 - a snapshot that cannot be loaded is not resumed
                raise SnapshotRejected("invalid_model", f"{type(err).__name__}: {err}") from None
        except SnapshotRejected as err:
            self.rejections(err, env)
            return False
        return True

    def _resume_model(self, env: dict[str, Any]) -> None:
        task = env["task"]
        state = OnlineModel.from_bytes(b64_field(env, "model_b64"))
        val = env.get("validation_b64")
        validation = safe_loads(zlib.decompress(b64_field(env, "validation_b64")), ProgressiveValidation) \
            if val else None
        self.models[task] = state
        if state.pipeline_name != self.pipelines.get(task, state.pipeline_name):
            log.warning("%s: configured pipeline %r differs from the snapshot's %r; continuing with the "
                        "snapshot's (use a new CLICKPULSE_NAMESPACE to start a different pipeline from scratch)",
                        task, self.pipelines.get(task), state.pipeline_name)
        if validation is not None:
            self.validation[task] = validation
        self.offsets[task] = env["training_offset"]
        self.versions[task] = env["version"]

    def _resume_aux(self, env: dict[str, Any]) -> None:
        task = env["task"]
        model = aux_from_bytes(task, b64_field(env, "model_b64"))
        if task == "tiers":       # everything is read before anything changes
            sessions = env.get("metrics", {}).get("sessions", {})
            self.tier_sessions = {t: int(sessions.get(t, 0)) for t in TIERS}
        else:
            self.converted = int(env.get("positives", 0))
        self.aux[task] = model
        self.aux_examples[task] = int(env["examples"])
        self.offsets[task] = env["training_offset"]
        self.versions[task] = env["version"]

    def start_offset(self) -> int:
        """The training-topic offset to read from."""
        return min(self.offsets.values()) + 1

    def learn(self, ex: dict[str, Any], offset: int) -> bool:
        """Predict, score, learn one example; False when skipped (already learned or unknown task).

        Auxiliary examples (``tiers``, ``markov``) are learned without scoring.

        Raises
        ------
        KeyError, ValueError
            A malformed example (nothing is learned and the task's offset does not move).
        """
        task = ex.get("task")
        if task in AUX_TASKS:
            if offset <= self.offsets.get(task, -1):
                self.skipped += 1
                return False
            self._learn_aux(task, ex)
            self.offsets[task] = offset
            self.versions.setdefault(task, 0)
            self.since_snapshot += 1
            return True
        if task not in self.models or offset <= self.offsets[task]:
            self.skipped += 1
            return False
        model = self.models[task]
        p = model.score(ex["x"])
        self.validation[task].update(bool(ex["y"]), p)
        model.learn(ex["x"], bool(ex["y"]))
        self.offsets[task] = offset
        self.since_snapshot += 1
        return True

    def _learn_aux(self, task: str, ex: dict[str, Any]) -> None:
        if task == "tiers":
            x = ex["x"]
            if not isinstance(x, dict):
                raise ValueError("tiers example: x must be an object of session features")
            model = self.aux["tiers"]
            self.tier_sessions[model.tier(x)] += 1      # the tier the session got before learning it
            model.learn(x)
            self.aux_examples[task] += 1
            return
        states = markov_states(ex)
        if not states:                                  # an empty session teaches nothing
            return
        self.aux["markov"].learn_session(states)
        self.aux_examples[task] += 1
        self.converted += states[-1] == PURCHASE

    def aux_metrics(self, task: str) -> dict[str, Any]:
        """The ``metrics`` of an auxiliary task's snapshot.

        ``tiers``: ``n`` (sessions learned), ``initialised`` (warm start done), ``sessions`` (tier
        name -> sessions that got that tier when learned; the names follow the current centres, so
        this is a history, not the present cluster sizes), ``centers`` (tier name -> centre
        coordinates, ``{}`` before the warm start).

        ``markov``: ``n`` (sessions learned), ``positives`` (of which reached a purchase),
        ``conversion`` (``positives / n``, 0 when ``n`` is 0), ``transitions`` (total learned),
        ``states`` (known non-absorbing states), ``p_purchase`` (state -> P(purchase before the end),
        ``"<start>"`` for a session about to start).
        """
        if task == "tiers":
            m = self.aux["tiers"]
            return {"n": self.aux_examples[task], "initialised": m.initialised, "sessions": dict(self.tier_sessions),
                    "centers": m.centers()}
        chain = self.aux["markov"]
        n = self.aux_examples[task]
        return {"n": n, "positives": self.converted, "conversion": self.converted / n if n else 0.0,
                "transitions": chain.transitions, "states": len(chain.states),
                "p_purchase": {START: chain.p_purchase([]), **{s: chain.p_purchase([s]) for s in chain.states}}}

    def snapshots(self) -> list[dict[str, Any]]:
        """One new snapshot envelope per task (bumps versions, resets the counter): first the
        auxiliary tasks that have learned an example or resumed from a snapshot, then every
        supervised task. Every envelope is signed (:func:`~clickpulse.models.registry.sign_snapshot`)."""
        out = []
        for task in AUX_TASKS:
            if task not in self.offsets:
                continue
            self.versions[task] += 1
            out.append(aux_envelope(task, self.versions[task], self.aux[task], self.aux_metrics(task),
                                    self.offsets[task], self.aux_examples[task],
                                    positives=self.converted if task == "markov" else None))
        for task in TASKS:
            self.versions[task] += 1
            env = envelope(task, self.versions[task], self.models[task], self.validation[task].report(),
                           self.offsets[task])
            env["validation_b64"] = base64.b64encode(zlib.compress(pickle.dumps(self.validation[task]))).decode()
            out.append(env)
        for env in out:
            sign_snapshot(env, self.key)
        self.since_snapshot = 0
        return out


async def latest_snapshots(bootstrap: str, topic: str, timeout_s: float = 10.0,
                           key: bytes | None = None) -> dict[str, dict[str, Any]]:
    """The newest snapshot envelope per task on the (compacted) models topic.

    With ``key``, only snapshots whose signature it verifies count (a forged snapshot with a huge
    version cannot hide the real newest one); without, messages that are not snapshot-shaped are
    skipped (for display only: never unpickle what this returns without verifying it)."""
    from ..runtime import end_offsets
    ends = await end_offsets(bootstrap, topic)
    out: dict[str, dict[str, Any]] = {}
    if not ends or all(e == 0 for e in ends.values()):
        return out
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=32 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        done = {tp for tp in tps if ends[tp.partition] == 0}
        while len(done) < len(tps) and time.monotonic() < deadline:
            for tp, msgs in (await c.getmany(timeout_ms=500)).items():
                for m in msgs:
                    if _newer_snapshot(m.value, out, key) is None:
                        log.debug("skipped a model snapshot at offset %d that is not newer or not valid", m.offset)
                    if m.offset >= ends[tp.partition] - 1:
                        done.add(tp)
    finally:
        try:
            await c.stop()
        except asyncio.CancelledError:
            pass
    return out


def _newer_snapshot(value: bytes | None, out: dict[str, dict[str, Any]], key: bytes | None) -> dict[str, Any] | None:
    """Put the snapshot in ``value`` into ``out`` when it is newer than ``out``'s for its task (and
    verified under ``key``, when given); returns it, or None when it was skipped."""
    try:
        env = orjson.loads(value or b"")
        task, version = env["task"], env["version"]
        if not isinstance(task, str) or not isinstance(version, int) or version <= out.get(task, {}).get("version", 0):
            return None
        if key is not None:
            verify_snapshot(env, key)
    except (orjson.JSONDecodeError, KeyError, TypeError, SnapshotRejected):
        return None
    out[task] = env
    return env


class _Seek(ConsumerRebalanceListener):
    """On assignment: reload the newest snapshots (a standby trainer taking over resumes from what
    the previous owner published, not from what it read at start), then seek past them."""

    def __init__(self, consumer: Any, trainer: Trainer, topic: str,
                 reload: Callable[[], Awaitable[dict[str, dict[str, Any]]]]) -> None:
        self.consumer, self.trainer, self.topic, self.reload = consumer, trainer, topic, reload

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if not any(tp.topic == self.topic for tp in assigned):
            return
        for env in (await self.reload()).values():
            self.trainer.resume(env)
        for tp in assigned:
            if tp.topic == self.topic:
                self.consumer.seek(tp, self.trainer.start_offset())
                log.info("trainer owns %s; resuming at offset %d", tp, self.trainer.start_offset())


def metric_samples(env: dict[str, Any]) -> Iterator[tuple[str, str, str, float]]:
    """``(task, metric, scope, value)`` of a snapshot's metrics for Prometheus; ranking metrics
    (ROC AUC, PR AUC) only once both classes have been seen, NaNs never.

    Auxiliary tasks (``tiers``, ``markov``) yield their model statistics with scope ``"model"``:
    the numeric top-level metrics, ``sessions_<tier>`` and ``center_<feature>_<tier>`` for tiers."""
    report = env["metrics"]
    if env["task"] in AUX_TASKS:
        yield from _aux_samples(env["task"], report)
        return
    both = 0 < report.get("positives", 0) < report.get("n", 0)
    for scope in ("all", "window"):
        for name, v in report[scope].items():
            if name == "size" or v != v or (name in ("roc_auc", "pr_auc") and not both):
                continue
            yield env["task"], name, scope, float(v)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


def _aux_samples(task: str, report: dict[str, Any]) -> Iterator[tuple[str, str, str, float]]:
    for name, v in report.items():
        if _number(v):
            yield task, name, "model", float(v)
    for tier, n in report.get("sessions", {}).items():
        if _number(n):
            yield task, f"sessions_{tier}", "model", float(n)
    for tier, center in report.get("centers", {}).items():
        for feature, v in center.items():
            if _number(v):
                yield task, f"center_{feature}_{tier}", "model", float(v)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.learned = Counter("clickpulse_trainer_examples_total", "Examples learned, by task", ["task"],
                               registry=registry)
        self.skipped = Counter("clickpulse_trainer_examples_skipped_total",
                               "Examples skipped as already learned (replayed after a restart)", registry=registry)
        self.snapshots = Counter("clickpulse_trainer_snapshots_total", "Snapshots published", registry=registry)
        self.rejected = Counter("clickpulse_model_snapshots_rejected_total",
                                "Snapshots not resumed from, by reason (see clickpulse.models.registry.REJECT_REASONS)",
                                ["reason"], registry=registry)
        self.metric = Gauge("clickpulse_model_metric", "Progressive-validation metric (intent, churn; scope "
                            "all/window) or model statistic (tiers, markov; scope model)",
                            ["task", "metric", "scope"], registry=registry)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the trainer until ``stop`` is set (or SIGTERM/SIGINT)."""
    stop = stop_on_signals(stop)
    key = snapshot_key(settings)   # before anything starts: a bad key configuration stops here
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    start_http_server(settings.trainer_web_port, addr=settings.web_host, registry=registry)
    trainer = Trainer({"intent": settings.intent_pipeline, "churn": settings.churn_pipeline},
                      {"intent": settings.intent_threshold, "churn": settings.churn_threshold},
                      settings.model_seed, settings.validation_window, key=key,
                      on_reject=lambda reason: metrics.rejected.labels(reason).inc())
    for env in (await latest_snapshots(settings.kafka_bootstrap, settings.topic_models, key=key)).values():
        trainer.resume(env)
    log.info("trainer starting: versions %s, offsets %s", trainer.versions, trainer.offsets)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                max_request_size=16 * 1024 * 1024, enable_idempotence=True)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=f"{settings.namespace}-trainer",
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                # a just-created training topic can have no partition metadata at the
                                # first join (empty assignment); refresh metadata every 2 s so the
                                # group rebalances onto it quickly instead of after the 5 min default
                                metadata_max_age_ms=2000,
                                session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
                                heartbeat_interval_ms=int(min(3.0, settings.kafka_session_timeout_s / 3) * 1000))
    await producer.start()
    await consumer.start()
    consumer.subscribe([settings.topic_training], listener=_Seek(
        consumer, trainer, settings.topic_training,
        lambda: latest_snapshots(settings.kafka_bootstrap, settings.topic_models, key=key)))
    last_snapshot = time.monotonic()

    async def publish() -> None:
        nonlocal last_snapshot
        for env in trainer.snapshots():
            await producer.send_and_wait(settings.topic_models, key=env["task"].encode(), value=orjson.dumps(env))
            metrics.snapshots.inc()
            for task, name, scope, v in metric_samples(env):
                metrics.metric.labels(task, name, scope).set(v)
        last_snapshot = time.monotonic()
        log.info("published snapshots %s", trainer.versions)
        print(f"clickpulse trainer snapshot {trainer.versions}", flush=True)

    try:
        print("clickpulse trainer ready", flush=True)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            for _tp, msgs in batch.items():
                for m in msgs:
                    try:
                        ex = orjson.loads(m.value)
                        if trainer.learn(ex, m.offset):
                            metrics.learned.labels(ex["task"]).inc()
                        else:
                            metrics.skipped.inc()
                    except Exception:  # noqa: BLE001 - one bad example never stops learning
                        log.exception("bad training example at offset %d", m.offset)
            due = time.monotonic() - last_snapshot >= settings.snapshot_interval_s
            if trainer.since_snapshot and (trainer.since_snapshot >= settings.snapshot_every or due):
                await publish()
        if trainer.since_snapshot:
            await publish()
    finally:
        try:
            await consumer.stop()
        except asyncio.CancelledError:
            pass
        await producer.stop()
