"""Simulated onboarding (training.onboarding_eval) on the tiny synthetic model: nested,
paired, scored on what the user did not answer."""

from __future__ import annotations

import numpy as np
import pytest

from training.batching import EncodedCatalog
from training.export import load_exported_model
from training.onboarding_eval import onboarding_table, parse_onboarding_sizes, simulate_onboarding, summary
from training.splits import Protocol, make_splits
from training.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def simulated(tiny_artifact):
    dataset = generate_synthetic(seed=3, n_users=240, n_items=150)  # the tiny artifact's data
    model = load_exported_model(tiny_artifact)
    catalog = EncodedCatalog(model.schema, dataset)
    split = make_splits(dataset, Protocol(folds=5, seed=0))[0]
    rows = simulate_onboarding(dataset, [split], lambda context: (model, catalog), sizes=(3, 5))
    return dataset, split, rows


def test_every_strategy_scores_the_same_users_at_every_k(simulated):
    _, split, rows = simulated
    keys = {}
    for r in rows:
        keys.setdefault((r["protocol"], r["strategy"], r["asked"]), set()).add(r["user"])
    users = next(iter(keys.values()))
    assert set(keys) == {(p, s, k) for p in ("held_out", "remaining") for s in ("random", "popular", "melu", "dopt") for k in (3, 5)}
    assert all(v == users for v in keys.values()) and users <= set(split.test_users) and len(users) > 10
    for r in rows:
        assert 0.0 <= r["recall@20"] <= 1.0 and r["se"] >= 0.0 and np.isfinite(r["ndcg@20"])


def test_scored_items_are_what_was_not_asked_or_the_held_out_ones(simulated):
    dataset, split, rows = simulated
    n_rated = {}
    for user, item in zip(dataset.user_ids.tolist(), dataset.item_ids.tolist()):
        n_rated.setdefault(user, set()).add(item)
    for r in rows:
        expected = len(n_rated[r["user"]]) - r["asked"] if r["protocol"] == "remaining" else split.protocol.query_size
        assert r["n_scored"] == expected


def test_the_table_pairs_against_popular(simulated):
    _, _, rows = simulated
    table = onboarding_table([r for r in rows if r["protocol"] == "held_out"])
    assert table.count("\n") == 1 + 2 * 4  # header, rule, 2 K x 4 strategies
    with pytest.raises(ValueError, match="one table per protocol"):
        onboarding_table(rows)
    records = summary(rows)
    popular = [r for r in records if r["strategy"] == "popular"]
    others = [r for r in records if r["strategy"] != "popular"]
    assert all("rmse_minus_reference" not in r for r in popular)
    for r in others:
        mean, low, high = r["rmse_minus_reference"]
        assert low <= mean <= high
        base = next(p for p in popular if p["asked"] == r["asked"] and p["protocol"] == r["protocol"])
        assert mean == pytest.approx(r["rmse"][0] - base["rmse"][0])


def test_parse_sizes():
    assert parse_onboarding_sizes("10,3,5") == (3, 5, 10)
    for bad in ("0", "3,3", "x"):
        with pytest.raises(ValueError):
            parse_onboarding_sizes(bad)
