"""Global segment sizes: an engine's own partitions' live counts plus the counts other workers
published for theirs (``Engine.set_remote_segment_counts``), and the ``min_size`` gate on the sum."""

from __future__ import annotations

import pytest

from clickpulse.events.schemas import validation_errors
from clickpulse.testing import event, memory_engine
from tests.unit.test_triggers import add, rules, t

SEGMENT = rules("""
    version: "g1"
    segments:
      - name: carters
        when: 'count.add_to_cart["7d"] > 0 && count.purchase["7d"] == 0'
        min_size: 5
    triggers:
      - name: welcome
        on: {segment_enter: carters}
        action: {type: segment_welcome}
    """)


def feed(eng, user: str, hms: str, partition: int) -> list[dict]:
    return eng.process(partition, add(user, hms), 0)[1]


def test_remote_counts_join_the_size_and_open_the_gate():
    eng = memory_engine(rules=SEGMENT, lateness_s=0)
    assert feed(eng, "a", "10:00", 0) == [] and feed(eng, "b", "10:01", 1) == []
    assert eng.segment_size("carters") == eng.local_segment_size("carters") == 2
    assert not eng.segment_active("carters")
    # the other worker owns partitions 2 and 3: 1 + 1 members there
    eng.set_remote_segment_counts(2, {"carters": 1})
    eng.set_remote_segment_counts(3, {"carters": 1, "other": 7})
    assert eng.segment_size("carters") == 4 and eng.local_segment_size("carters") == 2
    assert not eng.segment_active("carters")
    # the fifth member (counted with the remote ones) makes min_size: its welcome fires here
    acts = feed(eng, "c", "10:02", 0)
    assert [(a["user_key"], a["trigger"]) for a in acts] == [("c", "welcome")]
    assert eng.segment_size("carters") == 5 and eng.local_segment_size("carters") == 3
    # without the remote counts the same engine state is too small again
    eng.set_remote_segment_counts(2, None)
    eng.set_remote_segment_counts(3, None)
    assert eng.segment_size("carters") == 3 and not eng.segment_active("carters")
    assert feed(eng, "d", "10:03", 1) == []


def test_an_owned_partition_uses_its_live_count_not_the_published_one():
    eng = memory_engine(rules=SEGMENT, lateness_s=0)
    feed(eng, "a", "10:00", 0)
    eng.set_remote_segment_counts(0, {"carters": 40})  # a stale publication of our own partition
    eng.set_remote_segment_counts(1, {"carters": 3})
    assert eng.segment_size("carters") == 1 + 3
    # partition 1 moves here (restore over the recovered table: no user of partition 1 in it)
    eng.restore([0, 1], eng.table.items(), 0)
    assert eng.segment_size("carters") == 1
    # partition 0 moves away: its last published count is used from now on
    eng.restore([1], eng.table.items(), 0)
    assert eng.segment_size("carters") == 40


def test_segment_counts_are_what_the_worker_publishes():
    eng = memory_engine(rules=SEGMENT, lateness_s=0)
    feed(eng, "a", "10:00", 0)
    feed(eng, "b", "10:01", 2)
    eng.process(2, event("purchase", user="b", at=t("10:02"), revenue=1.0), 0)
    assert eng.segment_counts() == {0: {"carters": 1}, 2: {}}
    eng.set_remote_segment_counts(1, {"carters": 9})
    assert eng.segment_counts() == {0: {"carters": 1}, 2: {}}  # never the remote ones
    rec = {"schema_version": 1, "partition": 0, "counts": eng.segment_counts()[0], "published_at_ms": 1,
           "rules_version": "g1+0"}
    assert validation_errors("segment_sizes", rec) == []
    assert validation_errors("segment_sizes", {**rec, "counts": {"carters": -1}}) != []


@pytest.mark.parametrize("partition, counts", [(-1, {}), (True, {}), (0, {"s": -1}), (0, {"s": 1.5}),
                                               (0, {"s": True}), (0, {3: 1})])
def test_bad_remote_counts_are_refused(partition, counts):
    eng = memory_engine(rules=SEGMENT)
    with pytest.raises(ValueError):
        eng.set_remote_segment_counts(partition, counts)
    assert eng.remote_segment_members == {}


def test_a_single_engine_is_unchanged_without_remote_counts():
    """One worker (or the offline engine): the size is over its own partitions, as before."""
    eng = memory_engine(rules=SEGMENT, lateness_s=0)
    got = []
    for i, user in enumerate("abcdef"):
        got += feed(eng, user, f"10:0{i}", i % 4)
    assert [a["user_key"] for a in got] == ["e", "f"]
    assert eng.remote_segment_members == {} and eng.segment_size("carters") == 6


# ---------------------------------------------------------------- the <ns>.segment-sizes records

GOOD = {"schema_version": 1, "partition": 2, "counts": {"carters": 3}, "published_at_ms": 1, "rules_version": None}


def test_a_record_of_the_sizes_topic_is_decoded():
    import orjson

    from clickpulse.app import segment_sizes_entry
    assert segment_sizes_entry(b"2", orjson.dumps(GOOD), 4) == (2, {"carters": 3})
    assert segment_sizes_entry(b"3", None, 4) == (3, None)  # a tombstone withdraws the counts


@pytest.mark.parametrize("key, value", [
    (None, GOOD), (b"", GOOD), (b"x", GOOD), (b"-1", GOOD), (b"4", GOOD), (b"\xff\xfe", GOOD), (b"9" * 400, GOOD),
    (b"2", b"not json"), (b"2", b"[]"), (b"2", {**GOOD, "partition": 1}), (b"2", {**GOOD, "counts": {"s": -1}}),
    (b"2", {**GOOD, "counts": {"s": "3"}}), (b"2", {**GOOD, "extra": 1}), (b"2", {**GOOD, "schema_version": 2}),
    (b"2", {"partition": 2, "counts": {}}),
])
def test_hostile_records_of_the_sizes_topic_are_refused(key, value):
    import orjson

    from clickpulse.app import segment_sizes_entry
    raw = orjson.dumps(value) if isinstance(value, dict) else value
    with pytest.raises(ValueError):
        segment_sizes_entry(key, raw, 4)


def test_a_float_count_that_passes_the_schema_is_refused_by_the_engine():
    """JSON Schema's ``integer`` admits 3.0; the engine does not (the worker skips the record)."""
    import orjson

    from clickpulse.app import segment_sizes_entry
    p, counts = segment_sizes_entry(b"2", orjson.dumps({**GOOD, "counts": {"carters": 3.0}}), 4)
    with pytest.raises(ValueError):
        memory_engine(rules=SEGMENT).set_remote_segment_counts(p, counts)
