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
  duplicate identical to its first copy but for ``created_at`` and ``payload.recommendations``;
  every action of a crash-free run present, none beyond it. A worker that exits 75 (its consumer
  skipped input) is restarted, as a supervisor would; the SIGKILLed one stays dead.
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
from clickpulse.runtime import WorkerProcess, committed_offsets, end_offsets, free_port, lag, read_topic
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


async def partition_lag(s) -> dict[str, tuple[int, int | None]]:
    """``{"<topic suffix>[<p>]": (end, committed)}`` of the input partitions not fully committed."""
    committed = await committed_offsets(s.kafka_bootstrap, s.app_id)
    out = {}
    for topic in (s.topic_raw, s.topic_valid):
        for p, end in (await end_offsets(s.kafka_bootstrap, topic)).items():
            c = committed.get((topic, p))
            if c is None or c < end:
                out[f"{topic.rsplit('.', 1)[-1]}[{p}]"] = (end, c)
    return out


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


class Supervisor:
    """Restarts a worker process that exits 75 (it saw its consumer skip input and stopped
    before committing past the hole: docs/delivery.md), as Kubernetes or systemd would; a
    worker this test SIGKILLs stays dead. Polled from the test's own waits (no thread)."""

    def __init__(self, workers_, tmp_path: Path) -> None:
        self.start_fn, self.tmp_path = workers_, tmp_path
        self.slots: list[WorkerProcess] = []
        self.killed: set[int] = set()
        self.restarts = 0

    def add(self, settings) -> int:
        self.slots.append(self._start(settings))
        return len(self.slots) - 1

    def _start(self, settings) -> WorkerProcess:
        for _ in range(3):
            try:
                return self.start_fn(settings)
            except ServiceError as err:
                if "exited with 75" not in str(err):
                    raise
                self.restarts += 1
                print("a worker exited 75 while starting; restarted")
        return self.start_fn(settings)

    def check(self) -> None:
        for i, w in enumerate(self.slots):
            if i not in self.killed and not w.alive():
                assert w.proc.returncode == 75, f"worker {i} exited with {w.proc.returncode}; log: {w.log_path}"
                assert self.restarts < 6, "workers keep exiting 75"
                self.restarts += 1
                print(f"worker {i} exited 75 (its consumer skipped or stalled input: see its log); restarted")
                self.slots[i] = self._start(w.settings)

    def kill(self, i: int) -> None:
        self.killed.add(i)
        self.slots[i].kill()

    def live(self) -> list[WorkerProcess]:
        self.check()
        return [w for i, w in enumerate(self.slots) if i not in self.killed]


@pytest.mark.timeout(1500)
def test_three_workers_one_joins_one_killed_mid_replay(make_settings, workers, tmp_path):
    s = make_settings(time_mode="replay", stall_timeout_s=60)  # a stalled worker exits 75 (restarted)
    assert s.partitions == 4
    msgs = list(messages("rees46", BUNDLED_SAMPLE))
    thirds = [msgs[: len(msgs) // 3], msgs[len(msgs) // 3: 2 * len(msgs) // 3], msgs[2 * len(msgs) // 3:]]

    def replay(part: list) -> int:
        return asyncio.run(publish(s.kafka_bootstrap, s.topic_raw, part, control_key=s.control_key)).published

    sup = Supervisor(workers, tmp_path)
    sup.add(s)
    sup.add(another(s, tmp_path, 2))
    assert replay(thirds[0]) == len(thirds[0])
    wait_for(lambda: processed(sup.live()) >= len(thirds[0]) // 2, 300, "the first two workers to process events")
    # a third worker joins while the first part is still being processed
    third = sup.add(another(s, tmp_path, 3))

    def shared() -> bool:
        pool = sup.live()
        held = [owned(w) for w in pool]
        return (all(h is not None for h in held) and sum(len(h) for h in held) == 4
                and set().union(*held) == {0, 1, 2, 3} and bool(held[third]))
    # the join moved partitions (and their state) to the new worker
    wait_for(shared, 180, "the three workers to share the four partitions")
    print(f"\nafter the join: {[sorted(owned(w)) for w in sup.live()]}")
    # SIGKILL one of the first two that holds partitions, while it processes the second part
    # (within its 1 s commit interval: its successor re-processes what it had not committed)
    # The victim: the first of the two that holds partitions and has processed 100 events of the
    # second part. A worker restarted meanwhile (exit 75) counts from its own start (a run once
    # waited 300 s on a victim whose restarted process could not reach the old one's count).
    before_second = {i: (sup.slots[i], processed([sup.slots[i]])) for i in (0, 1)}
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(replay(thirds[1])))
    t.start()

    def victim_progressed() -> tuple[int, set[int], int, int] | None:
        sup.check()
        for i in (0, 1):
            w = sup.slots[i]
            held_now = owned(w)
            if not held_now:
                continue
            n, base_i = processed([w]), before_second[i][1] if before_second[i][0] is w else 0
            if n >= base_i + 100:
                return i, held_now, n, base_i
        return None
    victim, held, at_kill, base = wait_for(victim_progressed, 300, "one of the first two workers to process part "
                                           "of the second part", poll_s=0.02)
    sup.kill(victim)
    t.join(300)
    assert results == [len(thirds[1])]
    print(f"SIGKILLed worker {victim} holding partitions {sorted(held)} after it processed {at_kill - base} events "
          f"of the second part ({at_kill} in all)")
    assert replay(thirds[2]) == len(thirds[2])
    end_of_input(s)

    confirmations = [0]

    next_report = [time.monotonic() + 60]

    def caught_up() -> bool:  # the group's lag on the raw and valid topics is 0, twice 1 s apart
        sup.check()
        confirmations[0] = confirmations[0] + 1 if sum(asyncio.run(lag(s)).values()) == 0 else 0
        if confirmations[0] == 0 and time.monotonic() > next_report[0]:  # which partitions, held by whom
            next_report[0] = time.monotonic() + 60
            print(f"still waiting {time.monotonic() - t_wait:.0f} s: {asyncio.run(partition_lag(s))}; held: "
                  f"{[sorted(owned(w) or ()) for w in sup.live()]}")
        return confirmations[0] >= 2
    t_wait = time.monotonic()
    wait_for(caught_up, 900, "the two surviving workers to commit every input message", poll_s=1.0)
    print(f"caught up {time.monotonic() - t_wait:.0f} s after the end of input")
    survivors = sup.live()
    assert len(survivors) == 2
    # the survivors hold every partition between them
    wait_for(lambda: set().union(*(owned(w) or set() for w in sup.live())) == {0, 1, 2, 3}, 120,
             "the survivors to hold all four partitions")
    print(f"workers restarted after exit 75: {sup.restarts}")

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
    by_type = lambda ids, src: dict(Counter(src[i]["type"] for i in ids))  # noqa: E731
    assert not lost, f"{len(lost)} of {len(expected)} actions of the crash-free run missing {by_type(lost, expected)}"
    assert not extra, f"{len(extra)} actions not in the crash-free run {by_type(extra, first)}"
