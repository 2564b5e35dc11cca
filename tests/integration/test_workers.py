"""Several worker processes on one namespace, against the real broker and Redis.

* **Global segment sizes.** Two workers share four partitions; 60 users enter a segment with
  ``min_size: 50``, 15 per partition, so neither worker alone has 50 members. Through the
  compacted ``<ns>.segment-sizes`` topic each worker learns the other's counts: both report the
  segment active with 60 members, and the next entrant's ``segment_enter`` trigger fires (with
  per-worker counts it would be too small on either worker).
* **State moves, nothing is lost.** Four partitions, three workers: the bundled REES46 sample is
  replayed in three parts; a third worker joins after the first, one of the first two is
  SIGKILLed after the second. At the end every user's lifetime totals (events, orders, revenue;
  from the table's changelog, the state the workers recover from) equal the in-memory engine's
  over the same events, and the actions meet the stated guarantee (docs/delivery.md): every
  duplicate identical to its first copy but for ``created_at``; every action of a crash-free run
  present (a gap is reported with its counts, as test_delivery does, while that guarantee is not
  yet met after a SIGKILL).
"""

from __future__ import annotations

import asyncio
import re
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from clickpulse.engine import CLOCK_KEY_PREFIX
from clickpulse.errors import ServiceError
from clickpulse.events.contract import parse
from clickpulse.events.schemas import validation_errors
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.ingest.replay import messages, publish
from clickpulse.runtime import free_port, read_topic, wait_caught_up
from clickpulse.state.user import UserState
from clickpulse.testing import memory_engine
from tests.integration.conftest import end_of_input, produce, topic_values, wait_for
from tests.oracle import comparable_action, kafka_partition

pytestmark = pytest.mark.integration

MODEL_TYPES = {"high_intent", "churn_risk"}
READY = re.compile(rb"clickpulse ready: partitions \[([0-9, ]*)\]")


def owned(w) -> set[int] | None:
    """The partitions a worker process says it holds after its latest rebalance (its log)."""
    found = READY.findall(w.log_path.read_bytes())
    if not found:
        return None
    return {int(p) for p in found[-1].replace(b" ", b"").split(b",") if p}


def another(s, tmp_path: Path, i: int):
    """The same namespace for one more worker process: its own web port and data folder."""
    return s.replace(web_port=free_port(), data_dir=str(tmp_path / f"{s.namespace}-w{i}"))


def processed(workers_) -> int:
    """Events processed so far by the live workers (``clickpulse_events_processed_total``)."""
    n = 0
    for w in workers_:
        if not w.alive():
            continue
        try:
            n += int(sum(v for k, v in w.metrics().items() if k.startswith("clickpulse_events_processed_total{")))
        except OSError:
            pass
    return n


# ---------------------------------------------------------------------------------------------
# global segment sizes

SEGMENT_RULES = textwrap.dedent("""
    version: "global-sizes.1"
    segments:
      - name: carters
        when: 'count.add_to_cart["7d"] > 0'
        min_size: 50
    triggers:
      - name: welcome
        on: {segment_enter: carters}
        action: {type: segment_welcome}
    """).lstrip()


def users_per_partition(n: int, partitions: int, prefix: str) -> list[str]:
    """``n`` user ids per partition (Kafka's murmur2 placement of the user key)."""
    out: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(v) < n for v in out.values()):
        u = f"{prefix}{i}"
        p = kafka_partition(u, partitions)
        if len(out[p]) < n:
            out[p].append(u)
        i += 1
    return [u for p in range(partitions) for u in out[p]]


def add_to_cart(user: str, at_ms: int) -> dict:
    return {"type": "add_to_cart", "user_id": user, "timestamp": at_ms, "event_id": f"{user}-add",
            "properties": {"product_id": "p1", "price": 10.0, "currency": "EUR", "quantity": 1}}


