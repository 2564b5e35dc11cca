"""The report in a real headless browser (Debian's chromium), and the business metrics of a real
worker: the REES46 sample through the broker, the worker's ``/business`` and
``clickpulse_business_*`` gauges against the in-memory stream computation, then the report of
that run loaded in chromium: every figure drawn (Plotly's SVG in each plot), no JavaScript
error."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.ingest.replay import messages, publish
from clickpulse.metrics.business import BusinessMetrics, from_prometheus, user_view
from clickpulse.report.html import render
from clickpulse.report.run import load_run
from clickpulse.runtime import read_topic, wait_caught_up
from clickpulse.testing import memory_engine
from tests.unit.test_report import figures, write_run

pytestmark = pytest.mark.integration


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def dump_dom(page: Path, tmp: Path) -> str:
    """The DOM after the page's scripts ran, from headless chromium (no network: the page must
    be self-contained). Retried once: a loaded machine can starve the first start."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=20000",
           "--run-all-compositor-stages-before-draw", "--dump-dom", page.resolve().as_uri()]
    last = None
    for _ in range(2):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if res.returncode == 0 and "</html>" in res.stdout:
            return res.stdout
        last = res
    raise AssertionError(f"chromium failed ({last.returncode}): {last.stderr[-2000:]}")


def assert_drawn(dom: str, ids: set[str]) -> None:
    head = dom[:dom.index("<head")] if "<head" in dom else dom[:500]
    errors = re.search(r'data-js-errors="([^"]*)"', head)
    assert errors is None, f"JavaScript errors: {errors.group(1) if errors else ''}"
    for fig_id in ids:
        m = re.search(rf'<div id="plot-{re.escape(fig_id)}"[^>]*>', dom)
        assert m is not None, f"no plot div {fig_id}"
        assert 'data-rendered="1"' in m.group(0), f"plot {fig_id} was not drawn: {m.group(0)}"
        start = m.end()
        nxt = dom.find('<div id="plot-', start)
        chunk = dom[start:nxt if nxt > 0 else len(dom)]
        assert 'class="main-svg"' in chunk, f"plot {fig_id} has no SVG"
    assert dom.count('class="main-svg"') >= len(ids)


def test_fixture_report_renders_in_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(load_run(write_run(tmp_path / "run"))), encoding="utf-8")
    ids = set(figures(page.read_text()))
    assert len(ids) == 8
    dom = dump_dom(page, tmp_path)
    assert_drawn(dom, ids)
    assert "gtitle" in dom and "Purchase funnel" in dom  # plotly drew the titles


def test_a_broken_figure_is_reported(tmp_path):
    """The test above can fail: a figure whose data makes Plotly throw shows up as an error."""
    html = render(load_run(write_run(tmp_path / "run")))
    html = html.replace("Plotly.newPlot(div,", "Plotly.newPlot(null,", 1)
    page = tmp_path / "broken.html"
    page.write_text(html, encoding="utf-8")
    dom = dump_dom(page, tmp_path)
    assert "data-js-errors" in dom and "This page hit JavaScript errors" in dom


def rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.9g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def test_worker_business_metrics_and_its_report(make_settings, workers, tmp_path):
    s = make_settings(time_mode="replay")
    w = workers(s)
    asyncio.run(publish(s.kafka_bootstrap, s.topic_raw, messages("rees46", BUNDLED_SAMPLE)))
    wait_caught_up(w, s)
    business = orjson.loads(w.get("/business"))
    # the same events in memory (the murmur2 partitions do not change any of these figures)
    eng = memory_engine()
    eng.observe_user = user_view
    bm = BusinessMetrics()
    for raw in read_rees46(BUNDLED_SAMPLE):
        em = eng.step([(0, parse(orjson.dumps(raw), None))], 0)
        eng.commit(em)
        bm.observe_emitted(em)
    expected = orjson.loads(orjson.dumps(bm.snapshot()))
    assert rounded(business) == rounded(expected)  # floats summed in another order: equal to 9 digits
    assert business["sessions"] == 1753
    scraped = from_prometheus(w.metrics())
    assert scraped["sessions"] == 1753 and scraped["conversion_rate"] == pytest.approx(expected["conversion_rate"])
    assert scraped["engagement_rate"] == pytest.approx(expected["engagement_rate"])
    assert scraped["clv"] == pytest.approx(expected["clv"])
    assert scraped["cohorts"]["2019-09-30"]["retention"] == {0: 1.0}
    assert {k: int(v) for k, v in scraped["funnel"].items()} == {f["step"]: f["sessions"] for f in expected["funnel"]}

    # the recommendation model's top pairs: the worker's equal the in-memory engine's (the top
    # of the ranking is far from the neighbour bound, so the interleaving of partitions cannot move it)
    recs = orjson.loads(w.get("/recs"))
    assert len(recs["pairs"]) == 20 and recs["stats"]["items"] > 0
    top = [[a, b, n, k] for a, b, n, k in eng.recs.top_pairs(5)]
    assert [[p["a"], p["b"], p["sessions"], p["baskets"]] for p in recs["pairs"][:5]] == top

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_bytes(orjson.dumps(business))
    (run / "recs.json").write_bytes(orjson.dumps(recs))
    actions = asyncio.run(read_topic(s.kafka_bootstrap, s.topic_actions))
    (run / "actions.jsonl").write_bytes(b"".join(v + b"\n" for _k, v, _m in actions))
    page = tmp_path / "report.html"
    page.write_text(render(load_run(run)), encoding="utf-8")
    figs = figures(page.read_text())
    assert set(figs) == {"actions", "funnel", "cohorts", "recs"}
    assert figs["recs"]["data"][0]["x"] == [p["sessions"] for p in recs["pairs"]]
    assert sum(sum(t["y"]) for t in figs["actions"]["data"]) == len(actions) > 0
    assert_drawn(dump_dom(page, tmp_path), set(figs))
