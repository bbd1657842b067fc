"""Onboarding: which items to ask a new user about, chosen by what the inner loop would learn.

Pure numpy, shared by training (the offline simulation) and the service (the Onboard RPC):
both hand the same function the same item vectors, prior and knowledge weights, so the
served choice is the evaluated one.

What the inner loop sees of item i (training.model, training.inner_loop):

- rating head: x_i = [1, q_i] (the user bias and factors it adapts; the score is
  mu + b_i + x_i . theta), objective sum_j (x_j . theta - r_j)^2 + sum_k pull_k (theta_k - theta0_k)^2;
- engagement head: p_i (the user's engagement factors phi), objective
  sum_j w_j (1 - p_j . phi)^2 + alpha phi' G phi + sum_k pull_k (phi_k - phi0_k)^2.

Both are ridge problems, so the Gaussian posterior of the user's parameters after a set S
of answers has precision (up to the common factor 2 of the squared loss)

    A(S) = Lambda + sum_{i in S} x_i x_i'     with Lambda_rating = diag(pull),
                                                   Lambda_engagement = diag(pull) + alpha G,

per head; the heads share no parameter, so the joint precision is block diagonal and its
log-determinant is the sum of the heads'. Maximising log det A(S) is Bayesian D-optimal
design: the answers that shrink the volume of the user's posterior most.

An answer only arrives if the user knows the item. pi_i, the knowledge weight, is the
relative probability that the user interacts with item i: the engagement head is trained
with a softmax over the catalog, so exp(z_i - z_j) is the ratio of the probabilities that
the user's next interaction is i rather than j, and with

    pi_i = exp(z_i - max_{j available} z_j)      (z = the user's engagement logits)

the most likely known available item has pi = 1 (its bias starts at log-popularity, so at
the start pi_i is item i's popularity relative to the most popular one). A model without
an engagement head gives pi = 1 for every item. The D-optimal strategy maximises the
log-determinant of the *expected* information, each item counted with its probability of
being answered:

    f(S) = log det(Lambda + sum_{i in S} pi_i x_i x_i')         (summed over the heads)

f is monotone submodular, so the greedy choice (add the item of largest gain
log(1 + pi_i x_i' A^-1 x_i), update A^-1 by Sherman-Morrison) is within 1 - 1/e of the best
set, and exact for one item; it runs lazily (the gains only shrink), so a pick costs O(m^2)
per re-evaluated item, not a pass over the catalog. Items already answered enter A with weight 1 (they are known);
for the engagement head only the answers that count as engagement do (positive clicks).

Strategies (the reason score each item comes back with, in parentheses):

- ``dopt``: the greedy D-optimal design above (the gain in f when the item was chosen, nats);
- ``melu``: MeLU-style evidence candidates (Lee et al., KDD 2019): the norm of the rating
  head's support-loss gradient per unit residual, ||x_i|| (the residual is unknown before
  the answer), over its largest, times pi_i (the product);
- ``popular``: the caller's popularity, highest first (that popularity);
- ``random``: a uniform random order (0).

Exclusions and answered items are never returned, and an item is returned at most once, so
asking in rounds (ask, send the answers as interactions, ask again) never repeats an item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Strategy = Literal["dopt", "melu", "popular", "random"]

# The artifact file export writes the prior into and the service reads it from: safetensors
# with RATING_PRECISION (1 + d, 1 + d) and, for a model with the engagement head,
# ENGAGEMENT_PRECISION (e, e), float64.
PRIOR_FILE = "onboarding_prior.safetensors"
RATING_PRECISION = "rating_precision"
ENGAGEMENT_PRECISION = "engagement_precision"
STRATEGIES: tuple[Strategy, ...] = ("dopt", "melu", "popular", "random")
DEFAULT_STRATEGY: Strategy = "dopt"
HEADS = ("rating", "engagement")  # the information blocks dopt sums over


@dataclass(frozen=True)
class ItemVectors:
    """Each item's vectors as the inner loop sees them: rows in catalog order."""

    rating: np.ndarray  # (N, 1 + d) float: [1, q_i]
    engagement: np.ndarray | None = None  # (N, e) float: p_i, unscaled (None: no engagement head)

    def __post_init__(self) -> None:
        if self.rating.ndim != 2 or self.rating.shape[1] < 1:
            raise ValueError(f"rating vectors must be (items, 1 + factors), got shape {self.rating.shape}")
        if self.engagement is not None and (self.engagement.ndim != 2 or self.engagement.shape[0] != self.rating.shape[0]):
            raise ValueError(
                f"engagement vectors must be (items, factors) with {self.rating.shape[0]} rows, got {self.engagement.shape}"
            )

    @property
    def size(self) -> int:
        return int(self.rating.shape[0])

    @staticmethod
    def from_factors(rating_factors: np.ndarray, engagement_factors: np.ndarray | None = None) -> "ItemVectors":
        """[1, q_i] from the rating factors q (N, d) (the 1 is the user bias's coordinate)."""
        q = np.asarray(rating_factors)
        ones = np.ones((q.shape[0], 1), dtype=q.dtype)
        return ItemVectors(np.concatenate([ones, q], axis=1), None if engagement_factors is None else np.asarray(engagement_factors))


