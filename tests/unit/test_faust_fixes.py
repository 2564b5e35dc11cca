"""clickpulse.faust_fixes: the two rebalance fixes to faust-streaming / aiokafka, checked on the
real patched class with fake aiokafka objects (no broker)."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition

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
    ack = Consumer.ack
    assert faust_fixes.install() is True and Consumer.ack is ack          # idempotent


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


