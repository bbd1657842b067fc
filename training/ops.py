"""Reporting a training job to Prometheus through a Pushgateway.

Batch jobs do not live long enough to be scraped, so the job pushes its summary once at
the end: how long it ran, how far it got, and how the exported model compares with the
bias baseline on the validation users.
"""

from __future__ import annotations

import time
from typing import Mapping

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

JOB = "warmstart_training"


def summary_registry(model_name: str, summary: Mapping) -> CollectorRegistry:
    """The job's summary as gauges in a fresh registry."""
    registry = CollectorRegistry()
    Gauge("warmstart_training_meta_steps", "Meta-steps the job ran", registry=registry).set(summary["meta_steps"])
    Gauge("warmstart_training_wall_time_seconds", "Wall time of meta-training", registry=registry).set(
        summary["training_wall_time_s"]
    )
    Gauge("warmstart_training_best_validation_loss", "Best validation loss (early stopping)", registry=registry).set(
        summary["best_validation_loss"]
    )
    rmse = Gauge(
        "warmstart_training_validation_rmse",
        "Validation RMSE of the exported model and of the bias baseline",
        ["support_size", "method"],
        registry=registry,
    )
    for metric in summary.get("validation", []):
        if metric.get("metric") == "rmse":
            rmse.labels(metric["support_size"], metric["method"]).set(metric["value"])
    info = Gauge(
        "warmstart_training_artifact_info", "The artifact the job exported", ["model", "version"], registry=registry
    )
    info.labels(model_name, str(summary.get("model_version", ""))).set(1)
    Gauge("warmstart_training_last_success_timestamp_seconds", "When the job last succeeded", registry=registry).set(
        time.time()
    )
    return registry


def push_summary(gateway: str, model_name: str, summary: Mapping, timeout_s: float = 10.0) -> None:
    """Pushes the summary (replacing the previous push of this job and model)."""
    push_to_gateway(gateway, job=JOB, registry=summary_registry(model_name, summary), grouping_key={"model": model_name}, timeout=timeout_s)
