"""The Grafana dashboard (deploy/grafana/dashboards/clickpulse.json) and its provisioning.

Grafana is not installable here: the JSON structure is checked against what Grafana's file
provisioning needs, and every panel query is parsed by a real Prometheus (Debian's binary,
no targets). That the queries return data from a real worker is
tests/integration/test_observability.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from clickpulse.errors import ServiceError
from clickpulse.observability.prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "clickpulse.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

#: Grafana's interval variable, as Grafana would fill it for a 1 s scrape interval in the tests
#: (``$__rate_interval`` = max(4 x scrape interval, step + scrape interval))
RATE_INTERVAL = "15s"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panel_queries(dash: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """``(panel title, refId, PromQL with Grafana's variables filled in)`` for every target."""
    out = []
    for p in (dash or dashboard())["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["refId"], t["expr"].replace("$__rate_interval", RATE_INTERVAL)))
    return out


def test_structure() -> None:
    d = dashboard()
    assert d["uid"] == "clickpulse" and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):  # panels do not overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        assert p.get("description"), f"panel {p['title']!r} has no description"
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
            # only Grafana's built-in interval variable: the dashboard has no template variables
            assert set(re.findall(r"\$\{?(\w+)", t["expr"])) <= {"__rate_interval"}, t["expr"]


def test_covers_the_issue_list() -> None:
    """Throughput, consumer lag, produce -> action latency, dead-letter rate by reason, actions
    by type, rule decisions, model metrics, segment sizes, Redis errors."""
    exprs = "\n".join(e for _p, _r, e in panel_queries())
    for needle in ("clickpulse_events_processed_total", "clickpulse_consumer_lag_messages",
                   "clickpulse_action_latency_seconds_bucket", "sum by (reason) (rate(clickpulse_events_invalid_total",
                   "sum by (type) (rate(clickpulse_actions_total", "clickpulse_rule_decisions_total",
                   "clickpulse_model_metric", "clickpulse_segment_members", "clickpulse_redis_errors_total"):
        assert needle in exprs, needle
    for _p, _r, e in panel_queries():  # never a per-user label (there is none to group by)
        assert "user" not in re.sub(r"clickpulse_users_\w+", "", e), e


def test_provisioning_names_the_dashboard_datasource() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    [prom] = ds["datasources"]
    assert prom["uid"] == "prometheus" and prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "clickpulse.yml").read_text())
    [provider] = prov["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_every_query_parses_in_prometheus(tmp_path: Path) -> None:
    """A real Prometheus parses each query (a syntax error is an HTTP 400 with its message)."""
    prom = PrometheusServer(tmp_path / "prom").start()
    try:
        bad = []
        for title, ref, expr in panel_queries():
            try:
                prom.api("query", query=expr)
            except ServiceError as err:
                bad.append(f"{title} [{ref}]: {err}")
        assert not bad, "\n".join(bad)
        with pytest.raises(ServiceError, match="parse error"):  # the check can fail
            prom.api("query", query="sum(rate(clickpulse_actions_total[1m])")
    finally:
        prom.stop()
