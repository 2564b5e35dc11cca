"""Delayed labels and model actions (SCENARIOS S5, S6), with a hand-moved event-time clock."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from clickpulse.models.labels import ModelConfig
from clickpulse.models.registry import ModelRegistry
from clickpulse.observability.metrics import Metrics
from clickpulse.state.clock import END_OF_TIME
from clickpulse.engine import Engine
from clickpulse.state.user import StateConfig
from clickpulse.events.contract import normalize
from clickpulse.testing import event, ms

DAY = 86_400_000


class RecordingScorer:
    """Wraps a registry and records the feature dicts it scored."""

    def __init__(self, registry):
        self.registry = registry
        self.seen = []

    def score(self, task, x):
        self.seen.append((task, dict(x)))
        return self.registry.score(task, x)


def engine(cap: int = 1000, **cfg):
    mcfg = ModelConfig(**{"score_every": 5, "churn_horizon_ms": 14 * DAY, **cfg})
    reg = ModelRegistry({"intent": "logreg", "churn": "logreg"})
    eng = Engine({}, StateConfig(), allowed_lateness_ms=0, idle_timeout_ms=5000, live=False,
                 metrics=Metrics(CollectorRegistry()), models=reg, model_cfg=mcfg, pending_total_cap=cap,
                 assumed_consent=frozenset({"marketing"}))  # the test data sends no consent events
    return eng, reg


def test_s5_score_before_learning_is_in_unit_interval():
    eng, reg = engine()
    p, version, top = reg.score("intent", {})
    assert 0.0 <= p <= 1.0 and version == "intent-logreg-0" and top() == []
    eng.process(0, event("add_to_cart", product_id="p1", price=5.0), 0)
    st = eng.load("u1")
    assert 0.0 <= st.ml["sc"]["intent"] <= 1.0


def test_s6_learns_from_features_at_prediction_time():
    eng, _reg = engine()
    eng.process(0, event("product_view", user="u7", product_id="p", at="2019-10-01T10:00:00Z"), 0)
    eng.process(0, event("add_to_cart", user="u7", product_id="p", price=20.0, at="2019-10-01T10:02:00Z"), 0)
    from clickpulse.models.features import unpack
    x_at_add = unpack(eng.load("u7").ml["pi"][0][4])
    assert eng.drain_examples() == []                               # unlabeled until the outcome
    for t in ("10:15", "10:28"):                                     # still browsing: same session
        eng.process(0, event("page_view", user="u7", at=f"2019-10-01T{t}:00Z"), 0)
    eng.process(0, event("purchase", user="u7", price=20.0, at="2019-10-01T10:40:00Z"), 0)
    examples = [e for e in eng.drain_examples() if e["task"] == "intent"]
    assert len(examples) == 1
    ex = examples[0]
    assert ex["y"] is True and ex["x"] == x_at_add
    assert "orders" in ex["x"] and ex["x"]["orders"] == 0.0      # no trace of the purchase
    assert ex["predicted_at_ms"] == ms("2019-10-01T10:02:00Z")
    assert eng.load("u7").ml.get("pi") is None


def test_session_end_labels_negative_and_scores_churn():
    eng, _ = engine()
    eng.process(0, event("add_to_cart", product_id="p", at="2019-10-01T10:00:00Z"), 0)
    # another user's event moves the watermark past 10:00 + 30 min
    eng.process(0, event("page_view", user="other", at="2019-10-01T10:31:00Z"), 0)
    intent = [e for e in eng.drain_examples() if e["task"] == "intent"]
    assert [e["y"] for e in intent] == [False]
    pc = eng.load("u1").ml["pc"]
    assert pc[1] == ms("2019-10-01T10:00:00Z") + 14 * DAY          # churn horizon timer


def test_churn_label_zero_when_user_returns_within_horizon():
    eng, _ = engine()
    eng.process(0, event("page_view", at="2019-10-01T10:00:00Z"), 0)
    eng.process(0, event("page_view", at="2019-10-05T10:00:00Z"), 0)   # returns after 4 days
    churn = [e for e in eng.drain_examples() if e["task"] == "churn"]
    assert [e["y"] for e in churn] == [False]


def test_churn_label_one_when_horizon_passes():
    eng, _ = engine()
    eng.process(0, event("page_view", at="2019-10-01T10:00:00Z"), 0)
    eng.process(0, event("page_view", user="other", at="2019-10-20T00:00:00Z"), 0)   # watermark moves on
    churn = {e["user_key"]: e["y"] for e in eng.drain_examples() if e["task"] == "churn"}
    assert churn["u1"] is True


def test_end_of_input_does_not_invent_churn():
    eng, _ = engine()
    eng.process(0, event("page_view", at="2019-10-01T10:00:00Z"), 0)
    eng.end_of_input(0, 0, 1, 0)
    assert eng.clock(0).watermark() == END_OF_TIME
    # session ended: nothing to label, but the session itself goes to the tiers and the Markov chain
    assert [e["task"] for e in eng.drain_examples()] == ["tiers", "markov"]
    assert eng.load("u1").ml.get("pc") is not None                   # churn still pending
    assert eng.tick(0, 0) == [] and eng.drain_examples() == []


def test_pending_buffer_is_bounded_per_user_and_expires():
    eng, _ = engine(pending_per_user=3, pending_max_age_ms=3_600_000)
    for i in range(6):   # add_to_cart scores every time
        eng.process(0, event("add_to_cart", product_id=f"p{i}", at=ms("2019-10-01T10:00:00Z") + i * 60_000), 0)
    st = eng.load("u1")
    assert len(st.ml["pi"]) == 3
    assert eng.metrics.predictions_dropped.labels("per_user")._value.get() == 3
    # a session kept alive for > 1 h: old predictions expire when the watermark passes their age
    for i in range(1, 5):
        eng.process(0, event("page_view", at=ms("2019-10-01T10:05:00Z") + i * 20 * 60_000), 0)
    assert eng.metrics.predictions_dropped.labels("expired")._value.get() >= 1


def test_high_intent_fires_once_per_session_with_score_and_version():
    eng, reg = engine(intent_threshold=0.0)   # any score qualifies
    _, acts = eng.process(0, event("add_to_cart", product_id="p1", price=10.0, at="2019-10-01T10:00:00Z"), 0)
    _, acts2 = eng.process(0, event("add_to_cart", product_id="p2", price=10.0, at="2019-10-01T10:01:00Z"), 0)
    hi = [a for a in acts + acts2 if a["type"] == "high_intent"]
    assert len(hi) == 1 and hi[0]["model_version"] == "intent-logreg-0" and 0 <= hi[0]["payload"]["score"] <= 1
    from clickpulse.events.schemas import validation_errors
    assert validation_errors("action", hi[0]) == []


def test_churn_risk_cooldown():
    eng, _ = engine(churn_threshold=0.0, churn_cooldown_ms=7 * DAY)
    acts = []
    for day in (1, 3, 10):   # sessions ending (by the watermark) on day 1, 3 (within cooldown) and 10
        t = ms("2019-10-01T10:00:00Z") + (day - 1) * DAY
        acts += eng.process(0, event("page_view", at=t), 0)[1]
        acts += eng.process(0, event("page_view", user=f"clock{day}", at=t + 31 * 60_000), 0)[1]
    risky = [a for a in acts if a["type"] == "churn_risk" and a["user_key"] == "u1"]
    assert len(risky) == 2   # day 1 and day 10; day 3 is inside the cooldown


def test_no_churn_risk_for_a_user_whose_return_ends_the_session():
    eng, _ = engine(churn_threshold=0.0)
    acts = eng.process(0, event("page_view", at="2019-10-01T10:00:00Z"), 0)[1]
    acts += eng.process(0, event("page_view", at="2019-10-03T10:00:00Z"), 0)[1]   # the return ends it
    assert [a for a in acts if a["type"] == "churn_risk"] == []
    assert [(e["task"], e["y"]) for e in eng.drain_examples() if e["task"] in ("intent", "churn")] == [("churn", False)]


def test_predictions_are_labelled_before_they_could_expire():
    """A user back after 7 h (replay: nothing else moved the watermark): the old session's intent
    predictions are labelled 0, not dropped as expired."""
    eng, _ = engine(pending_max_age_ms=6 * 3_600_000)
    eng.process(0, event("add_to_cart", product_id="p", at="2019-10-01T10:00:00Z"), 0)
    eng.process(0, event("checkout_start", at="2019-10-01T10:01:00Z"), 0)
    eng.process(0, event("page_view", at="2019-10-01T17:30:00Z"), 0)
    intent = [e["y"] for e in eng.drain_examples() if e["task"] == "intent"]
    assert intent == [False, False]
    assert eng.metrics.predictions_dropped.labels("expired")._value.get() == 0


def test_session_start_moving_earlier_keeps_its_predictions():
    eng, _ = engine(intent_threshold=0.0)
    acts = eng.process(0, event("add_to_cart", product_id="p", price=5.0, at="2019-10-01T10:05:00Z"), 0)[1]
    acts += eng.process(0, event("page_view", at="2019-10-01T10:00:00Z"), 0)[1]     # out of order
    acts += eng.process(0, event("add_to_cart", product_id="q", price=5.0, at="2019-10-01T10:06:00Z"), 0)[1]
    eng.process(0, event("purchase", at="2019-10-01T10:10:00Z"), 0)
    intent = [e for e in eng.drain_examples() if e["task"] == "intent"]
    assert [e["y"] for e in intent] == [True, True] and len({e["example_id"] for e in intent}) == 2
    assert len([a for a in acts if a["type"] == "high_intent"]) == 1


def test_no_high_intent_with_an_empty_cart():
    eng, _ = engine(intent_threshold=0.0, score_every=1)
    acts = []
    for i in range(3):
        acts += eng.process(0, event("page_view", at=ms("2019-10-01T10:00:00Z") + i * 1000), 0)[1]
    assert [a for a in acts if a["type"] == "high_intent"] == []


def test_a_late_event_of_an_ended_session_is_not_a_return():
    eng, _ = engine()
    eng.process(0, event("page_view", at="2019-10-01T10:00:00Z"), 0)
    eng.process(0, event("page_view", user="clock", at="2019-10-01T10:31:00Z"), 0)  # session ends by watermark
    assert eng.load("u1").ml.get("pc") is not None
    eng.process(0, event("page_view", at="2019-10-01T10:10:00Z"), 0)                   # late, same session
    assert [e for e in eng.drain_examples() if e["task"] == "churn"] == []
    assert eng.load("u1").ml.get("pc") is not None



def test_pending_buffer_is_bounded_in_total():
    eng, _ = engine(cap=2)
    for u in ("a", "b", "c", "d"):
        eng.process(0, event("add_to_cart", user=u, product_id="p", at="2019-10-01T10:00:00Z"), 0)
    assert eng.pending_predictions == 2
    assert eng.metrics.predictions_dropped.labels("capacity")._value.get() == 2


def test_model_actions_wait_until_the_model_has_seen_both_classes():
    eng, reg = engine(intent_threshold=0.0)  # a fresh model: every score clears the threshold
    eng.model_min_class_examples = 10
    acts = eng.process(0, event("add_to_cart", product_id="p1", price=5.0), 0)[1]
    assert [a for a in acts if a["type"] == "high_intent"] == []
    assert eng.metrics.model_actions_suppressed.labels("high_intent")._value.get() == 1
    m = reg.models["intent"]
    m.examples, m.positives = 20, 10  # as after learning 10 of each class
    acts = eng.process(0, event("add_to_cart", user="u2", product_id="p1", price=5.0), 0)[1]
    assert [a["type"] for a in acts] == ["high_intent"]


def test_model_actions_pass_the_consent_and_bot_gates():
    """high_intent / churn_risk never reach a user who opted out or a bot (they skipped both gates)."""
    eng, _ = engine(intent_threshold=0.0)
    eng.process(0, event("consent", user="optout", consent={"marketing": False}, at="2019-10-01T09:59:00Z"), 0)
    acts = eng.process(0, event("add_to_cart", user="optout", product_id="p", price=5.0,
                                at="2019-10-01T10:00:00Z"), 0)[1]
    assert eng.metrics.rule_decisions.labels("model:high_intent", "consent")._value.get() == 1
    # a crawler's very first event: its bot detection runs before the model action is gated
    from clickpulse.testing import memory_engine
    beng = memory_engine(live=False)                              # default rules: bot detection
    beng.models, beng.mcfg = ModelRegistry({}), ModelConfig(intent_threshold=0.0)
    crawler = normalize({"type": "add_to_cart", "user_id": "bot1", "timestamp": ms("2019-10-01T10:00:00Z"),
                         "event_id": "b1", "properties": {"product_id": "p", "price": 5.0},
                         "context": {"user_agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"}})
    acts += beng.process(0, crawler, 0)[1]
    assert beng.metrics.rule_decisions.labels("model:high_intent", "bot")._value.get() == 1
    assert [a for a in acts if a["type"] == "high_intent"] == []
    eng2, _ = engine(intent_threshold=0.0)
    eng2.model_consent = ""                       # no purpose required: the same user gets it
    acts2 = eng2.process(0, event("add_to_cart", user="optout", product_id="p", price=5.0), 0)[1]
    assert [a["type"] for a in acts2] == ["high_intent"]
    assert eng2.metrics.rule_decisions.labels("model:high_intent", "fired")._value.get() == 1
