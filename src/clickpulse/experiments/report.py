"""``clickpulse report experiments``: the arms' aggregates from ``<ns>.experiments`` records, and
their analysis as plain data (for a table, Prometheus gauges and the HTML report's plots).

Aggregation (:func:`aggregate`): records are de-duplicated on ``record_id`` (the worker
publishes at least once); a user counts in the arm of their **first** exposure to the experiment
(a user whose state expired and who was exposed again is not counted twice); a conversion counts
when it belongs to that exposure (same ``exposure_time_ms``); per arm: exposed users,
converted users (at least one conversion), conversions, and revenue per exposed user (0 for a
user without a purchase). Malformed records are skipped and counted.

Analysis (:func:`analyze`): each arm against the baseline (the holdout when there is one, else
``control``, else the first arm by name): conversion rate difference with the two-proportion
z-test and its interval, relative lift, revenue per user with Welch's t and its interval,
P(beats baseline) and expected loss (beta-binomial), the always-valid p-value of the mSPRT
over the records in event-time order, and the sample-ratio check over all arms against the
shares the exposures carry. Formulas and sources: :mod:`clickpulse.experiments.stats`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .assignment import HOLDOUT
from .stats import always_valid_p, beta_binomial, srm_check, summary, two_proportion_ztest, welch_ttest

#: looks of the sequential test kept in the output (evenly spaced over the records)
MAX_LOOKS = 200


@dataclass
class ArmData:
    """One arm's users: exposure time per user, and conversions/revenue per converted user."""

    exposed: dict[str, int] = field(default_factory=dict)  # user -> exposure_time_ms
    conversions: dict[str, int] = field(default_factory=dict)  # user -> conversions
    revenue: dict[str, float] = field(default_factory=dict)  # user -> revenue
    first_conversion: dict[str, int] = field(default_factory=dict)  # user -> event time
    share: float | None = None


@dataclass
class ExperimentData:
    name: str
    arms: dict[str, ArmData] = field(default_factory=dict)
    skipped: int = 0


def aggregate(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, ExperimentData], int]:
    """Experiment name -> its arms' data, and the number of malformed records skipped."""
    seen: set[str] = set()
    exposures: dict[tuple[str, str], tuple[int, str, float | None]] = {}  # (exp, user) -> (at, arm, share)
    conversions: list[Mapping[str, Any]] = []
    bad = 0
    for r in records:
        try:
            rid, kind, exp, arm, user = r["record_id"], r["kind"], r["experiment"], r["variant"], r["user_key"]
            at = int(r["exposure_time_ms"])
            t = int(r["event_time_ms"])
            if not all(isinstance(v, str) and v for v in (rid, kind, exp, arm, user)) or kind not in (
                    "exposure", "conversion"):
                raise ValueError(kind)
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if rid in seen:
            continue
        seen.add(rid)
        if kind == "exposure":
            share = r.get("share")
            prev = exposures.get((exp, user))
            if prev is None or at < prev[0]:
                exposures[(exp, user)] = (at, arm, share if isinstance(share, int | float) else None)
        else:
            conversions.append({**r, "event_time_ms": t, "exposure_time_ms": at})
    out: dict[str, ExperimentData] = {}
    for (exp, user), (at, arm, share) in exposures.items():
        d = out.setdefault(exp, ExperimentData(exp))
        a = d.arms.setdefault(arm, ArmData())
        a.exposed[user] = at
        if share is not None:
            a.share = float(share)
    for r in conversions:
        first = exposures.get((r["experiment"], r["user_key"]))
        if first is None or first[0] != r["exposure_time_ms"] or first[1] != r["variant"]:
            continue  # not the user's first exposure: not counted
        a = out[r["experiment"]].arms[r["variant"]]
        u = r["user_key"]
        a.conversions[u] = a.conversions.get(u, 0) + 1
        rev = r.get("revenue")
        a.revenue[u] = a.revenue.get(u, 0.0) + (float(rev) if isinstance(rev, int | float) else 0.0)
        a.first_conversion[u] = min(a.first_conversion.get(u, r["event_time_ms"]), r["event_time_ms"])
    return out, bad


def baseline_of(arms: Iterable[str]) -> str:
    """The holdout when present, else ``control``, else the first arm by name."""
    names = sorted(arms)
    return HOLDOUT if HOLDOUT in names else "control" if "control" in names else names[0]


def _revenue_values(a: ArmData) -> list[float]:
    return [a.revenue.get(u, 0.0) for u in a.exposed]


