"""The memory learner's math: a zero read is the served model, one slot is a constant
offset, attention rows sum to one, second-order gradients reach the memory through the
inner loop, and the exported graph computes what training computes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from training import memory
from training import model as M
from training.inner_loop import adapt_and_score, adapt_engagement
from training.learners import learner_config
from tests.training.test_inner_loop import catalog_codes, model_params, random_batch, small_schema
from tests.training.gradcheck import central_differences

SERVED = M.ModelConfig(factors=4, engagement_factors=3)
WARMSTART = learner_config("warmstart", 3)


@pytest.fixture()
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def with_memory(params: M.Params, config: M.ModelConfig, schema, seed: int = 0, values_scale: float = 0.0) -> M.Params:
    """params plus a memory; values_scale > 0 gives the values random entries of that size."""
    g = torch.Generator().manual_seed(100 + seed)
    extra = {k: v.double() for k, v in memory.init_memory_params(config, schema, seed).items()}
    if values_scale:
        for name in (memory.START_VALUES, memory.STEP_VALUES, memory.ENGAGEMENT_VALUES):
            if name in extra:
                extra[name] = torch.randn(extra[name].shape, generator=g, dtype=torch.float64) * values_scale
    return {**params, **extra}


def mixed_batch(schema, seed: int = 3):
    """Four users: one with no support, the others with 2, 5 and 6 interactions."""
    mask = np.zeros((4, 6))
    for row, n in enumerate((0, 2, 5, 6)):
        mask[row, :n] = 1
    return random_batch(schema, 4, 6, 5, seed=seed, mask=mask)


def test_zero_read_reproduces_the_served_model_exactly(float64):
    schema = small_schema()
    params = model_params(SERVED, WARMSTART, schema)
    config = replace(SERVED, memory_slots=5)
    batch = mixed_batch(schema)
    served = adapt_and_score(SERVED, WARMSTART, schema, params, batch)
    zero = adapt_and_score(config, WARMSTART, schema, with_memory(params, config, schema), batch)
    for a, b in zip(served, zero):
        assert torch.equal(a, b)  # bit for bit: the memory only adds zeros
    read = memory.read(config, schema, with_memory(params, config, schema), batch)
    assert read.attention.std(1).min() > 0.01  # the keys are not degenerate: the zero comes from the values
    nonzero = adapt_and_score(config, WARMSTART, schema, with_memory(params, config, schema, values_scale=0.3), batch)
    assert not torch.allclose(served.query_scores, nonzero.query_scores)
    assert not torch.allclose(served.query_engagement, nonzero.query_engagement)


def test_attention_rows_sum_to_one(float64):
    schema = small_schema()
    config = replace(SERVED, memory_slots=7)
    params = with_memory(model_params(SERVED, WARMSTART, schema), config, schema)
    batch = mixed_batch(schema, seed=11)
    weights = memory.attention(config, schema, params, batch.user_features, batch.support_items, batch.support_labels, batch.support_mask)
    assert weights.shape == (4, 7)
    torch.testing.assert_close(weights.sum(1), torch.ones(4), rtol=0, atol=1e-12)
    assert torch.all(weights > 0)
    # Users differ in attributes and support: their attention differs too.
    assert (weights[0] - weights[3]).abs().max() > 1e-3


def test_one_slot_memory_is_a_learned_constant_offset(float64):
    schema = small_schema()
    params = model_params(SERVED, WARMSTART, schema)
    config = replace(SERVED, memory_slots=1)
    memorised = with_memory(params, config, schema, values_scale=0.4)
    batch = mixed_batch(schema, seed=5)
    start = memorised[memory.START_VALUES][0]
    steps = memorised[memory.STEP_VALUES][0]
    shifted = dict(params)
    shifted["user.bias0"] = params["user.bias0"] + start[0]
    shifted["user.factors0"] = params["user.factors0"] + start[1:]
    shifted["inner.log_lr.user.bias"] = params["inner.log_lr.user.bias"] + steps[0]
    shifted["inner.log_lr.user.factors"] = params["inner.log_lr.user.factors"] + steps[1:]
    shifted["eng.user0"] = params["eng.user0"] + memorised[memory.ENGAGEMENT_VALUES][0]
    expected = adapt_and_score(SERVED, WARMSTART, schema, shifted, batch)
    got = adapt_and_score(config, WARMSTART, schema, memorised, batch)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected.query_scores, adapt_and_score(SERVED, WARMSTART, schema, params, batch).query_scores)


@pytest.mark.parametrize("name", [memory.START_VALUES, memory.STEP_VALUES, memory.KEYS, "memory.user_attr.group"])
def test_rating_memory_gradient_matches_finite_differences(float64, name):
    """Second order: the query loss after the inner steps, differentiated through them."""
    schema = small_schema()
    config = replace(M.ModelConfig(factors=3), memory_slots=3)
    inner = learner_config("warmstart", 2)
    params = with_memory(model_params(M.ModelConfig(factors=3), inner, schema), config, schema, values_scale=0.3)
    batch = mixed_batch(schema, seed=7)
    targets = torch.from_numpy(np.random.default_rng(8).uniform(1, 5, size=(4, 5)))

    def outer(value: torch.Tensor) -> torch.Tensor:
        out = adapt_and_score(config, inner, schema, {**params, name: value}, batch)
        return ((out.query_scores - targets) ** 2).mean()

    value = params[name].clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(outer(value), value)
    numeric = central_differences(outer, value)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    assert analytic.abs().max() > 1e-6  # the memory does receive a gradient


def test_step_size_memory_acts_only_through_the_inner_loop(float64):
    """With no inner steps the step-size values change nothing; with steps their gradient
    is the second-order one (first_order drops the inner gradients' dependence on theta)."""
    schema = small_schema()
    config = replace(M.ModelConfig(factors=3), memory_slots=3)
    batch = mixed_batch(schema, seed=2)
    no_steps = learner_config("warmstart", 0)
    params = with_memory(model_params(M.ModelConfig(factors=3), no_steps, schema), config, schema, values_scale=0.3)
    moved = {**params, memory.STEP_VALUES: params[memory.STEP_VALUES] + 1.0}
    assert torch.equal(adapt_and_score(config, no_steps, schema, params, batch).query_scores, adapt_and_score(config, no_steps, schema, moved, batch).query_scores)
    grads = {}
    for first_order in (False, True):
        inner = replace(learner_config("warmstart", 2), first_order=first_order)
        params = with_memory(model_params(M.ModelConfig(factors=3), inner, schema), config, schema, values_scale=0.3)
        values = params[memory.STEP_VALUES].clone().requires_grad_(True)
        out = adapt_and_score(config, inner, schema, {**params, memory.STEP_VALUES: values}, batch)
        (grads[first_order],) = torch.autograd.grad(out.query_scores.pow(2).mean(), values)
    assert grads[False].abs().max() > 1e-6
    assert not torch.allclose(grads[False], grads[True])


def test_engagement_memory_gradient_matches_finite_differences(float64):
    schema = small_schema()
    config = replace(SERVED, memory_slots=3)
    inner = learner_config("warmstart", 2)
    params = with_memory(model_params(SERVED, inner, schema), config, schema, values_scale=0.3)
    batch = mixed_batch(schema, seed=4)
    catalog = catalog_codes(schema)

    def outer(value: torch.Tensor) -> torch.Tensor:
        p = {**params, memory.ENGAGEMENT_VALUES: value}
        _, support_p = M.item_engagement(config, schema, p, batch.support_items)
        phi = adapt_engagement(config, inner, p, support_p, batch.support_mask, memory.engagement_start(config, schema, p, batch))
        c, cat_p = M.item_engagement(config, schema, p, catalog)
        return torch.log_softmax(M.engagement_scores(p, c, cat_p, phi), dim=1)[:, :3].mean()

    value = params[memory.ENGAGEMENT_VALUES].clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(outer(value), value)
    numeric = central_differences(outer, value)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)
    assert analytic.abs().max() > 1e-6


