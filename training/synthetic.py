"""The embedded default dataset: users with latent tastes over item attributes.

Nothing to download, deterministic for a seed. The generative story is chosen so that
few-shot adaptation is worth doing: a user's bias and genre tastes are mostly individual
(their attributes shift them only a little), so a handful of the user's own ratings says
more about the rest than the user's attributes do.

    score(u, i) = quality_i + bias_u + taste_u . genres_i / sqrt(|genres_i|) + era_u[year_i]
    rating      = clip(round(mean + score + noise), 1, 5)        noise ~ N(0, noise_sd)
    click       ~ Bernoulli(sigmoid(click_scale * score + click_offset))

Which items a user rates is drawn without replacement with probability proportional to a
Zipf-like popularity times exp(selection * score): a few items are rated very often, and
users rate what they expect to like a little more often (as in real logs).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from training.dataset import AttributeField, AttributeTable, Dataset, LabelSpec

GENRES = (
    "action",
    "adventure",
    "animation",
    "comedy",
    "crime",
    "documentary",
    "drama",
    "fantasy",
    "horror",
    "romance",
    "sci-fi",
    "thriller",
)
# The bucket names training.data.year_bucket gives, so vocabularies look like MovieLens'.
YEAR_BUCKETS = (
    "1960s",
    "1970s",
    "1980s",
    "1990-1994",
    "1995-1999",
    "2000-2004",
    "2005-2009",
    "2010-2014",
    "2015-2019",
)
AGE_GROUPS = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
REGIONS = ("north", "south", "east", "west")

# The population prior. Standard deviations of the latent terms; the individual terms are
# several times the attribute-group shifts, so attributes explain little of a user.
RATING_MEAN = 3.4  # before selection, which lifts the observed mean to about 3.5
ITEM_QUALITY_SD = 0.35
USER_BIAS_SD = 0.4
USER_TASTE_SD = 0.6  # per genre
USER_ERA_SD = 0.2  # per year bucket: weaker than genre taste
GROUP_BIAS_SD = 0.08
GROUP_TASTE_SD = 0.12
GROUP_ERA_SD = 0.08
NOISE_SD = 0.9  # with rounding, the best achievable RMSE is about 0.85
POPULARITY_EXPONENT = 0.75  # Zipf exponent of exposure: top item rated by ~80% of users
SELECTION = 0.4  # how much expected enjoyment raises the chance of rating an item
CLICK_SCALE = 1.5
CLICK_OFFSET = -0.3
GENRES_PER_ITEM_P = (0.45, 0.35, 0.2)  # 1, 2 or 3 genres
# Interactions per user: min + lognormal(log(median extra), sigma), capped: median about 35.
INTERACTIONS_MEDIAN_EXTRA = 20.0
INTERACTIONS_SIGMA = 0.75
START_TIME_S = 1_420_070_400  # 2015-01-01, where every user's log may start
START_SPREAD_S = 3 * 365 * 86_400
MEAN_GAP_S = 2 * 86_400
USER_CHUNK = 2048  # users whose exposure keys are drawn at once: bounds memory


def generate_synthetic(
    seed: int = 0,
    n_users: int = 1200,
    n_items: int = 600,
    label: Literal["rating", "click"] = "rating",
    *,
    min_interactions: int = 15,
    max_interactions: int = 150,
) -> Dataset:
    """A seeded synthetic dataset named "synthetic" (same seed, same arrays bit for bit).

    Users have fields age_group and region; items have genres (1-3 of 12) and year.
    Each user has between min_interactions and max_interactions interactions (at most
    n_items), in increasing time order.
    """
    if n_users < 1 or n_items < 1:
        raise ValueError(f"need at least one user and one item, got n_users={n_users}, n_items={n_items}")
    if not 1 <= min_interactions <= max_interactions:
        raise ValueError(f"need 1 <= min_interactions <= max_interactions, got {min_interactions}, {max_interactions}")
    if label not in ("rating", "click"):
        raise ValueError(f"label must be 'rating' or 'click', got {label!r}")
    rng = np.random.default_rng(seed)

    item_genres, item_year, item_quality, item_log_pop = _items(rng, n_items)
    age, region, bias, taste, era = _users(rng, n_users)
    counts = _interaction_counts(rng, n_users, n_items, min_interactions, max_interactions)

    genre_weight = item_genres / np.sqrt(item_genres.sum(axis=1, keepdims=True))  # (I, G)
    user_rows, item_cols = _exposures(rng, counts, item_log_pop, bias, taste, era, genre_weight, item_year, item_quality)
    score = (
        bias[user_rows]
        + item_quality[item_cols]
        + np.einsum("ng,ng->n", taste[user_rows], genre_weight[item_cols])
        + era[user_rows, item_year[item_cols]]
    )  # (N,)
    timestamps = _timestamps(rng, counts)

    if label == "rating":
        noise = rng.normal(0.0, NOISE_SD, size=score.shape)
        labels = np.clip(np.rint(RATING_MEAN + score + noise), 1.0, 5.0)
        spec = LabelSpec("rating", 1.0, 5.0)
    else:
        p_click = 1.0 / (1.0 + np.exp(-(CLICK_SCALE * score + CLICK_OFFSET)))
        labels = (rng.random(score.shape) < p_click).astype(np.float64)
        spec = LabelSpec.click()

    user_names = _ids("u", n_users)
    item_names = _ids("i", n_items)
    users = AttributeTable(
        fields=[AttributeField("age_group"), AttributeField("region")],
        values={
            name: {"age_group": (AGE_GROUPS[a],), "region": (REGIONS[r],)}
            for name, a, r in zip(user_names, age.tolist(), region.tolist())
        },
    )
    items = AttributeTable(
        fields=[AttributeField("genres", multi_valued=True), AttributeField("year")],
        values={
            name: {
                "genres": tuple(GENRES[g] for g in np.flatnonzero(flags)),
                "year": (YEAR_BUCKETS[y],),
            }
            for name, flags, y in zip(item_names, item_genres, item_year.tolist())
        },
    )
    # Ids are zero-padded, so sorting the integer codes sorts the ids: the factorisation
    # Dataset.factorized() would compute costs nothing here.
    user_distinct, user_codes = np.unique(user_rows, return_inverse=True)
    item_distinct, item_codes = np.unique(item_cols, return_inverse=True)
    return Dataset(
        name="synthetic",
        label=spec,
        user_ids=user_names[user_rows],
        item_ids=item_names[item_cols],
        labels=labels.astype(np.float64),
        timestamps=timestamps,
        users=users,
        items=items,
        _codes={"user_ids": (user_names[user_distinct], user_codes), "item_ids": (item_names[item_distinct], item_codes)},
    )


def _items(rng: np.random.Generator, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Genre flags (I, G), year bucket (I,), quality (I,) and log popularity (I,)."""
    genre_p = rng.dirichlet(np.full(len(GENRES), 3.0))  # some genres are more common
    n_genres = rng.choice(len(GENRES_PER_ITEM_P), size=n_items, p=GENRES_PER_ITEM_P) + 1
    # Gumbel top-k draws each item's genres without replacement, weighted by genre_p.
    keys = np.log(genre_p) + rng.gumbel(size=(n_items, len(GENRES)))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    item_genres = (rank < n_genres[:, None]).astype(np.float64)
    # Recent years hold more films, as in MovieLens.
    year_weight = np.linspace(1.0, 4.0, len(YEAR_BUCKETS)) ** 1.5
    item_year = rng.choice(len(YEAR_BUCKETS), size=n_items, p=year_weight / year_weight.sum())
    item_quality = rng.normal(0.0, ITEM_QUALITY_SD, size=n_items)
    popularity_rank = rng.permutation(n_items)
    item_log_pop = -POPULARITY_EXPONENT * np.log1p(popularity_rank)
    return item_genres, item_year, item_quality, item_log_pop


