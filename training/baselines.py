"""Strong simple baselines, each tuned on validation users only.

- ``global_mean``: the mean training label.
- ``item_mean``: each item's mean label shrunk toward the global mean,
  (sum + lambda * mu) / (n + lambda).
- ``bias``: the shrunk item mean plus a user bias fitted on the support set by ridge,
  b_u = sum(r - item prediction) / (n + lambda_u). This is the number to beat: it is
  what a careful engineer builds without meta-learning.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from training.dataset import Dataset
from training.harness import FitContext, validation_mse
from training.splits import Task

log = logging.getLogger(__name__)

SHRINKAGE_GRID: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 35.0, 60.0, 100.0)


@dataclass
class ItemStats:
    """Sums and counts of labels per item, and the global mean."""

    mean: float
    sums: dict[str, float]
    counts: dict[str, int]

    @staticmethod
    def of(train: Dataset) -> "ItemStats":
        if len(train) == 0:
            raise ValueError("no training interactions to compute item statistics from")
        items, inverse = train.factorized("item_ids")
        sums = np.bincount(inverse, weights=train.labels, minlength=len(items))
        counts = np.bincount(inverse, minlength=len(items))
        return ItemStats(
            mean=float(np.mean(train.labels)),
            sums=dict(zip(items.tolist(), sums.tolist())),
            counts=dict(zip(items.tolist(), counts.tolist())),
        )

    def shrunk_means(self, items: Sequence[str], shrinkage: float) -> np.ndarray:
        """(sum_i + shrinkage * mu) / (n_i + shrinkage); an unseen item gets mu."""
        out = np.empty(len(items), dtype=np.float64)
        for j, item in enumerate(items):
            n = self.counts.get(item, 0)
            denominator = n + shrinkage
            out[j] = self.mean if denominator == 0 else (self.sums.get(item, 0.0) + shrinkage * self.mean) / denominator
        return out


def user_bias(residuals: np.ndarray, shrinkage: float) -> float:
    """Ridge estimate of a user's bias from support residuals: sum / (n + shrinkage)."""
    denominator = len(residuals) + shrinkage
    return 0.0 if denominator == 0 else float(np.sum(residuals) / denominator)


@dataclass
class GlobalMean:
    name: str = "global_mean"
    mean: float = float("nan")

    def fit(self, context: FitContext) -> None:
        self.mean = float(np.mean(context.train.labels))

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        return [np.full(len(t.query_items), self.mean) for t in tasks]


@dataclass
class ItemMean:
    name: str = "item_mean"
    grid: Sequence[float] = SHRINKAGE_GRID
    shrinkage: float = float("nan")
    stats: ItemStats | None = None

    def fit(self, context: FitContext) -> None:
        self.stats = ItemStats.of(context.train)
        label = context.dataset.label
        scores = {}
        for shrinkage in self.grid:
            self.shrinkage = shrinkage
            scores[shrinkage] = validation_mse(self, context.valid_tasks, [None], label.min_value, label.max_value)
        self.shrinkage = min(scores, key=scores.__getitem__)
        log.info("item_mean: shrinkage %.3g (validation MSE %.4f)", self.shrinkage, scores[self.shrinkage])

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        assert self.stats is not None, "fit() first"
        return [self.stats.shrunk_means(t.query_items, self.shrinkage) for t in tasks]


@dataclass
class BiasBaseline:
    """Shrunk item means + a ridge user bias fitted on the support set."""

    name: str = "bias"
    item_grid: Sequence[float] = SHRINKAGE_GRID
    user_grid: Sequence[float] = SHRINKAGE_GRID
    item_shrinkage: float = float("nan")
    user_shrinkage: float = float("nan")
    stats: ItemStats | None = None
    _validation: dict = field(default_factory=dict, repr=False)

    def fit(self, context: FitContext) -> None:
        self.stats = ItemStats.of(context.train)
        label = context.dataset.label
        scores = _bias_grid_mse(
            self.stats, context.valid_tasks, context.support_sizes, self.item_grid, self.user_grid, label.min_value, label.max_value
        )
        self.item_shrinkage, self.user_shrinkage = min(scores, key=scores.__getitem__)
        self._validation = scores
        log.info(
            "bias: item shrinkage %.3g, user shrinkage %.3g (validation MSE %.4f)",
            self.item_shrinkage,
            self.user_shrinkage,
            scores[(self.item_shrinkage, self.user_shrinkage)],
        )

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        assert self.stats is not None, "fit() first"
        out = []
        for t in tasks:
            support_pred = self.stats.shrunk_means(t.support_items, self.item_shrinkage)
            b_u = user_bias(t.support_labels - support_pred, self.user_shrinkage)
            out.append(self.stats.shrunk_means(t.query_items, self.item_shrinkage) + b_u)
        return out


def _bias_grid_mse(
    stats: ItemStats,
    tasks: Sequence[Task],
    support_sizes: Sequence[int | None],
    item_grid: Sequence[float],
    user_grid: Sequence[float],
    low: float,
    high: float,
) -> dict[tuple[float, float], float]:
    """validation_mse of BiasBaseline at every (item, user) shrinkage of the grid, vectorised.

    The same objective (mean over tasks and support sizes of the clipped query MSE) with
    every task's interactions in flat arrays: its cost grows with the grid times the
    interactions, not with a Python call per task and setting.
    """
    scores = {pair: 0.0 for pair in itertools.product(item_grid, user_grid)}
    count = 0
    for k in support_sizes:
        cut = [t.with_support_size(k) for t in tasks]
        support = np.concatenate([t.support_items for t in cut]) if cut else np.empty(0, dtype=object)
        query = np.concatenate([t.query_items for t in cut]) if cut else np.empty(0, dtype=object)
        distinct, codes = np.unique(np.concatenate([support, query]), return_inverse=True)
        support_codes, query_codes = codes[: len(support)], codes[len(support) :]
        support_lengths = np.array([len(t.support_items) for t in cut])
        query_lengths = np.array([len(t.query_items) for t in cut])
        support_task = np.repeat(np.arange(len(cut)), support_lengths)
        query_task = np.repeat(np.arange(len(cut)), query_lengths)
        support_labels = np.concatenate([t.support_labels for t in cut]) if cut else np.empty(0)
        query_labels = np.concatenate([t.query_labels for t in cut]) if cut else np.empty(0)
        for item_shrinkage in item_grid:
            shrunk = stats.shrunk_means(distinct.tolist(), item_shrinkage)
            residual_sums = np.bincount(support_task, weights=support_labels - shrunk[support_codes], minlength=len(cut))
            query_base = shrunk[query_codes]
            for user_shrinkage in user_grid:
                denominator = support_lengths + user_shrinkage
                bias = np.divide(residual_sums, denominator, out=np.zeros(len(cut)), where=denominator != 0)
                error = np.clip(query_base + bias[query_task], low, high) - query_labels
                per_task = np.bincount(query_task, weights=error * error, minlength=len(cut)) / np.maximum(query_lengths, 1)
                scores[(item_shrinkage, user_shrinkage)] += float(per_task.sum())
        count += len(cut)
    return {pair: total / max(count, 1) for pair, total in scores.items()}


def baseline_methods() -> list:
    """Fresh instances of every baseline, in report order."""
    return [GlobalMean(), ItemMean(), BiasBaseline()]