@pytest.mark.timeout(600)
def test_min_size_counts_members_on_every_worker(make_settings, workers, tmp_path):
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(SEGMENT_RULES)
    s = make_settings(rules_path=str(rules_path), models_enabled=False, segment_sizes_interval_s=0.5)
    assert s.partitions == 4
    w1 = workers(s)
    w2 = workers(another(s, tmp_path, 2))
    # both hold partitions (Faust logs each rebalance's assignment): neither has all four
    wait_for(lambda: (a := owned(w1)) is not None and (b := owned(w2)) is not None and a and b
             and not a & b and a | b == {0, 1, 2, 3}, 180, "the two workers to share the four partitions")
    print(f"\npartitions: worker 1 {sorted(owned(w1))}, worker 2 {sorted(owned(w2))}")

    now = int(time.time() * 1000)
    members = users_per_partition(15, 4, "gs-")  # 60 users, 15 per partition
    produce(s, [(u, add_to_cart(u, now)) for u in members])

    def segment(w) -> dict:
        return orjson.loads(w.get("/segments"))["segments"]["carters"]

    def both_see_60() -> bool:
        try:
            return all(segment(w)["members"] == 60 and segment(w)["active"] for w in (w1, w2))
        except OSError:
            return False
    wait_for(both_see_60, 180, "both workers to count the 60 members (global size) and the segment active")
    local = [segment(w)["local_members"] for w in (w1, w2)]
    print(f"members on worker 1: {local[0]}, on worker 2: {local[1]}; global 60 on both")
    assert sum(local) == 60 and max(local) < 50, local  # neither worker alone reaches min_size

    # the next entrant, wherever it lands: its enter trigger fires (a per-worker count of at most
    # 46 would have kept the segment inactive on both workers)
    late = users_per_partition(1, 4, "gs-late-")
    produce(s, [(u, add_to_cart(u, now + 1000)) for u in late])
    def welcomes() -> list[dict]:
        return [a for a in topic_values(s, s.topic_actions) if a["type"] == "segment_welcome"]
    welcomed = wait_for(lambda: {a["user_key"] for a in welcomes()} >= set(late) and welcomes(), 180,
                        "the late entrants' segment_welcome actions")
    assert {a["user_key"] for a in welcomed} >= set(late)

    def gauge(w) -> float | None:
        try:
            return w.metrics().get("clickpulse_segment_members{segment=carters}")
        except OSError:
            return None
    wait_for(lambda: all(gauge(w) == 64 for w in (w1, w2)), 120, "clickpulse_segment_members 64 on both workers")

    # every record on the sizes topic is a segment_sizes.v1 record of a partition, keyed by it
    def latest_sizes() -> dict[int, dict]:
        latest: dict[int, dict] = {}
        for key, value, _m in asyncio.run(read_topic(s.kafka_bootstrap, s.topic_segment_sizes)):
            rec = orjson.loads(value)
            assert validation_errors("segment_sizes", rec) == []
            assert key == str(rec["partition"]).encode()
            latest[rec["partition"]] = rec["counts"]
        return latest
    wait_for(lambda: sum(c.get("carters", 0) for c in latest_sizes().values()) == 64, 60,
             "the sizes topic to sum to 64 members")
    assert set(latest_sizes()) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------
# three workers, one joining and one killed mid-replay


def offline_run(partitions: int) -> tuple[dict[str, UserState], list[dict]]:
    """The in-memory engine over the sample on Kafka's partitions, then end of input on every
    partition: every user's state and every action of a single-worker, crash-free run."""
    eng = memory_engine(live=False)  # the default rules, marketing consent assumed
    actions = []
    for raw in read_rees46(BUNDLED_SAMPLE):
        ev = parse(orjson.dumps(raw), None)
        actions += eng.process(kafka_partition(ev["user_key"], partitions), ev, 0)[1]
    for p in range(partitions):
        for src in range(partitions):
            actions += eng.end_of_input(p, src, partitions, 0)
    states = {k.decode(): UserState.from_bytes(v) for k, v in eng.table.items() if not k.startswith(CLOCK_KEY_PREFIX)}
    return states, actions


def changelog_states(s) -> dict[str, UserState]:
    """The latest state of every user on the table's changelog (what a worker recovers)."""
    out: dict[str, UserState] = {}
    for key, value, _m in asyncio.run(read_topic(s.kafka_bootstrap, s.changelog_topic, timeout_s=120)):
        if key is None or key.startswith(CLOCK_KEY_PREFIX):
            continue
        if value is None:
            out.pop(key.decode(), None)
        else:
            out[key.decode()] = UserState.from_bytes(value)
    return out


def totals(st: UserState) -> tuple[int, int, float]:
    return st.life.events, st.life.orders, round(st.life.revenue, 6)


@pytest.mark.timeout(1200)
@pytest.mark.xfail(strict=False, reason=(
    "KNOWN FAILURE (open in issue 12): since the input-gap check (exit 75 before committing past a "
    "consumer skip) a worker can exit 75 on a rebalance (the first message of a partition that came "
    "back is checked against a stale committed offset) and this test does not restart it as a "
    "supervisor would; a second symptom is a worker that owns partitions after a rebalance and "
    "processes nothing for 5 minutes. Passed 3 of 3 runs before those changes."))
