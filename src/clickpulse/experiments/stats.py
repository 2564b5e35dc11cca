"""Statistics of an experiment's arms: frequentist, Bayesian, sample-ratio mismatch, anytime-valid.

Every function takes plain counts or summary statistics (so it works on the aggregates the
report builds from ``<ns>.experiments``) and returns a frozen dataclass. "treatment" is the arm
being judged, "control" the baseline (the holdout, or the first variant). Differences are
treatment − control; relative lift is (treatment − control) / control.

Sources
-------
* Two-proportion z-test (pooled standard error) and the Wald interval of the difference:
  ``statsmodels.stats.proportion.proportions_ztest`` and ``confint_proportions_2indep``
  (Agresti, *Categorical Data Analysis*, 3rd ed., 2013, §3.1).
* Welch's t-test (unequal variances) with Welch–Satterthwaite degrees of freedom:
  ``scipy.stats.ttest_ind_from_stats(equal_var=False)`` (Welch, Biometrika 34, 1947); the
  interval ``diff ± t_{df, 1-α/2} · se`` (the same as statsmodels' ``CompareMeans.tconfint_diff(usevar="unequal")``).
* Beta-binomial: independent Beta(a + x, b + n − x) posteriors; P(treatment > control) in closed
  form (Evan Miller, "Formulas for Bayesian A/B Testing", 2015,
  https://www.evanmiller.org/bayesian-ab-testing.html) and, with the expected loss
  E[max(control − treatment, 0)] (Chris Stucchio, "Bayesian A/B Testing at VWO", 2015), by
  seeded Monte Carlo.
* Sample-ratio mismatch: Pearson's chi-square goodness of fit of the arms' user counts to the
  configured shares (``scipy.stats.chisquare``), flagged at p < 0.001 (Fabijan et al.,
  "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments", KDD 2019).
* Anytime-valid: the mixture sequential probability ratio test (mSPRT) with a normal mixing
  distribution N(0, τ²) over the difference of means and its always-valid p-value, the running
  minimum of 1/Λ_n (Johari, Koomen, Pekelis & Walsh, "Peeking at A/B Tests: Why It Matters, and
  What to Do About It", KDD 2017, eq. (11) and Prop. 2; Johari, Pekelis & Walsh, "Always Valid
  Inference", Operations Research 70(3), 2022). For two arms with estimated difference θ̂_n and
  its variance V_n, Λ_n = sqrt(V_n / (V_n + τ²)) · exp(τ² θ̂_n² / (2 V_n (V_n + τ²))); the
  variance is the plug-in p(1−p)/n of each arm (the large-sample form the paper uses for
  binary data). No library on PyPI implements it and is maintained (checked: ``expan``, last
  release 2019; ``confseq``, 2023 and confidence sequences only), so it is here, with a
  simulation test of its type-I error under continuous peeking
  (``tests/unit/test_experiments_stats.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as sps
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

SRM_ALPHA = 0.001


@dataclass(frozen=True)
class ProportionTest:
    """Two-proportion z-test. ``diff`` = rate_t − rate_c with its ``ci`` (1 − alpha, Wald);
    ``lift`` = diff / rate_c (None when rate_c is 0) with ``lift_ci`` (the diff interval divided
    by rate_c: a first-order interval)."""

    rate_t: float
    rate_c: float
    diff: float
    ci: tuple[float, float]
    lift: float | None
    lift_ci: tuple[float, float] | None
    z: float
    p_value: float


def two_proportion_ztest(x_t: int, n_t: int, x_c: int, n_c: int, alpha: float = 0.05) -> ProportionTest:
    """Two-sided z-test of equal conversion rates (pooled standard error) and the Wald interval.

    Parameters
    ----------
    x_t, n_t, x_c, n_c
        Converted users and exposed users of treatment and control (0 <= x <= n, n >= 1).
    alpha
        1 − the interval's coverage.

    Raises
    ------
    ValueError
        A count out of range.

    Examples
    --------
    The statsmodels documentation's example (``proportions_ztest([5, 12], [83, 99])``: p = 0.159):

    >>> r = two_proportion_ztest(5, 83, 12, 99)
    >>> round(r.p_value, 3), round(r.z, 3)
    (0.159, -1.408)
    """
    for x, n in ((x_t, n_t), (x_c, n_c)):
        if not (n >= 1 and 0 <= x <= n):
            raise ValueError(f"counts out of range: {x} of {n}")
    rt, rc = x_t / n_t, x_c / n_c
    if x_t + x_c in (0, n_t + n_c):  # no variance at all: nothing to tell apart
        z, p = 0.0, 1.0
    else:
        z, p = proportions_ztest([x_t, x_c], [n_t, n_c])
    lo, hi = confint_proportions_2indep(x_t, n_t, x_c, n_c, method="wald", compare="diff", alpha=alpha)
    diff = rt - rc
    lift = diff / rc if rc > 0 else None
    lift_ci = (lo / rc, hi / rc) if rc > 0 else None
    return ProportionTest(rt, rc, diff, (float(lo), float(hi)), lift, lift_ci, float(z), float(p))


@dataclass(frozen=True)
class MeanTest:
    """Welch's t-test: ``diff`` = mean_t − mean_c with its ``ci`` (1 − alpha), t, Welch–Satterthwaite
    ``df`` and the two-sided p-value."""

    mean_t: float
    mean_c: float
    diff: float
    ci: tuple[float, float]
    t: float
    df: float
    p_value: float


def welch_ttest(mean_t: float, var_t: float, n_t: int, mean_c: float, var_c: float, n_c: int,
                alpha: float = 0.05) -> MeanTest:
    """Welch's unequal-variances t-test from summary statistics (e.g. revenue per exposed user).

    ``var_*`` are sample variances (ddof 1); ``n_*`` >= 2. With both variances 0 the test has
    nothing to say (p = 1 when the means are equal, 0 otherwise; ci = (diff, diff)).

    >>> r = welch_ttest(12.0, 9.0, 25, 10.0, 4.0, 20)
    >>> round(r.t, 4), round(r.df, 2)
    (2.6726, 41.78)
    """
    if n_t < 2 or n_c < 2:
        raise ValueError(f"Welch's t needs at least 2 users per arm, got {n_t} and {n_c}")
    diff = mean_t - mean_c
    a, b = var_t / n_t, var_c / n_c
    se2 = a + b
    if se2 <= 0:
        return MeanTest(mean_t, mean_c, diff, (diff, diff), math.inf if diff else 0.0, math.inf,
                        0.0 if diff else 1.0)
    df = se2 * se2 / (a * a / (n_t - 1) + b * b / (n_c - 1))
    res = sps.ttest_ind_from_stats(mean_t, math.sqrt(var_t), n_t, mean_c, math.sqrt(var_c), n_c, equal_var=False)
    half = float(sps.t.ppf(1 - alpha / 2, df)) * math.sqrt(se2)
    return MeanTest(mean_t, mean_c, diff, (diff - half, diff + half), float(res.statistic), float(df),
                    float(res.pvalue))


def summary(values: Sequence[float]) -> tuple[int, float, float]:
    """``(n, mean, sample variance)`` of per-user values (variance 0 when n < 2)."""
    arr = np.asarray(values, dtype=float)
    n = int(arr.size)
    if n == 0:
        return 0, 0.0, 0.0
    return n, float(arr.mean()), float(arr.var(ddof=1)) if n > 1 else 0.0


@dataclass(frozen=True)
class BayesResult:
    """Beta-binomial comparison: ``p_better`` = P(rate_t > rate_c | data) (closed form when
    available, else Monte Carlo), ``p_better_mc`` its Monte Carlo estimate, expected losses
    (in conversion-rate units) of shipping treatment (``loss_t`` = E[max(rate_c − rate_t, 0)])
    and of keeping control (``loss_c``), and the 1 − alpha credible interval of rate_t − rate_c."""

    p_better: float
    p_better_mc: float
    loss_t: float
    loss_c: float
    diff_ci: tuple[float, float]


def prob_b_beats_a(a_a: float, b_a: float, a_b: float, b_b: float) -> float:
    """P(p_B > p_A) for independent p_A ~ Beta(a_a, b_a), p_B ~ Beta(a_b, b_b), with ``a_b`` a
    positive integer (Evan Miller 2015: Σ_{i<a_b} B(a_a+i, b_a+b_b) / ((b_b+i) B(1+i, b_b) B(a_a, b_a))).

    >>> prob_b_beats_a(1, 1, 1, 1)
    0.5
    """
    if a_b != int(a_b) or a_b < 1:
        raise ValueError("a_b must be a positive integer")
    i = np.arange(int(a_b), dtype=float)
    terms = (special.betaln(a_a + i, b_a + b_b) - np.log(b_b + i) - special.betaln(1 + i, b_b)
             - special.betaln(a_a, b_a))
    return float(min(1.0, max(0.0, np.exp(terms).sum())))


def beta_binomial(x_t: int, n_t: int, x_c: int, n_c: int, *, prior: tuple[float, float] = (1.0, 1.0),
                  draws: int = 200_000, seed: int = 0, alpha: float = 0.05) -> BayesResult:
    """Bayesian comparison of two conversion rates with Beta(``prior``) priors (default uniform).

    Monte Carlo with ``draws`` draws from ``numpy.random.default_rng(seed)`` (deterministic);
    the closed form of :func:`prob_b_beats_a` is used for ``p_better`` when the treatment's
    posterior alpha is an integer below 100 000.

    >>> r = beta_binomial(0, 0 + 1, 0, 1, prior=(1, 1))  # two identical posteriors
    >>> round(r.p_better, 3)
    0.5
    """
    a0, b0 = prior
    at, bt = a0 + x_t, b0 + n_t - x_t
    ac, bc = a0 + x_c, b0 + n_c - x_c
    rng = np.random.default_rng(seed)
    pt = rng.beta(at, bt, draws)
    pc = rng.beta(ac, bc, draws)
    d = pt - pc
    mc = float((d > 0).mean())
    exact = prob_b_beats_a(ac, bc, at, bt) if at == int(at) and at < 100_000 else mc
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    return BayesResult(exact, mc, float(np.maximum(-d, 0).mean()), float(np.maximum(d, 0).mean()),
                       (float(lo), float(hi)))


@dataclass(frozen=True)
class SrmResult:
    """Sample-ratio check: observed and expected users per arm, chi-square, p, ``mismatch`` (p < 0.001)."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    mismatch: bool


