"""Where meta-training starts, and the meta-training run itself (the production path).

Everything here is derived from training data and validation users only: the encoded
catalog and episode samplers, the item side (shrunk item biases, ALS factors, the
attribute prior, the engagement head's popularity and SVD start), the inner loop's
starting step sizes (a diagonal Newton step of the ridge fold-in the baselines make), the
settings the validation users choose, and then `meta_train`, which runs the rating phase
and, for a model with an engagement head, the engagement phase. Nothing here imports the
evaluation harness: the harness's adapters live in training.methods.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training import model as M
from training.baselines import BiasBaseline, ItemStats
from training.batching import EncodedCatalog, EpisodeSampler
from training.dataset import Dataset, LabelSpec
from training.distributed import Collective
from training.features import FeatureSchema, build_schema
from training.fitting import FitContext
from training.inner_loop import InnerLoopConfig
from training.learners import logit
from training.memory import ENGAGEMENT_PREFIX, MEMORY_PREFIX, init_memory_params
from training.splits import Task
from training.trainer import AdaptedModel, MetaTrainer, TrainConfig, TrainResult, validation_loss

log = logging.getLogger(__name__)


@dataclass
class EpisodeSource:
    """Training users to cut episodes from, and the item side to score them with.

    With cross-fitting there are two: each half of the training users is scored by an item
    side fitted on the other half only, so a user's own query ratings never shaped the item
    biases and factors the inner loop adapts against (as at serving time, for new users).
    """

    sampler: EpisodeSampler
    item_params: M.Params  # overrides for the frozen item-side parameters


@dataclass
class Prepared:
    """Everything a meta-training run needs, derived from training data only."""

    schema: FeatureSchema
    catalog: EncodedCatalog
    sampler: EpisodeSampler  # every training user, with the full item side
    stats: M.DataStats  # the full item side: what is served
    user_shrinkage: float  # the bias baseline's tuned ridge weight: the inner loop's starting point
    factor_moment: np.ndarray | None = None  # per-coordinate second moment of the starting item factors
    sources: list[EpisodeSource] = field(default_factory=list)  # cross-fitted halves (empty: none)
    item_stats: ItemStats | None = None  # label sums and counts per item (for the attribute prior)
    item_shrinkage: float = 0.0  # the bias baseline's tuned item shrinkage
    engagement_moment: np.ndarray | None = None  # per-coordinate second moment of the starting engagement factors
    engaged: Dataset | None = None  # the training interactions that count as engagement


def prepare(
    dataset: Dataset,
    train: Dataset,
    valid_tasks: Sequence[Task],
    model_config: M.ModelConfig,
    train_config: TrainConfig,
    support_sizes: Sequence[int | None],
) -> Prepared:
    """Schema, encoded catalog, episode sampler(s) and the item side for one training set.

    The tuned bias baseline supplies the starting point: its shrinkages set the item base
    biases and seed the inner loop's offset and pull. For the bias_factor model with a
    frozen item side, episodes are cross-fitted (see EpisodeSource).
    """
    schema = build_schema(dataset, train.factorized("item_ids")[0], use_item_id=model_config.use_item_id)
    catalog = EncodedCatalog(schema, dataset)
    bias = BiasBaseline()
    bias.fit(_bias_context(dataset, train, valid_tasks, support_sizes))
    user_shrinkage = max(bias.user_shrinkage, 0.5)
    if model_config.item_biases == "als" and dataset.label.kind == "rating":
        user_shrinkage = model_config.bias_reg_user  # the inner loop starts at BaselineOnly's fold-in
    stats, moment = item_side(dataset, train, schema, catalog, bias.item_shrinkage, user_shrinkage, model_config)
    if model_config.attribute_prior == "on":
        stats = with_attribute_prior(stats, schema, catalog, ItemStats.of(train), bias.item_shrinkage, model_config.attribute_prior_l2)
    engagement_moment, engaged = None, None
    if model_config.engagement_factors:
        engaged = train if dataset.label.kind != "click" else train.subset(train.labels > 0.5)
        stats.engagement_start, engagement_moment = engagement_side(engaged, schema, model_config.engagement_factors, train_config.seed)
    learns_items = not (model_config.kind == "bias_factor" and _item_side_frozen(model_config))
    sampler = EpisodeSampler(catalog, train, train_config.episodes, learns_item_side=learns_items)
    prepared = Prepared(
        schema,
        catalog,
        sampler,
        stats,
        user_shrinkage,
        moment,
        item_stats=ItemStats.of(train),
        item_shrinkage=bias.item_shrinkage,
        engagement_moment=engagement_moment,
        engaged=engaged,
    )
    if model_config.kind == "bias_factor" and model_config.cross_fit and _item_side_frozen(model_config):
        prepared.sources = cross_fitted_sources(dataset, train, prepared, model_config, train_config)
    return prepared


def cross_fitted_sources(
    dataset: Dataset, train: Dataset, prep: Prepared, model_config: M.ModelConfig, train_config: TrainConfig
) -> list[EpisodeSource]:
    """Two episode sources: each half of the training users, scored with an item side fitted
    on the other half only (see EpisodeSource)."""
    schema, catalog = prep.schema, prep.catalog
    sources = []
    users, user_codes = train.factorized("user_ids")
    halves = np.random.default_rng([train_config.seed, 7]).permutation(len(users)) % 2
    for half in (0, 1):
        is_own = (halves == half)[user_codes]
        other_train = train.subset(~is_own)
        other_stats, _ = item_side(dataset, other_train, schema, catalog, prep.item_shrinkage, prep.user_shrinkage, model_config)
        if model_config.attribute_prior == "on":
            other_stats = with_attribute_prior(
                other_stats, schema, catalog, ItemStats.of(other_train), prep.item_shrinkage, model_config.attribute_prior_l2
            )
        other = M.init_params(model_config, schema, other_stats, seed=train_config.seed)
        sources.append(
            EpisodeSource(
                EpisodeSampler(catalog, train.subset(is_own), train_config.episodes, learns_item_side=False),
                {k: v for k, v in other.items() if k.startswith("item.")},
            )
        )
    return sources


def engagement_side(engaged: Dataset, schema: FeatureSchema, factors: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """The engagement head's starting id table (rows = id codes) and factor second moment."""
    from training.factor_init import engagement_start

    id_field = schema.item_id_field
    if id_field is None or len(engaged) == 0:
        raise ValueError("the engagement head needs item ids and at least one engaged training interaction")
    start = engagement_start(engaged.user_ids, engaged.item_ids, factors, seed=seed)
    table = torch.zeros(id_field.num_codes, 1 + factors)
    code_of = {item: code for code, item in enumerate(id_field.vocabulary, start=2)}
    for row, item in zip(start.table, start.items):
        if item in code_of:
            table[code_of[item]] = torch.from_numpy(row).float()
    return table, start.second_moment


