"""Dead letters are logged at DEBUG with a summary at most every interval (a bad replay of 1,019
lines gives a few summary lines, not 1,019 INFO lines); a burst's tail is summarized when the
interval ends, on the running event loop."""

from __future__ import annotations

import asyncio
import logging

from clickpulse.events.dlq import DeadLetterLog


def test_a_burst_gives_one_line_now_and_one_summary_when_the_interval_ends(caplog) -> None:
    logger = logging.getLogger("test.dlq")

    async def burst() -> None:
        # the burst happens at one instant of the summary clock (a loaded machine cannot stretch it past
        # the interval); the tail's summary is the loop timer's, whenever it fires
        d = DeadLetterLog(logger, every_s=0.2, clock=lambda: 0.0)
        for i in range(1019):
            d.record("not_json" if i % 3 else "not_object", f"raw[0]@{i}", "x")
        for _ in range(600):  # up to 30 s
            if sum(r.levelno == logging.WARNING for r in caplog.records) >= 2:
                break
            await asyncio.sleep(0.05)

    with caplog.at_level(logging.DEBUG, logger="test.dlq"):
        asyncio.run(burst())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(warnings) == 2
    assert warnings[0].startswith("dead-lettered 1 message in the last 0.2 s: not_object 1")
    assert warnings[1].startswith("dead-lettered 1018 messages in the last 0.2 s: not_json 679, not_object 339 "
                                  "(latest: not_json at raw[0]@1018: x)")
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 1019
