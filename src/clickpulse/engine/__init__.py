"""The batch engine step over state, models and rules (it imports them; they never import it)."""

from .emitted import Emitted, Failed
from .factory import build_engine
from .step import Engine

__all__ = ["Emitted", "Engine", "Failed", "build_engine"]
