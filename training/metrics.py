"""Per-user evaluation metrics and the confidence intervals the report draws from them.

Everything here is pure numpy (and `math`) on plain arrays: the harness calls
`user_metrics` once per (method, user) and the report aggregates the resulting rows.

Conventions:
- Metrics are computed per user and then averaged over users, so every user weighs the
  same whatever the size of their query set. RMSE is sqrt(mean over users of the
  per-user MSE).
- Error metrics (MAE, MSE) use predictions clipped to the label range: a served score
  is clipped the same way, and an unclipped 7.3 on a 1..5 scale is not a useful error.
  Ranking metrics (nDCG, AUC) use the raw scores, since clipping would invent ties.
- Intervals are Student-t intervals on per-user values (paired differences when two
  methods are compared on the same users). The t quantile is computed here from the
  regularised incomplete beta function, so the package needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from training.dataset import LabelKind

Gain = Literal["exp", "linear"]


def clip(pred: np.ndarray, low: float, high: float) -> np.ndarray:
    """Predictions clipped to [low, high] (a new float64 array)."""
    if not low <= high:
        raise ValueError(f"clip range [{low}, {high}] is empty")
    return np.clip(np.asarray(pred, dtype=np.float64), low, high)


def _check_pair(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"pred has {pred.size} values, labels have {y.size}")
    if pred.size == 0:
        raise ValueError("a metric needs at least one prediction")
    if np.isnan(pred).any():
        raise ValueError("predictions contain NaN")
    return pred, y


def mae(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean absolute error."""
    pred, y = _check_pair(pred, y)
    return float(np.mean(np.abs(pred - y)))


def mse(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error."""
    pred, y = _check_pair(pred, y)
    return float(np.mean((pred - y) ** 2))


def rmse(pred: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared error."""
    return math.sqrt(mse(pred, y))


def _gains(y: np.ndarray, gain: Gain) -> np.ndarray:
    if gain == "exp":
        # 2^y - 1: for 0/1 clicks this is the label itself.
        return np.exp2(y) - 1.0
    if gain == "linear":
        return y.copy()
    raise ValueError(f"gain must be 'exp' or 'linear', got {gain!r}")


def ndcg_at_k(pred: np.ndarray, y: np.ndarray, k: int, gain: Gain = "exp") -> float:
    """Tie-aware nDCG@k of scores `pred` against labels `y` (log2 discount).

    Items with equal scores form a tied group; the DCG is the expected DCG over all
    orderings of each tied group (McSherry & Najork 2008), i.e. every position a group
    occupies gets the group's mean gain. This holds for a group straddling position k
    too: only its positions before the cut count, each with the mean gain. Without it a
    constant predictor (global mean) would score whatever the input order happens to be.

    The ideal DCG ranks the labels in descending order. When it is 0 (every gain is 0,
    e.g. a user with no clicks in the query) nDCG is undefined and NaN is returned; the
    aggregation skips NaN users for this metric. k larger than the query uses all items.
    """
    pred, y = _check_pair(pred, y)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gains = _gains(y, gain)
    n = pred.size
    discounts = 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))  # (n,)
    discounts[k:] = 0.0  # positions past the cut count for nothing

    ideal = float(np.sum(np.sort(gains)[::-1] * discounts))
    if ideal == 0.0:
        return float("nan")

    order = np.argsort(-pred, kind="stable")
    sorted_pred, sorted_gains = pred[order], gains[order]
    starts = np.flatnonzero(np.r_[True, sorted_pred[1:] != sorted_pred[:-1]])  # tied groups
    sizes = np.diff(np.r_[starts, n])
    group_mean_gain = np.add.reduceat(sorted_gains, starts) / sizes
    group_discount = np.add.reduceat(discounts, starts)
    return float(np.sum(group_mean_gain * group_discount) / ideal)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auc(pred: np.ndarray, clicks: np.ndarray) -> float:
    """ROC AUC: P(score of a random positive > score of a random negative), ties 1/2.

    Computed from average ranks (Mann–Whitney U). NaN when the labels have one class.
    """
    pred, clicks = _check_pair(pred, clicks)
    if not np.isin(clicks, (0.0, 1.0)).all():
        raise ValueError("auc needs 0/1 click labels")
    positive = clicks == 1.0
    n_pos = int(positive.sum())
    n_neg = clicks.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(pred)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def user_metrics(
    pred: np.ndarray,
    y: np.ndarray,
    label_kind: LabelKind,
    label_range: tuple[float, float],
    ks: Sequence[int] = (3, 5),
) -> dict[str, float]:
    """One user's metrics on their query set.

    Keys: "n" (query size), "ae" (mean absolute error), "se" (mean squared error), both
    on predictions clipped to `label_range`; f"ndcg@{k}" for each k (NaN when all gains
    are 0); and "auc" for click labels (NaN when the query has one class). For clicks
    the predictions are probabilities, so "se" is the Brier score.
    """
    pred, y = _check_pair(pred, y)
    if label_kind not in ("rating", "click"):
        raise ValueError(f"label kind must be 'rating' or 'click', got {label_kind!r}")
    low, high = label_range
    clipped = clip(pred, low, high)
    metrics: dict[str, float] = {
        "n": pred.size,
        "ae": mae(clipped, y),
        "se": mse(clipped, y),
    }
    for k in ks:
        metrics[f"ndcg@{k}"] = ndcg_at_k(pred, y, k)
    if label_kind == "click":
        metrics["auc"] = auc(pred, y)
    return metrics


