"""Control messages on the raw topic: only a valid signature under CLICKPULSE_CONTROL_KEY makes one;
everything else claiming to be control is dead-lettered as forged_control (no Kafka: the worker's
ingest step is called with a message object)."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
import pytest
from prometheus_client import CollectorRegistry

from clickpulse.app import Worker
from clickpulse.events.control import CONTROL_HEADER, CONTROL_SIG_HEADER, control_headers
from clickpulse.observability.metrics import Metrics
from clickpulse.settings import Settings

import time

def _fresh() -> bytes:
    return orjson.dumps({"schema_version": 1, "control": "end_of_input", "source_partition": 1, "source_partitions": 2,
                         "run_id": "r1", "namespace": "clickpulse", "issued_at_ms": int(time.time() * 1000)})


BODY = _fresh()


@pytest.fixture(autouse=True)
def _fresh_body():
    """Each test's control is issued now: a body made at import time goes stale (the 10-minute
    freshness window) when the test session runs longer than that before reaching this file."""
    global BODY
    BODY = _fresh()


@dataclass
class Msg:
    value: bytes
    headers: list = field(default_factory=list)
    key: bytes | None = None
    topic: str = "clickpulse.events.raw"
    partition: int = 1
    offset: int = 7
    timestamp: float = 1_700_000_000.0


def _worker(key: str = "k" * 32, partitions: int = 2, engine=None) -> Worker:
    s = Settings(control_key=key, partitions=partitions)
    return Worker(None, s, Metrics(CollectorRegistry()), engine, None, None, {},  # type: ignore[arg-type]
                  {s.topic_raw: {}, s.topic_valid: {}})


def _ingest(w: Worker, msg: Msg) -> list:
    out: list = []
    assert w.ingest_one(msg, out) is None
    return out


def _reasons(out: list) -> list[str]:
    return [orjson.loads(v)["reason"] for t, _k, v, _p, _h in out if t.endswith(".dlq")]


@pytest.mark.parametrize("headers", [
    [(CONTROL_HEADER, b"end_of_input")],                                         # the header alone
    [(CONTROL_HEADER, b"end_of_input"), (CONTROL_SIG_HEADER, b"00" * 32)],       # a made-up signature
    [(CONTROL_HEADER, b"end_of_input"), (CONTROL_SIG_HEADER, b"\xff\xfe")],      # not even ASCII
    control_headers("another key entirely", BODY),                               # signed with the wrong key
], ids=["no-signature", "bad-signature", "binary-signature", "wrong-key"])
def test_unsigned_or_badly_signed_control_is_forged(headers):
    w = _worker()
    out = _ingest(w, Msg(BODY, headers))
    assert _reasons(out) == ["forged_control"]
    assert w.metrics.control_forged._value.get() == 1


def test_a_signature_does_not_cover_another_body():
    w = _worker()
    other = orjson.dumps({**orjson.loads(BODY), "source_partitions": 1})
    assert _reasons(_ingest(w, Msg(other, control_headers(w.settings.control_key, BODY)))) == ["forged_control"]


def test_without_a_key_no_control_is_accepted():
    w = _worker(key="")
    out = _ingest(w, Msg(BODY, [(CONTROL_HEADER, b"end_of_input"), (CONTROL_SIG_HEADER, b"00")]))
    assert _reasons(out) == ["forged_control"]
    assert "CLICKPULSE_CONTROL_KEY" in orjson.loads(out[0][2])["detail"]


def test_signed_control_is_forwarded_to_every_valid_partition():
    w = _worker()
    out = _ingest(w, Msg(BODY, control_headers(w.settings.control_key, BODY)))
    assert [(t, p) for t, _k, _v, p, _h in out] == [(w.settings.topic_valid, 0), (w.settings.topic_valid, 1)]
    fwd = orjson.loads(out[0][2])
    assert fwd["source_partition"] == 1 and fwd["source_partitions"] == 2   # the raw partition it came on
    assert fwd["run_id"] == "r1" and fwd["issued_at_ms"] == orjson.loads(BODY)["issued_at_ms"]


@pytest.mark.parametrize("change,why", [
    ({"namespace": "another-namespace"}, "namespace"),
    ({"issued_at_ms": int(time.time() * 1000) - 3_600_000}, "stale"),
    ({"issued_at_ms": None}, "stale"),
], ids=["other-namespace", "an-hour-old", "no-time"])
def test_a_genuinely_signed_control_from_elsewhere_or_from_the_past_is_refused(change, why):
    """A signed end of input captured from another namespace's (or an old) replay, re-sent."""
    w = _worker()
    body = orjson.dumps({**orjson.loads(BODY), **change})
    out = _ingest(w, Msg(body, control_headers(w.settings.control_key, body)))
    assert _reasons(out) == ["forged_control"] and why in orjson.loads(out[0][2])["detail"]


