"""The one error tree of clickpulse.

Every exception raised on purpose derives from :class:`ClickpulseError`; causes are chained
with ``raise ... from err``.
"""

from __future__ import annotations


class ClickpulseError(Exception):
    """Root of every error clickpulse raises on purpose."""


class ConfigError(ClickpulseError):
    """A setting (env var ``CLICKPULSE_*`` or CLI flag) has an invalid value."""


class InvalidEvent(ClickpulseError):
    """An input message cannot become a canonical event.

    Parameters
    ----------
    reason
        A stable, low-cardinality code used as the Prometheus label and the dead-letter
        ``reason`` field; one of :data:`clickpulse.events.contract.DLQ_REASONS`.
    detail
        Human-readable explanation (which field, what was wrong).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DatasetError(ClickpulseError):
    """A replay dataset file cannot be read (missing, wrong format, bad header)."""


class ServiceError(ClickpulseError):
    """A required service (Kafka, Redis, the worker) is not reachable or failed."""


def error_text(err: BaseException) -> str:
    """``"<Type>: <message>"`` for a log line or an error message, without repeating the type
    when the message already starts with it (aiokafka's errors do:
    ``str(KafkaConnectionError("x")) == "KafkaConnectionError: x"``).

    >>> error_text(ValueError("bad")), error_text(ValueError())
    ('ValueError: bad', 'ValueError')
    """
    name, text = type(err).__name__, str(err)
    if text.startswith(name):
        return text
    return f"{name}: {text}" if text else name
