"""The production training job: data -> meta-training -> artifact.

Unlike the evaluation harness (which holds out test users to measure), the production
job trains on every user except a seeded validation share that drives early stopping,
then exports the best parameters as a new artifact version.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from google.protobuf import json_format

from training import model as M
from training.dataset import Dataset
from training.distributed import Collective
from training.export import ExportResult, export_artifact, sha256_file
from training.inner_loop import InnerLoopConfig
from training.initialisation import meta_train
from training.learners import learner_config
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
    # At most this many validation users (a seeded sample of the share above); the rest
    # train. Tuning the baselines scores every validation user on a grid of settings, so
    # its cost grows with them, while 2000 users already pin the validation loss far more
    # tightly than the differences it chooses between. MovieLens-100K has 58.
    max_valid_users: int = 2000

    def __post_init__(self) -> None:
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError("valid_fraction must be in (0, 1)")
        if self.max_valid_users < 1:
            raise ValueError("max_valid_users must be >= 1")

    @staticmethod
    def default(learner: str = "warmstart", kind: str = "bias_factor", inner_steps: int = 5, **train) -> "JobConfig":
        return JobConfig(
            model=M.served_config(kind=kind) if kind == "bias_factor" else M.ModelConfig(kind=kind),  # type: ignore[arg-type]
            learner=learner,
            inner=learner_config(learner, steps=inner_steps),
            train=TrainConfig(**train),
        )


@dataclass
class JobResult:
    export: ExportResult
    train: TrainResult
    summary: dict  # machine-readable: also inside the artifact as training_summary.json


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
    valid = split.test_users
    if len(valid) > config.max_valid_users:
        chosen = np.random.default_rng([config.train.seed, 3]).choice(len(valid), config.max_valid_users, replace=False)
        valid = sorted(valid[i] for i in chosen)
    split.valid_users = valid
    held = set(valid)
    split.train_users = [u for u in dataset.factorized("user_ids")[0].tolist() if u not in held]
    split.test_users = []
    return split


def validation_evaluation(dataset: Dataset, adapted, catalog, valid_tasks, train: Dataset, sizes) -> pb.EvaluationSummary:
    """The exported model beside the bias baseline on the validation users, per support size.

    Validation users drove early stopping, so this is a sanity check that ships with the
    artifact, not the honest estimate: that comes from `training.cli evaluate`.
    """
    from training.baselines import BiasBaseline
    from training.fitting import FitContext, support_label
    from training.metrics import paired_difference_ci, query_loss

    bias = BiasBaseline()
    bias.fit(FitContext(dataset=dataset, train=train, valid_tasks=list(valid_tasks), support_sizes=tuple(sizes), split=None))  # type: ignore[arg-type]
    low, high = dataset.label.min_value, dataset.label.max_value
    summary = pb.EvaluationSummary(dataset=dataset.name, protocol="validation users of the training job")
    for k in sizes:
        tasks = [t.with_support_size(k) for t in valid_tasks]
        per_method = {}
        for name, predictions in (("model", adapted.predict(catalog, tasks)), ("bias", bias.predict(tasks))):
            per_method[name] = np.array([query_loss(np.clip(p, low, high), t.query_labels, "rating") for p, t in zip(predictions, tasks)])
        rmse = {n: float(np.sqrt(v.mean())) for n, v in per_method.items()}
        _, lo, hi = paired_difference_ci(per_method["model"], per_method["bias"])
        scale = rmse["model"] + rmse["bias"]
        for name in ("model", "bias"):
            summary.metrics.append(
                pb.MetricValue(
                    scenario="validation",
                    support_size=support_label(k),
                    metric="rmse",
                    method=name,
                    value=rmse[name],
                    ci_low=lo / scale if name == "model" else 0.0,
                    ci_high=hi / scale if name == "model" else 0.0,
                    reference="bias",
                )
            )
    return summary


def train_and_export(
    dataset: Dataset,
    repository: Path,
    model_name: str,
    config: JobConfig,
    workdir: Path | None = None,
    progress: bool = False,
    version: str | None = None,
    collective: Collective | None = None,
) -> JobResult | None:
    """Meta-trains on the dataset and exports a new artifact version into the repository.

    Under torchrun (a Collective over several processes) every process trains its share
    and rank 0 alone evaluates and exports; the other ranks wait for its export to succeed
    and return None."""
    collective = collective or Collective()
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
        collective=collective,
    )
    if not collective.is_main:
        if not collective.all_succeeded(True):
            raise RuntimeError("rank 0 failed to export the artifact (its log says why)")
        return None
    try:
        job = _evaluate_and_export(dataset, repository, model_name, config, workdir, version, started, split, train, valid_tasks, adapted, result, prep)
    except BaseException:
        collective.all_succeeded(False)
        raise
    collective.all_succeeded(True)
    return job


def _evaluate_and_export(dataset, repository, model_name, config, workdir, version, started, split, train, valid_tasks, adapted, result, prep) -> JobResult:
    """Rank 0's part of train_and_export: the validation summary, the artifact, the job summary."""
    evaluation = validation_evaluation(dataset, adapted, prep.catalog, valid_tasks, train, config.train.validation_support_sizes)
    checkpoint_file = workdir / "checkpoint" / "checkpoint.safetensors" if workdir else None
    info = pb.TrainingInfo(
        dataset=dataset.name,
        dataset_fingerprint=dataset.fingerprint(),
        checkpoint_sha256=sha256_file(checkpoint_file) if checkpoint_file and checkpoint_file.exists() else "",
        meta_steps=result.steps_done,
        seed=config.train.seed,
        wall_time_s=time.perf_counter() - started,
        torch_version=torch.__version__,
        best_validation_loss=result.best_validation_loss if np.isfinite(result.best_validation_loss) else 0.0,
    )
    summary = {
        "model_name": model_name,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "interactions": len(dataset),
        "train_users": len(split.train_users),
        "valid_users": len(valid_tasks),
        "learner": config.learner,
        "model": config.model.to_dict(),
        "inner_loop": config.inner.to_dict(),
        "train": config.train.to_dict(),
        "meta_steps": result.steps_done,
        "best_validation_loss": info.best_validation_loss,
        "engagement_meta_steps": result.engagement_steps,
        "engagement_validation_recall_at_20": None if result.engagement_recall is None else round(result.engagement_recall, 6),
        "training_wall_time_s": round(result.wall_time_s, 3),
        "validation": [
            json_format.MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for m in evaluation.metrics
        ],
    }
    history = "".join(json.dumps(entry) + "\n" for entry in result.history)
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
        extra_files={
            "training_summary.json": (json.dumps(summary, indent=1) + "\n").encode(),
            "training_log.jsonl": history.encode(),
        },
    )
    summary["artifact"] = str(exported.path)
    summary["model_version"] = exported.manifest.model_version
    summary["export_wall_time_s"] = round(exported.wall_time_s, 3)
    summary["total_wall_time_s"] = round(time.perf_counter() - started, 3)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "job_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return JobResult(exported, result, summary)


