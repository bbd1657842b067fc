"""The item side the bias_factor model starts from: shrunk biases, ALS factors and the
attribute prior that new items fall back on."""

from __future__ import annotations

import numpy as np
import torch

from training import model as M
from training.baselines import ItemStats
from training.batching import EncodedCatalog
from training.dataset import AttributeField, AttributeTable, Dataset, LabelSpec
from training.features import build_schema
from training.initialisation import item_side, with_attribute_prior


def genre_dataset() -> Dataset:
    """Comedies are liked (5 by half the users, 4 by the others), dramas disliked (1 and 2):
    genre deviations of +-1.5 around the mean 3, and a taste the factors can pick up. Two
    more items of each genre are never rated."""
    items = {f"c{i}": {"genres": ("comedy",)} for i in range(6)} | {f"d{i}": {"genres": ("drama",)} for i in range(6)}
    def rating(user: int, kind: str) -> float:
        return {"c": 5.0 if user < 4 else 4.0, "d": 1.0 if user < 4 else 2.0}[kind]

    rows = [(f"u{u}", f"{kind}{i}", rating(u, kind)) for u in range(8) for kind in "cd" for i in range(4)]
    users, item_ids, labels = zip(*rows)
    return Dataset(
        name="genres",
        label=LabelSpec("rating", 1.0, 5.0),
        user_ids=np.array(users, dtype=object),
        item_ids=np.array(item_ids, dtype=object),
        labels=np.array(labels),
        timestamps=np.arange(len(rows), dtype=np.int64),
        users=AttributeTable(),
        items=AttributeTable([AttributeField("genres", multi_valued=True)], items),
    )


def item_biases(dataset: Dataset, prior: str) -> dict[str, float]:
    schema = build_schema(dataset, np.unique(dataset.item_ids))
    catalog = EncodedCatalog(schema, dataset)
    config = M.ModelConfig(factors=2, attribute_prior=prior)  # type: ignore[arg-type]
    stats, _ = item_side(dataset, dataset, schema, catalog, item_shrinkage=2.0, user_shrinkage=5.0, config=config)
    if prior == "on":
        stats = with_attribute_prior(stats, schema, catalog, ItemStats.of(dataset), 2.0, l2=0.1)
    params = M.init_params(config, schema, stats)
    ids = catalog.item_ids
    b, _ = M.item_repr(config, schema, params, catalog.codes[: len(ids)])
    return dict(zip(ids, b.tolist()))


def test_new_items_fall_back_on_their_attributes_only_with_the_prior():
    dataset = genre_dataset()
    with_prior, without = item_biases(dataset, "on"), item_biases(dataset, "off")
    # Unrated items (c4, c5, d4, d5) are new: the prior gives them their genre's deviation.
    assert with_prior["c5"] > 1.0 and with_prior["d5"] < -1.0
    assert without["c5"] == 0.0 and without["d5"] == 0.0
    # Known items keep their own evidence either way (+1.5 and -1.5, shrunk a little).
    for biases in (with_prior, without):
        assert 1.0 < biases["c0"] <= 1.5 + 1e-6 and -1.5 - 1e-6 <= biases["d0"] < -1.0
    # With the prior, a known item shrinks toward its genre, not toward the mean.
    assert with_prior["c0"] > without["c0"]


def test_the_attribute_prior_keeps_id_factors_plus_attribute_factors_equal_to_als():
    dataset = genre_dataset()
    schema = build_schema(dataset, np.unique(dataset.item_ids))
    catalog = EncodedCatalog(schema, dataset)
    config = M.ModelConfig(factors=2, als_l2=0.1)  # a weak ridge: the taste structure is small
    stats, _ = item_side(dataset, dataset, schema, catalog, 2.0, 5.0, config)
    prior = with_attribute_prior(stats, schema, catalog, ItemStats.of(dataset), 2.0, l2=0.1)
    codes = catalog.codes[:12]
    prior_q = M.item_repr(config, schema, M.init_params(config, schema, prior), codes)[1]
    known = [i for i, item in enumerate(catalog.item_ids) if item[1] in "0123"]
    als = stats.item_factors[codes[:, schema.item_id_field.offset]]  # what ALS fitted per known item
    torch.testing.assert_close(prior_q[known], als[known], atol=1e-5, rtol=0)
    assert als[known].abs().max() > 1e-3  # there is something to preserve


def test_the_engagement_start_survives_the_attribute_prior_and_its_tuning():
    """The engagement head's popularity + SVD start rides through every rebuild of the item
    side (the attribute prior, and the validation users' choice among its weights)."""
    from training.initialisation import engagement_side

    dataset = genre_dataset()
    schema = build_schema(dataset, np.unique(dataset.item_ids))
    catalog = EncodedCatalog(schema, dataset)
    config = M.ModelConfig(factors=2, engagement_factors=3)
    stats, _ = item_side(dataset, dataset, schema, catalog, 2.0, 5.0, config)
    stats.engagement_start, _ = engagement_side(dataset, schema, 3, seed=0)
    prior = with_attribute_prior(stats, schema, catalog, ItemStats.of(dataset), 2.0, l2=0.1)
    assert prior.engagement_start is stats.engagement_start
    table = M.init_params(config, schema, prior)["eng.item.id"]
    torch.testing.assert_close(table, stats.engagement_start)
    assert table[2:, 1:].abs().max() > 0.1  # SVD factors, not zeros
