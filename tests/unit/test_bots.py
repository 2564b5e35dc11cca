"""Bot detection (scenario S9): known crawler user agents and implausible event rates."""

from __future__ import annotations

import random
from types import SimpleNamespace

import crawleruseragents
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickpulse.rules.bots import (
    MAX_UA_CHARS,
    BotConfig,
    crawler_pattern,
    is_bot,
    observe,
    reason,
)
from clickpulse.settings import Settings

CFG = BotConfig()
T0 = 1_700_000_000_000  # epoch ms

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GOOGLEBOT_SMARTPHONE = (
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.6367.201 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)")
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
CURL = "curl/8.5.0"
BROWSERS = {
    "chrome_windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/124.0.0.0 Safari/537.36",
    "chrome_android": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/124.0.6367.82 Mobile Safari/537.36",
    "edge": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.80",
    "firefox_linux": "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "safari_macos": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                    "Version/17.4.1 Safari/605.1.15",
    "safari_iphone": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
                     "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
}


def ev(t: int, type_: str = "page_view", ua: str | None = None, **extra) -> dict:
    e = {"type": type_, "timestamp_ms": t, "properties": {}, **extra}
    if ua is not None:
        e["context"] = {"user_agent": ua}
    return e


def run(times_types, cfg: BotConfig = CFG, bot: dict | None = None) -> tuple[dict, list[tuple[int, str]]]:
    """Feed (timestamp, type) pairs in the given order; returns the state and the non-None results
    as (index, reason)."""
    bot = {} if bot is None else bot
    hits = []
    for i, (t, type_) in enumerate(times_types):
        r = observe(bot, ev(t, type_), cfg)
        if r is not None:
            hits.append((i, r))
    return bot, hits


# ------------------------------------------------------------------ crawler user agents
@pytest.mark.parametrize(("ua", "pattern"), [
    (GOOGLEBOT, "Googlebot\\/"),
    (GOOGLEBOT_SMARTPHONE, "Googlebot\\/"),
    ("Googlebot/2.1 (+http://www.google.com/bot.html)", "Googlebot\\/"),
    (BINGBOT, "bingbot"),
    (CURL, "^curl"),  # the list has curl (anchored, case-sensitive): "curl/..." is a crawler
    ("python-requests/2.31.0", "python-requests"),
])
def test_known_crawler_user_agents_are_flagged_on_their_first_event(ua, pattern):
    bot = {}
    r = observe(bot, ev(T0 + 5, ua=ua), CFG)
    assert r is not None and r.startswith("crawler user agent: ")
    assert r.endswith(f" [pattern {pattern}]")
    assert ua[:40] in r
    assert bot == {"flag": r, "at": T0 + 5}
    assert is_bot(bot) and reason(bot) == r
    assert crawler_pattern(ua) == pattern


def test_crawler_matching_is_the_librarys_case_sensitive_verdict():
    # what the list does, not what we would like it to do: patterns are case-sensitive
    assert crawler_pattern("Curl/8.5.0") is None
    assert crawler_pattern("googlebot/2.1") is None
    assert crawleruseragents.is_crawler("Curl/8.5.0") is False


def test_every_listed_instance_of_google_and_bing_crawlers_is_flagged():
    data = crawleruseragents.CRAWLER_USER_AGENTS_DATA
    entries = [d for d in data if d["pattern"] in ("Googlebot\\/", "bingbot")]
    assert len(entries) == 2
    instances = [ua for d in entries for ua in d.get("instances", [])]
    assert len(instances) >= 5
    for ua in instances:
        bot = {}
        assert observe(bot, ev(T0, ua=ua), CFG) is not None, ua
        assert is_bot(bot)


@pytest.mark.parametrize("name", sorted(BROWSERS))
def test_real_browser_user_agents_are_not_flagged(name):
    bot = {}
    for i in range(5):
        assert observe(bot, ev(T0 + 1000 * i, "product_view", ua=BROWSERS[name]), CFG) is None
    assert not is_bot(bot) and reason(bot) is None
    assert crawler_pattern(BROWSERS[name]) is None


@pytest.mark.parametrize("event", [
    {"type": "page_view", "timestamp_ms": T0},
    {"type": "page_view", "timestamp_ms": T0, "context": None},
    {"type": "page_view", "timestamp_ms": T0, "context": {}},
    {"type": "page_view", "timestamp_ms": T0, "context": {"user_agent": None}},
    {"type": "page_view", "timestamp_ms": T0, "context": {"user_agent": ""}},
    {"type": "page_view", "timestamp_ms": T0, "context": {"user_agent": 42}},
    {"type": "page_view", "timestamp_ms": T0, "context": "curl/8.5.0"},
    {"timestamp_ms": T0},
])
def test_missing_or_unusable_context_is_not_flagged(event):
    bot = {}
    assert observe(bot, event, CFG) is None
    assert not is_bot(bot)
    assert bot == {"e": [T0]}


