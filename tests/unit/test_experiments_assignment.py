"""Assignment: deterministic, sticky, balanced to the configured shares (chi-square over 100,000
ids), independent across salts; and the SRM check on real assignments."""

from __future__ import annotations

from collections import Counter

from scipy import stats as sps

from clickpulse.experiments.assignment import HOLDOUT, Experiment, Variant, unit_hash
from clickpulse.experiments.stats import srm_check

N = 100_000
EXP = Experiment("e1", "salt-1", (Variant("control", 1.0), Variant("a", 1.0), Variant("b", 2.0)), holdout=0.1)
IDS = [f"user-{i}" for i in range(N)]


def test_assignment_is_deterministic_and_sticky() -> None:
    first = [EXP.assign(u) for u in IDS[:2000]]
    again = [Experiment("e1", "salt-1", EXP.variants, holdout=0.1).assign(u) for u in IDS[:2000]]
    assert first == again
    # renaming the experiment but keeping salt and weights keeps every user's arm
    assert first == [Experiment("renamed", "salt-1", EXP.variants, holdout=0.1).assign(u) for u in IDS[:2000]]


def test_assignment_matches_the_configured_shares() -> None:
    counts = Counter(EXP.assign(u) for u in IDS)
    shares = EXP.expected_shares()
    assert shares == {HOLDOUT: 0.1, "control": 0.225, "a": 0.225, "b": 0.45}
    arms = list(shares)
    chi2, p = sps.chisquare([counts[a] for a in arms], [N * shares[a] for a in arms])
    # a fair assignment fails this 1 time in 1000: a real test of the hash and the weights
    assert p > 0.001, (counts, chi2, p)
    assert srm_check(counts, shares).mismatch is False


def test_unit_hash_is_uniform_and_salts_are_independent() -> None:
    u = [unit_hash("s", k) for k in IDS]
    bins = Counter(int(x * 20) for x in u)
    assert sps.chisquare([bins[i] for i in range(20)]).pvalue > 0.001
    # two experiments with different salts: the arms of one say nothing about the other
    other = Experiment("e2", "salt-2", (Variant("x", 1.0), Variant("y", 1.0)))
    table = Counter((EXP.assign(k), other.assign(k)) for k in IDS)
    arms1, arms2 = sorted({a for a, _ in table}), sorted({b for _, b in table})
    res = sps.chi2_contingency([[table[(a, b)] for b in arms2] for a in arms1])
    assert res.pvalue > 0.001


def test_a_broken_assignment_is_caught() -> None:
    """The same chi-square rejects a biased split: the balance test above can fail."""
    counts = Counter(EXP.assign(u) for u in IDS)
    counts["b"] = int(counts["b"] * 0.97)  # 3% of one arm lost (e.g. a crashing variant)
    r = srm_check(counts, EXP.expected_shares())
    assert r.mismatch and r.p_value < 0.001
