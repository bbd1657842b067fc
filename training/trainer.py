"""Meta-training: outer Adam over meta-batches of users, early stopping, exact resume.

A meta-step samples `meta_batch_size` training users, cuts a chronological episode from
each (support = earliest K, query = later), runs the inner loop, and takes one Adam step
on the mean query loss (+ the item-side L2). Every `eval_every` steps the validation
users are scored at fixed support sizes; the best parameters are kept and training stops
after `patience` evaluations without improvement.

Checkpoints (every `checkpoint_every` steps, and at the end) hold everything the run
depends on: parameters, best parameters, Adam's state, the episode sampler's random
state, counters, and the configs — tensors in safetensors, the rest in JSON, no pickle.
A killed run restarted with the same arguments resumes from the last checkpoint and ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from training import memory
from training import model as M
from training.batching import EncodedCatalog, EpisodeConfig, EpisodeSampler, task_batches
from training.dataset import LabelSpec
from training.distributed import Collective
from training.features import OOV, FeatureSchema
from training.inner_loop import (
    CATALOG_WEIGHT,
    InnerLoopConfig,
    adapt_and_score,
    adapt_engagement,
    engagement_weights,
    init_inner_params,
    support_loss_terms,
    to_label_units,
    trainable_inner_names,
)
from training.metrics import query_loss, recall_at_n
from training.splits import Task

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: the state sits in checkpoint.safetensors' header (one file, one unit)
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_STATE_KEY = "warmstart.checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """The outer loop. Defaults are sized for MovieLens-100K on two CPU cores."""

    meta_steps: int = 3000  # upper bound; early stopping usually ends sooner
    meta_batch_size: int = 32  # users per meta-step
    outer_lr: float = 3e-3  # Adam
    outer_grad_clip: float = 10.0  # global norm of the meta-gradient; 0 = none
    eval_every: int = 100  # meta-steps between validation evaluations
    patience: int = 8  # evaluations without improvement before stopping; 0 = never stop early
    checkpoint_every: int = 500  # meta-steps between checkpoints; 0 = only at the end
    seed: int = 0
    validation_support_sizes: tuple[int | None, ...] = (1, 5, 10, 20, None)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    # What the outer loop trains: the rating head on query ratings ("rating"), or the
    # engagement head on a listwise loss over the catalog ("engagement": softmax of the
    # user's later items against every catalog item not in the support; validated by
    # Recall@ENGAGEMENT_CUTOFF over the catalog).
    objective: Literal["rating", "engagement"] = "rating"

    def __post_init__(self) -> None:
        if self.meta_steps < 0 or self.meta_batch_size < 1:
            raise ValueError("meta_steps must be >= 0 and meta_batch_size >= 1")
        if not self.outer_lr > 0:
            raise ValueError("outer_lr must be positive")
        if self.eval_every < 1 or self.patience < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every must be >= 1, patience and checkpoint_every >= 0")
        if self.objective not in ("rating", "engagement"):
            raise ValueError(f"objective must be 'rating' or 'engagement', got {self.objective!r}")
        object.__setattr__(self, "validation_support_sizes", tuple(self.validation_support_sizes))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> "TrainConfig":
        d = dict(d)
        d["episodes"] = EpisodeConfig(**d.get("episodes", {}))
        d["validation_support_sizes"] = tuple(d.get("validation_support_sizes", (1, 5, 10, 20, None)))
        return TrainConfig(**d)


def loss_kind_of(label: LabelSpec) -> str:
    return "logistic" if label.kind == "click" else "squared"


ENGAGEMENT_CUTOFF = 20  # the list length the engagement head is validated at (Recall@20)
ENGAGEMENT_VALIDATION_SIZES = (0, 1, 3, 5, 10, 20)  # support sizes of its validation


def engaged_rows(catalog: EncodedCatalog, items: Sequence[str], labels: np.ndarray, label: LabelSpec) -> np.ndarray:
    """Catalog rows of the items that count as engagement (every interaction; for clicks,
    the positive ones), in the given order."""
    keep = np.ones(len(items), bool) if label.kind != "click" else np.asarray(labels) > 0.5
    return catalog.rows([i for i, k in zip(items, keep) if k])


@dataclass
class AdaptedModel:
    """A trained model with its inner loop: what evaluation and export use."""

    model_config: M.ModelConfig
    inner_config: InnerLoopConfig
    schema: FeatureSchema
    label: LabelSpec
    params: M.Params

    def forward(self, batch) -> tuple[torch.Tensor, ...]:
        """(query scores in label units, support loss before, after) for a Batch, plus the
        query items' engagement logits when the model has the engagement head."""
        out = adapt_and_score(
            self.model_config, self.inner_config, self.schema, self.params, batch, loss_kind_of(self.label)
        )
        scores = to_label_units(out.query_scores, loss_kind_of(self.label), self.label.min_value, self.label.max_value)
        if out.query_engagement is None:
            return scores, out.support_loss_before, out.support_loss_after
        return scores, out.support_loss_before, out.support_loss_after, out.query_engagement

    @torch.no_grad()
    def score_catalog(self, catalog: EncodedCatalog, tasks: Sequence[Task], rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(len(tasks), len(rows)) engagement logits of the catalog rows `rows` for each task's
        user, adapted to the task's support: what Recommend ranks by."""
        if not self.model_config.engagement_factors:
            raise ValueError("this model has no engagement head (engagement_factors = 0)")
        items = catalog.codes[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
        c, p = M.item_engagement(self.model_config, self.schema, self.params, items)
        out = np.empty((len(tasks), len(rows)), dtype=np.float32)
        for start, (chunk, batch) in zip(range(0, len(tasks), batch_size), task_batches(catalog, tasks, batch_size)):
            _, support_p = M.item_engagement(self.model_config, self.schema, self.params, batch.support_items)
            weights = engagement_weights(loss_kind_of(self.label), batch.support_labels, batch.support_mask)
            phi0 = memory.engagement_start(self.model_config, self.schema, self.params, batch, loss_kind_of(self.label))
            phi = adapt_engagement(self.model_config, self.inner_config, self.params, support_p, weights, phi0)
            out[start : start + len(chunk)] = M.engagement_scores(self.params, c, p, phi).numpy()
        return out

    @torch.no_grad()
    def predict(self, catalog: EncodedCatalog, tasks: Sequence[Task], batch_size: int = 256) -> list[np.ndarray]:
        """Query predictions (label units) for each task, adapting to its support set."""
        out: list[np.ndarray] = []
        for chunk, batch in task_batches(catalog, tasks, batch_size):
            scores = self.forward(batch)[0].numpy().astype(np.float64)
            out.extend(scores[i, : len(t.query_items)] for i, t in enumerate(chunk))
        return out


def catalog_recall(
    adapted: AdaptedModel, catalog: EncodedCatalog, rows: np.ndarray, tasks: Sequence[Task], sizes: Sequence[int], cutoff: int = ENGAGEMENT_CUTOFF
) -> float:
    """Mean Recall@cutoff over the catalog rows `rows` (support excluded) of each task's
    later engaged items, over users and support sizes; a task is its user's whole history
    (support + query, in time order). Users with nothing later at a size are left out."""

    position = {int(r): j for j, r in enumerate(rows)}
    values = []
    for k in sizes:
        cut = []
        for t in tasks:
            items = np.concatenate([t.support_items, t.query_items])
            labels = np.concatenate([t.support_labels, t.query_labels])
            later = [position[r] for r in engaged_rows(catalog, items[k:], labels[k:], adapted.label).tolist() if r in position]
            if later:
                cut.append((Task(t.user, items[:k], labels[:k], items[k:], labels[k:]), later))
        if not cut:
            continue
        scores = adapted.score_catalog(catalog, [c[0] for c in cut], rows)
        for (task, later), row in zip(cut, scores):
            seen = [position[r] for r in catalog.rows(task.support_items).tolist() if r in position]
            row[seen] = -np.inf
            top = np.argpartition(-row, min(cutoff, len(row) - 1))[:cutoff]
            top = top[np.argsort(-row[top], kind="stable")]
            values.append(recall_at_n(top, later, cutoff))
    return float(np.mean(values)) if values else 0.0


def validation_loss(adapted: AdaptedModel, catalog: EncodedCatalog, tasks: Sequence[Task], sizes) -> float:
    """Mean per-user query loss (MSE, or log loss for clicks) over the validation support sizes."""
    total, count = 0.0, 0
    for k in sizes:
        predictions = adapted.predict(catalog, [t.with_support_size(k) for t in tasks])
        for task, pred in zip(tasks, predictions):
            total += query_loss(pred, task.query_labels, adapted.label.kind)
            count += 1
    return total / max(count, 1)


@dataclass
class TrainResult:
    params: M.Params  # the best parameters (by validation loss)
    best_validation_loss: float
    steps_done: int
    wall_time_s: float
    history: list[dict]
    engagement_recall: float | None = None  # best validation Recall@20 of the engagement head, if trained
    engagement_steps: int = 0  # meta-steps of the engagement phase (steps_done counts the rating phase)
    memory_wall_time_s: float = 0.0  # the memory learner: time of its memory phases (included in wall_time_s)


class MetaTrainer:
    """Runs one meta-training job; see the module docstring."""

    def __init__(
        self,
        model_config: M.ModelConfig,
        inner_config: InnerLoopConfig,
        train_config: TrainConfig,
        schema: FeatureSchema,
        label: LabelSpec,
        catalog: EncodedCatalog,
        sampler: EpisodeSampler,
        valid_tasks: Sequence[Task],
        initial_params: M.Params,
        interactions: int,
        checkpoint_dir: Path | None = None,
        progress: bool = False,
        fingerprint: str = "",
        sources: Sequence[tuple[EpisodeSampler, M.Params]] = (),
        ranked_rows: np.ndarray | None = None,
        collective: Collective | None = None,
        trainable_prefixes: Sequence[str] = (),
    ) -> None:
        """`trainable_prefixes`: train only the parameters with these name prefixes (the
        memory phases train the memory alone on top of the served model); () = all."""
        if not valid_tasks and train_config.patience > 0:
            raise ValueError("early stopping needs validation tasks (or patience=0)")
        self.model_config = model_config
        self.inner_config = inner_config
        self.config = train_config
        self.schema = schema
        self.label = label
        self.catalog = catalog
        self.sampler = sampler
        # Cross-fitted episode sources, taken in turn: (sampler, item-side parameters to use).
        self.sources = [(src, {k: v.detach().float() for k, v in item.items()}) for src, item in sources]
        self.valid_tasks = list(valid_tasks)
        self.interactions = interactions
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.fingerprint = fingerprint
        # The other processes of a torchrun job (training.distributed); alone, every hook is the identity.
        self.collective = collective or Collective()
        params = dict(initial_params)
        for name, value in init_inner_params(model_config, inner_config, params).items():
            params.setdefault(name, value)  # a caller may start inner parameters elsewhere
        self.params = {k: v.detach().clone().float() for k, v in params.items()}
        frozen = set(M.frozen_names(model_config, self.params))
        inner = set(trainable_inner_names(inner_config, self.params))
        self.trainable = [n for n in self.params if n not in frozen and (not n.startswith("inner.") or n in inner)]
        # The engagement objective trains the engagement head alone; the rating objective
        # leaves it where it is.
        self.trainable = [n for n in self.trainable if _is_engagement(n) == (train_config.objective == "engagement")]
        if trainable_prefixes:
            self.trainable = [n for n in self.trainable if n.startswith(tuple(trainable_prefixes))]
            if not self.trainable:
                raise ValueError(f"no trainable parameter starts with {tuple(trainable_prefixes)}")
        # The catalog the engagement head ranks (rows of catalog.codes): by default every
        # item with a known id. Items without one share the out-of-vocabulary row, and as
        # never-engaged negatives would only teach it to rank new items last.
        if ranked_rows is None:
            ranked_rows = ranked_catalog_rows(catalog, schema)
        self.ranked_rows = np.asarray(ranked_rows, dtype=np.int64)
        self.ranked_codes = catalog.codes[torch.from_numpy(self.ranked_rows)]
        position = torch.full((catalog.codes.shape[0],), -1, dtype=torch.int64)
        position[torch.from_numpy(self.ranked_rows)] = torch.arange(len(self.ranked_rows))
        self.ranked_position = position  # catalog row -> index in ranked_rows, -1 if not ranked
        if train_config.objective == "engagement" and not model_config.engagement_factors:
            raise ValueError("the engagement objective needs a model with engagement_factors > 0")
        for name in self.trainable:
            self.params[name].requires_grad_(True)
        self.collective.broadcast_(list(self.params.values()))  # every rank starts from rank 0's parameters
        self.optimizer = torch.optim.Adam([self.params[n] for n in self.trainable], lr=train_config.outer_lr)
        self.rng = np.random.default_rng(train_config.seed)
        self.step = 0
        self.best_loss = math.inf
        self.best_params = {k: v.detach().clone() for k, v in self.params.items()}
        self.bad_evals = 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0
        self.stopped = False

    # -- the meta-step -------------------------------------------------------------------
    def meta_loss(self, batch, query_labels: torch.Tensor, query_mask: torch.Tensor, item_params: M.Params | None = None) -> torch.Tensor:
        """Mean over users of the mean query loss, plus the item-side L2."""
        params = {**self.params, **item_params} if item_params else self.params
        rating_model = replace(self.model_config, engagement_factors=0)  # the engagement head is trained apart
        out = adapt_and_score(rating_model, self.inner_config, self.schema, params, batch, loss_kind_of(self.label))
        per_entry = support_loss_terms(loss_kind_of(self.label), out.query_scores, query_labels) * query_mask
        per_user = per_entry.sum(1) / query_mask.sum(1).clamp(min=1.0)
        return per_user.mean() + M.regulariser(self.model_config, self.params, self.interactions)

    def with_gram(self, params: M.Params) -> M.Params:
        """params plus the engagement head's catalog Gram matrix over the ranked catalog."""
        return M.with_engagement_gram(self.model_config, self.schema, params, self.ranked_codes)

    @staticmethod
    def ranked_gram(config: M.ModelConfig, schema: FeatureSchema, params: M.Params, catalog: EncodedCatalog, rows: np.ndarray) -> M.Params:
        """with_gram for a catalog and ranked rows outside a trainer."""
        return M.with_engagement_gram(config, schema, params, catalog.codes[torch.from_numpy(np.asarray(rows, dtype=np.int64))])

    def engagement_loss(self, episode) -> torch.Tensor:
        """Mean over users of the listwise loss of their later items: -log softmax over every
        ranked catalog item not in their support, averaged over the later engaged items."""
        params = self.with_gram(self.params)
        batch = episode.batch
        _, support_p = M.item_engagement(self.model_config, self.schema, params, batch.support_items)
        weights = engagement_weights(loss_kind_of(self.label), batch.support_labels, batch.support_mask)
        phi0 = memory.engagement_start(self.model_config, self.schema, params, batch, loss_kind_of(self.label))
        phi = adapt_engagement(self.model_config, self.inner_config, params, support_p, weights, phi0)  # (B, e)
        c, p = M.item_engagement(self.model_config, self.schema, params, self._ranked_codes_for_step())  # (N,), (N, e)
        logits = M.engagement_scores(params, c, p, phi)  # (B, N)
        support_pos = self.ranked_position[episode.support_rows]  # (B, S), -1 = padding / unranked
        seen = torch.zeros_like(logits, dtype=torch.bool)
        rows = torch.arange(logits.shape[0]).unsqueeze(1).expand_as(support_pos)
        valid = (support_pos >= 0) & (weights > 0)
        seen[rows[valid], support_pos[valid]] = True
        log_p = torch.log_softmax(logits.masked_fill(seen, -torch.inf), dim=1)
        query_pos = self.ranked_position[episode.query_rows]  # (B, Q)
        engaged = engagement_weights(loss_kind_of(self.label), episode.query_labels, episode.query_mask) * (query_pos >= 0)
        picked = torch.gather(log_p, 1, query_pos.clamp(min=0))  # (B, Q)
        picked = torch.where(engaged > 0, picked, torch.zeros_like(picked))  # a support item again: -inf, not counted
        per_user = -(picked * engaged).sum(1) / engaged.sum(1).clamp(min=1.0)
        has_query = (engaged.sum(1) > 0).float()
        loss = (per_user * has_query).sum() / has_query.sum().clamp(min=1.0)
        return loss + M.regulariser(self.model_config, {k: v for k, v in self.params.items() if _is_engagement(k) or k == "mu"}, self.interactions)

    def _ranked_codes_for_step(self) -> torch.Tensor:
        """The ranked catalog's codes, with engagement_id_dropout of the items' ids read as
        out-of-vocabulary this meta-step (a seeded draw per step: a resumed run draws the same)."""
        rate = self.model_config.engagement_id_dropout
        id_field = self.schema.item_id_field
        if not rate or id_field is None or not self.model_config.use_item_id:
            return self.ranked_codes
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        hidden = torch.rand(len(self.ranked_codes), generator=g) < rate
        codes = self.ranked_codes.clone()
        codes[hidden, id_field.offset] = OOV
        return codes

    def train_step(self) -> float:
        sampler, item_params = self.sources[self.step % len(self.sources)] if self.sources else (self.sampler, None)
        # meta_batch_size users per process: each builds its block of the global batch.
        global_batch = self.config.meta_batch_size * self.collective.world_size
        episode = sampler.sample_episode(self.rng, global_batch, shard=self.collective.shard_of)
        labels = episode.query_labels
        if self.config.objective == "engagement":
            loss = self.engagement_loss(episode)
        else:
            loss = self.meta_loss(episode.batch, labels, episode.query_mask, item_params)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"meta-loss is {loss.item()} at step {self.step}: lower outer_lr or inner steps")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = self.collective.average_gradients([self.params[n] for n in self.trainable], float(loss.detach()), len(labels))
        if self.config.outer_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([self.params[n] for n in self.trainable], self.config.outer_grad_clip)
        self.optimizer.step()
        self.step += 1
        return value

    def adapted(self, params: M.Params | None = None) -> AdaptedModel:
        with torch.no_grad():
            params = self.with_gram({k: v.detach() for k, v in (params or self.params).items()})
        return AdaptedModel(self.model_config, self.inner_config, self.schema, self.label, params)

    def evaluate(self) -> float:
        """The validation loss early stopping watches (lower is better)."""
        tasks = self.collective.shard(self.valid_tasks)  # each process scores its share of the users
        if self.config.objective == "engagement":
            local = -catalog_recall(self.adapted(), self.catalog, self.ranked_rows, tasks, ENGAGEMENT_VALIDATION_SIZES)
        else:
            local = validation_loss(self.adapted(), self.catalog, tasks, self.config.validation_support_sizes)
        return self.collective.mean_of_shards(local, len(tasks))

    # -- the run -------------------------------------------------------------------------
    def run(self, log_path: Path | None = None, on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Trains until meta_steps or early stopping; resumes from a checkpoint if one exists."""
        if self.checkpoint_dir is not None and has_checkpoint(self.checkpoint_dir):
            self.load_checkpoint(self.checkpoint_dir)
            log.info("resumed from %s at meta-step %d", self.checkpoint_dir, self.step)
        if self.step == 0 and self.valid_tasks:
            self._record(float("nan"), log_path)
        bar = _progress_bar(self.config.meta_steps, self.step, enabled=self.progress and self.collective.is_main)
        running = None
        started = time.perf_counter() - self.elapsed_s
        while self.step < self.config.meta_steps and not self.stopped:
            loss = self.train_step()
            running = loss if running is None else 0.95 * running + 0.05 * loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(meta_loss=f"{running:.4f}", best_valid=f"{self.best_loss:.4f}")
            if self.step % self.config.eval_every == 0 and self.valid_tasks:
                self.elapsed_s = time.perf_counter() - started
                self._record(running, log_path)
            if self.checkpoint_dir is not None and self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.elapsed_s = time.perf_counter() - started
                self.save_checkpoint(self.checkpoint_dir)
            if on_step is not None:
                on_step(self.step)
        if bar is not None:
            bar.close()
        self.elapsed_s = time.perf_counter() - started
        if not self.valid_tasks:  # nothing to select on: the last parameters are the result
            self.best_params = {k: v.detach().clone() for k, v in self.params.items()}
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir)
        return TrainResult(
            params=self.adapted(self.best_params).params,
            best_validation_loss=self.best_loss,
            steps_done=self.step,
            wall_time_s=self.elapsed_s,
            history=list(self.history),
        )

    def _record(self, running_loss: float | None, log_path: Path | None) -> None:
        valid = self.evaluate()
        improved = valid < self.best_loss - 1e-6
        if improved:
            self.best_loss = valid
            self.best_params = {k: v.detach().clone() for k, v in self.params.items()}
            self.bad_evals = 0
        elif self.step > 0:
            self.bad_evals += 1
            if self.config.patience and self.bad_evals >= self.config.patience:
                self.stopped = True
        entry = {
            "step": self.step,
            "meta_loss": None if running_loss is None or math.isnan(running_loss) else round(running_loss, 6),
            "valid_loss": round(valid, 6),
            "best_valid_loss": round(self.best_loss, 6),
            "elapsed_s": round(self.elapsed_s, 2),
        }
        self.history.append(entry)
        log.info("meta-step %d: valid %.4f (best %.4f)", self.step, valid, self.best_loss)
        if log_path is not None and self.collective.is_main:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    # -- checkpoints ---------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"params.{k}": v.detach().contiguous() for k, v in self.params.items()}
        tensors.update({f"best.{k}": v.detach().contiguous() for k, v in self.best_params.items()})
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).contiguous()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config.to_dict(),
            "inner_config": self.inner_config.to_dict(),
            "train_config": self.config.to_dict(),
            "schema": self.schema.to_dict(),
            "label": asdict(self.label),
            "interactions": self.interactions,
            "dataset_fingerprint": self.fingerprint,
            "world_size": self.collective.world_size,
            "trainable": self.trainable,
            "step": self.step,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "bad_evals": self.bad_evals,
            "stopped": self.stopped,
            "elapsed_s": self.elapsed_s,
            "rng": self.rng.bit_generator.state,
            "param_groups": opt["param_groups"],
            "history": self.history,
            "torch_version": torch.__version__,
        }
        return tensors, meta

    def save_checkpoint(self, directory: Path) -> None:
        """Writes the checkpoint as one unit: checkpoint.safetensors holds the tensors and,
        in its header, the state they belong to, and is replaced atomically. checkpoint.json
        is a readable copy of that state written after it, never read back: a kill between
        the two leaves a stale copy, not a checkpoint of mixed steps."""
        if not self.collective.is_main:
            return
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._state()
        text = json.dumps(meta, indent=1)
        tmp = directory / "checkpoint.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={CHECKPOINT_STATE_KEY: text})
        os.replace(tmp, directory / CHECKPOINT_FILE)
        tmp_json = directory / "checkpoint.json.tmp"
        tmp_json.write_text(text)
        os.replace(tmp_json, directory / "checkpoint.json")

    def load_checkpoint(self, directory: Path) -> None:
        meta, tensors = _read_unit(directory)
        mine = {
            "model_config": self.model_config.to_dict(),
            "inner_config": self.inner_config.to_dict(),
            "train_config": self.config.to_dict(),
        }
        for key, value in mine.items():
            if json.loads(json.dumps(value)) != meta[key]:
                raise ValueError(f"{directory}: checkpoint was made with a different {key}; use a new directory")
        if meta["dataset_fingerprint"] != self.fingerprint:
            raise ValueError(f"{directory}: checkpoint was made from different training data")
        if meta.get("world_size", 1) != self.collective.world_size:  # the global meta-batch would change
            raise ValueError(
                f"{directory}: checkpoint was made by {meta.get('world_size', 1)} processes, this run has "
                f"{self.collective.world_size}; resume with the same number or use a new directory"
            )
        with torch.no_grad():
            for name, value in self.params.items():
                value.copy_(tensors[f"params.{name}"])
        self.best_params = {k: tensors[f"best.{k}"].clone() for k in self.params}
        state = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, slot = key.split(".", 2)
                state.setdefault(int(index), {})[slot] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.rng.bit_generator.state = meta["rng"]
        self.step = meta["step"]
        self.best_loss = math.inf if meta["best_loss"] is None else meta["best_loss"]
        self.bad_evals = meta["bad_evals"]
        self.stopped = meta["stopped"]
        self.elapsed_s = meta["elapsed_s"]
        self.history = meta["history"]


def ranked_catalog_rows(catalog: EncodedCatalog, schema: FeatureSchema) -> np.ndarray:
    """The catalog rows the engagement head is trained to rank: every item with a known id
    (or every item when the model has no id field)."""
    if schema.item_id_field is None:
        return np.arange(len(catalog.item_ids))
    return catalog.rows([i for i in schema.item_id_field.vocabulary if i in catalog.row_of])


def _is_engagement(name: str) -> bool:
    """Parameters of the engagement head (item side, user start, inner-loop settings)."""
    return name.startswith("eng.") or name == CATALOG_WEIGHT or name.endswith(f".{M.ENGAGEMENT_USER}")


def read_checkpoint(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, best parameters) of a finished or interrupted run, for export."""
    meta, tensors = _read_unit(directory)
    best = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
    return meta, best


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT_FILE).exists()


def _read_unit(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The state and tensors of one checkpoint, both from checkpoint.safetensors."""
    path = Path(directory) / CHECKPOINT_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable checkpoint: {exc}") from exc
    if CHECKPOINT_STATE_KEY not in header:
        raise ValueError(f"{path}: no training state in its header (a checkpoint of an older format); use a new directory")
    meta = json.loads(header[CHECKPOINT_STATE_KEY])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: unsupported checkpoint format {meta.get('format')!r}")
    return meta, tensors


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI, the main job)
    return tqdm(total=total, initial=initial, desc="meta-training", unit="step", dynamic_ncols=True, disable=None)
