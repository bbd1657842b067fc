"""Model lifecycle: find versions in the repository, load and warm them up, swap atomically.

The repository is `<repository>/<model_name>/<version>/` with integer versions; the
highest loadable one is served. Dot-prefixed directories (an export in progress writes
`.<version>.partial-*`) and non-integer names are ignored. A version is loaded, verified
and warmed up (every shape bucket) in a thread while the current one keeps serving, then
becomes current by one reference assignment on the event loop: batches already formed
finish on the model they were encoded for. A version that fails to load is refused (log
+ metric) and remembered with a fingerprint of its directory (names, sizes, times,
inodes): polling retries it only once that changes (a version still being copied in is
picked up when the copy completes), an explicit reload (SIGHUP) retries it anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from service.artifact import Artifact, ArtifactError, load_artifact
from service.onboarding import OnboardingTables, onboarding_tables
from service.config import ConfigError
from service.engines import Engine, EngineConfig, create_engine
from service.metrics import Metrics
from service.padding import (
    ShapeBuckets,
    UserInputs,
    UserOutputs,
    pad_batch,
    pad_support,
    split_batch,
    zero_batch,
    zero_support,
)
from service.scoring import rank_outputs

log = logging.getLogger(__name__)

EngineFactory = Callable[[Artifact, EngineConfig], Engine]


class ModelLoadError(Exception):
    """A version could not be served; `reason` labels warmstart_model_load_failures_total."""

    def __init__(self, version: str, reason: str, problem: str) -> None:
        super().__init__(f"version {version}: {problem}")
        self.version = version
        self.reason = reason


@dataclass(frozen=True)
class ModelSettings:
    """How a version is turned into a served model."""

    engine: EngineConfig
    max_interactions: int = 128  # largest support bucket
    max_candidates: int = 1024  # largest query bucket (or the catalog size, if larger)
    min_support_bucket: int = 1
    min_query_bucket: int = 16
    warmup_batch_size: int = 32  # the largest batch the batcher forms
    trusted_keys: tuple | None = None  # Ed25519 public keys: serve only versions one of them signed

    def __post_init__(self) -> None:
        for name in ("max_interactions", "max_candidates", "min_support_bucket", "min_query_bucket", "warmup_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(eq=False)
class LoadedModel:
    """A verified, warmed-up version: what the batcher runs and the service describes."""

    artifact: Artifact
    engine: Engine
    buckets: ShapeBuckets
    load_seconds: float
    onboarding: OnboardingTables | None = None  # what Onboard selects with; None: the version cannot onboard

    @property
    def name(self) -> str:
        return self.artifact.model_name

    @property
    def version(self) -> str:
        return self.artifact.model_version

    # Read on every request: computed once (the artifact derives them from the manifest).
    @cached_property
    def has_engagement(self) -> bool:
        return self.artifact.has_engagement

    @cached_property
    def inner_steps(self) -> int:
        return self.artifact.inner_steps

    @property
    def scores_from_table(self) -> bool:
        """Whether catalog items are scored from the item table (adapt, then score) rather
        than through the fused graph."""
        return self.engine.scorer is not None

    def query_bucket(self, user: UserInputs) -> int:
        """The padded query length of the user's fused-graph batch; 0 for the table path
        (its batches are padded along the support only)."""
        return 0 if user.query_items is None else self.buckets.query_length(user.query_size)

    def run_users(self, users: list[UserInputs], support_length: int, query_length: int) -> list[UserOutputs]:
        """One batch of users of one query bucket: adapted and scored against the item table
        (query_length 0), or through the fused graph; ranked where they ask for it."""
        b = len(users)
        if query_length == 0:
            adapted = self.engine.adapt(pad_support(users, support_length))
            if adapted.user_bias.shape != (b,) or adapted.support_loss_before.shape != (b,) or adapted.support_loss_after.shape != (b,):
                raise RuntimeError(f"adapt graph returned shapes {[None if a is None else a.shape for a in adapted]} for {b} users")
            return self.engine.scorer.score(users, adapted)
        outputs = self.engine.run(pad_batch(users, support_length, query_length))
        if outputs.query_scores.shape != (b, query_length) or outputs.support_loss_before.shape != (b,) or outputs.support_loss_after.shape != (b,):
            raise RuntimeError(
                f"engine returned shapes {[o.shape for o in outputs if o is not None]} for a batch of {b} users with {query_length} query items"
            )
        return [rank_outputs(output, user.ranking) for output, user in zip(split_batch(outputs, users), users)]


def load_model(path: Path, settings: ModelSettings, engine_factory: EngineFactory = create_engine) -> LoadedModel:
    """Verifies, loads and warms up one version (blocking: call it in a thread)."""
    version = path.name
    started = time.perf_counter()
    try:
        artifact = load_artifact(path, settings.trusted_keys)
    except ArtifactError as exc:
        raise ModelLoadError(version, exc.reason, str(exc)) from exc
    if artifact.model_version != version:
        raise ModelLoadError(
            version, "manifest", f"manifest.json says version {artifact.model_version!r}, the directory is {version!r}"
        )
    try:
        engine = engine_factory(artifact, settings.engine)
    except ArtifactError as exc:
        raise ModelLoadError(version, exc.reason, str(exc)) from exc
    except Exception as exc:  # onnxruntime and torch raise their own types for unloadable graphs
        raise ModelLoadError(version, "engine", f"the engine could not load it: {exc}") from exc
    # With an item table the fused graph serves only candidates encoded from inline
    # attributes (at most max_candidates); without one it ranks the whole catalog too.
    max_query = settings.max_candidates if engine.scorer is not None else max(settings.max_candidates, artifact.catalog.size)
    buckets = ShapeBuckets.build(settings.min_support_bucket, settings.max_interactions, settings.min_query_bucket, max_query)
    if engine.scorer is None:
        log.warning("%s has no item table: the whole catalog is scored through the fused graph (re-export for faster ranking)", path)
    try:
        warm_up(engine, buckets, artifact, settings.warmup_batch_size)
    except Exception as exc:
        raise ModelLoadError(version, "warmup", f"warm-up failed: {exc}") from exc
    try:
        onboarding = onboarding_tables(artifact)
    except ValueError as exc:
        raise ModelLoadError(version, "content", f"onboarding tables: {exc}") from exc
    return LoadedModel(artifact, engine, buckets, time.perf_counter() - started, onboarding)


def warm_up(engine: Engine, buckets: ShapeBuckets, artifact: Artifact, batch_size: int) -> None:
    """Runs every (support, query) bucket at batch 1 and at the largest batch, so that no
    request pays for a first run (allocation plans, kernel selection) and a broken graph
    is refused before it serves; with an item table, every support bucket of the adapt
    graph too, and the score step over the whole catalog."""
    encoder = artifact.encoder
    widths = (encoder.user_width, encoder.item_width)
    for support_length, query_length in buckets.shapes():
        for b in sorted({1, batch_size}):
            outputs = engine.run(zero_batch(b, support_length, query_length, *widths))
            if outputs.query_scores.shape != (b, query_length):
                raise RuntimeError(f"query_scores has shape {outputs.query_scores.shape}, expected {(b, query_length)}")
    if engine.scorer is None:
        return
    for support_length in buckets.support:
        for b in sorted({1, batch_size}):
            adapted = engine.adapt(zero_support(b, support_length, *widths))
            if adapted.user_bias.shape != (b,):
                raise RuntimeError(f"user_bias has shape {adapted.user_bias.shape}, expected {(b,)}")
    user = UserInputs(np.zeros(encoder.user_width, dtype=np.int64), np.zeros((0, encoder.item_width), dtype=np.int64), np.zeros(0, dtype=np.float32))
    adapted = engine.adapt(pad_support([user], buckets.support[0]))
    (output,) = engine.scorer.score([user], adapted)
    if output.query_scores.shape != (artifact.catalog.size,):
        raise RuntimeError(f"the score step returned {output.query_scores.shape} scores for a catalog of {artifact.catalog.size}")


def list_versions(model_dir: Path) -> list[str]:
    """Integer version directories, highest first (dot-prefixed and other names ignored)."""
    if not model_dir.is_dir():
        return []
    names = [p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(names, key=lambda n: (int(n), n), reverse=True)


def directory_fingerprint(path: Path) -> tuple:
    """Every entry under a version directory with its size and modification time: what
    changes when files are added, replaced or finish being copied."""
    entries = []
    for directory, subdirectories, files in os.walk(path):
        for name in subdirectories + files:
            entry = Path(directory) / name
            try:
                info = entry.lstat()
            except FileNotFoundError:  # removed while we looked: the next poll sees the change
                continue
            entries.append(
                (entry.relative_to(path).as_posix(), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_mode)
            )
    return tuple(sorted(entries))


def resolve_model_name(repository: Path, model_name: str) -> str:
    """The configured model name, or the repository's only model when none is configured."""
    if model_name:
        return model_name
    models = sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(models) != 1:
        found = ", ".join(models) or "none"
        raise ConfigError(f"--model-name is needed: the repository {repository} holds {len(models)} models ({found})")
    return models[0]


