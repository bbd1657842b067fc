"""What the Onboard RPC selects with, built once per loaded model: the item vectors the
inner loop sees, the user's prior precision, the learned popularity.

The selection itself is warmstart.onboarding, the function training's simulated onboarding
evaluates, fed the same vectors: training computes them from the model's parameters, the
service reads them from the artifact (one row per catalog item, catalog row order): from
`onboarding_items.safetensors`, which export writes for Onboard. `onboarding_tables` is the
one place that knows where they come from (an item table holding the same vectors can take
that file's place here alone).
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
    """The tables of a loaded artifact; None when it lacks the prior or the item vectors
    (a version exported before onboarding), or has no catalog. ValueError when the prior
    does not fit the vectors."""
    if artifact.onboarding_prior is None or artifact.onboarding_items is None or artifact.catalog.size == 0:
        return None
    vectors, bias = artifact.onboarding_items
    artifact.onboarding_prior.check(vectors)
    popularity = None if bias is None else np.asarray(bias, dtype=np.float64)
    return OnboardingTables(vectors, artifact.onboarding_prior, popularity)
