"""Next-action Markov chain, paths to purchase, and beta-binomial smoothing of conversion rates."""

from __future__ import annotations

import pickle
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pytest

from clickpulse.errors import DatasetError
from clickpulse.ingest.datasets import BUNDLED_SAMPLE, read_rees46
from clickpulse.models.markov import (
    END,
    OTHER,
    PURCHASE,
    START,
    MarkovChain,
    collapse,
    rees46_sessions,
    report_paths,
    top_paths,
)
from clickpulse.rules.smoothing import fit_prior, posterior_mean, smoothed_rates

V, C = "product_view", "add_to_cart"


# ---------------------------------------------------------------- Markov chain
def test_transition_probabilities_match_a_hand_count():
    mc = MarkovChain(alpha=1.0)
    mc.learn_session([V, V, C, PURCHASE, V])  # the V after the purchase is not learned
    mc.learn_session([V, C, V])
    mc.learn_session([C])
    mc.learn_session([])  # ignored
    # hand count:  <start>->V 2, <start>->C 1 | V->V 1, V->C 2, V-><end> 1 | C->purchase 1, C->V 1, C-><end> 1
    assert mc.counts == {START: {V: 2, C: 1}, V: {V: 1, C: 2, END: 1}, C: {PURCHASE: 1, V: 1, END: 1}}
    assert mc.transitions == 10
    # K = 4 possible next states (C, V, <end>, purchase); alpha = 1
    assert mc.p_next(V) == pytest.approx({C: 3 / 8, V: 2 / 8, END: 2 / 8, PURCHASE: 1 / 8})
    assert mc.p_next(C) == pytest.approx({C: 1 / 7, V: 2 / 7, END: 2 / 7, PURCHASE: 2 / 7})
    assert mc.p_next(START) == pytest.approx({C: 2 / 7, V: 3 / 7, END: 1 / 7, PURCHASE: 1 / 7})
    assert mc.p_next("search") == pytest.approx({C: 0.25, V: 0.25, END: 0.25, PURCHASE: 0.25})
    assert mc.p_next(PURCHASE) == {PURCHASE: 1.0} and mc.p_next(END) == {END: 1.0}
    assert sum(mc.p_next(V).values()) == pytest.approx(1.0)


def test_online_steps_learn_the_same_as_whole_sessions():
    whole, online = MarkovChain(), MarkovChain()
    sessions = [[V, V, C, PURCHASE, V], [V, C, V], [C]]
    for s in sessions:
        whole.learn_session(s)
        cur = START
        for e in s:
            cur = online.learn_step(cur, e)
        online.end_session(cur)
    assert online.counts == whole.counts


def test_p_purchase_on_a_hand_solvable_chain():
    mc = MarkovChain(alpha=1.0)
    for prev, nxt, n in [(START, V, 2), (V, V, 1), (V, C, 2), (V, END, 3), (C, PURCHASE, 2), (C, V, 1)]:
        mc.learn_transition(prev, nxt, n)
    # K = 4 targets (C, V, <end>, purchase), smoothed rows (c + 1) / (n + 4):
    #   V (n=6):  C 3/10, V 2/10, end 4/10, purchase 1/10
    #   C (n=3):  C 1/7,  V 2/7,  end 1/7,  purchase 3/7
    #   start (n=2): V 3/6, C 1/6, end 1/6, purchase 1/6
    # x = P(reach purchase before end):
    #   x_V = 3/10 x_C + 2/10 x_V + 1/10   ->  x_V = (3 x_C + 1) / 8
    #   x_C = 1/7 x_C + 2/7 x_V + 3/7      ->  x_C = (2 x_V + 3) / 6
    #   =>  x_V = ((2 x_V + 3)/2 + 1) / 8 = (2 x_V + 5) / 16  =>  x_V = 5/14,  x_C = 13/21
    #   x_start = 3/6 * 5/14 + 1/6 * 13/21 + 1/6 = 45/252 + 26/252 + 42/252 = 113/252
    x_v, x_c, x_s = Fraction(5, 14), Fraction(13, 21), Fraction(113, 252)
    assert mc.p_purchase([V]) == pytest.approx(float(x_v), abs=1e-12)
    assert mc.p_purchase([V, C]) == pytest.approx(float(x_c), abs=1e-12)  # first order: last state
    assert mc.p_purchase([]) == pytest.approx(float(x_s), abs=1e-12)
    assert mc.p_purchase([V, PURCHASE]) == 1.0 and mc.p_purchase([END]) == 0.0
    # unseen state: uniform over the 4 targets -> (x_C + x_V + 0 + 1) / 4
    assert mc.p_purchase(["search"]) == pytest.approx(float((x_c + x_v + 1) / 4), abs=1e-12)
    # learning invalidates the cached solution
    mc.learn_transition(C, PURCHASE, 50)
    assert mc.p_purchase([C]) > float(x_c)


