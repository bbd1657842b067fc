"""The per-user inner loop, written once and used by training, evaluation and export.

For each user: start from the meta-learned user parameters theta_0, take `steps`
gradient steps on the support loss, score the query items. `torch.func.grad` gives the
per-user gradient and `torch.func.vmap` runs all users of a batch at once; masks make
ragged support sets exact (a padded entry contributes nothing).

Step t, adapted parameter k (all per user):

    objective(theta) = sum_j m_j * loss(score_j(theta), y_j)
                       + sum_k pull_k * ||theta_k - theta_0k||^2      (if prior_pull)
    update_k = lr_k[t] / D_k * grad_k objective(theta)
    D_k = max(n + c_k, 1) if normalise_by_support_size else max(n, 1)  (n = support size)
    theta_k <- theta_k - update_k * min(1, max_step_norm / ||update||)

With D = n the data term is the mean loss, which is MAML's and Meta-SGD's usual form.
With D = n + c (c learned, per coordinate) and a pull toward theta_0 the step is a
normalised, damped, diagonal Newton-like step: for the user bias alone, lr = 1/2 and
c = pull = lambda make one step land exactly on the ridge estimate
sum(residual) / (n + lambda), whatever n is; for a factor coordinate whose item values
have second moment s, lr = 1/(2 s) and c = lambda / s do the same for the diagonal of
the ridge system. That is what keeps thousands of interactions from blowing the step up. The update-norm clip is
the last guard: no support set can make the scores non-finite.

Second-order MAML falls out of ordinary autograd through this function (torch.func.grad
composes with it); first_order=True detaches the inner gradients instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from training import memory
from training import model as M
from training.features import FeatureSchema

LearningRateKind = Literal["scalar", "per_parameter", "per_step"]
LossKind = Literal["squared", "logistic"]

INNER_PREFIX = "inner."


@dataclass(frozen=True)
class InnerLoopConfig:
    """How a user's parameters are adapted. Defaults are the served model's."""

    steps: int = 5  # gradient steps per user (fixed: the exported graph unrolls them)
    learning_rate: float = 0.5  # initial step size (fixed when not learned)
    learning_rate_kind: LearningRateKind = "per_parameter"  # one lr, one per coordinate, or per step too
    learn_learning_rate: bool = True  # Meta-SGD: learn the step sizes in the outer loop
    normalise_by_support_size: bool = True  # divide steps by (n + c) with c learned, not by n
    support_offset: float = 5.0  # initial c (per coordinate when learning_rate_kind is not scalar)
    prior_pull: bool = True  # learned pull back toward theta_0 (ridge in the inner objective)
    prior_pull_init: float = 5.0  # initial pull weight per coordinate
    max_step_norm: float = 2.0  # clip each user's update per step to this L2 norm; 0 = no clip
    first_order: bool = False  # drop second-order terms of the meta-gradient
    # Return the iterate with the lowest support loss (the start included), so adaptation
    # never leaves a user fitting their own interactions worse than the initialisation.
    keep_best: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"inner steps must be >= 0, got {self.steps}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"inner learning_rate must be positive, got {self.learning_rate}")
        if self.learning_rate_kind not in ("scalar", "per_parameter", "per_step"):
            raise ValueError(f"learning_rate_kind must be scalar, per_parameter or per_step, got {self.learning_rate_kind!r}")
        if self.support_offset <= 0 or self.prior_pull_init <= 0:
            raise ValueError("support_offset and prior_pull_init must be positive")
        if self.max_step_norm < 0:
            raise ValueError("max_step_norm must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> "InnerLoopConfig":
        return InnerLoopConfig(**d)


class Batch(NamedTuple):
    """A padded batch of users. Masks are 1.0 for real entries, 0.0 for padding."""

    user_features: Tensor  # (B, Wu) int64
    support_items: Tensor  # (B, S, Wi) int64
    support_labels: Tensor  # (B, S) float
    support_mask: Tensor  # (B, S) float
    query_items: Tensor  # (B, Q, Wi) int64


class InnerLoopOutput(NamedTuple):
    query_scores: Tensor  # (B, Q) raw: ratings, or logits for clicks
    support_loss_before: Tensor  # (B,) mean support loss at theta_0 (0 with no support)
    support_loss_after: Tensor  # (B,) ... after the inner steps
    query_engagement: Tensor | None = None  # (B, Q) engagement logits (models with the engagement head)


def _lr_names(name: str, config: InnerLoopConfig) -> list[str]:
    if config.learning_rate_kind == "per_step":
        return [f"{INNER_PREFIX}log_lr.{name}.step{t}" for t in range(config.steps)]
    return [f"{INNER_PREFIX}log_lr.{name}"]


CATALOG_WEIGHT = f"{INNER_PREFIX}log_catalog_weight"  # engagement: weight of the all-items term


def adapted_parameter_names(model_config: M.ModelConfig) -> tuple[str, ...]:
    """Every per-user parameter the inner loop adapts: the rating head's, then the engagement head's."""
    names = model_config.adapted_names()
    return (*names, M.ENGAGEMENT_USER) if model_config.engagement_factors else names


def init_inner_params(
    model_config: M.ModelConfig, config: InnerLoopConfig, params: M.Params
) -> M.Params:
    """Inner-loop parameters (log step sizes, log offset, log pulls) to add to the model's."""
    out: M.Params = {}
    if model_config.engagement_factors:
        out[CATALOG_WEIGHT] = torch.zeros(())
    for name in adapted_parameter_names(model_config):
        shape = () if config.learning_rate_kind == "scalar" else tuple(params_shape(model_config, params, name))
        for lr_name in _lr_names(name, config):
            out[lr_name] = torch.full(shape, math.log(config.learning_rate))
        if config.prior_pull:
            out[f"{INNER_PREFIX}log_pull.{name}"] = torch.full(
                tuple(params_shape(model_config, params, name)), math.log(config.prior_pull_init)
            )
        if config.normalise_by_support_size:
            out[f"{INNER_PREFIX}log_offset.{name}"] = torch.full(shape, math.log(config.support_offset))
    return out


