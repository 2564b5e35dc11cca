"""The models a worker scores with, hot-swapped when the trainer publishes a newer snapshot.

Two kinds of task share the snapshot topic (``schemas/snapshot.v1.json``), keyed by task:

* :data:`TASKS` (``intent``, ``churn``): supervised :class:`~clickpulse.models.online.OnlineModel`
  classifiers, learned from labeled examples and scored by the engine (:meth:`ModelRegistry.score`);
* :data:`AUX_TASKS` (``tiers``, ``markov``): models learned from one example per ended session,
  :class:`~clickpulse.models.tiers.EngagementTiers` (:meth:`ModelRegistry.tier`) and
  :class:`~clickpulse.models.markov.MarkovChain` (:meth:`ModelRegistry.p_purchase`).

Signed snapshots
----------------
A snapshot carries pickles, and unpickling runs code, so anyone able to write the models topic
could run code on every worker. The trainer therefore signs each snapshot
(:func:`sign_snapshot`): ``signature`` is the hex HMAC-SHA256, under the key of
:func:`snapshot_key` (``CLICKPULSE_SNAPSHOT_KEY`` or ``<data_dir>/snapshot.key``), of
:data:`MAC_DOMAIN` followed by the canonical JSON (sorted keys, compact) of every other field of
the envelope, ``model_b64`` and ``validation_b64`` included: the exact bytes that will be
unpickled, the task, version, pipeline, counts, offsets, metrics, ``key_id`` and
``signature_alg``. Nothing can be changed, added or removed without invalidating it.
:func:`verify_snapshot` recomputes it and compares in constant time before anything is decoded.

:meth:`ModelRegistry.install` (workers) and :meth:`clickpulse.models.trainer.Trainer.resume`
(the trainer's own restart) verify first, then check the task and that the version is newer,
and only then unpickle (with :func:`clickpulse.models.online.safe_loads`). A rejected snapshot
is counted by reason (:data:`REJECT_REASONS`, ``clickpulse_model_snapshots_rejected_total``),
logged at WARNING the first time per reason, and the current model keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import ConfigError
from ..keys import secret_bytes
from .markov import MarkovChain
from .online import OnlineModel, safe_loads
from .tiers import EngagementTiers

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)
TASKS = ("intent", "churn")
"""The supervised tasks (labeled examples ``{"x", "y"}``, scored by the engine)."""
AUX_TASKS = ("tiers", "markov")
"""The session models: ``tiers`` (online k-means engagement tiers) and ``markov`` (next-action chain)."""
AUX_PIPELINES = {"tiers": "kmeans", "markov": "markov"}
"""The ``pipeline`` field of an auxiliary task's snapshot."""


SIGNATURE_ALG = "hmac-sha256"
"""The ``signature_alg`` of a snapshot (the only one)."""
MAC_DOMAIN = b"clickpulse.snapshot.v1\n"
"""Prefix of the signed bytes, so a snapshot MAC can never be a valid MAC of anything else."""
KEY_FILE = "snapshot.key"
"""The key file in ``data_dir`` used when ``CLICKPULSE_SNAPSHOT_KEY`` is empty."""
from ..keys import MIN_KEY_BYTES  # noqa: E402 - one minimum for every secret
REJECT_REASONS = ("malformed", "unsigned", "key_mismatch", "bad_signature", "unknown_task", "stale",
                  "invalid_model", "no_key")
"""Why a snapshot was not installed: not a well-formed envelope; no signature; signed under another
key (``key_id`` differs: the trainer and this process do not share ``CLICKPULSE_SNAPSHOT_KEY``);
signature does not match (tampered or forged); a task this process does not serve; a version not
newer than the installed one; the signed pickle could not be loaded (``invalid_model``); this
process has no usable key (``no_key``)."""


def aux_to_bytes(model: EngagementTiers | MarkovChain) -> bytes:
    """Pickle of an auxiliary model (sign it before it leaves the process)."""
    import pickle
    return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)


def aux_from_bytes(task: str, data: bytes) -> EngagementTiers | MarkovChain:
    """Inverse of :func:`aux_to_bytes` for ``task`` in :data:`AUX_TASKS`, through
    :func:`~clickpulse.models.online.safe_loads`. Only for bytes of a verified snapshot.

    Raises
    ------
    pickle.UnpicklingError, TypeError
        A global outside the allow-list, or the pickle does not hold the task's model class.
    """
    return safe_loads(data, EngagementTiers if task == "tiers" else MarkovChain)