def engagement_inner_start(prep: Prepared, catalog_weight: float = 1.0, pull: float = 1.0) -> M.Params:
    """Engagement inner-loop settings that make the first step a diagonal Newton step of the
    implicit least-squares fold-in (see training.inner_loop.adapt_and_score): with the
    starting factors' mean outer product the identity, the curvature of coordinate k is
    2 (n m_k + alpha + pull) for a support of n items with second moment m_k."""
    from training.inner_loop import CATALOG_WEIGHT

    if prep.engagement_moment is None:
        raise ValueError("no engagement head prepared")
    moment = torch.from_numpy(prep.engagement_moment).float()
    name = M.ENGAGEMENT_USER
    return {
        CATALOG_WEIGHT: torch.tensor(math.log(catalog_weight)),
        f"inner.log_lr.{name}": torch.log(0.5 / moment),
        f"inner.log_offset.{name}": torch.log((catalog_weight + pull) / moment),
        f"inner.log_pull.{name}": torch.full_like(moment, math.log(pull)),
    }


def rating_only(config: M.ModelConfig) -> M.ModelConfig:
    """The same model without its engagement head (for tuning and training the rating head)."""
    return replace(config, engagement_factors=0)


def _item_side_frozen(config: M.ModelConfig) -> bool:
    return any("item.".startswith(prefix) for prefix in config.frozen)