@dataclass(frozen=True)
class Prior:
    """The user's prior precision per head (Lambda of the module docstring)."""

    rating: np.ndarray  # (1 + d, 1 + d) symmetric positive definite
    engagement: np.ndarray | None = None  # (e, e), None without an engagement head

    def __post_init__(self) -> None:
        for name, matrix in (("rating", self.rating), ("engagement", self.engagement)):
            if matrix is None:
                continue
            if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                raise ValueError(f"the {name} prior precision must be square, got shape {matrix.shape}")
            if not np.all(np.isfinite(matrix)) or not np.allclose(matrix, matrix.T, rtol=1e-5, atol=1e-6):
                raise ValueError(f"the {name} prior precision must be finite and symmetric")
            try:
                np.linalg.cholesky(matrix.astype(np.float64))
            except np.linalg.LinAlgError:
                raise ValueError(f"the {name} prior precision is not positive definite") from None

    def check(self, vectors: ItemVectors) -> None:
        """Raises ValueError unless the prior fits the item vectors."""
        if self.rating.shape[0] != vectors.rating.shape[1]:
            raise ValueError(f"rating prior is {self.rating.shape}, item vectors have {vectors.rating.shape[1]} coordinates")
        if (self.engagement is None) != (vectors.engagement is None):
            raise ValueError("the prior and the item vectors disagree on whether there is an engagement head")
        if self.engagement is not None and self.engagement.shape[0] != vectors.engagement.shape[1]:
            raise ValueError(f"engagement prior is {self.engagement.shape}, item vectors have {vectors.engagement.shape[1]} coordinates")

    @staticmethod
    def from_pulls(
        rating_pull: np.ndarray,
        engagement_pull: np.ndarray | None = None,
        catalog_weight: float | None = None,
        gram: np.ndarray | None = None,
    ) -> "Prior":
        """Lambda_rating = diag(rating_pull) ((1 + d,): user bias first); Lambda_engagement =
        diag(engagement_pull) + catalog_weight * gram (the inner loop's all-items term)."""
        rating = np.diag(np.asarray(rating_pull, dtype=np.float64).reshape(-1))
        if engagement_pull is None:
            return Prior(rating)
        engagement = np.diag(np.asarray(engagement_pull, dtype=np.float64).reshape(-1))
        if gram is not None:
            engagement = engagement + float(catalog_weight or 0.0) * np.asarray(gram, dtype=np.float64)
            engagement = (engagement + engagement.T) / 2  # exactly symmetric (the Gram matrix is, up to rounding)
        return Prior(rating, engagement)


def prior_tensors(prior: Prior) -> dict[str, np.ndarray]:
    """The prior as PRIOR_FILE's tensors (what export writes)."""
    tensors = {RATING_PRECISION: np.ascontiguousarray(prior.rating, dtype=np.float64)}
    if prior.engagement is not None:
        tensors[ENGAGEMENT_PRECISION] = np.ascontiguousarray(prior.engagement, dtype=np.float64)
    return tensors


def prior_from_tensors(tensors: dict[str, np.ndarray]) -> Prior:
    """PRIOR_FILE's tensors back as a Prior (what the service reads); ValueError if malformed."""
    unknown = sorted(set(tensors) - {RATING_PRECISION, ENGAGEMENT_PRECISION})
    if unknown or RATING_PRECISION not in tensors:
        raise ValueError(f"expected tensors {RATING_PRECISION!r} (and {ENGAGEMENT_PRECISION!r}), got {sorted(tensors)}")
    engagement = tensors.get(ENGAGEMENT_PRECISION)
    return Prior(np.asarray(tensors[RATING_PRECISION], np.float64), None if engagement is None else np.asarray(engagement, np.float64))


@dataclass(frozen=True)
class Selection:
    """The chosen items (positions into the item vectors), best first, and each one's reason score."""

    rows: np.ndarray  # (k,) int64
    reasons: np.ndarray  # (k,) float64


def knowledge_weights(engagement_logits: np.ndarray | None, size: int) -> np.ndarray:
    """pi = exp(z - max z) over the given items (ones without engagement logits)."""
    if engagement_logits is None:
        return np.ones(size, dtype=np.float64)
    z = np.asarray(engagement_logits, dtype=np.float64).reshape(-1)
    if z.size != size:
        raise ValueError(f"{z.size} engagement logits for {size} items")
    if z.size == 0:
        return z
    if not np.all(np.isfinite(z)):
        raise ValueError("engagement logits must be finite")
    return np.exp(z - z.max())