def test_p_purchase_is_a_probability_and_the_model_pickles_compactly():
    rng = np.random.default_rng(7)
    types = [V, C, "search", "page_view", "remove_from_cart", PURCHASE]
    mc = MarkovChain(alpha=0.5)
    assert 0.0 < mc.p_purchase([]) < 1.0  # empty chain: uniform over <end>, purchase
    for _ in range(300):
        mc.learn_session(list(rng.choice(types, size=int(rng.integers(1, 8)), p=[.5, .15, .15, .1, .05, .05])))
    probs = [mc.p_purchase([s]) for s in (START, *mc.states)]
    assert all(0.0 < p < 1.0 for p in probs)
    blob = pickle.dumps(mc)
    assert len(blob) < 2000
    back = pickle.loads(blob)
    assert [back.p_purchase([s]) for s in (START, *mc.states)] == probs
    assert back.p_next(V) == mc.p_next(V)


def test_state_space_is_bounded_and_bad_transitions_are_refused():
    mc = MarkovChain(max_states=2)
    mc.learn_session([V, C, "x1", "x2"])
    assert mc.states == (OTHER, C, V)
    assert mc.counts[OTHER] == {OTHER: 1, END: 1}
    assert mc.p_purchase(["x9"]) == mc.p_purchase([OTHER])
    with pytest.raises(ValueError):
        mc.learn_transition(PURCHASE, V)
    with pytest.raises(ValueError):
        mc.learn_transition(V, START)
    with pytest.raises(ValueError):
        mc.learn_session([V, END])
    with pytest.raises(ValueError):
        MarkovChain(alpha=0)


# ---------------------------------------------------------------- paths to purchase
def test_top_paths_on_hand_made_sessions():
    sessions = [
        [V, V, C, PURCHASE],      # (V, C)        converted
        [V, C, C, PURCHASE, V],   # (V, C)        converted
        [V, C],                   # (V, C)
        [V, V, V],                # (V,)
        [V, PURCHASE],            # (V,)          converted
        [V, C, V, C, V, C],       # (V, C, V)     cut to max_len 3
        [V, C, V, PURCHASE],      # (V, C, V)     converted
        [PURCHASE],               # ()            converted
        [],                       # ignored
    ]
    rows = top_paths(sessions, k=10, max_len=3)
    assert rows == [((V, C), 3, 2, pytest.approx(2 / 3)),
                    ((), 1, 1, 1.0),
                    ((V,), 2, 1, 0.5),
                    ((V, C, V), 2, 1, 0.5)]  # ties broken by path
    assert top_paths(sessions, k=2, max_len=3) == rows[:2]
    assert top_paths(sessions, k=1, max_len=1)[0] == ((V,), 7, 4, pytest.approx(4 / 7))
    assert collapse([V, V, C, C, V]) == [V, C, V]
    with pytest.raises(ValueError):
        top_paths(sessions, k=3, max_len=0)


def _naive_sessions(path, gap_ms=1_800_000):
    """Independent sessionization: every event in memory, per user sorted by time, split at gaps."""
    per_user = defaultdict(dict)
    for n, ev in enumerate(read_rees46(path)):
        per_user[ev["user_id"]].setdefault(ev["event_id"], (ev["timestamp"], n, ev["type"]))
    out = []
    for evs in per_user.values():
        cur, prev = [], None
        for ts, _n, etype in sorted(evs.values()):
            if prev is not None and ts - prev >= gap_ms:
                out.append(cur)
                cur = []
            cur.append(etype)
            prev = ts
        out.append(cur)
    return out


