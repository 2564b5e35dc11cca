"""Offline evaluation of the online purchase-intent pipelines on a public dataset.

The evaluation is **progressive validation** in one pass (Blum, Kalai & Langford 1999): for each
row, the model scores the features *before* it learns the label, the score goes into
:class:`~clickpulse.models.validation.ProgressiveValidation`, then the model learns the row. It
uses :class:`~clickpulse.models.online.OnlineModel` and ``ProgressiveValidation``, the same code
path the stream uses, so the figures describe the shipped pipelines (not a batch model with
cross-validation). Rows are taken in file order, or shuffled with a fixed seed.

Dataset: UCI ML Repository 468 "Online Shoppers Purchasing Intention" (Sakar et al., Neural
Computing and Applications 31, 2019, doi:10.1007/s00521-018-3523-0, CC BY 4.0), bundled unchanged
as ``clickpulse/data/uci-online-shoppers.csv`` (see ``data/UCI-README.md``). Its file order is
roughly grouped by month (Feb, Mar, May first, then the rest interleaved), so "file order" includes
a drift the shuffled run does not.

Examples
--------
>>> rows = [({"x": 1.0}, True), ({"x": -1.0}, False)] * 50
>>> r = evaluate(rows, "logreg", seed=1)
>>> r["n"], r["positives"], r["roc_auc"] > 0.9
(100, 50, True)
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .online import PIPELINES, OnlineModel
from .validation import ProgressiveValidation

BUNDLED_UCI = Path(__file__).resolve().parent.parent / "data" / "uci-online-shoppers.csv"
DATASETS: dict[str, Path] = {"uci": BUNDLED_UCI}

UCI_COLUMNS = ["Administrative", "Administrative_Duration", "Informational", "Informational_Duration",
               "ProductRelated", "ProductRelated_Duration", "BounceRates", "ExitRates", "PageValues",
               "SpecialDay", "Month", "OperatingSystems", "Browser", "Region", "TrafficType",
               "VisitorType", "Weekend", "Revenue"]
_LOG1P = {"Administrative": "admin_pages_log1p", "Administrative_Duration": "admin_s_log1p",
          "Informational": "info_pages_log1p", "Informational_Duration": "info_s_log1p",
          "ProductRelated": "product_pages_log1p", "ProductRelated_Duration": "product_s_log1p"}
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_VISITOR = {"Returning_Visitor": "returning", "New_Visitor": "new", "Other": "other"}
# Integer codes as documented by UCI for the published file (OperatingSystems 1-8, Browser 1-13,
# Region 1-9, TrafficType 1-20); a code outside these still becomes its own "<prefix>=<code>" key.
_CODES = {"OperatingSystems": ("os", 8), "Browser": ("browser", 13), "Region": ("region", 9),
          "TrafficType": ("traffic", 20)}
_TRUE = {"TRUE": True, "True": True, "true": True, "1": True,
         "FALSE": False, "False": False, "false": False, "0": False}

# Published batch result on the same file (Tanvir et al. 2023, PMC10121810), for context only.
REFERENCE = {"name": "Tanvir et al. 2023 (batch XGBoost + oversampling + feature selection)",
             "roc_auc": 0.937, "pr_auc": 0.754, "accuracy": 0.9065}
ALWAYS_NO_ACCURACY = 0.845  # 1 - 1,908 / 12,330 purchases


def _one_hot(prefix: str, value: str, vocabulary: Iterable[str]) -> dict[str, float]:
    x = {f"{prefix}={v}": 0.0 for v in vocabulary}
    x[f"{prefix}={value}"] = 1.0
    return x


def uci_features(row: dict[str, str]) -> dict[str, float]:
    """One UCI CSV row (strings, by column name) -> the feature dict of :func:`uci_rows`.

    Raises
    ------
    ValueError
        A numeric column that does not parse; :func:`uci_rows` turns it into a ``DatasetError``.
    """
    x: dict[str, float] = {name: math.log1p(max(0.0, float(row[col]))) for col, name in _LOG1P.items()}
    x["bounce_rate"] = float(row["BounceRates"])
    x["exit_rate"] = float(row["ExitRates"])
    x["page_value_log1p"] = math.log1p(max(0.0, float(row["PageValues"])))
    x["special_day"] = float(row["SpecialDay"])
    x.update(_one_hot("month", row["Month"].strip()[:3].title(), _MONTHS))
    x.update(_one_hot("visitor", _VISITOR.get(row["VisitorType"].strip(), "other"), _VISITOR.values()))
    weekend = _TRUE.get(row["Weekend"].strip())
    if weekend is None:
        raise ValueError(f"Weekend {row['Weekend']!r} is not TRUE/FALSE")
    x["weekend"] = float(weekend)
    for col, (prefix, top) in _CODES.items():
        x.update(_one_hot(prefix, str(int(float(row[col]))), (str(c) for c in range(1, top + 1))))
    return x


def uci_rows(path: str | Path = BUNDLED_UCI) -> Iterator[tuple[dict[str, float], bool]]:
    """Yield ``(features, purchased)`` for every session of the UCI Online Shoppers file, in file order.

    Feature mapping (all values are floats; ``log1p(v) = ln(1 + v)``):

    ``admin_pages_log1p``, ``info_pages_log1p``, ``product_pages_log1p``
        log1p of the number of administrative / informational / product pages visited in the
        session (columns ``Administrative``, ``Informational``, ``ProductRelated``; counts).
    ``admin_s_log1p``, ``info_s_log1p``, ``product_s_log1p``
        log1p of the seconds spent on those pages (``*_Duration``; seconds, negatives clamped to 0).
        Counts and durations are heavy-tailed (product durations reach 63,974 s), hence the log.
    ``bounce_rate``, ``exit_rate``
        Google Analytics bounce and exit rates of the pages visited (fractions, 0-0.2), unchanged.
    ``page_value_log1p``
        log1p of ``PageValues``, the average Google Analytics "page value" of the pages visited
        (a currency amount; 0 for 78 % of sessions, up to 361).
    ``special_day``
        Closeness of the session to a special day such as Valentine's Day (0-1), unchanged.
    ``month=Jan`` ... ``month=Dec``
        One-hot month (``June`` in the file becomes ``Jun``); 1.0 for the session's month, else 0.0.
    ``visitor=returning``, ``visitor=new``, ``visitor=other``
        One-hot ``VisitorType``.
    ``weekend``
        1.0 if the session was on a weekend, else 0.0.
    ``os=1`` ... ``os=8``, ``browser=1`` ... ``browser=13``, ``region=1`` ... ``region=9``, ``traffic=1`` ... ``traffic=20``
        One-hot of the integer codes ``OperatingSystems``, ``Browser``, ``Region``, ``TrafficType``
        (codes documented by UCI); a code outside those ranges adds its own key (``os=99``).

    One-hot groups are written **densely** (0.0 for the inactive codes): River's
    ``StandardScaler`` only updates the statistics of keys present in ``x``, so a key that only
    ever appears as 1.0 has variance 0 and would always be scaled to 0 (i.e. ignored).

    Label: ``Revenue`` (``TRUE`` = the session ended in a purchase).

    Parameters
    ----------
    path
        The CSV file as published (header ``Administrative,...,Weekend,Revenue``).

    Raises
    ------
    DatasetError
        Missing file, a header that is not the UCI one, or a row that does not parse (with its line).

    Examples
    --------
    >>> x, y = next(uci_rows())
    >>> y, x["product_pages_log1p"], x["exit_rate"], x["month=Feb"], x["os=1"], x["visitor=returning"]
    (False, 0.6931471805599453, 0.2, 1.0, 1.0, 1.0)
    >>> len(x)
    76
    """
    path = Path(path)
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise DatasetError(f"cannot open UCI dataset {path}: {err}") from err
    with f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if header != UCI_COLUMNS:
            raise DatasetError(f"{path} does not have the UCI Online Shoppers header {','.join(UCI_COLUMNS)}")
        reader.fieldnames = header
        for row in reader:
            try:
                label = _TRUE[row["Revenue"].strip()]
                yield uci_features(row), label
            except (KeyError, ValueError, TypeError, AttributeError) as err:
                raise DatasetError(f"{path}:{reader.line_num}: bad UCI row ({err})") from err


def evaluate(rows: Iterable[tuple[dict[str, float], bool]], pipeline: str, seed: int,
             shuffle_seed: int | None = None, threshold: float = 0.5,
             on_score: Callable[[bool, float], None] | None = None) -> dict[str, Any]:
    """Progressive validation of one fresh pipeline over ``rows``, in one pass.

    For each row: ``p = model.score(x)``; ``validation.update(y, p)``; ``model.learn(x, y)``.

    Parameters
    ----------
    rows
        ``(features, label)`` pairs, e.g. from :func:`uci_rows`. Materialised into a list.
    pipeline
        A name in :data:`clickpulse.models.online.PIPELINES`.
    seed
        Model seed (``OnlineModel(seed=...)``).
    shuffle_seed
        ``None``: rows in the given order; otherwise rows shuffled with ``random.Random(shuffle_seed)``.
    threshold
        Score at or above which a purchase is predicted (accuracy, precision, recall, F1).
    on_score
        Called with every ``(label, score)`` pair in the order scored (for checks and plots).

    Returns
    -------
    dict
        ``n``, ``positives``; ``roc_auc`` (exact over all ``n``: River's ``RollingROCAUC`` with a
        window of ``n``), ``roc_auc_binned`` (River's ``ROCAUC`` with 1,000 thresholds, the
        stream's all-time figure), ``pr_auc`` (``RollingPRAUC`` over all ``n``), ``accuracy``,
        ``precision``, ``recall``, ``f1`` (purchase class, at ``threshold``), ``log_loss`` (nats);
        ``seconds`` (wall time of the whole score/update/learn loop, not reading or shuffling),
        ``model_seconds`` (the ``score`` and ``learn`` calls only) and ``examples_per_s``
        (``n / model_seconds``: the model's own throughput; River's ``ROCAUC`` with 1,000
        thresholds inside ``ProgressiveValidation`` costs more per update than the default model
        and would otherwise dominate); ``pipeline``, ``seed``, ``shuffle_seed``, ``threshold``.

    Raises
    ------
    ConfigError
        Unknown pipeline name.
    """
    data = list(rows)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(data)
    model = OnlineModel("intent", pipeline, seed=seed)
    validation = ProgressiveValidation(threshold=threshold, window=max(1, len(data)))
    clock = time.perf_counter_ns
    model_ns = 0
    t0 = clock()
    for x, y in data:
        t1 = clock()
        p = model.score(x)
        t2 = clock()
        validation.update(y, p)
        if on_score is not None:
            on_score(bool(y), p)
        t3 = clock()
        model.learn(x, y)
        model_ns += t2 - t1 + clock() - t3
    seconds = (clock() - t0) / 1e9
    model_seconds = model_ns / 1e9
    report = validation.report()
    everything, window = report["all"], report["window"]
    return {"pipeline": pipeline, "seed": seed, "shuffle_seed": shuffle_seed, "threshold": threshold,
            "n": report["n"], "positives": report["positives"],
            "roc_auc": window["roc_auc"], "roc_auc_binned": everything["roc_auc"], "pr_auc": window["pr_auc"],
            "accuracy": everything["accuracy"], "precision": everything["precision"],
            "recall": everything["recall"], "f1": everything["f1"], "log_loss": everything["log_loss"],
            "seconds": seconds, "model_seconds": model_seconds,
            "examples_per_s": report["n"] / model_seconds if model_seconds > 0 else math.inf}


def dataset_path(dataset: str) -> Path:
    """The bundled file of a dataset name (``"uci"``).

    Raises
    ------
    DatasetError
        Unknown name, or the file is missing.
    """
    try:
        path = DATASETS[dataset]
    except KeyError:
        raise DatasetError(f"unknown evaluation dataset {dataset!r}; choose one of {sorted(DATASETS)}") from None
    if not path.is_file():
        raise DatasetError(f"dataset file {path} is missing (is the package installed with its data?)")
    return path


def format_table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """A fixed-width text table of ``(row label, evaluate() result)`` pairs plus the reference rows."""
    head = ["", "ROC AUC", "PR AUC", "accuracy", "F1 (purchase)", "precision", "recall", "examples/s (model)"]
    lines = [head]
    for label, r in results:
        lines.append([label, f"{r['roc_auc']:.3f}", f"{r['pr_auc']:.3f}", f"{100 * r['accuracy']:.2f} %",
                      f"{r['f1']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                      f"{r['examples_per_s']:,.0f}"])
    lines.append([REFERENCE["name"], f"{REFERENCE['roc_auc']:.3f}", f"{REFERENCE['pr_auc']:.3f}",
                  f"{100 * REFERENCE['accuracy']:.2f} %", "", "", "", ""])
    lines.append(["always \"no purchase\"", "", "", f"{100 * ALWAYS_NO_ACCURACY:.1f} %", "0", "", "0", ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_cli(dataset: str, pipeline: str, limit: int | None, seed: int) -> int:
    """``clickpulse evaluate intent --dataset uci [--pipeline P|all] [--limit N] [--seed S]``.

    Prints, for each pipeline, a "file order" row and a "shuffled (seed S)" row (model seed and
    shuffle seed are both ``seed``), then the published batch reference and the always-"no
    purchase" accuracy. ``limit`` keeps the first N rows of the file (before shuffling).
    Returns the exit code (0).

    Raises
    ------
    DatasetError
        Unknown dataset name or missing file.
    ConfigError
        Unknown pipeline name or a negative limit.
    """
    names = sorted(PIPELINES) if pipeline == "all" else [pipeline]
    for name in names:
        if name not in PIPELINES:
            raise ConfigError(f"unknown model pipeline {name!r}; choose one of {sorted(PIPELINES)} or 'all'")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {limit}")
    path = dataset_path(dataset)
    rows = list(uci_rows(path))
    if limit is not None:
        rows = rows[:limit]
    positives = sum(y for _, y in rows)
    print(f"dataset {dataset}: {path.name}, {len(rows):,} sessions, {positives:,} purchases "
          f"({100 * positives / max(1, len(rows)):.1f} %); progressive validation (score, then learn), "
          f"one pass, threshold 0.5, model seed {seed}")
    results: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        results.append((f"{name}: file order", evaluate(rows, name, seed=seed)))
        results.append((f"{name}: shuffled (seed {seed})", evaluate(rows, name, seed=seed, shuffle_seed=seed)))
    print(format_table(results))
    print("ROC AUC is exact (rank-based over all sessions); PR AUC is River's RollingPRAUC over all sessions;\n"
          "F1, precision and recall are of the purchase class at score >= 0.5; examples/s counts score + learn only.\n"
          "The reference is a batch model with cross-validation, not a single online pass: context, not a like-for-like.")
    return 0