# --- Student-t quantile -------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)),  # even step
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0)),  # odd step
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _regularised_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only below (a+1)/(a+b+2); use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0, T ~ Student t with df degrees of freedom."""
    return 0.5 * _regularised_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t distribution with df (> 0) degrees of freedom.

    Bisection on the upper tail, to about 1e-15 relative: a few dozen incomplete-beta
    evaluations, cheap next to anything that produced the data.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > tail:
        low, high = high, 2.0 * high
    while high - low > 1e-15 * high:
        mid = 0.5 * (low + high)
        if _t_upper_tail(mid, df) > tail:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# --- Confidence intervals -----------------------------------------------------------


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high) of finite values; low/high NaN below two values."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = values.size
    if n == 0:
        return (float("nan"),) * 3
    mean = float(np.mean(values))
    if n < 2:
        return mean, float("nan"), float("nan")
    t = student_t_quantile(0.5 + confidence / 2.0, n - 1)
    half_width = t * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, mean - half_width, mean + half_width


def _finite_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.size} and {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of per-user values, NaNs dropped."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return _t_interval(values[~np.isnan(values)], confidence)


def paired_difference_ci(
    a: np.ndarray, b: np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean difference, low, high) of paired per-user values a - b.

    Student-t interval with n - 1 degrees of freedom over the users where neither value
    is NaN. Pairing removes the user-to-user spread that both methods share, which is
    most of the variance.
    """
    a, b = _finite_pairs(a, b)
    return _t_interval(a - b, confidence)


def rmse_ci(se: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(RMSE, low, high) from per-user MSEs: the t interval of the mean MSE mapped by sqrt.

    sqrt is monotone, so this is exactly the MSE interval on the RMSE scale; a lower
    MSE bound below 0 maps to 0.
    """
    mean, low, high = mean_ci(se, confidence)
    low, high = np.sqrt(np.maximum([low, high], 0.0))  # np.maximum keeps NaN, max() would not
    return math.sqrt(mean), float(low), float(high)


def rmse_difference_ci(
    se_a: np.ndarray, se_b: np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(RMSE_a - RMSE_b, low, high) from paired per-user MSEs.

    RMSE = sqrt(mean MSE), and sqrt(A) - sqrt(B) = (A - B) / (sqrt(A) + sqrt(B)). The
    paired t interval [lo, hi] of the per-user MSE differences is mapped through that
    identity with the observed denominator: [lo, hi] / (RMSE_a + RMSE_b). The point
    estimate is exactly RMSE_a - RMSE_b, and the interval excludes 0 exactly when the
    MSE-difference interval does, so "resolved" means the same on both scales.
    """
    se_a, se_b = _finite_pairs(se_a, se_b)
    if se_a.size == 0:
        return (float("nan"),) * 3
    rmse_a, rmse_b = math.sqrt(float(np.mean(se_a))), math.sqrt(float(np.mean(se_b)))
    denominator = rmse_a + rmse_b
    if denominator == 0.0:
        # Both methods are exact on every user: no difference and no spread.
        return 0.0, 0.0, 0.0
    _, low, high = _t_interval(se_a - se_b, confidence)
    return rmse_a - rmse_b, low / denominator, high / denominator


def recall_at_n(ranked: Sequence[int] | np.ndarray, relevant: Sequence[int] | np.ndarray, n: int) -> float:
    """Hits of the first n ranked items among the relevant ones, over min(n, |relevant|)
    (so a user with fewer relevant items than n can reach 1)."""
    relevant_set = set(np.asarray(relevant).tolist())
    if not relevant_set:
        raise ValueError("recall needs at least one relevant item")
    hits = len(set(np.asarray(ranked)[:n].tolist()) & relevant_set)
    return hits / min(n, len(relevant_set))


def query_loss(pred: np.ndarray, y: np.ndarray, kind: LabelKind) -> float:
    """One user's mean query loss: squared error for ratings (pass predictions clipped to
    the label range), log loss for clicks (predictions are probabilities, kept off 0 and 1).
    The one definition validation, tuning and the job's sanity check all use."""
    pred, y = _check_pair(pred, y)
    if kind == "click":
        p = np.clip(pred, 1e-7, 1 - 1e-7)
        return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
    return float(np.mean((pred - y) ** 2))
