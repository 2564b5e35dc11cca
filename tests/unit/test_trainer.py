"""The trainer without a broker: progressive validation order, resume without double learning."""

from __future__ import annotations

import random

from clickpulse.events.schemas import validation_errors
from clickpulse.models.trainer import Trainer

KEY = bytes(range(32))   # the snapshot signing key of these tests


def examples(n, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = rng.random() < 0.3
        out.append({"task": "intent" if i % 3 else "churn", "x": {"a": rng.gauss(1.0 if y else -1.0, 1.0)},
                    "y": y})
    return out


def test_predict_before_learn_and_snapshot_schema():
    t = Trainer({"intent": "logreg", "churn": "logreg"}, {"intent": 0.5, "churn": 0.5}, key=KEY)
    exs = examples(300)
    for off, ex in enumerate(exs):
        assert t.learn(ex, off)
    snaps = t.snapshots()
    assert [s["version"] for s in snaps] == [1, 1]
    for s in snaps:
        assert validation_errors("snapshot", s) == []
        assert s["metrics"]["n"] == s["examples"] and s["training_offset"] >= 0
    intent = next(s for s in snaps if s["task"] == "intent")
    assert intent["metrics"]["all"]["roc_auc"] > 0.7       # learnable signal, predicted before learned


def test_restart_resumes_without_double_learning():
    exs = examples(400)
    straight = Trainer({"intent": "logreg", "churn": "logreg"}, {}, key=KEY)
    for off, ex in enumerate(exs):
        straight.learn(ex, off)

    first = Trainer({"intent": "logreg", "churn": "logreg"}, {}, key=KEY)
    for off, ex in enumerate(exs[:250]):
        first.learn(ex, off)
    snaps = first.snapshots()
    for off, ex in enumerate(exs[250:300], start=250):   # learned but never snapshotted: lost in a crash
        first.learn(ex, off)

    second = Trainer({"intent": "logreg", "churn": "logreg"}, {}, key=KEY)
    for s in snaps:
        second.resume(s)
    start = second.start_offset()
    assert start <= 250
    for off in range(start, len(exs)):                    # the group re-reads from the snapshot offset
        second.learn(exs[off], off)
    for off in range(0, len(exs)):                        # a replay of everything changes nothing
        assert not second.learn(exs[off], off)
    for task in ("intent", "churn"):
        assert second.models[task].examples == straight.models[task].examples
        x = {"a": 0.3}
        assert second.models[task].score(x) == straight.models[task].score(x)
        assert second.validation[task].n == straight.validation[task].n
    assert [s["version"] for s in second.snapshots()] == [2, 2]


def test_standby_trainer_reloads_snapshots_when_it_takes_over():
    import asyncio

    from clickpulse.models.trainer import _Seek

    exs = examples(200)
    owner = Trainer({"intent": "logreg", "churn": "logreg"}, {}, key=KEY)
    standby = Trainer({"intent": "logreg", "churn": "logreg"}, {}, key=KEY)   # started when nothing was published
    for off, ex in enumerate(exs):
        owner.learn(ex, off)
    published = {s["task"]: s for s in owner.snapshots() + owner.snapshots()}   # v2 is the newest

    class FakeConsumer:
        seeks = []

        def seek(self, tp, offset):
            self.seeks.append((tp, offset))

    class TP:
        topic, partition = "t", 0

    async def reload():
        return published

    consumer = FakeConsumer()
    asyncio.run(_Seek(consumer, standby, "t", reload).on_partitions_assigned([TP()]))
    assert standby.versions == {"intent": 2, "churn": 2}
    assert consumer.seeks == [(consumer.seeks[0][0], 199)]   # after the last example learned by every task
    assert [s["version"] for s in standby.snapshots()] == [3, 3]


def test_metric_samples_skip_ranking_metrics_with_one_class():
    from clickpulse.models.trainer import metric_samples

    t = Trainer({"intent": "logreg", "churn": "logreg"}, {}, key=KEY)
    for off in range(5):
        t.learn({"task": "churn", "x": {"a": 1.0}, "y": False}, off)
    churn = next(s for s in t.snapshots() if s["task"] == "churn")
    names = {(m, scope) for _t, m, scope, _v in metric_samples(churn)}
    assert ("roc_auc", "all") not in names and ("log_loss", "all") in names