# keys and signatures ------------------------------------------------------------------------
def parse_key(value: str) -> bytes:
    """The key bytes of a ``CLICKPULSE_SNAPSHOT_KEY`` value: an even number of at least 32 hex
    digits is decoded, anything else is taken as UTF-8 text (surrounding whitespace dropped).

    Raises
    ------
    ConfigError
        Fewer than :data:`MIN_KEY_BYTES` bytes.
    """
    key = secret_bytes(value, "CLICKPULSE_SNAPSHOT_KEY", MIN_KEY_BYTES)
    if not key:
        raise ConfigError(f"CLICKPULSE_SNAPSHOT_KEY must be at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)")
    return key


def key_id(key: bytes) -> str:
    """A public fingerprint of ``key`` (16 hex digits) that tells which key signed a snapshot."""
    return hmac.new(key, b"clickpulse.snapshot.key-id", hashlib.sha256).hexdigest()[:16]


def snapshot_key(settings: Settings) -> bytes:
    """The snapshot signing key: ``CLICKPULSE_SNAPSHOT_KEY`` when set, else the key file
    ``<data_dir>/snapshot.key``, created (``secrets.token_hex(32)``, mode 0600) when missing.

    The file is written aside and hard-linked into place, so concurrent first starts (a worker and
    the trainer) all end up with the one key that won.

    Raises
    ------
    ConfigError
        The key is too short, or the key file is group/other accessible, unreadable or invalid.
    """
    if settings.snapshot_key.strip():
        return parse_key(settings.snapshot_key)
    path = Path(settings.data_dir) / KEY_FILE
    try:
        created = _create_key_file(path)
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(f"snapshot key file {path} is accessible by group/others "
                              f"(mode {stat.filemode(mode)}): chmod 600 it, or set CLICKPULSE_SNAPSHOT_KEY")
        key = parse_key(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"snapshot key file {path}: {err}") from err
    if created:
        log.info("CLICKPULSE_SNAPSHOT_KEY is not set: created the snapshot signing key file %s (key id %s). "
                 "Only processes sharing this data dir share the key; set CLICKPULSE_SNAPSHOT_KEY on the "
                 "trainer and every worker otherwise", path, key_id(key))
    else:
        log.info("snapshot signing key from %s (key id %s)", path, key_id(key))
    return key


def _create_key_file(path: Path) -> bool:
    """Create the key file unless it exists; True when this call created it."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)            # atomic, and fails when another process won the race
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def _signed_bytes(env: dict[str, Any]) -> bytes:
    return MAC_DOMAIN + orjson.dumps({k: v for k, v in env.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS)


def sign_snapshot(env: dict[str, Any], key: bytes) -> dict[str, Any]:
    """``env`` with ``key_id``, ``signature_alg`` and ``signature`` set (in place, and returned).

    The MAC is computed over the envelope as a JSON reader will see it (a NaN metric is ``null``
    once serialized), so the worker recomputes the very same bytes.
    """
    env.pop("signature", None)
    env["key_id"] = key_id(key)
    env["signature_alg"] = SIGNATURE_ALG
    wire = orjson.loads(orjson.dumps(env))
    env["signature"] = hmac.new(key, _signed_bytes(wire), hashlib.sha256).hexdigest()
    return env


class SnapshotRejected(Exception):
    """A snapshot that must not be installed; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


_FIELDS: dict[str, type | tuple[type, ...]] = {"task": str, "version": int, "model_b64": str, "examples": int,
                                               "training_offset": int, "metrics": dict}