def test_long_user_agents_are_matched_on_their_first_MAX_UA_CHARS_characters():
    long_bot = "Googlebot/2.1 " + "x" * 10_000
    bot = {}
    r = observe(bot, ev(T0, ua=long_bot), CFG)
    assert r == "crawler user agent: " + long_bot[:160] + "... [pattern Googlebot\\/]"
    hidden = "y" * MAX_UA_CHARS + " Googlebot/2.1"  # the crawler token is past the limit
    assert crawler_pattern(hidden) is None
    with pytest.raises(TypeError):
        crawler_pattern(None)  # type: ignore[arg-type]


def test_crawler_verdicts_are_cached_per_user_agent():
    ua = "Mozilla/5.0 (compatible; test-cache-probe) Firefox/99.0"
    crawler_pattern(ua)
    hits = crawler_pattern.cache_info().hits
    for _ in range(10):
        assert crawler_pattern(ua) is None
    assert crawler_pattern.cache_info().hits == hits + 10
    assert crawler_pattern.cache_info().maxsize == 4096


# ------------------------------------------------------------------ implausible rates
def forty_adds_in_three_seconds():
    return [(T0 + i * 75, "add_to_cart") for i in range(40)]  # 0 .. 2.925 s


def test_forty_add_to_cart_in_three_seconds_is_a_bot_from_the_21st():
    bot, hits = run(forty_adds_in_three_seconds())
    assert hits == [(20, "implausible rate: 21 add_to_cart within 10 s")]
    assert bot == {"flag": "implausible rate: 21 add_to_cart within 10 s", "at": T0 + 20 * 75}


def test_twenty_add_to_cart_over_ten_minutes_is_not_a_bot():
    seq = [(T0 + i * 30_000, "add_to_cart") for i in range(20)]  # one every 30 s
    bot, hits = run(seq)
    assert hits == [] and not is_bot(bot)
    # only the last add is within 10 s of the newest one; all events within 60 s of it are 2
    assert bot == {"c": [T0 + 19 * 30_000], "e": [T0 + 18 * 30_000, 30_000]}


def test_exactly_the_limit_is_not_a_bot_even_in_one_second():
    bot, hits = run([(T0 + i * 50, "add_to_cart") for i in range(20)])
    assert hits == [] and len(bot["c"]) == 20


def test_window_boundary_is_a_span_shorter_than_the_window():
    spanning_10_s = [(T0 + i * 500, "add_to_cart") for i in range(21)]  # 0 .. 10.000 s
    assert run(spanning_10_s)[1] == []
    spanning_9999 = [(t - (1 if i == 20 else 0), k) for i, (t, k) in enumerate(spanning_10_s)]
    assert run(spanning_9999)[1] == [(20, "implausible rate: 21 add_to_cart within 10 s")]


def test_any_event_type_counts_towards_the_overall_rate():
    seq = [(T0 + i * 100, "page_view") for i in range(301)]  # 301 events in 30 s
    bot, hits = run(seq)
    assert hits == [(300, "implausible rate: 301 events within 60 s")]
    assert run(seq[:300])[1] == []
    # 300 page views + 1 add: the add is the 301st event
    bot, hits = run(seq[:300] + [(T0 + 30_500, "add_to_cart")])
    assert hits == [(300, "implausible rate: 301 events within 60 s")]


@pytest.mark.parametrize("seed", range(20))
def test_shuffled_arrival_gives_the_same_verdict(seed):
    rng = random.Random(seed)
    burst = forty_adds_in_three_seconds()
    rng.shuffle(burst)
    bot, hits = run(burst)
    assert len(hits) == 1
    i, r = hits[0]
    assert r == "implausible rate: 21 add_to_cart within 10 s"
    assert i == 20  # whatever the order, 21 adds all lie within 3 s
    assert bot["at"] == burst[20][0]

    slow = [(T0 + k * 30_000, "add_to_cart") for k in range(20)]
    rng.shuffle(slow)
    bot, hits = run(slow)
    assert hits == [] and not is_bot(bot)
    assert len(bot["c"]) <= 21 and len(bot["e"]) <= 301


