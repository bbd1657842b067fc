"""Onboarding, training side: what the selection (warmstart.onboarding, numpy, shared with
the service) needs of a trained model, computed from its parameters.

- `item_vectors`: what the inner loop sees of each catalog item, [1, q_i] for the rating
  head and p_i for the engagement head (training.model's item_repr and item_engagement);
- `onboarding_prior`: the user's prior precision per head (the learned pulls toward
  theta_0, the engagement head's all-items term alpha G). Export writes it into the
  artifact (warmstart.onboarding.PRIOR_FILE) for the service.

The simulated-onboarding protocol of the harness is training.onboarding_eval.
"""

from __future__ import annotations

import numpy as np
import torch

from training import model as M
from training.batching import EncodedCatalog
from training.inner_loop import CATALOG_WEIGHT, INNER_PREFIX
from training.trainer import AdaptedModel
from warmstart import onboarding as O

@torch.no_grad()
def item_vectors(adapted: AdaptedModel, catalog: EncodedCatalog, rows: np.ndarray) -> O.ItemVectors:
    """[1, q_i] and p_i of the catalog rows `rows`, as the inner loop sees them."""
    if adapted.model_config.kind != "bias_factor":
        raise ValueError("onboarding needs the bias_factor model (its inner loop adapts a bias and factors)")
    codes = catalog.codes[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
    _, q = M.item_repr(adapted.model_config, adapted.schema, adapted.params, codes)
    engagement = None
    if adapted.model_config.engagement_factors:
        _, p = M.item_engagement(adapted.model_config, adapted.schema, adapted.params, codes)
        engagement = p.numpy()
    return O.ItemVectors.from_factors(q.numpy(), engagement)


def onboarding_prior(adapted: AdaptedModel) -> O.Prior:
    """The user's prior precision per head: the inner loop's learned pulls toward theta_0
    (the ridge fold-in weight `fold_in_l2` where the loop has no pull), plus the engagement
    head's alpha G (G = eng.gram, the catalog's mean p p')."""
    config, params = adapted.model_config, adapted.params
    if config.kind != "bias_factor":
        raise ValueError("onboarding needs the bias_factor model")

    def pull(name: str, size: int) -> np.ndarray:
        key = f"{INNER_PREFIX}log_pull.{name}"
        if adapted.inner_config.prior_pull and key in params:
            return torch.exp(params[key].detach()).reshape(-1).double().numpy() * np.ones(size)
        return np.full(size, config.fold_in_l2)

    rating = np.concatenate([pull("user.bias", 1), pull("user.factors", config.factors)])
    if not config.engagement_factors:
        return O.Prior.from_pulls(rating)
    if M.ENGAGEMENT_GRAM not in params:
        raise ValueError(f"the parameters lack {M.ENGAGEMENT_GRAM} (see training.model.with_engagement_gram)")
    return O.Prior.from_pulls(
        rating,
        pull(M.ENGAGEMENT_USER, config.engagement_factors),
        float(torch.exp(params[CATALOG_WEIGHT])),
        params[M.ENGAGEMENT_GRAM].detach().double().numpy(),
    )
