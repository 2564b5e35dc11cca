"""``clickpulse report html``: one self-contained HTML page of a run, drawn with Plotly.

The page works offline: plotly.js is inlined once (``plotly.offline.get_plotlyjs()``, no CDN),
and each figure's data and layout are embedded as JSON in a ``<script type="application/json"
id="fig-NAME">`` element (``<``, ``>`` and ``&`` escaped, so no data can close the script) that a
few lines of JavaScript hand to ``Plotly.newPlot``. Tests read those JSON elements back.

Sections (each built from plain data, see :mod:`clickpulse.report.run` for the files):

* key business metrics (``metrics.json``),
* actions over event time by type (``actions.jsonl``),
* the purchase funnel (``metrics.json``: sessions reaching each step),
* segment sizes over event time (``segments.jsonl``),
* the intent (and churn) model: ROC and precision-recall curves and the progressive metrics over
  examples (``model.json``),
* experiment results with intervals (the analysis of ``experiments.jsonl``),
* the weekly cohort-retention heatmap (``metrics.json``),
* the top recommendation pairs (``recs.json``).
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .curves import pr_curve, progressive, roc_curve

#: candidate bin widths of the actions-over-time chart (ms); the smallest giving <= MAX_BINS
BIN_WIDTHS_MS = (60_000, 300_000, 900_000, 3_600_000, 6 * 3_600_000, 86_400_000, 7 * 86_400_000)
MAX_BINS = 60
FUNNEL_LABELS = {"view": "product/page view", "add_to_cart": "add to cart", "checkout": "checkout",
                 "purchase": "purchase"}
COLORWAY = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00"]


def iso(ms: int) -> str:
    """Epoch ms -> ``YYYY-MM-DD HH:MM:SS`` (UTC), the date format plotly reads as a date axis."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _layout(title: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"title": {"text": title}, "template": "plotly_white", "colorway": COLORWAY,
                            "margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "height": 380}
    base.update(kw)
    return base


def _figure(data: list[Any], layout: dict[str, Any]) -> dict[str, Any]:
    """A validated plotly figure as plain JSON data (lists, not typed arrays)."""
    import plotly.graph_objects as go

    fig = go.Figure(data=data, layout=layout)
    return orjson.loads(fig.to_json())  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ figures