def test_the_same_signed_control_is_accepted_once():
    """Re-published (a new raw offset): a replay, refused. The same raw record read again (same
    offset: not committed before a rebalance) is a redelivery: forwarded again, not dead-lettered
    (a CI run dead-lettered 3 legitimate controls as forged after a worker restart)."""
    w = _worker()
    msg = Msg(BODY, control_headers(w.settings.control_key, BODY), offset=7)
    first = _ingest(w, msg)
    assert _reasons(first) == [] and len(first) == 2
    again = _ingest(w, msg)
    assert _reasons(again) == [] and again == first
    assert {orjson.loads(v)["raw_offset"] for _t, _k, v, _p, _h in again} == {7}
    assert _reasons(_ingest(w, Msg(BODY, msg.headers, offset=8))) == ["forged_control"]
    assert w.metrics.control_forged._value.get() == 1


def _body(**change) -> bytes:
    return orjson.dumps({**orjson.loads(BODY), **change})


def test_a_control_signed_for_one_partition_is_refused_on_every_other():
    """The report's replay: one captured control for raw partition 0, re-published with the same
    body and headers on partitions 1-3, ended the input of every partition."""
    w = _worker(partitions=4)
    body = _body(source_partition=0, source_partitions=4)
    headers = control_headers(w.settings.control_key, body)
    for p in (1, 2, 3):
        out = _ingest(w, Msg(body, headers, partition=p))
        assert _reasons(out) == ["forged_control"]
        assert "source partition 0, arrived on raw partition" in orjson.loads(out[0][2])["detail"]
    assert w.metrics.control_forged._value.get() == 3
    out = _ingest(w, Msg(body, headers, partition=0))          # where it was signed for: accepted
    assert _reasons(out) == [] and len(out) == 4


@pytest.mark.parametrize("src", [None, "1", True, 1.0, -1], ids=["missing", "string", "bool", "float", "negative"])
def test_a_control_must_name_the_partition_it_arrives_on(src):
    w = _worker()
    body = _body(source_partition=src) if src is not None else orjson.dumps(
        {k: v for k, v in orjson.loads(BODY).items() if k != "source_partition"})
    out = _ingest(w, Msg(body, control_headers(w.settings.control_key, body), partition=1))
    assert _reasons(out) == ["forged_control"]


def test_a_control_replayed_after_a_restart_is_refused():
    """The accepted control's id is in the partition's clock log (the changelog): a worker that
    restarts (new process, in-memory memory gone) refuses the captured message all the same."""
    from clickpulse.engine import clock_key
    from clickpulse.events.control import control_id
    from clickpulse.testing import memory_engine

    def valid_side(w: Worker, out: list) -> None:  # what the process agent does with the forwards
        for _t, _k, value, p, _h in out:
            fwd = orjson.loads(value)
            em = w.engine.end_of_input_step(p, fwd["source_partition"], fwd["source_partitions"], int(time.time() * 1000),
                                            control=control_id(fwd), issued_at_ms=fwd["issued_at_ms"],
                                            raw_offset=fwd["raw_offset"])
            w.engine.commit(em)
            w.engine.table[clock_key(p, lambda k, p=p: p)] = w.engine.checkpoint(p, {"valid": 0})

    first = _worker(engine=memory_engine())
    msg = Msg(BODY, control_headers(first.settings.control_key, BODY))
    out = _ingest(first, msg)
    assert _reasons(out) == []
    valid_side(first, out)
    table = dict(first.engine.table)

    restarted = _worker(engine=memory_engine())
    restarted.engine.restore([0, 1], list(table.items()), int(time.time() * 1000))
    replay = Msg(msg.value, msg.headers, offset=msg.offset + 5)   # re-published: a new raw offset
    out = _ingest(restarted, replay)
    assert _reasons(out) == ["forged_control"] and "already accepted" in orjson.loads(out[0][2])["detail"]
    # the raw record itself read again (its offset was not committed before the restart): forwarded
    # again, and the valid side applies the forwarded copies as redeliveries, not as forgeries
    out = _ingest(restarted, msg)
    assert _reasons(out) == [] and len(out) == 2
    for _t, _k, value, p, _h in out:
        fwd = orjson.loads(value)
        em = restarted.engine.end_of_input_step(p, fwd["source_partition"], fwd["source_partitions"],
                                                int(time.time() * 1000), control=control_id(fwd),
                                                issued_at_ms=fwd["issued_at_ms"], raw_offset=fwd["raw_offset"])
        assert em.counters.get(("control_forged", ())) is None

    fresh = _worker(engine=memory_engine())     # negative control: without the clock log it passes
    assert _reasons(_ingest(fresh, replay)) == []


def test_the_in_memory_ids_are_bounded_by_the_freshness_window(monkeypatch):
    import clickpulse.app as app_mod
    w = _worker()
    now = int(time.time() * 1000)
    w.controls_seen.update({f"old:{i}:0": (now - 700_000, i) for i in range(50)})
    assert _reasons(_ingest(w, Msg(BODY, control_headers(w.settings.control_key, BODY)))) == []
    assert list(w.controls_seen) == [f"r1:1:{orjson.loads(BODY)['issued_at_ms']}"]
    assert app_mod.CONTROL_MAX_AGE_MS == 600_000