def verify_snapshot(env: Any, key: bytes) -> None:
    """Check a snapshot's signature under ``key`` (constant-time compare), then its shape. Decodes
    and unpickles nothing.

    Raises
    ------
    SnapshotRejected
        ``malformed``, ``unsigned``, ``key_mismatch`` or ``bad_signature``.
    """
    if not isinstance(env, dict):
        raise SnapshotRejected("malformed", f"a snapshot is a JSON object, not {type(env).__name__}")
    sig = env.get("signature")
    if sig is None:
        raise SnapshotRejected("unsigned", "no signature")
    if env.get("signature_alg") != SIGNATURE_ALG or not isinstance(sig, str):
        raise SnapshotRejected("malformed", f"signature_alg {env.get('signature_alg')!r} is not {SIGNATURE_ALG!r}")
    if env.get("key_id") != key_id(key):
        raise SnapshotRejected("key_mismatch", f"signed with key id {env.get('key_id')!r}, this process has "
                               f"{key_id(key)!r}: set the same CLICKPULSE_SNAPSHOT_KEY on trainer and workers")
    try:
        expected = hmac.new(key, _signed_bytes(env), hashlib.sha256).hexdigest()
    except (TypeError, orjson.JSONEncodeError) as err:
        raise SnapshotRejected("malformed", f"cannot canonicalize: {err}") from None
    if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
        raise SnapshotRejected("bad_signature", "signature does not match the content")
    for name, kind in _FIELDS.items():
        v = env.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise SnapshotRejected("malformed", f"{name} is {type(v).__name__}")


