"""bench/onboard.py's catalog tiling makes an artifact the service loads and onboards from."""

from __future__ import annotations

import numpy as np

from bench.onboard import tile_artifact
from service.artifact import load_artifact
from service.onboarding import onboarding_tables
from warmstart import onboarding as O


def test_a_tiled_catalog_loads_with_its_onboarding_tables(tiny_artifact, tmp_path):
    original = load_artifact(tiny_artifact)
    size = original.catalog.size * 2 + 7
    tiled = load_artifact(tile_artifact(tiny_artifact, tmp_path / "tiny-x" / "1", size))
    assert tiled.catalog.size == size and len(set(tiled.catalog.item_ids)) == size
    np.testing.assert_array_equal(tiled.catalog.codes[original.catalog.size : 2 * original.catalog.size], original.catalog.codes)
    tables = onboarding_tables(tiled)
    assert tables is not None and tables.vectors.size == size
    chosen = O.select("dopt", tables.vectors, tables.prior, 5)
    assert len(set(chosen.rows.tolist())) == 5
