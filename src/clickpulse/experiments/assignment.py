"""An experiment on a trigger, and the deterministic assignment of users to its arms.

Assignment (the usual hashing randomization of online experiments: Kohavi, Tang & Xu,
*Trustworthy Online Controlled Experiments*, 2020, ch. 14; GrowthBook and Optimizely do the
same with FNV-1a / MurmurHash3): ``u = first 8 bytes of SHA-256(salt + "\\x1f" + user_key)``
read as a big-endian integer and divided by 2**64, a number uniform on [0, 1) for any set of
distinct keys. ``u < holdout`` puts the user in the holdout; otherwise ``(u - holdout) / (1 -
holdout)`` is laid over the variants' cumulative weight shares. The same key and salt always
give the same arm (sticky, across restarts, workers and rules reloads that keep the salt and
the weights); changing the salt re-randomizes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

#: the arm of users whose decisions are recorded but not delivered (``deliver: false``)
HOLDOUT = "holdout"
_SCALE = float(2**64)


def unit_hash(salt: str, user_key: str) -> float:
    """A number in [0, 1) from SHA-256 of ``salt`` and ``user_key`` (see the module docstring).

    >>> unit_hash("exp-1", "u1") == unit_hash("exp-1", "u1")
    True
    >>> 0.0 <= unit_hash("exp-1", "u1") < 1.0
    True
    """
    digest = hashlib.sha256(f"{salt}\x1f{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment.

    ``payload``: the action's payload template for this arm (the trigger's payload with the
    variant's top-level overrides applied; ``None``: the trigger's own); ``delay_s``: the
    timeout's ``within_s`` for this arm (timeout triggers only; ``None``: the trigger's)."""

    name: str
    weight: float
    payload: Any = None
    delay_s: float | None = None


@dataclass(frozen=True)
class Experiment:
    """An experiment declared on a trigger (``experiment:`` in the rules file).

    Attributes
    ----------
    name
        Unique over the rules file; the ``experiment`` of the actions and records.
    salt
        Hash salt (default: the name).
    variants
        The delivered arms, with positive weights (relative).
    holdout
        Share of users in the holdout, 0 <= holdout < 1.
    window_s
        Attribution window after exposure (event time, seconds): a conversion at event time
        ``t`` counts when ``exposure <= t < exposure + window``.
    conversion
        Event types that count as a conversion (default ``purchase``; a purchase's revenue is
        its ``properties.revenue``, else ``price * quantity``).
    allocation
        ``fixed`` (the weights) or ``thompson`` (Thompson sampling over the variants as outcomes
        arrive, :mod:`clickpulse.experiments.bandit`; the holdout stays a fixed share).
    """

    name: str
    salt: str
    variants: tuple[Variant, ...]
    holdout: float = 0.0
    window_s: float = 7 * 86400.0
    conversion: tuple[str, ...] = ("purchase",)
    allocation: str = "fixed"

    @cached_property
    def _bounds(self) -> tuple[tuple[float, str], ...]:
        total = sum(v.weight for v in self.variants)
        acc = 0.0
        out = []
        for v in self.variants:
            acc += v.weight
            out.append((acc / total, v.name))
        return tuple(out)

    @cached_property
    def by_name(self) -> dict[str, Variant]:
        return {v.name: v for v in self.variants}

    @property
    def arms(self) -> tuple[str, ...]:
        """Every arm's name: the holdout (when its share > 0) then the variants."""
        return ((HOLDOUT,) if self.holdout > 0 else ()) + tuple(v.name for v in self.variants)

    @property
    def baseline(self) -> str:
        """The arm the others are compared with: the holdout when there is one, else the first variant."""
        return HOLDOUT if self.holdout > 0 else self.variants[0].name

    def expected_shares(self) -> dict[str, float]:
        """Arm -> the share of users it should get (for the SRM check)."""
        total = sum(v.weight for v in self.variants)
        out = {HOLDOUT: self.holdout} if self.holdout > 0 else {}
        for v in self.variants:
            out[v.name] = (1.0 - self.holdout) * v.weight / total
        return out

    def assign(self, user_key: str) -> str:
        """The arm of ``user_key``: :data:`HOLDOUT` or a variant's name (deterministic, sticky)."""
        u = unit_hash(self.salt, user_key)
        if u < self.holdout:
            return HOLDOUT
        r = (u - self.holdout) / (1.0 - self.holdout)
        for bound, name in self._bounds:
            if r < bound:
                return name
        return self._bounds[-1][1]  # (rounding at the top)
