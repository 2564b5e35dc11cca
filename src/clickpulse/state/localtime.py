"""The site's local calendar: which local day an event-time instant falls on, DST-correct.

clickpulse keeps "day" windows (the ``7d`` and ``today`` spans of the rules' ``count``, the
per-day category views, day-based cooldowns, ``local.date`` in rules) in the **site time zone**
(setting ``CLICKPULSE_TIMEZONE``, an IANA name such as ``America/New_York``; default ``UTC``).
A local day runs from local midnight to the next local midnight, so it lasts 23 or 25 hours on
the days a daylight-saving transition falls on; minute and hour buckets stay absolute (an hour is
an hour), so no hour is merged or counted twice across a transition.

Day numbers are *local* epoch days: the day whose local date is ``1970-01-01`` is 0, so in UTC the
day of ``t`` is ``t // 86_400_000`` exactly as before, and in any zone
``day(t) = (t + offset(t)) // 86_400_000`` where ``offset(t)`` is the zone's UTC offset at ``t``
(from :mod:`zoneinfo`, the IANA tz database; ``tzdata`` supplies it where the system has none).

The time zone is one per process: it is a property of the site (one namespace, one shop), set
once when the engine is built (:func:`set_site_timezone`, from ``Settings.timezone``) and read on
every event. Offsets are cached per 15-minute UTC slot (every UTC offset in use since 1970 is a
multiple of 15 minutes and transitions fall on such slots; a slot whose two ends have different
offsets is never cached and computed exactly).

>>> set_site_timezone("America/New_York")
>>> start, end = day_bounds(local_day(1_741_500_000_000))   # 2025-03-09, the spring-forward day
>>> day_date(local_day(1_741_500_000_000)), (end - start) / 3_600_000
('2025-03-09', 23.0)
>>> set_site_timezone("UTC"); local_day(86_400_000)
1
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_MS = 86_400_000
_SLOT_MS = 900_000  # 15 minutes
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

_zone: ZoneInfo | None = None  # None: UTC, the fast path
_name = "UTC"
_offsets: dict[int, int] = {}  # 15-minute UTC slot -> UTC offset in ms


def check_timezone(name: str) -> ZoneInfo:
    """The :class:`zoneinfo.ZoneInfo` of an IANA name.

    Raises
    ------
    ValueError
        ``name`` is not a time zone of the IANA database (``Europe/Berlin``, ``UTC``...).
    """
    try:
        if not name or name != name.strip() or name.startswith("/") or ".." in name:
            raise ValueError
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"unknown time zone {name!r}: give an IANA name such as 'Europe/Berlin' or 'UTC'") from e


def set_site_timezone(name: str | None) -> None:
    """Make ``name`` (IANA; ``None`` or ``"UTC"``: UTC) the process's site time zone.

    Raises
    ------
    ValueError
        Unknown time zone (see :func:`check_timezone`).
    """
    global _zone, _name
    if name in (None, "", "UTC", "Etc/UTC"):
        _zone, _name = None, "UTC"
    else:
        _zone, _name = check_timezone(name), name
    _offsets.clear()


def site_timezone() -> str:
    """The IANA name of the site time zone in force."""
    return _name


def _offset_at(t_ms: int) -> int:
    off = datetime.fromtimestamp(t_ms / 1000, _zone).utcoffset()
    return 0 if off is None else int(off.total_seconds() * 1000)


def utc_offset_ms(t_ms: int) -> int:
    """The site zone's UTC offset at event time ``t_ms`` (epoch ms), in ms (``-18000000`` for EST)."""
    if _zone is None:
        return 0
    slot = t_ms // _SLOT_MS
    off = _offsets.get(slot)
    if off is not None:
        return off
    start = slot * _SLOT_MS
    try:
        a, b = _offset_at(start), _offset_at(start + _SLOT_MS - 1)
    except (OverflowError, OSError, ValueError):  # outside what datetime represents: UTC
        return 0
    if a != b:  # a transition inside this slot (none since 1970 on the IANA zones): exact
        return _offset_at(t_ms)
    if len(_offsets) > 65_536:
        _offsets.clear()
    _offsets[slot] = a
    return a


def local_day(t_ms: int) -> int:
    """The local epoch day (local date ``1970-01-01`` = 0) of event time ``t_ms`` (epoch ms)."""
    if _zone is None:
        return t_ms // DAY_MS
    return (t_ms + utc_offset_ms(t_ms)) // DAY_MS


def day_date(day: int) -> str:
    """The ISO date ``YYYY-MM-DD`` of a local epoch day."""
    return date.fromordinal(day + _EPOCH_ORDINAL).isoformat()


def day_bounds(day: int) -> tuple[int, int]:
    """``(start_ms, end_ms)``: the event-time interval of a local epoch day, local midnight to
    the next local midnight (23, 24 or 25 hours long)."""
    if _zone is None:
        return day * DAY_MS, (day + 1) * DAY_MS

    def midnight(d: int) -> int:
        local = datetime.combine(date.fromordinal(d + _EPOCH_ORDINAL), time(0), tzinfo=_zone)
        return int(local.astimezone(UTC).timestamp() * 1000)

    return midnight(day), midnight(day + 1)


def local_clock(t_ms: int) -> tuple[str, int, int]:
    """``(date, hour, weekday)`` of event time ``t_ms`` on the site's local clock: ISO date,
    hour 0-23, weekday 0 (Monday) - 6 (Sunday)."""
    local_ms = t_ms + utc_offset_ms(t_ms)
    day, rest = divmod(local_ms, DAY_MS)
    return day_date(day), rest // 3_600_000, (day + 3) % 7  # 1970-01-01 was a Thursday


__all__ = ["DAY_MS", "check_timezone", "day_bounds", "day_date", "local_clock", "local_day", "set_site_timezone",
           "site_timezone", "utc_offset_ms"]
