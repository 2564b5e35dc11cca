"""clickpulse report html: rendered from a fixture run directory; every figure's embedded JSON
is read back and its numbers compared with the inputs (not just that a file exists)."""

from __future__ import annotations

import html as html_mod
import itertools
import json
import re
from pathlib import Path

import orjson
import pytest

from clickpulse.cli import main
from clickpulse.errors import DatasetError
from clickpulse.report.curves import pr_curve, progressive, roc_curve
from clickpulse.report.html import render, segment_sizes
from clickpulse.report.run import load_run, progressive_scores

T0 = 1569888000000  # 2019-10-01 00:00 UTC
MIN = 60_000

ACTIONS = ([{"type": "assistance_offer", "event_time_ms": T0 + i * MIN} for i in range(7)]          # 00:00-00:06
           + [{"type": "cart_abandoned", "event_time_ms": T0 + 12 * MIN}]                           # 00:12
           + [{"type": "assistance_offer", "event_time_ms": T0 + 31 * MIN, "deliver": False}]        # 00:31
           + [{"type": "incentive", "event_time_ms": T0 + 59 * MIN + 59_000}])                      # 00:59:59
METRICS = {"sessions": 10, "converted_sessions": 2, "conversion_rate": 0.2, "avg_session_duration_s": 42.0,
           "engaged_sessions": 6, "engagement_rate": 0.6, "users": 8, "customers": 2, "orders": 3,
           "revenue": 120.5, "clv": 60.25,
           "funnel": [{"step": "view", "sessions": 10}, {"step": "add_to_cart", "sessions": 4},
                      {"step": "checkout", "sessions": 3}, {"step": "purchase", "sessions": 2}],
           "cohorts": [{"cohort": "2019-09-30", "users": 5, "customers": 1, "revenue": 100.0, "clv_per_user": 20.0,
                        "clv_per_customer": 100.0, "active": [5, 3, 1], "retention": [1.0, 0.6, 0.2]},
                       {"cohort": "2019-10-07", "users": 3, "customers": 1, "revenue": 20.5,
                        "clv_per_user": 20.5 / 3, "clv_per_customer": 20.5, "active": [3, 2],
                        "retention": [1.0, 2 / 3]}],
           "experiments": [{"experiment": "browse_assist", "variant": "chat", "exposed": 100, "converters": 9,
                            "conversion_rate": 0.09, "lift": 0.5}],
           "first_event_ms": T0, "last_event_ms": T0 + 3_600_000}
SEGMENTS = [{"segment": "vip", "change": "entered", "event_time_ms": T0 + 1000, "segment_size": 1},
            {"segment": "vip", "change": "entered", "event_time_ms": T0 + 2000, "segment_size": 2},
            {"segment": "vip", "change": "exited", "event_time_ms": T0 + 500, "segment_size": 1},  # out of order
            {"segment": "vip", "change": "entered", "event_time_ms": T0 + 3000, "segment_size": 2},
            {"segment": "vip", "change": "exited", "event_time_ms": T0 + 3000, "segment_size": 1},
            {"segment": "new", "change": "entered", "event_time_ms": T0 + 4000, "segment_size": 1}]
Y = [True, False, True, True, False, False, True, False, False, True]
P = [0.9, 0.1, 0.8, 0.4, 0.35, 0.7, 0.6, 0.2, 0.5, 0.55]
MODEL = {"intent": {"y": Y, "p": P, "event_time_ms": list(range(10)), "snapshot": None},
         "churn": {"y": [False, False], "p": [0.3, 0.1], "event_time_ms": [0, 1], "snapshot": None}}
EXPERIMENTS = [{"experiment": "browse_assist", "baseline": "holdout", "alpha": 0.05,
                "srm": {"chi2": 0.4, "p_value": 0.52, "mismatch": False, "observed": {}, "expected": {}},
                "arms": [{"variant": "holdout", "users": 50, "converters": 3, "conversion_rate": 0.06},
                         {"variant": "chat", "users": 100, "converters": 9, "conversion_rate": 0.09,
                          "vs_baseline": {"diff": 0.03, "diff_ci": [-0.05, 0.11], "lift": 0.5,
                                          "lift_ci": [-0.8, 1.8], "p_value_z": 0.5, "p_beats_baseline": 0.74,
                                          "p_value_always_valid": 1.0}},
                         {"variant": "discount", "users": 98, "converters": 2, "conversion_rate": 2 / 98,
                          "vs_baseline": {"diff": -0.04, "diff_ci": [-0.11, 0.03], "lift": -0.66,
                                          "lift_ci": [-1.5, 0.2], "p_value_z": 0.2, "p_beats_baseline": 0.1,
                                          "p_value_always_valid": 0.9}}]}]
