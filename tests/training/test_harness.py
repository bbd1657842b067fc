"""The evaluation harness: rows, support sizes, what a method sees, and bad predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pytest

from training.baselines import baseline_methods
from training.dataset import Dataset
from training.fitting import FitContext, support_label, validation_mse
from training.harness import evaluate, parse_support_sizes
from training.splits import Protocol, Split, Task, make_splits
from training.synthetic import generate_synthetic

PROTOCOL = Protocol(min_interactions=15, max_interactions=40, query_size=5, folds=2, seed=3)
METRIC_KEYS = {"n", "ae", "se", "ndcg@3", "ndcg@5"}


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return generate_synthetic(seed=2, n_users=40, n_items=30)


@pytest.fixture(scope="module")
def splits(dataset) -> list[Split]:
    return make_splits(dataset, PROTOCOL)


@dataclass
class Spy:
    """Predicts a constant and records what the harness hands it."""

    name: str = "spy"
    value: float = 3.0
    contexts: list[FitContext] = field(default_factory=list)
    calls: list[list[Task]] = field(default_factory=list)

    def fit(self, context: FitContext) -> None:
        self.contexts.append(context)

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        self.calls.append(list(tasks))
        return [np.full(len(t.query_items), self.value) for t in tasks]


def test_one_row_per_fold_method_support_size_and_test_user(dataset, splits):
    sizes = (1, 3, None)
    rows = evaluate(dataset, splits, baseline_methods, sizes)
    expected = {
        (s.fold, m, support_label(k), u)
        for s in splits
        for m in ("global_mean", "item_mean", "bias")
        for k in sizes
        for u in s.test_users
    }
    keys = [(r["fold"], r["method"], r["support_size"], r["user"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == expected
    for row in rows:
        assert set(row) == {"scenario", "fold", "support_size", "method", "user"} | METRIC_KEYS
        assert row["scenario"] == "new_users"
        assert row["n"] == 5
        assert 0.0 <= row["ae"] <= 4.0 and 0.0 <= row["se"] <= 16.0
    # global_mean ignores the support: its error is the same at every support size
    by_user = {}
    for row in rows:
        if row["method"] == "global_mean":
            by_user.setdefault((row["fold"], row["user"]), set()).add(row["se"])
    assert all(len(values) == 1 for values in by_user.values())


def test_support_sizes_are_honoured_and_fit_sees_only_training_data(dataset, splits):
    spies: list[Spy] = []

    def make():
        spies.append(Spy())
        return [spies[-1]]

    messages: list[str] = []
    sizes = (2, 7, None)
    rows = evaluate(dataset, splits, make, sizes, progress=messages.append)
    assert messages == ["fold 0: spy", "fold 1: spy"]
    assert len(spies) == len(splits)  # a fresh method per split
    for spy, split in zip(spies, splits):
        (context,) = spy.contexts
        assert context.split is split
        assert context.support_sizes == sizes
        assert context.seed == PROTOCOL.seed + split.fold
        assert set(context.train.user_ids) <= set(split.train_users)
        assert set(context.train.user_ids).isdisjoint(split.test_users + split.valid_users)
        assert sorted(t.user for t in context.valid_tasks) == sorted(split.valid_users)
        assert len(spy.calls) == len(sizes)
        full = spy.calls[-1]
        assert [t.user for t in full] == split.test_users
        for k, call in zip(sizes, spy.calls):
            assert [t.user for t in call] == split.test_users
            for t, whole in zip(call, full):
                expected = len(whole.support_items) if k is None else min(k, len(whole.support_items))
                assert len(t.support_items) == expected
                assert t.support_items.tolist() == whole.support_items[:expected].tolist()  # the earliest
                assert t.query_items.tolist() == whole.query_items.tolist()
    assert {r["support_size"] for r in rows} == {"2", "7", "all"}


@dataclass
class Broken(Spy):
    how: str = "count"

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        preds = super().predict(tasks)
        if self.how == "count":
            return preds[:-1]
        if self.how == "shape":
            return [p[:-1] for p in preds]
        if self.how == "2d":
            return [p[None, :] for p in preds]
        return [np.full_like(p, np.nan) for p in preds]


@pytest.mark.parametrize(
    "how, message",
    [
        ("count", r"broken returned \d+ predictions for \d+ tasks"),
        ("shape", "broken: bad predictions for user"),
        ("2d", "broken: bad predictions for user"),
        ("nan", "broken: bad predictions for user"),
    ],
)
def test_bad_predictions_raise(dataset, splits, how, message):
    with pytest.raises(RuntimeError, match=message):
        evaluate(dataset, splits[:1], lambda: [Broken(name="broken", how=how)], (1,))


def test_validation_mse_clips_and_averages_over_tasks_and_sizes():
    tasks = [
        Task("u", np.array(["a"], object), np.array([1.0]), np.array(["b", "c"], object), np.array([5.0, 4.0])),
        Task("v", np.array(["a"], object), np.array([1.0]), np.array(["b"], object), np.array([1.0])),
    ]
    # A constant 6 clipped to 5: errors (0, 1) -> 0.5 for u, 4 -> 16 for v; mean 8.25 at each size.
    assert validation_mse(Spy(value=6.0), tasks, [1, None], 1.0, 5.0) == pytest.approx(8.25)
    # Without clipping in range: constant 3 -> u (4 + 1) / 2 = 2.5, v 4; mean 3.25.
    assert validation_mse(Spy(value=3.0), tasks, [None], 1.0, 5.0) == pytest.approx(3.25)
    assert validation_mse(Spy(), [], [None], 1.0, 5.0) == 0.0


@pytest.mark.parametrize(
    "text, sizes",
    [
        ("5,10,20,all", (5, 10, 20, None)),
        ("1", (1,)),
        ("all", (None,)),
        (" 3 , all ", (3, None)),
    ],
)
def test_parse_support_sizes(text, sizes):
    assert parse_support_sizes(text) == sizes


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5", "five", "3,,5", "ALL", "1,2,"])
def test_parse_support_sizes_refuses(text):
    with pytest.raises(ValueError, match="support size must be a positive integer or 'all'"):
        parse_support_sizes(text)


def test_support_label():
    assert support_label(None) == "all"
    assert support_label(7) == "7"
