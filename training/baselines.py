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
from training.fitting import FitContext, validation_mse
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


# --- BaselineOnly and Funk SVD: the standard rating baselines, with a new user folded in ---


@dataclass
class Encoded:
    """Training ratings as integer user and item codes."""

    users: np.ndarray  # (N,) int64 codes into user_ids
    items: np.ndarray  # (N,) int64 codes into item_ids
    labels: np.ndarray  # (N,) float64
    user_ids: np.ndarray  # sorted distinct ids
    item_ids: np.ndarray
    item_code: dict[str, int]

    @staticmethod
    def of(train: Dataset) -> "Encoded":
        if len(train) == 0:
            raise ValueError("no training interactions to fit on")
        user_ids, users = np.unique(train.user_ids, return_inverse=True)
        item_ids, items = np.unique(train.item_ids, return_inverse=True)
        return Encoded(
            users, items, train.labels.astype(np.float64), user_ids, item_ids, {i: c for c, i in enumerate(item_ids.tolist())}
        )

    def codes(self, items: Sequence[str]) -> np.ndarray:
        """Item codes, -1 for an item training has no rating of."""
        return np.fromiter((self.item_code.get(i, -1) for i in items), np.int64, len(items))


def als_biases(data: Encoded, reg_i: float, reg_u: float, epochs: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(mu, b_u, b_i) by alternating ridge steps, items first, from b_u = 0 (scikit-surprise's
    BaselineOnly 'als'): b_i = sum(r - mu - b_u) / (reg_i + n_i), b_u = sum(r - mu - b_i) / (reg_u + n_u)."""
    mu = float(np.mean(data.labels))
    n_users, n_items = len(data.user_ids), len(data.item_ids)
    user_counts = np.bincount(data.users, minlength=n_users)
    item_counts = np.bincount(data.items, minlength=n_items)
    b_u, b_i = np.zeros(n_users), np.zeros(n_items)
    for _ in range(epochs):
        b_i = np.bincount(data.items, weights=data.labels - mu - b_u[data.users], minlength=n_items) / (reg_i + item_counts)
        b_u = np.bincount(data.users, weights=data.labels - mu - b_i[data.items], minlength=n_users) / (reg_u + user_counts)
    return mu, b_u, b_i


@dataclass
class BaselineOnly:
    """The standard BaselineOnly (scikit-surprise's defaults: ALS, reg_i 10, reg_u 15, 10 epochs).

    mu + b_u + b_i with the item biases fitted jointly with the training users' biases; a new
    user's bias is the same ALS user step on their support with the item biases fixed:
    b_u = sum(r - mu - b_i) / (reg_u + n). An item training has no rating of gets b_i = 0.
    """

    name: str = "baseline_only"
    reg_i: float = 10.0
    reg_u: float = 15.0
    epochs: int = 10
    mu: float = float("nan")
    item_bias: np.ndarray | None = None
    data: Encoded | None = None

    def fit(self, context: FitContext) -> None:
        self.data = Encoded.of(context.train)
        self.mu, _, self.item_bias = als_biases(self.data, self.reg_i, self.reg_u, self.epochs)

    def _item_bias(self, items: Sequence[str]) -> np.ndarray:
        assert self.data is not None and self.item_bias is not None, "fit() first"
        codes = self.data.codes(items)
        return np.where(codes >= 0, self.item_bias[np.maximum(codes, 0)], 0.0)

    def user_bias(self, task: Task) -> float:
        """The new user's bias folded in from the support (item biases fixed)."""
        residual = task.support_labels - self.mu - self._item_bias(task.support_items)
        return float(np.sum(residual) / (self.reg_u + len(residual)))

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        return [self.mu + self.user_bias(t) + self._item_bias(t.query_items) for t in tasks]


@dataclass(frozen=True)
class SVDConfig:
    """Funk SVD training settings (scikit-surprise's SVD defaults, except the batch)."""

    factors: int = 100
    epochs: int = 20
    learning_rate: float = 0.005
    reg: float = 0.02
    init_std: float = 0.1
    batch_size: int = 512  # ratings per vectorised SGD step

    def __post_init__(self) -> None:
        if self.factors < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"factors, epochs and batch_size must be >= 1: {self}")
        if self.learning_rate <= 0 or self.reg < 0 or self.init_std < 0:
            raise ValueError(f"learning_rate must be > 0, reg and init_std >= 0: {self}")


def funk_svd(data: Encoded, config: SVDConfig, seed: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mu, b_u, b_i, P, Q) by SGD on squared error with L2 (Funk SVD, surprise's update rule).

    Each step takes a batch of shuffled ratings; every rating's update is the sequential
    rule's (e = r - mu - b_u - b_i - p_u.q_i; b_u += lr (e - reg b_u); p_u += lr (e q_i - reg p_u);
    the same for the item), summed over the batch. A small batch keeps it close to
    per-rating SGD (few repeats of a user within a batch) at numpy speed.
    """
    import torch  # index_add_ scatters a batch's updates far faster than np.add.at

    rng = np.random.default_rng(seed)
    n_users, n_items = len(data.user_ids), len(data.item_ids)
    mu = float(np.mean(data.labels))
    b_u, b_i = torch.zeros(n_users, dtype=torch.float64), torch.zeros(n_items, dtype=torch.float64)
    p = torch.from_numpy(rng.normal(0.0, config.init_std, (n_users, config.factors)))
    q = torch.from_numpy(rng.normal(0.0, config.init_std, (n_items, config.factors)))
    users, items, labels = (torch.from_numpy(a) for a in (data.users, data.items, data.labels))
    lr, reg = config.learning_rate, config.reg
    for _ in range(config.epochs):
        order = torch.from_numpy(rng.permutation(len(data.labels)))
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            u, i, r = users[rows], items[rows], labels[rows]
            pu, qi, bu, bi = p[u], q[i], b_u[u], b_i[i]
            error = r - (mu + bu + bi + (pu * qi).sum(dim=1))  # (B,)
            b_u.index_add_(0, u, lr * (error - reg * bu))
            b_i.index_add_(0, i, lr * (error - reg * bi))
            p.index_add_(0, u, lr * (error[:, None] * qi - reg * pu))
            q.index_add_(0, i, lr * (error[:, None] * pu - reg * qi))
    b_u, b_i, p, q = (t.numpy() for t in (b_u, b_i, p, q))
    return mu, b_u, b_i, p, q


def ridge_fold_in(
    features: np.ndarray, mask: np.ndarray, targets: np.ndarray, penalties: np.ndarray
) -> np.ndarray:
    """Per-task ridge solutions w = (Z^T M Z + diag(penalties))^-1 Z^T M y, batched.

    features (T, S, d), mask (T, S) 0/1, targets (T, S), penalties (d,) > 0.
    """
    weighted = features * mask[..., None]
    systems = weighted.transpose(0, 2, 1) @ features + np.diag(penalties)[None]
    rhs = np.einsum("tsd,ts->td", weighted, targets)
    return np.linalg.solve(systems, rhs[..., None])[..., 0]


@dataclass
class FunkSVD:
    """Funk SVD on the training users; a new user's bias and factors are folded in from the
    support by ridge regression with the item parameters fixed. Training settings (factors,
    L2) and the fold-in ridge weights are tuned on validation MSE."""

    name: str = "svd"
    grid: Sequence[SVDConfig] = (SVDConfig(factors=20, reg=0.02), SVDConfig(factors=20, reg=0.1), SVDConfig(), SVDConfig(reg=0.1))
    bias_penalty_grid: Sequence[float] = (3.0, 10.0, 25.0)
    factor_penalty_grid: Sequence[float] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
    config: SVDConfig | None = None
    bias_penalty: float = float("nan")
    factor_penalty: float = float("nan")
    mu: float = float("nan")
    item_bias: np.ndarray | None = None
    item_factors: np.ndarray | None = None
    data: Encoded | None = None
    chosen: dict | None = None

    def fit(self, context: FitContext) -> None:
        self.data = Encoded.of(context.train)
        label = context.dataset.label
        best: tuple[float, tuple | None] = (float("inf"), None)
        for config in self.grid:
            self.mu, _, self.item_bias, _, self.item_factors = funk_svd(self.data, config, context.seed)
            for bias_penalty, factor_penalty in itertools.product(self.bias_penalty_grid, self.factor_penalty_grid):
                self.bias_penalty, self.factor_penalty = bias_penalty, factor_penalty
                score = validation_mse(self, context.valid_tasks, context.support_sizes, label.min_value, label.max_value)
                if score < best[0]:
                    best = (score, (config, bias_penalty, factor_penalty, self.mu, self.item_bias, self.item_factors))
        assert best[1] is not None, "empty grid"
        self.config, self.bias_penalty, self.factor_penalty, self.mu, self.item_bias, self.item_factors = best[1]
        self.chosen = {
            "factors": self.config.factors,
            "reg": self.config.reg,
            "bias_penalty": self.bias_penalty,
            "factor_penalty": self.factor_penalty,
        }
        log.info("svd: %s (validation MSE %.4f)", self.chosen, best[0])

    def _items(self, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(biases, factors) of items; an item training has no rating of gets zeros."""
        assert self.data is not None and self.item_bias is not None and self.item_factors is not None, "fit() first"
        codes = self.data.codes(items)
        known = codes >= 0
        bias = np.where(known, self.item_bias[np.maximum(codes, 0)], 0.0)
        factors = self.item_factors[np.maximum(codes, 0)] * known[:, None]
        return bias, factors

    def user_parameters(self, tasks: Sequence[Task]) -> np.ndarray:
        """(T, 1 + factors): each new user's [b_u, p_u] from the support."""
        assert self.item_factors is not None, "fit() first"
        d = 1 + self.item_factors.shape[1]
        longest = max((len(t.support_items) for t in tasks), default=0)
        features = np.zeros((len(tasks), max(longest, 1), d))
        targets = np.zeros(features.shape[:2])
        mask = np.zeros(features.shape[:2])
        for t, task in enumerate(tasks):
            n = len(task.support_items)
            bias, factors = self._items(task.support_items)
            features[t, :n, 0] = 1.0
            features[t, :n, 1:] = factors
            targets[t, :n] = task.support_labels - self.mu - bias
            mask[t, :n] = 1.0
        penalties = np.r_[self.bias_penalty, np.full(d - 1, self.factor_penalty)]
        return ridge_fold_in(features, mask, targets, penalties)

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        users = self.user_parameters(tasks)
        out = []
        for task, user in zip(tasks, users):
            bias, factors = self._items(task.query_items)
            out.append(self.mu + user[0] + bias + factors @ user[1:])
        return out