def export_checkpoint(
    checkpoint_dir: Path, dataset: Dataset, repository: Path, model_name: str, version: str | None = None, learner: str = ""
) -> ExportResult:
    """Exports the best parameters of a (finished or interrupted) training checkpoint.

    The checkpoint carries its model, inner-loop and feature configuration; the dataset
    supplies the item catalog (and must be the one the checkpoint was trained on).
    """
    from training.batching import EncodedCatalog
    from training.features import FeatureSchema
    from training.trainer import AdaptedModel, MetaTrainer, has_checkpoint, ranked_catalog_rows, read_checkpoint
    from training.dataset import LabelSpec

    if not has_checkpoint(checkpoint_dir):
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint.safetensors (is this a training run's checkpoint directory?)")
    if has_checkpoint(checkpoint_dir / "memory"):  # the memory learner: its phases carry every parameter
        checkpoint_dir = checkpoint_dir / "memory"
    model_config = M.ModelConfig.from_dict(read_checkpoint(checkpoint_dir)[0]["model_config"])
    if model_config.engagement_factors:
        # The engagement phase starts from the rating phase's result and carries every parameter.
        if not has_checkpoint(checkpoint_dir / "engagement"):
            raise FileNotFoundError(f"{checkpoint_dir}: the engagement phase has no checkpoint yet (rerun train to finish it)")
        checkpoint_dir = checkpoint_dir / "engagement"
    meta, params = read_checkpoint(checkpoint_dir)
    label = LabelSpec(**meta["label"])
    if label != dataset.label:
        raise ValueError(f"checkpoint labels are {label}, the dataset's are {dataset.label}")
    schema = FeatureSchema.from_dict(meta["schema"])
    catalog = EncodedCatalog(schema, dataset)
    if model_config.engagement_factors:
        with torch.no_grad():
            params = MetaTrainer.ranked_gram(model_config, schema, params, catalog, ranked_catalog_rows(catalog, schema))
    adapted = AdaptedModel(model_config, InnerLoopConfig.from_dict(meta["inner_config"]), schema, label, params)
    info = pb.TrainingInfo(
        dataset=dataset.name,
        meta_steps=meta["step"],
        seed=meta["train_config"]["seed"],
        torch_version=meta.get("torch_version", ""),
        best_validation_loss=meta["best_loss"] or 0.0,
    )
    return export_artifact(
        adapted,
        catalog,
        repository,
        model_name,
        version=version,
        learner=learner,
        training=info,
        max_support_trained=meta["train_config"]["episodes"]["support_cap"],
    )