def item_side(
    dataset: Dataset,
    train: Dataset,
    schema: FeatureSchema,
    catalog: EncodedCatalog,
    item_shrinkage: float,
    user_shrinkage: float,
    config: M.ModelConfig,
) -> tuple[M.DataStats, np.ndarray | None]:
    """The item side fitted on `train`: base biases (shrunk toward the mean, or fitted jointly
    with the users' by ALS: config.item_biases) and ALS factors of what they leave unexplained."""
    stats = ItemStats.of(train)
    id_field = schema.item_id_field
    base = torch.zeros(id_field.num_codes if id_field is not None else 0)
    mean = stats.mean
    if dataset.label.kind == "click":
        mean = logit(stats.mean)
    joint = joint_biases(train, config) if config.item_biases == "als" and dataset.label.kind == "rating" else None
    if id_field is not None:
        if joint is not None:
            mean = joint.mu
            base[2:] = torch.from_numpy(joint.item_bias(list(id_field.vocabulary))).float()
        else:
            shrunk = stats.shrunk_means(list(id_field.vocabulary), item_shrinkage)
            if dataset.label.kind == "click":
                shrunk = np.array([logit(p) for p in shrunk])
            base[2:] = torch.from_numpy(shrunk - mean).float()
    data_stats = M.DataStats(mean, base, len(train))
    moment = None
    if config.kind == "bias_factor" and config.factor_init == "als" and id_field is not None and dataset.label.kind == "rating":
        if joint is not None:
            residual = train.labels - joint.mu - joint.item_bias(train.item_ids) - joint.user_bias_of(train.user_ids)
        else:
            residual = _bias_residual(train, stats, item_shrinkage, user_shrinkage)
        factors, moment = _als_start(train, residual, id_field, config)
        data_stats.item_factors = factors
    return data_stats, moment


@dataclass
class JointBiases:
    """Item and user biases fitted jointly by regularised ALS on the training ratings."""

    mu: float
    codes: dict[str, int]
    item_biases: np.ndarray
    user_codes: dict[str, int]
    user_biases: np.ndarray

    def item_bias(self, items: Sequence[str]) -> np.ndarray:
        """Each item's bias; 0 for an item training has no rating of."""
        return np.fromiter((self.item_biases[self.codes[i]] if i in self.codes else 0.0 for i in items), np.float64, len(items))

    def user_bias_of(self, users: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.user_biases[self.user_codes[u]] for u in users), np.float64, len(users))


def joint_biases(train: Dataset, config: M.ModelConfig) -> JointBiases:
    """BaselineOnly's fit (ALS, 10 epochs) with the model's regularisation weights."""
    from training.baselines import Encoded, als_biases

    data = Encoded.of(train)
    mu, user_bias, item_bias = als_biases(data, config.bias_reg_item, config.bias_reg_user, epochs=10)
    return JointBiases(mu, data.item_code, item_bias, {u: c for c, u in enumerate(data.user_ids.tolist())}, user_bias)


def _bias_residual(train: Dataset, stats: ItemStats, item_shrinkage: float, user_shrinkage: float) -> np.ndarray:
    """What the shrunk item mean and a ridge user bias leave unexplained."""
    distinct_items, item_codes = train.factorized("item_ids")
    residual = train.labels - stats.shrunk_means(distinct_items.tolist(), item_shrinkage)[item_codes]  # per distinct item, then gathered
    users, index = train.factorized("user_ids")
    sums = np.bincount(index, weights=residual, minlength=len(users))
    counts = np.bincount(index, minlength=len(users))
    return residual - (sums / (counts + user_shrinkage))[index]


def _als_start(train: Dataset, residual: np.ndarray, id_field, config: M.ModelConfig):
    """Item-id factors from ALS on what the biases leave unexplained (see factor_init)."""
    from training.factor_init import als_item_factors

    result = als_item_factors(train.factorized("user_ids"), train.factorized("item_ids"), residual, config.factors, config.als_l2, seed=0)
    table = torch.zeros(id_field.num_codes, config.factors)
    for code, item in enumerate(id_field.vocabulary, start=2):
        if item in result.item_factors:
            table[code] = torch.from_numpy(result.item_factors[item]).float()
    return table, np.maximum(result.second_moment, 1e-4)


ATTRIBUTE_PRIOR_MAX_COLUMNS = 4000  # above this the normal equations get too large to solve here