def b64_field(env: dict[str, Any], name: str) -> bytes:
    """Strict base64 decoding of a verified snapshot's field.

    Raises
    ------
    SnapshotRejected
        ``malformed``.
    """
    try:
        return base64.b64decode(env[name], validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise SnapshotRejected("malformed", f"{name}: {err}") from None


class Rejections:
    """Counts snapshot rejections by reason, calls ``on_reject(reason)`` (a Prometheus counter) and
    logs each reason at WARNING once, then at DEBUG."""

    def __init__(self, who: str, on_reject: Callable[[str], None] | None = None) -> None:
        self.who, self.on_reject = who, on_reject
        self.counts: Counter[str] = Counter()

    def __call__(self, err: SnapshotRejected, env: Any) -> None:
        self.counts[err.reason] += 1
        if self.on_reject is not None:
            self.on_reject(err.reason)
        task = env.get("task") if isinstance(env, dict) else None
        version = env.get("version") if isinstance(env, dict) else None
        level = logging.WARNING if self.counts[err.reason] == 1 else logging.DEBUG
        log.log(level, "%s rejected a model snapshot (task %.40r, version %.20r): %s; the current model keeps "
                "serving%s", self.who, task, version, err, " (further rejections for this reason are logged at "
                "DEBUG)" if level == logging.WARNING else "")


class ModelRegistry:
    """One :class:`OnlineModel` per task; :meth:`score` is the engine's ``Scorer``.

    Before any snapshot arrives the models are fresh pipelines (score 0.5, SCENARIOS S5), the
    tiers answer ``"medium"`` and ``p_purchase`` 0.5 (a fresh chain: uniform over ``<end>`` and
    ``purchase``).

    Parameters
    ----------
    pipelines, seed
        Pipeline per task and seed of the fresh models.
    key
        The snapshot signing key (:func:`snapshot_key`), or a callable returning it (called at the
        first :meth:`install`). Default: ``snapshot_key(Settings.from_env())`` at the first
        :meth:`install`, the settings the ``clickpulse worker`` process runs with.
    metrics
        A :class:`clickpulse.observability.metrics.Metrics`: rejections are counted in its
        ``snapshots_rejected``.
    """

    def __init__(self, pipelines: dict[str, str], seed: int = 42, *,
                 key: bytes | Callable[[], bytes] | None = None, metrics: Any = None) -> None:
        self.models = {task: OnlineModel(task, pipelines.get(task, "logreg"), seed) for task in TASKS}
        self.aux: dict[str, Any] = {"tiers": EngagementTiers(seed=seed), "markov": MarkovChain()}
        self.snapshot_versions: dict[str, int] = {}
        self.metrics: dict[str, dict[str, Any]] = {}
        self._key: bytes | Callable[[], bytes] = key if key is not None else _key_from_env
        counter = getattr(metrics, "snapshots_rejected", None)
        self.rejections = Rejections("worker", (lambda r: counter.labels(r).inc()) if counter is not None else None)

    @property
    def rejected(self) -> Counter[str]:
        """Snapshots rejected so far, by reason (:data:`REJECT_REASONS`)."""
        return self.rejections.counts

    def _signing_key(self) -> bytes:
        if callable(self._key):
            try:
                self._key = self._key()
            except ConfigError as err:
                raise SnapshotRejected("no_key", str(err)) from None
        return self._key

    def score(self, task: str, x: dict[str, float]) -> tuple[float, str, Callable[[], list[list[Any]]]]:
        """``(score in [0, 1], model version, top_features)``; ``top_features()`` computes the top
        contributions on demand (only actions need them: it costs a second transform)."""
        m = self.models[task]
        return m.score(x), m.version, functools.partial(m.explain, x)

    def tier(self, x: dict[str, Any]) -> str:
        """Engagement tier (``"high"``, ``"medium"``, ``"low"``) of one session's features
        (:func:`clickpulse.models.tiers.session_features`); ``"medium"`` before any snapshot."""
        return self.aux["tiers"].tier(x)

    def p_purchase(self, path: Sequence[str]) -> float:
        """P(the session reaches a purchase before it ends | its event types so far), in [0, 1]
        (:meth:`clickpulse.models.markov.MarkovChain.p_purchase`: only the last state matters)."""
        return self.aux["markov"].p_purchase(path)

    def ready(self, task: str, min_per_class: int) -> bool:
        """True when the ``task`` model in use has learned at least ``min_per_class`` examples of
        each class (a model that never saw a churner cannot tell one)."""
        m = self.models.get(task)
        return m is not None and m.positives >= min_per_class and m.examples - m.positives >= min_per_class

    def install(self, envelope: Any) -> bool:
        """Swap in the model of a snapshot envelope (``schemas/snapshot.v1.json``) when its signature
        is valid (:func:`verify_snapshot`), its task known and its version newer than the installed
        one. Returns True when installed; otherwise (never raising) the rejection is counted and
        logged and the current model keeps serving. Nothing is unpickled before the checks pass.
        """
        try:
            verify_snapshot(envelope, self._signing_key())
            task, version = envelope["task"], envelope["version"]
            if task not in self.models and task not in self.aux:
                raise SnapshotRejected("unknown_task", f"task {task!r} is not served here")
            if version <= self.snapshot_versions.get(task, 0):
                raise SnapshotRejected("stale", f"version {version} is not newer than the installed "
                                       f"{self.snapshot_versions.get(task, 0)}")
            data = b64_field(envelope, "model_b64")
            try:
                model: Any = aux_from_bytes(task, data) if task in self.aux else OnlineModel.from_bytes(data)
            except Exception as err:  # noqa: BLE001 - any failure to load keeps the current model
                raise SnapshotRejected("invalid_model", f"{type(err).__name__}: {err}") from None
        except SnapshotRejected as err:
            self.rejections(err, envelope)
            return False
        if task in self.aux:
            self.aux[task] = model
            examples = envelope["examples"]
        else:
            self.models[task] = model
            examples = model.examples
        self.snapshot_versions[task] = version
        self.metrics[task] = envelope["metrics"]
        log.info("installed %s model snapshot v%d (%d examples)", task, version, examples)
        return True


def _key_from_env() -> bytes:
    from ..settings import Settings
    return snapshot_key(Settings.from_env())


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(task: str, version: int, model: OnlineModel, metrics: dict[str, Any], training_offset: int) -> dict[str, Any]:
    """A snapshot message value (``schemas/snapshot.v1.json``), unsigned: :func:`sign_snapshot`
    it after the last field is set."""
    return {"schema_version": 1, "task": task, "version": version, "model_version": model.version,
            "pipeline": model.pipeline_name, "examples": model.examples, "positives": model.positives,
            "training_offset": training_offset, "metrics": metrics,
            "created_at": _now(),
            "model_b64": base64.b64encode(model.to_bytes()).decode()}


def aux_envelope(task: str, version: int, model: EngagementTiers | MarkovChain, metrics: dict[str, Any],
                 training_offset: int, examples: int, positives: int | None = None) -> dict[str, Any]:
    """A snapshot message value (``schemas/snapshot.v1.json``) of an auxiliary task, unsigned
    (:func:`sign_snapshot`).

    ``examples`` is the number of sessions learned; ``positives`` (``markov`` only) the number of
    them that reached a purchase. ``model_version`` is ``tiers-kmeans-<examples>`` or
    ``markov-<examples>``.
    """
    env = {"schema_version": 1, "task": task, "version": version,
           "model_version": model.version if isinstance(model, EngagementTiers) else f"markov-{examples}",
           "pipeline": AUX_PIPELINES[task], "examples": examples,
           "training_offset": training_offset, "metrics": metrics, "created_at": _now(),
           "model_b64": base64.b64encode(aux_to_bytes(model)).decode()}
    if positives is not None:
        env["positives"] = positives
    return env
