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
class Prepared:
    """Everything a meta-training run needs, derived from training data only."""

    schema: FeatureSchema
    catalog: EncodedCatalog
    sampler: EpisodeSampler
    stats: M.DataStats
    user_shrinkage: float  # the bias baseline's tuned ridge weight: the inner loop's starting point


def prepare(
    dataset: Dataset,
    train: Dataset,
    valid_tasks: Sequence[Task],
    model_config: M.ModelConfig,
    train_config: TrainConfig,
    support_sizes: Sequence[int | None],
) -> Prepared:
    """Schema, encoded catalog, episode sampler and data statistics for one training set.

    The tuned bias baseline supplies the starting point: item base biases are its shrunk
    item means and its user shrinkage seeds the inner loop's offset and pull.
    """
    schema = build_schema(dataset, np.unique(train.item_ids), use_item_id=model_config.use_item_id)
    catalog = EncodedCatalog(schema, dataset)
    sampler = EpisodeSampler(catalog, train, train_config.episodes)
    bias = BiasBaseline()
    bias.fit(_bias_context(dataset, train, valid_tasks, support_sizes))
    stats = bias.stats
    assert stats is not None
    id_field = schema.item_id_field
    base = torch.zeros(id_field.num_codes if id_field is not None else 0)
    mean = stats.mean
    if id_field is not None:
        items = list(id_field.vocabulary)
        shrunk = stats.shrunk_means(items, bias.item_shrinkage)
        if dataset.label.kind == "click":
            mean = logit(stats.mean)
            shrunk = np.array([logit(p) for p in shrunk])
        base[2:] = torch.from_numpy(shrunk - mean).float()
    elif dataset.label.kind == "click":
        mean = logit(stats.mean)
    return Prepared(schema, catalog, sampler, M.DataStats(mean, base, len(train)), max(bias.user_shrinkage, 0.5))


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
) -> tuple[AdaptedModel, TrainResult, Prepared]:
    """Prepares and meta-trains one model; returns the best model, the run's record and the prep."""
    prep = prepare(dataset, train, valid_tasks, model_config, train_config, support_sizes)
    if inner_config.normalise_by_support_size and inner_config.prior_pull:
        # Start exactly at the tuned bias baseline: c = pull = its user shrinkage.
        inner_config = replace(inner_config, support_offset=prep.user_shrinkage, prior_pull_init=prep.user_shrinkage)
    params = M.init_params(model_config, prep.schema, prep.stats, seed=train_config.seed)
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
    )
    result = trainer.run(log_path=log_path)
    adapted = AdaptedModel(model_config, inner_config, prep.schema, dataset.label, result.params)
    return adapted, result, prep


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
            out.append(MetaLearned(name, _mlp(), learner_config(learner, inner_steps), train_config, progress=progress))
        elif name.startswith("bf_"):
            learner = name[len("bf_") :]
            out.append(MetaLearned(name, M.ModelConfig(), learner_config(learner, inner_steps, 0.5), train_config, progress=progress))
        else:  # warmstart
            out.append(MetaLearned(name, M.ModelConfig(), learner_config("warmstart", inner_steps), train_config, progress=progress))
    return out
