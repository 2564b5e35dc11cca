"""The one place an :class:`~clickpulse.engine.step.Engine` is built from settings.

The worker (:mod:`clickpulse.app`), the in-memory test engine (:func:`clickpulse.testing.memory_engine`)
and the benchmarks all call :func:`build_engine`, so they cannot disagree on how settings map to
engine parameters.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from ..models.labels import ModelConfig
from ..observability.metrics import Metrics
from ..rules.bots import BotConfig
from ..rules.ruleset import RulesFile
from ..settings import Settings
from ..state.localtime import set_site_timezone
from ..state.user import StateConfig
from .step import Engine

#: sentinel: take it from the settings
FROM_SETTINGS: Any = "from-settings"


def build_models(settings: Settings, metrics: Metrics | None = None) -> Any:
    """The :class:`clickpulse.models.registry.ModelRegistry` of ``settings`` (``None`` when
    ``CLICKPULSE_MODELS_ENABLED`` is false); snapshots are verified with the signing key of
    :func:`clickpulse.models.registry.snapshot_key` (rejections counted in ``metrics``)."""
    if not settings.models_enabled:
        return None
    from ..models.registry import ModelRegistry, snapshot_key
    return ModelRegistry({"intent": settings.intent_pipeline, "churn": settings.churn_pipeline}, settings.model_seed,
                         key=lambda: snapshot_key(settings), metrics=metrics)


def build_recs(settings: Settings) -> Any:
    """The worker's item-to-item model (:class:`clickpulse.recs.CoOccurrence`) of ``settings``
    (``None`` when ``CLICKPULSE_RECS_ENABLED`` is false)."""
    if not settings.recs_enabled:
        return None
    from ..recs import CoOccurrence, RecsConfig
    return CoOccurrence(RecsConfig(half_life_ms=int(settings.recs_half_life_s * 1000),
                                   neighbours=settings.recs_neighbours, max_items=settings.recs_max_items,
                                   context=settings.recs_context))


def build_rules(settings: Settings) -> RulesFile | None:
    """The hot-reloaded rules file of ``settings`` (``None``: no rules).

    Raises
    ------
    clickpulse.rules.ruleset.RulesError
        The file is invalid (at start there is nothing to fall back on).
    """
    return RulesFile(settings.rules_file) if settings.rules_file else None


def build_engine(settings: Settings, table: MutableMapping[bytes, bytes] | None = None, *,
                 metrics: Metrics | None = None, models: Any = FROM_SETTINGS, rules: Any = FROM_SETTINGS,
                 bots: BotConfig | None = None) -> Engine:
    """An engine for ``settings``.

    Parameters
    ----------
    settings
        Session gap, lateness, idle timeout, time mode, consent, bots, model settings, cache size,
        site time zone (made the process's, :func:`clickpulse.state.localtime.set_site_timezone`).
    table
        The state table (``dict`` when omitted: an in-memory engine).
    metrics
        Prometheus metrics that :meth:`Engine.commit` updates (own registry when omitted).
    models
        A model registry, ``None`` for no models, or (default) :func:`build_models` of ``settings``.
    rules
        A :class:`~clickpulse.rules.ruleset.Ruleset`, a :class:`~clickpulse.rules.ruleset.RulesFile`,
        ``None`` for no rules, or (default) :func:`build_rules` of ``settings``.
    bots
        Bot thresholds (default: from ``settings``).
    """
    set_site_timezone(settings.timezone)  # one site time zone per process: the local days
    if models is FROM_SETTINGS:
        models = build_models(settings)
    if rules is FROM_SETTINGS:
        rules = build_rules(settings)
    return Engine({} if table is None else table, StateConfig.from_settings(settings),
                  allowed_lateness_ms=settings.allowed_lateness_ms, idle_timeout_ms=settings.idle_timeout_ms,
                  live=settings.time_mode == "live", metrics=metrics, models=models,
                  model_cfg=ModelConfig.from_settings(settings), pending_total_cap=settings.pending_total,
                  rules=rules, assumed_consent=settings.assumed_consent,
                  bots=bots or BotConfig.from_settings(settings),
                  model_min_class_examples=settings.model_min_class_examples,
                  cache_users=settings.state_cache_users, model_actions_consent=settings.model_actions_consent,
                  recs=build_recs(settings),
                  recs_triggers=frozenset(t.strip() for t in settings.recs_triggers.split(",") if t.strip()),
                  recs_k=settings.recs_k, max_state_bytes=settings.max_state_bytes)
