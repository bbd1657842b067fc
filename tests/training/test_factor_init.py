"""The item side's starting point: ALS on residuals and the attribute prior."""

from __future__ import annotations

import numpy as np
import pytest

from training.factor_init import als_item_factors, attribute_prior, pooled_one_hot


def test_pooled_one_hot_is_the_models_mean_pooling():
    codes = np.array([[2, 3, 0], [0, 0, 0], [4, 4, 1]])  # pad = 0; a repeated code counts twice
    expected = np.array(
        [
            [0, 0, 0.5, 0.5, 0],
            [0, 0, 0, 0, 0],
            [0, 1 / 3, 0, 0, 2 / 3],
        ]
    )
    np.testing.assert_allclose(pooled_one_hot(codes, 5), expected)


def test_attribute_prior_is_weighted_ridge():
    rng = np.random.default_rng(0)
    design, targets, weights, l2 = rng.random((20, 4)), rng.normal(size=(20, 3)), rng.random(20) + 0.5, 0.7
    coefficients = attribute_prior(design, targets, weights, l2)
    # Normal equations of sum_i w_i ||t_i - x_i W||^2 + l2 ||W||^2, written out directly.
    lhs = sum(w * np.outer(x, x) for x, w in zip(design, weights)) + l2 * np.eye(4)
    rhs = sum(w * np.outer(x, t) for x, t, w in zip(design, targets, weights))
    np.testing.assert_allclose(coefficients, np.linalg.solve(lhs, rhs), rtol=1e-10)


def test_als_recovers_a_low_rank_signal():
    rng = np.random.default_rng(1)
    users, items, rank = 60, 40, 2
    p, q = rng.normal(size=(users, rank)), rng.normal(size=(items, rank))
    u, i = np.meshgrid(np.arange(users), np.arange(items), indexing="ij")
    keep = rng.random(u.shape) < 0.6
    user_ids, item_ids = u[keep].astype(str), i[keep].astype(str)
    residual = (p @ q.T)[keep]
    result = als_item_factors(user_ids, item_ids, residual, factors=rank, l2=0.1, iterations=30)
    item_matrix = np.stack([result.item_factors[str(k)] for k in range(items)])
    # The fitted item factors span the true ones: regressing q on them leaves little.
    coef, *_ = np.linalg.lstsq(item_matrix, q, rcond=None)
    explained = 1 - np.sum((item_matrix @ coef - q) ** 2) / np.sum((q - q.mean(0)) ** 2)
    assert explained > 0.95
    np.testing.assert_allclose(result.second_moment, np.mean(item_matrix[item_ids.astype(int)] ** 2, axis=0))


def test_als_rejects_bad_settings():
    with pytest.raises(ValueError):
        als_item_factors(np.array(["a"]), np.array(["x"]), np.array([1.0]), factors=0)
