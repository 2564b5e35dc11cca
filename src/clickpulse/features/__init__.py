"""State -> feature dict for models and rules."""
