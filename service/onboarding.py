"""What the Onboard RPC selects with, built once per loaded model: the item vectors the
inner loop sees, the user's prior precision, the learned popularity.

The selection itself is warmstart.onboarding, the function training's simulated onboarding
evaluates, fed the same vectors: training computes them from the model's parameters, the
service reads them from the artifact's item table (warmstart.contract.ItemTable, one row per
catalog item, catalog row order) and the prior from `onboarding_prior.safetensors`.
`onboarding_tables` is the one place that knows where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.artifact import Artifact
from warmstart import onboarding as O


@dataclass(frozen=True)
class OnboardingTables:
    """Rows in catalog order."""

    vectors: O.ItemVectors
    prior: O.Prior
    popularity: np.ndarray | None  # (N,) the engagement bias (learned popularity); None without the head


def onboarding_tables(artifact: Artifact) -> OnboardingTables | None:
    """The tables of a loaded artifact; None when it lacks the prior or the item table (a
    version exported before onboarding), or has no catalog. ValueError when the prior does
    not fit the table's vectors."""
    table = artifact.item_table
    if artifact.onboarding_prior is None or table is None or artifact.catalog.size == 0:
        return None
    vectors = O.ItemVectors.from_factors(table.rating_factors, table.engagement_factors)  # float32, as the inner loop sees them
    artifact.onboarding_prior.check(vectors)
    popularity = None if table.engagement_bias is None else np.asarray(table.engagement_bias, dtype=np.float64)
    return OnboardingTables(vectors, artifact.onboarding_prior, popularity)