RECS = {"pairs": [{"a": "p1", "b": "p2", "sessions": 17, "baskets": 1},
                  {"a": "p3", "b": "</script><b>x</b>", "sessions": 5, "baskets": 0}]}


def write_run(d: Path, **skip: bool) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    files = {"actions.jsonl": b"".join(orjson.dumps(a) + b"\n" for a in ACTIONS),
             "metrics.json": orjson.dumps(METRICS), "segments.jsonl": b"".join(orjson.dumps(r) + b"\n" for r in SEGMENTS),
             "model.json": orjson.dumps(MODEL), "experiments.json": orjson.dumps(EXPERIMENTS),
             "recs.json": orjson.dumps(RECS)}
    for name, data in files.items():
        if not skip.get(name.split(".")[0]):
            (d / name).write_bytes(data)
    return d


def figures(page: str) -> dict[str, dict]:
    """Every figure's embedded JSON, by id."""
    out = {}
    for m in re.finditer(r'<script type="application/json" id="fig-([\w-]+)" class="figure-data">(.*?)</script>',
                         page, re.S):
        out[m.group(1)] = json.loads(m.group(2))
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    return render(load_run(write_run(tmp_path_factory.mktemp("run"))))


def test_self_contained_offline(page):
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)=', page)  # nothing loaded from elsewhere
    assert "Plotly.newPlot" in page and len(page) > 1_000_000  # plotly.js inlined
    assert set(figures(page)) == {"actions", "funnel", "segments", "model-curves", "model-progressive",
                                  "experiment-0", "cohorts", "recs"}


def test_actions_figure_counts_by_type_and_bin(page):
    fig = figures(page)["actions"]
    traces = {t["name"]: t for t in fig["data"]}
    assert set(traces) == {"assistance_offer", "cart_abandoned", "incentive"}
    # a 59 min 59 s span: 1 min bins are the smallest width giving <= 60 bins
    x = traces["assistance_offer"]["x"]
    assert x[0] == "2019-10-01 00:00:00" and len(x) == 60 and x[1] == "2019-10-01 00:01:00"
    assert sum(traces["assistance_offer"]["y"]) == 8 and traces["assistance_offer"]["y"][31] == 1
    assert traces["cart_abandoned"]["y"][12] == 1 and traces["incentive"]["y"][59] == 1
    assert fig["layout"]["barmode"] == "stack"


def test_funnel_and_cohort_heatmap_equal_metrics(page):
    figs = figures(page)
    (f,) = figs["funnel"]["data"]
    assert f["type"] == "funnel" and f["x"] == [10, 4, 3, 2]
    assert f["y"] == ["product/page view", "add to cart", "checkout", "purchase"]
    (h,) = figs["cohorts"]["data"]
    assert h["type"] == "heatmap" and h["x"] == ["week 0", "week 1", "week 2"]
    assert h["z"] == [[1.0, 0.6, 0.2], [1.0, pytest.approx(2 / 3), None]]
    assert h["y"] == ["2019-09-30 (5 users)", "2019-10-07 (3 users)"]
    assert h["text"][0] == ["100% (5)", "60% (3)", "20% (1)"]
    # KPIs and per-cohort CLV in the text
    for text in ("20.0%", "42 s", "60.0%", "60.25", "120.50", "+50.0%", "20.00 per user, 100.00 per customer"):
        assert text in page, text


def test_segments_from_entries_and_exits(page):
    traces = {t["name"]: t for t in figures(page)["segments"]["data"]}
    # vip: -1 @0.5 s, +1 @1 s, +1 @2 s, then +1 and -1 @3 s (one point)
    assert traces["vip"]["y"] == [-1, 0, 1, 1] and traces["vip"]["line"]["shape"] == "hv"
    assert traces["vip"]["x"] == ["2019-10-01 00:00:00", "2019-10-01 00:00:01", "2019-10-01 00:00:02",
                                  "2019-10-01 00:00:03"]
    assert traces["new"]["y"] == [1]
    assert segment_sizes([{"segment": "x", "change": "bogus", "event_time_ms": 1}]) == {}


