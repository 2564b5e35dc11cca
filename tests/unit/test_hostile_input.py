"""Hostile input end to end without Kafka: arbitrary JSON through ``parse`` and the engine step.

Property: whatever a producer sends, ``parse`` either returns a canonical event or raises
``InvalidEvent`` with a known reason; the engine step then processes it without an exception
(nothing failed, nobody quarantined), and nothing non-finite (inf, NaN) reaches a user's state,
a profile, an action, a segment change or a training example.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickpulse.errors import InvalidEvent
from clickpulse.events.contract import CANONICAL_TYPES, DLQ_REASONS, parse
from clickpulse.models.labels import ModelConfig
from clickpulse.models.registry import ModelRegistry
from clickpulse.state.user import UserState
from clickpulse.testing import memory_engine

T0 = 1_569_888_000_000  # 2019-10-01T00:00:00Z

odd_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "\u0000", "\u202e", "💥" * 10, "a" * 300, "EUR", "eur", "e\u0301", "\ufeff"])
numbers = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([9e307, -9e307, 1e308, 1e-308, 0, -0.0, 2**63, 2**64 + 1, 10**30]))
leaves = st.none() | st.booleans() | numbers | odd_text
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(odd_text, inner, max_size=4), max_leaves=20)
money = numbers | odd_text | st.none()
properties = st.fixed_dictionaries({}, optional={
    "product_id": odd_text | numbers, "price": money, "revenue": money, "total": money, "value": money,
    "quantity": numbers | odd_text, "currency": odd_text, "category": odd_text | numbers,
    "scroll_pct": numbers, "dwell_ms": numbers, "page_type": odd_text | numbers,
    "consent": st.dictionaries(odd_text, st.booleans() | leaves, max_size=3),
    "traits": st.dictionaries(odd_text, json_values, max_size=3), "extra": json_values})
events = st.fixed_dictionaries({
    "type": st.sampled_from(sorted(CANONICAL_TYPES)) | odd_text | numbers,
    "user_id": st.sampled_from(["u1", "u2", "u3"]) | odd_text | numbers,
    "timestamp": st.integers(min_value=T0, max_value=T0 + 10 * 86_400_000) | numbers | odd_text,
}, optional={"event_id": odd_text | numbers, "anonymous_id": odd_text, "properties": properties | json_values,
             "context": st.dictionaries(odd_text, json_values, max_size=3) | json_values,
             "sent_at": odd_text | numbers})


def _finite(obj: Any, where: str) -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj), f"non-finite {obj!r} in {where}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        names = getattr(obj, "__slots__", None) or vars(obj)
        for k in names:
            _finite(getattr(obj, k, None), f"{where}.{k}")


def _engine() -> Any:
    eng = memory_engine(live=False)
    eng.models, eng.mcfg = ModelRegistry({}), ModelConfig()
    return eng


def _encode(obj: dict) -> bytes:
    return json.dumps(obj, allow_nan=False).encode()  # stdlib: integers of any size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(events, min_size=1, max_size=6))
def test_arbitrary_json_never_escapes_and_never_poisons_state(batch):
    eng = _engine()
    items = []
    for obj in batch:
        try:
            items.append((0, parse(_encode(obj), None, received_ms=T0 + 20 * 86_400_000)))
        except InvalidEvent as err:
            assert err.reason in DLQ_REASONS
    em = eng.step(items, T0)
    assert em.failed == [] and em.quarantined == {}, (em.failed, em.quarantined)
    eng.commit(em)
    for close in (eng.end_of_input_step(0, 0, 1, T0),):
        assert close.failed == [] and close.quarantined == {}
        eng.commit(close)
        em.merge(close)
    for rec in em.actions + em.segment_changes + em.examples:
        _finite(rec, "record")
        orjson.dumps(rec)  # serializable as the worker publishes it
    for key, raw in eng.table.items():
        state = UserState.from_bytes(raw)
        _finite(state, f"state {key!r}")
        prof = state.profile(engagement=eng.cfg.engagement, extra=eng.profile_extra(state))
        _finite(prof, "profile")
        orjson.dumps(prof)


def test_the_issue_inputs_revenue_9e307_twice():
    """Two schema-valid purchases with revenue 9e307 pushed lifetime revenue to inf."""
    eng = _engine()
    for i in range(2):
        obj = {"type": "purchase", "user_id": "whale", "timestamp": T0 + i, "event_id": f"w{i}",
               "properties": {"revenue": 9e307}}
        try:
            eng.process(0, parse(orjson.dumps(obj), None), 0)
        except InvalidEvent as err:
            assert err.reason == "out_of_range"
    st_ = eng.load("whale")
    assert st_ is None or math.isfinite(st_.life.revenue)