def _users(rng: np.random.Generator, n_users: int) -> tuple[np.ndarray, ...]:
    """Attributes (age group, region) and latent bias (U,), taste (U, G), era (U, Y)."""
    n_genres, n_years = len(GENRES), len(YEAR_BUCKETS)
    age = rng.choice(len(AGE_GROUPS), size=n_users, p=[0.05, 0.2, 0.33, 0.2, 0.09, 0.08, 0.05])
    region = rng.integers(len(REGIONS), size=n_users)
    # Attribute groups shift the prior a little: this is all a non-adapting model can use.
    age_bias = rng.normal(0.0, GROUP_BIAS_SD, size=len(AGE_GROUPS))
    age_taste = rng.normal(0.0, GROUP_TASTE_SD, size=(len(AGE_GROUPS), n_genres))
    region_taste = rng.normal(0.0, GROUP_TASTE_SD, size=(len(REGIONS), n_genres))
    # Older groups lean towards older films.
    age_trend = np.linspace(-1.0, 1.0, len(AGE_GROUPS))[:, None] * np.linspace(1.0, -1.0, n_years)[None, :]
    age_era = GROUP_ERA_SD * age_trend + rng.normal(0.0, GROUP_ERA_SD / 2, size=(len(AGE_GROUPS), n_years))

    bias = age_bias[age] + rng.normal(0.0, USER_BIAS_SD, size=n_users)
    taste = age_taste[age] + region_taste[region] + rng.normal(0.0, USER_TASTE_SD, size=(n_users, n_genres))
    era = age_era[age] + rng.normal(0.0, USER_ERA_SD, size=(n_users, n_years))
    return age, region, bias, taste, era


