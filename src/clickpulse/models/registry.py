"""The models a worker scores with, hot-swapped when the trainer publishes a newer snapshot.

Two kinds of task share the snapshot topic (``schemas/snapshot.v1.json``), keyed by task:

* :data:`TASKS` (``intent``, ``churn``): supervised :class:`~clickpulse.models.online.OnlineModel`
  classifiers, learned from labeled examples and scored by the engine (:meth:`ModelRegistry.score`);
* :data:`AUX_TASKS` (``tiers``, ``markov``): models learned from one example per ended session,
  :class:`~clickpulse.models.tiers.EngagementTiers` (:meth:`ModelRegistry.tier`) and
  :class:`~clickpulse.models.markov.MarkovChain` (:meth:`ModelRegistry.p_purchase`).
"""

from __future__ import annotations

import base64
import functools
import logging
import pickle
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from .markov import MarkovChain
from .online import OnlineModel
from .tiers import EngagementTiers

log = logging.getLogger(__name__)
TASKS = ("intent", "churn")
"""The supervised tasks (labeled examples ``{"x", "y"}``, scored by the engine)."""
AUX_TASKS = ("tiers", "markov")
"""The session models: ``tiers`` (online k-means engagement tiers) and ``markov`` (next-action chain)."""
AUX_PIPELINES = {"tiers": "kmeans", "markov": "markov"}
"""The ``pipeline`` field of an auxiliary task's snapshot."""


def aux_to_bytes(model: EngagementTiers | MarkovChain) -> bytes:
    """Pickle of an auxiliary model (trusted storage only)."""
    return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)


def aux_from_bytes(task: str, data: bytes) -> EngagementTiers | MarkovChain:
    """Inverse of :func:`aux_to_bytes` for ``task`` in :data:`AUX_TASKS`. Only for snapshots from
    clickpulse's own topic.

    Raises
    ------
    TypeError
        The pickle does not hold the task's model class.
    """
    if task == "tiers":
        return EngagementTiers.from_bytes(data)
    obj = pickle.loads(data)  # noqa: S301 - documented: trusted snapshot topic only
    if not isinstance(obj, MarkovChain):
        raise TypeError(f"snapshot holds {type(obj).__name__}, not MarkovChain")
    return obj


class ModelRegistry:
    """One :class:`OnlineModel` per task; :meth:`score` is the engine's ``Scorer``.

    Before any snapshot arrives the models are fresh pipelines (score 0.5, SCENARIOS S5), the
    tiers answer ``"medium"`` and ``p_purchase`` 0.5 (a fresh chain: uniform over ``<end>`` and
    ``purchase``).
    """

    def __init__(self, pipelines: dict[str, str], seed: int = 42) -> None:
        self.models = {task: OnlineModel(task, pipelines.get(task, "logreg"), seed) for task in TASKS}
        self.aux: dict[str, Any] = {"tiers": EngagementTiers(seed=seed), "markov": MarkovChain()}
        self.snapshot_versions: dict[str, int] = {}
        self.metrics: dict[str, dict[str, Any]] = {}

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

    def install(self, envelope: dict[str, Any]) -> bool:
        """Swap in the model of a snapshot envelope (``schemas/snapshot.v1.json``) when it is newer.

        The pickle inside is trusted only because it comes from clickpulse's own snapshot topic.
        Returns True when installed.
        """
        task = envelope["task"]
        if (task not in self.models and task not in self.aux) \
                or envelope["version"] <= self.snapshot_versions.get(task, -1):
            return False
        data = base64.b64decode(envelope["model_b64"])
        if task in self.aux:
            self.aux[task] = aux_from_bytes(task, data)
            examples = envelope.get("examples", 0)
        else:
            model = OnlineModel.from_bytes(data)
            self.models[task] = model
            examples = model.examples
        self.snapshot_versions[task] = envelope["version"]
        self.metrics[task] = envelope.get("metrics", {})
        log.info("installed %s model snapshot v%d (%d examples)", task, envelope["version"], examples)
        return True


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(task: str, version: int, model: OnlineModel, metrics: dict[str, Any], training_offset: int) -> dict[str, Any]:
    """A snapshot message value (``schemas/snapshot.v1.json``)."""
    return {"schema_version": 1, "task": task, "version": version, "model_version": model.version,
            "pipeline": model.pipeline_name, "examples": model.examples, "positives": model.positives,
            "training_offset": training_offset, "metrics": metrics,
            "created_at": _now(),
            "model_b64": base64.b64encode(model.to_bytes()).decode()}


def aux_envelope(task: str, version: int, model: EngagementTiers | MarkovChain, metrics: dict[str, Any],
                 training_offset: int, examples: int, positives: int | None = None) -> dict[str, Any]:
    """A snapshot message value (``schemas/snapshot.v1.json``) of an auxiliary task.

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
