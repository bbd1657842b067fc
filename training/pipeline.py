"""The production training job: data -> meta-training -> artifact.

Unlike the evaluation harness (which holds out test users to measure), the production
job trains on every user except a seeded validation share that drives early stopping,
then exports the best parameters as a new artifact version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training import model as M
from training.dataset import Dataset
from training.export import ExportResult, export_artifact
from training.inner_loop import InnerLoopConfig
from training.methods import learner_config, meta_train
from training.splits import Protocol, build_tasks, make_splits, training_rows
from training.trainer import TrainConfig, TrainResult
from warmstart.v1 import manifest_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class JobConfig:
    """One production training job."""

    model: M.ModelConfig
    learner: str
    inner: InnerLoopConfig
    train: TrainConfig
    valid_fraction: float = 0.1  # of eligible users, held out for early stopping
    min_interactions: int = 13  # eligibility for validation, as in the evaluation protocol
    max_interactions: int = 100

    @staticmethod
    def default(learner: str = "warmstart", kind: str = "bias_factor", inner_steps: int = 5, **train) -> "JobConfig":
        return JobConfig(
            model=M.ModelConfig(kind=kind),  # type: ignore[arg-type]
            learner=learner,
            inner=learner_config(learner, steps=inner_steps),
            train=TrainConfig(**train),
        )


@dataclass
class JobResult:
    export: ExportResult
    train: TrainResult


def validation_split(dataset: Dataset, config: JobConfig):
    """Every user trains except a seeded share of eligible users, who validate."""
    folds = max(2, int(round(1.0 / config.valid_fraction)))
    protocol = Protocol(
        min_interactions=config.min_interactions,
        max_interactions=config.max_interactions,
        folds=folds,
        seed=config.train.seed,
    )
    split = make_splits(dataset, protocol)[0]
    # The fold's "test" users validate here; nobody is held out for testing.
    split.valid_users = split.test_users
    split.train_users = sorted(set(dataset.user_ids.tolist()) - set(split.test_users))
    split.test_users = []
    return split


def train_and_export(
    dataset: Dataset,
    repository: Path,
    model_name: str,
    config: JobConfig,
    workdir: Path | None = None,
    progress: bool = False,
    version: str | None = None,
    evaluation: pb.EvaluationSummary | None = None,
) -> JobResult:
    """Meta-trains on the dataset and exports a new artifact version into the repository."""
    started = time.perf_counter()
    split = validation_split(dataset, config)
    train = dataset.subset(training_rows(dataset, split))
    valid_tasks = build_tasks(dataset, split, split.valid_users)
    log.info(
        "training on %d users (%d interactions), validating on %d users",
        len(split.train_users),
        len(train),
        len(valid_tasks),
    )
    adapted, result, prep = meta_train(
        dataset,
        train,
        valid_tasks,
        config.model,
        config.inner,
        config.train,
        support_sizes=config.train.validation_support_sizes,
        checkpoint_dir=workdir / "checkpoint" if workdir else None,
        log_path=workdir / "train_log.jsonl" if workdir else None,
        progress=progress,
    )
    info = pb.TrainingInfo(
        dataset=dataset.name,
        dataset_fingerprint=dataset.fingerprint(),
        meta_steps=result.steps_done,
        seed=config.train.seed,
        wall_time_s=time.perf_counter() - started,
        torch_version=torch.__version__,
        best_validation_loss=result.best_validation_loss if np.isfinite(result.best_validation_loss) else 0.0,
    )
    exported = export_artifact(
        adapted,
        prep.catalog,
        repository,
        model_name,
        version=version,
        learner=config.learner,
        evaluation=evaluation,
        training=info,
        max_support_trained=config.train.episodes.support_cap,
    )
    return JobResult(exported, result)