def _sequential(d: ExperimentData, base: str, tau2: float) -> dict[str, Any]:
    """Cumulative users and converters per arm at up to :data:`MAX_LOOKS` looks over event time,
    and each arm's always-valid p-value against the baseline at those looks."""
    arms = sorted(d.arms)
    events = []
    for i, arm in enumerate(arms):
        a = d.arms[arm]
        events += [(t, 0, i) for t in a.exposed.values()]
        events += [(t, 1, i) for t in a.first_conversion.values()]
    if not events:
        return {"event_time_ms": [], "arms": {}}
    events.sort()
    times = np.array([e[0] for e in events])
    n = np.zeros((len(arms), len(events)))
    x = np.zeros((len(arms), len(events)))
    for j, (_t, kind, i) in enumerate(events):
        (x if kind else n)[i, j] = 1
    n, x = n.cumsum(axis=1), x.cumsum(axis=1)
    b = arms.index(base)
    out: dict[str, Any] = {}
    pvals = {}
    for i, arm in enumerate(arms):
        if i != b:
            pvals[arm] = always_valid_p(x[i], n[i], x[b], n[b], tau2)
    # the looks kept: evenly spaced, always the last one
    idx = np.unique(np.linspace(0, len(events) - 1, min(MAX_LOOKS, len(events))).round().astype(int))
    for i, arm in enumerate(arms):
        out[arm] = {"users": n[i, idx].astype(int).tolist(), "converters": x[i, idx].astype(int).tolist()}
        if arm in pvals:
            out[arm]["p_always_valid"] = pvals[arm][idx].tolist()
    return {"event_time_ms": times[idx].astype(int).tolist(), "arms": out}


#: the name of the share no observed arm accounts for, when the rules do not name the missing arms
UNOBSERVED = "(unobserved arms)"


def declared_shares(d: ExperimentData, rules: Mapping[str, float] | None = None) -> dict[str, float] | None:
    """Every arm's configured share of users, including arms that have no user yet (an arm
    with 0 users is the strongest sample-ratio mismatch there is), or None when unknown.

    The observed arms' shares come from their exposure records (``share``); they are shares of
    all arms, so what they leave of 1 belongs to arms without a record: the arms of ``rules``
    (arm -> share, e.g. :meth:`~clickpulse.experiments.assignment.Experiment.expected_shares`)
    that were not observed, in proportion to their shares there, else one :data:`UNOBSERVED`
    arm. When an observed arm's record carries no share, ``rules`` gives all shares (None
    without rules)."""
    own = {arm: a.share for arm, a in d.arms.items()}
    if any(v is None for v in own.values()):
        if not rules or not set(d.arms) <= set(rules):
            return None
        return {arm: float(v) for arm, v in rules.items()}
    shares: dict[str, float] = {arm: float(v) for arm, v in own.items()}  # type: ignore[arg-type]
    rest = 1.0 - sum(shares.values())
    if rest > 1e-6:
        missing = {arm: float(v) for arm, v in (rules or {}).items() if arm not in shares and v > 0}
        total = sum(missing.values())
        if total > 0:
            shares.update({arm: rest * v / total for arm, v in missing.items()})
        else:
            shares[UNOBSERVED] = rest
    return shares


def analyze(data: Mapping[str, ExperimentData], *, alpha: float = 0.05, tau2: float = 1e-4, seed: int = 0,
            baseline: str | None = None,
            declared: Mapping[str, Mapping[str, float]] | None = None) -> list[dict[str, Any]]:
    """The analysis of every experiment, as plain data (JSON-serializable).

    ``declared``: experiment -> arm -> configured share (from the rules), to name the arms
    without any exposure in the sample-ratio check (:func:`declared_shares`).

    Returns
    -------
    list of dict
        Per experiment: ``experiment``, ``baseline``, ``alpha``, ``srm`` (chi2, p_value,
        mismatch, observed, expected, unobserved: the arms with 0 users), ``arms`` (per arm: ``variant``, ``users``,
        ``converters``, ``conversions``, ``conversion_rate``, ``revenue``, ``revenue_per_user``
        and, except the baseline, ``vs_baseline``: ``diff``, ``diff_ci``, ``lift``, ``lift_ci``,
        ``p_value_z``, ``revenue_diff``, ``revenue_diff_ci``, ``p_value_welch``,
        ``p_beats_baseline``, ``expected_loss``, ``p_value_always_valid``), ``sequential`` (the
        looks: event times, cumulative users and converters per arm, always-valid p-values).
    """
    results = []
    for name in sorted(data):
        d = data[name]
        if not d.arms:
            continue
        base = baseline if baseline in d.arms else baseline_of(d.arms)
        seq = _sequential(d, base, tau2)
        shares = declared_shares(d, (declared or {}).get(name))
        srm = None
        if shares is not None and len(shares) > 1:
            r = srm_check({arm: len(a.exposed) for arm, a in d.arms.items()}, shares)
            srm = {"chi2": r.chi2, "p_value": r.p_value, "mismatch": r.mismatch, "observed": r.observed,
                   "expected": r.expected, "unobserved": sorted(set(shares) - set(d.arms))}
        b = d.arms[base]
        nb, xb = len(b.exposed), len(b.conversions)
        rb = summary(_revenue_values(b))
        arms = []
        for arm in sorted(d.arms, key=lambda s: (s != base, s)):
            a = d.arms[arm]
            n, xc = len(a.exposed), len(a.conversions)
            rv = summary(_revenue_values(a))
            row: dict[str, Any] = {"variant": arm, "users": n, "converters": xc,
                                   "conversions": sum(a.conversions.values()),
                                   "conversion_rate": xc / n if n else 0.0, "revenue": sum(a.revenue.values()),
                                   "revenue_per_user": rv[1], "share": a.share}
            if arm != base and n and nb:
                z = two_proportion_ztest(xc, n, xb, nb, alpha)
                bay = beta_binomial(xc, n, xb, nb, seed=seed, alpha=alpha)
                vs: dict[str, Any] = {"diff": z.diff, "diff_ci": list(z.ci), "lift": z.lift,
                                      "lift_ci": None if z.lift_ci is None else list(z.lift_ci),
                                      "p_value_z": z.p_value, "p_beats_baseline": bay.p_better,
                                      "expected_loss": bay.loss_t, "diff_credible": list(bay.diff_ci)}
                if n >= 2 and nb >= 2:
                    w = welch_ttest(rv[1], rv[2], n, rb[1], rb[2], nb, alpha)
                    vs.update(revenue_diff=w.diff, revenue_diff_ci=list(w.ci), p_value_welch=w.p_value)
                p_seq = seq["arms"].get(arm, {}).get("p_always_valid")
                vs["p_value_always_valid"] = p_seq[-1] if p_seq else 1.0
                row["vs_baseline"] = vs
            arms.append(row)
        results.append({"experiment": name, "baseline": base, "alpha": alpha, "tau2": tau2, "srm": srm,
                        "arms": arms, "sequential": seq})
    return results


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.2f}%"


