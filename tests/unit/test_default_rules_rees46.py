"""The default rules on the bundled REES46 sample (in-memory engine, replay mode, 4 partitions by
user id % 4): the cart- and browse-abandonment actions equal an independent plain-Python
computation over the CSV (tests/oracle.py), user and event time, one for one."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest

from clickpulse.events.contract import parse
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.testing import memory_engine
from tests.oracle import expected_actions_by_type, kafka_partition, partition_mod4

TYPES = ("cart_abandoned", "assistance_offer")


def _replay(flush: bool, partition_of=partition_mod4, partitions: int = 4, lateness_s: int = 60) -> list[dict]:
    eng = memory_engine(live=False, lateness_s=lateness_s)  # default rules, marketing consent assumed
    actions = []
    for raw in read_rees46(BUNDLED_SAMPLE):
        ev = parse(orjson.dumps(raw), None)
        actions += eng.process(partition_of(ev["user_id"]), ev, 0)[1]
    if flush:
        for p in range(partitions):
            for src in range(partitions):
                actions += eng.end_of_input(p, src, partitions, 0)
    return actions


def _pairs(actions: list[dict], typ: str) -> list[tuple[str, int]]:
    return sorted((a["user_key"], a["event_time_ms"]) for a in actions if a["type"] == typ)


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "no-flush"])
def test_default_timeout_triggers_match_the_oracle(flush):
    actions = _replay(flush)
    counts = Counter(a["type"] for a in actions)
    expected = expected_actions_by_type(flush, partition_mod4)
    msg = f"action counts {dict(sorted(counts.items()))}; oracle {({k: len(v) for k, v in expected.items()})}"
    for typ in TYPES:
        got = _pairs(actions, typ)
        exp = expected[typ]
        assert got == exp, (f"{typ}: {msg}; engine only {sorted(Counter(got) - Counter(exp))[:10]}, "
                            f"oracle only {sorted(Counter(exp) - Counter(got))[:10]}")
    assert all(a["trigger"] and a["rules_version"] for a in actions), msg
    trig = {"cart_abandoned": "cart_abandonment", "assistance_offer": "browse_abandonment"}
    assert all(a["trigger"] == trig[a["type"]] for a in actions if a["type"] in trig)
    assert len({a["action_id"] for a in actions}) == len(actions)


def test_oracle_figures():
    """The figures themselves (so a change in the sample or the oracle shows up here)."""
    figures = {flush: {k: len(v) for k, v in expected_actions_by_type(flush).items()} for flush in (False, True)}
    assert figures == {False: {"cart_abandoned": 1, "assistance_offer": 820},
                       True: {"cart_abandoned": 24, "assistance_offer": 1724}}


@pytest.mark.parametrize(("partition_of", "partitions", "lateness_s", "flush"), [
    pytest.param(lambda _u: 0, 1, 60, True, id="one partition, flush"),
    pytest.param(lambda u: int(u) % 7, 7, 0, False, id="id % 7, no lateness"),  # 931 offers, not 820
])
def test_oracle_follows_partitioning_and_lateness(partition_of, partitions, lateness_s, flush):
    """The watermark is per partition: without a flush, which timers the file's time passes
    depends on the partitioning and the lateness, and the oracle models both."""
    actions = _replay(flush, partition_of, partitions, lateness_s)
    expected = expected_actions_by_type(flush, partition_of, lateness_s)
    for typ in TYPES:
        assert _pairs(actions, typ) == expected[typ], typ


def test_flushed_actions_do_not_depend_on_the_partitioning():
    """Flushed, the sample gives the same actions on 1, 4 (user id % 4) or Kafka's murmur2
    partitions: a user's own event fires the timers its watermark passes before it is applied, so
    a quiet partition cannot let the user's next product_view re-arm a timer that is already past
    (users 519791231 and 546851868 used to get their assistance offer late on 4 partitions)."""
    one = expected_actions_by_type(True, lambda _u: 0)
    assert expected_actions_by_type(True, partition_mod4) == one == expected_actions_by_type(True, kafka_partition)
    offers = dict(one["assistance_offer"])
    assert offers["519791231"] == 1569888671000 and offers["546851868"] == 1569894637000
    eng_one = _replay(True, lambda _u: 0, 1)
    eng_four = _replay(True, partition_mod4, 4)
    assert _pairs(eng_one, "assistance_offer") == _pairs(eng_four, "assistance_offer") == one["assistance_offer"]