def _interaction_counts(
    rng: np.random.Generator, n_users: int, n_items: int, min_interactions: int, max_interactions: int
) -> np.ndarray:
    """Heavy-tailed interactions per user: most near 30-40, a few up to the maximum."""
    extra = rng.lognormal(np.log(INTERACTIONS_MEDIAN_EXTRA), INTERACTIONS_SIGMA, size=n_users)
    counts = np.clip(min_interactions + np.floor(extra).astype(np.int64), min_interactions, max_interactions)
    return np.minimum(counts, n_items)


def _exposures(
    rng: np.random.Generator,
    counts: np.ndarray,
    item_log_pop: np.ndarray,
    bias: np.ndarray,
    taste: np.ndarray,
    era: np.ndarray,
    genre_weight: np.ndarray,
    item_year: np.ndarray,
    item_quality: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(user row, item column) of every interaction: user-major, in the user's time order.

    Each user's items are a draw without replacement (Gumbel top-k) with weights
    popularity * exp(SELECTION * expected score); their order in time is random, so early
    and late interactions are exchangeable apart from the user's latent tastes.
    """
    n_users, n_items = len(counts), len(item_log_pop)
    users_out, items_out = [], []
    for start in range(0, n_users, USER_CHUNK):
        stop = min(start + USER_CHUNK, n_users)
        expected = (
            bias[start:stop, None]
            + item_quality[None, :]
            + taste[start:stop] @ genre_weight.T
            + era[start:stop][:, item_year]
        )  # (u, I)
        keys = item_log_pop[None, :] + SELECTION * expected + rng.gumbel(size=(stop - start, n_items))
        time_keys = rng.random(size=keys.shape)
        k = counts[start:stop]  # (u,)
        top = int(k.max())
        # The top-k of each row in descending key order: what a full argsort's first k
        # columns hold (keys are continuous, so no ties), at the cost of a partition.
        if top < n_items:
            candidates = np.argpartition(-keys, top - 1, axis=1)[:, :top]  # (u, top), unordered
        else:
            candidates = np.broadcast_to(np.arange(n_items), keys.shape)
        ranked = np.take_along_axis(candidates, np.argsort(-np.take_along_axis(keys, candidates, axis=1), axis=1), axis=1)
        # Each user's first k picks, reordered by the time keys drawn for sampling positions 0..k-1.
        position = np.arange(top)[None, :]
        order = np.argsort(np.where(position < k[:, None], time_keys[:, :top], np.inf), axis=1)
        in_time = np.take_along_axis(ranked, order, axis=1)
        items_out.append(in_time[position < k[:, None]])  # row-major: user-major, time order
        users_out.append(np.repeat(np.arange(start, stop, dtype=np.int64), k))
    return np.concatenate(users_out), np.concatenate(items_out)


def _timestamps(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """Per-user strictly increasing timestamps (seconds), users starting at different times."""
    starts = START_TIME_S + rng.integers(0, START_SPREAD_S, size=len(counts))
    gaps = 1 + np.floor(rng.exponential(MEAN_GAP_S, size=int(counts.sum()))).astype(np.int64)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # Restart the running sum at each user's first interaction.
    gaps[first] = 0
    running = np.cumsum(gaps)
    offsets = running - np.repeat(running[first], counts)
    return np.repeat(starts, counts) + offsets


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(4, len(str(n - 1)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)