def test_model_curves_and_progressive_metrics(page):
    figs = figures(page)
    traces = {t["name"]: t for t in figs["model-curves"]["data"]}
    roc = next(t for n, t in traces.items() if n.startswith("intent ROC"))
    # the ROC AUC by hand: pairs (positive, negative) with the positive scored higher
    pos = [p for p, y in zip(P, Y) if y]
    neg = [p for p, y in zip(P, Y) if not y]
    auc = sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert auc == pytest.approx(21 / 25)
    assert f"{auc:.3f}" in roc["name"] and roc["x"][0] == 0 and roc["y"][-1] == 1
    assert len(roc["x"]) == len(set(P)) + 1
    pr = next(t for n, t in traces.items() if n.startswith("intent PR"))
    # average precision by hand: precision at each positive's rank (ranks 1, 2, 4, 5, 7 of 10)
    ap = (1 / 1 + 2 / 2 + 3 / 4 + 4 / 5 + 5 / 7) / 5
    assert f"{ap:.3f}" in pr["name"]
    assert not any(n.startswith("churn ROC AUC 0") for n in traces)  # one class: no curve
    assert "churn: 2 examples, 0 positive: one class only" in page
    prog = {t["name"]: t for t in figs["model-progressive"]["data"]}
    assert prog["intent ROC AUC"]["x"] == list(range(1, 11)) and prog["intent ROC AUC"]["y"][0] is None
    assert prog["intent ROC AUC"]["y"][-1] == pytest.approx(auc)
    import math
    ll = -sum(math.log(p if y else 1 - p) for p, y in zip(P, Y)) / 10
    assert prog["intent log loss"]["y"][-1] == pytest.approx(ll)


def test_experiment_figure_intervals(page):
    fig = figures(page)["experiment-0"]
    bars, diff = fig["data"][0], fig["data"][1]
    assert bars["x"] == ["holdout", "chat", "discount"] and bars["y"] == [0.06, 0.09, pytest.approx(2 / 98)]
    assert bars["text"] == ["3/50", "9/100", "2/98"]
    assert diff["y"] == ["chat", "discount"] and diff["x"] == [0.03, -0.04]
    # asymmetric error bars from the analysis' intervals: [-0.05, 0.11] and [-0.11, 0.03]
    assert diff["error_x"]["array"] == [pytest.approx(0.08), pytest.approx(0.07)]
    assert diff["error_x"]["arrayminus"] == [pytest.approx(0.08), pytest.approx(0.07)]
    assert diff["text"] == ["lift +50.0%", "lift -66.0%"]
    text = html_mod.unescape(page)
    assert "SRM p = 0.52 (ok)" in text and "chat: +3.00 pp [-5.00, +11.00] pp" in text


def test_experiment_without_baseline_conversions_shows_the_difference():
    from clickpulse.report.html import experiment_figure
    exp = {"experiment": "e", "baseline": "holdout", "srm": None,
           "arms": [{"variant": "holdout", "users": 163, "converters": 0, "conversion_rate": 0.0},
                    {"variant": "chat", "users": 332, "converters": 1, "conversion_rate": 1 / 332,
                     "vs_baseline": {"diff": 1 / 332, "diff_ci": [-0.003, 0.009], "lift": None, "lift_ci": None}}]}
    fig, note = experiment_figure(exp)
    assert fig["data"][1]["x"] == [pytest.approx(1 / 332)] and fig["data"][1]["text"] == ["lift undefined"]
    assert "no shares recorded" in note


def test_recs_pairs_and_hostile_ids_stay_data(page):
    (views, baskets) = figures(page)["recs"]["data"]
    assert views["x"] == [17, 5] and baskets["x"] == [1, 0]
    assert views["y"] == ["p1 ↔ p2", "p3 ↔ </script><b>x</b>"]
    assert "<b>x</b>" not in page  # escaped inside the JSON: no markup, no early </script>


def test_missing_files_leave_notes_and_errors_are_clear(tmp_path):
    d = write_run(tmp_path / "r", model=True, experiments=True, recs=True, segments=True)
    page = render(load_run(d))
    assert set(figures(page)) == {"actions", "funnel", "cohorts"}
    for note in ("no labeled model examples", "no experiment records", "no recommendation pairs",
                 "no segment changes"):
        assert note in page
    (d / "metrics.json").write_text("{nope")
    with pytest.raises(DatasetError, match="metrics.json: not JSON"):
        load_run(d)
    (d / "metrics.json").unlink()
    (d / "actions.jsonl").write_text('{"type": "a", "event_time_ms": 1}\n[1]\n')
    with pytest.raises(DatasetError, match="actions.jsonl:2: not a JSON object"):
        load_run(d)
    with pytest.raises(DatasetError, match="no such run directory"):
        load_run(tmp_path / "nope")


