"""Per-event cost of the PII policy (``clickpulse.events.pii.PiiPolicy.apply``) on the bundled
REES46 events, as the worker's ingest path calls it: right after ``contract.parse``.

    PYTHONPATH=src .venv/bin/python benchmarks/pii_cost.py [--repeat 7]

Prints µs per event (mean over the 4,999 events, best of ``--repeat`` passes, after one warm-up
pass) for

* the packaged default policy on the REES46 events as parsed (nothing to drop: the common case);
* the default policy on the same events with what a web tracker adds (an e-mail, a URL and a
  search query in ``properties``, an IP, a page and traits in ``context``, Segment's
  ``integrations``): 7 keys dropped per event;
* a hashing policy (``traits.email``, ``traits.phone``, ``context.ip``, ``hash_ids``) on identify
  events carrying an e-mail and a phone number: 5 HMAC-SHA256 per event, the worst case.

The parse itself is not timed (``benchmarks/parse_cost.py`` measures it).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import orjson

from clickpulse.events.contract import parse
from clickpulse.events.pii import PiiPolicy
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46

HASHING = """
version: 1
properties: {allow: [product_id, category, category_id, brand, price, currency, quantity, revenue,
                     session_id, page_type, scroll_pct, dwell_ms, consent]}
context: {allow: [user_agent, device, country, source, clock_corrected]}
traits: {allow: [plan, country]}
hash: [traits.email, traits.phone, context.ip]
hash_ids: true
"""


def cost_us(policy: PiiPolicy, events: list[dict[str, Any]], repeat: int) -> tuple[float, dict[str, int]]:
    """Best-of-``repeat`` mean µs per ``apply`` call over ``events``, and the counts of one pass."""
    apply = policy.apply
    totals = {"dropped": 0, "hashed": 0}
    for ev in events:  # warm-up
        _, counts = apply(ev)
        totals["dropped"] += counts["dropped"]
        totals["hashed"] += counts["hashed"]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for ev in events:
            apply(ev)
        best = min(best, (time.perf_counter_ns() - t0) / len(events) / 1000)
    return best, totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timed passes per case (best is printed)")
    args = ap.parse_args()
    raw = list(read_rees46(BUNDLED_SAMPLE))
    plain = [parse(orjson.dumps(e), None) for e in raw]
    tracked = []
    identify = []
    for e in raw:
        t = {**e, "properties": {**e["properties"], "email": f"u{e['user_id']}@example.com",
                                 "url": "https://shop.example/p?ref=mail", "query": "running shoes"},
             "context": {**e["context"], "ip": "203.0.113.7", "page": {"path": "/p"}, "traits": {"name": "A"}},
             "integrations": {"All": True}}
        tracked.append(parse(orjson.dumps(t), None))
        i = {"type": "identify", "user_id": e["user_id"], "timestamp": e["timestamp"], "event_id": e["event_id"],
             "properties": {"traits": {"email": f" U{e['user_id']}@Example.com", "phone": "+49 151 2345678",
                                       "plan": "pro", "first_name": "Alice"}},
             "context": {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0"}}
        identify.append(parse(orjson.dumps(i), None))
    default = PiiPolicy.default()
    hashing = PiiPolicy.from_yaml(HASHING, key=b"bench-key-0123456789abcdef", source="<bench>")
    rows = [("default policy, REES46 as parsed", *cost_us(default, plain, args.repeat)),
            ("default policy, REES46 + tracker PII", *cost_us(default, tracked, args.repeat)),
            ("hashing policy, identify + e-mail/phone", *cost_us(hashing, identify, args.repeat))]
    print(f"PiiPolicy.apply over {len(plain)} REES46 events (best of {args.repeat} passes):")
    for name, us, totals in rows:
        print(f"  {name:42s} {us:6.2f} µs/event  (dropped {totals['dropped'] / len(plain):.0f}, "
              f"hashed {totals['hashed'] / len(plain):.0f} per event)")


if __name__ == "__main__":
    main()
