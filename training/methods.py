"""The evaluation harness's learned methods: adapters from meta-training to `fit`/`predict`.

Training itself (starting points, the meta-training run) is in training.initialisation and
the named learners in training.learners; this module only wraps them for the harness and
names every method the `evaluate` command knows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from training import model as M
from training.baselines import BiasBaseline
from training.batching import EncodedCatalog
from training.fitting import FitContext
from training.inner_loop import InnerLoopConfig
from training.initialisation import meta_train
from training.learners import MEMORY_SLOTS, learner_config
from training.splits import Task
from training.trainer import AdaptedModel, TrainConfig, TrainResult, validation_loss

log = logging.getLogger(__name__)


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
    served: dict | None = None  # where to leave the trained model for a Memory method on top of it

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
        if self.served is not None:
            self.served.clear()
            self.served[_fit_key(context)] = (self.model, self.result, prep)
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
class MetaLearnedTopN:
    """The served model as a top-N method: meta-trained exactly as `train` does (rating head,
    then the engagement head), ranking the catalog by the engagement logits Recommend uses."""

    name: str
    model_config: M.ModelConfig
    inner_config: InnerLoopConfig
    train_config: TrainConfig
    progress: bool = False
    model: AdaptedModel | None = None
    catalog: EncodedCatalog | None = None
    chosen: dict = field(default_factory=dict)
    served: dict | None = None  # where to leave the trained model for a Memory method on top of it

    def fit(self, context: FitContext) -> None:
        self.model, result, prep = meta_train(
            context.dataset,
            context.train,
            context.valid_tasks,
            self.model_config,
            self.inner_config,
            replace(self.train_config, seed=context.seed),
            progress=self.progress,
        )
        self.catalog = prep.catalog
        if self.served is not None:
            self.served.clear()
            self.served[_fit_key(context)] = (self.model, result, prep)
        self.chosen = {
            "meta_training_s": round(result.wall_time_s, 1),
            "engagement_steps": result.engagement_steps,
            "validation_recall_at_20": round(result.engagement_recall or 0.0, 4),
            "attribute_prior": self.model.model_config.attribute_prior,
        }
        if self.model.model_config.engagement_id_dropout:
            self.chosen["engagement_id_dropout"] = self.model.model_config.engagement_id_dropout
        if context.split is not None and context.split.new_items:
            # What a choice of engagement_id_dropout is made on: the validation users' new items.
            from training.topn import Validation

            self.chosen["validation_new_item_recall_at_20"] = round(Validation.of(context).recall(self), 4)
        log.info("%s: %s", self.name, self.chosen)

    def score_catalog(self, tasks: Sequence[Task], items: np.ndarray) -> np.ndarray:
        assert self.model is not None and self.catalog is not None, "fit() first"
        return self.model.score_catalog(self.catalog, tasks, self.catalog.rows(list(items)))


def _fit_key(context: FitContext) -> tuple:
    return (id(context.split), context.seed)


@dataclass
class Memory:
    """The memory learner (training.memory) as a rating and a top-N method: the served
    model meta-trained as `warmstart` trains it (or taken from the `warmstart` method of the
    same run, through `served`: the same seed and data give the same model), then the
    memory alone on top of it."""

    name: str
    model_config: M.ModelConfig  # with memory_slots > 0
    inner_config: InnerLoopConfig
    train_config: TrainConfig
    progress: bool = False
    served: dict | None = None
    model: AdaptedModel | None = None
    catalog: EncodedCatalog | None = None
    chosen: dict = field(default_factory=dict)

    def fit(self, context: FitContext) -> None:
        from training.initialisation import train_memory_phases

        train_config = replace(self.train_config, seed=context.seed)
        served = (self.served or {}).get(_fit_key(context))
        if served is None:
            served = meta_train(
                context.dataset,
                context.train,
                context.valid_tasks,
                replace(self.model_config, memory_slots=0),
                self.inner_config,
                train_config,
                support_sizes=context.support_sizes,
                progress=self.progress,
            )
        self.model, result, prep = train_memory_phases(
            context.dataset, context.train, context.valid_tasks, self.model_config, self.inner_config, train_config, served, progress=self.progress
        )
        self.catalog = prep.catalog
        history = [h for h in result.history if h.get("phase", "").startswith("memory")]
        self.chosen = {
            "served_meta_training_s": round(served[1].wall_time_s, 1),
            "memory_meta_training_s": round(result.memory_wall_time_s, 1),
            "memory_steps": result.steps_done - served[1].steps_done,
            "validation_loss_served": next((h["valid_loss"] for h in history if h["phase"] == "memory"), None),
            "validation_loss_memory": round(result.best_validation_loss, 6),
        }
        if self.model_config.engagement_factors:
            engagement = [h for h in history if h["phase"] == "memory_engagement"]
            self.chosen["validation_recall_at_20_served"] = round(-engagement[0]["valid_loss"], 4) if engagement else None
            self.chosen["validation_recall_at_20_memory"] = round(result.engagement_recall or 0.0, 4)
        log.info("%s: %s", self.name, self.chosen)

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        assert self.model is not None and self.catalog is not None, "fit() first"
        return self.model.predict(self.catalog, tasks)

    def score_catalog(self, tasks: Sequence[Task], items: np.ndarray) -> np.ndarray:
        assert self.model is not None and self.catalog is not None, "fit() first"
        return self.model.score_catalog(self.catalog, tasks, self.catalog.rows(list(items)))


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
    "bias": "shrunk item mean + ridge user bias fitted on the support set",
    "baseline_only": "the standard BaselineOnly (ALS biases, surprise's defaults), the user's bias folded in (the reference)",
    "svd": "Funk SVD by SGD, the user's bias and factors folded in by ridge (grid tuned on validation users)",
    "mlp": "attribute + item-id MLP trained without adaptation",
    "mlp_finetune": "the same MLP fine-tuned per user with plain SGD (steps and lr tuned)",
    "mlp_maml": "MLP, MAML (second order) on the decision layers (MeLU-like)",
    "mlp_fomaml": "MLP, first-order MAML on the decision layers",
    "mlp_metasgd": "MLP, Meta-SGD on the decision layers",
    "bf_maml": "bias_factor model, MAML on the user parameters",
    "bf_fomaml": "bias_factor model, first-order MAML on the user parameters",
    "bf_metasgd": "bias_factor model, Meta-SGD on the user parameters",
    "warmstart": "the served model's rating head: ALS biases, normalised Meta-SGD with prior pull, attribute prior tuned",
    "warmstart_noattr": "the same without the attribute prior (items shrink toward the mean)",
    "memory": "the served model plus a learned memory of earlier users (training.memory), meta-trained on top of it",
}


def make_methods(names: Sequence[str], train_config: TrainConfig, inner_steps: int = 5, progress: bool = False) -> list:
    """Fresh method instances for the harness, in the given order."""
    from training.baselines import BaselineOnly, FunkSVD, GlobalMean, ItemMean

    unknown = [n for n in names if n not in METHOD_HELP]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHOD_HELP)}")
    shared: dict = {}  # the MLP pre-trained once per split for both mlp and mlp_finetune
    served: dict = {}  # the served model trained once per split for both warmstart and memory
    out = []
    for name in names:
        if name == "global_mean":
            out.append(GlobalMean())
        elif name == "item_mean":
            out.append(ItemMean())
        elif name == "bias":
            out.append(BiasBaseline())
        elif name == "baseline_only":
            out.append(BaselineOnly())
        elif name == "svd":
            out.append(FunkSVD())
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
        elif name == "memory":
            config = M.served_config(engagement_factors=0, memory_slots=MEMORY_SLOTS)
            out.append(Memory(name, config, learner_config("memory", inner_steps), train_config, progress=progress, served=served))
        else:  # warmstart, warmstart_noattr
            # The served configuration without its engagement head: the ratings do not
            # depend on it (the heads share no parameter), and it would only cost time here.
            config = M.served_config(engagement_factors=0, **({"attribute_prior": "off"} if name == "warmstart_noattr" else {}))
            keep = served if name == "warmstart" and "memory" in names else None
            out.append(MetaLearned(name, config, learner_config("warmstart", inner_steps), train_config, progress=progress, served=keep))
    return out
