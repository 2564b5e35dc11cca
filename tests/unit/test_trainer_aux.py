"""The trainer's session models (engagement tiers, next-action Markov chain) without a broker:
learned from the training topic, snapshotted, served by the worker's registry, resumed exactly."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from clickpulse.events.schemas import validation_errors
from clickpulse.models.markov import MarkovChain
from clickpulse.models.registry import AUX_TASKS, TASKS, ModelRegistry
from clickpulse.models.tiers import TIERS, EngagementTiers, session_features
from clickpulse.models.trainer import Trainer, markov_states, metric_samples

PIPES = {"intent": "logreg", "churn": "logreg"}
KEY = bytes(range(32))   # the snapshot signing key of these tests
LEVELS = {"low": (1, {"page_view": 2}),
          "medium": (12, {"page_view": 6, "product_view": 5, "search": 1}),
          "high": (45, {"page_view": 15, "product_view": 12, "search": 3, "add_to_cart": 3, "checkout_start": 1})}


def tiers_example(level: str, rng: random.Random, i: int) -> dict:
    minutes, counts = LEVELS[level]
    counts = {k: max(0, v + rng.randint(-1, 1)) for k, v in counts.items()}
    session = SimpleNamespace(events=sum(counts.values()), counts=counts,
                              duration_ms=int(minutes * 60_000 * rng.uniform(0.8, 1.2)),
                              dwell_ms=rng.randint(0, 120_000), max_scroll_pct=rng.choice((0.0, 50.0, 100.0)))
    return {"schema_version": 1, "task": "tiers", "user_key": f"u{i}", "event_time_ms": 1000 * i,
            "x": session_features(session)}


def markov_example(rng: random.Random, i: int) -> dict:
    path = ["page_view"] * rng.randint(1, 3)
    converted = False
    if rng.random() < 0.6:
        path += ["product_view"] * rng.randint(1, 2)
        if rng.random() < 0.5:
            path.append("add_to_cart")
            if rng.random() < 0.5:
                path.append("purchase")
                converted = True
                if rng.random() < 0.3:
                    path.append("product_view")      # after the purchase: not learned
    return {"schema_version": 1, "task": "markov", "user_key": f"u{i}", "event_time_ms": 1000 * i, "path": path,
            "converted": converted}


def stream(n: int, seed: int = 5) -> list[dict]:
    """A training topic: labeled intent/churn examples interleaved with session examples."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = i % 4
        if r == 0:
            out.append(tiers_example(rng.choice(TIERS), rng, i))
        elif r == 1:
            out.append(markov_example(rng, i))
        else:
            y = rng.random() < 0.3
            out.append({"task": "intent" if r == 2 else "churn", "x": {"a": rng.gauss(1.0 if y else -1.0, 1.0)},
                        "y": y})
    return out


PROBES = [tiers_example(lvl, random.Random(99 + k), k)["x"] for k in range(10) for lvl in TIERS]
PATHS = [[], ["page_view"], ["page_view", "product_view"], ["add_to_cart"], ["checkout_start"], ["never_seen"],
         ["purchase"]]


def train(exs, trainer=None, start=0, **kw) -> Trainer:
    t = trainer or Trainer(PIPES, {}, key=KEY, **kw)
    for off, ex in enumerate(exs[start:], start=start):
        t.learn(ex, off)
    return t


def by_task(snaps):
    return {s["task"]: s for s in snaps}


def test_examples_match_the_example_schema():
    for ex in stream(40):
        if ex["task"] in AUX_TASKS:
            assert validation_errors("example", ex) == []
    assert validation_errors("example", {"schema_version": 1, "task": "markov", "user_key": "u",   # converted optional
                                         "event_time_ms": 5, "path": ["page_view", "purchase"]}) == []
    labeled = {"schema_version": 1, "example_id": "e", "task": "intent", "user_key": "u", "x": {"a": 1.0}, "y": True,
               "score": 0.5, "model_version": "intent-logreg-0", "predicted_at_ms": 1, "label_at_ms": 2}
    assert validation_errors("example", labeled) == []                       # unchanged for intent/churn
    assert validation_errors("example", {k: v for k, v in labeled.items() if k != "y"})
    assert validation_errors("example", {**labeled, "path": []})
    assert validation_errors("example", {"schema_version": 1, "task": "markov", "user_key": "u", "path": ["<end>"]})
    assert validation_errors("example", {"schema_version": 1, "task": "tiers", "user_key": "u", "x": {"a": "b"}})
    assert validation_errors("example", {"schema_version": 1, "task": "tiers", "user_key": "u", "x": {}, "y": True})


