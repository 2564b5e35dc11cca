"""clickpulse.faust_fixes: the rebalance fixes to faust-streaming / aiokafka / mode, checked on the
real patched classes with fake aiokafka objects (no broker), each beside a negative control."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as driver
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from clickpulse import faust_fixes

RAW0, RAW1, RAW2, RAW3 = (TopicPartition("ns.events.raw", p) for p in range(4))
CHANGELOG = TopicPartition("ns-users-changelog", 0)


def test_the_worker_app_installs_the_fixes(tmp_path):
    from faust.transport.consumer import Consumer

    from clickpulse.app import _app
    from clickpulse.settings import Settings
    setattr(Consumer, faust_fixes._INSTALLED, False)
    _app(Settings(data_dir=str(tmp_path)))
    assert getattr(Consumer, faust_fixes._INSTALLED) is True
    ack, fetch, resume = Consumer.ack, driver.AIOKafkaConsumerThread._fetch_records, FlowControlEvent.resume
    assert faust_fixes.install() is True                                   # idempotent
    assert (Consumer.ack, driver.AIOKafkaConsumerThread._fetch_records, FlowControlEvent.resume) == (ack, fetch, resume)
    assert driver.AIOKafkaConsumerThread.seek_to_committed is faust_fixes._seek_to_committed


def test_a_message_no_stream_tracked_is_not_acknowledged(caplog):
    """Faust's stream skips a message whose consumer generation changed while it waited, and acks
    it: its offset could be committed although no agent saw it (fix C)."""
    from faust.transport.consumer import Consumer
    faust_fixes.install()
    assert Consumer.ack._clickpulse_original is not None
    calls = []
    ack = faust_fixes._refuse_untracked_ack(lambda self, m: calls.append(m.offset) or True)
    consumer = SimpleNamespace(app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda t: t != "nack")))
    skipped = SimpleNamespace(topic="ns.events.raw", partition=3, offset=410, tracked=False)
    assert ack(consumer, skipped) is False and calls == []
    assert "ns.events.raw[3]@410" in caplog.text and "left unacknowledged" in caplog.text
    taken = SimpleNamespace(topic="ns.events.raw", partition=3, offset=411, tracked=True)
    assert ack(consumer, taken) is True and calls == [411]
    untracked_elsewhere = SimpleNamespace(topic="nack", partition=0, offset=1, tracked=False)
    assert ack(consumer, untracked_elsewhere) is True and calls == [411, 1]


def test_a_commit_covers_the_whole_acknowledged_run_despite_duplicates():
    """Fix D: Faust's gap ranges plus the same offsets acknowledged again made its acknowledged
    list hold each offset twice; the commit then advanced one offset per commit interval (a
    review saw a partition's commit crawl 287 -> 487 over minutes)."""
    from faust.transport.consumer import Consumer
    from intervaltree import IntervalTree
    faust_fixes.install()

    def consumer():
        gap = IntervalTree()
        gap.addi(268, 435)                                    # _add_gap(268, 434): a false gap
        return SimpleNamespace(_acked={RAW0: list(range(268, 300)) + [435, 436]}, _gap={RAW0: gap},
                               _committed_offset={RAW0: 267}, _acked_index={RAW0: set(range(268, 300))})
    c = consumer()
    assert Consumer._new_offset(c, RAW0) == 437
    # negative control: Faust's own method on the same input advances by one
    assert Consumer._new_offset._clickpulse_original(consumer(), RAW0) == 269
    # no duplicates, no gap: unchanged behaviour (the first run of consecutive offsets)
    plain = SimpleNamespace(_acked={RAW0: [5, 6, 7, 9]}, _gap={RAW0: IntervalTree()}, _committed_offset={RAW0: 4},
                            _acked_index={RAW0: {5, 6, 7, 9}})
    assert Consumer._new_offset(plain, RAW0) == 8 and plain._acked[RAW0] == [9]




class FakeFetcher:
    _closed = False

    def __init__(self, on_fetch=None):
        self.asked: list = []
        self.on_fetch = on_fetch
        self._subscriptions = SimpleNamespace(fetch_context=lambda: _Null())

    async def fetched_records(self, partitions, timeout=None, max_records=None):
        self.asked.append(partitions)
        if self.on_fetch:
            self.on_fetch()         # the rebalance pauses partitions while the fetch waits
        buffered = [RAW0, RAW1, RAW2, RAW3]  # aiokafka's loop over its fetched partitions
        return {tp: ["record"] for tp in buffered if not (partitions and tp not in partitions)}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fetch(active: set, fetcher: FakeFetcher, fn=None):
    consumer = SimpleNamespace(_fetcher=fetcher, _closed=False)
    fn = fn or driver.AIOKafkaConsumerThread._fetch_records
    thread = SimpleNamespace(consumer=SimpleNamespace(flow_active=True))
    return asyncio.run(fn(thread, consumer, active, timeout=1.0))


def test_the_fetch_follows_the_live_set_and_an_emptied_one_drains_nothing():
    """Fix A. Emptied while the fetch waits (a rebalance pauses every partition): nothing is
    drained. One partition paused while it waits (Faust's backpressure): that one is not drained."""
    faust_fixes.install()
    active = {RAW0, RAW1}
    assert _fetch(active, FakeFetcher(on_fetch=active.clear)) == {}
    active = {RAW0, RAW1}
    assert set(_fetch(active, FakeFetcher(on_fetch=lambda: active.discard(RAW1)))) == {RAW0}
    # negative control: Faust's own method drains every partition once the live set is emptied
    active = {RAW0, RAW1}
    original = driver.AIOKafkaConsumerThread._fetch_records._clickpulse_original
    assert set(_fetch(active, FakeFetcher(on_fetch=active.clear), original)) == {RAW0, RAW1, RAW2, RAW3}


def test_an_empty_active_set_fetches_nothing():
    faust_fixes.install()
    fetcher = FakeFetcher()
    assert _fetch(set(), fetcher) == {} and fetcher.asked == []


class FakeConsumer:
    def __init__(self, committed):
        self.committed = committed
        self.seeks: list = []
        self.to_beginning: list = []

    async def seek_to_committed(self):  # aiokafka: seeks only offsets > 0
        self.seeks += [(tp, off) for tp, off in self.committed.items() if off and off > 0]
        return dict(self.committed)

    def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    async def seek_to_beginning(self, *tps):  # leaves the position unset until a lookup: not used
        raise AssertionError("seek_to_beginning leaves the position unset (Faust's event path crashed on it)")

    async def beginning_offsets(self, tps):
        self.to_beginning += tps
        return {tp: 7 for tp in tps}                             # retention deleted offsets 0-6


def test_never_committed_and_zero_committed_input_partitions_are_rewound():
    """Fix B: aiokafka's seek_to_committed leaves them where the dropped fetch put them."""
    consumer = FakeConsumer({RAW0: 5, RAW1: 0, RAW2: None, RAW3: None, CHANGELOG: None})
    thread = SimpleNamespace(_ensure_consumer=lambda: consumer,
                             app=SimpleNamespace(tables=SimpleNamespace(changelog_topics={CHANGELOG.topic})))
    committed = asyncio.run(faust_fixes._seek_to_committed_in_thread(thread))
    assert committed == consumer.committed                       # what Faust's perform_seek reads
    assert consumer.seeks == [(RAW0, 5), (RAW1, 0), (RAW2, 7), (RAW3, 7)]   # explicit positions
    assert consumer.to_beginning == [RAW2, RAW3]                  # the changelog is left to recovery


def test_resuming_a_running_flow_keeps_the_records_on_the_stream_queues():
    """Fix F: recovery seeks the stream partitions and then calls flow_control.resume() on a flow
    that is already running; mode cleared every stream queue there, throwing away records fetched
    after the seek (a restarted worker lost the one record published as it became ready)."""
    faust_fixes.install()

    def queue_after(*steps):
        async def run():
            flow = FlowControlEvent()                  # Faust's app.flow_control starts suspended
            q = FlowControlQueue(flow_control=flow, clear_on_resume=True)
            for step in steps:
                step(flow, q)
            return list(q._queue)
        return asyncio.run(run())

    def put(record):
        return lambda flow, q: q.put_nowait(record)
    resume = FlowControlEvent.resume
    original = resume._clickpulse_original
    # changelog recovery resumes flow; after the seek a record reaches the queue; resumed again
    assert queue_after(lambda f, q: resume(f), put("raw[0]@1264"), lambda f, q: resume(f)) == ["raw[0]@1264"]
    # negative control: mode's own resume throws it away
    assert queue_after(lambda f, q: original(f), put("raw[0]@1264"), lambda f, q: original(f)) == []
    # a rebalance suspends flow: what the queue holds then is stale and still cleared on resume
    assert queue_after(lambda f, q: resume(f), put("stale"), lambda f, q: f.suspend(), lambda f, q: resume(f)) == []
    flow = FlowControlEvent()
    resume(flow)
    assert flow.is_active() and flow._resume.is_set()


def test_the_seek_at_the_end_of_recovery_does_not_undo_a_commit_made_meanwhile():
    """Fix G: recovery resumes the stream partitions, then asks the broker for the committed
    offsets; a commit made while the answer travels (RAW0 -> 1200) was overwritten by the older
    answer (1100), and Faust's commits of RAW0 stopped for good (its oldest acknowledged offset,
    1200, is not next to 1100)."""
    from faust.transport.consumer import Consumer
    faust_fixes.install()

    async def faust_perform_seek(self):                      # what Faust's does with the answer
        self._committed_offset.update({RAW0: 1100, RAW1: 40, RAW2: None})

    def run(seek):
        c = SimpleNamespace(_committed_offset={RAW0: 1200, RAW1: 30, RAW3: 9})
        asyncio.run(seek(c))
        return c._committed_offset
    assert Consumer.perform_seek._clickpulse_original is not None
    assert run(faust_fixes._keep_newer_commits(faust_perform_seek)) == {RAW0: 1200, RAW1: 40, RAW2: None, RAW3: 9}
    # negative control: Faust's own bookkeeping moves RAW0 back to 1100
    assert run(faust_perform_seek)[RAW0] == 1100

    # the commit lands while the seek's question is on its way (a reviewer's run: 22993 undone by 22510)
    c = SimpleNamespace(_committed_offset={RAW2: 22000})

    async def faust_commit_offsets(self, offsets, start_new_transaction=True):
        self._committed_offset.update(offsets)
        return True
    commit = faust_fixes._record_commits(faust_commit_offsets)

    async def seek_racing_a_commit(self):
        answer = {RAW2: 22510}                                   # read from the broker first
        await commit(self, {RAW2: 22993})                        # then the commit lands
        self._committed_offset.update(answer)                    # then Faust applies the answer
    asyncio.run(faust_fixes._keep_newer_commits(seek_racing_a_commit)(c))
    assert c._committed_offset[RAW2] == 22993
    assert Consumer._commit_offsets._clickpulse_original is not None
