"""clickpulse.faust_fixes: the two rebalance fixes to faust-streaming / aiokafka, checked on the
real patched class with fake aiokafka objects (no broker)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as driver

from clickpulse import faust_fixes

RAW0, RAW1, RAW2, RAW3 = (TopicPartition("ns.events.raw", p) for p in range(4))
CHANGELOG = TopicPartition("ns-users-changelog", 0)


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


def _thread(fetcher: FakeFetcher) -> SimpleNamespace:
    return SimpleNamespace(consumer=SimpleNamespace(flow_active=True))


def _fetch(active: set, fetcher: FakeFetcher):
    consumer = SimpleNamespace(_fetcher=fetcher, _closed=False)
    fn = driver.AIOKafkaConsumerThread._fetch_records
    return asyncio.run(fn(_thread(fetcher), consumer, active, timeout=1.0))


def test_install_is_idempotent_and_patches_the_driver():
    assert faust_fixes.install() is True
    fn = driver.AIOKafkaConsumerThread._fetch_records
    assert faust_fixes.install() is True and driver.AIOKafkaConsumerThread._fetch_records is fn
    assert driver.AIOKafkaConsumerThread.seek_to_committed is faust_fixes._seek_to_committed


def test_the_fetch_follows_the_live_set_and_an_emptied_one_drains_nothing():
    """Emptied while the fetch waits (a rebalance pauses every partition): nothing is drained —
    aiokafka's own reading of that empty set was 'every partition'. One partition paused while
    it waits (Faust's backpressure): that one is not drained (a frozen copy drained it, and Faust
    then dropped its records: input gaps in a test run)."""
    faust_fixes.install()
    active = {RAW0, RAW1}
    fetcher = FakeFetcher(on_fetch=active.clear)
    assert _fetch(active, fetcher) == {}
    active = {RAW0, RAW1}
    fetcher = FakeFetcher(on_fetch=lambda: active.discard(RAW1))
    assert set(_fetch(active, fetcher)) == {RAW0}


def test_an_empty_active_set_fetches_nothing():
    """aiokafka reads an empty set as 'every partition' (the drain that lost the records)."""
    faust_fixes.install()
    fetcher = FakeFetcher()
    assert _fetch(set(), fetcher) == {} and fetcher.asked == []
    # negative control: aiokafka's own reading of the empty set, as the unpatched driver passed it
    assert set(asyncio.run(fetcher.fetched_records(set()))) == {RAW0, RAW1, RAW2, RAW3}


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

    async def seek_to_beginning(self, *tps):
        self.to_beginning += tps


def test_never_committed_and_zero_committed_input_partitions_are_rewound():
    consumer = FakeConsumer({RAW0: 5, RAW1: 0, RAW2: None, RAW3: None, CHANGELOG: None})
    thread = SimpleNamespace(_ensure_consumer=lambda: consumer,
                             app=SimpleNamespace(tables=SimpleNamespace(changelog_topics={CHANGELOG.topic})))
    committed = asyncio.run(faust_fixes._seek_to_committed_in_thread(thread))
    assert committed == consumer.committed                       # what Faust's perform_seek reads
    assert consumer.seeks == [(RAW0, 5), (RAW1, 0)]
    assert consumer.to_beginning == [RAW2, RAW3]                  # the changelog is left to recovery


def test_the_worker_app_installs_the_fixes(tmp_path):
    from clickpulse.app import _app
    from clickpulse.settings import Settings
    setattr(driver.AIOKafkaConsumerThread, faust_fixes._INSTALLED, False)
    _app(Settings(data_dir=str(tmp_path)))
    assert getattr(driver.AIOKafkaConsumerThread, faust_fixes._INSTALLED) is True


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


def test_records_a_fetch_returned_are_not_filtered_out_afterwards():
    """Fix E: Faust filtered the fetched records against its live active set again; a partition
    that left it meanwhile lost records aiokafka had handed over (a single worker stalled in CI)."""
    from faust.transport.consumer import Consumer
    faust_fixes.install()
    live = {RAW0}

    async def orig(self, timeout):
        return {RAW0: ["a"], RAW1: ["b"]}, live                # RAW1 was active when drained
    wrapped = faust_fixes._keep_drained(orig)
    records, active = asyncio.run(wrapped(None, 1.0))
    assert RAW1 in active and RAW0 in active and active is not live
    assert Consumer._wait_next_records._clickpulse_original is not None

    async def nothing(self, timeout):
        return {}, live
    assert asyncio.run(faust_fixes._keep_drained(nothing)(None, 1.0))[1] is live
