"""Statistics against published and hand-computed values, and their error rates by simulation:
a simulated A/A test whose false-positive rate is close to alpha, the mSPRT's type-I error under
continuous peeking (and naive peeking's, which is not), SRM on skewed and fair splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from clickpulse.experiments.stats import (always_valid_p, beta_binomial, prob_b_beats_a, srm_check, summary,
                                          two_proportion_ztest, welch_ttest)


def binomial_tolerance(p: float, n: int, k: float = 4.0) -> float:
    """k standard deviations of a rate estimated over n independent trials."""
    return k * math.sqrt(p * (1 - p) / n)


def test_ztest_published_and_hand_values() -> None:
    # statsmodels docs: proportions_ztest(np.array([5, 12]), np.array([83, 99])) -> p 0.159
    r = two_proportion_ztest(5, 83, 12, 99)
    assert r.p_value == pytest.approx(0.159, abs=5e-4)
    # by hand: pooled p = 17/182, se = sqrt(p(1-p)(1/83 + 1/99)), z = (5/83 - 12/99) / se
    p = 17 / 182
    z = (5 / 83 - 12 / 99) / math.sqrt(p * (1 - p) * (1 / 83 + 1 / 99))
    assert r.z == pytest.approx(z, rel=1e-9)
    # Wald interval of the difference: diff +- 1.959964 * sqrt(p1 q1 / n1 + p2 q2 / n2)
    se = math.sqrt((5 / 83) * (78 / 83) / 83 + (12 / 99) * (87 / 99) / 99)
    assert r.ci == pytest.approx((r.diff - 1.959964 * se, r.diff + 1.959964 * se), abs=1e-6)
    assert r.lift == pytest.approx((5 / 83 - 12 / 99) / (12 / 99))
    assert two_proportion_ztest(0, 10, 0, 10).p_value == 1.0
    with pytest.raises(ValueError):
        two_proportion_ztest(11, 10, 0, 10)


def test_welch_hand_values_and_statsmodels() -> None:
    r = welch_ttest(12.0, 9.0, 25, 10.0, 4.0, 20)
    se = math.sqrt(9 / 25 + 4 / 20)
    df = (9 / 25 + 4 / 20) ** 2 / ((9 / 25) ** 2 / 24 + (4 / 20) ** 2 / 19)
    assert r.t == pytest.approx(2 / se) and r.df == pytest.approx(df)
    assert (round(r.t, 4), round(df, 2)) == (2.6726, 41.78)
    # against statsmodels' CompareMeans on data
    rng = np.random.default_rng(7)
    a, b = rng.lognormal(1.0, 1.0, 300), rng.lognormal(1.1, 1.2, 250)
    (na, ma, va), (nb, mb, vb) = summary(a), summary(b)
    ours = welch_ttest(ma, va, na, mb, vb, nb)
    cm = CompareMeans(DescrStatsW(a), DescrStatsW(b))
    t, p, dof = cm.ttest_ind(usevar="unequal")
    assert (ours.t, ours.p_value, ours.df) == pytest.approx((t, p, dof), rel=1e-9)
    assert ours.ci == pytest.approx(cm.tconfint_diff(usevar="unequal"), rel=1e-9)


def test_beta_binomial_hand_values() -> None:
    # two uniform posteriors: P = 1/2, E[max(U1 - U2, 0)] = 1/6
    r = beta_binomial(0, 0, 0, 0, draws=400_000, seed=1)
    assert r.p_better == 0.5
    assert r.loss_t == pytest.approx(1 / 6, abs=2e-3) and r.loss_c == pytest.approx(1 / 6, abs=2e-3)
    # closed form vs Monte Carlo
    r = beta_binomial(120, 1000, 100, 1000, draws=400_000, seed=2)
    se = math.sqrt(r.p_better * (1 - r.p_better) / 400_000)
    assert abs(r.p_better - r.p_better_mc) < 5 * se
    assert 0.9 < r.p_better < 0.95  # z ~ 1.42 for these counts
    # Beta(2,1) vs Beta(1,1): P(B > A) with A ~ Beta(2,1) (density 2x), B uniform = 1/3
    assert prob_b_beats_a(2, 1, 1, 1) == pytest.approx(1 / 3)
    assert r.loss_t < r.loss_c


def test_srm_flags_a_skewed_split_and_not_a_fair_one() -> None:
    assert srm_check({"a": 5100, "b": 4900}, {"a": 1, "b": 1}).mismatch is False
    skewed = srm_check({"a": 5250, "b": 4750}, {"a": 1, "b": 1})
    assert skewed.chi2 == pytest.approx(25.0) and skewed.p_value < 1e-6 and skewed.mismatch
    rng = np.random.default_rng(3)
    fair = rng.multinomial(50_000, [0.1, 0.45, 0.45])
    assert not srm_check(dict(zip("hab", fair.tolist())), {"h": 0.1, "a": 0.45, "b": 0.45}).mismatch


def test_simulated_aa_false_positive_rate_is_alpha() -> None:
    """2,000 seeded A/A experiments (same 10% rate, 2,000 users per arm): the z-test rejects in
    about 5% of them (tolerance: 4 binomial standard deviations of 2,000 trials, +-0.019)."""
    rng = np.random.default_rng(11)
    sims, n, alpha = 2000, 2000, 0.05
    xt, xc = rng.binomial(n, 0.1, sims), rng.binomial(n, 0.1, sims)
    rejected = sum(two_proportion_ztest(int(a), n, int(b), n).p_value < alpha for a, b in zip(xt, xc))
    rate = rejected / sims
    assert abs(rate - alpha) < binomial_tolerance(alpha, sims), rate
    # Welch's t on revenue per user (zero-inflated lognormal, as revenue is)
    rng = np.random.default_rng(12)
    rejected = 0
    for _ in range(1000):
        t = rng.lognormal(3, 1, 1000) * (rng.random(1000) < 0.1)
        c = rng.lognormal(3, 1, 1000) * (rng.random(1000) < 0.1)
        (nt, mt, vt), (nc, mc, vc) = summary(t), summary(c)
        rejected += welch_ttest(mt, vt, nt, mc, vc, nc).p_value < alpha
    assert abs(rejected / 1000 - alpha) < binomial_tolerance(alpha, 1000), rejected


def test_msprt_type_one_error_under_continuous_peeking() -> None:
    """A/A with a look after every 100 users per arm up to 10,000 (100 looks), 2,000 seeded runs:
    the mSPRT's always-valid p-value crosses alpha in at most alpha of the runs (+ 4 binomial sd),
    while the naive z-test at every look crosses it far more often (what peeking does)."""
    rng = np.random.default_rng(5)
    sims, looks, step, p, alpha = 2000, 100, 100, 0.1, 0.05
    xt = rng.binomial(step, p, (sims, looks)).cumsum(axis=1)
    xc = rng.binomial(step, p, (sims, looks)).cumsum(axis=1)
    n = np.broadcast_to(np.arange(1, looks + 1) * step, (sims, looks))
    pv = always_valid_p(xt, n, xc, n, tau2=1e-4)
    msprt_rate = float((pv[:, -1] < alpha).mean())
    assert msprt_rate <= alpha + binomial_tolerance(alpha, sims), msprt_rate
    # naive peeking: reject at the first look where the z-test's p < alpha
    pooled = (xt + xc) / (2 * n)
    z = (xt - xc) / n / np.sqrt(pooled * (1 - pooled) * 2 / n)
    naive_rate = float((np.abs(z) > 1.959964).any(axis=1).mean())
    assert naive_rate > 3 * alpha, naive_rate
    # and it has power: a 2-point lift (12% vs 10%) is found in most runs by 10,000 users per arm
    xt1 = rng.binomial(step, 0.12, (500, looks)).cumsum(axis=1)
    xc1 = rng.binomial(step, 0.10, (500, looks)).cumsum(axis=1)
    n1 = np.broadcast_to(np.arange(1, looks + 1) * step, (500, looks))
    assert float((always_valid_p(xt1, n1, xc1, n1)[:, -1] < alpha).mean()) > 0.8
