"""Baselines against hand-solved shrinkage estimates and hand-built tuning problems."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import (
    SHRINKAGE_GRID,
    BiasBaseline,
    GlobalMean,
    ItemMean,
    ItemStats,
    baseline_methods,
    user_bias,
)
from training.dataset import AttributeTable, Dataset, LabelSpec
from training.harness import FitContext
from training.splits import Task


def make_train(rows: list[tuple[str, str, float]]) -> Dataset:
    users, items, labels = zip(*rows)
    return Dataset(
        name="hand",
        label=LabelSpec("rating", 1.0, 5.0),
        user_ids=np.array(users, dtype=object),
        item_ids=np.array(items, dtype=object),
        labels=np.array(labels, dtype=np.float64),
        timestamps=np.arange(len(rows), dtype=np.int64),
        users=AttributeTable(),
        items=AttributeTable(),
    )


def task(user: str, support: list[tuple[str, float]], query: list[tuple[str, float]]) -> Task:
    return Task(
        user,
        np.array([i for i, _ in support], dtype=object),
        np.array([y for _, y in support], dtype=np.float64),
        np.array([i for i, _ in query], dtype=object),
        np.array([y for _, y in query], dtype=np.float64),
    )


def context(train: Dataset, valid_tasks: list[Task], support_sizes=(None,)) -> FitContext:
    return FitContext(dataset=train, train=train, valid_tasks=valid_tasks, support_sizes=support_sizes, split=None)  # type: ignore[arg-type]


# Item a: 4, 5 (sum 9, n 2); item b: 2 (sum 2, n 1). Global mean mu = 11/3.
TRAIN = make_train([("x", "a", 4.0), ("y", "a", 5.0), ("x", "b", 2.0)])
MU = 11 / 3


def test_item_stats_of_training_data():
    stats = ItemStats.of(TRAIN)
    assert stats.mean == pytest.approx(MU)
    assert stats.sums == {"a": 9.0, "b": 2.0}
    assert stats.counts == {"a": 2, "b": 1}


def test_item_stats_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no training interactions"):
        ItemStats.of(TRAIN.subset(np.zeros(len(TRAIN), dtype=bool)))


def test_shrunk_means_hand_solved():
    stats = ItemStats.of(TRAIN)
    # lambda = 2: a = (9 + 2 mu) / 4 = 49/12, b = (2 + 2 mu) / 3 = 28/9, unseen c = mu
    np.testing.assert_allclose(stats.shrunk_means(["a", "b", "c"], 2.0), [49 / 12, 28 / 9, MU], rtol=1e-12)
    # lambda = 0: raw means; an unseen item (0 / 0) still gets mu
    np.testing.assert_allclose(stats.shrunk_means(["a", "b", "c"], 0.0), [4.5, 2.0, MU], rtol=1e-12)
    # a huge lambda pulls everything to mu
    np.testing.assert_allclose(stats.shrunk_means(["a", "b"], 1e12), [MU, MU], rtol=1e-9)
    assert stats.shrunk_means([], 1.0).shape == (0,)


def test_user_bias_hand_solved():
    assert user_bias(np.array([1.0, 2.0, -0.5]), 1.5) == pytest.approx(2.5 / 4.5)
    assert user_bias(np.array([1.0, 2.0, -0.5]), 0.0) == pytest.approx(2.5 / 3)
    assert user_bias(np.array([]), 0.0) == 0.0
    assert user_bias(np.array([]), 3.0) == 0.0


def test_bias_predict_hand_solved():
    method = BiasBaseline(item_shrinkage=2.0, user_shrinkage=1.0, stats=ItemStats.of(TRAIN))
    t = task("u", support=[("a", 5.0), ("b", 3.0)], query=[("c", 1.0), ("a", 1.0)])
    # support predictions 49/12, 28/9; residuals 11/12, -1/9; sum 29/36; b_u = (29/36) / (2 + 1)
    b_u = 29 / 108
    (pred,) = method.predict([t])
    np.testing.assert_allclose(pred, [MU + b_u, 49 / 12 + b_u], rtol=1e-12)
    # With one support interaction: residual 5 - 49/12 = 11/12, b_u = (11/12) / 2
    (pred_1,) = method.predict([t.with_support_size(1)])
    np.testing.assert_allclose(pred_1, [MU + 11 / 24, 49 / 12 + 11 / 24], rtol=1e-12)


def test_global_mean():
    method = GlobalMean()
    method.fit(context(TRAIN, []))
    assert method.mean == pytest.approx(MU)
    preds = method.predict([task("u", [("a", 1.0)], [("a", 1.0), ("z", 2.0)]), task("v", [("b", 1.0)], [("b", 3.0)])])
    assert [p.tolist() for p in preds] == [[pytest.approx(MU)] * 2, [pytest.approx(MU)]]


# Tuning problems: item a is always 4, item b always 2 (mu = 3).
TUNE_TRAIN = make_train([("x", "a", 4.0), ("y", "a", 4.0), ("x", "b", 2.0), ("y", "b", 2.0)])


def test_item_mean_tuning_picks_no_shrinkage_when_item_means_are_right():
    valid = [task("v", [("a", 4.0)], [("a", 4.0), ("b", 2.0)])]
    method = ItemMean(grid=(1000.0, 0.0))
    method.fit(context(TUNE_TRAIN, valid))
    assert method.shrinkage == 0.0
    np.testing.assert_allclose(method.predict(valid)[0], [4.0, 2.0])


def test_item_mean_tuning_picks_full_shrinkage_when_the_global_mean_is_right():
    valid = [task("v", [("a", 3.0)], [("a", 3.0), ("b", 3.0)])]
    method = ItemMean(grid=(0.0, 1e9))
    method.fit(context(TUNE_TRAIN, valid))
    assert method.shrinkage == 1e9
    np.testing.assert_allclose(method.predict(valid)[0], [3.0, 3.0], atol=1e-8)


def test_bias_tuning_picks_a_free_user_bias_when_users_are_offset():
    # The user rates one below the item means: a = 4 - 1 = 3, b = 2 - 1 = 1. Exact with
    # no shrinkage anywhere (b_u = -1); the other pairs predict 3 (mu + 0), 3 (mu) and 2.
    valid = [task("v", [("a", 3.0)], [("b", 1.0)])]
    method = BiasBaseline(item_grid=(1e9, 0.0), user_grid=(1e9, 0.0))
    method.fit(context(TUNE_TRAIN, valid, support_sizes=(1, None)))
    assert (method.item_shrinkage, method.user_shrinkage) == (0.0, 0.0)
    np.testing.assert_allclose(method.predict(valid)[0], [1.0])


def test_bias_tuning_picks_no_user_bias_when_users_follow_item_means():
    # Support a = 5 (residual 1) but the query b = 2 is the item mean: the user bias must
    # be shrunk away (user lambda 1e9), item means kept (item lambda 0).
    valid = [task("v", [("a", 5.0)], [("b", 2.0)])]
    method = BiasBaseline(item_grid=(1e9, 0.0), user_grid=(0.0, 1e9))
    method.fit(context(TUNE_TRAIN, valid, support_sizes=(1,)))
    assert (method.item_shrinkage, method.user_shrinkage) == (0.0, 1e9)
    np.testing.assert_allclose(method.predict(valid)[0], [2.0], atol=1e-8)


def test_bias_tuning_scores_every_grid_pair_with_clipped_predictions():
    # Support a = 5 and query b = 5: with item lambda 0, user lambda 0 the prediction is
    # 2 + 1 = 3; with item lambda 1e9 it is mu + (5 - mu) = 5; clipping to [1, 5] matters
    # nowhere here, so the MSEs are 4 and 0 and the other two pairs lie between.
    valid = [task("v", [("a", 5.0)], [("b", 5.0)])]
    method = BiasBaseline(item_grid=(0.0, 1e9), user_grid=(0.0, 1e9))
    method.fit(context(TUNE_TRAIN, valid))
    assert (method.item_shrinkage, method.user_shrinkage) == (1e9, 0.0)
    assert set(method._validation) == {(0.0, 0.0), (0.0, 1e9), (1e9, 0.0), (1e9, 1e9)}
    assert method._validation[(0.0, 0.0)] == pytest.approx(4.0)
    assert method._validation[(1e9, 0.0)] == pytest.approx(0.0, abs=1e-12)
    assert method._validation[(0.0, 1e9)] == pytest.approx(9.0, rel=1e-6)  # b = 2, no bias
    assert method._validation[(1e9, 1e9)] == pytest.approx(4.0, rel=1e-6)  # mu = 3, no bias


def test_baseline_methods_are_fresh_and_in_report_order():
    first, second = baseline_methods(), baseline_methods()
    assert [m.name for m in first] == ["global_mean", "item_mean", "bias"]
    assert all(a is not b for a, b in zip(first, second))
    assert tuple(first[1].grid) == SHRINKAGE_GRID and tuple(first[2].user_grid) == SHRINKAGE_GRID