def test_cli_report_html(tmp_path, capsys):
    d = write_run(tmp_path / "run")
    out = tmp_path / "r.html"
    assert main(["report", "html", "--from", str(d), "--out", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out
    assert figures(out.read_text())["funnel"]["data"][0]["x"] == [10, 4, 3, 2]
    assert main(["report", "html", "--from", str(d)]) == 0
    assert (d / "report.html").is_file()
    assert main(["report", "html", "--from", str(tmp_path / "missing")]) != 0


def test_curves_errors_and_ties():
    with pytest.raises(ValueError):
        roc_curve([True, True], [0.1, 0.2])
    with pytest.raises(ValueError):
        pr_curve([False], [0.3])
    with pytest.raises(ValueError):
        roc_curve([True], [0.1, 0.2])
    # all scores tied: the diagonal, AUC 0.5
    r = roc_curve([True, False, True, False], [0.5] * 4)
    assert r["auc"] == 0.5 and r["fpr"] == [0.0, 1.0]
    assert progressive([], []) == {"n": [], "roc_auc": [], "log_loss": [], "positive_rate": []}
    assert progressive([True] * 1000, [0.9] * 1000, points=10)["n"] == list(range(100, 1001, 100))


def test_progressive_scores_replays_like_the_trainer():
    """The demo's model.json: scores given before learning, as Trainer.learn does (same seed)."""
    from clickpulse.models.trainer import Trainer

    exs = [{"task": "intent", "x": {"a": float(i % 3), "b": float(i % 5)}, "y": i % 3 == 0, "label_at_ms": i}
           for i in range(40)] + [{"task": "tiers", "x": {}}, {"task": "churn", "x": {"a": 1.0}, "y": False}]
    got = progressive_scores(exs, {"intent": "logreg", "churn": "logreg"}, 42)
    tr = Trainer({"intent": "logreg", "churn": "logreg"}, {"intent": 0.8, "churn": 0.8}, 42, 1000, key=b"k" * 32)
    for off, ex in enumerate(e for e in exs if e["task"] != "tiers"):
        tr.learn(ex, off)
    assert len(got["intent"]["p"]) == 40 and got["churn"]["y"] == [False]
    assert tr.validation["intent"].report()["all"]["roc_auc"] == pytest.approx(roc_curve(
        got["intent"]["y"], got["intent"]["p"])["auc"])


def test_experiment_records_are_analyzed_and_drawn(tmp_path):
    """experiments.jsonl (the demo's) goes through clickpulse.experiments.report.analyze."""
    d = write_run(tmp_path / "run", experiments=True)
    recs = []
    for i in range(200):
        arm, share = ("holdout", 0.2) if i % 5 == 0 else ("chat", 0.8)
        recs.append({"schema_version": 1, "record_id": f"x{i}", "kind": "exposure", "experiment": "ex",
                     "variant": arm, "user_key": f"u{i}", "event_time_ms": T0 + i, "exposure_time_ms": T0 + i,
                     "revenue": None, "source_id": f"a{i}", "share": share})
        if i % 4 == 0:
            recs.append({"schema_version": 1, "record_id": f"c{i}", "kind": "conversion", "experiment": "ex",
                         "variant": arm, "user_key": f"u{i}", "event_time_ms": T0 + i + 1,
                         "exposure_time_ms": T0 + i, "revenue": 10.0, "source_id": f"e{i}", "share": share})
    (d / "experiments.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    run = load_run(d)
    (exp,) = run["experiments"]
    arms = {a["variant"]: a for a in exp["arms"]}
    # holdout: users 0, 5, 10, ... (40); converters: multiples of 20 (10). chat: 160 users, 40 converters
    assert (arms["holdout"]["users"], arms["holdout"]["converters"]) == (40, 10)
    assert (arms["chat"]["users"], arms["chat"]["converters"]) == (160, 40)
    fig = figures(render(run))["experiment-0"]
    assert fig["data"][0]["text"] == ["10/40", "40/160"]
    assert fig["data"][1]["x"] == [pytest.approx(arms["chat"]["vs_baseline"]["diff"])]
