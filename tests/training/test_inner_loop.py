"""The inner loop's math: closed-form MAML meta-gradients, Meta-SGD gradients, batching,
masking and the guards that keep scores finite."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from training import model as M
from training.features import FeatureSchema, Field
from training.inner_loop import CATALOG_WEIGHT, Batch, InnerLoopConfig, adapt_and_score, init_inner_params, inner_steps
from training.learners import learner_config
from tests.training.gradcheck import central_differences


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def plain_sgd(steps: int, lr: float, first_order: bool = False) -> InnerLoopConfig:
    return InnerLoopConfig(
        steps=steps,
        learning_rate=lr,
        learning_rate_kind="scalar",
        learn_learning_rate=False,
        normalise_by_support_size=False,
        prior_pull=False,
        max_step_norm=0.0,
        first_order=first_order,
    )


# -- the seed's worked example: linear regression, one inner step ----------------------------------
@pytest.mark.parametrize("first_order", [False, True])
def test_linear_regression_meta_gradient_matches_closed_form(first_order):
    g = torch.Generator().manual_seed(0)
    n, m, d, alpha = 7, 5, 4, 0.05
    xs, ys = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    xq, yq = torch.randn(m, d, generator=g), torch.randn(m, generator=g)
    w = torch.randn(d, generator=g, requires_grad=True)

    # Summed support loss divided by D = n is the mean loss (1/n) sum (x.w - y)^2.
    adapted = inner_steps(
        lambda theta: ((xs @ theta["w"] - ys) ** 2).sum(),
        {"w": w},
        {"w": [torch.tensor(alpha)]},
        torch.tensor(float(n)),
        plain_sgd(1, alpha, first_order),
    )
    query_loss = ((xq @ adapted["w"] - yq) ** 2).mean()
    (meta_grad,) = torch.autograd.grad(query_loss, w)

    w_prime = w - alpha * (2 / n) * xs.T @ (xs @ w - ys)
    outer = (2 / m) * xq.T @ (xq @ w_prime - yq)
    expected = outer if first_order else (torch.eye(d) - (2 * alpha / n) * xs.T @ xs) @ outer
    torch.testing.assert_close(meta_grad, expected.detach(), rtol=1e-10, atol=1e-12)
    if not first_order:  # the two differ: the test can tell them apart
        assert not torch.allclose(meta_grad, outer.detach(), atol=1e-6)


def test_zero_steps_return_the_initialisation():
    theta0 = {"w": torch.randn(3), "b": torch.randn(())}
    out = inner_steps(lambda t: (t["w"] ** 2).sum() + t["b"] ** 2, theta0, {"w": [torch.tensor(0.1)], "b": [torch.tensor(0.1)]}, torch.tensor(1.0), plain_sgd(0, 0.1))
    for name in theta0:
        assert torch.equal(out[name], theta0[name])


def test_per_step_learning_rates_are_used_in_order():
    # f(w) = w^2 / 2 summed: each step w <- w - lr_t * w.
    config = replace(plain_sgd(3, 0.1), learning_rate_kind="per_step")
    rates = [torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0.1)]
    out = inner_steps(lambda t: 0.5 * (t["w"] ** 2).sum(), {"w": torch.tensor([2.0])}, {"w": rates}, torch.tensor(1.0), config)
    torch.testing.assert_close(out["w"], torch.tensor([2.0 * 0.5 * 0.75 * 0.9]))


def test_update_norm_is_clipped():
    config = replace(plain_sgd(1, 1.0), max_step_norm=0.5)
    out = inner_steps(lambda t: 100.0 * t["w"].sum(), {"w": torch.zeros(4)}, {"w": [torch.tensor(1.0)]}, torch.tensor(1.0), config)
    assert math.isclose(float(out["w"].norm()), 0.5, rel_tol=1e-9)


def test_prior_pull_acts_as_ridge_toward_the_initialisation():
    # One Newton-sized step on (w - 3)^2 + pull (w - w0)^2 lands on the ridge solution.
    pull, w0 = 2.0, torch.tensor([1.0])
    config = replace(plain_sgd(1, 0.5), prior_pull=True)
    out = inner_steps(
        lambda t: ((t["w"] - 3.0) ** 2).sum(), {"w": w0}, {"w": [torch.tensor(0.5)]}, torch.tensor(1.0 + pull), config, {"w": torch.tensor(pull)}
    )
    torch.testing.assert_close(out["w"], torch.tensor([(3.0 + pull * 1.0) / (1.0 + pull)]))


# -- a small bias_factor model --------------------------------------------------------------------
def small_schema() -> FeatureSchema:
    return FeatureSchema(
        user_fields=(Field("group", "user", False, 1, 0, ("a", "b", "c")),),
        item_fields=(
            Field("item_id", "item", False, 1, 0, tuple(f"i{k}" for k in range(12))),
            Field("genres", "item", True, 3, 1, ("g0", "g1", "g2", "g3", "g4")),
        ),
    )


def model_params(config: M.ModelConfig, inner: InnerLoopConfig, schema: FeatureSchema, seed: int = 0) -> M.Params:
    id_codes = schema.item_id_field.num_codes
    g = torch.Generator().manual_seed(seed)
    stats = M.DataStats(3.5, torch.randn(id_codes, generator=g) * 0.3, interactions=500)
    params = M.init_params(replace(config, init_scale=0.3), schema, stats, seed=seed)
    params = {k: v.double() for k, v in params.items()}
    params.update({k: v.double() for k, v in init_inner_params(config, inner, params).items()})
    for name in [n for n in params if n.startswith("eng.item.")]:  # a non-trivial engagement item side
        params[name] = torch.randn(params[name].shape, generator=g, dtype=torch.float64) * 0.5
    return M.with_engagement_gram(config, schema, params, catalog_codes(schema))


def catalog_codes(schema: FeatureSchema) -> torch.Tensor:
    """Every known item of the small schema, with fixed genres: the catalog it ranks."""
    ids = torch.arange(2, schema.item_fields[0].num_codes).unsqueeze(1)
    genres = torch.stack([(ids[:, 0] % 5) + 2, ((ids[:, 0] + 2) % 5) + 2, torch.zeros_like(ids[:, 0])], dim=1)
    return torch.cat([ids, genres], dim=1)


def random_batch(schema: FeatureSchema, b: int, s: int, q: int, seed: int = 0, mask: np.ndarray | None = None) -> Batch:
    rng = np.random.default_rng(seed)
    item_id = rng.integers(1, schema.item_fields[0].num_codes, size=(b, s + q, 1))
    genres = rng.integers(0, schema.item_fields[1].num_codes, size=(b, s + q, 3))
    items = torch.from_numpy(np.concatenate([item_id, genres], axis=-1))
    users = torch.from_numpy(rng.integers(0, 5, size=(b, 1)))
    labels = torch.from_numpy(rng.integers(1, 6, size=(b, s)).astype(np.float64))
    m = torch.ones(b, s) if mask is None else torch.from_numpy(mask.astype(np.float64))
    return Batch(users, items[:, :s], labels, m, items[:, s:])


WARMSTART = learner_config("warmstart")
MODELS = {
    "bias_factor": M.ModelConfig(factors=4),
    "bias_factor_user_prior": M.ModelConfig(factors=4, prior="user_attributes"),
    "bias_factor_engagement": M.ModelConfig(factors=4, engagement_factors=3),
    "mlp": M.ModelConfig(kind="mlp", embedding_dim=3, hidden=(5, 4)),
}


@pytest.mark.parametrize("kind", MODELS)
def test_vmap_over_users_equals_a_loop_over_users(kind):
    config, schema = MODELS[kind], small_schema()
    inner = WARMSTART if config.kind == "bias_factor" else learner_config("metasgd", 3, 0.05)
    params = model_params(config, inner, schema)
    mask = np.ones((4, 6))
    mask[1, 3:] = 0
    mask[2, :] = 0
    batch = random_batch(schema, 4, 6, 5, mask=mask)
    together = adapt_and_score(config, inner, schema, params, batch)
    for user in range(4):
        alone = adapt_and_score(config, inner, schema, params, Batch(*(t[user : user + 1] for t in batch)))
        for a, b in zip(together, alone):
            assert (a is None) == (b is None) == (config.engagement_factors == 0 and a is together[-1])
            if a is not None:
                torch.testing.assert_close(a[user : user + 1], b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_padded_support_entries_change_nothing(kind):
    config, schema = MODELS[kind], small_schema()
    inner = WARMSTART if config.kind == "bias_factor" else learner_config("maml", 3, 0.05)
    params = model_params(config, inner, schema)
    short = random_batch(schema, 3, 4, 5, seed=1)
    padded_items = torch.cat([short.support_items, random_batch(schema, 3, 3, 1, seed=2).support_items], dim=1)
    padded = Batch(
        short.user_features,
        padded_items,
        torch.cat([short.support_labels, torch.full((3, 3), 5.0)], dim=1),
        torch.cat([short.support_mask, torch.zeros(3, 3)], dim=1),
        short.query_items,
    )
    for a, b in zip(adapt_and_score(config, inner, schema, params, short), adapt_and_score(config, inner, schema, params, padded)):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_support_loss_does_not_rise_after_a_small_step(kind):
    config, schema = MODELS[kind], small_schema()
    inner = replace(plain_sgd(1, 1e-3), normalise_by_support_size=False)
    params = model_params(config, inner, schema)
    out = adapt_and_score(config, inner, schema, params, random_batch(schema, 6, 8, 2, seed=3))
    assert torch.all(out.support_loss_after <= out.support_loss_before + 1e-12)
    assert torch.any(out.support_loss_after < out.support_loss_before)


def test_zero_steps_score_with_the_initialisation():
    config, schema = MODELS["bias_factor"], small_schema()
    inner = replace(WARMSTART, steps=0)
    params = model_params(config, inner, schema)
    batch = random_batch(schema, 2, 5, 4)
    out = adapt_and_score(config, inner, schema, params, batch)
    b, q = M.item_repr(config, schema, params, batch.query_items)
    expected = params["mu"] + b + params["user.bias0"] + q @ params["user.factors0"]
    torch.testing.assert_close(out.query_scores, expected)
    torch.testing.assert_close(out.support_loss_before, out.support_loss_after)


def test_warmstart_start_is_the_ridge_user_bias_at_any_step_count():
    """With item factors at zero, lr 1/2 and offset = pull = lambda, the adapted user bias is
    sum(r - item prediction) / (n + lambda) after one step and stays there."""
    config, schema, lam = M.ModelConfig(factors=4, init_scale=0.0), small_schema(), 7.0
    for steps in (1, 5):
        inner = replace(WARMSTART, steps=steps, support_offset=lam, prior_pull_init=lam)
        stats = M.DataStats(3.5, torch.linspace(-0.5, 0.5, schema.item_id_field.num_codes), interactions=100)
        params = {k: v.double() for k, v in M.init_params(config, schema, stats).items()}
        params.update({k: v.double() for k, v in init_inner_params(config, inner, params).items()})
        mask = np.ones((3, 6))
        mask[0, 2:] = 0
        batch = random_batch(schema, 3, 6, 4, seed=5, mask=mask)
        out = adapt_and_score(config, inner, schema, params, batch)
        b_support, _ = M.item_repr(config, schema, params, batch.support_items)
        residual = (batch.support_labels - params["mu"] - b_support) * batch.support_mask
        user_bias = residual.sum(1) / (batch.support_mask.sum(1) + lam)
        b_query, _ = M.item_repr(config, schema, params, batch.query_items)
        torch.testing.assert_close(out.query_scores, params["mu"] + b_query + user_bias[:, None], rtol=1e-8, atol=1e-8)


def test_metasgd_learning_rate_gradient_matches_finite_differences():
    config, schema = MODELS["bias_factor"], small_schema()
    inner = learner_config("metasgd", 2, 0.05)
    params = model_params(config, inner, schema)
    batch = random_batch(schema, 3, 6, 4, seed=7)
    targets = torch.from_numpy(np.random.default_rng(8).uniform(1, 5, size=(3, 4)))
    name = "inner.log_lr.user.factors"

    def outer(log_lr: torch.Tensor) -> torch.Tensor:
        out = adapt_and_score(config, inner, schema, {**params, name: log_lr}, batch)
        return ((out.query_scores - targets) ** 2).mean()

    log_lr = params[name].clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(outer(log_lr), log_lr)
    numeric = central_differences(outer, log_lr)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    assert analytic.abs().max() > 1e-6  # the learned rates do receive a gradient


def test_second_order_meta_gradient_reaches_the_initialisation_and_differs_from_first_order():
    config, schema = MODELS["mlp"], small_schema()
    batch = random_batch(schema, 3, 6, 4, seed=9)
    grads = {}
    for first_order in (False, True):
        inner = replace(learner_config("maml", 2, 0.1), first_order=first_order)
        params = model_params(config, inner, schema)
        for v in params.values():
            v.requires_grad_(True)
        out = adapt_and_score(config, inner, schema, params, batch)
        out.query_scores.pow(2).mean().backward()
        grads[first_order] = params["mlp.0.weight"].grad.clone()
        assert params["emb.item.genres"].grad.abs().sum() > 0
    assert not torch.allclose(grads[False], grads[True])


@pytest.mark.parametrize(
    "labels, n",
    [("equal", 40), ("extreme", 3000), ("one", 1), ("none", 0)],
)
def test_scores_stay_finite_whatever_the_support(labels, n):
    config, schema = MODELS["bias_factor"], small_schema()
    params = model_params(config, WARMSTART, schema)
    size = max(n, 1)
    batch = random_batch(schema, 2, size, 3, seed=11, mask=np.full((2, size), 1.0 if n else 0.0))
    values = {"equal": torch.full((2, size), 5.0), "extreme": torch.full((2, size), 1e6)}.get(labels, batch.support_labels)
    batch = batch._replace(support_labels=values)
    out = adapt_and_score(config, WARMSTART, schema, params, batch)
    for tensor in out:
        assert tensor is None or torch.all(torch.isfinite(tensor))


# -- the engagement head ---------------------------------------------------------------------------
ENGAGEMENT = MODELS["bias_factor_engagement"]


def test_engagement_gram_term_is_the_mean_squared_score_over_the_catalog():
    """alpha * phi' G phi is alpha times the mean of (p_j . phi)^2 over every catalog item:
    the implicit loss's all-items term, computed without touching the catalog per user."""
    schema = small_schema()
    params = model_params(ENGAGEMENT, WARMSTART, schema)
    _, p = M.item_engagement(ENGAGEMENT, schema, params, catalog_codes(schema))
    phi = torch.randn(ENGAGEMENT.engagement_factors, dtype=torch.float64)
    torch.testing.assert_close(phi @ params[M.ENGAGEMENT_GRAM] @ phi, ((p @ phi) ** 2).mean())


