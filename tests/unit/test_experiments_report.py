"""The report over records produced by the engine: aggregation (de-duplication, first exposure
only, malformed records), the analysis against a simulated effect of known size, the CLI table
and JSON, and the Prometheus gauges (no user in any label)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import orjson
import pytest

from clickpulse.cli import main
from clickpulse.experiments.report import aggregate, analyze, format_table, set_gauges
from clickpulse.observability.metrics import ExperimentGauges
from clickpulse.rules.ruleset import parse_rules
from clickpulse.testing import event, memory_engine, ms

RULES = """
version: "report-test"
triggers:
  - name: welcome
    on: product_view
    when: 'count.product_view["7d"] == 1'
    action: {type: welcome_offer, payload: {offer: '"NONE"'}}
    experiment:
      name: welcome_offer
      holdout: 0.5
      window_s: 3600
      variants:
        - {name: treatment, weight: 1, offer: '"SAVE10"'}
"""
T0 = ms("2019-10-01T10:00:00Z")


def simulate(n_users: int = 4000, seed: int = 9) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Each user views a product (exposed); converts within the hour with probability 10%
    (holdout) or 15% (treatment), and some buy again after the window (never counted)."""
    rng = random.Random(seed)
    eng = memory_engine(rules=parse_rules(RULES))
    records: list[dict] = []
    truth: dict[str, dict[str, int]] = {}
    events = [event("product_view", f"u{i}", T0 + i * 10, product_id="p") for i in range(n_users)]
    for i in range(0, len(events), 500):
        em = eng.step([(0, e) for e in events[i:i + 500]], T0)
        eng.commit(em)
        records += em.experiments
    arms = {r["user_key"]: r["variant"] for r in records}
    buys = []
    for i in range(n_users):
        u = f"u{i}"
        t = truth.setdefault(arms[u], {"users": 0, "converters": 0})
        t["users"] += 1
        if rng.random() < (0.15 if arms[u] == "treatment" else 0.10):
            t["converters"] += 1
            buys.append(event("purchase", u, T0 + i * 10 + 1_800_000, revenue=20.0))
        if rng.random() < 0.3:  # after the window: not attributed
            buys.append(event("purchase", u, T0 + i * 10 + 3_600_000, revenue=99.0))
    for i in range(0, len(buys), 500):
        em = eng.step([(0, e) for e in buys[i:i + 500]], T0)
        eng.commit(em)
        records += em.experiments
    return records, truth


@pytest.fixture(scope="module")
def simulated() -> tuple[list[dict], dict[str, dict[str, int]]]:
    return simulate()


def test_analysis_of_a_known_effect(simulated) -> None:
    records, truth = simulated
    data, bad = aggregate(records + records[:100] + [{"kind": "exposure"}, {"record_id": 3}])  # duplicates, junk
    assert bad == 2
    res = analyze(data)
    (r,) = res
    assert r["baseline"] == "holdout" and not r["srm"]["mismatch"]
    arms = {a["variant"]: a for a in r["arms"]}
    for arm, t in truth.items():
        assert (arms[arm]["users"], arms[arm]["converters"]) == (t["users"], t["converters"])
        assert arms[arm]["revenue"] == pytest.approx(20.0 * t["converters"])  # the 99.0 buys are after the window
    vs = arms["treatment"]["vs_baseline"]
    true_diff = truth["treatment"]["converters"] / truth["treatment"]["users"] \
        - truth["holdout"]["converters"] / truth["holdout"]["users"]
    assert vs["diff"] == pytest.approx(true_diff)
    assert vs["diff_ci"][0] < 0.05 < vs["diff_ci"][1]  # the simulated 5-point effect is inside the interval
    assert vs["p_value_z"] < 0.001 and vs["p_value_welch"] < 0.001 and vs["p_beats_baseline"] > 0.999
    assert vs["p_value_always_valid"] < 0.05
    seq = r["sequential"]["arms"]["treatment"]["p_always_valid"]
    assert all(a >= b for a, b in zip(seq, seq[1:]))  # the always-valid p never goes up
    assert "MISMATCH" not in format_table(res)


def test_first_exposure_only(simulated) -> None:
    records, _ = simulated
    exp = next(r for r in records if r["kind"] == "exposure")
    again = {**exp, "record_id": "00000000-0000-5000-8000-000000000000", "event_time_ms": exp["event_time_ms"] + 10**9,
             "exposure_time_ms": exp["exposure_time_ms"] + 10**9,
             "variant": "treatment" if exp["variant"] == "holdout" else "holdout"}
    conv = {**again, "record_id": "00000000-0000-5000-8000-000000000001", "kind": "conversion", "revenue": 5.0}
    base, _ = aggregate(records)
    data, _ = aggregate(records + [again, conv])
    count = {arm: len(a.exposed) for arm, a in data["welcome_offer"].arms.items()}
    assert count == {arm: len(a.exposed) for arm, a in base["welcome_offer"].arms.items()}
    assert sum(len(a.conversions) for a in data["welcome_offer"].arms.values()) == \
        sum(len(a.conversions) for a in base["welcome_offer"].arms.values())


