"""Baselines against hand-solved shrinkage estimates and hand-built tuning problems."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import (
    SHRINKAGE_GRID,
    BaselineOnly,
    BiasBaseline,
    Encoded,
    FunkSVD,
    SVDConfig,
    als_biases,
    funk_svd,
    ridge_fold_in,
    GlobalMean,
    ItemMean,
    ItemStats,
    baseline_methods,
    user_bias,
)
from training.dataset import AttributeTable, Dataset, LabelSpec
from training.harness import FitContext
from training.splits import Task
from training.synthetic import generate_synthetic


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


# --- BaselineOnly and Funk SVD ------------------------------------------------------------------


def test_baseline_only_one_als_epoch_hand_solved():
    # mu = 11/3; items first from b_u = 0: b_a = (4 + 5 - 2 mu) / (10 + 2) = 5/36,
    # b_b = (2 - mu) / (10 + 1) = -5/33; then users: b_x = (4 - mu - 5/36 + 2 - mu + 5/33) / (15 + 2),
    # b_y = (5 - mu - 5/36) / (15 + 1).
    mu, b_u, b_i = als_biases(Encoded.of(TRAIN), reg_i=10.0, reg_u=15.0, epochs=1)
    assert mu == pytest.approx(MU)
    np.testing.assert_allclose(b_i, [5 / 36, -5 / 33], rtol=1e-12)  # codes: a, b
    np.testing.assert_allclose(b_u, [-523 / 6732, 43 / 576], rtol=1e-12)  # codes: x, y

    method = BaselineOnly(epochs=1)
    method.fit(context(TRAIN, []))
    # a new user's bias: the same user step on the support, item biases fixed
    t = task("new", support=[("a", 5.0), ("b", 3.0)], query=[("c", 1.0), ("a", 1.0)])
    b_new = ((5 - MU - 5 / 36) + (3 - MU + 5 / 33)) / 17
    assert method.user_bias(t) == pytest.approx(b_new)
    (pred,) = method.predict([t])
    np.testing.assert_allclose(pred, [MU + b_new, MU + b_new + 5 / 36], rtol=1e-12)  # c is unknown: b_c = 0


def _surprise_fit(data, tmp_path):
    surprise = pytest.importorskip("surprise", reason="scikit-surprise (the eval extra) is not installed")
    path = tmp_path / "ratings.txt"
    path.write_text("".join(f"{u} {i} {r:g}\n" for u, i, r in zip(data.user_ids, data.item_ids, data.labels)))
    reader = surprise.Reader(line_format="user item rating", sep=" ", rating_scale=(1, 5))
    trainset = surprise.Dataset.load_from_file(str(path), reader=reader).build_full_trainset()
    algo = surprise.BaselineOnly(bsl_options={"method": "als"}, verbose=False)  # reg_i 10, reg_u 15, 10 epochs
    algo.fit(trainset)
    return algo, trainset


def test_baseline_only_matches_scikit_surprise(tmp_path):
    data = generate_synthetic(seed=2, n_users=80, n_items=50)
    algo, trainset = _surprise_fit(data, tmp_path)
    method = BaselineOnly()
    method.fit(context(data, []))
    encoded = Encoded.of(data)
    mu, b_u, b_i = als_biases(encoded, method.reg_i, method.reg_u, method.epochs)
    assert np.std(b_i) > 0.05 and np.std(b_u) > 0.05  # a real test: the biases are far from 0
    for user in encoded.user_ids[:20]:
        for item in encoded.item_ids[:20]:
            theirs = algo.predict(user, item, clip=False).est
            ours = mu + b_u[np.searchsorted(encoded.user_ids, user)] + b_i[encoded.item_code[item]]
            assert ours == pytest.approx(theirs, abs=1e-10)
    # surprise's last ALS step is a user step, so folding a training user's own ratings in
    # against the final item biases reproduces that user's bias there
    for user in encoded.user_ids[:10]:
        rows = data.user_ids == user
        own = Task(user, data.item_ids[rows], data.labels[rows], data.item_ids[:1], data.labels[:1])
        assert method.user_bias(own) == pytest.approx(algo.bu[trainset.to_inner_uid(user)], abs=1e-10)


def test_ridge_fold_in_solves_each_tasks_normal_equations():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(3, 5, 4))
    targets = rng.normal(size=(3, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=float)
    penalties = np.array([2.0, 0.5, 0.5, 0.5])
    solved = ridge_fold_in(features, mask, targets, penalties)
    for t in range(3):
        z, y = features[t][mask[t] == 1], targets[t][mask[t] == 1]
        expected = np.linalg.solve(z.T @ z + np.diag(penalties), z.T @ y)
        np.testing.assert_allclose(solved[t], expected, atol=1e-12)
    np.testing.assert_allclose(solved[2], 0.0)


def test_funk_svd_with_batch_one_is_sequential_sgd():
    # a per-rating SGD loop written out, with the same random draws
    data = Encoded.of(make_train([("x", "a", 4.0), ("y", "a", 5.0), ("x", "b", 2.0), ("y", "c", 1.0), ("z", "b", 3.0)]))
    config = SVDConfig(factors=2, epochs=3, learning_rate=0.05, reg=0.1, batch_size=1)
    mu, b_u, b_i, p, q = funk_svd(data, config, seed=7)

    rng = np.random.default_rng(7)
    ref_mu = float(np.mean(data.labels))
    ref_bu, ref_bi = np.zeros(3), np.zeros(3)
    ref_p = rng.normal(0.0, 0.1, (3, 2))
    ref_q = rng.normal(0.0, 0.1, (3, 2))
    for _ in range(3):
        for row in rng.permutation(5):
            u, i, r = data.users[row], data.items[row], data.labels[row]
            error = r - (ref_mu + ref_bu[u] + ref_bi[i] + ref_p[u] @ ref_q[i])
            ref_bu[u] += 0.05 * (error - 0.1 * ref_bu[u])
            ref_bi[i] += 0.05 * (error - 0.1 * ref_bi[i])
            pu = ref_p[u].copy()
            ref_p[u] += 0.05 * (error * ref_q[i] - 0.1 * ref_p[u])
            ref_q[i] += 0.05 * (error * pu - 0.1 * ref_q[i])
    assert mu == pytest.approx(ref_mu)
    for ours, ref in ((b_u, ref_bu), (b_i, ref_bi), (p, ref_p), (q, ref_q)):
        np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_svd_config_is_validated():
    with pytest.raises(ValueError, match="factors"):
        SVDConfig(factors=0)
    with pytest.raises(ValueError, match="learning_rate"):
        SVDConfig(learning_rate=0.0)


def test_svd_tunes_on_validation_users_and_folds_the_user_in():
    from training.harness import SUPPORT_SIZES, fit_context
    from training.splits import Protocol, build_tasks, make_splits

    data = generate_synthetic(seed=4, n_users=150, n_items=60)
    split = make_splits(data, Protocol())[0]
    ctx = fit_context(data, split, SUPPORT_SIZES)
    method = FunkSVD(
        grid=(SVDConfig(factors=4, epochs=5), SVDConfig(factors=4, epochs=5, reg=0.5)),
        bias_penalty_grid=(5.0,),
        factor_penalty_grid=(1.0, 1e6),
    )
    method.fit(ctx)
    assert method.chosen["factors"] == 4 and method.chosen["reg"] in (0.02, 0.5)
    tasks = build_tasks(data, split, split.test_users[:5])
    predictions = method.predict(tasks)
    for t, pred, user in zip(tasks, predictions, method.user_parameters(tasks)):
        bias, factors = method._items(t.query_items)
        np.testing.assert_allclose(pred, method.mu + user[0] + bias + factors @ user[1:])
    # with an overwhelming factor penalty the fold-in is BaselineOnly-like: factors ~ 0
    method.factor_penalty = 1e9
    assert np.abs(method.user_parameters(tasks)[:, 1:]).max() < 1e-6
