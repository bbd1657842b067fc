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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from training import model as M
from training.batching import EncodedCatalog, EpisodeConfig, EpisodeSampler, task_batches
from training.dataset import LabelSpec
from training.features import FeatureSchema
from training.inner_loop import (
    InnerLoopConfig,
    adapt_and_score,
    init_inner_params,
    support_loss_terms,
    to_label_units,
    trainable_inner_names,
)
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

    def __post_init__(self) -> None:
        if self.meta_steps < 0 or self.meta_batch_size < 1:
            raise ValueError("meta_steps must be >= 0 and meta_batch_size >= 1")
        if not self.outer_lr > 0:
            raise ValueError("outer_lr must be positive")
        if self.eval_every < 1 or self.patience < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every must be >= 1, patience and checkpoint_every >= 0")
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


@dataclass
class AdaptedModel:
    """A trained model with its inner loop: what evaluation and export use."""

    model_config: M.ModelConfig
    inner_config: InnerLoopConfig
    schema: FeatureSchema
    label: LabelSpec
    params: M.Params

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query scores in label units, support loss before, after) for a Batch."""
        out = adapt_and_score(
            self.model_config, self.inner_config, self.schema, self.params, batch, loss_kind_of(self.label)
        )
        scores = to_label_units(out.query_scores, loss_kind_of(self.label), self.label.min_value, self.label.max_value)
        return scores, out.support_loss_before, out.support_loss_after

    @torch.no_grad()
    def predict(self, catalog: EncodedCatalog, tasks: Sequence[Task], batch_size: int = 256) -> list[np.ndarray]:
        """Query predictions (label units) for each task, adapting to its support set."""
        out: list[np.ndarray] = []
        for chunk, batch in task_batches(catalog, tasks, batch_size):
            scores, _, _ = self.forward(batch)
            scores = scores.numpy().astype(np.float64)
            out.extend(scores[i, : len(t.query_items)] for i, t in enumerate(chunk))
        return out


def validation_loss(adapted: AdaptedModel, catalog: EncodedCatalog, tasks: Sequence[Task], sizes) -> float:
    """Mean per-user query loss (MSE, or log loss for clicks) over the validation support sizes."""
    total, count = 0.0, 0
    for k in sizes:
        predictions = adapted.predict(catalog, [t.with_support_size(k) for t in tasks])
        for task, pred in zip(tasks, predictions):
            y = task.query_labels
            if adapted.label.kind == "click":
                p = np.clip(pred, 1e-7, 1 - 1e-7)
                total += float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
            else:
                total += float(np.mean((pred - y) ** 2))
            count += 1
    return total / max(count, 1)


@dataclass
class TrainResult:
    params: M.Params  # the best parameters (by validation loss)
    best_validation_loss: float
    steps_done: int
    wall_time_s: float
    history: list[dict]


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
    ) -> None:
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
        params = dict(initial_params)
        for name, value in init_inner_params(model_config, inner_config, params).items():
            params.setdefault(name, value)  # a caller may start inner parameters elsewhere
        self.params = {k: v.detach().clone().float() for k, v in params.items()}
        frozen = set(M.frozen_names(model_config, self.params))
        inner = set(trainable_inner_names(inner_config, self.params))
        self.trainable = [n for n in self.params if n not in frozen and (not n.startswith("inner.") or n in inner)]
        for name in self.trainable:
            self.params[name].requires_grad_(True)
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
        out = adapt_and_score(self.model_config, self.inner_config, self.schema, params, batch, loss_kind_of(self.label))
        per_entry = support_loss_terms(loss_kind_of(self.label), out.query_scores, query_labels) * query_mask
        per_user = per_entry.sum(1) / query_mask.sum(1).clamp(min=1.0)
        return per_user.mean() + M.regulariser(self.model_config, self.params, self.interactions)

    def train_step(self) -> float:
        sampler, item_params = self.sources[self.step % len(self.sources)] if self.sources else (self.sampler, None)
        batch, labels, mask = sampler.sample(self.rng, self.config.meta_batch_size)
        loss = self.meta_loss(batch, labels, mask, item_params)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"meta-loss is {loss.item()} at step {self.step}: lower outer_lr or inner steps")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.outer_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([self.params[n] for n in self.trainable], self.config.outer_grad_clip)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def adapted(self, params: M.Params | None = None) -> AdaptedModel:
        params = {k: v.detach() for k, v in (params or self.params).items()}
        return AdaptedModel(self.model_config, self.inner_config, self.schema, self.label, params)

    def evaluate(self) -> float:
        return validation_loss(self.adapted(), self.catalog, self.valid_tasks, self.config.validation_support_sizes)

    # -- the run -------------------------------------------------------------------------
    def run(self, log_path: Path | None = None, on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Trains until meta_steps or early stopping; resumes from a checkpoint if one exists."""
        if self.checkpoint_dir is not None and has_checkpoint(self.checkpoint_dir):
            self.load_checkpoint(self.checkpoint_dir)
            log.info("resumed from %s at meta-step %d", self.checkpoint_dir, self.step)
        if self.step == 0 and self.valid_tasks:
            self._record(float("nan"), log_path)
        bar = _progress_bar(self.config.meta_steps, self.step, enabled=self.progress)
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
            params={k: v.detach().clone() for k, v in self.best_params.items()},
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
        if log_path is not None:
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