def actions_figure(actions: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], str]:
    """Stacked bars: actions per type per event-time bin."""
    times = [int(a["event_time_ms"]) for a in actions]
    lo, hi = min(times), max(times)
    width = next((w for w in BIN_WIDTHS_MS if (hi - lo) // w + 1 <= MAX_BINS), BIN_WIDTHS_MS[-1])
    start = lo - lo % width
    counts: dict[str, Counter[int]] = defaultdict(Counter)
    for a, t in zip(actions, times, strict=True):
        counts[str(a.get("type"))][(t - start) // width] += 1
    nbins = (hi - start) // width + 1
    x = [iso(start + i * width) for i in range(nbins)]
    import plotly.graph_objects as go

    traces = [go.Bar(name=typ, x=x, y=[counts[typ].get(i, 0) for i in range(nbins)])
              for typ in sorted(counts, key=lambda k: -sum(counts[k].values()))]
    label = f"{width // 60_000} min" if width < 3_600_000 else f"{width // 3_600_000} h"
    fig = _figure(traces, _layout(f"Actions over event time ({len(actions)} actions, {label} bins, UTC)",
                                  barmode="stack", xaxis={"title": {"text": "event time"}},
                                  yaxis={"title": {"text": "actions"}}))
    note = (f"Each action counted at its event time (the time of the behaviour that decided it), "
            f"in {label} bins; holdout decisions of experiments (deliver: false) are included.")
    return fig, note


def funnel_figure(funnel: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sessions reaching each funnel step (an open funnel: a session counts at a step when it
    had an event of that type)."""
    import plotly.graph_objects as go

    y = [FUNNEL_LABELS.get(r["step"], r["step"]) for r in funnel]
    x = [r["sessions"] for r in funnel]
    return _figure([go.Funnel(y=y, x=x, textinfo="value+percent initial")],
                   _layout("Purchase funnel (sessions reaching each step)"))


def segment_sizes(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[int]]]:
    """Per segment, its members at event time: ``(times ms, sizes)`` after each change, from
    the entries (+1) and exits (-1) in event-time order (entries before exits at equal times).
    Computed from the changes rather than their ``segment_size`` field, which is the worker's
    count at processing time (an exit decided by a timer is processed after later events)."""
    by: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in rows:
        change = r.get("change")
        if r.get("segment") is None or r.get("event_time_ms") is None or change not in ("entered", "exited"):
            continue
        by[str(r["segment"])].append((int(r["event_time_ms"]), 1 if change == "entered" else -1))
    out = {}
    for name, changes in by.items():
        changes.sort(key=lambda c: (c[0], -c[1]))
        times, sizes, n = [], [], 0
        for t, d in changes:
            n += d
            if times and times[-1] == t:
                sizes[-1] = n
            else:
                times.append(t)
                sizes.append(n)
        out[name] = (times, sizes)
    return out


def segments_figure(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Step lines: each segment's members over event time (:func:`segment_sizes`)."""
    import plotly.graph_objects as go

    sizes = segment_sizes(rows)
    traces = [go.Scatter(name=name, x=[iso(t) for t in sizes[name][0]], y=sizes[name][1], mode="lines",
                         line={"shape": "hv"}) for name in sorted(sizes)]
    return _figure(traces, _layout("Segment sizes over event time", xaxis={"title": {"text": "event time"}},
                                   yaxis={"title": {"text": "members"}}))


def model_figures(model: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """ROC and PR curves, and the progressive ROC AUC and log loss over examples, per task."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    out = []
    curves = make_subplots(rows=1, cols=2, subplot_titles=("ROC", "Precision-recall"))
    prog = make_subplots(rows=1, cols=2, subplot_titles=("ROC AUC of the first n examples",
                                                         "log loss of the first n examples"))
    notes = []
    drawn = 0
    for task in ("intent", "churn"):
        d = model.get(task)
        if not d or not d.get("y"):
            notes.append(f"{task}: no labeled examples")
            continue
        y, p = d["y"], d["p"]
        pos = sum(bool(v) for v in y)
        try:
            roc, pr = roc_curve(y, p), pr_curve(y, p)
        except ValueError:
            notes.append(f"{task}: {len(y)} examples, {pos} positive: one class only, no curve")
        else:
            curves.add_trace(go.Scatter(name=f"{task} ROC AUC {roc['auc']:.3f}", x=roc["fpr"], y=roc["tpr"],
                                        mode="lines", line={"shape": "hv"}), row=1, col=1)
            curves.add_trace(go.Scatter(name=f"{task} PR AUC (AP) {pr['auc']:.3f}", x=pr["recall"],
                                        y=pr["precision"], mode="lines", line={"shape": "vh"}), row=1, col=2)
            notes.append(f"{task}: {len(y)} examples, {pos} positive, ROC AUC {roc['auc']:.3f}, "
                         f"average precision {pr['auc']:.3f}")
            drawn += 1
        pg = progressive(y, p)
        prog.add_trace(go.Scatter(name=f"{task} ROC AUC", x=pg["n"], y=pg["roc_auc"], mode="lines"), row=1, col=1)
        prog.add_trace(go.Scatter(name=f"{task} log loss", x=pg["n"], y=pg["log_loss"], mode="lines"), row=1, col=2)
    curves.add_trace(go.Scatter(name="chance", x=[0, 1], y=[0, 1], mode="lines",
                                line={"dash": "dot", "color": "#999"}), row=1, col=1)
    curves.update_layout(**_layout("Intent and churn models: ROC and precision-recall (progressive scores)"))
    curves.update_xaxes(title_text="false positive rate", row=1, col=1)
    curves.update_yaxes(title_text="true positive rate", row=1, col=1)
    curves.update_xaxes(title_text="recall", row=1, col=2)
    curves.update_yaxes(title_text="precision", row=1, col=2)
    prog.update_layout(**_layout("Progressive validation over examples (score first, then learn)"))
    prog.update_xaxes(title_text="examples")
    note = "; ".join(notes) + (". " if notes else "")
    out.append(("model-curves", orjson.loads(curves.to_json()),
                note + "Each example was scored by the model before it learned it (progressive validation), "
                "replayed in training-topic order as the trainer learns them."))
    out.append(("model-progressive", orjson.loads(prog.to_json()),
                "The metrics of the first n examples as n grows: how the online model improved as labels arrived."))
    return out


def experiment_figure(exp: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Conversion rate per arm, and each arm's difference in conversion rate from the baseline
    with its interval (the two-proportion Wald interval of the analysis; the relative lift, when
    the baseline converted at all, is in the point's label)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    arms = exp["arms"]
    base = exp["baseline"]
    level = round(100 * (1 - float(exp.get("alpha", 0.05))))
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "conversion rate per arm (converters/users)",
        f"difference from {base}, {level}% interval"))
    fig.add_trace(go.Bar(name="conversion rate", x=[a["variant"] for a in arms],
                         y=[a["conversion_rate"] for a in arms],
                         text=[f"{a['converters']}/{a['users']}" for a in arms], textposition="outside"),
                  row=1, col=1)
    cmp = [a for a in arms if a.get("vs_baseline") and a["vs_baseline"].get("diff") is not None]
    diff = [a["vs_baseline"]["diff"] for a in cmp]
    ci = [a["vs_baseline"].get("diff_ci") or [d, d] for a, d in zip(cmp, diff, strict=True)]
    labels = [("lift undefined" if a["vs_baseline"].get("lift") is None
               else f"lift {100 * a['vs_baseline']['lift']:+.1f}%") for a in cmp]
    fig.add_trace(go.Scatter(name="difference", x=diff, y=[a["variant"] for a in cmp], mode="markers+text",
                             marker={"size": 12}, text=labels, textposition="top center",
                             error_x={"type": "data", "symmetric": False,
                                      "array": [c[1] - d for c, d in zip(ci, diff, strict=True)],
                                      "arrayminus": [d - c[0] for c, d in zip(ci, diff, strict=True)]}),
                  row=1, col=2)
    fig.add_vline(x=0, line={"dash": "dot", "color": "#999"}, row=1, col=2)
    srm = exp.get("srm")
    srm_text = "no shares recorded" if not srm else (
        f"SRM p = {srm['p_value']:.3g}" + (" — MISMATCH, do not trust the comparison" if srm["mismatch"] else " (ok)"))
    fig.update_layout(**_layout(f"Experiment {exp['experiment']}", showlegend=False))
    fig.update_yaxes(tickformat=".1%", row=1, col=1)
    fig.update_xaxes(tickformat="+.1%", row=1, col=2)
    parts = []
    for a, lab in zip(cmp, labels, strict=True):
        vs = a["vs_baseline"]
        lo, hi = vs.get("diff_ci") or [None, None]
        interval = "" if lo is None else f" [{100 * lo:+.2f}, {100 * hi:+.2f}] pp"
        parts.append(f"{a['variant']}: {100 * vs['diff']:+.2f} pp{interval}, {lab}, "
                     f"p(z) {vs.get('p_value_z', float('nan')):.3g}, "
                     f"P(beats {base}) {vs.get('p_beats_baseline', float('nan')):.2f}, "
                     f"always-valid p {vs.get('p_value_always_valid', float('nan')):.3g}")
    note = f"Baseline {base}; {srm_text}. " + "; ".join(parts)
    return orjson.loads(fig.to_json()), note


def cohort_figure(cohorts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Heatmap: share of each first-seen-week cohort active in week k."""
    import plotly.graph_objects as go

    weeks = max((len(c["retention"]) for c in cohorts), default=0)
    z = [[c["retention"][k] if k < len(c["retention"]) else None for k in range(weeks)] for c in cohorts]
    text = [[("" if v is None else f"{100 * v:.0f}% ({c['active'][k]})") for k, v in enumerate(row)]
            for c, row in zip(cohorts, z, strict=True)]
    y = [f"{c['cohort']} ({c['users']} users)" for c in cohorts]
    return _figure([go.Heatmap(z=z, x=[f"week {k}" for k in range(weeks)], y=y, text=text,
                               texttemplate="%{text}", zmin=0, zmax=1, colorscale="Blues",
                               colorbar={"title": {"text": "retained"}, "tickformat": ".0%"})],
                   _layout("Weekly cohort retention (cohort = week of the first event, UTC)",
                           yaxis={"autorange": "reversed"}, height=max(300, 120 + 40 * len(cohorts))))


def recs_figure(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Horizontal bars: the item pairs seen together in the most sessions / orders."""
    import plotly.graph_objects as go

    labels = [f"{p['a']} ↔ {p['b']}" for p in pairs]
    return _figure([go.Bar(name="viewed together (sessions)", y=labels, x=[p["sessions"] for p in pairs],
                           orientation="h"),
                    go.Bar(name="bought together (orders)", y=labels, x=[p["baskets"] for p in pairs],
                           orientation="h")],
                   _layout("Top recommendation pairs (item-to-item co-occurrence)", barmode="group",
                           yaxis={"autorange": "reversed", "type": "category"},
                           height=max(320, 110 + 28 * len(pairs))))


# ------------------------------------------------------------------------------ page
def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str = ",.2f") -> str:
    return "–" if v is None else format(v, fmt)


def kpis(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(label, value, definition) of the key business metrics."""
    rows = [("sessions", _num(metrics.get("sessions"), ",d"), "session windows (30 min gap, event time)"),
            ("conversion rate", _pct(metrics.get("conversion_rate")), "sessions with a purchase / sessions"),
            ("avg session duration", "–" if metrics.get("avg_session_duration_s") is None
             else f"{metrics['avg_session_duration_s']:.0f} s", "first to last event of a session"),
            ("engagement rate", _pct(metrics.get("engagement_rate")),
             "engaged sessions (>= 10 s, a purchase or >= 2 views; GA4) / sessions"),
            ("customers", _num(metrics.get("customers"), ",d"), "users with a purchase"),
            ("revenue", _num(metrics.get("revenue")), "sum of purchase revenue"),
            ("customer lifetime value", _num(metrics.get("clv")), "historical: revenue / customers")]
    for e in metrics.get("experiments") or []:
        if e.get("lift") is not None:
            rows.append((f"lift {e['experiment']}/{e['variant']}", f"{100 * e['lift']:+.1f}%",
                         "arm's conversion rate / holdout's − 1 (stream counters)"))
    return rows


def _json_script(fig_id: str, fig: Mapping[str, Any]) -> str:
    text = orjson.dumps(fig).decode()
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="fig-{fig_id}" class="figure-data">{text}</script>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#1f2d3d;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d3de;font-size:13px}main{padding:16px 32px;max-width:1320px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:6px;margin:14px 0;padding:12px 16px}
section h2{font-size:17px;margin:4px 0 6px}.note{font-size:13px;color:#555;margin:4px 0 8px}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px}
.kpi{border:1px solid #e3e6ea;border-radius:6px;padding:8px 10px}.kpi .v{font-size:22px;font-weight:600}
.kpi .l{font-size:13px;font-weight:600}.kpi .d{font-size:11px;color:#666}.missing{color:#888;font-style:italic}
"""

#: first script of the page: any JavaScript error is shown in a banner and kept in the
#: ``data-js-errors`` attribute of ``<html>`` (the browser test reads it)
CATCH = """
window.__errors = [];
function __report(msg) {
  window.__errors.push(String(msg));
  document.documentElement.setAttribute('data-js-errors', window.__errors.join(' | '));
  var b = document.getElementById('js-errors');
  if (b) { b.textContent = 'This page hit JavaScript errors: ' + window.__errors.join(' | '); b.hidden = false; }
}
window.addEventListener('error', function (e) { __report(e.message); });
window.addEventListener('unhandledrejection', function (e) { __report(e.reason); });
"""

#: last script: draw every figure from its JSON; a drawn plot's div gets ``data-rendered="1"``
BOOT = """
document.querySelectorAll('script.figure-data').forEach(function (el) {
  var div = document.getElementById(el.id.replace(/^fig-/, 'plot-'));
  try {
    var spec = JSON.parse(el.textContent);
    Plotly.newPlot(div, spec.data, spec.layout, {responsive: true, displaylogo: false})
      .then(function () { div.setAttribute('data-rendered', '1'); })
      .catch(function (err) { __report(el.id + ': ' + err); });
  } catch (err) { __report(el.id + ': ' + err); }
});
if (window.__errors.length) { __report(window.__errors.pop()); }
"""


def render(run: Mapping[str, Any], title: str = "clickpulse run report") -> str:
    """The HTML page of a run (:func:`clickpulse.report.run.load_run`'s plain data)."""
    from plotly.offline import get_plotlyjs

    sections: list[str] = []

    def section(heading: str, fig_id: str | None, fig: Mapping[str, Any] | None, note: str) -> None:
        body = f'<div id="plot-{fig_id}" class="plot"></div>{_json_script(fig_id, fig)}' if fig_id and fig else ""
        sections.append(f"<section><h2>{html.escape(heading)}</h2><p class=\"note\">{html.escape(note)}</p>"
                        f"{body}</section>")

    def missing(heading: str, what: str) -> None:
        sections.append(f"<section><h2>{html.escape(heading)}</h2><p class=\"missing\">{html.escape(what)}</p>"
                        "</section>")

    metrics = run.get("metrics")
    if metrics:
        cards = "".join(f'<div class="kpi"><div class="l">{html.escape(k)}</div><div class="v">{html.escape(v)}'
                        f'</div><div class="d">{html.escape(d)}</div></div>' for k, v, d in kpis(metrics))
        span = ""
        if metrics.get("first_event_ms") is not None:
            span = f"Events from {iso(metrics['first_event_ms'])} to {iso(metrics['last_event_ms'])} UTC. "
        sections.append(f'<section><h2>Business metrics</h2><p class="note">{html.escape(span)}Computed in the '
                        f'stream by the worker (docs/report.md has the definitions and sources).</p>'
                        f'<div class="kpis">{cards}</div></section>')
    else:
        missing("Business metrics", "no metrics.json in this run")
    actions = run.get("actions")
    if actions:
        fig, note = actions_figure(actions)
        section("Actions over event time", "actions", fig, note)
    else:
        missing("Actions over event time", "no actions in this run")
    if metrics and metrics.get("funnel"):
        section("Purchase funnel", "funnel", funnel_figure(metrics["funnel"]),
                "Sessions with an event of each step's type (an open funnel: a session may enter at any step; "
                "datasets without checkout events show 0 there).")
    else:
        missing("Purchase funnel", "no funnel in metrics.json")
    if run.get("segments"):
        section("Segment sizes over time", "segments", segments_figure(run["segments"]),
                "Members of each segment over event time: entries minus exits up to each moment (all workers' changes).")
    else:
        missing("Segment sizes over time", "no segment changes in this run")
    model = run.get("model")
    if model and any((model.get(t) or {}).get("y") for t in ("intent", "churn")):
        for fig_id, fig, note in model_figures(model):
            section("Models: ROC and precision-recall" if fig_id == "model-curves"
                    else "Models: progressive metrics over examples", fig_id, fig, note)
    else:
        missing("Models", "no labeled model examples in this run")
    exps = run.get("experiments")
    if exps:
        for i, exp in enumerate(exps):
            fig, note = experiment_figure(exp)
            section(f"Experiment {exp['experiment']}", f"experiment-{i}", fig, note)
    else:
        missing("Experiments", "no experiment records in this run")
    if metrics and metrics.get("cohorts"):
        section("Weekly cohort retention", "cohorts", cohort_figure(metrics["cohorts"]),
                "Share of the users first seen in a week who had an event k weeks later; cells the stream has "
                "not reached yet are empty. Per cohort lifetime value: " + "; ".join(
                    f"{c['cohort']} {_num(c.get('clv_per_user'))} per user, {_num(c.get('clv_per_customer'))} "
                    f"per customer" for c in metrics["cohorts"]) + ".")
    else:
        missing("Weekly cohort retention", "no cohorts in metrics.json")
    recs = run.get("recs")
    if recs and recs.get("pairs"):
        section("Top recommendation pairs", "recs", recs_figure(recs["pairs"]),
                "Item pairs seen together in the most sessions (and orders) by the streaming co-occurrence model.")
    else:
        missing("Top recommendation pairs", "no recommendation pairs in this run")
    generated = datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style><script>{CATCH}</script>"
            f"<script>{get_plotlyjs()}</script></head><body>"
            '<div id="js-errors" class="missing" hidden style="background:#fee;padding:8px 32px"></div>'
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(str(run.get('dir') or ''))} · generated "
            f"{generated}</p></header><main>{''.join(sections)}</main><script>{BOOT}</script></body></html>")


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    """Read a run directory and write its report; returns the output path."""
    from .run import load_run

    p = Path(out)
    p.write_text(render(load_run(run_dir)), encoding="utf-8")
    return p
