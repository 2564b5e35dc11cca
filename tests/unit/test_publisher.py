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


def test_input_gaps_are_detected_from_the_restored_position():
    from clickpulse.app import InputGaps
    m = Metrics(CollectorRegistry())
    gaps = InputGaps(m, lambda topic, p: {0: 9}.get(p))
    msg = lambda p, o: SimpleNamespace(topic="t", partition=p, offset=o)  # noqa: E731
    for p, o in ((0, 5), (0, 10), (0, 11), (1, 3), (1, 4)):   # a re-read, then contiguous
        gaps.see(msg(p, o))
    assert m.input_gaps.labels("t")._value.get() == 0
    gaps.see(msg(0, 15))                                         # 12-14 never delivered
    gaps.see(msg(1, 4))                                          # an older one again: not a gap
    assert m.input_gaps.labels("t")._value.get() == 1
    fresh = InputGaps(m, lambda topic, p: 9)
    fresh.see(msg(0, 20))                                        # committed ahead of the saved position
    assert m.input_gaps.labels("t")._value.get() == 2
