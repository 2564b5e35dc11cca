"""Metrics (Prometheus) and logging."""
