"""The alert rules (deploy/prometheus/alerts.yml) against their promtool unit tests.

promtool comes with Debian's ``prometheus`` package (.ci/run installs it); these tests never skip:
without promtool they fail and say how to install it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install -y prometheus); "
                    ".ci/run does it")
    return path


def run(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_are_valid() -> None:
    res = run("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass() -> None:
    res = run("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= {"ClickpulseConsumerLagGrowing", "ClickpulseDeadLetterRateHigh", "ClickpulseNoActions",
                      "ClickpulseModelRocAucDrop", "ClickpulseRedisErrors", "ClickpulseDependencyDown"}
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fired == alerts, f"alerts never shown firing: {alerts - fired}"
    assert silent == alerts, f"alerts never shown silent: {alerts - silent}"
    for r in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


@pytest.mark.parametrize(("old", "new"), [
    ("> 0.05", "> 0.5"),                     # dead-letter threshold too high: the 10 % case no longer fires
    ("delta(clickpulse:consumer_lag_messages:sum_by_topic[15m]) > 0",
     "delta(clickpulse:consumer_lag_messages:sum_by_topic[15m]) >= 0"),  # a steady backlog would fire
    ("(sum(increase(clickpulse_actions_total[30m])) or vector(0)) == 0",
     "sum(increase(clickpulse_actions_total[30m])) == 0"),  # misses a worker that never acted
])
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, old: str, new: str) -> None:
    """The promtool tests fail when a rule is changed in a way that matters (they can fail)."""
    text = (PROM / "alerts.yml").read_text()
    assert text.count(old) == 1, old
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    res = run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert res.returncode != 0, f"promtool tests still pass with {new!r}:\n{res.stdout}"


def test_prometheus_configs_load_the_rules() -> None:
    """The local config is valid with its rule file; the compose config names the file where
    docker-compose mounts alerts.yml."""
    res = run("check", "config", "prometheus-local.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "alerts.yml" in res.stdout + res.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    [rule_file] = cfg["rule_files"]
    assert f"./deploy/prometheus/alerts.yml:{rule_file}:ro" in compose["services"]["prometheus"]["volumes"]
