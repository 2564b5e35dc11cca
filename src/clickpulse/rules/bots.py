"""Bot detection, so that bots never trigger marketing actions.

A user is flagged as a bot, once and for good (the flag is sticky), by the first of its events
that shows either:

* **A known crawler user agent.** ``event["context"]["user_agent"]`` matches one of the patterns
  of the crawler-user-agents project (Martin Monperrus et al.,
  https://github.com/monperrus/crawler-user-agents, MIT licence; about 1,500 regular expressions
  for search-engine crawlers, SEO and monitoring bots, HTTP libraries and command-line clients
  such as ``curl``, ``Wget``, ``python-requests``, ``HeadlessChrome``). The list is the PyPI
  package ``crawler-user-agents`` (import name ``crawleruseragents``), never a list of our own;
  the verdict is its :func:`crawleruseragents.is_crawler` with its default case-sensitive
  matching (the patterns are written for it: ``Googlebot/`` matches, ``googlebot/`` does not).
  Only the first :data:`MAX_UA_CHARS` characters are matched (real user agents are a few hundred
  characters; this bounds the regex time and the cache memory).
* **An implausible rate** in event time: more than ``max_cart_adds`` ``add_to_cart`` events
  (default 20) within ``cart_window_ms`` (default 10 s), or more than ``max_events`` events of any
  type (default 300) within ``events_window_ms`` (default 60 s). "Within" means a span of event
  times shorter than the window: 21 adds at 0.0 s ... 9.999 s are a bot, 21 adds at 0 s ... 10 s
  are not. ``add_to_cart`` events are counted, not quantities (adding 40 units of one product in
  one event is a normal order). The defaults are conservative choices of ours, not measured
  thresholds: a human using a normal shop UI cannot add 21 items to the cart in 10 s (each add is
  a click plus a page or widget round trip), nor produce 5 tracked events per second for a whole
  minute; scripted shopping (scalpers, load tests, scrapers replaying a session) easily does.
  They are :class:`BotConfig` fields, read from the settings ``bot_max_cart_adds``,
  ``bot_cart_window_s`` (or ``_ms``), ``bot_max_events``, ``bot_events_window_s`` (or ``_ms``)
  when those exist (:meth:`BotConfig.from_settings`).

The detection is pure and deterministic: no clocks, only the event's ``timestamp_ms``.

State
-----
The bot state is a small dict kept inside the user's state (it goes through ``orjson``): only
``str``, ``int`` and lists of ``int``. A new user starts with ``{}``. Keys, each present only
when needed:

``"flag"`` : str
    the reason, set once (sticky); see :func:`reason`.
``"at"`` : int
    epoch milliseconds, event time of the event that set the flag.
``"c"``, ``"e"`` : list[int]
    the recent event times of ``add_to_cart`` events and of all events, sorted ascending and
    gap-encoded: ``[t0, t1 - t0, t2 - t1, ...]`` in epoch milliseconds (exact, no rounding).
    Only times later than ``newest - window`` are kept (newest = the latest event time seen of
    that kind), so while a user is not flagged a list holds at most ``max`` times (``max + 1``
    of them would lie within one window and flag the user). Once flagged,
    both lists are deleted and nothing more is tracked.

Bytes per user (``len(orjson.dumps(bot))``, measured): an ordinary user with 3 events within a
minute, one of them an ``add_to_cart``, 53 bytes (one 13-digit epoch time per list plus small
gaps); a user at one event per 10 s, 51 bytes; a very busy human (4 events/s, an add every
1.25 s) about 1.0 KB; the worst case before flagging (300 events in just under 60 s, 20 of them
adds within 10 s) about 1.3 KB (gaps of ~200 ms are 3-4 digits each, never more than 5 since a
kept gap is shorter than the window); a flagged user 70 bytes (rate reason) to about 300 bytes
(crawler reason quoting the user agent). Millisecond resolution was kept: gap encoding already
makes a timestamp cost about what a per-second count would, and it keeps the windows exact.

Cost (measured on the development machine): a cached user-agent verdict 0.1-0.2 us; an uncached
one 70-140 us for a browser user agent (no pattern matches: all ~1,500 are tried), ~14 us for a
crawler; the first call compiles the library's patterns (~17 ms). :func:`observe` takes about
1 us per event for an ordinary user, 3 us for a busy one when events arrive in time order, 14 us
when they arrive out of order (the list is then decoded and re-encoded), 0.05 us once flagged.

Arrival order
-------------
Events need not arrive sorted by time. A new event is inserted at its place in the sorted list
and every window that contains it is checked (the others were checked when their own last
event came), so a burst is detected whatever the order in which its events arrive, as long as
they all arrive before the user's newest event time has moved a whole window past the burst's
first event (disorder of less than one window). Never a false positive: every count is of real
events. An event older
than ``newest - window`` at arrival is still checked against the times kept, but older ones it
could have been counted with are gone, so a burst delayed by more than a window relative to
the user's later events may be missed: the price of bounded memory (the alternative is to keep
every timestamp).

Examples
--------
>>> cfg = BotConfig()
>>> bot = {}
>>> adds = [{"type": "add_to_cart", "timestamp_ms": 1_000 + 100 * i} for i in range(20)]
>>> [observe(bot, e, cfg) for e in adds] == [None] * 20  # 20 adds in 1.9 s: not yet
True
>>> observe(bot, {"type": "add_to_cart", "timestamp_ms": 3_000}, cfg)
'implausible rate: 21 add_to_cart within 10 s'
>>> is_bot(bot), bot
(True, {'flag': 'implausible rate: 21 add_to_cart within 10 s', 'at': 3000})
>>> crawler = {}
>>> ua = "Googlebot/2.1 (+http://www.google.com/bot.html)"
>>> observe(crawler, {"type": "page_view", "timestamp_ms": 5, "context": {"user_agent": ua}}, cfg)
'crawler user agent: Googlebot/2.1 (+http://www.google.com/bot.html) [pattern Googlebot\\\\/]'
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import cache, lru_cache
from itertools import accumulate
from typing import Any

import crawleruseragents

__all__ = ["CART_ADD", "MAX_UA_CHARS", "BotConfig", "crawler_pattern", "is_bot", "observe", "reason"]

CART_ADD = "add_to_cart"
"""The canonical event type counted by the cart-add rate."""
MAX_UA_CHARS = 1024
"""Only this many leading characters of a user agent are matched and cached."""
UA_CACHE_SIZE = 4096
"""Distinct (truncated) user agents whose verdict is cached: at most ~4 MB of keys."""
REASON_UA_CHARS = 160
"""Characters of the user agent quoted in a crawler reason (the state stays small)."""


@dataclass(frozen=True)
class BotConfig:
    """Thresholds of the rate checks. Counts are events, windows milliseconds of event time.

    A user is a bot when more than ``max_cart_adds`` ``add_to_cart`` events have event times
    spanning less than ``cart_window_ms``, or more than ``max_events`` events of any type span
    less than ``events_window_ms``. Raises :class:`ValueError` if a count is < 1 or a window
    <= 0 (or either is not an int).
    """

    max_cart_adds: int = 20
    cart_window_ms: int = 10_000
    max_events: int = 300
    events_window_ms: int = 60_000

    def __post_init__(self) -> None:
        for name in ("max_cart_adds", "cart_window_ms", "max_events", "events_window_ms"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BotConfig.{name} must be an int >= 1, got {v!r}")

    @classmethod
    def from_settings(cls, s: Any) -> BotConfig:
        """From :class:`clickpulse.settings.Settings`, defaults for what it does not have.

        Reads ``bot_max_cart_adds`` and ``bot_max_events`` (counts), and the windows as
        ``bot_cart_window_ms`` / ``bot_events_window_ms`` if present, else
        ``bot_cart_window_s`` / ``bot_events_window_s`` (seconds, rounded to ms).
        """
        d = cls()
        return cls(max_cart_adds=int(getattr(s, "bot_max_cart_adds", d.max_cart_adds)),
                   cart_window_ms=_window_ms(s, "bot_cart_window", d.cart_window_ms),
                   max_events=int(getattr(s, "bot_max_events", d.max_events)),
                   events_window_ms=_window_ms(s, "bot_events_window", d.events_window_ms))


def _window_ms(s: Any, name: str, default: int) -> int:
    ms = getattr(s, f"{name}_ms", None)
    if ms is not None:
        return int(ms)
    sec = getattr(s, f"{name}_s", None)
    return default if sec is None else round(float(sec) * 1000)


@cache
def _compiled_patterns() -> tuple[re.Pattern[str], ...]:
    # one compiled regex per pattern of the library's data, only to name the pattern that matched
    # (``crawleruseragents.matching_crawlers`` re-compiles through ``re``'s small cache: ~25 ms)
    return tuple(re.compile(d["pattern"]) for d in crawleruseragents.CRAWLER_USER_AGENTS_DATA)


@lru_cache(maxsize=UA_CACHE_SIZE)
def _crawler_pattern(ua: str) -> str | None:
    if not crawleruseragents.is_crawler(ua):
        return None
    return next((p.pattern for p in _compiled_patterns() if p.search(ua)), "?")


def crawler_pattern(user_agent: str) -> str | None:
    """The crawler-user-agents pattern that ``user_agent`` matches, or ``None`` for no crawler.

    The verdict is :func:`crawleruseragents.is_crawler` (case-sensitive) on the first
    :data:`MAX_UA_CHARS` characters; results are cached per distinct (truncated) string, LRU,
    :data:`UA_CACHE_SIZE` entries. The first call compiles the library's patterns (~20 ms), the
    first crawler match also compiles them one by one to name the pattern (~25 ms). Raises
    :class:`TypeError` if ``user_agent`` is not a ``str``.

    >>> crawler_pattern("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)")
    'bingbot'
    >>> crawler_pattern("Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0") is None
    True
    """
    if not isinstance(user_agent, str):
        raise TypeError(f"user_agent must be a str, got {type(user_agent).__name__}")
    return _crawler_pattern(user_agent[:MAX_UA_CHARS])


crawler_pattern.cache_info = _crawler_pattern.cache_info  # type: ignore[attr-defined]
crawler_pattern.cache_clear = _crawler_pattern.cache_clear  # type: ignore[attr-defined]


def _densest(times: list[int], t: int, window_ms: int) -> int:
    """Most of the sorted ``times`` in one window ``[a, a + window_ms)`` that contains ``t``."""
    lo = bisect_right(times, t - window_ms)
    hi = bisect_right(times, t)
    return max(bisect_left(times, times[j] + window_ms, lo=j) - j for j in range(lo, hi))


def _record(bot: dict[str, Any], key: str, t: int, limit: int, window_ms: int) -> int:
    """Add ``t`` to the gap-encoded list ``bot[key]``.

    Returns the count of the densest window if more than ``limit`` times, ``t`` among them, span
    less than ``window_ms`` (``bot[key]`` is then left as it was), else 0 after storing the list
    trimmed to the times later than ``newest - window_ms``. Windows without ``t`` were checked
    when their own last time came.
    """
    enc = bot.get(key)
    if not enc:
        bot[key] = [t]
        return 0
    newest = sum(enc)
    if t >= newest:  # in time order, the common case: no decoding
        k = len(enc) - limit  # the window of limit + 1 times ending at t starts at index k
        if k >= 0 and t - sum(enc[:k + 1]) < window_ms:
            return _densest([*accumulate(enc), t], t, window_ms)
        horizon = t - window_ms
        first, d = enc[0], 0
        while first <= horizon:
            d += 1
            if d == len(enc):
                bot[key] = [t]
                return 0
            first += enc[d]
        if d:
            bot[key] = [first, *enc[d + 1:], t - newest]
        else:  # nothing dropped: the same list plus the new gap, in place (the common case)
            enc.append(t - newest)
        return 0
    times = list(accumulate(enc))  # out of order: decode, insert, check, trim, encode
    i = bisect_right(times, t)
    times.insert(i, t)
    if any(times[j + limit] - times[j] < window_ms
           for j in range(max(0, i - limit), min(i, len(times) - 1 - limit) + 1)):
        return _densest(times, t, window_ms)
    del times[:bisect_right(times, times[-1] - window_ms)]
    bot[key] = [times[0], *(b - a for a, b in zip(times, times[1:]))]
    return 0


def _secs(ms: int) -> str:
    return f"{ms / 1000:g}"


def observe(bot: dict[str, Any], event: dict[str, Any], cfg: BotConfig) -> str | None:
    """Update the bot state ``bot`` (in place) with one canonical event.

    Parameters
    ----------
    bot
        The user's bot state, ``{}`` for a new user (shape in the module docstring).
    event
        A canonical event: ``"timestamp_ms"`` (int, epoch milliseconds, required), ``"type"``
        (str; ``"add_to_cart"`` counts towards the cart rate, every event towards the overall
        rate), ``"context"`` (optional dict; its ``"user_agent"``, if a non-empty str, is
        checked against the crawler list). Other keys (``"properties"`` ...) are ignored.
        Duplicates should be dropped before (each call counts as one event).
    cfg
        The thresholds.

    Returns
    -------
    str | None
        The reason when *this* event makes the user a bot for the first time, e.g.
        ``"crawler user agent: Googlebot/2.1 ... [pattern Googlebot\\/]"`` or
        ``"implausible rate: 21 add_to_cart within 10 s"`` (or ``"... 301 events within 60 s"``);
        ``bot["flag"]`` is then the reason and ``bot["at"]`` the event's time, and the rate
        lists are deleted. ``None`` otherwise, always ``None`` for an already flagged user
        (whose state is then not touched).

    Raises
    ------
    ValueError
        ``event["timestamp_ms"]`` is missing or not an int (nothing is changed).
    """
    if "flag" in bot:
        return None
    t = event.get("timestamp_ms")
    if not isinstance(t, int) or isinstance(t, bool):
        raise ValueError(f"event timestamp_ms must be an int (epoch ms), got {t!r}")
    why = None
    ctx = event.get("context")
    ua = ctx.get("user_agent") if isinstance(ctx, dict) else None
    if isinstance(ua, str) and ua:
        pattern = _crawler_pattern(ua[:MAX_UA_CHARS])
        if pattern is not None:
            quoted = ua if len(ua) <= REASON_UA_CHARS else ua[:REASON_UA_CHARS] + "..."
            why = f"crawler user agent: {quoted} [pattern {pattern}]"
    if why is None and event.get("type") == CART_ADD:
        n = _record(bot, "c", t, cfg.max_cart_adds, cfg.cart_window_ms)
        if n:
            why = f"implausible rate: {n} {CART_ADD} within {_secs(cfg.cart_window_ms)} s"
    if why is None:
        n = _record(bot, "e", t, cfg.max_events, cfg.events_window_ms)
        if n:
            why = f"implausible rate: {n} events within {_secs(cfg.events_window_ms)} s"
    if why is None:
        return None
    bot.pop("c", None)
    bot.pop("e", None)
    bot["flag"] = why
    bot["at"] = t
    return why


def is_bot(bot: dict[str, Any]) -> bool:
    """Whether the bot state ``bot`` (see :func:`observe`) has been flagged. ``{}`` is not."""
    return "flag" in bot


def reason(bot: dict[str, Any]) -> str | None:
    """The reason the user was flagged (the string :func:`observe` returned then), or ``None``."""
    return bot.get("flag")
