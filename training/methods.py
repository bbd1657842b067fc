"""Learned methods for the evaluation harness, and the named learners.

Learners (how the inner loop is configured and meta-trained):

- ``maml``: one fixed step size on the mean support loss, true second-order meta-gradient.
- ``fomaml``: the same with the first-order approximation.
- ``metasgd``: a learned step size per adapted coordinate (Meta-SGD), second order.
- ``warmstart``: the served learner: Meta-SGD step sizes normalised by support size
  (lr / (n + c), c learned) plus a learned pull toward the initialisation, second order.
  On the bias_factor model it starts exactly at the tuned bias baseline.
- ``none``: no inner loop at training (plain supervised training of the same network),
  used for the "without adaptation" and "fine-tuned" baselines.
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
from training.features import FeatureSchema, build_schema
from training.harness import FitContext
from training.inner_loop import InnerLoopConfig
from training.splits import Task
from training.distributed import Collective
from training.trainer import AdaptedModel, MetaTrainer, TrainConfig, TrainResult, validation_loss

log = logging.getLogger(__name__)

LEARNERS = ("maml", "fomaml", "metasgd", "warmstart", "none")


def learner_config(learner: str, steps: int = 5, learning_rate: float | None = None) -> InnerLoopConfig:
    """The inner-loop configuration of a named learner."""
    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; choose from {LEARNERS}")
    if learner == "warmstart":
        return InnerLoopConfig(steps=steps, learning_rate=learning_rate or 0.5)
    if learner == "none":
        return InnerLoopConfig(
            steps=0,
            learning_rate=learning_rate or 0.1,
            learning_rate_kind="scalar",
            learn_learning_rate=False,
            normalise_by_support_size=False,
            prior_pull=False,
            max_step_norm=0.0,
        )
    return InnerLoopConfig(
        steps=steps,
        learning_rate=learning_rate or 0.1,
        learning_rate_kind="per_parameter" if learner == "metasgd" else "scalar",
        learn_learning_rate=learner == "metasgd",
        normalise_by_support_size=False,
        prior_pull=False,
        max_step_norm=2.0,
        first_order=learner == "fomaml",
    )


def logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


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
    stats, moment = item_side(dataset, train, schema, catalog, bias.item_shrinkage, user_shrinkage, model_config)
    if model_config.attribute_prior == "on":
        stats = with_attribute_prior(stats, schema, catalog, ItemStats.of(train), bias.item_shrinkage, model_config.attribute_prior_l2)
    learns_items = not (model_config.kind == "bias_factor" and _item_side_frozen(model_config))
    sampler = EpisodeSampler(catalog, train, train_config.episodes, learns_item_side=learns_items)
    prepared = Prepared(
        schema, catalog, sampler, stats, user_shrinkage, moment, item_stats=ItemStats.of(train), item_shrinkage=bias.item_shrinkage
    )
    if model_config.kind == "bias_factor" and model_config.cross_fit and _item_side_frozen(model_config):
        users, user_codes = train.factorized("user_ids")
        halves = np.random.default_rng([train_config.seed, 7]).permutation(len(users)) % 2
        for half in (0, 1):
            is_own = (halves == half)[user_codes]
            other_train = train.subset(~is_own)
            other_stats, _ = item_side(dataset, other_train, schema, catalog, bias.item_shrinkage, user_shrinkage, model_config)
            if model_config.attribute_prior == "on":
                other_stats = with_attribute_prior(
                    other_stats, schema, catalog, ItemStats.of(other_train), bias.item_shrinkage, model_config.attribute_prior_l2
                )
            other = M.init_params(model_config, schema, other_stats, seed=train_config.seed)
            prepared.sources.append(
                EpisodeSource(
                    EpisodeSampler(catalog, train.subset(is_own), train_config.episodes, learns_item_side=False),
                    {k: v for k, v in other.items() if k.startswith("item.")},
                )
            )
    return prepared


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
    """The item side fitted on `train`: base biases (shrunk toward the mean) and ALS factors."""
    stats = ItemStats.of(train)
    id_field = schema.item_id_field
    base = torch.zeros(id_field.num_codes if id_field is not None else 0)
    mean = stats.mean
    if dataset.label.kind == "click":
        mean = logit(stats.mean)
    if id_field is not None:
        shrunk = stats.shrunk_means(list(id_field.vocabulary), item_shrinkage)
        if dataset.label.kind == "click":
            shrunk = np.array([logit(p) for p in shrunk])
        base[2:] = torch.from_numpy(shrunk - mean).float()
    data_stats = M.DataStats(mean, base, len(train))
    moment = None
    if config.kind == "bias_factor" and config.factor_init == "als" and id_field is not None and dataset.label.kind == "rating":
        factors, moment = _als_start(train, stats, item_shrinkage, user_shrinkage, id_field, config)
        data_stats.item_factors = factors
    return data_stats, moment


def _als_start(train: Dataset, stats: ItemStats, item_shrinkage: float, user_shrinkage: float, id_field, config: M.ModelConfig):
    """Item-id factors from ALS on what the bias baseline leaves unexplained (see factor_init)."""
    from training.factor_init import als_item_factors

    distinct_items, item_codes = train.factorized("item_ids")
    item_prediction = stats.shrunk_means(distinct_items.tolist(), item_shrinkage)[item_codes]  # per distinct item, then gathered
    residual = train.labels - item_prediction
    users, index = train.factorized("user_ids")
    sums = np.bincount(index, weights=residual, minlength=len(users))
    counts = np.bincount(index, minlength=len(users))
    residual = residual - (sums / (counts + user_shrinkage))[index]
    result = als_item_factors((users, index), train.factorized("item_ids"), residual, config.factors, config.als_l2, seed=0)
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
    return M.DataStats(data.mean, base, data.interactions, item_factors, tables)


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
    meta-trains its share of each meta-batch (training.distributed)."""
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
    adapted = AdaptedModel(model_config, inner_config, prep.schema, dataset.label, result.params)
    return adapted, result, prep


