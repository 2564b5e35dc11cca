"""Serving: Redis profiles."""