def test_one_engagement_step_matches_the_hand_derived_update():
    """From phi_0, one plain step of size lr on sum_j w_j (1 - p_j.phi)^2 + alpha phi'G phi
    + pull ||phi - phi_0||^2, divided by D = n + c, per coordinate."""
    schema = small_schema()
    inner = replace(WARMSTART, steps=1, max_step_norm=0.0)
    params = model_params(ENGAGEMENT, inner, schema)
    e = ENGAGEMENT.engagement_factors
    params["eng.user0"] = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    params["inner.log_lr.eng.user"] = torch.log(torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64))
    params["inner.log_offset.eng.user"] = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    params["inner.log_pull.eng.user"] = torch.log(torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
    params[CATALOG_WEIGHT] = torch.tensor(math.log(2.0), dtype=torch.float64)
    mask = np.ones((2, 4))
    mask[1, 1:] = 0
    batch = random_batch(schema, 2, 4, 3, seed=21, mask=mask)
    out = adapt_and_score(ENGAGEMENT, inner, schema, params, batch)

    _, p_support = M.item_engagement(ENGAGEMENT, schema, params, batch.support_items)
    c_query, p_query = M.item_engagement(ENGAGEMENT, schema, params, batch.query_items)
    phi0, gram = params["eng.user0"], params[M.ENGAGEMENT_GRAM]
    lr, offset = torch.exp(params["inner.log_lr.eng.user"]), torch.exp(params["inner.log_offset.eng.user"])
    for u in range(2):
        w = batch.support_mask[u]
        residual = 1.0 - p_support[u] @ phi0
        gradient = -2.0 * (w * residual) @ p_support[u] + 2.0 * 2.0 * gram @ phi0  # the pull term is 0 at phi_0
        phi1 = phi0 - lr * gradient / (w.sum() + offset)
        expected = c_query[u] + torch.exp(params["eng.log_scale"]) * p_query[u] @ phi1
        torch.testing.assert_close(out.query_engagement[u], expected, rtol=1e-10, atol=1e-12)
    assert out.query_engagement.shape == (2, 3) and e == 3


def test_engagement_does_not_change_the_rating_head():
    schema = small_schema()
    params = model_params(ENGAGEMENT, WARMSTART, schema)
    batch = random_batch(schema, 3, 5, 4, seed=23)
    with_head = adapt_and_score(ENGAGEMENT, WARMSTART, schema, params, batch)
    without = adapt_and_score(replace(ENGAGEMENT, engagement_factors=0), WARMSTART, schema, params, batch)
    for a, b in zip(with_head[:3], without[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert without.query_engagement is None


def test_clicks_engage_only_when_clicked():
    """A shown-but-not-clicked item moves the engagement factors as no interaction at all."""
    schema = small_schema()
    params = model_params(ENGAGEMENT, WARMSTART, schema)
    batch = random_batch(schema, 1, 3, 4, seed=25)
    clicks = batch._replace(support_labels=torch.tensor([[1.0, 0.0, 1.0]]))
    only_clicked = clicks._replace(support_mask=torch.tensor([[1.0, 0.0, 1.0]]))
    a = adapt_and_score(ENGAGEMENT, WARMSTART, schema, params, clicks, loss_kind="logistic").query_engagement
    b = adapt_and_score(ENGAGEMENT, WARMSTART, schema, params, only_clicked, loss_kind="logistic").query_engagement
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_engagement_step_size_gradient_matches_finite_differences():
    """The listwise outer loss reaches the learned engagement step sizes through the inner
    loop (second order), and autograd agrees with central differences."""
    schema = small_schema()
    inner = replace(WARMSTART, steps=2)
    params = model_params(ENGAGEMENT, inner, schema)
    batch = random_batch(schema, 3, 5, 4, seed=27)
    name = "inner.log_lr.eng.user"
    targets = torch.tensor([0, 2, 3])

    def outer(log_lr: torch.Tensor) -> torch.Tensor:
        out = adapt_and_score(ENGAGEMENT, inner, schema, {**params, name: log_lr}, batch)
        return torch.nn.functional.cross_entropy(out.query_engagement, targets)

    log_lr = params[name].clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(outer(log_lr), log_lr)
    numeric = central_differences(outer, log_lr)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)
    assert analytic.abs().max() > 1e-6


# -- the best-iterate guard -----------------------------------------------------------------------
def test_keep_best_never_returns_a_worse_fit_than_the_start():
    """Adversarial but valid support sets (one item, alternating extreme labels; large step
    sizes): without the guard the steps overshoot and the fit gets worse; with it the
    support loss after adaptation never exceeds the loss at the initialisation."""
    schema = small_schema()
    config = MODELS["bias_factor"]
    rng = np.random.default_rng(31)
    worse_without, worst_with = 0, -math.inf
    for trial in range(40):
        inner = replace(WARMSTART, max_step_norm=0.0)
        params = model_params(config, inner, schema, seed=trial)
        params["inner.log_lr.user.bias"] = torch.tensor(math.log(rng.uniform(1.0, 30.0)))
        params["inner.log_lr.user.factors"] = torch.log(torch.full((4,), rng.uniform(1.0, 30.0)))
        s = int(rng.integers(1, 64))
        batch = random_batch(schema, 2, s, 3, seed=trial)
        same_item = batch.support_items[:, :1].expand_as(batch.support_items).clone()
        labels = torch.where(torch.arange(s) % 2 == 0, 5.0, 1.0).expand(2, s).clone()
        batch = batch._replace(support_items=same_item, support_labels=labels)
        guarded = adapt_and_score(config, inner, schema, params, batch)
        unguarded = adapt_and_score(config, replace(inner, keep_best=False), schema, params, batch)
        worst_with = max(worst_with, float((guarded.support_loss_after - guarded.support_loss_before).max()))
        worse_without += int((unguarded.support_loss_after > 1.05 * unguarded.support_loss_before).sum())
    assert worst_with <= 1e-12
    assert worse_without > 0  # the sets are adversarial: the guard is what holds the line
