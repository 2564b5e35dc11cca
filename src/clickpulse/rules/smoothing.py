"""Bayesian-smoothed conversion rates: a beta-binomial prior fitted to the population.

A group (a segment, a user) with ``s`` conversions in ``n`` trials has the raw rate ``s / n``,
which is noise for small ``n`` (1 of 2 is not 50 %). Empirical Bayes (Robinson, *Introduction to
Empirical Bayes: Examples from Baseball Statistics*, 2017, ch. 2–3) assumes each group's true rate
is drawn from a ``Beta(alpha, beta)`` prior fitted to all groups, and reports the posterior mean
``(alpha + s) / (alpha + beta + n)``: small groups shrink towards the population rate, large ones
keep their own.

The prior is fitted by the method of moments for the beta-binomial with unequal group sizes
(Kleinman, "Proportions with extraneous variance: single and independent samples", *JASA* 68
(341), 1973, pp. 46–54), which separates the true between-group spread from binomial noise. With
``p_i = s_i / n_i``, ``W = sum n_i``, ``G`` groups, pooled mean ``m = sum s_i / W`` and
``S = sum n_i (p_i - m)^2``, the beta-binomial gives

    E[S] = m (1 - m) [(G - 1) + rho (A - (G - 1))],   A = W - sum n_i^2 / W,

where ``rho = 1 / (alpha + beta + 1)`` is the intra-group correlation, hence

    rho = (S / (m (1 - m)) - (G - 1)) / (A - (G - 1)),
    alpha + beta = 1 / rho - 1,   alpha = m (alpha + beta),   beta = (1 - m) (alpha + beta).

For equal sizes ``n`` this is the textbook moment estimator of the beta-binomial.

Examples
--------
>>> a, b = fit_prior([1, 0, 2], [2, 0, 3])  # two groups with trials: too few, weak fallback
>>> round(a, 4), round(b, 4), round(a / (a + b), 4)  # mean (3 + 1) / (5 + 2)
(1.1429, 0.8571, 0.5714)
>>> posterior_mean(1, 2, 1.0, 9.0)  # (1 + 1) / (1 + 9 + 2)
0.16666666666666666
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MIN_GROUPS = 5
"""Fewer groups with trials than this: the spread cannot be estimated; weak prior used."""
FALLBACK_STRENGTH = 2.0
"""``alpha + beta`` of the weak fallback prior (as much weight as two trials)."""
MIN_STRENGTH = 0.01
"""Lower bound of ``alpha + beta`` (groups all-or-nothing: almost no shrinkage)."""
MAX_STRENGTH = 10_000.0
"""Upper bound of ``alpha + beta`` (no spread beyond binomial noise: pool, but finitely)."""


def _check(s: float, n: float) -> None:
    if not (math.isfinite(s) and math.isfinite(n)) or n < 0 or s < 0 or s > n:
        raise ValueError(f"need 0 <= successes <= trials (finite), got successes={s!r}, trials={n!r}")


def fit_prior(successes: Iterable[float], trials: Iterable[float], *, min_groups: int = MIN_GROUPS,
              fallback_strength: float = FALLBACK_STRENGTH, min_strength: float = MIN_STRENGTH,
              max_strength: float = MAX_STRENGTH) -> tuple[float, float]:
    """Fit a ``Beta(alpha, beta)`` prior to a population of groups (method of moments, see the
    module docstring).

    Parameters
    ----------
    successes, trials
        Per group: conversions and opportunities (e.g. purchasing sessions and sessions), same
        length, ``0 <= successes <= trials``. Groups with no trials carry no information and are
        skipped.
    min_groups
        Fewer groups with trials than this, or no group with more than one trial (the spread is
        then not identifiable): the weak fallback ``alpha + beta = fallback_strength`` around the
        Laplace-smoothed pooled rate ``(sum s + 1) / (sum n + 2)`` (``Beta(1, 1)``, uniform, with no
        data at all).
    min_strength, max_strength
        Bounds of ``alpha + beta``. When the observed spread is no larger than binomial noise
        (``rho <= 0``, which includes zero variance) the moment estimate is infinite and
        ``max_strength`` is used: near-complete pooling. When every group converts all or nothing
        (``rho >= 1``), ``min_strength``. A pooled rate of exactly 0 or 1 is replaced by the
        Laplace-smoothed one so that ``alpha, beta > 0``.

    Returns
    -------
    (alpha, beta)
        Both > 0; the prior mean ``alpha / (alpha + beta)`` is the population rate.

    Raises
    ------
    ValueError
        Different lengths, or a group with ``successes > trials`` or negative values.
    """
    s_list, n_list = list(successes), list(trials)
    if len(s_list) != len(n_list):
        raise ValueError(f"successes and trials differ in length: {len(s_list)} != {len(n_list)}")
    groups = []
    for s, n in zip(s_list, n_list, strict=True):
        s, n = float(s), float(n)
        _check(s, n)
        if n > 0:
            groups.append((s, n))
    return _fit(len(groups), sum(n for _s, n in groups), sum(s for s, _n in groups),
                sum(n * n for _s, n in groups), sum(s * s / n for s, n in groups),
                min_groups, fallback_strength, min_strength, max_strength)


def _fit(g: int, w: float, total_s: float, sum_n2: float, sum_s2_n: float, min_groups: int = MIN_GROUPS,
         fallback_strength: float = FALLBACK_STRENGTH, min_strength: float = MIN_STRENGTH,
         max_strength: float = MAX_STRENGTH) -> tuple[float, float]:
    """:func:`fit_prior` from the sufficient statistics: ``g`` groups with trials, ``w = sum n``,
    ``total_s = sum s``, ``sum_n2 = sum n^2``, ``sum_s2_n = sum s^2 / n``."""
    laplace = (total_s + 1.0) / (w + 2.0)
    a_minus = w - sum_n2 / w - (g - 1) if w > 0 else 0.0  # A - (G - 1)
    if g < max(min_groups, 2) or a_minus <= 1e-12:
        return laplace * fallback_strength, (1.0 - laplace) * fallback_strength
    m = total_s / w
    if m <= 0.0 or m >= 1.0:  # nobody / everybody converted: no spread to measure
        return laplace * max_strength, (1.0 - laplace) * max_strength
    spread = max(0.0, sum_s2_n - m * total_s)  # sum n (s/n - m)^2
    rho = (spread / (m * (1.0 - m)) - (g - 1)) / a_minus
    strength = max_strength if rho <= 0 else 1.0 / rho - 1.0
    strength = min(max(strength, min_strength), max_strength)
    return m * strength, (1.0 - m) * strength


class PopulationPrior:
    """The sufficient statistics of :func:`fit_prior`, kept incrementally as groups change.

    A stream keeps one per population (e.g. the users of a partition): :meth:`add` a group's
    ``(s, n)``, :meth:`remove` its old value before adding the new one. :meth:`prior` then equals
    ``fit_prior`` over the current groups, in O(1).

    >>> pp = PopulationPrior()
    >>> for s, n in [(1, 2), (0, 0), (2, 3)]:
    ...     pp.add(s, n)
    >>> pp.prior() == fit_prior([1, 0, 2], [2, 0, 3])
    True
    """

    __slots__ = ("g", "w", "s", "n2", "s2n")

    def __init__(self) -> None:
        self.g = 0
        self.w = 0.0
        self.s = 0.0
        self.n2 = 0.0
        self.s2n = 0.0

    def _update(self, s: float, n: float, sign: int) -> None:
        _check(float(s), float(n))
        if n <= 0:
            return
        self.g += sign
        self.w += sign * n
        self.s += sign * s
        self.n2 += sign * n * n
        self.s2n += sign * s * s / n

    def add(self, s: float, n: float) -> None:
        """Count a group with ``s`` successes in ``n`` trials (ValueError unless 0 <= s <= n)."""
        self._update(s, n, 1)

    def remove(self, s: float, n: float) -> None:
        """Forget a group previously added with exactly these values."""
        self._update(s, n, -1)

    def merge(self, other: PopulationPrior) -> PopulationPrior:
        """A new set of statistics over both populations."""
        out = PopulationPrior()
        for k in self.__slots__:
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    def prior(self, **fit_kwargs: Any) -> tuple[float, float]:
        """``(alpha, beta)`` of :func:`fit_prior` over the groups counted now."""
        return _fit(self.g, self.w, self.s, self.n2, self.s2n, **fit_kwargs)


def posterior_mean(s: float, n: float, alpha: float, beta: float) -> float:
    """Posterior mean rate of a group with ``s`` successes in ``n`` trials under ``Beta(alpha, beta)``:
    ``(alpha + s) / (alpha + beta + n)``, in (0, 1).

    Raises
    ------
    ValueError
        ``alpha`` or ``beta`` not > 0, or not ``0 <= s <= n``.
    """
    if not (alpha > 0 and beta > 0 and math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"alpha and beta must be finite and > 0, got {alpha!r}, {beta!r}")
    _check(float(s), float(n))
    return (alpha + s) / (alpha + beta + n)


def smoothed_rates(successes: Iterable[float], trials: Iterable[float], **fit_kwargs: Any
                   ) -> tuple[list[float], tuple[float, float]]:
    """Fit the prior on the population and return every group's posterior mean with it.

    >>> rates, prior = smoothed_rates([0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1])
    >>> prior  # one trial per group: spread not identifiable, weak prior around (1 + 1) / (6 + 2)
    (0.5, 1.5)
    >>> [round(r, 3) for r in rates]
    [0.167, 0.167, 0.5, 0.167, 0.167, 0.167]
    """
    s_list, n_list = list(successes), list(trials)
    alpha, beta = fit_prior(s_list, n_list, **fit_kwargs)
    return [posterior_mean(s, n, alpha, beta) for s, n in zip(s_list, n_list, strict=True)], (alpha, beta)
