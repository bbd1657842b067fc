"""A strong starting point for the item factors: alternating least squares on residuals.

Meta-training learns the item factors too, but from a small random start it takes many
meta-steps and overfits the (few hundred) training users before the factors mean
anything. Starting them at a regularised matrix factorisation of what the bias model
leaves unexplained puts meta-training where a careful engineer's "bias + fold-in" model
already is, and lets it spend its steps on learning how to adapt.

residual(u, i) = label - (mu + item bias_i) - ridge user bias_u, then for `iterations`:
    P_u = argmin sum_i (r_ui - P_u . Q_i)^2 + l2 ||P_u||^2   (every user)
    Q_i = argmin sum_u (r_ui - P_u . Q_i)^2 + l2 ||Q_i||^2   (every item)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ALSResult:
    item_factors: dict[str, np.ndarray]  # item id -> (factors,)
    second_moment: np.ndarray  # (factors,) mean of Q_ik^2 over the training interactions


ROWS_PER_BLOCK = 1 << 20  # interactions gathered at once by a half-step (x factors x 8 bytes)


def _ridge_rows(
    groups: tuple[np.ndarray, np.ndarray], other: np.ndarray, other_index: np.ndarray, residual: np.ndarray, l2: float
) -> np.ndarray:
    """One ALS half-step: a ridge solve per entity over the rows in its group.

    Entities are taken in blocks of similar group length (within a factor of two), each
    padded with zero rows to its longest (zeros add nothing to A^T A or A^T r), so a block
    is one batched matmul and one batched solve: no Python work per entity or interaction.
    """
    order, bounds = groups
    lengths = np.diff(bounds)
    d = other.shape[1]
    out = np.zeros((len(lengths), d))
    eye = l2 * np.eye(d)
    by_length = np.argsort(-lengths, kind="stable")
    by_length = by_length[lengths[by_length] > 0]  # an entity without rows keeps zeros
    start = 0
    while start < len(by_length):
        width = int(lengths[by_length[start]])  # the block's longest group
        entities = by_length[start : start + max(1, ROWS_PER_BLOCK // width)]
        entities = entities[lengths[entities] * 2 > width]  # at most half of a block is padding
        slot = np.arange(width)
        valid = slot[None, :] < lengths[entities][:, None]  # (c, width)
        rows = order[np.where(valid, bounds[entities][:, None] + slot[None, :], 0)]  # (c, width)
        a = other[other_index[rows]] * valid[..., None]  # (c, width, d), padding rows zero
        r = residual[rows] * valid  # (c, width)
        a_t = a.transpose(0, 2, 1)  # (c, d, width)
        out[entities] = np.linalg.solve(a_t @ a + eye, (a_t @ r[..., None]))[..., 0]
        start += len(entities)
    return out


def _groups(index: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows sorted by entity, bounds): entity k's rows are order[bounds[k]:bounds[k + 1]]."""
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(count + 1))
    return order, bounds