FOLD_IN_GRID = (3.0, 10.0, 30.0, 100.0, 300.0)
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
        model = AdaptedModel(model_config, inner_config, prep.schema, dataset.label, {k: v.detach() for k, v in candidate.items()})
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
        model = AdaptedModel(candidate, inner_config, prep.schema, dataset.label, {k: v.detach() for k, v in start.items()})
        scores[weight] = validation_loss(model, prep.catalog, valid_tasks, support_sizes)
    best = min(scores, key=scores.__getitem__)
    log.info("fold-in ridge weight %.3g (validation loss %.4f; grid %s)", best, scores[best], {k: round(v, 4) for k, v in scores.items()})
    return replace(model_config, fold_in_l2=best)


@dataclass
class MetaLearned:
    """A meta-trained model as a harness method."""

    name: str
    model_config: M.ModelConfig
    inner_config: InnerLoopConfig
    train_config: TrainConfig
    progress: bool = False
    model: AdaptedModel | None = None
    result: TrainResult | None = None
    catalog: EncodedCatalog | None = None

    def fit(self, context: FitContext) -> None:
        self.model, self.result, prep = meta_train(
            context.dataset,
            context.train,
            context.valid_tasks,
            self.model_config,
            self.inner_config,
            replace(self.train_config, seed=context.seed),
            support_sizes=context.support_sizes,
            progress=self.progress,
        )
        self.catalog = prep.catalog
        log.info(
            "%s: %d meta-steps in %.0f s, best validation loss %.4f",
            self.name,
            self.result.steps_done,
            self.result.wall_time_s,
            self.result.best_validation_loss,
        )

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        assert self.model is not None and self.catalog is not None, "fit() first"
        return self.model.predict(self.catalog, tasks)