def test_srm_shows_in_the_report(simulated) -> None:
    records, _ = simulated
    # lose 15% of the treatment's exposures (e.g. a variant that crashes before logging)
    dropped = [r for r in records if not (r["kind"] == "exposure" and r["variant"] == "treatment"
                                          and int(r["user_key"][1:]) % 7 == 0)]
    (r,) = analyze(aggregate(dropped)[0])
    assert r["srm"]["mismatch"] and r["srm"]["p_value"] < 0.001
    assert "MISMATCH" in format_table([r])


def test_cli_table_json_and_gauges(simulated, tmp_path: Path, capsys) -> None:
    records, truth = simulated
    f = tmp_path / "experiments.jsonl"
    f.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    prom = tmp_path / "experiments.prom"
    assert main(["report", "experiments", "--file", str(f), "--textfile", str(prom)]) == 0
    out = capsys.readouterr().out
    assert "experiment welcome_offer  (baseline holdout; SRM" in out and "treatment" in out
    assert main(["report", "experiments", "--file", str(f), "--json"]) == 0
    js = orjson.loads(capsys.readouterr().out)
    assert js[0]["arms"][0]["users"] == truth["holdout"]["users"]
    text = prom.read_text()
    assert 'clickpulse_experiment_stat{experiment="welcome_offer",statistic="users",variant="treatment"} ' \
           f'{float(truth["treatment"]["users"])}' in text
    assert "clickpulse_experiment_srm_p_value" in text
    assert not re.search(r'"u\d+"', text)  # no user key in any label
    g = ExperimentGauges()
    set_gauges(g, js)
    assert g.experiment_stat.labels("welcome_offer", "treatment", "p_value_z")._value.get() < 0.001


def _exposures(counts: dict[str, int], shares: dict[str, float | None], exp: str = "x") -> list[dict]:
    out = []
    for arm, n in counts.items():
        for i in range(n):
            out.append({"record_id": f"{arm}-{i}", "kind": "exposure", "experiment": exp, "variant": arm,
                        "user_key": f"{arm}{i}", "exposure_time_ms": T0 + i, "event_time_ms": T0 + i,
                        "share": shares[arm]})
    return out


def test_srm_counts_an_arm_without_any_user() -> None:
    # 1,000 exposures over chat/chat_discount (0.4 each), none in the holdout (0.2): a mismatch
    recs = _exposures({"chat": 500, "chat_discount": 500}, {"chat": 0.4, "chat_discount": 0.4})
    (r,) = analyze(aggregate(recs)[0])
    assert r["srm"]["mismatch"] and r["srm"]["p_value"] < 1e-20
    assert r["srm"]["expected"]["(unobserved arms)"] == pytest.approx(200)
    assert "MISMATCH" in format_table([r]) and "0 users in (unobserved arms)" in format_table([r])
    # with the rules' shares the missing arm is named
    (r,) = analyze(aggregate(recs)[0], declared={"x": {"holdout": 0.2, "chat": 0.4, "chat_discount": 0.4}})
    assert r["srm"]["observed"]["holdout"] == 0 and r["srm"]["expected"]["holdout"] == pytest.approx(200)
    assert r["srm"]["unobserved"] == ["holdout"] and r["srm"]["mismatch"]
    # all arms observed in proportion: no mismatch, nothing unobserved
    ok = _exposures({"chat": 400, "chat_discount": 400, "holdout": 200},
                    {"chat": 0.4, "chat_discount": 0.4, "holdout": 0.2})
    (r,) = analyze(aggregate(ok)[0])
    assert not r["srm"]["mismatch"] and r["srm"]["unobserved"] == []


def test_srm_with_one_observed_arm_uses_its_recorded_share() -> None:
    (r,) = analyze(aggregate(_exposures({"chat": 300}, {"chat": 0.4}))[0])
    assert r["srm"] is not None and r["srm"]["mismatch"]
    assert "no shares recorded" not in format_table([r])
    # records without a share and no rules: unknown
    (r,) = analyze(aggregate(_exposures({"chat": 300}, {"chat": None}))[0])
    assert r["srm"] is None
    # ... the rules' shares then stand in
    (r,) = analyze(aggregate(_exposures({"chat": 300}, {"chat": None}))[0], declared={"x": {"chat": 0.5, "b": 0.5}})
    assert r["srm"]["mismatch"] and r["srm"]["unobserved"] == ["b"]


def test_cli_refuses_a_file_that_is_not_experiment_records(tmp_path: Path, capsys) -> None:
    f = tmp_path / "README.md"
    f.write_text("# clickpulse\n\nsome text\n")
    assert main(["report", "experiments", "--file", str(f)]) == 2
    err = capsys.readouterr().err
    assert "not a JSONL file of experiment records: line 1" in err and err.count("\n") == 1
    f.write_text('{"kind": "exposure"}\n[1, 2]\n')
    assert main(["report", "experiments", "--file", str(f)]) == 2
    assert "line 2 is a JSON list" in capsys.readouterr().err