def _interval(ci: list[float] | None, pct: bool = True) -> str:
    if ci is None:
        return "-"
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if pct else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def format_table(results: list[dict[str, Any]]) -> str:
    """The analysis as a text table (one block per experiment)."""
    lines = []
    for r in results:
        level = round(100 * (1 - r["alpha"]))
        srm = r["srm"]
        srm_text = "SRM: no shares recorded" if srm is None else (
            f"SRM chi2 {srm['chi2']:.2f}, p {srm['p_value']:.4g}: "
            + ("MISMATCH (p < 0.001): do not trust the comparison" if srm["mismatch"] else "ok")
            + (f"; 0 users in {', '.join(srm['unobserved'])}" if srm.get("unobserved") else ""))
        lines.append(f"experiment {r['experiment']}  (baseline {r['baseline']}; {srm_text})")
        head = (f"  {'arm':<14}{'users':>7}{'conv':>6}{'rate':>8}  {'diff vs baseline':>10} {level}% CI"
                f"{'':<14}{'lift':>9} {level}% CI{'':<13}{'p(z)':>7}{'rev/user':>10}  {'rev diff':>8} {level}% CI"
                f"{'':<8}{'p(Welch)':>9}{'P(beats)':>9}{'E[loss]':>9}{'p(mSPRT)':>9}")
        lines.append(head)
        for a in r["arms"]:
            vs = a.get("vs_baseline")
            row = (f"  {a['variant']:<14}{a['users']:>7}{a['converters']:>6}{100 * a['conversion_rate']:>7.2f}%  ")
            if vs is None:
                row += f"{'(baseline)':>10}{'':<56}{a['revenue_per_user']:>10.2f}"
            else:
                row += (f"{_pct(vs['diff']):>10} {_interval(vs['diff_ci']):<22}{_pct(vs['lift']):>9} "
                        f"{_interval(vs['lift_ci']):<22}{_num(vs['p_value_z']):>7}{a['revenue_per_user']:>10.2f}  "
                        f"{_num(vs.get('revenue_diff'), '+.2f'):>8} {_interval(vs.get('revenue_diff_ci'), False):<18}"
                        f"{_num(vs.get('p_value_welch')):>9}{_num(vs['p_beats_baseline']):>9}"
                        f"{_num(vs['expected_loss'], '.4f'):>9}{_num(vs['p_value_always_valid']):>9}")
            lines.append(row)
    return "\n".join(lines) if lines else "no experiment records"


def set_gauges(metrics: Any, results: list[dict[str, Any]]) -> None:
    """Set ``clickpulse_experiment_stat`` and ``clickpulse_experiment_srm_p_value`` of ``metrics``
    (:class:`clickpulse.observability.metrics.ExperimentGauges`) from :func:`analyze`'s results. Labels:
    experiment, arm and statistic names only (never a user)."""
    g = metrics.experiment_stat
    for r in results:
        if r["srm"] is not None:
            metrics.experiment_srm_p.labels(r["experiment"]).set(r["srm"]["p_value"])
        for a in r["arms"]:
            values = {"users": a["users"], "converters": a["converters"], "conversion_rate": a["conversion_rate"],
                      "revenue_per_user": a["revenue_per_user"]}
            vs = a.get("vs_baseline") or {}
            for key, stat in (("lift", "lift"), ("p_value_z", "p_value_z"), ("p_value_welch", "p_value_welch"),
                              ("p_beats_baseline", "p_beats_baseline"), ("expected_loss", "expected_loss"),
                              ("p_value_always_valid", "p_value_always_valid")):
                if vs.get(key) is not None:
                    values[stat] = vs[key]
            if vs.get("lift_ci"):
                values["lift_ci_low"], values["lift_ci_high"] = vs["lift_ci"]
            for stat, v in values.items():
                g.labels(r["experiment"], a["variant"], stat).set(float(v))