def test_trainer_learns_aux_tasks_and_registry_serves_them():
    exs = stream(800)
    t = train(exs, tiers_warmup=30)
    snaps = by_task(t.snapshots())
    assert set(snaps) == {"intent", "churn", "tiers", "markov"}
    for s in snaps.values():
        assert validation_errors("snapshot", s) == [], s["task"]
    n_tiers = sum(ex["task"] == "tiers" for ex in exs)
    n_markov = sum(ex["task"] == "markov" for ex in exs)
    tiers, markov = snaps["tiers"], snaps["markov"]
    assert tiers["examples"] == tiers["metrics"]["n"] == n_tiers and tiers["pipeline"] == "kmeans"
    assert tiers["training_offset"] == max(i for i, ex in enumerate(exs) if ex["task"] == "tiers")
    assert sum(tiers["metrics"]["sessions"].values()) == n_tiers and tiers["metrics"]["initialised"]
    c = tiers["metrics"]["centers"]
    assert c["high"]["engagement"] > c["medium"]["engagement"] > c["low"]["engagement"]
    purchases = sum("purchase" in ex["path"] for ex in exs if ex["task"] == "markov")
    assert markov["examples"] == n_markov and markov["positives"] == markov["metrics"]["positives"] == purchases
    assert markov["metrics"]["transitions"] == t.aux["markov"].transitions > n_markov
    assert markov["metrics"]["p_purchase"]["add_to_cart"] > markov["metrics"]["p_purchase"]["page_view"]
    # intent/churn are untouched by the session examples
    assert snaps["intent"]["examples"] == sum(ex["task"] == "intent" for ex in exs)

    reg = ModelRegistry(PIPES, key=KEY)
    assert reg.tier(PROBES[0]) == EngagementTiers().tier(PROBES[0]) == "medium"      # before any snapshot
    assert [reg.p_purchase(p) for p in PATHS] == [MarkovChain().p_purchase(p) for p in PATHS]
    for s in snaps.values():
        assert reg.install(s)
    assert reg.snapshot_versions == {"intent": 1, "churn": 1, "tiers": 1, "markov": 1}
    assert [reg.tier(x) for x in PROBES] == [t.aux["tiers"].tier(x) for x in PROBES]
    assert {reg.tier(x) for x in PROBES} == set(TIERS)                          # a learned model, not the default
    assert [reg.p_purchase(p) for p in PATHS] == [t.aux["markov"].p_purchase(p) for p in PATHS]
    assert reg.p_purchase(["page_view"]) != MarkovChain().p_purchase(["page_view"])
    assert reg.metrics["markov"] == markov["metrics"]


def test_markov_example_shapes():
    assert markov_states({"path": ["page_view", "page_view"], "converted": False}) == ["page_view", "page_view"]
    # the purchase is a state of the chain: appended when the path was cut before it
    assert markov_states({"path": ["page_view", "add_to_cart"], "converted": True}) == \
        ["page_view", "add_to_cart", "purchase"]
    # a path holding the purchase: learned up to it (later events dropped), "converted" optional
    assert markov_states({"path": ["page_view", "purchase", "page_view"]}) == ["page_view", "purchase"]
    assert markov_states({"path": ["purchase"], "converted": False}) == ["purchase"]
    for bad in ({"path": ["page_view", "<end>"]}, {"path": "page_view"}, {"path": [1, 2]}):
        with pytest.raises(ValueError):
            markov_states(bad)

    t = Trainer(PIPES, {}, key=KEY)
    assert t.learn({"task": "markov", "path": ["page_view", "add_to_cart"], "converted": True}, 0)
    assert t.aux["markov"].transitions == 3 and t.converted == 1            # <start>>pv>atc>purchase
    with pytest.raises(ValueError):                                        # nothing half-learned
        t.learn({"task": "markov", "path": ["page_view", "product_view", "<start>"]}, 1)
    assert t.aux["markov"].transitions == 3 and t.offsets["markov"] == 0
    with pytest.raises(ValueError):
        t.learn({"task": "tiers", "x": [1.0, 2.0]}, 2)
    assert "tiers" not in t.offsets and t.aux["tiers"].examples == 0
    assert t.learn({"task": "markov", "path": [], "converted": False}, 3)   # an empty session: consumed, not learned
    assert t.aux_examples["markov"] == 1 and t.offsets["markov"] == 3


