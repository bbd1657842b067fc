"""Adapt, then score against the item table: the same numbers (1e-5) and the same ranking
as the fused graph it replaces, on both engines; artifacts without a table still serve."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.engines import CudaGraphEngine, EngineConfig, sample_inputs
from service.padding import Ranking, UserInputs
from service.repository import ModelSettings, load_model
from tests.service.harness import without_item_table, writable_copy
from tests.service.test_core import run_core, user
from service.domain import ItemList, RecommendQuery, ScoreQuery

SETTINGS = ModelSettings(EngineConfig(), max_interactions=8, max_candidates=64, warmup_batch_size=4)
NONE = np.zeros(0, dtype=np.int64)


@pytest.fixture(scope="module")
def fused_copy(tiny_artifact: Path, tmp_path_factory) -> Path:
    copy = writable_copy(tiny_artifact, tmp_path_factory.mktemp("fused") / "tiny" / "1")
    without_item_table(copy)
    return copy


@pytest.fixture(scope="module")
def fused(fused_copy: Path):
    """The tiny artifact without its table: every request through the fused graph."""
    return load_model(fused_copy, SETTINGS)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def table(tiny_artifact: Path, request):
    return load_model(tiny_artifact, replace(SETTINGS, engine=EngineConfig(kind=request.param, device="cpu")))


def random_users(model, n: int, seed: int, rankings) -> tuple[list[UserInputs], list[UserInputs]]:
    """The same users twice: with the query as item-table rows (or the whole catalog), and
    as encoded rows for the fused graph."""
    rng = np.random.default_rng(seed)
    catalog = model.artifact.catalog
    batch = sample_inputs(model.artifact, n, 6, 1, rng)
    by_rows, by_codes = [], []
    for i in range(n):
        support = int(batch.support_mask[i].sum())
        rows = None if i % 2 == 0 else rng.choice(catalog.size, size=int(rng.integers(1, 40)), replace=False)
        ranking = rankings[i % len(rankings)]
        if ranking is not None and ranking.excluded is None:
            size = catalog.size if rows is None else len(rows)
            ranking = replace(ranking, excluded=rng.choice(size, size=min(3, size - 1), replace=False))
        args = (batch.user_features[i], batch.support_items[i, :support], batch.support_labels[i, :support])
        by_rows.append(UserInputs(*args, query_rows=rows, ranking=ranking))
        by_codes.append(UserInputs(*args, query_items=catalog.codes[np.arange(catalog.size) if rows is None else rows], ranking=ranking))
    return by_rows, by_codes


RANKINGS = (
    Ranking(5, True, NONE),
    Ranking(0, False, NONE),
    Ranking(7, True, None),  # None: random exclusions filled in by random_users
    Ranking(3, False, None),
    None,  # Score: every item, in query order
)


def run_fused(model, users: list[UserInputs]):
    support = model.buckets.support_length(max(u.support_size for u in users))
    outputs = []
    for u in users:  # one call per query length: the fused graph pads the query
        outputs.extend(model.run_users([u], support, model.buckets.query_length(u.query_size)))
    return outputs


@pytest.mark.parametrize("seed", [0, 1])
def test_table_scores_equal_the_fused_graph(table, fused, seed):
    by_rows, by_codes = random_users(table, 10, seed, RANKINGS)
    support = table.buckets.support_length(max(u.support_size for u in by_rows))
    served = table.run_users(by_rows, support, 0)
    for got, want, u in zip(served, run_fused(fused, by_codes), by_rows):
        if u.ranking is None:
            assert got.order is None and want.order is None
        else:
            assert got.order.tolist() == want.order.tolist()
            assert not set(got.order.tolist()) & set(u.ranking.excluded.tolist())
        np.testing.assert_allclose(got.query_scores, want.query_scores, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.query_engagement, want.query_engagement, atol=1e-5, rtol=0)
        assert got.support_loss_before == pytest.approx(want.support_loss_before, abs=1e-5)
        assert got.support_loss_after == pytest.approx(want.support_loss_after, abs=1e-5)


def test_static_buckets_adapt_like_the_fused_graph(tiny_artifact, fused):
    """The CUDA-graph engine's adapt buckets (on CPU: static buffers, eager replays),
    split across batch buckets, scored on its device by the torch scorer."""
    from service.artifact import load_artifact
    from service.repository import LoadedModel

    artifact = load_artifact(tiny_artifact)
    engine = CudaGraphEngine(artifact, EngineConfig(kind="torch", max_graph_batch=4), device="cpu")
    model = LoadedModel(artifact, engine, fused.buckets, 0.0)
    by_rows, by_codes = random_users(model, 7, 3, RANKINGS)  # 7 users: buckets 4 + 4
    served = model.run_users(by_rows, 8, 0)
    for got, want in zip(served, run_fused(fused, by_codes)):
        np.testing.assert_allclose(got.query_scores, want.query_scores, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.query_engagement, want.query_engagement, atol=1e-5, rtol=0)
    assert {key.query for key in engine.graphs.keys()} == {0}  # only adapt buckets were built


def test_an_artifact_without_an_item_table_serves_through_the_fused_graph(fused, tiny_artifact, item_ids):
    assert fused.artifact.item_table is None and not fused.scores_from_table
    assert fused.buckets.query[-1] >= fused.artifact.catalog.size  # the whole catalog is a fused query
    current = load_model(tiny_artifact, SETTINGS)
    assert current.scores_from_table and current.buckets.query[-1] == 64  # inline candidates only
    query = RecommendQuery(user(item_ids[:3], [5.0, 1.0, 4.0]), top_k=10, exclude_interacted=True)
    old, new = run_core(fused, lambda core: core.recommend(query)), run_core(current, lambda core: core.recommend(query))
    assert list(old.item_ids) == list(new.item_ids) and not set(old.item_ids) & set(item_ids[:3])
    np.testing.assert_allclose(old.scores, new.scores, atol=1e-5)
    np.testing.assert_allclose(old.engagement, new.engagement, atol=1e-5)


def test_inline_candidates_take_the_fused_graph(tiny_artifact, item_ids):
    """A candidate the catalog does not know is encoded from its attributes: the request
    goes through the fused graph, and the catalog candidates beside it score as from the table."""
    model = load_model(tiny_artifact, SETTINGS)
    item_field = next(f for f in model.artifact.encoder.item_fields if f.name != "item_id")
    attributes = {"new-item": {item_field.name: item_field.vocabulary[0]}}
    candidates = ItemList.of([*item_ids[:5], "new-item"], attributes, field="candidates")
    history = user(item_ids[5:8], [4.0, 2.0, 5.0])
    mixed = run_core(model, lambda core: core.score(ScoreQuery(history, candidates)))
    known = run_core(model, lambda core: core.score(ScoreQuery(history, ItemList(item_ids[:5]))))
    assert [u.item_id for u in mixed.adaptation.unknown_items] == ["new-item"]
    np.testing.assert_allclose(mixed.scores[:5], known.scores, atol=1e-5)
    np.testing.assert_allclose(mixed.engagement[:5], known.engagement, atol=1e-5)


def random_table(n: int, d: int, e: int, rng: np.random.Generator):
    from warmstart.contract import ItemTable

    return ItemTable(
        3.5,
        rng.standard_normal(n).astype(np.float32),
        rng.standard_normal((n, d)).astype(np.float32),
        rng.standard_normal(n).astype(np.float32),
        rng.standard_normal((n, e)).astype(np.float32),
        0.7,
    )


def test_scorers_follow_the_contract_formulas():
    """Both scorers on a random table (5000 rows: the partition path) against the
    contract's reference formulas, row by row: ranked lists, exclusions, Score order."""
    from service.padding import AdaptOutputs
    from service.scoring import LabelUnits, NumpyScorer, TorchScorer
    from warmstart import contract as C

    rng = np.random.default_rng(1)
    n, d, e, b = 5000, 4, 6, 8
    table = random_table(n, d, e, rng)
    units = LabelUnits("rating", 1.0, 5.0)
    adapted = AdaptOutputs(
        rng.standard_normal(b).astype(np.float32),
        rng.standard_normal((b, d)).astype(np.float32),
        rng.standard_normal((b, e)).astype(np.float32),
        np.ones(b, dtype=np.float32),
        np.zeros(b, dtype=np.float32),
    )
    empty = (np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32))
    some_rows = rng.choice(n, size=300, replace=False)
    excluded = rng.choice(n, size=50, replace=False)
    users = [
        UserInputs(*empty, ranking=Ranking(10, True, excluded)),
        UserInputs(*empty, ranking=Ranking(10, False, NONE)),
        UserInputs(*empty, ranking=Ranking(10, True, NONE)),
        UserInputs(*empty, query_rows=some_rows, ranking=Ranking(20, True, np.arange(0, 300, 7))),
        UserInputs(*empty, query_rows=some_rows),
        UserInputs(*empty, query_rows=some_rows[:5], ranking=Ranking(0, False, NONE)),
        # Two users of 3000 rows each read more than the table holds: the whole-catalog product, then gathered.
        UserInputs(*empty, query_rows=rng.choice(n, size=3000, replace=False)),
        UserInputs(*empty, query_rows=rng.choice(n, size=3000, replace=False)),
    ]
    import torch

    for scorer in (NumpyScorer(table, units), TorchScorer(table, units, torch.device("cpu"))):
        outputs = scorer.score(users, adapted)
        for i, (u, out) in enumerate(zip(users, outputs)):
            rows = np.arange(n) if u.query_rows is None else u.query_rows
            rating = C.to_label_units(C.rating_scores(table, adapted.user_bias[i], adapted.user_factors[i], rows), "rating", 1.0, 5.0)
            engagement = C.engagement_scores(table, adapted.user_engagement[i], rows)
            if u.ranking is None:
                assert out.order is None
                expected = np.arange(len(rows))
            else:
                key = engagement if u.ranking.by_engagement else rating
                masked = key.copy()
                masked[u.ranking.excluded] = -np.inf
                k = u.ranking.top_k or len(rows) - len(u.ranking.excluded)
                expected = np.argsort(-masked, kind="stable")[:k]
                assert out.order.tolist() == expected.tolist()
            np.testing.assert_allclose(out.query_scores, rating[expected], atol=1e-5, rtol=0)
            np.testing.assert_allclose(out.query_engagement, engagement[expected], atol=1e-5, rtol=0)