def information(
    prior: Prior, vectors: ItemVectors, answered: np.ndarray, answered_engaged: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The precision per head after the answered items: Lambda + sum of x x' (weight 1)."""
    answered = np.asarray(answered, dtype=np.int64).reshape(-1)
    x = vectors.rating[answered].astype(np.float64)  # (n, 1 + d)
    rating = prior.rating + x.T @ x
    if prior.engagement is None:
        return rating, None
    engaged = np.ones(answered.size, bool) if answered_engaged is None else np.asarray(answered_engaged, bool).reshape(-1)
    if engaged.size != answered.size:
        raise ValueError(f"answered_engaged has {engaged.size} entries for {answered.size} answered items")
    p = vectors.engagement[answered[engaged]].astype(np.float64)
    return rating, prior.engagement + p.T @ p


def log_det_objective(prior: Prior, vectors: ItemVectors, chosen: Sequence[int], weights: np.ndarray, answered: np.ndarray = np.zeros(0, np.int64)) -> float:
    """f(S) of the module docstring, by slogdet: chosen item c counted with weights[k] for
    its position k in `chosen`. The reference the greedy's gains are checked against."""
    chosen = np.asarray(chosen, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    total = 0.0
    blocks = zip(information(prior, vectors, answered), (vectors.rating, vectors.engagement))
    for start, table in blocks:
        if start is None:
            continue
        x = table[chosen].astype(np.float64)
        sign, value = np.linalg.slogdet(start + (x * w[:, None]).T @ x)
        if sign <= 0:
            raise ValueError("the information matrix is not positive definite")
        total += float(value)
    return total


def _available(size: int, candidates: np.ndarray | None, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the rows to choose among, which of the candidates they are): candidates (every row
    when None) minus the excluded rows, in candidate order. Boolean masks, not np.unique or
    np.isin: those sort or hash, which costs most of a call over a large catalog."""
    pool = np.arange(size, dtype=np.int64) if candidates is None else np.asarray(candidates, dtype=np.int64).reshape(-1)
    if candidates is not None:
        if pool.size and (pool.min() < 0 or pool.max() >= size):
            raise ValueError(f"candidate rows must lie in [0, {size})")
        seen = np.zeros(size, dtype=bool)
        seen[pool] = True
        if int(seen.sum()) != pool.size:
            raise ValueError("candidate rows must be distinct")
    if not excluded.size:
        return pool, np.ones(pool.size, dtype=bool)
    if excluded.min() < 0 or excluded.max() >= size:
        raise ValueError(f"answered and excluded rows must lie in [0, {size})")
    blocked = np.zeros(size, dtype=bool)
    blocked[excluded] = True
    keep = ~blocked[pool]
    return pool[keep], keep


def select(
    strategy: Strategy,
    vectors: ItemVectors,
    prior: Prior | None,
    count: int,
    candidates: np.ndarray | None = None,
    engagement_logits: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    answered: np.ndarray | None = None,
    answered_engaged: np.ndarray | None = None,
    excluded: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    heads: Sequence[str] = HEADS,
) -> Selection:
    """The `count` items to ask next (fewer when fewer are available), best first.

    candidates: rows to choose among (None = every row), distinct; engagement_logits and
    popularity are aligned with them (popularity: for ``popular``, required there).
    answered: rows the user already answered (never returned; they enter the information
    matrix, the engagement block only where answered_engaged is True); excluded: rows never
    to return. rng: for ``random`` (a fresh generator when None). heads: the heads whose
    information ``dopt`` counts (both by default; one of them for diagnostics).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown onboarding strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    answered_rows = np.zeros(0, np.int64) if answered is None else np.asarray(answered, dtype=np.int64).reshape(-1)
    excluded_rows = np.zeros(0, np.int64) if excluded is None else np.asarray(excluded, dtype=np.int64).reshape(-1)
    n_candidates = vectors.size if candidates is None else len(candidates)
    for name, values in (("engagement_logits", engagement_logits), ("popularity", popularity)):
        if values is not None and len(values) != n_candidates:
            raise ValueError(f"{name} has {len(values)} entries for {n_candidates} candidates")
    rows, keep = _available(vectors.size, candidates, np.concatenate([answered_rows, excluded_rows]))
    k = min(count, rows.size)
    if k == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0, np.float64))
    if strategy == "random":
        generator = rng if rng is not None else np.random.default_rng()
        return Selection(generator.permutation(rows)[:k], np.zeros(k, np.float64))
    if strategy == "popular":
        if popularity is None:
            raise ValueError("the popular strategy needs a popularity per candidate")
        pop = np.asarray(popularity, dtype=np.float64)[keep]
        order = _best(pop, k)
        return Selection(rows[order], pop[order])
    weights = knowledge_weights(None if engagement_logits is None else np.asarray(engagement_logits)[keep], rows.size)
    if strategy == "melu":
        table = vectors.rating
        squares = np.einsum("nm,nm->n", table, table) if candidates is None else np.einsum("nm,nm->n", table[rows], table[rows])
        norms = np.sqrt(squares.astype(np.float64))
        norms = norms[rows] if candidates is None else norms
        score = norms / norms.max() * weights
        order = _best(score, k)
        return Selection(rows[order], score[order])
    if prior is None:
        raise ValueError("the dopt strategy needs the model's prior precision")
    prior.check(vectors)
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {tuple(heads)}")
    return _greedy_dopt(prior, vectors, rows, weights, k, answered_rows, answered_engaged, tuple(heads), candidates is None)


