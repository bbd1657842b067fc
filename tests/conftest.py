"""Shared fixtures: a tiny artifact trained on synthetic data and exported for real.

Training and exporting take about a minute on two cores, so the artifact is built once per test session and
copied where a test needs to change it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def pytest_configure(config):
    """One torch thread: the models here are tiny, and torch's default of one thread per
    core measured several times slower when other processes share the cores (as in CI)."""
    try:
        import torch
    except ImportError:  # an onnxruntime-only environment
        return
    torch.set_num_threads(1)

TINY_INNER_STEPS = 2
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """A model repository holding one exported version: <repo>/tiny/1/."""
    from training.pipeline import JobConfig, train_and_export
    from training.synthetic import generate_synthetic
    from training import model as M

    dataset = generate_synthetic(seed=3, n_users=240, n_items=150)
    # Two unrolled inner steps (the served model has 5): a step after a step is exercised,
    # and the graphs, their export and every engine built from them are smaller.
    config = JobConfig.default(meta_steps=30, eval_every=10, meta_batch_size=16, inner_steps=TINY_INNER_STEPS)
    config.model = M.served_config(factors=8, engagement_factors=4)  # the served structure, small
    repository = tmp_path_factory.mktemp("model-repository")
    train_and_export(dataset, repository, "tiny", config, version="1")
    return repository


@pytest.fixture(scope="session")
def tiny_artifact(tiny_repository) -> Path:
    """The artifact directory itself (do not modify: copy it with `artifact_copy`)."""
    return tiny_repository / "tiny" / "1"


@pytest.fixture()
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    """A private copy of the tiny artifact a test may tamper with."""
    target = tmp_path / "repo" / "tiny" / "1"
    shutil.copytree(tiny_artifact, target)
    return target


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    path = SHARED_DATA / "ml-100k"
    if not (path / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found at {path} (it is never committed; see README)")
    return path
