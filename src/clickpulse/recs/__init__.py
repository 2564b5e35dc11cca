"""Streaming recommendations: item-to-item co-occurrence learned online (:mod:`.cooccurrence`)
and its progressive evaluation (:mod:`.evaluate`). Pure and broker-free; see
``docs/recommendations.md``."""

from .cooccurrence import CoOccurrence, RecsConfig

__all__ = ["CoOccurrence", "RecsConfig"]
