"""Metric and interval math against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from training.metrics import (
    auc,
    clip,
    mae,
    mean_ci,
    ndcg_at_k,
    paired_difference_ci,
    rmse,
    rmse_ci,
    rmse_difference_ci,
    student_t_quantile,
    user_metrics,
)

LOG2_3 = math.log2(3.0)
T_975_DF4 = 2.7764451051977987  # 0.975 quantile of Student t, 4 dof
T_975_DF3 = 3.182446305284263


def test_mae_rmse_small_example() -> None:
    # errors -1, 0, +2: MAE = 3/3 = 1, RMSE = sqrt((1 + 0 + 4) / 3)
    pred, y = np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0])
    assert mae(pred, y) == pytest.approx(1.0)
    assert rmse(pred, y) == pytest.approx(math.sqrt(5.0 / 3.0))


def test_metrics_reject_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError):
        mae(np.array([1.0, 2.0]), np.array([1.0]))
    with pytest.raises(ValueError):
        rmse(np.array([]), np.array([]))
    with pytest.raises(ValueError):
        ndcg_at_k(np.array([math.nan]), np.array([1.0]), 1)


def test_clip() -> None:
    np.testing.assert_array_equal(clip(np.array([0.2, 3.0, 7.5]), 1.0, 5.0), [1.0, 3.0, 5.0])
    with pytest.raises(ValueError):
        clip(np.array([1.0]), 5.0, 1.0)


def test_ndcg_without_ties() -> None:
    # labels 1, 3, 2 -> gains 2^y - 1 = 1, 7, 3; scores rank them in input order.
    # DCG@2 = 1/log2(2) + 7/log2(3); ideal order 7, 3: IDCG@2 = 7 + 3/log2(3).
    pred, y = np.array([0.9, 0.8, 0.1]), np.array([1.0, 3.0, 2.0])
    assert ndcg_at_k(pred, y, 2) == pytest.approx((1.0 + 7.0 / LOG2_3) / (7.0 + 3.0 / LOG2_3))
    # k past the end uses every item: DCG = 1 + 7/log2 3 + 3/2, IDCG = 7 + 3/log2 3 + 1/2
    assert ndcg_at_k(pred, y, 10) == pytest.approx((1.0 + 7.0 / LOG2_3 + 1.5) / (7.0 + 3.0 / LOG2_3 + 0.5))
    # linear gains: DCG@2 = 1 + 3/log2 3, IDCG@2 = 3 + 2/log2 3
    assert ndcg_at_k(pred, y, 2, gain="linear") == pytest.approx((1.0 + 3.0 / LOG2_3) / (3.0 + 2.0 / LOG2_3))


def test_ndcg_with_a_tie_straddling_k() -> None:
    # gains 0, 1, 7, 3; items 1 and 2 tie at 0.5 and occupy positions 2 and 3.
    # k = 2 cuts the tied group: position 2 gets the group's mean gain (1 + 7)/2 = 4,
    # DCG@2 = 0/1 + 4/log2(3) — the mean of the two orderings (1/log2 3 and 7/log2 3).
    # IDCG@2 = 7 + 3/log2(3).
    pred, y = np.array([0.9, 0.5, 0.5, 0.1]), np.array([0.0, 1.0, 3.0, 2.0])
    assert ndcg_at_k(pred, y, 2) == pytest.approx((4.0 / LOG2_3) / (7.0 + 3.0 / LOG2_3))
    # k = 3 takes the whole group: DCG@3 = 4/log2 3 + 4/log2 4 = 4/log2 3 + 2;
    # IDCG@3 = 7 + 3/log2 3 + 1/2.
    assert ndcg_at_k(pred, y, 3) == pytest.approx((4.0 / LOG2_3 + 2.0) / (7.0 + 3.0 / LOG2_3 + 0.5))
    # input order inside the tie does not matter
    assert ndcg_at_k(pred[[0, 2, 1, 3]], y[[0, 2, 1, 3]], 2) == ndcg_at_k(pred, y, 2)


def test_ndcg_of_a_constant_predictor_is_the_expected_dcg() -> None:
    # clicks 1, 0, 0, 1 all tied: mean gain 1/2 at positions 1..3,
    # DCG@3 = 0.5 * (1 + 1/log2 3 + 1/2); IDCG@3 = 1 + 1/log2 3.
    pred, y = np.full(4, 3.5), np.array([1.0, 0.0, 0.0, 1.0])
    assert ndcg_at_k(pred, y, 3) == pytest.approx(0.5 * (1.5 + 1.0 / LOG2_3) / (1.0 + 1.0 / LOG2_3))


def test_ndcg_equals_the_mean_over_tied_orderings() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=7).astype(float)  # many ties
    y = rng.integers(1, 6, size=7).astype(float)
    k = 4
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.sum((np.exp2(np.sort(y)[::-1][:k]) - 1) * discounts)
    # every ordering of the items whose scores are non-increasing = every tie-breaking
    dcgs = [
        np.sum((np.exp2(y[list(perm)][:k]) - 1) * discounts)
        for perm in itertools.permutations(range(7))
        if np.all(np.diff(pred[list(perm)]) <= 0)
    ]
    assert ndcg_at_k(pred, y, k) == pytest.approx(np.mean(dcgs) / ideal)


def test_ndcg_is_nan_when_every_gain_is_zero() -> None:
    assert math.isnan(ndcg_at_k(np.array([0.3, 0.9, 0.1]), np.zeros(3), 2))


def test_auc_with_ties_hand_computed() -> None:
    # positives 0.4, 0.8; negatives 0.1, 0.4. Pairs: (0.4>0.1)=1, (0.4=0.4)=1/2,
    # (0.8>0.1)=1, (0.8>0.4)=1 -> 3.5 / 4.
    assert auc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.875)


def test_auc_matches_a_brute_force_pair_count() -> None:
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 4, size=30).astype(float)
    clicks = rng.integers(0, 2, size=30).astype(float)
    positives, negatives = pred[clicks == 1], pred[clicks == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    assert auc(pred, clicks) == pytest.approx(wins / (positives.size * negatives.size))


def test_auc_nan_with_one_class_and_rejects_non_binary_labels() -> None:
    assert math.isnan(auc(np.array([0.2, 0.7]), np.array([1.0, 1.0])))
    with pytest.raises(ValueError):
        auc(np.array([0.2, 0.7]), np.array([1.0, 3.0]))


def test_user_metrics_clips_errors_but_ranks_raw_scores() -> None:
    pred, y = np.array([6.5, 7.0, 0.0]), np.array([4.0, 5.0, 1.0])
    metrics = user_metrics(pred, y, "rating", (1.0, 5.0), ks=(1,))
    # clipped predictions 5, 5, 1: errors 1, 0, 0
    assert metrics["n"] == 3
    assert metrics["ae"] == pytest.approx(1.0 / 3.0)
    assert metrics["se"] == pytest.approx(1.0 / 3.0)
    # raw scores put the 5-star item first (clipped ones would tie it with the 4-star)
    assert metrics["ndcg@1"] == pytest.approx(1.0)
    assert "auc" not in metrics


def test_user_metrics_for_clicks() -> None:
    pred, y = np.array([0.9, 0.2, 0.6, 0.1]), np.array([1.0, 0.0, 0.0, 1.0])
    metrics = user_metrics(pred, y, "click", (0.0, 1.0))
    assert set(metrics) == {"n", "ae", "se", "ndcg@3", "ndcg@5", "auc"}
    assert metrics["se"] == pytest.approx((0.01 + 0.04 + 0.36 + 0.81) / 4.0)  # Brier score
    assert metrics["auc"] == pytest.approx(0.5)  # 0.9 beats both negatives, 0.1 beats none
    # DCG@3 = 1 (pos 1) + 0 + 0, IDCG@3 = 1 + 1/log2 3
    assert metrics["ndcg@3"] == pytest.approx(1.0 / (1.0 + 1.0 / LOG2_3))


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 4, T_975_DF4),
        (0.975, 3, T_975_DF3),
        (0.975, 1, math.tan(math.pi * 0.475)),  # Cauchy: tan(pi (p - 1/2))
        (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # df 2: (2p - 1) / sqrt(2p(1 - p))
        (0.025, 4, -T_975_DF4),
        (0.5, 7, 0.0),
    ],
)
def test_student_t_quantile(p: float, df: float, expected: float) -> None:
    assert student_t_quantile(p, df) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_student_t_quantile_tends_to_the_normal() -> None:
    assert student_t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)


def test_paired_difference_ci_against_a_direct_computation() -> None:
    a = np.array([1.0, 2.0, 3.5, 0.5, 2.2])
    b = np.array([0.8, 2.1, 3.0, 0.1, 1.9])
    d = a - b  # 0.2, -0.1, 0.5, 0.4, 0.3
    half = T_975_DF4 * np.std(d, ddof=1) / math.sqrt(5)
    mean, low, high = paired_difference_ci(a, b)
    assert mean == pytest.approx(0.26)
    assert low == pytest.approx(0.26 - half, rel=1e-10)
    assert high == pytest.approx(0.26 + half, rel=1e-10)


def test_paired_difference_ci_drops_nan_pairs() -> None:
    a = np.array([1.0, 2.0, math.nan, 3.5, 0.5, 2.2, 4.0])
    b = np.array([0.8, 2.1, 1.0, 3.0, 0.1, 1.9, math.nan])
    assert paired_difference_ci(a, b) == pytest.approx(
        paired_difference_ci(np.array([1.0, 2.0, 3.5, 0.5, 2.2]), np.array([0.8, 2.1, 3.0, 0.1, 1.9]))
    )


def test_intervals_degenerate_sizes() -> None:
    mean, low, high = paired_difference_ci(np.array([2.0]), np.array([1.0]))
    assert mean == 1.0 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(x) for x in mean_ci(np.array([math.nan, math.nan])))


def test_mean_ci_and_rmse_ci() -> None:
    values = np.array([1.0, 4.0, 2.0, 3.0, 5.0])  # mean 3, sample std sqrt(2.5)
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    assert mean_ci(values) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    # RMSE from per-user MSEs: sqrt of the mean-MSE interval
    assert rmse_ci(values) == pytest.approx((math.sqrt(3.0), math.sqrt(3.0 - half), math.sqrt(3.0 + half)))
    # a lower MSE bound below 0 maps to 0
    assert rmse_ci(np.array([0.0, 0.0, 0.0, 0.0, 4.0]))[1] == 0.0


def test_rmse_difference_maps_the_mse_interval() -> None:
    se_a = np.array([1.0, 0.5, 2.0, 0.7, 1.3])
    se_b = np.array([1.2, 0.9, 2.1, 0.6, 1.9])
    rmse_a, rmse_b = math.sqrt(np.mean(se_a)), math.sqrt(np.mean(se_b))
    d = se_a - se_b
    half = T_975_DF4 * np.std(d, ddof=1) / math.sqrt(5)
    diff, low, high = rmse_difference_ci(se_a, se_b)
    # sqrt(A) - sqrt(B) = (A - B) / (sqrt(A) + sqrt(B))
    assert diff == pytest.approx(rmse_a - rmse_b)
    assert diff == pytest.approx(np.mean(d) / (rmse_a + rmse_b))
    assert low == pytest.approx((np.mean(d) - half) / (rmse_a + rmse_b))
    assert high == pytest.approx((np.mean(d) + half) / (rmse_a + rmse_b))
    # resolved on the RMSE scale exactly when resolved on the MSE scale
    _, mse_low, mse_high = paired_difference_ci(se_a, se_b)
    assert (low > 0 or high < 0) == (mse_low > 0 or mse_high < 0)


def test_rmse_difference_of_two_exact_methods_is_zero() -> None:
    assert rmse_difference_ci(np.zeros(3), np.zeros(3)) == (0.0, 0.0, 0.0)


def test_recall_at_n_counts_hits_over_the_reachable_relevant_items():
    from training.metrics import recall_at_n
    from training.topn import topn_metrics

    # 2 of the first 3 ranked are relevant; 5 relevant items, so at most 3 can be found in 3.
    assert recall_at_n([4, 7, 1, 9], [7, 1, 2, 3, 8], 3) == pytest.approx(2 / 3)
    # fewer relevant items than n: both found is full recall
    assert recall_at_n([0, 5, 6, 2], [2, 6], 4) == 1.0
    # the harness's vectorised Recall@N agrees on the same list
    relevant = np.zeros((1, 10), dtype=bool)
    relevant[0, [7, 1, 2, 3, 8]] = True
    assert topn_metrics(np.array([[4, 7, 1, 9]]), relevant, (3,))["recall@3"][0] == pytest.approx(recall_at_n([4, 7, 1, 9], [7, 1, 2, 3, 8], 3))
    with pytest.raises(ValueError):
        recall_at_n([1, 2], [], 2)
