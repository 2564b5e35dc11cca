"""Secret keys given as settings (HMAC keys for PII hashing, model snapshots, control records).

A module of its own below :mod:`clickpulse.settings` and :mod:`clickpulse.events`, which both
check keys, so that neither imports the other for it.
"""

from __future__ import annotations

from .errors import ConfigError

#: the shortest secret key accepted (bytes)
MIN_KEY_BYTES = 16


def secret_bytes(value: str, env_name: str, min_bytes: int = MIN_KEY_BYTES) -> bytes:
    """The key bytes of a secret setting: an even number of at least ``2 * min_bytes`` hex digits
    is decoded, anything else is taken as UTF-8 text (surrounding whitespace dropped); empty
    gives ``b""``.

    Raises
    ------
    ConfigError
        A non-empty key shorter than ``min_bytes`` bytes.
    """
    value = value.strip()
    if not value:
        return b""
    key = value.encode()
    if len(value) >= 2 * min_bytes and len(value) % 2 == 0:
        try:
            key = bytes.fromhex(value)
        except ValueError:
            pass
    if len(key) < min_bytes:
        raise ConfigError(f"{env_name} must be at least {min_bytes} bytes (e.g. `openssl rand -hex 32`)")
    return key
