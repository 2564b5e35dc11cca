"""Online models: the contract every pipeline passes, progressive validation by hand, UCI evaluation."""

from __future__ import annotations

import math
import random
from itertools import islice

import pytest

from clickpulse.errors import ConfigError, DatasetError
from clickpulse.models import evaluate as ev
from clickpulse.models.online import PIPELINES, OnlineModel
from clickpulse.models.validation import ProgressiveValidation


# -- (a) contract suite: every pipeline --------------------------------------------------------------
def synthetic(n: int, seed: int = 7) -> list[tuple[dict[str, float], bool]]:
    """``n`` examples of a noisy linear concept over three features (deterministic for ``seed``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = {"a": rng.gauss(0, 1), "b": rng.gauss(0, 1), "c": rng.uniform(0, 5)}
        out.append((x, x["a"] + 0.5 * x["b"] + rng.gauss(0, 0.5) > 0.3))
    return out


TRAIN = synthetic(400)
PROBES = [x for x, _ in synthetic(25, seed=99)]
ODD = [{}, {"a": 1.0}, {"b": -2.0, "c": 0.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "unseen": 3.0},
       {"unseen": 1e6}, {"a": 1e9, "b": -1e9, "c": 0.0}]


def trained(pipeline: str, seed: int = 3, rows: list[tuple[dict[str, float], bool]] = TRAIN) -> OnlineModel:
    m = OnlineModel("intent", pipeline, seed=seed)
    for x, y in rows:
        m.learn(x, y)
    return m


def valid_score(p: object) -> bool:
    return isinstance(p, float) and not math.isnan(p) and 0.0 <= p <= 1.0


@pytest.fixture(params=sorted(PIPELINES))
def pipeline(request: pytest.FixtureRequest) -> str:
    return request.param


def test_score_before_learning_is_in_unit_interval(pipeline):
    # SCENARIOS S5: the very first event with a fresh model gets a score in [0, 1], never None/an error.
    m = OnlineModel("intent", pipeline, seed=1)
    for x in [PROBES[0], *ODD]:
        assert valid_score(m.score(x))
    assert m.examples == 0 and m.version == f"intent-{pipeline}-0"


def test_pickle_round_trip_gives_identical_scores(pipeline):
    m = trained(pipeline)
    restored = OnlineModel.from_bytes(m.to_bytes())
    assert (restored.task, restored.pipeline_name, restored.seed, restored.examples, restored.positives) == \
        (m.task, m.pipeline_name, m.seed, m.examples, m.positives)
    assert [restored.score(x) for x in PROBES] == [m.score(x) for x in PROBES]
    # ... and both keep learning identically (random state travels with the snapshot)
    for x, y in synthetic(100, seed=5):
        m.learn(x, y)
        restored.learn(x, y)
    assert [restored.score(x) for x in PROBES] == [m.score(x) for x in PROBES]
    assert restored.version == m.version == f"intent-{pipeline}-500"


def test_same_seed_same_examples_same_scores(pipeline):
    a, b = trained(pipeline, seed=11), trained(pipeline, seed=11)
    assert [a.score(x) for x in PROBES] == [b.score(x) for x in PROBES]


def test_learning_moves_scores_toward_the_labels(pipeline):
    m = trained(pipeline)
    held_out = synthetic(300, seed=123)
    correct = sum((m.score(x) >= 0.5) == y for x, y in held_out)
    assert correct / len(held_out) > 0.7  # the concept is easy; 0.5 would be a constant answer


def test_missing_and_unseen_features_are_tolerated(pipeline):
    m = trained(pipeline)
    for x in ODD:
        assert valid_score(m.score(x))
    m.learn({"a": 1.0, "brand_new": 2.0}, True)  # a new feature in a training example
    m.learn({}, False)
    for x in [*ODD, PROBES[0]]:
        assert valid_score(m.score(x))


def test_from_bytes_rejects_other_objects():
    import pickle
    with pytest.raises(TypeError):
        OnlineModel.from_bytes(pickle.dumps({"not": "a model"}))
    with pytest.raises(ConfigError):
        OnlineModel("intent", "no-such-pipeline")


# -- (b) progressive validation, checked by hand ------------------------------------------------------
# (label, score), threshold 0.5:
#   (T, .9) (T, .7) (F, .6) (T, .4) (F, .3) (F, .1)
# predicted positive (score >= .5): .9 .7 .6  ->  TP = 2 (.9 .7), FP = 1 (.6), FN = 1 (.4), TN = 2 (.3 .1)
#   accuracy  = (TP + TN) / 6 = 4/6
#   precision = TP / (TP + FP) = 2/3;  recall = TP / (TP + FN) = 2/3;  F1 = 2PR / (P + R) = 2/3
# ROC AUC = P(score of a positive > score of a negative) over the 3 x 3 pairs:
#   .9 beats .6 .3 .1 (3); .7 beats all three (3); .4 beats .3 .1 but not .6 (2)  ->  8/9
# PR AUC (average precision, River's RollingPRAUC): ranks by score .9T .7T .6F .4T .3F .1F;
#   precision at each positive = 1/1, 2/2, 3/4  ->  (1 + 1 + 3/4) / 3 = 11/12
# log loss = -mean(ln p(true label)) = -(ln .9 + ln .7 + ln .4 + ln .4 + ln .7 + ln .9) / 6
#          = -(ln .9 + ln .7 + ln .4) / 3 = (0.1053605 + 0.3566749 + 0.9162907) / 3 = 0.4594420
# window of 3 = the last three pairs (T .4) (F .3) (F .1): ROC AUC 1, PR AUC 1.
HAND = [(True, 0.9), (True, 0.7), (False, 0.6), (True, 0.4), (False, 0.3), (False, 0.1)]


def test_progressive_validation_matches_hand_computation():
    v = ProgressiveValidation(threshold=0.5, window=3)
    for y, p in HAND:
        v.update(y, p)
    r = v.report()
    assert (r["n"], r["positives"], r["threshold"]) == (6, 3, 0.5)
    a = r["all"]
    assert a["accuracy"] == pytest.approx(4 / 6)
    assert a["precision"] == pytest.approx(2 / 3)
    assert a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["log_loss"] == pytest.approx(0.4594420, abs=1e-7)
    assert a["roc_auc"] == pytest.approx(8 / 9, abs=1e-9)  # 1,000 thresholds separate the 0.1 grid exactly
    assert a["pr_auc"] == pytest.approx(11 / 12)
    assert r["window"] == {"size": 3, "roc_auc": pytest.approx(1.0), "pr_auc": pytest.approx(1.0)}


def test_progressive_validation_exact_window_roc_auc_over_everything():
    v = ProgressiveValidation(threshold=0.5, window=len(HAND))  # window >= n: the exact all-time value
    for y, p in HAND:
        v.update(y, p)
    assert v.report()["window"]["roc_auc"] == pytest.approx(8 / 9)


# -- (c) evaluate() on a slice of the bundled UCI file ------------------------------------------------
@pytest.fixture(scope="module")
def uci_slice() -> list[tuple[dict[str, float], bool]]:
    # rows 8,000-8,499: 111 purchases, so precision and recall are not 0/0
    return list(islice(ev.uci_rows(), 8000, 8500))


def test_uci_rows_feature_mapping(uci_slice):
    keys = set(uci_slice[0][0])
    assert len(uci_slice) == 500
    assert all(set(x) == keys for x, _ in uci_slice)  # dense one-hot: every row has the same keys
    assert {"admin_pages_log1p", "product_s_log1p", "bounce_rate", "exit_rate", "page_value_log1p",
            "special_day", "weekend", "month=Nov", "visitor=new", "os=8", "browser=13", "region=9",
            "traffic=20"} <= keys
    for x, _ in uci_slice:
        for prefix in ("month=", "visitor=", "os=", "browser=", "region=", "traffic="):
            assert sum(v for k, v in x.items() if k.startswith(prefix)) == 1.0
        assert all(math.isfinite(v) and v >= 0 for v in x.values())


def test_uci_rows_errors(tmp_path):
    with pytest.raises(DatasetError):
        list(ev.uci_rows(tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError):
        list(ev.uci_rows(bad))
    row = ev.BUNDLED_UCI.read_text().splitlines()[:2]
    broken = tmp_path / "broken.csv"
    broken.write_text(row[0] + "\n" + row[1].replace(",FALSE,FALSE", ",maybe,FALSE") + "\n")
    with pytest.raises(DatasetError, match=":2: bad UCI row"):
        list(ev.uci_rows(broken))


def without_timing(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("seconds", "model_seconds", "examples_per_s")}


@pytest.mark.parametrize("pipeline", ["logreg", "hoeffding"])
def test_evaluate_metrics_match_an_independent_recount(uci_slice, pipeline):
    pairs: list[tuple[bool, float]] = []
    r = ev.evaluate(uci_slice, pipeline, seed=5, threshold=0.5, on_score=lambda y, p: pairs.append((y, p)))
    assert len(pairs) == r["n"] == 500
    assert [y for y, _ in pairs] == [y for _, y in uci_slice]  # file order
    tp = sum(y and p >= 0.5 for y, p in pairs)
    fp = sum(not y and p >= 0.5 for y, p in pairs)
    fn = sum(y and p < 0.5 for y, p in pairs)
    tn = sum(not y and p < 0.5 for y, p in pairs)
    assert r["positives"] == tp + fn == 111
    assert r["accuracy"] == pytest.approx((tp + tn) / 500)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    assert r["precision"] == pytest.approx(precision)
    assert r["recall"] == pytest.approx(recall)
    assert r["f1"] == pytest.approx(2 * precision * recall / (precision + recall) if tp else 0.0)
    eps = 1e-15  # River's LogLoss clamps p to [1e-15, 1 - 1e-15]
    ll = -sum(math.log(min(1 - eps, max(eps, p if y else 1 - p))) for y, p in pairs) / 500
    assert r["log_loss"] == pytest.approx(ll)
    assert 0.0 <= r["roc_auc"] <= 1.0 and 0.0 <= r["pr_auc"] <= 1.0
    assert r["roc_auc"] == pytest.approx(r["roc_auc_binned"], abs=0.01)  # exact vs 1,000-threshold approximation
    assert r["seconds"] >= r["model_seconds"] > 0 and r["examples_per_s"] > 0


def test_evaluate_is_deterministic_in_file_order_and_shuffled(uci_slice):
    def run(shuffle_seed):
        pairs: list[tuple[bool, float]] = []
        r = ev.evaluate(uci_slice, "arf", seed=9, shuffle_seed=shuffle_seed, on_score=lambda y, p: pairs.append((y, p)))
        return without_timing(r), pairs

    file_a, file_b = run(None), run(None)
    shuf_a, shuf_b = run(4), run(4)
    assert file_a == file_b
    assert shuf_a == shuf_b
    assert shuf_a[0]["shuffle_seed"] == 4 and file_a[0]["shuffle_seed"] is None
    assert [y for y, _ in shuf_a[1]] != [y for y, _ in file_a[1]]  # really another order ...
    assert sorted(y for y, _ in shuf_a[1]) == sorted(y for y, _ in file_a[1])  # ... of the same rows
    assert run(5)[1] != shuf_a[1]


def test_run_cli_prints_the_table(capsys):
    assert ev.run_cli("uci", "logreg", limit=300, seed=1) == 0
    out = capsys.readouterr().out
    assert "300 sessions" in out
    for text in ("logreg: file order", "logreg: shuffled (seed 1)", "ROC AUC", "PR AUC", "F1 (purchase)",
                 "examples/s", "Tanvir et al. 2023", "0.937", "0.754", "90.65 %", "84.5 %"):
        assert text in out


def test_run_cli_errors(monkeypatch, tmp_path):
    with pytest.raises(DatasetError, match="unknown evaluation dataset"):
        ev.run_cli("kaggle", "logreg", limit=10, seed=1)
    with pytest.raises(ConfigError):
        ev.run_cli("uci", "no-such-pipeline", limit=10, seed=1)
    monkeypatch.setitem(ev.DATASETS, "uci", tmp_path / "gone.csv")
    with pytest.raises(DatasetError, match="missing"):
        ev.run_cli("uci", "all", limit=10, seed=1)
