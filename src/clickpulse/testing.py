"""Testing helpers that ship with clickpulse: a hand-moved clock, event builders and an
in-memory engine (no Kafka), for users' own tests as well as ours."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from .events.contract import normalize
from .observability.metrics import Metrics
from .rules.bots import BotConfig
from .rules.ruleset import Ruleset, load_rules, parse_rules
from .settings import Settings
from .engine import Engine, build_engine

_seq = itertools.count()


def ms(text: str) -> int:
    """``'2019-10-01T10:00:00Z'`` (or with ``.fff``) -> epoch ms.

    >>> ms("1970-01-01T00:01:00Z")
    60000
    """
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp() * 1000)


class ManualClock:
    """A wall clock moved by hand (epoch ms)."""

    def __init__(self, start_ms: int = 0) -> None:
        self.now_ms = start_ms

    def advance(self, seconds: float) -> int:
        self.now_ms += int(seconds * 1000)
        return self.now_ms

    def set(self, when: str | int) -> int:
        self.now_ms = ms(when) if isinstance(when, str) else when
        return self.now_ms


def event(etype: str, user: str = "u1", at: str | int = "2019-10-01T10:00:00Z", *, event_id: str | None = None,
          **properties: Any) -> dict[str, Any]:
    """A canonical event (validated by the real contract code)."""
    raw: dict[str, Any] = {"type": etype, "user_id": user, "timestamp": ms(at) if isinstance(at, str) else at,
                           "event_id": event_id or f"t-{next(_seq)}"}
    if properties:
        raw["properties"] = properties
    return normalize(raw)


def default_rules() -> Ruleset:
    """The packaged default rules (``src/clickpulse/rules/default_rules.yaml``)."""
    return load_rules(Settings().rules_file or "")


def memory_engine(*, lateness_s: float = 60, idle_s: float = 5, live: bool = False, gap_s: float = 1800,
                  dedup: int = 32, rules: Ruleset | str | None = "default",
                  assume_consent: tuple[str, ...] = ("marketing",), bots: BotConfig | None = None,
                  timezone: str = "UTC") -> Engine:
    """An :class:`Engine` over a plain dict table with its own metrics registry.

    ``rules``: ``"default"`` (the packaged default rules: cart abandonment after 30 min...), a
    :class:`Ruleset`, rules-file YAML text, or ``None`` for none. ``assume_consent``: purposes
    granted to users who sent no ``consent`` event (``marketing`` by default, so the default
    rules' marketing triggers fire on test data without consent events). ``timezone``: the site
    time zone (IANA name; it becomes the process's, see :mod:`clickpulse.state.localtime`).
    """
    if rules == "default":
        rules = default_rules()
    elif isinstance(rules, str):
        rules = parse_rules(rules, "<test rules>")
    settings = Settings(allowed_lateness_s=lateness_s, idle_timeout_s=idle_s, time_mode="live" if live else "replay",
                        session_gap_s=gap_s, dedup_ids_per_user=dedup, assume_consent=",".join(assume_consent),
                        models_enabled=False, timezone=timezone)
    return build_engine(settings, {}, metrics=Metrics(CollectorRegistry()), rules=rules, bots=bots)
