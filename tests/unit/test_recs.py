"""Item-to-item co-occurrence (clickpulse.recs): decay, bounds, top-k pruning, determinism,
transactions, recommend-then-learn, the evaluation against baselines, and the payloads the engine
publishes."""

from __future__ import annotations

import random

import pytest

from clickpulse.recs import CoOccurrence, RecsConfig
from clickpulse.recs.cooccurrence import REBASE_AT
from clickpulse.recs.evaluate import (
    ItemKNN,
    Popularity,
    SessionEvent,
    default_methods,
    diginetica_sessions,
    progressive,
    rees46_sessions,
)
from clickpulse.testing import event, memory_engine

H = 3_600_000  # a one-hour half-life in the decay tests


def _state(m: CoOccurrence) -> tuple:
    return ({x: (n.pop, n.n, dict(n.nb)) for x, n in m.items.items()}, dict(m.top), m.landmark, m.pairs,
            m.evicted_items, m.pruned_entries)


def _random_sessions(seed: int, n_sessions: int = 300, n_items: int = 60, t0: int = 0,
                     span_ms: int = 10 * H) -> list[tuple[list[str], int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n_sessions):
        items = [f"p{int(rnd.paretovariate(1.2)) % n_items}" for _ in range(rnd.randint(1, 8))]
        out.append((items, t0 + rnd.randrange(span_ms)))
    return out


def _learn(m: CoOccurrence, sessions: list[tuple[list[str], int]]) -> None:
    for items, t in sessions:
        seen: list[str] = []
        for i, x in enumerate(items):
            m.observe_view(seen, x, t + i)
            if x not in seen:
                seen.append(x)
        if len(items) > 2:
            m.observe_basket(items[:3], t + len(items))


# ----------------------------------------------------------------------------- decay
def test_a_co_occurrence_weighs_half_after_one_half_life():
    m = CoOccurrence(RecsConfig(half_life_ms=H))
    m.observe_view([], "a", 0)
    m.observe_view(["a"], "b", 0)
    w = m.neighbours("a")["b"][0]
    assert m.decayed(w, 0) == pytest.approx(1.0)
    assert m.decayed(w, H) == pytest.approx(0.5)
    assert m.decayed(w, 3 * H) == pytest.approx(0.125)
    # an occurrence one half-life later weighs twice as much, as stored
    m.observe_view([], "c", H)
    m.observe_view(["c"], "d", H)
    assert m.neighbours("c")["d"][0] == pytest.approx(2 * w)
    # without decay every occurrence weighs 1
    flat = CoOccurrence(RecsConfig(half_life_ms=0))
    flat.observe_view(["a"], "b", 0)
    flat.observe_view(["a"], "b", 100 * H)
    assert flat.neighbours("a")["b"][:3] == (2.0, 0.0, 2)


def test_recent_co_occurrence_outranks_older_more_frequent_one():
    m = CoOccurrence(RecsConfig(half_life_ms=H, fill_popular=False))
    for i in range(3):  # a with old three times
        m.observe_view(["a"], "old", i)
    for i in range(2):  # a with new twice, 5 half-lives later: 2 * 32 > 3
        m.observe_view(["a"], "new", 5 * H + i)
    assert [r[0] for r in m.recommend(["a"], 2)] == ["new", "old"]
    nodecay = CoOccurrence(RecsConfig(half_life_ms=0, fill_popular=False))
    for i in range(3):
        nodecay.observe_view(["a"], "old", i)
    for i in range(2):
        nodecay.observe_view(["a"], "new", 5 * H + i)
    assert [r[0] for r in nodecay.recommend(["a"], 2)] == ["old", "new"]


def test_forward_decay_is_order_free_and_rebases_without_overflow():
    sessions = _random_sessions(1)
    cfg = RecsConfig(half_life_ms=H, neighbours=100)  # no pruning: then the sums are order-free
    a, b = CoOccurrence(cfg), CoOccurrence(cfg)
    _learn(a, sessions)
    _learn(b, list(reversed(sessions)))
    ra, rb = a.recommend(["p1"], 5, at_ms=10 * H), b.recommend(["p1"], 5, at_ms=10 * H)
    assert [(r[0], r[2]) for r in ra] == [(r[0], r[2]) for r in rb]
    assert [r[1] for r in ra] == pytest.approx([r[1] for r in rb])
    for x in ("p1", "p2", "p3"):
        na, nb = a.neighbours(x), b.neighbours(x)
        assert set(na) == set(nb)
        for y in na:
            assert a.decayed(na[y][0], 10 * H) == pytest.approx(b.decayed(nb[y][0], 10 * H))
    # far in the future: the landmark moves, weights stay finite, the ratio is exact
    m = CoOccurrence(RecsConfig(half_life_ms=H))
    m.observe_view(["a"], "b", 0)
    late = (3 * REBASE_AT + 7) * H
    m.observe_view(["a"], "b", late)
    assert m.landmark is not None and m.landmark > 0
    w = m.neighbours("a")["b"][0]
    assert w < 1e300 and m.decayed(w, late) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- bounds
def test_neighbours_and_items_stay_within_their_bounds():
    cfg = RecsConfig(neighbours=4, max_items=25)
    m = CoOccurrence(cfg)
    _learn(m, _random_sessions(2, n_sessions=2000, n_items=200))
    assert len(m.items) <= 25
    assert all(len(n.nb) <= 4 + 4 // 2 for n in m.items.values())
    st = m.stats()
    assert st["evicted_items"] > 0 and st["pruned_entries"] > 0
    assert st["pairs"] == sum(len(n.nb) for n in m.items.values())


def test_the_least_recently_updated_item_is_evicted():
    m = CoOccurrence(RecsConfig(max_items=3))
    for i, x in enumerate(["a", "b", "c"]):
        m.observe_view([], x, i)
    m.observe_view([], "a", 10)  # a is updated again: b is now the least recent
    m.observe_view([], "d", 11)
    assert list(m.items) == ["c", "a", "d"]


def test_pruning_keeps_the_strongest_neighbours():
    m = CoOccurrence(RecsConfig(neighbours=4, half_life_ms=0))
    # x co-occurs with y<i> in i sessions, for i = 1..5 (y5 the strongest)
    for i in range(1, 6):
        for _ in range(i):
            m.observe_view([f"y{i}"], "x", 0)
    # one more weak neighbour each until a prune: the 4 strongest always survive
    for j in range(10):
        m.observe_view([f"z{j}"], "x", 0)
    kept = m.neighbours("x")
    assert {"y5", "y4", "y3", "y2"} <= set(kept)
    assert len(kept) <= 6
    assert kept["y5"][2] == 5


# ----------------------------------------------------------------------------- determinism, transactions
def test_same_input_same_recommendations():
    sessions = _random_sessions(3)
    runs = []
    for _ in range(2):
        m = CoOccurrence(RecsConfig(neighbours=5, max_items=40, half_life_ms=H))
        _learn(m, sessions)
        runs.append(([m.recommend([f"p{i}"], 10, at_ms=10 * H) for i in range(20)], _state(m)))
    assert runs[0] == runs[1]


def test_rollback_restores_every_weight_count_and_bound():
    cfg = RecsConfig(neighbours=3, max_items=20, half_life_ms=H)
    m = CoOccurrence(cfg)
    m.top_size = 4
    _learn(m, _random_sessions(4, n_sessions=200, n_items=80))
    before = _state(m)
    recs_before = [m.recommend([f"p{i}"], 5) for i in range(10)]
    m.begin()
    _learn(m, _random_sessions(5, n_sessions=200, n_items=80, t0=(REBASE_AT + 3) * H))  # prunes, evicts, rebases
    assert _state(m) != before
    m.rollback()
    after = _state(m)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    for x, (pop, n, nb) in before[0].items():
        assert after[0][x][0] == pytest.approx(pop, rel=1e-12) and after[0][x][1] == n
        assert after[0][x][2].keys() == nb.keys()
        for y, e in nb.items():
            assert after[0][x][2][y] == pytest.approx(e, rel=1e-12)
    assert [m.recommend([f"p{i}"], 5) for i in range(10)] == recs_before
    m.begin()
    m.observe_view(["p1"], "new", 0)
    m.commit()
    m.rollback()  # nothing open: a no-op
    assert "new" in m.items


def test_recommend_excludes_the_context_is_read_only_and_explains():
    m = CoOccurrence(RecsConfig(half_life_ms=0))
    for s in range(14):
        m.observe_view([], "p123", s)
        m.observe_view(["p123"], "p9", s)
    for i in range(5):
        m.observe_basket(["p123", "p7"] if i % 2 else ["p7", "p123"], 100 + i)
    before = _state(m)
    recs = m.recommend(["p123"], 3, exclude=["p8"])
    assert _state(m) == before
    assert [r[0] for r in recs] == ["p7", "p9"]  # 5 orders x 3 > 14 sessions x 1 - and no popular filler
    assert recs[0][2] == "bought with p123 in 5 orders"
    assert recs[1][2] == "viewed with p123 in 14 sessions"
    assert "p123" not in [r[0] for r in m.recommend(["p9", "p123"], 5)]
    # a cold context is filled with popular items
    assert m.recommend(["unknown"], 2)[0][2].startswith("popular: viewed in 14 sessions")
    assert m.recommend(["p123"], 0) == []


def test_hostile_ids_are_ignored():
    m = CoOccurrence()
    m.observe_view([], "x" * 10_000, 0)
    m.observe_view([None, 5, ""], "a", 0)  # type: ignore[list-item]
    m.observe_basket(["", "a", "a"], 0)
    assert list(m.items) == ["a"] and m.pairs == 0
    with pytest.raises(ValueError):
        RecsConfig(neighbours=0)
    with pytest.raises(ValueError):
        RecsConfig(position_decay=0.0)


# ----------------------------------------------------------------------------- progressive evaluation
class _Spy:
    """Fails if asked to recommend for a target it has already learned in that session."""

    def __init__(self) -> None:
        self.learned: set[tuple[tuple[str, ...], str]] = set()
        self.calls = 0

    def recommend(self, ctx, k):
        self.last_ctx = tuple(ctx)
        self.calls += 1
        return []

    def observe_view(self, ctx, item, t):
        assert not ctx or tuple(ctx) == self.last_ctx  # recommended from this context first
        self.learned.add((tuple(ctx), item))

    def observe_basket(self, items, t):
        return None


def test_recommend_then_learn_never_sees_the_target():
    # every session views two items nobody viewed before: a method that learned the target
    # before recommending would find it (it co-occurs with the context); none may
    evs = []
    for s in range(50):
        evs += [SessionEvent(f"s{s}", s * 10, "view", f"a{s}"), SessionEvent(f"s{s}", s * 10 + 1, "view", f"b{s}")]
    methods = [("m", CoOccurrence(RecsConfig(fill_popular=False))), ("knn", ItemKNN()), ("pop", Popularity()),
               ("spy", _Spy())]
    p = progressive(evs, methods)
    assert p.targets == 50
    assert [r.hits for r in p.results] == [0, 0, 0, 0]
    # the same sessions a second time: now the pairs are known and found
    p2 = progressive(evs + [SessionEvent(f"t{e.session}", 10_000 + e.t_ms, e.kind, e.item) for e in evs],
                     [("m", CoOccurrence(RecsConfig(fill_popular=False)))])
    assert p2.results[0].hits == 50 and p2.results[0].mrr == pytest.approx(0.5)


def test_consecutive_repeats_collapse_and_revisits_count():
    evs = [SessionEvent("s", t, "view", x) for t, x in enumerate(["a", "a", "b", "a", "c"])]
    p = progressive(evs, [("pop", Popularity())])
    assert p.targets == 3 and p.revisits == 1 and p.sessions == 1


@pytest.mark.parametrize("dataset", ["rees46", "diginetica"])
def test_the_model_beats_popularity_and_item_knn_on_the_bundled_samples(dataset):
    events = rees46_sessions() if dataset == "rees46" else diginetica_sessions()
    p = progressive(events, default_methods())
    by = {r.label.split(" (")[0].split(",")[0]: r for r in p.results}
    model = next(r for r in p.results if r.label.startswith("co-occurrence (shipped"))
    pop = by["popularity"]
    knn_last = next(r for r in p.results if r.label.startswith("item-kNN cosine, last item"))
    assert p.targets > 1000
    assert model.hit_rate > pop.hit_rate and model.mrr > pop.mrr
    assert model.hit_rate > knn_last.hit_rate and model.mrr > knn_last.mrr


# ----------------------------------------------------------------------------- through the engine
def test_abandonment_payloads_and_profile_carry_recommendations():
    eng = memory_engine()  # default rules: cart_abandonment, browse_abandonment
    t = 0
    # 14 sessions view p1 then p2; 3 view p1 then p3
    for i in range(17):
        u = f"v{i}"
        other = "p2" if i < 14 else "p3"
        eng.process(0, event("product_view", u, f"2019-10-01T09:{i:02d}:00Z", product_id="p1"), t)
        eng.process(0, event("product_view", u, f"2019-10-01T09:{i:02d}:10Z", product_id=other), t)
    # u1 views p1 and puts it in the cart, then goes silent
    eng.process(0, event("product_view", "u1", "2019-10-01T10:00:00Z", product_id="p1"), t)
    eng.process(0, event("add_to_cart", "u1", "2019-10-01T10:00:30Z", product_id="p1", price=10.0, currency="USD"), t)
    # u2 only browses p1
    eng.process(0, event("product_view", "u2", "2019-10-01T10:00:00Z", product_id="p1"), t)
    _, acts = eng.process(0, event("page_view", "later", "2019-10-01T11:00:00Z"), t)
    by_type = {a["type"]: a for a in acts}
    cart = by_type["cart_abandoned"]
    assert cart["user_key"] == "u1"
    recs = cart["payload"]["recommendations"]
    assert [r["item_id"] for r in recs[:2]] == ["p2", "p3"]
    assert recs[0]["why"] == "viewed with p1 in 14 sessions" and recs[1]["why"] == "viewed with p1 in 3 sessions"
    assert recs[0]["score"] > recs[1]["score"] > 0
    assert "p1" not in [r["item_id"] for r in recs]  # the cart's and session's own items are never recommended
    assert cart["payload"]["cart"]["items"]  # the rules file's payload is still there
    browse = [a for a in acts if a["type"] == "assistance_offer" and a["user_key"] == "u2"]
    assert browse and browse[0]["payload"]["recommendations"][0]["item_id"] == "p2"
    profile = eng.load("u1").profile(extra=eng.profile_extra(eng.load("u1")))
    assert profile["recommendations"][0]["item_id"] == "p2"
    from clickpulse.events.schemas import validator  # the published profile still conforms
    validator("profile").validate(profile)


def test_recommendations_only_for_the_configured_triggers_and_not_from_bots():
    eng = memory_engine()
    eng.recs_triggers = frozenset({"browse_abandonment"})
    for i in range(5):
        eng.process(0, event("product_view", f"v{i}", f"2019-10-01T09:{i:02d}:00Z", product_id="p1"), 0)
        eng.process(0, event("product_view", f"v{i}", f"2019-10-01T09:{i:02d}:10Z", product_id="p2"), 0)
    eng.process(0, event("add_to_cart", "u1", "2019-10-01T10:00:00Z", product_id="p1", price=1.0, currency="USD"), 0)
    _, acts = eng.process(0, event("page_view", "later", "2019-10-01T11:00:00Z"), 0)
    cart = next(a for a in acts if a["type"] == "cart_abandoned")
    assert "recommendations" not in cart["payload"]
    # a bot's views teach nothing
    pairs = eng.recs.pairs
    st = eng.load("v0")
    st.rules.setdefault("bot", {})["flag"] = "test"
    eng.table[b"v0"] = st.to_bytes()
    eng._cache.clear()
    eng.process(0, event("product_view", "v0", "2019-10-01T11:00:05Z", product_id="p9"), 0)
    eng.process(0, event("product_view", "v0", "2019-10-01T11:00:06Z", product_id="p8"), 0)
    assert eng.recs.pairs == pairs


def test_a_failing_event_takes_its_learning_back_and_the_rest_of_the_batch_stands(monkeypatch):
    eng = memory_engine()
    eng.process(0, event("product_view", "u0", "2019-10-01T09:00:00Z", product_id="p1"), 0)
    eng.process(0, event("product_view", "u0", "2019-10-01T09:00:10Z", product_id="p2"), 0)
    assert eng.recs.neighbours("p1")["p2"][2] == 1
    import clickpulse.engine.step as step_mod
    real = step_mod.Engine._recs_learn

    def poisoned(self, st, ev, before):
        real(self, st, ev, before)  # learns, then fails: the learning must not survive
        if ev["user_key"] == "bad":
            raise ValueError("boom")
    monkeypatch.setattr(step_mod.Engine, "_recs_learn", poisoned)
    batch = [(0, event("product_view", "u1", "2019-10-01T10:00:00Z", product_id="p1")),
             (0, event("product_view", "u1", "2019-10-01T10:00:05Z", product_id="p3")),
             (0, event("product_view", "bad", "2019-10-01T10:00:06Z", product_id="p1")),
             (0, event("product_view", "bad", "2019-10-01T10:00:07Z", product_id="p2"))]
    em = eng.step(batch, 0)
    assert [f.user_key for f in em.failed] == ["bad", "bad"]
    eng.commit(em)
    assert eng.recs.neighbours("p1")["p2"][2] == 1      # bad's p1 -> p2 rolled back
    assert eng.recs.neighbours("p1")["p3"][2] == 1      # u1's stands (learned once, not twice)
    assert eng.recs.items["p1"].n == 2 and eng.recs.items["p3"].n == 1
