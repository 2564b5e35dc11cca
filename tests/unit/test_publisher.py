"""The worker's Publisher: a publish the broker refused for a transient reason ends the process
before the input can be committed; one it can never take is counted and the worker goes on."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, NotEnoughReplicasError
from prometheus_client import CollectorRegistry

from clickpulse.app import Publisher, transient
from clickpulse.observability.metrics import Metrics


def _publisher(outcomes: list[BaseException | None]):
    async def run():
        loop = asyncio.get_running_loop()
        futs = []

        async def send(*args):
            fut = loop.create_future()
            futs.append(fut)
            return fut
        pub = Publisher(SimpleNamespace(producer=SimpleNamespace(send=send)), Metrics(CollectorRegistry()), 4)
        exits: list[int] = []
        pub.on_fatal = exits.append
        await pub.send([("t", b"k", b"v", None, None)] * len(outcomes))
        for fut, err in zip(futs, outcomes, strict=True):
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)
        await asyncio.sleep(0)  # the done callbacks
        exited = list(exits)
        await pub.drain()
        return exited, pub.metrics.publish_errors._value.get()
    return asyncio.run(run())


def test_a_transient_failure_ends_the_process_before_anything_else_runs():
    exited, errors = _publisher([None, KafkaTimeoutError()])
    assert exited == [75] and errors == 1


def test_a_record_the_broker_can_never_take_is_counted_and_the_worker_goes_on():
    exited, errors = _publisher([MessageSizeTooLargeError(), None])
    assert exited == [] and errors == 1


def test_which_failures_are_transient():
    assert transient(KafkaTimeoutError()) and transient(NotEnoughReplicasError())
    assert not transient(MessageSizeTooLargeError()) and not transient(ValueError())


def test_input_gaps_stop_the_worker_once_and_accept_a_real_hole(tmp_path):
    from clickpulse.app import InputGaps
    m = Metrics(CollectorRegistry())
    msg = lambda p, o: SimpleNamespace(topic="t", partition=p, offset=o)  # noqa: E731
    gaps = InputGaps(m, lambda topic, p: {0: 10}.get(p), str(tmp_path), lambda topic, p: {1: 2}.get(p))
    assert all(gaps.see(msg(p, o)) for p, o in ((0, 10), (0, 11), (1, 3), (1, 4), (0, 11), (2, 7), (2, 8)))
    assert m.input_gaps.labels("t")._value.get() == 0     # from committed, saved position, first message
    assert gaps.see(msg(0, 15)) is False                   # 12-14 never delivered: stop
    assert m.input_gaps.labels("t")._value.get() == 1
    again = InputGaps(m, lambda topic, p: 12, str(tmp_path))   # the successor, same hole again
    assert again.see(msg(0, 15)) is True                   # a real hole: accepted
    assert again.see(msg(0, 16)) is True


def test_input_gaps_a_rebalance_keeps_what_was_seen(tmp_path):
    """The false alarm a 3-worker run hit: raw[2] offsets 0-1 seen, a rebalance, then offset 2
    delivered (fetched before it) while the committed offset was still 1."""
    from clickpulse.app import InputGaps
    m = Metrics(CollectorRegistry())
    msg = lambda p, o: SimpleNamespace(topic="t", partition=p, offset=o)  # noqa: E731
    committed = {2: None}
    gaps = InputGaps(m, lambda topic, p: committed.get(p), str(tmp_path))
    assert gaps.see(msg(2, 0)) and gaps.see(msg(2, 1))
    committed[2] = 1
    gaps.reset()
    assert gaps.see(msg(2, 2)) is True                     # not a gap: 1 was seen here
    assert gaps.see(msg(2, 1)) and gaps.see(msg(2, 2))     # the consumer re-reads from the commit
    assert gaps.see(msg(2, 3)) is True
    assert m.input_gaps.labels("t")._value.get() == 0
    # a partition regained after another worker moved it on: its committed offset is the start
    committed[2] = 40
    gaps.reset()
    assert gaps.see(msg(2, 40)) is True
    assert m.input_gaps.labels("t")._value.get() == 0
    # and a real skip after a rebalance is still caught
    gaps.reset()
    assert gaps.see(msg(2, 45)) is False
    assert m.input_gaps.labels("t")._value.get() == 1


def test_input_gaps_ask_the_broker_when_the_commit_is_not_known_yet(tmp_path):
    """The false alarm of a three-worker run: a newly assigned partition's first record (the
    group's commit, 1551) reached the agent before Faust knew the committed offset; judged
    against the saved position + 1 (1190) alone it looked like a hole of 361 records."""
    import asyncio

    from clickpulse.app import InputGaps
    m = Metrics(CollectorRegistry())
    msg = lambda p, o: SimpleNamespace(topic="t", partition=p, offset=o)  # noqa: E731
    broker = {2: 1551}

    async def fetch(topic, p):
        return broker.get(p)
    gaps = InputGaps(m, lambda topic, p: None, str(tmp_path), lambda topic, p: 1189, fetch_committed=fetch)
    assert gaps.see(msg(2, 1551)) is None                    # not judged yet
    assert asyncio.run(gaps.confirm(msg(2, 1551))) is True   # the broker's commit is the start
    assert gaps.see(msg(2, 1552)) is True and m.input_gaps.labels("t")._value.get() == 0
    # a real hole beyond the broker's commit is still caught
    broker[2] = 1552
    gaps.reset()
    gaps.next[("t", 2)] = 1190                               # (as if nothing were seen since)
    assert gaps.see(msg(2, 1600)) is None
    assert asyncio.run(gaps.confirm(msg(2, 1600))) is False and m.input_gaps.labels("t")._value.get() == 1

    async def down(topic, p):
        raise OSError("broker unreachable")
    other = InputGaps(m, lambda topic, p: None, str(tmp_path / "o"), lambda topic, p: 10, fetch_committed=down)
    assert other.see(msg(0, 20)) is None
    assert asyncio.run(other.confirm(msg(0, 20))) is False   # judged as before: a gap
    # with the commit known the answer is immediate (no broker round trip)
    known = InputGaps(m, lambda topic, p: 20, str(tmp_path / "k"), lambda topic, p: 10, fetch_committed=down)
    assert known.see(msg(0, 20)) is True


def test_input_gaps_judge_an_unbounded_first_message_against_the_broker(tmp_path):
    """The raw topic has no saved position: a restarted worker's first raw[0] record was 1275
    while the group's commit was 508 (the records between were lost by Faust), and it was taken
    as the start — 767 records lost unnoticed. It is judged against the broker's commit now."""
    import asyncio

    from clickpulse.app import InputGaps
    m = Metrics(CollectorRegistry())
    msg = lambda p, o: SimpleNamespace(topic="t", partition=p, offset=o)  # noqa: E731
    broker = {0: 508, 1: None}

    async def fetch(topic, p):
        return broker[p]
    gaps = InputGaps(m, lambda topic, p: None, str(tmp_path), fetch_committed=fetch)
    assert gaps.see(msg(0, 1275)) is None
    assert asyncio.run(gaps.confirm(msg(0, 1275))) is False and m.input_gaps.labels("t")._value.get() == 1
    fresh = InputGaps(m, lambda topic, p: None, str(tmp_path / "f"), fetch_committed=fetch)
    assert fresh.see(msg(0, 508)) is None                      # the successor reads from the commit
    assert asyncio.run(fresh.confirm(msg(0, 508))) is True and fresh.see(msg(0, 509)) is True
    assert fresh.see(msg(1, 7)) is None                        # a new group: nothing committed yet
    assert asyncio.run(fresh.confirm(msg(1, 7))) is True and fresh.see(msg(1, 8)) is True
    assert m.input_gaps.labels("t")._value.get() == 1