def _best(score: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, best first; equal scores keep position order (at the
    cut too). A partition, not a full sort: O(n) over a large catalog."""
    if k >= score.size:
        return np.argsort(-score, kind="stable")
    threshold = score[np.argpartition(-score, k - 1)[:k]].min()
    above = np.flatnonzero(score > threshold)
    ties = np.flatnonzero(score == threshold)[: k - above.size]
    chosen = np.concatenate([above, ties])
    return chosen[np.lexsort((chosen, -score[chosen]))]


def _greedy_dopt(
    prior: Prior,
    vectors: ItemVectors,
    rows: np.ndarray,
    weights: np.ndarray,
    k: int,
    answered: np.ndarray,
    answered_engaged: np.ndarray | None,
    heads: tuple[str, ...] = HEADS,
    whole_catalog: bool = False,
) -> Selection:
    """Greedy maximisation of f (module docstring) over `rows`, lazily (Minoux's accelerated
    greedy): every item's gain once, O(N m^2); then, per pick, the best upper bound's gain is
    recomputed exactly at the current precision, O(m^2), until the best bound is exact.
    Submodularity makes an item's earlier gain an upper bound on its gain now, so the result
    is the plain greedy's, ties included (np.argmax takes the first of equal bounds).

    The N-sized product runs in the item vectors' own precision (float32 from an item table:
    a quarter of float64's time over a large catalog, ~1e-7 relative on gains that are
    compared, not accumulated); the m x m state and the exact gains are float64.
    whole_catalog: `rows` are the catalog minus a few answered / excluded rows, in row order,
    so the catalog's tables are used as they are (no N x m copy) and masked.
    """
    n = vectors.size if whole_catalog else rows.size
    w = weights
    if whole_catalog:
        w = np.zeros(n)
        w[rows] = weights
    blocks = []  # per head: [inverse precision (m, m) float64, item vectors (n, m)]
    bounds = np.zeros(n)
    for head, start, table in zip(HEADS, information(prior, vectors, answered, answered_engaged), (vectors.rating, vectors.engagement)):
        if start is None or head not in heads:
            continue
        inverse = np.linalg.inv(start)  # symmetric positive definite (checked in Prior)
        x = table if whole_catalog else table[rows]
        quad = np.einsum("nm,nm->n", x @ inverse.astype(x.dtype), x).astype(np.float64)
        bounds += np.log1p(w * np.maximum(quad, 0.0))
        blocks.append([inverse, x])
    if whole_catalog:
        blocked = np.ones(n, dtype=bool)
        blocked[rows] = False
        bounds[blocked] = -np.inf

    def exact_gain(i: int) -> float:
        total = 0.0
        for inverse, x in blocks:
            item = x[i].astype(np.float64)
            total += math.log1p(w[i] * max(float(item @ inverse @ item), 0.0))
        return total

    chosen, reasons = [], []
    fresh = np.ones(n, dtype=bool)  # bounds[i] is i's gain at the current state
    for _ in range(k):
        while True:
            best = int(np.argmax(bounds))
            if fresh[best]:
                break
            bounds[best] = exact_gain(best)
            fresh[best] = True
        chosen.append(best)
        reasons.append(float(bounds[best]))
        bounds[best] = -np.inf
        fresh[:] = False
        for block in blocks:
            inverse, x = block
            item = x[best].astype(np.float64)
            u = inverse @ item  # (m,)
            block[0] = inverse - (w[best] / (1.0 + w[best] * float(item @ u))) * np.outer(u, u)
    picked = np.array(chosen, dtype=np.int64)
    return Selection(picked if whole_catalog else rows[picked], np.array(reasons, dtype=np.float64))