def with_attribute_prior(
    data: M.DataStats, schema, catalog: EncodedCatalog, stats: ItemStats, item_shrinkage: float, l2: float
) -> M.DataStats:
    """Shrinks items toward what their attributes predict instead of toward the mean.

    A ridge fit of item deviations and ALS factors on pooled attributes gives the attribute
    tables; each known item keeps its own evidence on top: base bias = shrunk deviation from
    the attribute prediction, id factors = ALS factors minus the attribute part. New items
    (the out-of-vocabulary id) get the attribute prediction alone.
    """
    from training.factor_init import attribute_prior, pooled_one_hot

    id_field = schema.item_id_field
    fields = [f for f in schema.item_fields if f.name != id_field.name]
    columns = sum(f.num_codes for f in fields)
    if not fields or columns > ATTRIBUTE_PRIOR_MAX_COLUMNS or data.item_factors is None:
        return data
    items = [i for i in id_field.vocabulary if i in stats.counts]  # items this training set has data for
    rows = catalog.rows(items)
    codes = catalog.codes[torch.from_numpy(rows)].numpy()  # (items, item_width)
    design = np.concatenate([pooled_one_hot(codes[:, f.offset : f.offset + f.width], f.num_codes) for f in fields], axis=1)
    counts = np.array([stats.counts[i] for i in items], dtype=np.float64)
    sums = np.array([stats.sums[i] for i in items], dtype=np.float64)
    id_codes = codes[:, id_field.offset]
    factors = data.item_factors[torch.from_numpy(id_codes)].double().numpy()
    reliability = counts / (counts + item_shrinkage)
    targets = np.concatenate([(sums / counts - stats.mean)[:, None], factors], axis=1)
    coefficients = attribute_prior(design, targets, reliability, l2)
    predicted = design @ coefficients  # (items, 1 + factors)
    base = torch.zeros_like(data.item_base_bias)
    base[torch.from_numpy(id_codes)] = torch.from_numpy((sums - counts * (stats.mean + predicted[:, 0])) / (counts + item_shrinkage)).float()
    item_factors = torch.zeros_like(data.item_factors)
    item_factors[torch.from_numpy(id_codes)] = torch.from_numpy(factors - predicted[:, 1:]).float()
    tables = {}
    start = 0
    for f in fields:
        block = torch.from_numpy(coefficients[start : start + f.num_codes]).float()
        tables[f"item.attr_bias.{f.name}"] = block[:, 0].clone()
        tables[f"item.attr_factors.{f.name}"] = block[:, 1:].clone()
        start += f.num_codes
    return replace(data, item_base_bias=base, item_factors=item_factors, attribute_tables=tables)  # the engagement start rides along


def warmstart_inner_start(model_config: M.ModelConfig, prep: Prepared) -> M.Params:
    """Inner-loop parameters that make the first inner step a diagonal Newton step of the
    ridge fit the bias baseline (user bias) and an ALS fold-in (user factors) would make."""
    lam = prep.user_shrinkage
    out: M.Params = {
        "inner.log_lr.user.bias": torch.tensor(math.log(0.5)),
        "inner.log_offset.user.bias": torch.tensor(math.log(lam)),
        "inner.log_pull.user.bias": torch.tensor(math.log(lam)),
    }
    if prep.factor_moment is not None:
        moment = torch.from_numpy(prep.factor_moment).float()
        fold_in = model_config.fold_in_l2
        out["inner.log_lr.user.factors"] = torch.log(0.5 / moment)
        out["inner.log_offset.user.factors"] = torch.log(fold_in / moment)
        out["inner.log_pull.user.factors"] = torch.full_like(moment, math.log(fold_in))
    return out


def _bias_context(dataset: Dataset, train: Dataset, valid_tasks, support_sizes) -> FitContext:
    return FitContext(dataset=dataset, train=train, valid_tasks=list(valid_tasks), support_sizes=tuple(support_sizes), split=None)  # type: ignore[arg-type]


