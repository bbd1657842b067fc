"""Top-N baselines a practitioner would ship, each tuned on validation users only.

- ``popular``: training interaction counts, the same list for everybody.
- ``itemknn``: cosine similarity on the binary user-item matrix,
  sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i| |U_j|) + shrinkage), each item keeping its
  `neighbours` most similar items; a user's score of j = sum of sim(i, j) over support items i.
- ``ease``: Steck (2019), B = I - P / diag(P) with P = (X^T X + lambda I)^-1 (zero diagonal);
  scores = support row x B.
- ``ials``: implicit ALS (Hu, Koren & Volinsky 2008): item factors Y trained on the training
  users by the `implicit` package (confidence alpha on interacted items, 1 elsewhere); a new
  user is folded in by solving their ridge system against Y:
  (Y^T Y + (alpha - 1) Y_S^T Y_S + lambda I) x = alpha Y_S^T 1, S = the support items.

The user-item matrix is binary: every interaction for rating data, positive clicks for
click data; a support item counts the same way. Dense item-item matrices limit itemknn and
ease to catalogs of at most DENSE_ITEM_LIMIT items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from training.dataset import Dataset
from training.harness import FitContext
from training.splits import Task
from training.topn import Validation, catalog_items, positive_counts, tune

log = logging.getLogger(__name__)

DENSE_ITEM_LIMIT = 20000  # an item-item float64 matrix of this size is 3.2 GB


@dataclass
class ItemIndex:
    """A method's catalog: item ids and their column positions."""

    items: np.ndarray
    position: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.position = {item: j for j, item in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    def columns(self, items: np.ndarray) -> np.ndarray:
        """Positions of `items` in this catalog; an unknown item is an error."""
        try:
            return np.fromiter((self.position[i] for i in items), np.int64, len(items))
        except KeyError as error:
            raise ValueError(f"item {error.args[0]!r} is not in the catalog the method was fitted on") from None


def is_positive(labels: np.ndarray, label_kind: str) -> np.ndarray:
    """Which interactions count as positive: every rating, clicks with label 1."""
    return labels > 0 if label_kind == "click" else np.ones(len(labels), dtype=bool)


def user_item_matrix(train: Dataset, index: ItemIndex) -> np.ndarray:
    """(training users, catalog items) binary float64 matrix of positive interactions."""
    keep = is_positive(train.labels, train.label.kind)
    _, users = np.unique(train.user_ids[keep], return_inverse=True)
    columns = index.columns(train.item_ids[keep])
    matrix = np.zeros((int(users.max()) + 1 if len(users) else 0, len(index)), dtype=np.float64)
    matrix[users, columns] = 1.0
    return matrix


def support_positions(tasks: Sequence[Task], index: ItemIndex, label_kind: str) -> list[np.ndarray]:
    """Each task's positive support items as distinct catalog positions."""
    return [
        np.unique(index.columns(t.support_items[is_positive(t.support_labels, label_kind)])) for t in tasks
    ]


def support_matrix(tasks: Sequence[Task], index: ItemIndex, label_kind: str) -> np.ndarray:
    """(T, C) binary float64: each task's positive support items."""
    matrix = np.zeros((len(tasks), len(index)), dtype=np.float64)
    for t, positions in enumerate(support_positions(tasks, index, label_kind)):
        matrix[t, positions] = 1.0
    return matrix


def _check_dense(name: str, n_items: int) -> None:
    if n_items > DENSE_ITEM_LIMIT:
        raise ValueError(f"{name} builds a dense item-item matrix; {n_items} items exceed its limit of {DENSE_ITEM_LIMIT}")


@dataclass
class Popular:
    """Training interaction counts: the most-popular list."""

    name: str = "popular"
    index: ItemIndex | None = None
    counts: np.ndarray | None = None

    def fit(self, context: FitContext) -> None:
        self.index = ItemIndex(catalog_items(context.dataset))
        self.counts = positive_counts(context.train, self.index.items)

    def score_catalog(self, tasks: Sequence[Task], items: np.ndarray) -> np.ndarray:
        assert self.index is not None and self.counts is not None, "fit() first"
        return np.tile(self.counts[self.index.columns(items)], (len(tasks), 1))


def cosine_neighbours(cooccurrence: np.ndarray, neighbours: int, shrinkage: float) -> np.ndarray:
    """(C, C) item-item weights W[i, j]: shrunk cosine, zero diagonal, each column j keeping
    its `neighbours` largest entries (0 = all)."""
    counts = np.diag(cooccurrence)
    denominator = np.sqrt(np.outer(counts, counts)) + shrinkage
    similarity = np.divide(cooccurrence, denominator, out=np.zeros_like(cooccurrence), where=denominator > 0)
    np.fill_diagonal(similarity, 0.0)
    n = similarity.shape[0]
    if 0 < neighbours < n - 1:
        keep = np.argpartition(-similarity, neighbours - 1, axis=0)[:neighbours]  # (neighbours, C) rows per column
        pruned = np.zeros_like(similarity)
        columns = np.broadcast_to(np.arange(n), keep.shape)
        pruned[keep, columns] = similarity[keep, columns]
        similarity = pruned
    return similarity


@dataclass
class ItemKNN:
    """Item-based kNN on cosine similarity; neighbourhood size and shrinkage tuned."""

    name: str = "itemknn"
    neighbours_grid: Sequence[int] = (25, 50, 100, 200, 400, 800, 0)  # 0 = every item
    shrinkage_grid: Sequence[float] = (0.0, 10.0, 50.0, 200.0, 1000.0)
    index: ItemIndex | None = None
    weights: np.ndarray | None = None
    label_kind: str = "rating"
    chosen: dict | None = None
    validation_scores: dict = field(default_factory=dict, repr=False)

    def fit(self, context: FitContext) -> None:
        self.index = ItemIndex(catalog_items(context.dataset))
        _check_dense(self.name, len(self.index))
        self.label_kind = context.dataset.label.kind
        matrix = user_item_matrix(context.train, self.index)
        cooccurrence = matrix.T @ matrix  # (C, C)

        def build(setting: dict) -> None:
            self.weights = cosine_neighbours(cooccurrence, setting["neighbours"], setting["shrinkage"])

        grid = [{"neighbours": k, "shrinkage": s} for k in self.neighbours_grid for s in self.shrinkage_grid]
        self.chosen, self.validation_scores = tune(self, grid, Validation.of(context), build)

    def score_catalog(self, tasks: Sequence[Task], items: np.ndarray) -> np.ndarray:
        assert self.index is not None and self.weights is not None, "fit() first"
        scores = support_matrix(tasks, self.index, self.label_kind) @ self.weights
        return scores[:, self.index.columns(items)]


def ease_weights(gram: np.ndarray, l2: float) -> np.ndarray:
    """Steck's closed form: B = I - P diag(1 / diag(P)), P = (G + l2 I)^-1; diag(B) = 0."""
    if l2 <= 0:
        raise ValueError(f"EASE needs lambda > 0, got {l2}")
    inverse = np.linalg.inv(gram + l2 * np.eye(gram.shape[0]))
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


@dataclass
class EASE:
    """EASE (Steck 2019), lambda tuned."""

    name: str = "ease"
    lambda_grid: Sequence[float] = (100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0)
    index: ItemIndex | None = None
    weights: np.ndarray | None = None
    label_kind: str = "rating"
    chosen: dict | None = None
    validation_scores: dict = field(default_factory=dict, repr=False)

    def fit(self, context: FitContext) -> None:
        self.index = ItemIndex(catalog_items(context.dataset))
        _check_dense(self.name, len(self.index))
        self.label_kind = context.dataset.label.kind
        matrix = user_item_matrix(context.train, self.index)
        gram = matrix.T @ matrix

        def build(setting: dict) -> None:
            self.weights = ease_weights(gram, setting["lambda"])

        grid = [{"lambda": l2} for l2 in self.lambda_grid]
        self.chosen, self.validation_scores = tune(self, grid, Validation.of(context), build)

    def score_catalog(self, tasks: Sequence[Task], items: np.ndarray) -> np.ndarray:
        assert self.index is not None and self.weights is not None, "fit() first"
        scores = support_matrix(tasks, self.index, self.label_kind) @ self.weights
        return scores[:, self.index.columns(items)]


def als_fold_in(
    item_factors: np.ndarray, supports: Sequence[np.ndarray], regularization: float, alpha: float
) -> np.ndarray:
    """(T, f) user factors solving each user's implicit-ALS ridge system against fixed items.

    x = (Y^T Y + (alpha - 1) Y_S^T Y_S + regularization I)^-1 alpha Y_S^T 1 for each support
    set S of catalog positions: confidence alpha on the user's items and 1 on every other
    item, preference 1 on the user's items and 0 elsewhere (the implicit package's system).
    """
    factors = item_factors.shape[1]
    longest = max((len(s) for s in supports), default=0)
    padded = np.zeros((len(supports), max(longest, 1)), dtype=np.int64)
    mask = np.zeros(padded.shape, dtype=np.float64)
    for t, positions in enumerate(supports):
        padded[t, : len(positions)] = positions
        mask[t, : len(positions)] = 1.0
    chosen = item_factors[padded] * mask[..., None]  # (T, S, f)
    systems = item_factors.T @ item_factors + regularization * np.eye(factors)  # (f, f)
    systems = systems[None] + (alpha - 1.0) * (chosen.transpose(0, 2, 1) @ chosen)  # (T, f, f)
    rhs = alpha * chosen.sum(axis=1)  # (T, f)
    return np.linalg.solve(systems, rhs[..., None])[..., 0]


@dataclass
class ImplicitALS:
    """Implicit ALS item factors (the `implicit` package) with an exact ridge fold-in per user.

    Tuned in two stages on validation Recall@20: regularisation x alpha at `base_factors`,
    then the factor count at the best of those.
    """

    name: str = "ials"
    factors_grid: Sequence[int] = (32, 64, 128)
    base_factors: int = 64
    regularization_grid: Sequence[float] = (1.0, 10.0, 100.0, 1000.0)
    alpha_grid: Sequence[float] = (2.0, 5.0, 10.0, 20.0)
    iterations: int = 15
    index: ItemIndex | None = None
    item_factors: np.ndarray | None = None
    setting: dict = field(default_factory=dict)
    label_kind: str = "rating"
    chosen: dict | None = None
    validation_scores: dict = field(default_factory=dict, repr=False)

    def fit(self, context: FitContext) -> None:
        try:
            import scipy.sparse
            from implicit.cpu.als import AlternatingLeastSquares
            from threadpoolctl import threadpool_limits
        except ImportError as error:
            raise RuntimeError(f"ials needs the 'eval' extra (pip install -e '.[eval]'): {error}") from None
        self.index = ItemIndex(catalog_items(context.dataset))
        self.label_kind = context.dataset.label.kind
        users_items = scipy.sparse.csr_matrix(user_item_matrix(context.train, self.index).astype(np.float32))

        def build(setting: dict) -> None:
            # One BLAS thread: implicit runs its own loop, and nested BLAS threads slow it down.
            with threadpool_limits(1, "blas"):
                model = AlternatingLeastSquares(
                    factors=setting["factors"],
                    regularization=setting["regularization"],
                    alpha=setting["alpha"],
                    iterations=self.iterations,
                    random_state=context.seed,
                    num_threads=1,
                )
                model.fit(users_items, show_progress=False)
            self.item_factors = np.asarray(model.item_factors, dtype=np.float64)
            self.setting = dict(setting)

        validation = Validation.of(context)
        first = [
            {"factors": self.base_factors, "regularization": r, "alpha": a}
            for r in self.regularization_grid
            for a in self.alpha_grid
        ]
        best, scores = tune(self, first, validation, build)
        second = [{**best, "factors": f} for f in self.factors_grid]
        self.chosen, more = tune(self, second, validation, build)
        self.validation_scores = {**scores, **more}

    def fold_in(self, tasks: Sequence[Task]) -> np.ndarray:
        """(T, factors) user factors of the tasks' supports."""
        assert self.index is not None and self.item_factors is not None, "fit() first"
        supports = support_positions(tasks, self.index, self.label_kind)
        return als_fold_in(self.item_factors, supports, self.setting["regularization"], self.setting["alpha"])

    def score_catalog(self, tasks: Sequence[Task], items: np.ndarray) -> np.ndarray:
        assert self.index is not None and self.item_factors is not None, "fit() first"
        return self.fold_in(tasks) @ self.item_factors[self.index.columns(items)].T
