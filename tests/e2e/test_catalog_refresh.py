"""Catalog refresh without retraining (training.refresh, `refresh-catalog`): the new version
serves its new items as the old one scores them sent inline, keeps every other item's
numbers, and is verified and published atomically like an export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from service.artifact import load_artifact
from service.domain import ItemList, RecommendQuery, ScoreQuery
from service.engines import EngineConfig
from service.repository import ModelSettings, load_model
from tests.service.test_core import run_core, user
from training import cli
from training.refresh import refresh_catalog

SETTINGS = ModelSettings(EngineConfig(), max_interactions=8, max_candidates=64, warmup_batch_size=4)


@pytest.fixture(scope="module")
def item_ids(tiny_artifact: Path) -> list[str]:
    return list(load_artifact(tiny_artifact).catalog.item_ids)


@pytest.fixture()
def model_dir(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A model directory holding a copy of the tiny artifact as version 1."""
    target = tmp_path / "repo" / "tiny"
    shutil.copytree(tiny_artifact, target / "1")
    return target


def new_items(artifact: Path, n: int) -> dict[str, dict[str, str]]:
    """n items the catalog does not know, with attributes from the vocabularies."""
    encoder = load_artifact(artifact).encoder
    fields = [f for f in encoder.item_fields if f.name != encoder.item_id_field]
    rng = np.random.default_rng(0)
    items = {}
    for k in range(n):
        attributes = {}
        for f in fields:
            values = rng.choice(f.vocabulary, size=min(2, len(f.vocabulary)) if f.multi_valued else 1, replace=False)
            attributes[f.name] = encoder.separator.join(values)
        items[f"new-{k}"] = attributes
    return items


def test_refreshed_version_scores_new_items_as_inline_attributes_did(model_dir: Path, item_ids):
    added = new_items(model_dir / "1", 5)
    removed = item_ids[10:12]
    result = refresh_catalog(model_dir / "1", added, removed)
    assert result.path == model_dir / "2" and (result.added, result.removed) == (5, 2)
    assert result.manifest.refresh.from_version == "1" and result.manifest.catalog.size == len(item_ids) + 3

    old, new = load_model(model_dir / "1", SETTINGS), load_model(model_dir / "2", SETTINGS)  # the service verifies it
    assert new.scores_from_table and new.artifact.catalog.item_ids[-5:] == tuple(added)
    assert not set(removed) & set(new.artifact.catalog.item_ids)
    history = user(item_ids[:3], [5.0, 2.0, 4.0])
    inline = ItemList.of([*added, *item_ids[20:25]], added)
    before = run_core(old, lambda core: core.score(ScoreQuery(history, inline)))
    after = run_core(new, lambda core: core.score(ScoreQuery(history, ItemList([*added, *item_ids[20:25]]))))
    assert len(before.adaptation.unknown_items) == 5 and not after.adaptation.unknown_items
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(after.engagement, before.engagement, atol=1e-5, rtol=0)
    ranked = run_core(new, lambda core: core.recommend(RecommendQuery(history, top_k=0)))
    assert set(ranked.item_ids) == set(new.artifact.catalog.item_ids)  # the new items are ranked with the rest

    # Everything but the catalog and the table is the source's, byte for byte.
    for name in ("model.onnx", "adapt.onnx", "init.safetensors", "torch_program.safetensors"):
        assert (model_dir / "2" / name).read_bytes() == (model_dir / "1" / name).read_bytes()


def test_refresh_refuses_what_it_cannot_do_and_writes_nothing(model_dir: Path, item_ids):
    added = new_items(model_dir / "1", 2)
    with pytest.raises(ValueError, match="does not hold"):
        refresh_catalog(model_dir / "1", added, ["no-such-item"])
    with pytest.raises(ValueError, match="already in the catalog"):
        refresh_catalog(model_dir / "1", {item_ids[0]: {}})
    with pytest.raises(ValueError, match="unknown item attribute"):
        refresh_catalog(model_dir / "1", {"x": {"no-such-field": "1"}})
    name, _ = next(iter(added["new-0"].items()))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        refresh_catalog(model_dir / "1", {"x": {name: "never-seen-value"}})

    def crash(staging: Path) -> None:
        raise RuntimeError("killed before the rename")

    with pytest.raises(RuntimeError, match="killed"):
        refresh_catalog(model_dir / "1", added, before_rename=crash)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]  # no version, no partial directory


def test_refresh_refuses_a_damaged_source(model_dir: Path):
    items = new_items(model_dir / "1", 1)
    damaged = model_dir / "1" / "catalog_items.txt"
    damaged.chmod(0o644)
    damaged.write_text(damaged.read_text() + "extra\n")
    with pytest.raises(ValueError, match="catalog_items.txt"):
        refresh_catalog(model_dir / "1", items)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_the_cli_refreshes_the_highest_version(model_dir: Path, item_ids, tmp_path: Path, capsys):
    added = tmp_path / "added.csv"
    field, value = next(iter(new_items(model_dir / "1", 1)["new-0"].items()))
    added.write_text(f"item_id,{field}\nfresh-1,{value}\nfresh-2,\n")
    removed = tmp_path / "removed.txt"
    removed.write_text(f"{item_ids[0]}\n")
    code = cli.main(["refresh-catalog", "--repository", str(model_dir.parent), "--name", "tiny", "--add", str(added), "--remove", str(removed)])
    assert code == 0 and "2 items added, 1 removed" in capsys.readouterr().out
    ids = load_artifact(model_dir / "2").catalog.item_ids
    assert ids[-2:] == ("fresh-1", "fresh-2") and item_ids[0] not in ids