def meta_train(
    dataset: Dataset,
    train: Dataset,
    valid_tasks: Sequence[Task],
    model_config: M.ModelConfig,
    inner_config: InnerLoopConfig,
    train_config: TrainConfig,
    support_sizes: Sequence[int | None] = (1, 5, 10, 20, None),
    checkpoint_dir: Path | None = None,
    log_path: Path | None = None,
    progress: bool = False,
    collective: Collective | None = None,
) -> tuple[AdaptedModel, TrainResult, Prepared]:
    """Prepares and meta-trains one model; returns the best model, the run's record and the prep.

    With a Collective over several processes every process prepares the same data and
    meta-trains its share of each meta-batch (training.distributed).

    A model with a memory (model_config.memory_slots > 0) is the served model meta-trained
    as usual, then the memory alone on top of it (see _train_memory)."""
    if model_config.memory_slots:
        return _train_memory(
            dataset, train, valid_tasks, model_config, inner_config, train_config, support_sizes, checkpoint_dir, log_path, progress, collective
        )
    prep = prepare(dataset, train, valid_tasks, model_config, train_config, support_sizes)
    params = M.init_params(model_config, prep.schema, prep.stats, seed=train_config.seed)
    if (
        model_config.kind == "bias_factor"
        and inner_config.normalise_by_support_size
        and inner_config.prior_pull
        and inner_config.learning_rate_kind == "per_parameter"
    ):
        # Start at the tuned bias baseline plus a ridge fold-in of the user factors; the
        # attribute prior and the fold-in weight are tuned on the validation users like
        # every baseline's settings.
        model_config, params = _tune_attribute_prior(model_config, inner_config, prep, params, dataset, valid_tasks, support_sizes, train_config.seed)
        model_config = _tune_fold_in(model_config, inner_config, prep, params, dataset, valid_tasks, support_sizes)
        start = warmstart_inner_start(model_config, prep)
        adapted = set(model_config.adapted_names())
        params.update({k: v for k, v in start.items() if k.split(".", 2)[2] in adapted})
    trainer = MetaTrainer(
        model_config,
        inner_config,
        train_config,
        prep.schema,
        dataset.label,
        prep.catalog,
        prep.sampler,
        valid_tasks,
        params,
        interactions=len(train),
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        fingerprint=train.fingerprint(),
        sources=[(source.sampler, source.item_params) for source in prep.sources],
        collective=collective,
    )
    result = trainer.run(log_path=log_path)
    if model_config.engagement_factors:
        result = _train_engagement(
            model_config, inner_config, train_config, prep, dataset, train, valid_tasks, result, checkpoint_dir, log_path, progress, collective
        )
    adapted = AdaptedModel(model_config, inner_config, prep.schema, dataset.label, result.params)
    return adapted, result, prep


def _train_engagement(
    model_config: M.ModelConfig,
    inner_config: InnerLoopConfig,
    train_config: TrainConfig,
    prep: Prepared,
    dataset: Dataset,
    train: Dataset,
    valid_tasks: Sequence[Task],
    rating: TrainResult,
    checkpoint_dir: Path | None,
    log_path: Path | None,
    progress: bool,
    collective: Collective | None = None,
) -> TrainResult:
    """The second phase: the engagement head, meta-trained on its listwise objective from the
    rating phase's parameters (which it leaves as they are). Returns both phases' record."""
    from training.inner_loop import init_inner_params

    params = {k: v for k, v in rating.params.items() if k != M.ENGAGEMENT_GRAM}
    if inner_config.normalise_by_support_size and inner_config.prior_pull and inner_config.learning_rate_kind == "per_parameter":
        params.update(engagement_inner_start(prep))
        if valid_tasks:
            params = _tune_engagement_start(model_config, inner_config, prep, params, dataset.label, valid_tasks)
    else:
        defaults = init_inner_params(model_config, inner_config, params)
        params.update({k: v for k, v in defaults.items() if k not in params})
    config = replace(
        train_config,
        objective="engagement",
        episodes=replace(train_config.episodes, query="later", min_support=0, max_support=max(train_config.episodes.max_support, 20)),
    )
    assert prep.engaged is not None
    sampler = EpisodeSampler(prep.catalog, prep.engaged, config.episodes, learns_item_side=True)
    trainer = MetaTrainer(
        model_config,
        inner_config,
        config,
        prep.schema,
        dataset.label,
        prep.catalog,
        sampler,
        valid_tasks,
        params,
        interactions=len(prep.engaged),
        checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir / "engagement",
        progress=progress,
        fingerprint=train.fingerprint(),
        collective=collective,
    )
    result = trainer.run(log_path=None if log_path is None else log_path.with_name(log_path.stem + "_engagement" + log_path.suffix))
    log.info(
        "engagement head: %d meta-steps in %.0f s, best validation Recall@20 %.4f",
        result.steps_done,
        result.wall_time_s,
        -result.best_validation_loss,
    )
    return TrainResult(
        params=result.params,
        best_validation_loss=rating.best_validation_loss,
        steps_done=rating.steps_done,
        wall_time_s=rating.wall_time_s + result.wall_time_s,
        history=[*rating.history, *({**h, "phase": "engagement"} for h in result.history)],
        engagement_recall=-result.best_validation_loss,
        engagement_steps=result.steps_done,
    )


