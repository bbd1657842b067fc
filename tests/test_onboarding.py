"""The onboarding selection (warmstart.onboarding): D-optimal greedy against brute force,
its rank-one updates against slogdet, exclusions and no repeats."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from warmstart import onboarding as O


def _toy(seed: int, n: int = 9, d: int = 2, e: int = 3, engagement: bool = True):
    rng = np.random.default_rng(seed)
    vectors = O.ItemVectors.from_factors(rng.normal(size=(n, d)), rng.normal(size=(n, e)) if engagement else None)
    gram = vectors.engagement.T @ vectors.engagement / n if engagement else None
    prior = O.Prior.from_pulls(rng.uniform(0.5, 3.0, d + 1), rng.uniform(0.5, 3.0, e) if engagement else None, 0.7, gram)
    logits = rng.normal(size=n)
    return vectors, prior, logits


def _brute_force(prior, vectors, rows, weights, k, answered=np.zeros(0, np.int64)):
    best, best_set = -math.inf, None
    for subset in itertools.combinations(range(len(rows)), k):
        value = O.log_det_objective(prior, vectors, rows[list(subset)], weights[list(subset)], answered)
        if value > best:
            best, best_set = value, subset
    return best, best_set


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_exact_for_one_item(seed):
    vectors, prior, logits = _toy(seed)
    chosen = O.select("dopt", vectors, prior, 1, engagement_logits=logits)
    weights = O.knowledge_weights(logits, vectors.size)
    best, best_set = _brute_force(prior, vectors, np.arange(vectors.size), weights, 1)
    assert chosen.rows.tolist() == list(best_set)
    base = O.log_det_objective(prior, vectors, [], np.zeros(0))
    assert chosen.reasons[0] == pytest.approx(best - base, rel=1e-9, abs=1e-12)


def test_greedy_matches_brute_force_on_orthogonal_items():
    # Orthogonal directions and an isotropic prior: the gains do not interact, so the
    # greedy set (the k largest single gains) is the best set.
    d = 4
    q = np.zeros((6, d))
    for i, scale in enumerate((0.5, 2.0, 1.0, 3.0)):
        q[i, i] = scale
    q[4, 0], q[5, 1] = 0.1, 0.2  # weaker items on directions already covered
    vectors = O.ItemVectors(np.concatenate([np.zeros((6, 1)), q], axis=1))  # no bias coordinate: pure directions
    prior = O.Prior(np.eye(d + 1))
    for k in (1, 2, 3, 4):
        greedy = O.select("dopt", vectors, prior, k)
        best, best_set = _brute_force(prior, vectors, np.arange(6), np.ones(6), k)
        assert sorted(greedy.rows.tolist()) == sorted(best_set)
        assert O.log_det_objective(prior, vectors, greedy.rows, np.ones(k)) == pytest.approx(best, rel=1e-12)
    assert O.select("dopt", vectors, prior, 4).rows.tolist() == [3, 1, 2, 0]  # largest gain first


@pytest.mark.parametrize("seed", range(5))
def test_greedy_gains_are_the_log_det_increments_and_near_the_optimum(seed):
    vectors, prior, logits = _toy(seed, n=8)
    weights = O.knowledge_weights(logits, vectors.size)
    answered = np.array([seed % 8])
    for k in (2, 3):
        greedy = O.select("dopt", vectors, prior, k, engagement_logits=logits, answered=answered)
        assert answered[0] not in greedy.rows
        rows = np.setdiff1d(np.arange(8), answered)
        w = O.knowledge_weights(logits[rows], rows.size)
        w_of = dict(zip(rows.tolist(), w.tolist()))
        # Rank-one updates: the gains add up to the slogdet difference, step by step.
        base = O.log_det_objective(prior, vectors, [], np.zeros(0), answered)
        for j in range(1, k + 1):
            prefix = greedy.rows[:j]
            value = O.log_det_objective(prior, vectors, prefix, np.array([w_of[r] for r in prefix.tolist()]), answered)
            assert value - base == pytest.approx(greedy.reasons[:j].sum(), rel=1e-9)
        best, _ = _brute_force(prior, vectors, rows, w, k, answered)
        achieved = base + greedy.reasons.sum()
        assert achieved <= best + 1e-9
        assert achieved - base >= (1 - 1 / math.e) * (best - base) - 1e-9  # submodular greedy bound
    assert weights.max() == 1.0


def test_weights_scale_the_information():
    # Two identical items but one far less likely known: the likely one is asked first.
    vectors = O.ItemVectors.from_factors(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    prior = O.Prior(np.eye(3))
    chosen = O.select("dopt", vectors, prior, 1, engagement_logits=np.array([-3.0, 0.0, -3.0]))
    assert chosen.rows.tolist() == [1]
    x = vectors.rating[1]
    assert chosen.reasons[0] == pytest.approx(math.log1p(x @ x))


def test_knowledge_weights():
    np.testing.assert_allclose(O.knowledge_weights(np.array([0.0, math.log(0.5), 2.0]), 3), [math.exp(-2), 0.5 * math.exp(-2), 1.0])
    np.testing.assert_array_equal(O.knowledge_weights(None, 2), [1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        O.knowledge_weights(np.array([0.0, np.nan]), 2)


@pytest.mark.parametrize("strategy", O.STRATEGIES)
def test_exclusions_answered_and_sequential_asking_never_repeat(strategy):
    vectors, prior, logits = _toy(7, n=20)
    popularity = np.arange(20, 0, -1, dtype=float)
    candidates = np.arange(2, 20)
    excluded = np.array([3, 5])
    answered: list[int] = [2]
    asked: list[int] = []
    rng = np.random.default_rng(0)
    for _ in range(5):  # rounds of 3: ask, answer, ask again
        chosen = O.select(
            strategy, vectors, prior, 3, candidates=candidates, engagement_logits=logits[candidates],
            popularity=popularity[candidates], answered=np.array(answered), excluded=excluded, rng=rng,
        )
        rows = chosen.rows.tolist()
        assert len(rows) == len(set(rows)) == len(chosen.reasons)
        assert not set(rows) & set(excluded.tolist()) and not set(rows) & set(answered)
        assert set(rows) <= set(candidates.tolist())
        asked += rows
        answered += rows
    assert len(asked) == len(set(asked)) == 15  # 18 candidates - 2 excluded - 1 answered
    last = O.select(strategy, vectors, prior, 3, candidates=candidates, engagement_logits=logits[candidates],
                    popularity=popularity[candidates], answered=np.array(answered), excluded=excluded, rng=rng)
    assert last.rows.size == 0


def test_popular_and_melu_scores():
    vectors = O.ItemVectors.from_factors(np.array([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    popular = O.select("popular", vectors, None, 2, popularity=np.array([1.0, 5.0, 2.0]))
    assert popular.rows.tolist() == [1, 2] and popular.reasons.tolist() == [5.0, 2.0]
    melu = O.select("melu", vectors, None, 3)
    norms = np.array([math.sqrt(10), 1.0, math.sqrt(3)])
    np.testing.assert_allclose(melu.reasons, np.sort(norms / norms.max())[::-1])
    assert melu.rows.tolist() == [0, 2, 1]
    weighted = O.select("melu", vectors, None, 1, engagement_logits=np.array([-5.0, 0.0, 0.0]))
    assert weighted.rows.tolist() == [2]


def test_bad_inputs():
    vectors, prior, logits = _toy(1)
    with pytest.raises(ValueError, match="unknown onboarding strategy"):
        O.select("nope", vectors, prior, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        O.select("dopt", vectors, prior, 0)
    with pytest.raises(ValueError, match="distinct"):
        O.select("dopt", vectors, prior, 1, candidates=np.array([1, 1]))
    with pytest.raises(ValueError, match="popularity"):
        O.select("popular", vectors, prior, 1)
    with pytest.raises(ValueError, match="entries"):
        O.select("dopt", vectors, prior, 1, engagement_logits=logits[:3])
    with pytest.raises(ValueError, match="positive definite"):
        O.Prior(-np.eye(3))
    with pytest.raises(ValueError, match="engagement head"):
        O.select("dopt", vectors, O.Prior(np.eye(3)), 1)


def test_one_head_counts_only_its_own_information():
    vectors, prior, logits = _toy(3)
    weights = O.knowledge_weights(logits, vectors.size)
    rating_only = O.ItemVectors(vectors.rating)
    expected = O.select("dopt", rating_only, O.Prior(prior.rating), 3, engagement_logits=logits)
    chosen = O.select("dopt", vectors, prior, 3, engagement_logits=logits, heads=("rating",))
    assert chosen.rows.tolist() == expected.rows.tolist()
    np.testing.assert_allclose(chosen.reasons, expected.reasons)
    total = O.log_det_objective(O.Prior(prior.rating), rating_only, chosen.rows, weights[chosen.rows])
    assert total - O.log_det_objective(O.Prior(prior.rating), rating_only, [], np.zeros(0)) == pytest.approx(chosen.reasons.sum())
    with pytest.raises(ValueError, match="heads"):
        O.select("dopt", vectors, prior, 3, heads=("nope",))


def test_best_partitions_like_a_stable_sort():
    rng = np.random.default_rng(5)
    score = rng.integers(0, 6, size=200).astype(float)  # many ties
    for k in (1, 7, 50, 199, 200, 300):
        np.testing.assert_array_equal(O._best(score, k), np.argsort(-score, kind="stable")[:k])


def _plain_greedy(prior, vectors, rows, weights, k, answered):
    """The greedy by definition: at each step the item whose addition raises f most (slogdet)."""
    chosen: list[int] = []
    for _ in range(k):
        base = O.log_det_objective(prior, vectors, [rows[c] for c in chosen], weights[chosen], answered)
        gains = [
            -np.inf if c in chosen
            else O.log_det_objective(prior, vectors, [rows[j] for j in chosen + [c]], weights[chosen + [c]], answered) - base
            for c in range(len(rows))
        ]
        chosen.append(int(np.argmax(gains)))
    return rows[chosen]


@pytest.mark.parametrize("seed", range(8))
def test_lazy_greedy_is_the_plain_greedy(seed):
    vectors, prior, logits = _toy(seed, n=40, d=3, e=4)
    rng = np.random.default_rng(seed)
    answered = rng.choice(40, size=2, replace=False)
    for candidates in (None, rng.permutation(np.setdiff1d(np.arange(40), answered))[:25]):
        pool = np.setdiff1d(np.arange(40), answered) if candidates is None else candidates
        z = logits if candidates is None else logits[candidates]
        z_pool = logits[pool]
        chosen = O.select("dopt", vectors, prior, 8, candidates=candidates, engagement_logits=z, answered=answered)
        expected = _plain_greedy(prior, vectors, pool, O.knowledge_weights(z_pool, pool.size), 8, answered)
        assert chosen.rows.tolist() == expected.tolist()