def test_streamed_sessions_match_an_in_memory_sessionization():
    expected = Counter(tuple(s) for s in _naive_sessions(BUNDLED_SAMPLE))
    for sweep in (7, 4096):  # sweeping idle users often must not split or merge sessions
        got = Counter(tuple(s) for s in rees46_sessions(BUNDLED_SAMPLE, sweep_every=sweep))
        assert got == expected


def test_report_paths_on_the_bundled_sample():
    text = report_paths(BUNDLED_SAMPLE, k=5, max_len=4)
    assert "purchase" in text
    sessions = _naive_sessions(BUNDLED_SAMPLE)
    converted = sum(PURCHASE in s for s in sessions)
    assert converted > 0
    assert f"{len(sessions)} sessions" in text and f"{converted} with a purchase" in text
    best = top_paths(sessions, k=1, max_len=4)[0]
    assert " > ".join(best[0]) in text
    with pytest.raises(DatasetError):
        report_paths(BUNDLED_SAMPLE.with_name("missing.csv"))


# ---------------------------------------------------------------- smoothing
def test_posterior_mean_matches_the_beta_binomial_posterior():
    # Beta(2, 8) prior, 3 conversions in 5 trials -> Beta(2 + 3, 8 + 2), mean 5 / 15
    assert posterior_mean(3, 5, 2.0, 8.0) == pytest.approx(5 / 15)
    assert posterior_mean(0, 0, 2.0, 8.0) == pytest.approx(0.2)  # no data: the prior mean
    assert posterior_mean(300, 500, 2.0, 8.0) == pytest.approx(302 / 510)
    with pytest.raises(ValueError):
        posterior_mean(6, 5, 2.0, 8.0)
    with pytest.raises(ValueError):
        posterior_mean(1, 5, 0.0, 8.0)


def test_fit_prior_recovers_a_known_population():
    rng = np.random.default_rng(42)
    alpha, beta = 3.0, 27.0  # mean 0.1, strength 30
    n = rng.integers(20, 200, size=2000)
    s = rng.binomial(n, rng.beta(alpha, beta, size=n.size))
    a, b = fit_prior(s.tolist(), n.tolist())
    assert a / (a + b) == pytest.approx(0.1, abs=0.005)
    assert 20 < a + b < 45  # strength recovered roughly (binomial noise separated from spread)
    rates, prior = smoothed_rates(s.tolist(), n.tolist())
    assert prior == (a, b)
    # shrinkage: a small group moves most of the way to the population mean, a large one barely
    assert posterior_mean(1, 2, a, b) < 0.2 and posterior_mean(100, 200, a, b) > 0.4


def test_fit_prior_fallbacks():
    # too few groups: weak prior (strength 2) around the Laplace-smoothed pooled rate (3+1)/(10+2)
    a, b = fit_prior([1, 2], [5, 5])
    assert (a, b) == pytest.approx((2 / 3, 4 / 3))
    assert fit_prior([], []) == (1.0, 1.0)
    # zero variance: every group converts 10 %: spread is binomial noise at most -> strong pooling
    a, b = fit_prior([10] * 20, [100] * 20)
    assert a / (a + b) == pytest.approx(0.1) and a + b == pytest.approx(10_000)
    # nobody converted: alpha stays > 0
    a, b = fit_prior([0] * 20, [50] * 20)
    assert a > 0 and b > 0 and a / (a + b) < 0.01
    # all-or-nothing groups: almost no shrinkage
    a, b = fit_prior([0, 10, 0, 10, 10, 0], [10] * 6)
    assert a + b == pytest.approx(0.01)
    with pytest.raises(ValueError):
        fit_prior([3], [2])
    with pytest.raises(ValueError):
        fit_prior([1, 2], [3])