def test_three_workers_one_joins_one_killed_mid_replay(make_settings, workers, tmp_path):
    s = make_settings(time_mode="replay")
    assert s.partitions == 4
    msgs = list(messages("rees46", BUNDLED_SAMPLE))
    thirds = [msgs[: len(msgs) // 3], msgs[len(msgs) // 3: 2 * len(msgs) // 3], msgs[2 * len(msgs) // 3:]]

    def replay(part: list) -> int:
        return asyncio.run(publish(s.kafka_bootstrap, s.topic_raw, part, control_key=s.control_key)).published

    w1 = workers(s)
    w2 = workers(another(s, tmp_path, 2))
    pool = [w1, w2]
    assert replay(thirds[0]) == len(thirds[0])
    wait_for(lambda: processed(pool) >= len(thirds[0]) // 2, 300, "the first two workers to process events")
    # a third worker joins while the first part is still being processed
    w3 = workers(another(s, tmp_path, 3))
    pool.append(w3)
    # the join moved partitions (and their state) to the new worker
    wait_for(lambda: all(owned(w) is not None for w in pool) and sum(len(owned(w)) for w in pool) == 4
             and set().union(*(owned(w) for w in pool)) == {0, 1, 2, 3} and bool(owned(w3)), 180,
             "the three workers to share the four partitions")
    print(f"\nafter the join: {[sorted(owned(w)) for w in pool]}")
    # SIGKILL one of the first two that holds partitions, while it processes the second part
    # (within its 1 s commit interval: its successor re-processes what it had not committed)
    victim = next(w for w in (w1, w2) if owned(w))
    held = owned(victim)
    base = processed([victim])
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(replay(thirds[1])))
    t.start()
    at_kill = wait_for(lambda: processed([victim]) >= base + 100 and processed([victim]), 300,
                       "the victim to process part of the second part", poll_s=0.02)
    victim.kill()
    t.join(300)
    assert results == [len(thirds[1])]
    print(f"SIGKILLed the worker holding partitions {sorted(held)} after it processed {at_kill - base} events of "
          f"the second part ({at_kill} in all)")
    assert replay(thirds[2]) == len(thirds[2])
    end_of_input(s)
    survivor = next(w for w in pool if w.alive())
    try:
        wait_caught_up(survivor, s, timeout_s=600)
    except ServiceError as err:
        if "did not catch up" not in str(err):
            raise
        # KNOWN GAP (docs/delivery.md): now and then a worker stops consuming part of the valid
        # topic right after recovering from a SIGKILLed one (lag stays put)
        pytest.xfail(f"worker stalled after the SIGKILL: {err}")
    survivors = [w for w in pool if w.alive()]
    assert len(survivors) == 2
    # the survivors hold every partition between them
    wait_for(lambda: set().union(*(owned(w) or set() for w in survivors)) == {0, 1, 2, 3}, 120,
             "the survivors to hold all four partitions")

    # -- state: every user's totals equal the offline single-worker run ---------------------------
    want_states, want_actions = offline_run(s.partitions)
    got_states = changelog_states(s)
    assert set(got_states) == set(want_states), (f"{len(set(want_states) - set(got_states))} users missing, "
                                                 f"{len(set(got_states) - set(want_states))} unexpected")
    wrong = {u: (totals(got_states[u]), totals(st)) for u, st in want_states.items()
             if totals(got_states[u]) != totals(st)}
    assert not wrong, f"{len(wrong)} of {len(want_states)} users' (events, orders, revenue) differ, e.g. " \
                      f"{next(iter(wrong.items()))}"
    print(f"{len(want_states)} users' lifetime totals equal the offline run's "
          f"({sum(st.life.events for st in want_states.values())} events, "
          f"{sum(st.life.orders for st in want_states.values())} orders)")

    # -- actions: duplicates identical but for created_at; none of a crash-free run lost ---------
    on_topic = asyncio.run(read_topic(s.kafka_bootstrap, s.topic_actions))
    copies: dict[str, list[bytes]] = {}
    for _k, v, _m in on_topic:
        copies.setdefault(orjson.loads(v)["action_id"], []).append(v)
    dups = {aid: vs for aid, vs in copies.items() if len(vs) > 1}
    for aid, vs in dups.items():
        for v in vs[1:]:
            assert comparable_action(orjson.loads(v)) == comparable_action(orjson.loads(vs[0])), \
                f"duplicate of {aid} differs:\n{vs[0]}\n{v}"
    first = {aid: orjson.loads(vs[0]) for aid, vs in copies.items()}
    expected = {a["action_id"]: a for a in want_actions}
    print(f"{len(on_topic)} actions on the topic, {len(first)} distinct ids ({len(dups)} published more than once); "
          f"the offline run has {len(expected)}: {dict(Counter(a['type'] for a in want_actions))}")
    differ = [aid for aid, a in expected.items() if aid in first and comparable_action(a) != comparable_action(first[aid])]
    assert not differ, f"{len(differ)} actions differ from the offline run: {expected[differ[0]]} vs {first[differ[0]]}"
    lost = sorted(set(expected) - set(first))
    extra = sorted(set(first) - set(expected) - {aid for aid, a in first.items() if a["type"] in MODEL_TYPES})
    if lost or extra:
        # KNOWN GAP (docs/delivery.md): "none lost" is not yet guaranteed after a SIGKILL; reported
        # with its counts as an expected failure, like tests/integration/test_delivery.py
        by_type = lambda ids, src: dict(Counter(src[i]["type"] for i in ids))  # noqa: E731
        pytest.xfail(f"after the SIGKILL: {len(lost)} of {len(expected)} actions of the crash-free run missing "
                     f"{by_type(lost, expected)}, {len(extra)} not in it {by_type(extra, first)}")