def test_late_add_within_the_window_completes_a_burst():
    seq = [(T0 + 2_000 + i * 100, "add_to_cart") for i in range(19)]  # 19 adds, 2.0 .. 3.8 s
    seq.append((T0 + 11_000, "add_to_cart"))  # 20 adds spanning 9 s: not yet
    assert run(seq)[1] == []
    late = seq + [(T0 + 1_500, "add_to_cart")]  # arrives last; 21 adds spanning 9.5 s
    assert run(late)[1] == [(20, "implausible rate: 21 add_to_cart within 10 s")]
    too_early = seq + [(T0 + 500, "add_to_cart")]  # 10.5 s before the newest: no window of 21
    assert run(too_early)[1] == []


def oracle_offending_windows(times: list[int], limit: int, window_ms: int) -> list[tuple[int, ...]]:
    """Brute force: every set of limit+1 consecutive (sorted) times spanning less than the window,
    as indices into ``times``."""
    order = sorted(range(len(times)), key=lambda k: times[k])
    return [tuple(order[j:j + limit + 1]) for j in range(len(order) - limit)
            if times[order[j + limit]] - times[order[j]] < window_ms]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 6_000), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_rate_verdict_against_a_brute_force_oracle(times, rnd):
    cfg = BotConfig(max_cart_adds=3, cart_window_ms=1_000, max_events=10_000, events_window_ms=1_000)
    arrival = list(range(len(times)))
    rnd.shuffle(arrival)
    bot, hits = run([(times[k], "add_to_cart") for k in arrival], cfg)
    offending = oracle_offending_windows(times, 3, 1_000)
    # never a false positive, whatever the order
    if hits:
        assert offending
    # a burst is found when all its events arrive before the newest time reaches first + window
    pos = {k: p for p, k in enumerate(arrival)}
    for window in offending:
        first = min(times[k] for k in window)
        last_arrival = max(pos[k] for k in window)
        newest = max(times[arrival[p]] for p in range(last_arrival + 1))
        if newest < first + 1_000:
            assert len(hits) == 1 and hits[0][0] <= last_arrival
    # in time order the verdict is exactly the oracle's
    sorted_hits = run([(t, "add_to_cart") for t in sorted(times)], cfg)[1]
    assert bool(sorted_hits) == bool(offending)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8_000), st.booleans()), min_size=1, max_size=40),
       st.integers(0, 2))