def params_shape(model_config: M.ModelConfig, params: M.Params, name: str) -> torch.Size:
    """Per-user shape of an adapted parameter."""
    if model_config.kind == "bias_factor":
        return {
            "user.bias": torch.Size(()),
            "user.factors": torch.Size((model_config.factors,)),
            M.ENGAGEMENT_USER: torch.Size((model_config.engagement_factors,)),
        }[name]
    return params[name].shape


def trainable_inner_names(config: InnerLoopConfig, params: M.Params) -> list[str]:
    """Inner parameters the outer loop learns (step sizes only when Meta-SGD)."""
    names = []
    for name in params:
        if not name.startswith(INNER_PREFIX):
            continue
        if name.startswith(f"{INNER_PREFIX}log_lr.") and not config.learn_learning_rate:
            continue
        names.append(name)
    return names


def support_loss_terms(kind: LossKind, scores: Tensor, labels: Tensor) -> Tensor:
    """Per-entry loss: squared error for ratings, logistic loss on logits for clicks."""
    if kind == "squared":
        diff = scores - labels
        return diff * diff
    # log(1 + exp(-z)) for label 1 and log(1 + exp(z)) for 0, written with softplus for stability.
    return torch.nn.functional.softplus(scores) - labels * scores


def inner_steps(
    data_loss: Callable[[M.Params], Tensor],
    theta0: M.Params,
    learning_rates: Mapping[str, Sequence[Tensor]],
    denominator: Tensor | Mapping[str, Tensor],
    config: InnerLoopConfig,
    pulls: Mapping[str, Tensor] | None = None,
) -> M.Params:
    """`config.steps` clipped, normalised gradient steps on one user's objective.

    `data_loss(theta)` is the summed support loss; `learning_rates[name]` holds one step
    size per step (per_step) or a single one; `denominator` is D of the module docstring
    (one for all parameters, or one per parameter).
    """
    pulls = pulls or {}

    def objective(theta: M.Params) -> Tensor:
        total = data_loss(theta)
        for name, pull in pulls.items():
            diff = theta[name] - theta0[name]
            total = total + (pull * diff * diff).sum()
        return total

    objective_grad = grad(objective)
    theta = dict(theta0)
    best, best_loss = theta, data_loss(theta0) if config.keep_best else None
    for step in range(config.steps):
        g = objective_grad(theta)
        if config.first_order:
            g = {n: v.detach() for n, v in g.items()}
        updates = {}
        for name, value in g.items():
            rates = learning_rates[name]
            d = denominator[name] if isinstance(denominator, Mapping) else denominator
            updates[name] = rates[step if len(rates) > 1 else 0] * value / d
        if config.max_step_norm > 0:
            # The epsilon keeps sqrt differentiable at a zero update (an empty support set).
            norm = torch.sqrt(sum((u * u).sum() for u in updates.values()) + 1e-12)
            scale = torch.clamp(config.max_step_norm / norm, max=1.0)
            updates = {n: u * scale for n, u in updates.items()}
        theta = {n: theta[n] - updates[n] for n in theta}
        if config.keep_best:
            loss = data_loss(theta)
            better = loss < best_loss
            best = {n: torch.where(better, theta[n], best[n]) for n in theta}
            best_loss = torch.where(better, loss, best_loss)
    return best if config.keep_best else theta


