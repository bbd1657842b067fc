"""The data plane on domain objects: label policies, unknown-value policy, ranking."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.batcher import BatcherConfig, DynamicBatcher
from service.core import RecommenderCore, RequestLimits
from service.scoring import top_k
from service.domain import Interactions, ItemList, RecommendQuery, ScoreQuery, UserContext
from service.engines import EngineConfig
from service.errors import InvalidArgument, NotReady
from service.metrics import Metrics
from service.repository import ModelSettings, load_model
from tests.service.harness import edit_manifest, without_item_table, writable_copy

SETTINGS = ModelSettings(EngineConfig(), max_interactions=8, max_candidates=32, warmup_batch_size=4)


def run_core(model, call, limits: RequestLimits = RequestLimits(max_interactions=8, max_candidates=32)):
    async def main():
        metrics = Metrics()
        batcher = DynamicBatcher(BatcherConfig(), metrics)
        batcher.start()
        try:
            return await call(RecommenderCore(lambda: model, batcher, limits, metrics))
        finally:
            await batcher.close()

    return asyncio.run(main())


def user(item_ids, labels, attributes=None) -> UserContext:
    return UserContext(
        user_attributes=attributes or {},
        interactions=Interactions(ItemList(item_ids), list(labels), [0] * len(labels)),
    )


@pytest.fixture(scope="module")
def model(tiny_artifact: Path):
    return load_model(tiny_artifact, SETTINGS)


@pytest.fixture(scope="module")
def click_model(tiny_artifact: Path, tmp_path_factory):
    """The tiny artifact relabelled as a click model (the manifest is not checksummed)."""
    copy = writable_copy(tiny_artifact, tmp_path_factory.mktemp("click") / "tiny" / "1")
    edit_manifest(copy, lambda m: m.update(label={"kind": "CLICK", "min_value": 0.0, "max_value": 1.0}))
    return load_model(copy, SETTINGS)


def test_click_labels_must_be_zero_or_one(click_model, item_ids):
    query = ScoreQuery(user(item_ids[:3], [1.0, 0.5, 0.0]), ItemList(item_ids[3:5]))
    with pytest.raises(InvalidArgument) as refused:
        run_core(click_model, lambda core: core.score(query))
    assert [v.field for v in refused.value.violations] == ["interactions[1].label"]
    assert "0 or 1" in refused.value.violations[0].description
    fine = ScoreQuery(user(item_ids[:3], [1.0, 0.0, 1.0]), ItemList(item_ids[3:5]))
    assert len(run_core(click_model, lambda core: core.score(fine)).item_ids) == 2


def test_unknown_values_map_to_oov_when_allowed(model, item_ids):
    query = ScoreQuery(user(item_ids[:2], [4.0, 2.0], {"region": "atlantis"}), ItemList(item_ids[2:6]))
    with pytest.raises(InvalidArgument):
        run_core(model, lambda core: core.score(query))
    allowed = RequestLimits(max_interactions=8, max_candidates=32, allow_unknown_values=True)
    assert len(run_core(model, lambda core: core.score(query), allowed).item_ids) == 4


def test_new_items_need_attributes(model, item_ids):
    candidates = ItemList.of(["new-a", item_ids[0]], {"new-a": {"genres": "drama|horror", "year": "1980s"}})
    result = run_core(model, lambda core: core.recommend(RecommendQuery(user([], []), candidates)))
    assert set(result.item_ids) == {"new-a", item_ids[0]}
    assert [(u.item_id, u.role) for u in result.adaptation.unknown_items] == [("new-a", "candidate")]


def test_empty_candidates_need_a_catalog(tiny_artifact: Path, tmp_path: Path, item_ids):
    copy = writable_copy(tiny_artifact, tmp_path / "tiny" / "1")
    without_item_table(copy)  # the item table has a row per catalog item: none without a catalog
    edit_manifest(copy, lambda m: m.update(catalog={"ids_file": "", "features_file": "", "size": "0"}))
    no_catalog = load_model(copy, SETTINGS)
    assert no_catalog.artifact.catalog.size == 0
    with pytest.raises(InvalidArgument) as refused:
        run_core(no_catalog, lambda core: core.recommend(RecommendQuery(user([], []))))
    assert [v.field for v in refused.value.violations] == ["candidates"]
    new_item = ItemList.of(["new"], {"new": {"genres": "drama"}})
    assert run_core(no_catalog, lambda core: core.recommend(RecommendQuery(user([], []), new_item))).item_ids == ["new"]


def test_not_ready_without_a_model():
    async def call(core):
        return await core.recommend(RecommendQuery(UserContext()))

    with pytest.raises(NotReady):
        run_core(None, call)


def test_top_k_orders_and_breaks_ties_by_position():
    none = np.zeros(0, dtype=np.int64)
    scores = np.array([0.5, 2.0, 2.0, -1.0, 3.0], dtype=np.float32)
    assert top_k(scores, none, 0).tolist() == [4, 1, 2, 0, 3]
    assert top_k(scores, none, 2).tolist() == [4, 1]  # 1 and 2 tie at the cut-off
    tied = np.zeros(1000, dtype=np.float32)
    assert top_k(tied, none, 3).tolist() == [0, 1, 2]
    assert top_k(scores, np.array([1, 4]), 2).tolist() == [2, 0]
    assert top_k(scores, none, 10).tolist() == [4, 1, 2, 0, 3]
    assert top_k(scores, np.arange(5), 3).tolist() == []


def test_top_k_partitions_large_lists_as_a_stable_sort_would():
    """Beyond FULL_SORT_MAX the partition path: exclusions before it, ties at the cut-off
    by position, non-finite keys after every finite one, never an excluded item."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 50, size=20_000).astype(np.float32)  # many ties
    scores[[5, 17]] = np.nan
    scores[99] = np.inf
    excluded = rng.choice(20_000, size=300, replace=False)
    key = np.where(np.isfinite(scores), scores, np.float32(np.finfo(np.float32).min))
    key[excluded] = -np.inf
    reference = np.argsort(-key, kind="stable")
    for k in (1, 10, 1000, 19_700, 0):
        expected = reference[: k or 19_700]
        assert top_k(scores, excluded, k).tolist() == expected.tolist()
    assert not set(top_k(scores, excluded, 0).tolist()) & set(excluded.tolist())