def test_state_after_every_event_is_the_recent_times_gap_encoded(events, disorder):
    """Whatever the arrival order, an unflagged state holds exactly the times later than
    newest - window of its kind, sorted and gap-encoded; a flag is raised exactly when the
    list with the new time would have more than the limit in a window containing it."""
    cfg = BotConfig(max_cart_adds=3, cart_window_ms=1_000, max_events=5, events_window_ms=2_000)
    if disorder == 0:
        events = sorted(events)
    elif disorder == 1:
        events = sorted(events, key=lambda e: e[0] // 700)  # blocks of 700 ms in arrival order
    bot = {}
    seen = {"c": [], "e": []}
    for t, is_add in events:
        before = {k: v[:] for k, v in seen.items()}
        r = observe(bot, ev(t, "add_to_cart" if is_add else "page_view"), cfg)
        if is_add:
            seen["c"].append(t)
        seen["e"].append(t)
        if r is not None:
            assert bot == {"flag": r, "at": t}
            kind, limit, window = (("c", 3, 1_000) if r.endswith("add_to_cart within 1 s")
                                   else ("e", 5, 2_000))
            kept = sorted(x for x in before[kind] if x > max(before[kind], default=t) - window) + [t]
            assert any(sum(a <= x < a + window for x in kept) > limit for a in kept if a <= t < a + window)
            return
        for kind, limit, window in (("c", 3, 1_000), ("e", 5, 2_000)):
            if kind == "e" or is_add:  # no window containing t was over the limit
                kept = sorted(x for x in before[kind] if x > max(before[kind], default=t) - window) + [t]
                assert not any(sum(a <= x < a + window for x in kept) > limit
                               for a in kept if a <= t < a + window)
            if seen[kind]:
                newest = max(seen[kind])
                recent = sorted(x for x in seen[kind] if x > newest - window)
                gaps = [recent[0], *(b - a for a, b in zip(recent, recent[1:]))]
                assert bot[kind] == gaps
            else:
                assert kind not in bot


def test_a_bot_next_to_a_real_user_at_the_same_time():
    bot_state, human_state = {}, {}
    human_adds = {T0 + 450, T0 + 1_800, T0 + 2_850}  # on the 75 ms grid of the bot
    for i in range(40):
        t = T0 + i * 75
        observe(bot_state, ev(t, "add_to_cart"), CFG)
        if t in human_adds:
            observe(human_state, ev(t, "add_to_cart", ua=BROWSERS["chrome_windows"]), CFG)
    assert is_bot(bot_state)
    assert not is_bot(human_state) and len(human_state["c"]) == 3


# ------------------------------------------------------------------ sticky flag, errors
def test_the_flag_is_sticky_and_keeps_the_first_reason():
    bot, hits = run(forty_adds_in_three_seconds())
    flagged = dict(bot)
    assert observe(bot, ev(T0 + 3_600_000, "page_view", ua=BROWSERS["safari_iphone"]), CFG) is None
    assert observe(bot, ev(T0 + 3_600_001, "page_view", ua=GOOGLEBOT), CFG) is None
    assert bot == flagged and reason(bot) == "implausible rate: 21 add_to_cart within 10 s"

    crawler = {}
    first = observe(crawler, ev(T0, ua=GOOGLEBOT), CFG)
    run(forty_adds_in_three_seconds(), bot=crawler)
    assert reason(crawler) == first and crawler["at"] == T0


@pytest.mark.parametrize("bad", [None, "1700000000000", 1.7e12, True])
def test_a_missing_or_non_int_timestamp_raises_and_changes_nothing(bad):
    bot = {"e": [T0]}
    event = ev(T0, "add_to_cart", ua=GOOGLEBOT)
    if bad is None:
        del event["timestamp_ms"]
    else:
        event["timestamp_ms"] = bad
    with pytest.raises(ValueError, match="timestamp_ms"):
        observe(bot, event, CFG)
    assert bot == {"e": [T0]}


# ------------------------------------------------------------------ state size
def test_state_of_an_ordinary_user_is_a_few_dozen_bytes():
    bot, hits = run([(T0, "page_view"), (T0 + 12_000, "product_view"), (T0 + 31_500, "add_to_cart")])
    assert hits == []
    assert bot == {"e": [T0, 12_000, 19_500], "c": [T0 + 31_500]}
    assert orjson.loads(orjson.dumps(bot)) == bot
    assert len(orjson.dumps(bot)) == 53


def test_state_is_serialisable_and_bounded_after_10000_events():
    # a very busy human: 4 events/s (240/min < 300), an add every 1.25 s (8 per 10 s < 20)
    rng = random.Random(7)
    seq = [(T0 + i * 250 + rng.randrange(0, 50), "add_to_cart" if i % 5 == 0 else "page_view")
           for i in range(10_000)]
    # arrival disorder of up to 2 s
    seq = [x for _, x in sorted(((t + rng.randrange(0, 2_000), (t, k)) for t, k in seq))]
    bot, hits = run(seq)
    assert hits == [] and not is_bot(bot)
    assert set(bot) == {"c", "e"}
    assert 200 <= len(bot["e"]) <= CFG.max_events + 1
    assert 1 <= len(bot["c"]) <= CFG.max_cart_adds + 1
    raw = orjson.dumps(bot)
    assert orjson.loads(raw) == bot
    assert len(raw) < 1_500
    assert all(type(x) is int for x in bot["e"] + bot["c"])


def test_state_of_a_flagged_user_stops_growing():
    seq = [(T0 + i * 10, "add_to_cart") for i in range(10_000)]
    bot, hits = run(seq)
    assert len(hits) == 1
    assert bot == {"flag": "implausible rate: 21 add_to_cart within 10 s", "at": T0 + 200}
    assert len(orjson.dumps(bot)) < 100


# ------------------------------------------------------------------ config
def test_config_from_settings_uses_defaults_for_missing_fields():
    assert BotConfig.from_settings(Settings()) == BotConfig()
    assert BotConfig.from_settings(SimpleNamespace()) == BotConfig(20, 10_000, 300, 60_000)
    s = SimpleNamespace(bot_max_cart_adds=5, bot_cart_window_s=2.5, bot_max_events=50,
                        bot_events_window_ms=30_000)
    assert BotConfig.from_settings(s) == BotConfig(5, 2_500, 50, 30_000)


@pytest.mark.parametrize("kwargs", [{"max_cart_adds": 0}, {"cart_window_ms": 0}, {"max_events": -1},
                                    {"events_window_ms": 1.5}])
def test_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        BotConfig(**kwargs)


def test_custom_thresholds_are_used_and_in_the_reason():
    cfg = BotConfig(max_cart_adds=2, cart_window_ms=2_500)
    bot, hits = run([(T0, "add_to_cart"), (T0 + 2_000, "add_to_cart"), (T0 + 2_400, "add_to_cart")], cfg)
    assert hits == [(2, "implausible rate: 3 add_to_cart within 2.5 s")]
