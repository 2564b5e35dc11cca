"""SIGKILL at arbitrary points, broker-free (``tests/unit/crashsim.py``): every action of a run
without the crash is published at least once, nothing else is, and every copy is the same but for
``created_at`` and ``payload.recommendations`` (from the worker's in-memory model) — for one hop and for two (the ingest forwarding again after its restart).

The integration test ``tests/integration/test_delivery.py`` does the same with real processes and
a real broker at whatever point the kill lands; this one visits many kill points deterministically
(which batch, how much of its changelog the broker had, how far the commits and the ingest were).
"""

from __future__ import annotations

import pytest

from clickpulse.engine import Engine
from tests.oracle import comparable_action
from tests.unit import crashsim


def gaps(seed: int, hops: int, dedup: int = 32) -> list[str]:
    published, crash_free = crashsim.run(seed, hops=hops, dedup=dedup)
    drop = comparable_action  # all but created_at and payload.recommendations (docs/delivery.md)
    expected = {a["action_id"]: drop(a) for a in crash_free}
    first: dict[str, dict] = {}
    out = []
    for a in published:
        if a["action_id"] in first and first[a["action_id"]] != drop(a):
            out.append(f"a duplicate differs: {a}")
        first.setdefault(a["action_id"], drop(a))
    lost = set(expected) - set(first)
    extra = set(first) - set(expected)
    differ = [i for i in expected if i in first and expected[i] != first[i]]
    if lost:
        out.append(f"{len(lost)} lost, e.g. {expected[min(lost)]}")
    if extra:
        out.append(f"{len(extra)} not in the crash-free run, e.g. {first[min(extra)]}")
    if differ:
        out.append(f"{len(differ)} differ")
    # and the user states end as in the crash-free run (nothing applied twice, nothing missed)
    want = crashsim.crash_free_run(4, dedup)[1]
    got = crashsim.last_states
    wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if wrong:
        out.append(f"{len(wrong)} user states differ from the crash-free run's, e.g. {wrong[0]!r}")
    return out


@pytest.mark.parametrize("hops", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_a_sigkill_anywhere_loses_nothing_and_adds_nothing(seed, hops):
    assert gaps(seed, hops) == []


@pytest.mark.parametrize("hops", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_recovery_is_exact_without_relying_on_event_ids(seed, hops):
    """With a de-duplication depth of 2 almost every re-read event would escape the ids: the
    saved position and the raw positions alone make the recovery exact."""
    assert gaps(seed, hops, dedup=2) == []


def test_the_check_sees_events_forwarded_twice(monkeypatch):
    """Negative control: without the raw positions of forwarded events, the events the ingest
    forwards again after its restart are applied twice, and the check reports it."""
    real = Engine.redelivered
    monkeypatch.setattr(Engine, "redelivered", lambda self, p, topic, off, source=None: real(self, p, topic, off))
    assert any(gaps(seed, 2, dedup=2) for seed in range(3))


def test_the_check_sees_a_re_read_applied_twice(monkeypatch):
    """Negative control: without the saved position, the re-read events whose ids the users'
    states no longer hold are applied a second time, and the check reports it."""
    monkeypatch.setattr(Engine, "redelivered", lambda self, p, topic, off, source=None: False)
    assert any(gaps(seed, 1, dedup=2) for seed in range(3))


def test_an_action_is_the_same_bytes_in_another_process():
    """A re-published action comes from another process (the restarted worker): its bytes must
    not depend on the process's hash seed (CEL maps iterate in hash order; payload maps are
    sorted)."""
    import os
    import subprocess
    import sys
    code = ("import orjson\nfrom clickpulse.testing import memory_engine, event\neng = memory_engine()\n"
            "eng.process(0, event('add_to_cart', user='x', product_id='p', price=5.0, category='c',"
            " at='2019-10-01T10:00:00Z'), 0)\n"
            "a = eng.end_of_input(0, 0, 1, 0)[0]\nprint(orjson.dumps(a['payload']).decode())")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "4", "7")}
    assert len(outs) == 1, outs