def _step_settings(names: Sequence[str], config: InnerLoopConfig, params: M.Params):
    """(pulls, learning rates, offsets) of the named adapted parameters, from their log form."""
    pulls = {n: torch.exp(params[f"{INNER_PREFIX}log_pull.{n}"]) for n in names} if config.prior_pull else {}
    learning_rates = {n: [torch.exp(params[lr]) for lr in _lr_names(n, config)] for n in names}
    offsets = {n: torch.exp(params[f"{INNER_PREFIX}log_offset.{n}"]) for n in names} if config.normalise_by_support_size else {}
    return pulls, learning_rates, offsets


def _denominators(names: Sequence[str], n_support: Tensor, offsets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: (n_support + offsets[n] if offsets else n_support).clamp(min=1.0) for n in names}


def engagement_weights(loss_kind: LossKind, labels: Tensor, mask: Tensor) -> Tensor:
    """Which support entries count as engagement: every interaction with a rated item, only
    the positive ones for clicks (a shown-but-not-clicked item is not engagement)."""
    return mask * labels if loss_kind == "logistic" else mask


class AdaptedUsers(NamedTuple):
    """What the adapt step hands to the score step: each user's adapted parameters."""

    users: Tensor  # (B, ...) the user representation M.predict reads (the codes for bias_factor)
    user_params: M.Params  # {name: (B, ...)} every per-user parameter, adapted ones at their adapted value
    support_loss_before: Tensor  # (B,) mean support loss at theta_0 (0 with no support)
    support_loss_after: Tensor  # (B,) ... after the inner steps
    engagement_user: Tensor | None = None  # (B, e) adapted engagement factors phi (models with the head)


def adapt_users(
    model_config: M.ModelConfig,
    config: InnerLoopConfig,
    schema: FeatureSchema,
    params: M.Params,
    batch: Batch,
    loss_kind: LossKind = "squared",
) -> AdaptedUsers:
    """The adapt step: every user of the batch adapted to its support set (the query items
    of `batch` are not read).

    With the engagement head (model_config.engagement_factors > 0; params must hold
    M.ENGAGEMENT_GRAM, see M.with_engagement_gram) the same inner steps also adapt the
    user's engagement factors phi on an implicit least-squares loss, as an implicit-ALS
    fold-in would:

        sum_j w_j * (1 - p_j . phi)^2 + alpha * phi' G phi + pull * ||phi - phi_0||^2

    (j = support items, w_j = 1 for an interaction, G = mean p p' over the catalog: every
    item not interacted with counts as a weak negative, at no per-item cost).
    """
    adapted_names = model_config.adapted_names()
    users = M.user_repr(model_config, schema, params, batch.user_features)  # (B, Du)
    support_repr = M.pair_repr(model_config, users, M.item_repr(model_config, schema, params, batch.support_items))
    start = M.initial_user_params(model_config, schema, params, batch.user_features)  # {name: (B, ...)}
    pulls, learning_rates, offsets = _step_settings(adapted_names, config, params)
    user_rates: dict[str, list[Tensor]] = {}  # per-user step sizes (the memory's); {} = the shared ones
    phi0 = None
    if model_config.memory_slots:
        read = memory.read(model_config, schema, params, batch, loss_kind)
        start, user_rates = memory.personalise(start, learning_rates, read)
        phi0 = None if read.engagement is None else params["eng.user0"] + read.engagement

    def per_user(start_u: M.Params, user: Tensor, s_items, labels: Tensor, mask: Tensor, rates_u):
        rates = rates_u or learning_rates
        theta0 = {n: start_u[n] for n in adapted_names}
        fixed = {n: v for n, v in start_u.items() if n not in theta0}

        def data_loss(theta: M.Params) -> Tensor:
            scores = M.predict(model_config, params, {**fixed, **theta}, user, s_items)
            return (support_loss_terms(loss_kind, scores, labels) * mask).sum()

        n_support = mask.sum()
        theta = inner_steps(data_loss, theta0, rates, _denominators(adapted_names, n_support, offsets), config, pulls)
        before = data_loss(theta0) / n_support.clamp(min=1.0)
        after = data_loss(theta) / n_support.clamp(min=1.0)
        return {**fixed, **theta}, before, after

    user_params, before, after = vmap(per_user)(
        start, users, support_repr, batch.support_labels, batch.support_mask, user_rates
    )
    if not model_config.engagement_factors:
        return AdaptedUsers(users, user_params, before, after)
    _, support_p = M.item_engagement(model_config, schema, params, batch.support_items)  # (B, S, e)
    weights = engagement_weights(loss_kind, batch.support_labels, batch.support_mask)  # (B, S)
    phi = adapt_engagement(model_config, config, params, support_p, weights, phi0)  # (B, e)
    return AdaptedUsers(users, user_params, before, after, phi)


