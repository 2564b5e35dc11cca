"""Thompson sampling over an experiment's variants (Beta-Bernoulli), deterministic per user.

For a new user, each variant's conversion rate is drawn from its posterior Beta(1 + converted,
1 + exposed − converted) and the user gets the variant with the highest draw (Thompson, *Biometrika*
25, 1933; Chapelle & Li, "An Empirical Evaluation of Thompson Sampling", NIPS 2011; Russo et al.,
"A Tutorial on Thompson Sampling", 2018, ch. 3). So traffic moves to the better variants as
outcomes arrive, while every variant keeps a chance in proportion to the probability that it is
the best. The draws come from ``random.Random`` seeded with SHA-256 of the salt and the user's
key: the same user with the same counts gets the same arm. Once exposed, a user keeps the arm
(the exposure in their state, :mod:`clickpulse.experiments.attribution`); the holdout share is
still assigned by the hash (:meth:`clickpulse.experiments.assignment.Experiment.assign`) and is
not re-weighted, so lift against the holdout stays measurable. The report's fixed-horizon
statistics assume fixed weights: with a bandit, use the always-valid p-value and the Bayesian
figures, and read the conversion rates per arm, not the traffic split (no SRM check is meaningful).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence


def thompson_arm(counts: Mapping[str, tuple[int, int]], arms: Sequence[str], salt: str, user_key: str) -> str:
    """The arm with the highest posterior draw.

    Parameters
    ----------
    counts
        Arm -> (exposed users, converted users); a missing arm counts (0, 0).
    arms
        The candidate arms, in a fixed order (ties go to the first).
    salt, user_key
        Seed of the draws (SHA-256 of ``salt`` and ``user_key``).

    >>> thompson_arm({"a": (1000, 10), "b": (1000, 300)}, ["a", "b"], "s", "u1")
    'b'
    """
    seed = int.from_bytes(hashlib.sha256(f"{salt}\x1fthompson\x1f{user_key}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    best, best_draw = arms[0], -1.0
    for arm in arms:
        n, x = counts.get(arm, (0, 0))
        x = min(max(x, 0), max(n, 0))
        draw = rng.betavariate(1 + x, 1 + max(n, 0) - x)
        if draw > best_draw:
            best, best_draw = arm, draw
    return best
