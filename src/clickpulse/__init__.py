"""clickpulse: real-time behavioral analytics and personalization on Kafka.

Pipeline stages are plain functions in subpackages (``events``, ``state``, ``actions``,
``serving``, ``observability``); the Faust wiring lives in :mod:`clickpulse.app`.
"""

__version__ = "0.1.0"
