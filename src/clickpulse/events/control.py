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