def srm_check(observed: Mapping[str, int], shares: Mapping[str, float], alpha: float = SRM_ALPHA) -> SrmResult:
    """Chi-square goodness of fit of the users per arm to the configured shares.

    ``shares`` need not sum to 1 (they are normalized); an arm in ``shares`` missing from
    ``observed`` counts 0. Fewer than 2 arms or no users: p = 1.

    >>> r = srm_check({"a": 5100, "b": 4900}, {"a": 0.5, "b": 0.5})
    >>> round(r.chi2, 6), round(r.p_value, 4), r.mismatch
    (4.0, 0.0455, False)
    """
    arms = list(shares)
    obs = np.array([int(observed.get(a, 0)) for a in arms], dtype=float)
    total = obs.sum()
    w = np.array([float(shares[a]) for a in arms])
    exp = total * w / w.sum() if w.sum() > 0 else np.zeros_like(w)
    if len(arms) < 2 or total <= 0:
        return SrmResult(dict(zip(arms, obs.astype(int).tolist())), dict(zip(arms, exp.tolist())), 0.0, 1.0, False)
    chi2, p = sps.chisquare(obs, exp)
    return SrmResult(dict(zip(arms, obs.astype(int).tolist())), dict(zip(arms, exp.tolist())), float(chi2),
                     float(p), bool(p < alpha))