class ModelManager:
    """Holds the model being served and replaces it when a better version appears."""

    def __init__(
        self,
        model_dir: Path,
        load: Callable[[Path], LoadedModel],
        metrics: Metrics,
        on_loaded: Callable[[LoadedModel], Awaitable[None]],
    ) -> None:
        self._model_dir = model_dir
        self._load = load
        self._metrics = metrics
        self._on_loaded = on_loaded
        self._current: LoadedModel | None = None
        self._refused: dict[str, tuple[str, tuple]] = {}  # version -> (why, fingerprint of its directory then)
        self._lock = asyncio.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def refused(self) -> dict[str, str]:
        return {version: why for version, (why, _) in self._refused.items()}

    async def refresh(self, retry_refused: bool = False) -> LoadedModel | None:
        """Serves the highest loadable version; returns the model now served (or None).

        Versions are tried from the highest down to the one being served; the first that
        loads replaces it. retry_refused: try versions refused before (SIGHUP) too.
        """
        async with self._lock:
            if retry_refused:
                self._refused.clear()
            current = self._current
            log.debug("checking %s for versions (serving %s)", self._model_dir, current.version if current else "none")
            for version in list_versions(self._model_dir):
                if current is not None and version == current.version:
                    break
                fingerprint = await asyncio.to_thread(directory_fingerprint, self._model_dir / version)
                refused = self._refused.get(version)
                if refused is not None and refused[1] == fingerprint:
                    continue
                try:
                    model = await asyncio.to_thread(self._load, self._model_dir / version)
                except ModelLoadError as exc:
                    self._refuse(version, exc.reason, str(exc), fingerprint)
                    continue
                except Exception as exc:
                    log.error("loading version %s failed unexpectedly", version, exc_info=exc)
                    self._refuse(version, "unexpected", f"version {version}: {type(exc).__name__}: {exc}", fingerprint)
                    continue
                self._refused.pop(version, None)
                self._current = model
                log.info(
                    "serving %s version %s (%s) loaded and warmed up in %.2f s (%d shape buckets)",
                    model.name, model.version, model.engine.description, model.load_seconds, len(model.buckets.shapes()),
                )
                self._metrics.model_loaded(model.name, model.version, model.engine.description, model.engine.gpu_memory_bytes)
                await self._on_loaded(model)
                break
            if self._current is None:
                log.warning("no loadable version of %s yet: the server is not ready", self._model_dir)
            return self._current

    async def poll(self, interval_s: float) -> None:
        """Refreshes every interval_s seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except OSError as exc:  # the repository may be briefly unreadable (a remount): try next time
                log.error("scanning %s failed: %s", self._model_dir, exc)

    def _refuse(self, version: str, reason: str, problem: str, fingerprint: tuple) -> None:
        self._refused[version] = (problem, fingerprint)
        self._metrics.model_refused(reason)
        serving = f"still serving version {self._current.version}" if self._current else "no version is being served"
        log.error("refused %s: %s (%s)", self._model_dir / version, problem, serving)
