"""Test helpers: a real server on port 0 in a background thread, configs, references.

The server runs its own asyncio loop in a thread, so tests talk to it with the ordinary
synchronous gRPC client over loopback, as a backend would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import stat
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Coroutine

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.config import ServiceConfig
from service.engines import create_engine
from service.repository import EngineFactory
from service.server import WarmstartServer, create_server
from warmstart.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pb_grpc

WAIT_S = 30.0  # every wait on a condition gives up after this long


def make_config(repository: Path, **overrides: Any) -> ServiceConfig:
    """Small limits (few buckets: fast warm-up), port 0, no polling unless asked."""
    base = ServiceConfig(
        model_repository=repository,
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        max_interactions=32,
        max_candidates=256,
        max_batch_size=16,
        poll_interval_s=0.0,
        grace_period_s=5.0,
        drain_delay_s=0.0,
    )
    return replace(base, **overrides)


class ServerThread:
    """A WarmstartServer on its own event loop in a daemon thread."""

    def __init__(self, config: ServiceConfig, engine_factory: EngineFactory = create_engine, wait_ready: bool = True) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._wait_ready = wait_ready
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self.server: WarmstartServer | None = None
        self.channel: grpc.Channel | None = None

    def run(self, coroutine: Coroutine, timeout_s: float = WAIT_S):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self.server = self.run(create_server(self.config, self._engine_factory))
        if self._wait_ready:
            self.run(self.server.wait_until_ready(WAIT_S))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.run(self.server.stop(grace_s=1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_S)
        self._loop.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def stub(self) -> pb_grpc.RecommenderStub:
        return pb_grpc.RecommenderStub(self.channel)

    def metric(self, name: str, /, **labels: str) -> float:
        assert self.server is not None
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Polls a condition (cheap checks only) until it holds; fails after timeout_s."""
    event = threading.Event()
    deadline = threading.Timer(timeout_s, event.set)
    deadline.start()
    try:
        while not condition():
            if event.wait(0.01):
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
    finally:
        deadline.cancel()


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The fields a google.rpc.BadRequest detail names."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status on {error}"
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields.extend(v.field for v in bad.field_violations)
    return fields


def writable_copy(source: Path, target: Path) -> Path:
    """A copy of an artifact whose files may be changed (exported files are read-only)."""
    shutil.copytree(source, target)
    make_writable(target)
    return target


def make_writable(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def edit_manifest(artifact: Path, edit: Callable[[dict], None]) -> None:
    path = artifact / "manifest.json"
    path.chmod(0o644)
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1))
    reseal_manifest(artifact)


def reseal_manifest(artifact: Path) -> None:
    """Rewrites manifest.sha256 for an edited manifest (as a careless re-export would), so
    that a test reaches the checks behind the digest."""
    digest_file = artifact / "manifest.sha256"
    digest_file.chmod(0o644)
    digest = hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    digest_file.write_text(f"{digest}  manifest.json\n")


def new_version(source: Path, model_dir: Path, version: str, tamper: Callable[[Path], None] | None = None) -> Path:
    """Copies an artifact as another version (manifest model_version updated), optionally
    damaged by `tamper`, and publishes it by rename as the exporter does."""
    staging = model_dir / f".{version}.partial"
    writable_copy(source, staging)
    edit_manifest(staging, lambda m: m.update(model_version=version))
    if tamper is not None:
        tamper(staging)
    staging.rename(model_dir / version)
    return model_dir / version


def catalog_ids(artifact: Path) -> list[str]:
    return (artifact / "catalog_items.txt").read_text().split("\n")[:-1]


def recommend_request(
    item_ids: list[str], n_interactions: int, n_candidates: int, rng: np.random.Generator, **fields: Any
) -> pb.RecommendRequest:
    chosen = rng.choice(len(item_ids), size=n_interactions + n_candidates, replace=False)
    return pb.RecommendRequest(
        interactions=[
            pb.Interaction(item_id=item_ids[i], label=float(rng.integers(1, 6))) for i in chosen[:n_interactions]
        ],
        candidates=[pb.Candidate(item_id=item_ids[i]) for i in chosen[n_interactions:]],
        **fields,
    )


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def without_item_table(artifact: Path) -> None:
    """Makes a writable artifact copy look like one exported before the item table: no
    item_table.safetensors, no adapt graph, the manifest without them (resealed)."""
    from warmstart import contract

    dropped = {contract.ITEM_TABLE_FILE, contract.ADAPT_ONNX_FILE, contract.ADAPT_TORCH_PROGRAM_FILE}
    for name in dropped:
        (artifact / name).unlink()

    def edit(manifest: dict) -> None:
        manifest.pop("item_table")
        manifest.pop("adapt_graph")
        manifest["files"] = [f for f in manifest["files"] if f["path"] not in dropped]

    edit_manifest(artifact, edit)