def msprt_lambda(diff: np.ndarray | float, var: np.ndarray | float, tau2: float) -> np.ndarray:
    """The mixture likelihood ratio Λ of Johari et al. (2017) for an estimated difference
    ``diff`` with variance ``var`` and mixing variance ``tau2`` (element-wise; Λ = 1 where var is 0)."""
    diff = np.asarray(diff, dtype=float)
    var = np.asarray(var, dtype=float)
    safe = np.where(var > 0, var, 1.0)
    lam = np.sqrt(safe / (safe + tau2)) * np.exp(tau2 * diff * diff / (2 * safe * (safe + tau2)))
    return np.where(var > 0, lam, 1.0)


def proportion_looks(x_t: np.ndarray, n_t: np.ndarray, x_c: np.ndarray, n_c: np.ndarray) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """(difference of rates, plug-in variance of it) at each look of cumulative counts."""
    x_t, n_t, x_c, n_c = (np.asarray(v, dtype=float) for v in (x_t, n_t, x_c, n_c))
    with np.errstate(divide="ignore", invalid="ignore"):
        rt = np.where(n_t > 0, x_t / n_t, 0.0)
        rc = np.where(n_c > 0, x_c / n_c, 0.0)
        var = np.where((n_t > 0) & (n_c > 0), rt * (1 - rt) / np.maximum(n_t, 1) + rc * (1 - rc) / np.maximum(n_c, 1),
                       0.0)
    return rt - rc, var


def always_valid_p(x_t: Sequence[int], n_t: Sequence[int], x_c: Sequence[int], n_c: Sequence[int],
                   tau2: float = 1e-4) -> np.ndarray:
    """Always-valid p-values of the mSPRT for equal conversion rates, one per look.

    The inputs are the cumulative counts at each look (any number of looks, in order); the
    result at look k is ``min(1, min_{j<=k} 1/Λ_j)``, non-increasing: rejecting the first time it
    falls below alpha keeps the type-I error at most alpha however often one looks (Johari et
    al. 2017, Prop. 2; asymptotically, with the plug-in variance). ``tau2``: the mixing
    variance, the scale of effects (difference of rates) the test is tuned to (1e-4: about 1
    percentage point).

    Examples
    --------
    >>> p = always_valid_p([10, 30, 60], [100, 300, 600], [10, 20, 30], [100, 300, 600])
    >>> bool(p[0] == 1.0 and p[-1] < p[1] < 1.0)
    True
    """
    diff, var = proportion_looks(np.asarray(x_t), np.asarray(n_t), np.asarray(x_c), np.asarray(n_c))
    lam = msprt_lambda(diff, var, tau2)
    return np.minimum.accumulate(np.minimum(1.0, 1.0 / lam), axis=-1)
