"""The files of a run that the HTML report reads, and how the demo writes them.

A run directory (``clickpulse demo`` writes ``demo-output/``) may hold:

==========================  ===================================================================
``actions.jsonl``           the actions, one JSON object a line (``schemas/action.v1.json``)
``metrics.json``            :meth:`clickpulse.metrics.business.BusinessMetrics.snapshot` of the
                            worker (its ``/business`` page)
``segments.jsonl``          segment entries/exits (``<ns>.segments``: ``segment``,
                            ``event_time_ms``, ``segment_size``)
``model.json``              per task (``intent``, ``churn``): ``y``, ``p`` (progressive scores:
                            each given before the example was learned), ``event_time_ms``,
                            ``snapshot`` (the trainer's last snapshot metrics)
``experiments.jsonl``       experiment records (``<ns>.experiments``, docs/experiments.md); or
``experiments.json``        the analysis (``clickpulse report experiments --json``)
``recs.json``               ``{"pairs": [{"a", "b", "sessions", "baskets"}]}``: the top
                            item pairs of the recommendation model
==========================  ===================================================================

Every file is optional: a missing one leaves its section out with a note. Malformed lines
raise :class:`clickpulse.errors.DatasetError` with the file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from ..errors import DatasetError

#: labeled tasks whose progressive scores the report plots
TASKS = ("intent", "churn")
#: largest file the report reads (bytes): a run's files are small; a huge one is refused
MAX_FILE_BYTES = 512 * 1024 * 1024


def _read(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DatasetError(f"{path}: {size} bytes, more than the report reads ({MAX_FILE_BYTES})")
    return path.read_bytes()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (blank lines skipped)."""
    out = []
    for n, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            raise DatasetError(f"{path}:{n}: not JSON ({err})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{n}: not a JSON object")
        out.append(obj)
    return out


def read_json(path: Path) -> Any:
    try:
        return orjson.loads(_read(path))
    except orjson.JSONDecodeError as err:
        raise DatasetError(f"{path}: not JSON ({err})") from None


def load_run(directory: str | Path) -> dict[str, Any]:
    """Everything of a run directory as plain data: ``actions``, ``metrics``, ``segments``,
    ``model``, ``experiments`` (the analysis: a list of experiments), ``recs``; ``None`` for
    a file that is not there.

    Raises
    ------
    DatasetError
        The directory does not exist, or a file is malformed.
    """
    d = Path(directory)
    if not d.is_dir():
        raise DatasetError(f"no such run directory: {d}")

    def opt(name: str, reader: Any) -> Any:
        p = d / name
        return reader(p) if p.is_file() else None

    experiments = opt("experiments.json", read_json)
    if experiments is None and (d / "experiments.jsonl").is_file():
        experiments = analyze_experiments(d / "experiments.jsonl")
    return {"dir": str(d), "actions": opt("actions.jsonl", read_jsonl), "metrics": opt("metrics.json", read_json),
            "segments": opt("segments.jsonl", read_jsonl), "model": opt("model.json", read_json),
            "experiments": experiments, "recs": opt("recs.json", read_json)}


def analyze_experiments(path: Path) -> list[dict[str, Any]] | None:
    """The experiments' analysis (:func:`clickpulse.experiments.report.analyze` over
    :func:`~clickpulse.experiments.report.aggregate`) of a records file; ``None`` when this
    installation has no experiments module."""
    try:
        from ..experiments.report import aggregate, analyze  # type: ignore[import-not-found]
    except ImportError:
        return None
    data, _bad = aggregate(read_jsonl(path))
    # through JSON: the analysis may hold numpy scalars
    return orjson.loads(orjson.dumps(analyze(data), option=orjson.OPT_SERIALIZE_NUMPY))  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ demo side
def progressive_scores(examples: Iterable[Mapping[str, Any]], pipelines: Mapping[str, str], seed: int,
                       snapshots: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Replay the labeled examples of the training topic (in offset order) through fresh
    models exactly as the trainer does (score, then learn; :meth:`clickpulse.models.trainer.
    Trainer.learn`), recording each progressive score: what ``model.json`` holds."""
    from ..models.online import OnlineModel

    models = {t: OnlineModel(t, pipelines.get(t, "logreg"), seed) for t in TASKS}
    out: dict[str, Any] = {t: {"y": [], "p": [], "event_time_ms": [], "snapshot": None} for t in TASKS}
    for ex in examples:
        task = ex.get("task")
        if task not in models:
            continue
        m = models[task]
        y = bool(ex["y"])
        out[task]["p"].append(float(m.score(ex["x"])))
        out[task]["y"].append(y)
        out[task]["event_time_ms"].append(ex.get("label_at_ms") or ex.get("event_time_ms"))
        m.learn(ex["x"], y)
    for t in TASKS:
        env = (snapshots or {}).get(t)
        if env is not None:
            out[t]["snapshot"] = {"examples": env.get("examples"), "metrics": env.get("metrics")}
    return out


def segment_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The fields of segment-change records the report plots (no user key)."""
    keep = ("segment", "change", "event_time_ms", "segment_size")
    return [{k: r.get(k) for k in keep} for r in records]
