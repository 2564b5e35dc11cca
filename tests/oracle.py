"""Independent plain-Python computations over the datasets, to check clickpulse against."""

from __future__ import annotations

import csv
from datetime import UTC, datetime

from clickpulse.ingest.datasets import BUNDLED_SAMPLE


def independent_abandoned_users(flush: bool, delay_s: int = 1800, lateness_s: int = 60) -> set[str]:
    """Plain-Python computation over the CSV: a user's cart episode is abandoned when no purchase
    follows within the delay of the last add, and the file's time (max time - lateness) is past it
    (or the input is flushed)."""
    with open(BUNDLED_SAMPLE, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    def t(r):
        return int(datetime.strptime(r["event_time"], "%Y-%m-%d %H:%M:%S %Z").replace(tzinfo=UTC).timestamp())

    end = max(t(r) for r in rows) - lateness_s
    last_add: dict[str, int] = {}
    abandoned = set()
    for r in rows:  # the file is in time order
        u, ts = r["user_id"], t(r)
        if u in last_add and ts - last_add[u] > delay_s and u not in abandoned:
            abandoned.add(u)  # a later event after the deadline: the episode was abandoned
            del last_add[u]
        if r["event_type"] == "cart":
            last_add[u] = ts
        elif r["event_type"] == "purchase":
            last_add.pop(u, None)
    for u, ts in last_add.items():
        if flush or end > ts + delay_s:
            abandoned.add(u)
    return abandoned
