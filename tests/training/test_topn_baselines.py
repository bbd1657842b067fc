"""Top-N baselines on hand-checked toy data: counts, cosine kNN, EASE's closed form, iALS fold-in."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.dataset import AttributeTable, Dataset, LabelSpec
from training.harness import FitContext, fit_context
from training.splits import Protocol, Split, Task, make_splits
from training.synthetic import generate_synthetic
from training.topn import TOPN_METHOD_HELP, make_topn_methods
from training.topn_baselines import (
    EASE,
    ImplicitALS,
    ItemIndex,
    ItemKNN,
    Popular,
    als_fold_in,
    cosine_neighbours,
    ease_weights,
    support_matrix,
    user_item_matrix,
)

# Users x items a, b, c (binary):
#   u1: a b        u2: a b c      u3: a          u4: b c
TOY = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u2", "c"), ("u3", "a"), ("u4", "b"), ("u4", "c")]


def toy_dataset(rows=TOY, label: LabelSpec = LabelSpec("rating", 1.0, 5.0), labels=None) -> Dataset:
    users, items = zip(*rows)
    return Dataset(
        name="toy",
        label=label,
        user_ids=np.array(users, dtype=object),
        item_ids=np.array(items, dtype=object),
        labels=np.array(labels if labels is not None else [4.0] * len(rows), dtype=np.float64),
        timestamps=np.arange(len(rows), dtype=np.int64),
        users=AttributeTable(),
        items=AttributeTable(),
    )


def toy_context(data: Dataset) -> FitContext:
    users = sorted(set(data.user_ids.tolist()))
    split = Split(Protocol(), 0, data.name, data.fingerprint(), users, [], [])
    return FitContext(dataset=data, train=data, valid_tasks=[], support_sizes=(0, 1), split=split)


def support(*items: str) -> Task:
    return Task("new", np.array(items, dtype=object), np.full(len(items), 4.0), np.array(["a"], dtype=object), np.array([4.0]))


ITEMS = np.array(["a", "b", "c"], dtype=object)


def test_user_item_matrix_and_popular_counts() -> None:
    data = toy_dataset()
    matrix = user_item_matrix(data, ItemIndex(ITEMS))
    assert matrix.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1]]
    popular = Popular()
    popular.fit(toy_context(data))
    scores = popular.score_catalog([support(), support("a")], np.array(["c", "a", "b"], dtype=object))
    assert scores.tolist() == [[2, 3, 3], [2, 3, 3]]  # columns in the order asked for
    with pytest.raises(ValueError, match="not in the catalog"):
        popular.score_catalog([support()], np.array(["zz"], dtype=object))


def test_click_data_counts_only_positive_clicks() -> None:
    data = toy_dataset(label=LabelSpec.click(), labels=[1, 0, 1, 1, 1, 1, 0, 0])
    matrix = user_item_matrix(data, ItemIndex(ITEMS))
    assert matrix.sum(axis=0).tolist() == [3, 1, 1]
    clicked = Task("new", np.array(["a", "b"], dtype=object), np.array([0.0, 1.0]), ITEMS[:1], np.array([1.0]))
    assert support_matrix([clicked], ItemIndex(ITEMS), "click").tolist() == [[0, 1, 0]]


def test_item_knn_cosine_from_counts() -> None:
    matrix = user_item_matrix(toy_dataset(), ItemIndex(ITEMS))
    co = matrix.T @ matrix
    # counts: |a|=3 |b|=3 |c|=2; together: ab=2, ac=1, bc=2
    assert co.tolist() == [[3, 2, 1], [2, 3, 2], [1, 2, 2]]
    w = cosine_neighbours(co, neighbours=0, shrinkage=0.0)
    assert w[0, 1] == pytest.approx(2 / 3) and w[0, 2] == pytest.approx(1 / math.sqrt(6))
    assert w[1, 2] == pytest.approx(2 / math.sqrt(6)) and np.allclose(np.diag(w), 0.0)
    shrunk = cosine_neighbours(co, neighbours=0, shrinkage=1.0)
    assert shrunk[0, 1] == pytest.approx(2 / 4)
    # one neighbour per item (column): a keeps b (2/3 > 1/sqrt 6), c keeps b
    one = cosine_neighbours(co, neighbours=1, shrinkage=0.0)
    assert one[:, 0].tolist() == pytest.approx([0, 2 / 3, 0])
    assert one[:, 2].tolist() == pytest.approx([0, 2 / math.sqrt(6), 0])

    knn = ItemKNN()
    knn.index, knn.weights = ItemIndex(ITEMS), w
    scores = knn.score_catalog([support("a"), support("a", "c")], ITEMS)
    assert scores[0].tolist() == pytest.approx([0, 2 / 3, 1 / math.sqrt(6)])
    assert scores[1].tolist() == pytest.approx([1 / math.sqrt(6), 2 / 3 + 2 / math.sqrt(6), 1 / math.sqrt(6)])


def test_ease_closed_form_on_two_items() -> None:
    # Two items: ||x_b - x_a B_ab||^2 + l ||B||^2 with zero diagonal gives B_ab = G_ab / (G_aa + l).
    matrix = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=float)
    gram = matrix.T @ matrix  # [[3, 2], [2, 3]]
    b = ease_weights(gram, 1.0)
    assert b.ravel().tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0])


def test_ease_equals_a_ridge_regression_of_each_item_on_the_others() -> None:
    rng = np.random.default_rng(0)
    matrix = (rng.random((40, 6)) < 0.4).astype(float)
    l2 = 3.0
    b = ease_weights(matrix.T @ matrix, l2)
    for j in range(6):
        others = [i for i in range(6) if i != j]
        x = matrix[:, others]
        expected = np.linalg.solve(x.T @ x + l2 * np.eye(5), x.T @ matrix[:, j])
        assert b[others, j] == pytest.approx(expected, abs=1e-10)
        assert b[j, j] == 0.0
    with pytest.raises(ValueError, match="lambda > 0"):
        ease_weights(matrix.T @ matrix, 0.0)


def test_als_fold_in_solves_each_users_weighted_ridge_system() -> None:
    rng = np.random.default_rng(1)
    items = rng.normal(size=(12, 4))
    supports = [np.array([0, 3, 7]), np.array([5]), np.array([], dtype=np.int64)]
    regularization, alpha = 0.7, 6.0
    folded = als_fold_in(items, supports, regularization, alpha)
    for s, x in zip(supports, folded):
        # the textbook form over the whole catalog: confidence C = 1 + (alpha - 1) p, preference p
        p = np.zeros(12)
        p[s] = 1.0
        c = 1.0 + (alpha - 1.0) * p
        expected = np.linalg.solve(items.T @ (c[:, None] * items) + regularization * np.eye(4), items.T @ (c * p))
        assert x == pytest.approx(expected, abs=1e-10)
    assert np.all(folded[2] == 0.0)  # no support: the zero user


def test_als_fold_in_matches_the_implicit_package_system() -> None:
    import scipy.sparse
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(2)
    matrix = (rng.random((50, 30)) < 0.2).astype(np.float32)
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=5, regularization=0.5, alpha=4.0, iterations=3, random_state=0, num_threads=1)
        model.fit(scipy.sparse.csr_matrix(matrix), show_progress=False)
        theirs = model.recalculate_user(0, scipy.sparse.csr_matrix(matrix[:1]))
    ours = als_fold_in(model.item_factors.astype(np.float64), [np.flatnonzero(matrix[0])], 0.5, 4.0)[0]
    assert ours == pytest.approx(theirs.astype(np.float64), rel=1e-4, abs=1e-5)


def test_tuned_baselines_fit_on_validation_users_and_score_the_catalog() -> None:
    data = generate_synthetic(seed=5, n_users=160, n_items=60)
    split = make_splits(data, Protocol())[0]
    context = fit_context(data, split, (0, 1, 5))
    items = np.array(sorted(set(data.item_ids.tolist()) | set(data.items.values)), dtype=object)
    test_task = Task(
        split.test_users[0], data.item_ids[:3], data.labels[:3].astype(float), data.item_ids[3:4], data.labels[3:4].astype(float)
    )
    small = {
        "itemknn": ItemKNN(neighbours_grid=(5, 0), shrinkage_grid=(0.0, 10.0)),
        "ease": EASE(lambda_grid=(10.0, 100.0)),
        "ials": ImplicitALS(factors_grid=(4, 8), base_factors=4, regularization_grid=(1.0,), alpha_grid=(2.0, 10.0), iterations=3),
    }
    for name, method in small.items():
        method.fit(context)
        assert method.chosen is not None and len(method.validation_scores) >= 2, name
        assert all(0.0 <= v <= 1.0 for v in method.validation_scores.values()), name
        scores = method.score_catalog([test_task, test_task], items)
        assert scores.shape == (2, len(items)) and np.all(np.isfinite(scores)), name
        assert scores[0] == pytest.approx(scores[1]), name  # a function of the support only
    knn = small["itemknn"]
    assert knn.chosen["neighbours"] in (5, 0) and knn.chosen["shrinkage"] in (0.0, 10.0)
    assert small["ials"].chosen["factors"] in (4, 8)


def test_registry_names_and_errors() -> None:
    methods = make_topn_methods(list(TOPN_METHOD_HELP))
    assert [m.name for m in methods] == list(TOPN_METHOD_HELP) == ["popular", "itemknn", "ease", "ials", "warmstart", "memory"]
    with pytest.raises(ValueError, match="unknown top-N methods"):
        make_topn_methods(["popular", "nope"])