def score_users(
    model_config: M.ModelConfig, schema: FeatureSchema, params: M.Params, adapted: AdaptedUsers, query_items: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The score step: raw scores (B, Q) of each user's query items (B, Q, W) under their
    adapted parameters, and the engagement logits (B, Q) (None without the head)."""
    query_repr = M.pair_repr(model_config, adapted.users, M.item_repr(model_config, schema, params, query_items))

    def per_user(user_params: M.Params, user: Tensor, q_items):
        return M.predict(model_config, params, user_params, user, q_items)

    scores = vmap(per_user)(adapted.user_params, adapted.users, query_repr)
    if adapted.engagement_user is None:
        return scores, None
    query_c, query_p = M.item_engagement(model_config, schema, params, query_items)  # (B, Q), (B, Q, e)
    engagement = vmap(lambda c, p, f: M.engagement_scores(params, c, p, f))(query_c, query_p, adapted.engagement_user)
    return scores, engagement


def adapt_and_score(
    model_config: M.ModelConfig,
    config: InnerLoopConfig,
    schema: FeatureSchema,
    params: M.Params,
    batch: Batch,
    loss_kind: LossKind = "squared",
) -> InnerLoopOutput:
    """Adapts every user of the batch to its support set (adapt_users) and scores its query
    items (score_users); the output carries each query item's engagement logit
    c_j + scale * p_j . phi when the model has the engagement head."""
    adapted = adapt_users(model_config, config, schema, params, batch, loss_kind)
    scores, engagement = score_users(model_config, schema, params, adapted, batch.query_items)
    return InnerLoopOutput(scores, adapted.support_loss_before, adapted.support_loss_after, engagement)


def adapt_engagement(
    model_config: M.ModelConfig,
    config: InnerLoopConfig,
    params: M.Params,
    support_p: Tensor,
    weights: Tensor,
    start: Tensor | None = None,
) -> Tensor:
    """Each user's adapted engagement factors phi (B, e) from their support items' engagement
    factors (B, S, e) and weights (B, S): the inner steps on the implicit loss of adapt_users.
    `start` (B, e): each user's own phi_0 (the memory's, training.memory.engagement_start);
    None = every user starts at the shared eng.user0."""
    names = (M.ENGAGEMENT_USER,)
    pulls, learning_rates, offsets = _step_settings(names, config, params)
    # No best-iterate guard here: its selection would cut the meta-gradient to the step
    # sizes whenever a step overshoots, which is exactly when they need to learn.
    config = replace(config, keep_best=False)
    gram = params[M.ENGAGEMENT_GRAM]  # (e, e)
    catalog_weight = torch.exp(params[CATALOG_WEIGHT])
    shared_phi0 = params["eng.user0"]

    def per_user(p: Tensor, w: Tensor, phi0: Tensor) -> Tensor:
        def data_loss(theta: M.Params) -> Tensor:
            phi = theta[M.ENGAGEMENT_USER]
            fit = 1.0 - p @ phi  # (S,)
            return (w * fit * fit).sum() + catalog_weight * (phi @ (gram @ phi))

        theta0 = {M.ENGAGEMENT_USER: phi0}
        theta = inner_steps(data_loss, theta0, learning_rates, _denominators(names, w.sum(), offsets), config, pulls)
        return theta[M.ENGAGEMENT_USER]

    if start is None:
        return vmap(lambda p, w: per_user(p, w, shared_phi0))(support_p, weights)
    return vmap(per_user)(support_p, weights, start)


def to_label_units(scores: Tensor, loss_kind: LossKind, low: float, high: float) -> Tensor:
    """Raw scores -> what a caller sees: ratings clamped to the label range, or probabilities."""
    if loss_kind == "logistic":
        return torch.sigmoid(scores)
    return scores.clamp(low, high)