def test_memory_needs_the_bias_factor_model():
    with pytest.raises(ValueError, match="memory"):
        M.ModelConfig(kind="mlp", memory_slots=2)
    with pytest.raises(ValueError, match="memory_slots"):
        M.ModelConfig(memory_slots=-1)
    with pytest.raises(ValueError, match="no memory"):
        memory.init_memory_params(M.ModelConfig(), small_schema())


def test_inspection_lists_every_slot_and_attribute_value(float64):
    schema = small_schema()
    config = replace(SERVED, memory_slots=4)
    params = with_memory(model_params(SERVED, WARMSTART, schema), config, schema, values_scale=0.2)
    batch = mixed_batch(schema)
    report = memory.inspect(config, schema, params, [batch])
    slot_rows = [line for line in report.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert sorted(int(r.split("|")[1]) for r in slot_rows) == [0, 1, 2, 3]
    assert abs(sum(float(r.split("|")[2]) for r in slot_rows) - 1.0) < 0.01  # attention mass sums to one
    codes = set(batch.user_features[:, 0].tolist())
    attribute_rows = [line for line in report.splitlines() if line.startswith("| group |")]
    assert len(attribute_rows) == len(codes - {0})  # one row per value present (padding is no value)


@pytest.mark.parametrize("user_attributes", [True, False], ids=["with_user_attributes", "without_user_attributes"])
def test_exported_graph_computes_what_training_computes(tmp_path, user_attributes):
    """The memory is traced into the adapt-then-score graph with the rest: onnxruntime and
    the torch.export program agree with training's inner loop to 1e-4 (export's own check,
    on its ragged shapes, one user with no interactions among them)."""
    from training import export as E
    from training.dataset import LabelSpec
    from training.features import FeatureSchema
    from training.trainer import AdaptedModel
    from warmstart.torch_program import load_program

    schema = small_schema()
    if not user_attributes:
        schema = FeatureSchema((), schema.item_fields)
    # 4 factors and 3 engagement factors: the sizes export.trace would trace with unless it
    # picked free ones (its symbolic trace gives equal sizes one symbol).
    served_config = M.ModelConfig(factors=4, engagement_factors=3)
    config = replace(served_config, memory_slots=3)
    inner = learner_config("warmstart", 1)  # one unrolled step keeps the graph, and the export, small
    with torch.no_grad():
        params = with_memory(model_params(served_config, inner, schema), config, schema, values_scale=0.3)
    params = {k: v.float() for k, v in params.items()}
    adapted = AdaptedModel(config, inner, schema, LabelSpec("rating", 1.0, 5.0), params)
    batch = E.random_batch(schema, E.CheckShape(5, 6, 4, ragged=True), np.random.default_rng(0), adapted.label)
    served = AdaptedModel(served_config, inner, schema, adapted.label, params)
    with torch.no_grad():
        assert not torch.allclose(adapted.forward(batch)[0], served.forward(batch)[0])  # the memory is read
    fused = E.trace(adapted)
    example = E.random_batch(schema, E.CheckShape(2, 3, 4, ragged=True), np.random.default_rng(1), adapted.label)
    program = torch.export.export(fused, tuple(example), dynamic_shapes=E._dynamic_shapes())
    assert not E.device_pinned_nodes(program)
    E.save_program(program, tmp_path / E.TORCH_PROGRAM_FILE)
    with E._quiet_exporters():
        E._onnx_export(program, E.output_names(adapted)).save(str(tmp_path / "model.onnx"))
    checks = E.verify(adapted, tmp_path / "model.onnx", load_program(tmp_path / E.TORCH_PROGRAM_FILE))
    assert len(checks) == len(E.CHECK_SHAPES)
    for check in checks:
        assert check.max_abs_diff_onnx <= 1e-4 and check.max_abs_diff_torch_export <= 1e-4, check


def test_memory_learner_trains_only_the_memory_on_top_of_the_served_model():
    """The memory phases start from the served model's meta-trained parameters, leave every
    one of them as it is, and their first validation is the served model's."""
    from training.harness import fit_context
    from training.initialisation import meta_train, train_memory_phases
    from training.splits import Protocol, make_splits
    from training.synthetic import generate_synthetic
    from training.trainer import TrainConfig

    dataset = generate_synthetic(seed=3, n_users=160, n_items=100)
    context = fit_context(dataset, make_splits(dataset, Protocol(folds=4))[0], (1, 5, None))
    train_config = TrainConfig(meta_steps=20, eval_every=10, meta_batch_size=16, validation_support_sizes=(1, 5, None))
    served_config = M.served_config(factors=8, engagement_factors=4)
    inner = learner_config("memory")
    served = meta_train(dataset, context.train, context.valid_tasks, served_config, inner, train_config, support_sizes=(1, 5, None))
    config = replace(served_config, memory_slots=3)
    model, result, _ = train_memory_phases(dataset, context.train, context.valid_tasks, config, inner, train_config, served)
    assert model.model_config.memory_slots == 3 and model.model_config.engagement_factors == 4
    served_params = served[0].params
    for name, value in model.params.items():
        if not memory.is_memory_parameter(name):
            assert torch.equal(value, served_params[name]), name
    assert {memory.KEYS, memory.START_VALUES, memory.STEP_VALUES, memory.ENGAGEMENT_VALUES} <= set(model.params)
    phases = [(h["phase"], h["step"]) for h in result.history if h.get("phase", "").startswith("memory")]
    assert phases == [("memory", 0), ("memory", 10), ("memory", 20), ("memory_engagement", 0), ("memory_engagement", 10), ("memory_engagement", 20)]
    first = next(h for h in result.history if h.get("phase") == "memory")
    assert first["valid_loss"] == pytest.approx(served[1].best_validation_loss, abs=2e-6)  # the zero read is the served model
    assert result.best_validation_loss <= served[1].best_validation_loss + 1e-6
    assert result.memory_wall_time_s > 0 and result.wall_time_s > served[1].wall_time_s


def test_evaluation_trains_the_served_model_once_for_warmstart_and_memory():
    from training.methods import Memory, MetaLearned, make_methods
    from training.topn import make_topn_methods
    from training.trainer import TrainConfig

    for methods in (make_methods(["warmstart", "memory"], TrainConfig()), make_topn_methods(["warmstart", "memory"], TrainConfig())):
        warmstart, memorised = methods
        assert isinstance(memorised, Memory) and memorised.model_config.memory_slots > 0
        assert warmstart.served is memorised.served is not None
        assert replace(memorised.model_config, memory_slots=0) == warmstart.model_config
    (alone,) = make_methods(["memory"], TrainConfig())
    assert alone.served == {}  # nothing to share: it trains the served model itself
    assert isinstance(make_methods(["warmstart"], TrainConfig())[0], MetaLearned)