def test_resume_from_snapshot_skips_learned_offsets():
    exs = stream(1200, seed=8)
    straight = train(exs)

    first = train(exs[:500])
    snaps = first.snapshots()
    train(exs, first, start=500)                       # learned after the snapshot, then lost in a crash

    second = Trainer(PIPES, {}, key=KEY)
    for s in snaps:
        second.resume(s)
    assert second.versions == {"intent": 1, "churn": 1, "tiers": 1, "markov": 1}
    start = second.start_offset()
    assert start == min(s["training_offset"] for s in snaps) + 1 <= 500
    for off in range(start, len(exs)):                 # the group re-reads from the snapshot offset
        second.learn(exs[off], off)
    for off, ex in enumerate(exs):                     # a replay of everything changes nothing
        assert not second.learn(ex, off)

    a, b = straight.aux["tiers"], second.aux["tiers"]
    assert b.examples == a.examples and b.centers() == a.centers()
    assert [b.tier(x) for x in PROBES] == [a.tier(x) for x in PROBES]
    assert second.aux["markov"].counts == straight.aux["markov"].counts
    assert [second.aux["markov"].p_purchase(p) for p in PATHS] == [straight.aux["markov"].p_purchase(p) for p in PATHS]
    assert second.aux_examples == straight.aux_examples and second.converted == straight.converted
    assert second.tier_sessions == straight.tier_sessions
    snap2, straight_snaps = by_task(second.snapshots()), by_task(straight.snapshots())
    for task in AUX_TASKS:
        assert snap2[task]["version"] == 2
        assert snap2[task]["metrics"] == straight_snaps[task]["metrics"]
        assert snap2[task]["training_offset"] == straight_snaps[task]["training_offset"]


def test_older_or_same_version_is_not_installed():
    exs = stream(400)
    t = train(exs[:200])
    v1 = by_task(t.snapshots())
    train(exs, t, start=200)
    v2 = by_task(t.snapshots())
    reg = ModelRegistry(PIPES, key=KEY)
    for task in AUX_TASKS:
        assert reg.install(v2[task])
        assert not reg.install(v1[task])              # older
        assert not reg.install(v2[task])              # same
    assert reg.snapshot_versions == {"tiers": 2, "markov": 2}
    assert reg.aux["markov"].counts == t.aux["markov"].counts
    assert reg.aux["tiers"].examples == t.aux["tiers"].examples
    # and the trainer ignores an older snapshot when resuming
    t2 = Trainer(PIPES, {}, key=KEY)
    t2.resume(v2["markov"])
    t2.resume(v1["markov"])
    assert t2.versions["markov"] == 2 and t2.offsets["markov"] == v2["markov"]["training_offset"]


def test_tiers_stable_under_a_fixed_seed():
    exs = stream(600, seed=13)
    a, b = train(exs, seed=7), train(exs, seed=7)
    assert a.aux["tiers"].seed == b.aux["tiers"].seed == 7                  # the trainer's seed reaches k-means
    assert [a.aux["tiers"].tier(x) for x in PROBES] == [b.aux["tiers"].tier(x) for x in PROBES]
    sa, sb = by_task(a.snapshots()), by_task(b.snapshots())
    assert sa["tiers"]["metrics"] == sb["tiers"]["metrics"] and sa["tiers"]["model_b64"] == sb["tiers"]["model_b64"]
    ra, rb = ModelRegistry(PIPES, seed=1, key=KEY), ModelRegistry(PIPES, seed=2, key=KEY)   # the worker's seed does not matter
    ra.install(sa["tiers"])
    rb.install(sb["tiers"])
    assert [ra.tier(x) for x in PROBES] == [rb.tier(x) for x in PROBES]


def test_unused_aux_tasks_do_not_hold_back_the_start_offset():
    t = Trainer(PIPES, {}, key=KEY)
    for off in range(10):
        t.learn({"task": "intent" if off % 2 else "churn", "x": {"a": 1.0}, "y": False}, off)
    assert set(t.offsets) == set(TASKS) and t.start_offset() == 9
    assert [s["task"] for s in t.snapshots()] == ["intent", "churn"]
    t.learn({"task": "markov", "path": ["page_view"]}, 10)
    t.learn({"task": "tiers", "x": {"engagement": 1.0}}, 11)
    assert [s["task"] for s in t.snapshots()] == ["tiers", "markov", "intent", "churn"]   # session models first
    t2 = Trainer(PIPES, {}, key=KEY)
    for s in t.snapshots():
        t2.resume(s)
    assert t2.start_offset() == 9 and t2.versions == {"intent": 3, "churn": 3, "tiers": 2, "markov": 2}


def test_metric_samples_of_aux_snapshots():
    t = train(stream(400))
    snaps = by_task(t.snapshots())
    tiers = {m: v for task, m, scope, v in metric_samples(snaps["tiers"]) if scope == "model" and task == "tiers"}
    assert tiers["n"] == snaps["tiers"]["examples"] and "initialised" not in tiers
    assert sum(tiers[f"sessions_{lvl}"] for lvl in TIERS) == tiers["n"]
    assert tiers["center_engagement_high"] > tiers["center_engagement_low"]
    markov = {m: v for _t, m, _s, v in metric_samples(snaps["markov"])}
    assert markov["transitions"] == t.aux["markov"].transitions and 0 < markov["conversion"] < 1
    assert all(scope == "model" for *_x, scope, _v in metric_samples(snaps["markov"]))