FOLD_IN_GRID = (3.0, 10.0, 30.0, 100.0, 300.0)
ENGAGEMENT_STEP_GRID = (1 / 4, 1 / 16, 1 / 64, 1 / 256)  # multiples of the diagonal Newton step
ENGAGEMENT_SCALE_GRID = (1.0, 3.0, 10.0)  # weight of the personal part against popularity


def _tune_engagement_start(
    model_config: M.ModelConfig, inner_config: InnerLoopConfig, prep: Prepared, params: M.Params, label: LabelSpec, valid_tasks: Sequence[Task]
) -> M.Params:
    """The engagement head's starting step size and personal weight, by validation Recall@20.

    The diagonal Newton step overshoots on the strongly correlated factors of a support set
    (its items share the leading singular directions), so the start takes a fraction of it;
    which fraction, and how much the fitted user counts against popularity, the validation
    users decide, as for every other starting setting.
    """
    from training.trainer import ENGAGEMENT_VALIDATION_SIZES, MetaTrainer, catalog_recall, ranked_catalog_rows

    rows = ranked_catalog_rows(prep.catalog, prep.schema)
    probe = MetaTrainer.ranked_gram  # one definition of the Gram matrix over the ranked catalog
    scores, built = {}, {}
    for fraction in ENGAGEMENT_STEP_GRID:
        for weight in ENGAGEMENT_SCALE_GRID:
            candidate = dict(params)
            candidate[f"inner.log_lr.{M.ENGAGEMENT_USER}"] = params[f"inner.log_lr.{M.ENGAGEMENT_USER}"] + math.log(fraction)
            candidate["eng.log_scale"] = torch.tensor(math.log(weight))
            with torch.no_grad():
                scored = probe(model_config, prep.schema, candidate, prep.catalog, rows)
            model = AdaptedModel(model_config, inner_config, prep.schema, label, scored)
            scores[(fraction, weight)] = catalog_recall(model, prep.catalog, rows, valid_tasks, ENGAGEMENT_VALIDATION_SIZES)
            built[(fraction, weight)] = candidate
    best = max(scores, key=scores.__getitem__)
    log.info(
        "engagement start: step fraction %.4g, personal weight %g (validation Recall@20 %.4f; grid %s)",
        best[0], best[1], scores[best], {f"{k[0]:.4g}/{k[1]:g}": round(v, 4) for k, v in scores.items()},
    )
    return built[best]


ATTRIBUTE_PRIOR_GRID = (3.0, 30.0, 300.0, 3000.0)


def _tune_attribute_prior(
    model_config: M.ModelConfig,
    inner_config: InnerLoopConfig,
    prep: Prepared,
    params: M.Params,
    dataset: Dataset,
    valid_tasks: Sequence[Task],
    support_sizes: Sequence[int | None],
    seed: int,
) -> tuple[M.ModelConfig, M.Params]:
    """Attribute prior off, or on with the ridge weight the validation users prefer."""
    if model_config.attribute_prior != "tune" or prep.factor_moment is None or prep.item_stats is None or not valid_tasks:
        return replace(model_config, attribute_prior="off") if model_config.attribute_prior == "tune" else model_config, params
    candidates: dict[float | None, M.DataStats] = {None: prep.stats}
    for weight in ATTRIBUTE_PRIOR_GRID:
        candidates[weight] = with_attribute_prior(prep.stats, prep.schema, prep.catalog, prep.item_stats, prep.item_shrinkage, weight)
    scores, built = {}, {}
    for weight, stats in candidates.items():
        candidate = {**params, **M.init_params(model_config, prep.schema, stats, seed=seed)}
        candidate.update(warmstart_inner_start(model_config, prep))
        model = AdaptedModel(rating_only(model_config), inner_config, prep.schema, dataset.label, {k: v.detach() for k, v in candidate.items()})
        scores[weight] = validation_loss(model, prep.catalog, valid_tasks, support_sizes)
        built[weight] = {k: v for k, v in candidate.items() if not k.startswith("inner.")}
    best = min(scores, key=scores.__getitem__)
    log.info("attribute prior %s (validation loss %.4f; grid %s)", "off" if best is None else f"ridge weight {best:g}", scores[best], {str(k): round(v, 4) for k, v in scores.items()})
    prep.stats = candidates[best]
    chosen = replace(model_config, attribute_prior="off") if best is None else replace(model_config, attribute_prior="on", attribute_prior_l2=best)
    return chosen, {**params, **built[best]}


