"""The synthetic generator: deterministic, realistic in shape, and worth adapting to."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from training.dataset import Dataset, LabelSpec
from training.synthetic import GENRES, generate_synthetic


@pytest.fixture(scope="module")
def ratings() -> Dataset:
    return generate_synthetic(seed=0)


def test_same_seed_gives_the_same_arrays_bit_for_bit() -> None:
    a, b = generate_synthetic(seed=7, n_users=300, n_items=200), generate_synthetic(seed=7, n_users=300, n_items=200)
    assert a.fingerprint() == b.fingerprint()
    for column in ("user_ids", "item_ids", "labels", "timestamps"):
        assert np.array_equal(getattr(a, column), getattr(b, column))
    assert a.labels.tobytes() == b.labels.tobytes()
    assert a.users.values == b.users.values and a.items.values == b.items.values


def test_different_seeds_give_different_data() -> None:
    a, b = generate_synthetic(seed=1, n_users=300, n_items=200), generate_synthetic(seed=2, n_users=300, n_items=200)
    assert a.fingerprint() != b.fingerprint()
    assert a.items.values != b.items.values


def test_schema_and_tables(ratings: Dataset) -> None:
    assert ratings.name == "synthetic"
    assert ratings.label == LabelSpec("rating", 1.0, 5.0)
    assert ratings.labels.dtype == np.float64 and ratings.timestamps.dtype == np.int64
    assert ratings.users.field_names() == ["age_group", "region"]
    assert [(f.name, f.multi_valued) for f in ratings.items.fields] == [("genres", True), ("year", False)]
    assert len(ratings.users.values) == 1200 and len(ratings.items.values) == 600
    assert set(ratings.user_ids) <= set(ratings.users.values)
    assert set(ratings.item_ids) <= set(ratings.items.values)
    genre_counts = [len(v["genres"]) for v in ratings.items.values.values()]
    assert min(genre_counts) == 1 and max(genre_counts) == 3
    assert {g for v in ratings.items.values.values() for g in v["genres"]} == set(GENRES)
    assert all(len(v["year"]) == 1 for v in ratings.items.values.values())


def test_ratings_are_in_range_with_a_realistic_spread(ratings: Dataset) -> None:
    assert set(np.unique(ratings.labels)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 3.2 < ratings.labels.mean() < 3.8
    assert 0.9 < ratings.labels.std() < 1.3  # MovieLens 100K: 1.13
    shares = np.bincount(ratings.labels.astype(int), minlength=6)[1:] / len(ratings)
    assert shares[0] < shares[2] and shares[0] < shares[3]  # 1 star is the rarest kind of vote


def test_interactions_per_user_are_heavy_tailed(ratings: Dataset) -> None:
    _, per_user = np.unique(ratings.user_ids, return_counts=True)
    assert per_user.min() >= 15 and per_user.max() <= 150
    assert 28 <= np.median(per_user) <= 42
    assert np.percentile(per_user, 99) > 2.5 * np.median(per_user)


def test_exposure_is_skewed_towards_popular_items(ratings: Dataset) -> None:
    _, per_item = np.unique(ratings.item_ids, return_counts=True)
    per_item = np.sort(per_item)[::-1]
    top_tenth = per_item[: len(ratings.items.values) // 10].sum() / per_item.sum()
    assert top_tenth > 0.3  # uniform exposure would give 0.1


def test_timestamps_increase_within_each_user(ratings: Dataset) -> None:
    # Rows are user-major in time order, so within a user each timestamp exceeds the last.
    same_user = ratings.user_ids[1:] == ratings.user_ids[:-1]
    assert np.all(np.diff(ratings.timestamps)[same_user] > 0)
    assert len(set(zip(ratings.user_ids, ratings.item_ids))) == len(ratings)  # no repeats


def test_clicks_are_binary_and_follow_the_same_exposures() -> None:
    clicks = generate_synthetic(seed=0, n_users=300, n_items=200, label="click")
    assert clicks.label == LabelSpec.click()
    assert set(np.unique(clicks.labels)) == {0.0, 1.0}
    assert 0.3 < clicks.labels.mean() < 0.7


def test_small_catalogues_cap_interactions_at_the_item_count() -> None:
    data = generate_synthetic(seed=0, n_users=10, n_items=12)
    _, per_user = np.unique(data.user_ids, return_counts=True)
    assert per_user.max() <= 12 and len(data.items.values) == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_users": 0},
        {"n_items": 0},
        {"label": "stars"},
        {"min_interactions": 0},
        {"min_interactions": 20, "max_interactions": 10},
    ],
)
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_synthetic(**kwargs)


def test_a_users_own_ratings_beat_their_attributes(ratings: Dataset) -> None:
    """The point of the generator: adapting to a few ratings must beat not adapting.

    Item biases come from 80% of the users. For the others, the first 10 ratings (in time)
    are the support set and the rest the query set; a user bias fitted on the support must
    predict the query better than the item-bias model alone, and better than one shifted
    by the bias of the user's attribute group.
    """
    rng = np.random.default_rng(0)
    users = np.unique(ratings.user_ids)
    test_users = set(rng.choice(users, size=len(users) // 5, replace=False).tolist())
    is_test = np.array([u in test_users for u in ratings.user_ids])
    train = ~is_test
    mean = ratings.labels[train].mean()

    item_sum: dict[str, float] = defaultdict(float)
    item_n: dict[str, int] = defaultdict(int)
    for item, label in zip(ratings.item_ids[train], ratings.labels[train]):
        item_sum[item] += label - mean
        item_n[item] += 1
    item_bias = {item: item_sum[item] / (item_n[item] + 5) for item in item_sum}  # shrunk towards 0

    def group(user: str) -> tuple[str, ...]:
        attributes = ratings.users.get(user)
        return attributes["age_group"] + attributes["region"]

    group_sum: dict[tuple[str, ...], float] = defaultdict(float)
    group_n: dict[tuple[str, ...], int] = defaultdict(int)
    for user, item, label in zip(ratings.user_ids[train], ratings.item_ids[train], ratings.labels[train]):
        group_sum[group(user)] += label - mean - item_bias.get(item, 0.0)
        group_n[group(user)] += 1

    errors: dict[str, list[float]] = {"items": [], "attributes": [], "adapted": []}
    for user in sorted(test_users):
        rows = np.flatnonzero(ratings.user_ids == user)
        rows = rows[np.argsort(ratings.timestamps[rows], kind="stable")]
        support, query = rows[:10], rows[10:]
        residuals = [ratings.labels[r] - mean - item_bias.get(ratings.item_ids[r], 0.0) for r in support]
        user_bias = sum(residuals) / (len(residuals) + 3)
        group_bias = group_sum[group(user)] / (group_n[group(user)] + 10)
        for r in query:
            base = mean + item_bias.get(ratings.item_ids[r], 0.0)
            errors["items"].append(ratings.labels[r] - base)
            errors["attributes"].append(ratings.labels[r] - base - group_bias)
            errors["adapted"].append(ratings.labels[r] - base - user_bias)
    rmse = {name: float(np.sqrt(np.mean(np.square(e)))) for name, e in errors.items()}

    assert rmse["adapted"] < rmse["items"] - 0.02, rmse
    assert rmse["adapted"] < rmse["attributes"] - 0.02, rmse
