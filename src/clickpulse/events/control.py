"""Control messages (end of a bounded input) and how a worker tells them from forgeries.

A control message closes a bounded input's event time: once every source partition has sent
``end_of_input``, the watermark becomes the end of time and every pending timer fires. That is
power over every user's timers, so the raw topic — which any producer with write access can
fill — never carries control by a header alone. A control message on the raw topic must carry
``clickpulse-control-sig``: the hex HMAC-SHA256 (RFC 2104) over
``b"clickpulse-control\\x00" + <control header value> + b"\\x00" + <message value>`` keyed with
``CLICKPULSE_CONTROL_KEY``. Anything else that claims to be control (the ``clickpulse-control``
header, without a valid signature, or with no key configured) is dead-lettered with reason
``forged_control`` and changes nothing. The ingest step re-publishes a verified control message
onto the internal valid topic, which only the worker may write (see the README's "Security and
privacy" section for the ACLs).

A genuine signature on a *captured* message proves nothing about where and when it is re-sent, so
the signed body binds its use (:func:`control_problem`): the namespace it is for, the raw
partition it is for (``source_partition`` must be the partition it arrived on: one captured
control cannot end the other partitions' input), and its issue time (``issued_at_ms`` within
:data:`CONTROL_MAX_AGE_MS` of now). Within that window a replay on the same partition is caught
by its id (:func:`control_id`): the worker remembers the ids it accepted, in memory and durably
in each partition's clock log (:meth:`clickpulse.state.clock.PartitionClock.accept_control`), so
a replay is refused after a restart too.

Examples
--------
>>> value = b'{"schema_version": 1, "control": "end_of_input", "source_partition": 0, "source_partitions": 1}'
>>> headers = control_headers("s3cret", value)
>>> verify_control("s3cret", dict(headers)[CONTROL_HEADER], value, dict(headers)[CONTROL_SIG_HEADER])
True
>>> verify_control("other", dict(headers)[CONTROL_HEADER], value, dict(headers)[CONTROL_SIG_HEADER])
False
>>> verify_control("", b"end_of_input", value, None)   # no key configured: control is refused
False
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

#: how old (or how far ahead, wall clock) a signed control message may be: a captured one cannot
#: be replayed later; the ids of accepted controls are remembered this long
CONTROL_MAX_AGE_MS = 600_000

CONTROL_HEADER = "clickpulse-control"
CONTROL_SIG_HEADER = "clickpulse-control-sig"
_DOMAIN = b"clickpulse-control\x00"


def _mac(key: str, kind: bytes, value: bytes) -> str:
    return hmac.new(key.encode(), _DOMAIN + kind + b"\x00" + value, hashlib.sha256).hexdigest()


def control_headers(key: str, value: bytes, kind: bytes = b"end_of_input") -> list[tuple[str, bytes]]:
    """The headers of a signed control message with body ``value``.

    Raises
    ------
    ValueError
        ``key`` is empty (``CLICKPULSE_CONTROL_KEY`` is not set: nothing can sign control).
    """
    if not key:
        raise ValueError("CLICKPULSE_CONTROL_KEY is not set: control messages cannot be signed")
    return [(CONTROL_HEADER, kind), (CONTROL_SIG_HEADER, _mac(key, kind, value).encode())]


def verify_control(key: str, kind: bytes, value: bytes | None, sig: bytes | None) -> bool:
    """True when ``sig`` is the valid signature of a control message (constant-time compare);
    always False without a key, a signature or a value."""
    if not key or sig is None or value is None:
        return False
    try:
        given = sig.decode("ascii")
    except UnicodeDecodeError:
        return False
    return hmac.compare_digest(_mac(key, kind, value), given)


def control_id(body: dict[str, Any]) -> str:
    """The identity of an end-of-input control: ``"<run_id>:<source_partition>:<issued_at_ms>"``.
    Every field is covered by the signature; two messages with the same id are one message sent
    twice (a replay), whatever their transport.

    >>> control_id({"run_id": "r1", "source_partition": 2, "issued_at_ms": 1700000000000})
    'r1:2:1700000000000'
    """
    return f"{str(body.get('run_id', ''))[:128]}:{body.get('source_partition')}:{body.get('issued_at_ms')}"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def control_problem(body: dict[str, Any], *, namespace: str, partition: int, now_ms: int,
                    max_age_ms: int = CONTROL_MAX_AGE_MS) -> str | None:
    """Why a validly signed end-of-input body may not be used here and now, or ``None``.

    ``partition``: the raw partition the message arrived on; ``now_ms``: the worker's wall clock.
    The body must name this ``namespace``, this ``partition`` as its ``source_partition`` and an
    ``issued_at_ms`` within ``max_age_ms`` of ``now_ms``. (Once-only use is checked by the caller
    with :func:`control_id`.)

    >>> body = {"control": "end_of_input", "namespace": "ns", "source_partition": 0, "issued_at_ms": 1_000}
    >>> control_problem(body, namespace="ns", partition=0, now_ms=2_000) is None
    True
    >>> control_problem(body, namespace="ns", partition=3, now_ms=2_000)
    'signed for source partition 0, arrived on raw partition 3 (replayed onto another partition)'
    """
    issued = body.get("issued_at_ms")
    src = body.get("source_partition")
    if body.get("namespace") != namespace:
        return f"signed for namespace {str(body.get('namespace'))[:64]!r}, not {namespace!r}"
    if not _int(src) or src != partition:
        return (f"signed for source partition {str(src)[:32]}, arrived on raw partition {partition} "
                "(replayed onto another partition)")
    if not _int(issued) or abs(now_ms - issued) > max_age_ms:
        return f"issued_at_ms {str(issued)[:32]} is not within {max_age_ms // 1000} s of now (stale or replayed)"
    return None