def _tune_fold_in(
    model_config: M.ModelConfig,
    inner_config: InnerLoopConfig,
    prep: Prepared,
    params: M.Params,
    dataset: Dataset,
    valid_tasks: Sequence[Task],
    support_sizes: Sequence[int | None],
) -> M.ModelConfig:
    """The fold-in ridge weight with the lowest validation loss at the starting point."""
    if prep.factor_moment is None or "user.factors" not in model_config.adapted_names() or not valid_tasks:
        return model_config
    scores = {}
    for weight in FOLD_IN_GRID:
        candidate = replace(model_config, fold_in_l2=weight)
        start = {**params, **warmstart_inner_start(candidate, prep)}
        model = AdaptedModel(rating_only(candidate), inner_config, prep.schema, dataset.label, {k: v.detach() for k, v in start.items()})
        scores[weight] = validation_loss(model, prep.catalog, valid_tasks, support_sizes)
    best = min(scores, key=scores.__getitem__)
    log.info("fold-in ridge weight %.3g (validation loss %.4f; grid %s)", best, scores[best], {k: round(v, 4) for k, v in scores.items()})
    return replace(model_config, fold_in_l2=best)


MEMORY_EVAL_EVERY = 20  # meta-steps between the memory phases' validations (at most)
MEMORY_PATIENCE = 5  # their evaluations without improvement before stopping (at most)


def _train_memory(
    dataset: Dataset,
    train: Dataset,
    valid_tasks: Sequence[Task],
    model_config: M.ModelConfig,
    inner_config: InnerLoopConfig,
    train_config: TrainConfig,
    support_sizes: Sequence[int | None],
    checkpoint_dir: Path | None,
    log_path: Path | None,
    progress: bool,
    collective: Collective | None,
) -> tuple[AdaptedModel, TrainResult, Prepared]:
    """The memory learner: the served model, meta-trained exactly as `meta_train` trains it
    (same checkpoints and log), then the memory phases on top of it (train_memory_phases)."""
    served = meta_train(
        dataset, train, valid_tasks, replace(model_config, memory_slots=0), inner_config, train_config, support_sizes, checkpoint_dir, log_path, progress, collective
    )
    return train_memory_phases(dataset, train, valid_tasks, model_config, inner_config, train_config, served, checkpoint_dir, log_path, progress, collective)