@dataclass
class FineTuned:
    """The network trained without adaptation, then fine-tuned per user with plain SGD.

    steps = 0 is the network without adaptation. Otherwise the step count and step size
    are tuned on validation users (transfer learning: pre-train, then fine-tune).
    """

    name: str
    model_config: M.ModelConfig
    train_config: TrainConfig
    steps_grid: Sequence[int] = (1, 3, 5, 10)
    lr_grid: Sequence[float] = (0.003, 0.01, 0.03, 0.1, 0.3)
    tune: bool = True
    progress: bool = False
    shared: dict = field(default_factory=dict)  # pre-trained network shared with the no-adapt twin
    model: AdaptedModel | None = None
    catalog: EncodedCatalog | None = None

    def fit(self, context: FitContext) -> None:
        key = (id(context.split), context.seed)
        if key not in self.shared:
            base, result, prep = meta_train(
                context.dataset,
                context.train,
                context.valid_tasks,
                self.model_config,
                learner_config("none"),
                replace(self.train_config, seed=context.seed),
                support_sizes=context.support_sizes,
                progress=self.progress,
            )
            self.shared.clear()
            self.shared[key] = (base, prep.catalog)
        base, self.catalog = self.shared[key]
        self.model = base
        if not self.tune:
            return
        best = (validation_loss(base, self.catalog, context.valid_tasks, context.support_sizes), base.inner_config)
        for steps in self.steps_grid:
            for lr in self.lr_grid:
                config = replace(learner_config("none"), steps=steps, learning_rate=lr)
                candidate = replace(base, inner_config=config, params=_with_lr(base.params, config, self.model_config))
                loss = validation_loss(candidate, self.catalog, context.valid_tasks, context.support_sizes)
                if loss < best[0]:
                    best = (loss, config)
        config = best[1]
        self.model = replace(base, inner_config=config, params=_with_lr(base.params, config, self.model_config))
        log.info("%s: %d steps at lr %.3g (validation loss %.4f)", self.name, config.steps, config.learning_rate, best[0])

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        assert self.model is not None and self.catalog is not None, "fit() first"
        return self.model.predict(self.catalog, tasks)


def _with_lr(params: M.Params, config: InnerLoopConfig, model_config: M.ModelConfig) -> M.Params:
    """Parameters with the inner step sizes replaced by a fixed scalar lr."""
    out = {k: v for k, v in params.items() if not k.startswith("inner.")}
    for name in model_config.adapted_names():
        out[f"inner.log_lr.{name}"] = torch.tensor(math.log(config.learning_rate))
    return out


def _mlp(**overrides) -> M.ModelConfig:
    return M.ModelConfig(kind="mlp", **overrides)


METHOD_HELP = {
    "global_mean": "mean training label",
    "item_mean": "item mean shrunk toward the global mean",
    "bias": "shrunk item mean + ridge user bias fitted on the support set (the reference)",
    "mlp": "attribute + item-id MLP trained without adaptation",
    "mlp_finetune": "the same MLP fine-tuned per user with plain SGD (steps and lr tuned)",
    "mlp_maml": "MLP, MAML (second order) on the decision layers (MeLU-like)",
    "mlp_fomaml": "MLP, first-order MAML on the decision layers",
    "mlp_metasgd": "MLP, Meta-SGD on the decision layers",
    "bf_maml": "bias_factor model, MAML on the user parameters",
    "bf_fomaml": "bias_factor model, first-order MAML on the user parameters",
    "bf_metasgd": "bias_factor model, Meta-SGD on the user parameters",
    "warmstart": "bias_factor model, normalised Meta-SGD with prior pull (the served model)",
    "warmstart_noattr": "the same without the attribute prior (items shrink toward the mean)",
}


def make_methods(names: Sequence[str], train_config: TrainConfig, inner_steps: int = 5, progress: bool = False) -> list:
    """Fresh method instances for the harness, in the given order."""
    from training.baselines import GlobalMean, ItemMean

    unknown = [n for n in names if n not in METHOD_HELP]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHOD_HELP)}")
    shared: dict = {}  # the MLP pre-trained once per split for both mlp and mlp_finetune
    out = []
    for name in names:
        if name == "global_mean":
            out.append(GlobalMean())
        elif name == "item_mean":
            out.append(ItemMean())
        elif name == "bias":
            out.append(BiasBaseline())
        elif name in ("mlp", "mlp_finetune"):
            out.append(FineTuned(name, _mlp(), train_config, tune=name == "mlp_finetune", shared=shared, progress=progress))
        elif name.startswith("mlp_"):
            learner = name[len("mlp_") :]
            # 0.01: larger steps on the decision layers overfit the support set (0.1 measured
            # far worse than no adaptation on MovieLens-100K validation users).
            out.append(MetaLearned(name, _mlp(), learner_config(learner, inner_steps, 0.01), train_config, progress=progress))
        elif name.startswith("bf_"):
            learner = name[len("bf_") :]
            out.append(MetaLearned(name, M.ModelConfig(), learner_config(learner, inner_steps, 0.1), train_config, progress=progress))
        else:  # warmstart, warmstart_noattr
            config = M.ModelConfig(attribute_prior="off" if name == "warmstart_noattr" else "on")
            out.append(MetaLearned(name, config, learner_config("warmstart", inner_steps), train_config, progress=progress))
    return out
