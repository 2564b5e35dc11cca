"""The default rules' example experiment (browse_abandonment, docs/experiments.md) through the
real broker: REES46 replayed with --flush; every assistance_offer carries its deterministic arm,
the holdout is flagged deliver: false, one exposure record per exposed user on
<ns>.experiments (schema-checked), conversions inside the window only, and the report reads the
topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter

import pytest

from clickpulse.events.schemas import validation_errors
from clickpulse.experiments.assignment import HOLDOUT
from clickpulse.experiments.report import aggregate, analyze
from clickpulse.ingest.datasets import BUNDLED_SAMPLE
from clickpulse.ingest.replay import messages, publish
from clickpulse.runtime import wait_caught_up
from clickpulse.testing import default_rules
from tests.integration.conftest import topic_values

pytestmark = pytest.mark.integration


def test_example_experiment_on_rees46(make_settings, workers):
    s = make_settings(time_mode="replay")
    w = workers(s)
    asyncio.run(publish(s.kafka_bootstrap, s.topic_raw, messages("rees46", BUNDLED_SAMPLE), flush=True,
                        control_key=s.control_key))
    wait_caught_up(w, s)
    exp = default_rules().experiments["browse_assist"]
    offers = [a for a in topic_values(s, s.topic_actions) if a["type"] == "assistance_offer"]
    assert len(offers) == 1724  # the oracle's count (tests/oracle.py): the experiment changes no decision
    for a in offers:
        arm = exp.assign(a["user_key"])
        assert (a["experiment"], a["variant"], a["deliver"]) == ("browse_assist", arm, arm != HOLDOUT)
        assert a["payload"].get("offer") == ("SAVE5" if arm == "chat_discount" else None)
    records = topic_values(s, s.topic_experiments)
    for r in records:
        assert validation_errors("experiment", r) == []
    exposures = [r for r in records if r["kind"] == "exposure"]
    assert sorted(r["user_key"] for r in exposures) == sorted({a["user_key"] for a in offers})
    first = {}
    for a in sorted(offers, key=lambda a: a["event_time_ms"]):
        first.setdefault(a["user_key"], a["event_time_ms"])
    assert all(r["exposure_time_ms"] == first[r["user_key"]] for r in exposures)
    for r in records:
        if r["kind"] == "conversion":
            assert r["exposure_time_ms"] <= r["event_time_ms"] < r["exposure_time_ms"] + 86_400_000
    shares = Counter(r["variant"] for r in exposures)
    (res,) = analyze(aggregate(records)[0])
    assert {a["variant"]: a["users"] for a in res["arms"]} == dict(shares)
    assert res["srm"]["mismatch"] is False
    # the CLI reads the same from the topic
    out = subprocess.run([sys.executable, "-m", "clickpulse.cli", "report", "experiments"],
                         env={**os.environ, **s.env()}, capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"{len(records)} records from {s.topic_experiments}" in out and "baseline holdout" in out