def als_item_factors(
    user_ids: np.ndarray | tuple[np.ndarray, np.ndarray],
    item_ids: np.ndarray | tuple[np.ndarray, np.ndarray],
    residual: np.ndarray,
    factors: int,
    l2: float = 10.0,
    iterations: int = 8,
    seed: int = 0,
) -> ALSResult:
    """Item factors of a rank-`factors` ridge factorisation of the residuals."""
    if factors < 1 or l2 <= 0 or iterations < 1:
        raise ValueError("factors and iterations must be >= 1 and l2 > 0")
    # Either id arrays or their (distinct, codes) factorisation (Dataset.factorized).
    users, user_index = user_ids if isinstance(user_ids, tuple) else np.unique(user_ids, return_inverse=True)
    items, item_index = item_ids if isinstance(item_ids, tuple) else np.unique(item_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(0.0, 0.1, (len(users), factors))
    item_factors = rng.normal(0.0, 0.1, (len(items), factors))
    by_user, by_item = _groups(user_index, len(users)), _groups(item_index, len(items))
    residual = np.asarray(residual, dtype=np.float64)
    for _ in range(iterations):
        user_factors = _ridge_rows(by_user, item_factors, item_index, residual, l2)
        item_factors = _ridge_rows(by_item, user_factors, user_index, residual, l2)
    moment = np.mean(item_factors[item_index] ** 2, axis=0)
    return ALSResult(dict(zip(items.tolist(), item_factors)), moment)


def pooled_one_hot(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """(items, width) codes of one field -> (items, num_codes) mean-pooled one-hot rows.

    The model pools a field by the mean of its non-padding slots; this is the same
    operator as a matrix, so a linear fit on it gives embedding tables directly.
    """
    out = np.zeros((codes.shape[0], num_codes))
    present = codes != 0
    counts = np.maximum(present.sum(1, keepdims=True), 1)
    for slot in range(codes.shape[1]):
        rows = np.flatnonzero(present[:, slot])
        np.add.at(out, (rows, codes[rows, slot]), 1.0)
    return out / counts


def attribute_prior(design: np.ndarray, targets: np.ndarray, weights: np.ndarray, l2: float) -> np.ndarray:
    """Weighted ridge regression of item targets (bias, factors) on pooled attributes.

    Returns the (columns, targets) coefficients: the attribute tables that predict a new
    item's bias and factors from its genres, year and so on.
    """
    if design.shape[0] != targets.shape[0] or design.shape[0] != weights.shape[0]:
        raise ValueError("design, targets and weights need one row per item")
    weighted = design * weights[:, None]
    gram = design.T @ weighted + l2 * np.eye(design.shape[1])
    return np.linalg.solve(gram, weighted.T @ targets)


@dataclass(frozen=True)
class EngagementStart:
    table: np.ndarray  # (items, 1 + factors): [centred log-popularity | SVD factors], rows as `items`
    items: list[str]  # the item ids of the rows
    second_moment: np.ndarray  # (factors,) mean of P_ik^2 over the training interactions


def engagement_start(user_ids: np.ndarray, item_ids: np.ndarray, factors: int, seed: int = 0, singular_power: float = 0.0) -> EngagementStart:
    """Where the engagement head starts: each item's log-popularity (centred) and the right
    singular vectors of the binary user x item matrix, scaled so that their mean outer
    product over the items is the identity (PureSVD's item space: a new user's fold-in
    against them is already a sound top-N recommender). singular_power > 0 weights each
    vector by its singular value to that power (1: p_i . p_j approximates co-occurrence);
    on MovieLens-100K validation users 0 measured best after meta-training (mean Recall@20
    over K = 0..20: .344 at 0, .342 at 1, .333 at 0.5)."""
    import torch

    if factors < 1:
        raise ValueError("factors must be >= 1")
    users, user_index = np.unique(user_ids, return_inverse=True)
    items, item_index = np.unique(item_ids, return_inverse=True)
    pairs = np.unique(np.stack([user_index, item_index]), axis=1)  # one entry per (user, item)
    counts = np.bincount(pairs[1], minlength=len(items)).astype(np.float64)
    popularity = np.log1p(counts)
    popularity -= popularity.mean()
    rank = min(factors, len(users), len(items))
    matrix = torch.sparse_coo_tensor(torch.from_numpy(pairs), torch.ones(pairs.shape[1], dtype=torch.float64), (len(users), len(items)))
    torch.manual_seed(seed)
    _, singular, v = torch.svd_lowrank(matrix, q=rank, niter=6)  # (items, rank)
    weights = singular.numpy() ** singular_power
    weights = weights / np.sqrt(np.mean(weights**2))  # mean diagonal of the items' mean outer product: 1
    item_factors = np.zeros((len(items), factors))
    item_factors[:, :rank] = v.numpy() * weights * np.sqrt(len(items))
    moment = np.maximum(np.mean(item_factors[pairs[1]] ** 2, axis=0), 1e-4)
    return EngagementStart(np.concatenate([popularity[:, None], item_factors], axis=1), items.tolist(), moment)
