"""The Quix Streams peer: clickpulse's core per-user state step as a Quix Streams application.

Run as a subprocess by ``benchmarks/pipeline.py`` (needs the ``bench`` extra: ``quixstreams``)::

    python benchmarks/quix_peer.py --in TOPIC --out TOPIC --group GROUP --state-dir DIR \
        --status FILE [--guarantee at-least-once|exactly-once] [--commit-interval 1.0]

Per message (keyed by user id, value = a raw REES46-derived clickpulse event in JSON):
JSON decode (the topic's ``json`` deserializer), then in one stateful ``apply`` over the user's
state (RocksDB, with Quix's changelog topic): de-duplication by event id (the user's last 32),
per-type window counts (60 minute, 24 hour and 7 day buckets, as clickpulse's state), session
(30 min gap), cart (add/remove/purchase), lifetime totals. Every message yields one JSON record on
the output topic (duplicates too, flagged), keyed by user.

Not done here (clickpulse does them): schema validation, a second hop, event-time watermarks and
timers, rules, models, Redis profiles, actions. This is the state step alone, on a peer framework.

The status file gets a JSON line ``{"first": t}`` when the first message is processed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

GAP_MS = 30 * 60 * 1000
DEDUP_IDS = 32
#: (bucket width ms, buckets kept): minutes of the last hour, hours of the last day, days of the week
WINDOWS = ((60_000, 60), (3_600_000, 24), (86_400_000, 7))


def new_state() -> dict[str, Any]:
    return {"ids": [], "w": {}, "sess": None, "sessions": 0, "cart": {},
            "life": {"events": 0, "orders": 0, "revenue": 0.0, "first": None, "last": None}}


def apply_event(st: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """Apply one event to a user's state in place; returns the output record."""
    eid = ev.get("event_id")
    typ = str(ev.get("type"))
    ts = int(ev["timestamp"])
    user = ev.get("user_id")
    if eid is not None:
        if eid in st["ids"]:
            return {"user_key": user, "event_id": eid, "type": typ, "duplicate": True}
        ids = st["ids"]
        ids.append(eid)
        if len(ids) > DEDUP_IDS:
            del ids[:-DEDUP_IDS]
    # window counts: per type, per granularity a list of [bucket, count] in bucket order
    per_type = st["w"].setdefault(typ, [[], [], []])
    counts = []
    for (width, keep), buckets in zip(WINDOWS, per_type, strict=True):
        b = ts // width
        for item in reversed(buckets):
            if item[0] == b:
                item[1] += 1
                break
            if item[0] < b:
                buckets.append([b, 1])
                buckets.sort(key=lambda x: x[0])
                break
        else:
            buckets.insert(0, [b, 1])
        newest = buckets[-1][0]
        while buckets and buckets[0][0] <= newest - keep:
            buckets.pop(0)
        counts.append(sum(n for bk, n in buckets if bk > b - keep))
    # session
    sess = st["sess"]
    if sess is None or ts - sess["last"] > GAP_MS:
        st["sessions"] += 1
        sess = st["sess"] = {"start": ts, "last": ts, "events": 0}
    sess["last"] = max(sess["last"], ts)
    sess["events"] += 1
    # cart
    props = ev.get("properties") or {}
    pid = str(props.get("product_id"))
    qty = int(props.get("quantity") or 1)
    price = props.get("price") if isinstance(props.get("price"), (int, float)) else 0.0
    cart = st["cart"]
    life = st["life"]
    if typ == "add_to_cart":
        item = cart.setdefault(pid, [0, price])
        item[0] += qty
        item[1] = price
    elif typ == "remove_from_cart" and pid in cart:
        cart[pid][0] -= qty
        if cart[pid][0] <= 0:
            del cart[pid]
    elif typ == "purchase":
        life["orders"] += 1
        life["revenue"] += float(props.get("revenue") or price * qty)
        cart.clear()
    # lifetime
    life["events"] += 1
    life["first"] = ts if life["first"] is None else min(life["first"], ts)
    life["last"] = ts if life["last"] is None else max(life["last"], ts)
    return {"user_key": user, "event_id": eid, "type": typ, "duplicate": False,
            "count_1h": counts[0], "count_24h": counts[1], "count_7d": counts[2], "session": st["sessions"], "session_events": sess["events"],
            "cart_items": sum(q for q, _p in cart.values()),
            "cart_value": round(sum(q * p for q, p in cart.values()), 2),
            "lifetime_events": life["events"], "lifetime_orders": life["orders"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--in", dest="topic_in", required=True)
    ap.add_argument("--out", dest="topic_out", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--status", required=True)
    ap.add_argument("--guarantee", choices=("at-least-once", "exactly-once"), default="at-least-once")
    ap.add_argument("--commit-interval", type=float, default=1.0)
    args = ap.parse_args(argv)

    from quixstreams import Application

    from benchkit import write_status

    app = Application(broker_address=args.bootstrap, consumer_group=args.group, auto_offset_reset="earliest",
                      processing_guarantee=args.guarantee, state_dir=args.state_dir,
                      commit_interval=args.commit_interval, loglevel="WARNING")
    src = app.topic(args.topic_in, value_deserializer="json", key_deserializer="bytes")
    dst = app.topic(args.topic_out, value_serializer="json", key_serializer="bytes")
    seen = [False]

    def step(ev: dict[str, Any], state: Any) -> dict[str, Any]:
        if not seen[0]:
            seen[0] = True
            write_status(args.status, first=time.time())
        st = state.get("u") or new_state()
        out = apply_event(st, ev)
        if not out["duplicate"]:
            state.set("u", st)
        return out

    sdf = app.dataframe(src)
    sdf = sdf.apply(step, stateful=True)
    sdf.to_topic(dst)
    app.run()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
