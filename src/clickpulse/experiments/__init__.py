"""Experiments on personalization paths: assignment, exposure and attribution, statistics, report.

* :mod:`.assignment` — the experiment declared on a trigger (variants, weights, holdout) and
  the deterministic, sticky assignment of a user to an arm (SHA-256 of salt and user key).
* :mod:`.attribution` — exposure recorded once per user and conversions/revenue attributed in
  event time within the declared window (pure functions over :class:`~clickpulse.state.user.UserState`,
  called by the engine step); the facts as ``schemas/experiment.v1.json`` records.
* :mod:`.stats` — frequentist, Bayesian, SRM and anytime-valid (mSPRT) statistics (scipy / statsmodels).
* :mod:`.report` — aggregates of the records per arm, the analysis and ``clickpulse report experiments``.

See ``docs/experiments.md``.
"""
