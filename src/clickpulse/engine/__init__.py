"""The batch engine step over state, models and rules (it imports them; they never import it)."""

from .emitted import Emitted, Failed
from .factory import build_engine
from .step import CLOCK_KEY_PREFIX, Engine, clock_key

__all__ = ["CLOCK_KEY_PREFIX", "Emitted", "Engine", "Failed", "build_engine", "clock_key"]
