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
from training.inner_loop import Batch, InnerLoopConfig, adapt_and_score, init_inner_params, inner_steps
from training.methods import learner_config


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
    return params


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
        torch.testing.assert_close(out.query_scores, params["mu"] + b_query + user_bias[:, None], rtol=1e-10, atol=1e-10)


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
    eps = 1e-6
    numeric = torch.zeros_like(log_lr)
    for i in range(log_lr.numel()):
        bump = torch.zeros_like(log_lr)
        bump.view(-1)[i] = eps
        numeric.view(-1)[i] = (outer(log_lr.detach() + bump) - outer(log_lr.detach() - bump)) / (2 * eps)
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
        assert torch.all(torch.isfinite(tensor))