def train_memory_phases(
    dataset: Dataset,
    train: Dataset,
    valid_tasks: Sequence[Task],
    model_config: M.ModelConfig,
    inner_config: InnerLoopConfig,
    train_config: TrainConfig,
    served: tuple[AdaptedModel, TrainResult, Prepared],
    checkpoint_dir: Path | None = None,
    log_path: Path | None = None,
    progress: bool = False,
    collective: Collective | None = None,
    cross_fit: bool = True,
) -> tuple[AdaptedModel, TrainResult, Prepared]:
    """The memory (training.memory) meta-trained alone on top of a meta-trained served model
    (`served`: what meta_train returned for model_config without the memory), its values
    starting at zero so that its first validation is the served model's. The rating memory
    (keys, attribute tables, theta_0 and step-size values) is meta-trained on the rating
    objective; with the engagement head, its phi_0 values are then meta-trained on the
    listwise objective with the attention fixed. Early stopping on the same validation
    users keeps the served model if the memory never improves on it.

    cross_fit: the rating memory learns from episodes cross-fitted like
    ModelConfig.cross_fit's (each half of the training users scored with an item side fitted
    on the other half), because a training user's own ratings shaped the item side: what the
    memory learned from them about a user's start did not transfer to new users (on
    MovieLens-100K the validation loss rose from the first evaluation on)."""
    served_model, base, prep = served
    # The served model is where validation stopped improving: the memory's gains, if any,
    # come in its first meta-steps (on MovieLens-100K validation users: within 20-40, then
    # the validation loss rises), so its phases validate often and stop soon.
    train_config = replace(
        train_config,
        eval_every=min(train_config.eval_every, MEMORY_EVAL_EVERY),
        patience=min(train_config.patience, MEMORY_PATIENCE) if train_config.patience else 0,
    )
    # The served run's tuned settings (attribute prior, fold-in weight) plus the memory.
    config = replace(served_model.model_config, memory_slots=model_config.memory_slots, memory_key_dim=model_config.memory_key_dim)
    params = {k: v for k, v in base.params.items() if k != M.ENGAGEMENT_GRAM}
    params.update(init_memory_params(config, prep.schema, seed=train_config.seed))
    memory_dir = None if checkpoint_dir is None else checkpoint_dir / "memory"
    sources = prep.sources or (cross_fitted_sources(dataset, train, prep, config, train_config) if cross_fit else [])

    def phase_log(name: str) -> Path | None:
        return None if log_path is None else log_path.with_name(f"{log_path.stem}_{name}{log_path.suffix}")

    rating = MetaTrainer(
        config,
        inner_config,
        train_config,
        prep.schema,
        dataset.label,
        prep.catalog,
        prep.sampler,
        valid_tasks,
        params,
        interactions=len(train),
        checkpoint_dir=memory_dir,
        progress=progress,
        fingerprint=train.fingerprint(),
        sources=[(source.sampler, source.item_params) for source in sources],
        collective=collective,
        trainable_prefixes=(MEMORY_PREFIX,),
    ).run(log_path=phase_log("memory"))
    log.info(
        "memory (rating): %d meta-steps in %.0f s, validation loss %.4f (served model %.4f)",
        rating.steps_done, rating.wall_time_s, rating.best_validation_loss, rating.history[0]["valid_loss"] if rating.history else float("nan"),
    )
    phases = [{**h, "phase": "memory"} for h in rating.history]
    result_params, engagement_steps, engagement_recall, wall = rating.params, base.engagement_steps, base.engagement_recall, rating.wall_time_s
    if config.engagement_factors:
        engagement_config = replace(
            train_config,
            objective="engagement",
            episodes=replace(train_config.episodes, query="later", min_support=0, max_support=max(train_config.episodes.max_support, 20)),
        )
        assert prep.engaged is not None
        engagement = MetaTrainer(
            config,
            inner_config,
            engagement_config,
            prep.schema,
            dataset.label,
            prep.catalog,
            EpisodeSampler(prep.catalog, prep.engaged, engagement_config.episodes, learns_item_side=True),
            valid_tasks,
            {k: v for k, v in rating.params.items() if k != M.ENGAGEMENT_GRAM},
            interactions=len(prep.engaged),
            checkpoint_dir=None if memory_dir is None else memory_dir / "engagement",
            progress=progress,
            fingerprint=train.fingerprint(),
            collective=collective,
            trainable_prefixes=(ENGAGEMENT_PREFIX,),
        ).run(log_path=phase_log("memory_engagement"))
        log.info(
            "memory (engagement): %d meta-steps in %.0f s, validation Recall@20 %.4f (served model %.4f)",
            engagement.steps_done, engagement.wall_time_s, -engagement.best_validation_loss,
            -engagement.history[0]["valid_loss"] if engagement.history else float("nan"),
        )
        phases += [{**h, "phase": "memory_engagement"} for h in engagement.history]
        result_params, engagement_recall, wall = engagement.params, -engagement.best_validation_loss, wall + engagement.wall_time_s
    result = TrainResult(
        params=result_params,
        best_validation_loss=rating.best_validation_loss,
        steps_done=base.steps_done + rating.steps_done,
        wall_time_s=base.wall_time_s + wall,
        history=[*base.history, *phases],
        engagement_recall=engagement_recall,
        engagement_steps=engagement_steps,
        memory_wall_time_s=wall,
    )
    return AdaptedModel(config, inner_config, prep.schema, dataset.label, result_params), result, prep
