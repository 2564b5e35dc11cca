"""Readers that turn public datasets into raw clickpulse events (dicts, before validation).

REES46 / Open CDP "eCommerce behavior data from multi category store" columns:
``event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session``.
Mapping: ``view`` -> ``product_view``, ``cart`` -> ``add_to_cart`` (quantity 1),
``purchase`` -> ``purchase`` (one unit of the product; revenue = price), ``remove_from_cart``
(present in later months of the dataset) -> ``remove_from_cart``. Prices are taken as USD.
The dataset has no event ids; each row gets ``rees46-`` + SHA-256 of the raw CSV line, so
identical rows (the bundled sample has 3) collapse into one event.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ..errors import DatasetError

REES46_COLUMNS = ["event_time", "event_type", "product_id", "category_id", "category_code",
                  "brand", "price", "user_id", "user_session"]
REES46_TYPES = {"view": "product_view", "cart": "add_to_cart", "purchase": "purchase",
                "remove_from_cart": "remove_from_cart"}
BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "rees46-2019-oct-sample.csv"


def rees46_time_ms(text: str) -> int:
    """``'2019-10-01 00:00:00 UTC'`` -> epoch milliseconds.

    >>> rees46_time_ms("2019-10-01 00:00:00 UTC")
    1569888000000
    """
    try:
        dt = datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S %Z").replace(tzinfo=UTC)
    except ValueError as err:
        raise DatasetError(f"bad REES46 event_time {text!r}") from err
    return int(dt.timestamp() * 1000)


def rees46_event(row: dict[str, str], line: str) -> dict[str, Any]:
    """One REES46 CSV row (and its raw line, for the id) -> a raw clickpulse event."""
    etype = REES46_TYPES.get(row["event_type"], row["event_type"])
    props: dict[str, Any] = {"product_id": row["product_id"], "category_id": row["category_id"],
                             "currency": "USD", "session_id": row["user_session"]}
    if row.get("category_code"):
        props["category"] = row["category_code"]
    if row.get("brand"):
        props["brand"] = row["brand"]
    if row.get("price"):
        try:
            props["price"] = float(row["price"])
        except ValueError:
            props["price"] = row["price"]  # left for the validator to reject with a reason
    if etype in ("add_to_cart", "remove_from_cart", "purchase"):
        props["quantity"] = 1
    if etype == "purchase" and isinstance(props.get("price"), float):
        props["revenue"] = props["price"]
    return {
        "event_id": "rees46-" + hashlib.sha256(line.encode()).hexdigest()[:24],
        "type": etype,
        "user_id": row["user_id"],
        "timestamp": rees46_time_ms(row["event_time"]),
        "properties": props,
        "context": {"source": "rees46"},
    }


def read_rees46(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield raw events from a REES46 CSV file, in file order.

    Raises
    ------
    DatasetError
        Missing file or a header that is not the REES46 one.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"no such file: {p}")
    with p.open(newline="", encoding="utf-8") as fh:
        header = fh.readline()
        cols = next(csv.reader([header]))
        if cols != REES46_COLUMNS:
            raise DatasetError(f"{p}: header {cols} is not the REES46 header {REES46_COLUMNS}")
        for n, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            values = next(csv.reader(io.StringIO(line)))
            if len(values) != len(cols):
                raise DatasetError(f"{p}:{n}: {len(values)} fields, expected {len(cols)}")
            yield rees46_event(dict(zip(cols, values, strict=True)), line)


def read_jsonl(path: str | Path) -> Iterator[bytes]:
    """Yield each non-empty line of a JSON-lines file as raw bytes (validated later, by ingest)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"no such file: {p}")
    with p.open("rb") as fh:
        for line in fh:
            line = line.strip()
            if line:
                yield line


def event_time_of(raw: bytes) -> int | None:
    """Best-effort event time (epoch ms) of a raw JSON event, for the Kafka message timestamp."""
    from ..events.contract import parse_timestamp
    try:
        obj = orjson.loads(raw)
        return parse_timestamp(obj.get("timestamp")) if isinstance(obj, dict) else None
    except Exception:  # noqa: BLE001 - a bad line is published as-is and rejected by ingest
        return None
