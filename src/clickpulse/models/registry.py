"""The models a worker scores with, hot-swapped when the trainer publishes a newer snapshot."""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .online import OnlineModel

log = logging.getLogger(__name__)
TASKS = ("intent", "churn")


class ModelRegistry:
    """One :class:`OnlineModel` per task; :meth:`score` is the engine's ``Scorer``.

    Before any snapshot arrives the models are fresh pipelines (score 0.5, SCENARIOS S5).
    """

    def __init__(self, pipelines: dict[str, str], seed: int = 42) -> None:
        self.models = {task: OnlineModel(task, pipelines.get(task, "logreg"), seed) for task in TASKS}
        self.snapshot_versions: dict[str, int] = {}
        self.metrics: dict[str, dict[str, Any]] = {}

    def score(self, task: str, x: dict[str, float]) -> tuple[float, str, Callable[[], list[list[Any]]]]:
        """``(score in [0, 1], model version, top_features)``; ``top_features()`` computes the top
        contributions on demand (only actions need them: it costs a second transform)."""
        m = self.models[task]
        return m.score(x), m.version, functools.partial(m.explain, x)

    def install(self, envelope: dict[str, Any]) -> bool:
        """Swap in the model of a snapshot envelope (``schemas/snapshot.v1.json``) when it is newer.

        The pickle inside is trusted only because it comes from clickpulse's own snapshot topic.
        Returns True when installed.
        """
        task = envelope["task"]
        if task not in self.models or envelope["version"] <= self.snapshot_versions.get(task, -1):
            return False
        model = OnlineModel.from_bytes(base64.b64decode(envelope["model_b64"]))
        self.models[task] = model
        self.snapshot_versions[task] = envelope["version"]
        self.metrics[task] = envelope.get("metrics", {})
        log.info("installed %s model snapshot v%d (%d examples)", task, envelope["version"], model.examples)
        return True


def envelope(task: str, version: int, model: OnlineModel, metrics: dict[str, Any], training_offset: int) -> dict[str, Any]:
    """A snapshot message value (``schemas/snapshot.v1.json``)."""
    return {"schema_version": 1, "task": task, "version": version, "model_version": model.version,
            "pipeline": model.pipeline_name, "examples": model.examples, "positives": model.positives,
            "training_offset": training_offset, "metrics": metrics,
            "created_at": datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "model_b64": base64.b64encode(model.to_bytes()).decode()}