def test_only_partitions_read_to_their_end_offset_get_the_idle_tick():
    """A worker that took over valid[0] with a backlog fired idle timers 5 s after the restore
    although 9,569 records were still unread (a reviewer's run: 27 wrong actions). Partitions
    with records left to read (end offsets asked of the broker) are not ticked; a caught-up or
    empty one is."""
    from faust.types import TP

    from clickpulse.app import InputGaps, _caught_up, _tick_inputs
    V, R = "ns.events.valid", "ns.events.raw"
    ends = {(V, 0): 24_021, (V, 1): 500, (V, 2): 0, (V, 3): None}
    committed = {TP(V, 0): 14_452, TP(V, 1): 480, TP(V, 2): 0}
    gaps = InputGaps(Metrics(CollectorRegistry()), lambda topic, p: None, "/nonexistent")
    gaps.next[(V, 1)] = 500                                    # handed everything up to the end
    own = [TP(V, p) for p in range(4)]
    w = SimpleNamespace(app=SimpleNamespace(consumer=SimpleNamespace(_committed_offset=committed),
                                            assignor=SimpleNamespace(assigned_actives=lambda: own)),
                        input_gaps=[gaps], settings=SimpleNamespace(topic_valid=V, topic_raw=R, raw_keyed=False))
    assert _tick_inputs(w, [0, 1]) == [(V, 0), (V, 1)]
    assert _caught_up(w, [0, 1, 2, 3], ends) == [1, 2]         # 0: backlog; 3: end unknown
    assert _caught_up(w, [0, 1], {}) == []                     # the broker did not answer
    gaps.next[(V, 0)] = 24_021
    assert _caught_up(w, [0], ends) == [0]
    # two hops: this worker's own raw[0] still holds records the ingest will forward (a third run:
    # 7 wrong actions on a valid partition read to its end) -> no valid partition is idle
    own += [TP(R, 0), TP(R, 1)]
    assert _tick_inputs(w, [0]) == [(V, 0), (R, 0), (R, 1)]
    ends.update({(R, 0): 13_885, (R, 1): 0})                   # raw[1]: never written to
    committed[TP(R, 0)] = 11_147
    assert _caught_up(w, [0, 1, 2], ends) == []
    gaps.next[(R, 0)] = 13_885                                 # forwarded everything
    assert _caught_up(w, [0, 1, 2], ends) == [0, 1, 2]
    # one hop: the raw partition of the same number is the input
    w.settings.raw_keyed = True
    assert _tick_inputs(w, [0]) == [(V, 0), (R, 0)]
