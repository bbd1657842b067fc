"""--workers: several server processes on one port (SO_REUSEPORT), one /metrics over all of
them, health meaning every worker, SIGHUP and SIGTERM reaching each, a dead worker ending
the server. Real `python -m service.server` processes on loopback, port 0."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from service.config import ConfigError, parse_config
from service.server import WorkerRole, create_server
from service.workers import available_cores, reserve_port, resolve_workers
from tests.e2e.live_server import HOST, LISTENING, LiveServer, clean_environment, wait_until_serving
from tests.service.gated_server import GATE_SOCKET_ENV
from tests.service.harness import WAIT_S, catalog_ids, make_config, new_version, recommend_request, wait_for
from warmstart.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ("--workers", "2", "--max-interactions", "8", "--max-candidates", "32", "--max-batch-size", "8")


def start_workers(repository: Path, tmp: Path, *flags: str, module: str = "service.server", env: dict[str, str] | None = None) -> LiveServer:
    """A server with workers; its multiprocess metrics directory goes under tmp (TMPDIR)."""
    log = open(tmp / "server.log", "w+")
    process = subprocess.Popen(
        [
            sys.executable, "-m", module, "--model-repository", str(repository), "--model-name", "tiny",
            "--host", HOST, "--port", "0", "--metrics-host", HOST, "--metrics-port", "0", "--poll-interval-s", "0",
            *FLAGS, *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=clean_environment(TMPDIR=str(tmp), PYTHONPATH=str(ROOT), **(env or {})),
    )
    line = process.stdout.readline()
    match = LISTENING.search(line)
    if match is None:
        process.kill()
        process.wait()
        raise RuntimeError(f"the server did not start: {line!r}\n{Path(log.name).read_text()}")
    assert line.strip().endswith("with 2 workers")
    server = LiveServer(process, int(match["port"]), int(match["metrics_port"]), log)
    wait_until_serving(server.target, WAIT_S * 2)
    return server


def scrape(server: LiveServer) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=WAIT_S).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def recommend_ok_per_worker(tmp: Path) -> dict[int, float]:
    """Recommend calls answered OK by each worker, read from its own multiprocess files."""
    (directory,) = tmp.glob("warmstart-metrics-*")
    counts = {}
    for file in directory.glob("counter_*.db"):
        pid = int(file.stem.rsplit("_", 1)[1])
        alone = tmp / f"worker-{pid}"
        alone.mkdir(exist_ok=True)
        shutil.copy(file, alone / file.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        counts[pid] = registry.get_sample_value("warmstart_requests_total", {"rpc": "Recommend", "code": "OK"}) or 0.0
    return counts


def worker_pids(server: LiveServer) -> list[int]:
    pid = server.process.pid
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def new_connection(server: LiveServer) -> grpc.Channel:
    """A channel with a TCP connection of its own (channels otherwise share connections to
    one target): the kernel picks a worker per connection."""
    return grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])


def recommend_on_a_new_connection(server: LiveServer, request: pb.RecommendRequest) -> pb.RecommendResponse:
    with new_connection(server) as channel:
        return pb_grpc.RecommenderStub(channel).Recommend(request, timeout=WAIT_S)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, tiny_artifact: Path) -> Path:
    repository = tmp_path_factory.mktemp("workers-repo")
    (repository / "tiny").mkdir()
    new_version(tiny_artifact, repository / "tiny", "1")
    return repository


@pytest.fixture(scope="module")
def two_workers(repository: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-workers")
    server = start_workers(repository, tmp, "--drain-delay-s", "0")
    try:
        yield server, tmp
    finally:
        assert server.stop() == 0, server.log_text()


def test_both_workers_answer_and_metrics_sum_over_them(two_workers, tiny_artifact: Path):
    server, tmp = two_workers
    ids = catalog_ids(tiny_artifact)
    rng = np.random.default_rng(1)
    calls = 40
    for _ in range(calls):
        response = recommend_on_a_new_connection(server, recommend_request(ids, 3, 10, rng, top_k=4))
        assert len(response.items) == 4 and response.model_version == "1"
    per_worker = recommend_ok_per_worker(tmp)
    assert len(per_worker) == 2 and set(per_worker) == set(worker_pids(server))
    assert all(n > 0 for n in per_worker.values()), per_worker  # the kernel spread the connections
    metrics = scrape(server)
    assert sample(metrics, "warmstart_requests_total", rpc="Recommend", code="OK") == calls == sum(per_worker.values())
    assert sample(metrics, "warmstart_request_duration_seconds_count", rpc="Recommend") == calls
    assert sample(metrics, "warmstart_ready") == 1.0
    assert sample(metrics, "warmstart_queue_capacity") == 2 * 256  # two workers' --queue-size
    assert sample(metrics, "warmstart_model_reloads_total", outcome="success") == 2
    served = [labels for (name, labels), value in metrics.items() if name == "warmstart_model_info" and value == 1]
    assert served == [(("engine", "onnxruntime:CPUExecutionProvider"), ("name", "tiny"), ("version", "1"))]


def test_sighup_reaches_every_worker(two_workers, repository: Path, tiny_artifact: Path):
    server, _ = two_workers
    new_version(tiny_artifact, repository / "tiny", "2")
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: sample(scrape(server), "warmstart_model_reloads_total", outcome="success") == 4, "both workers reloaded")
    metrics = scrape(server)
    assert [dict(labels)["version"] for (name, labels), value in metrics.items() if name == "warmstart_model_info"] == ["2"]
    for _ in range(12):
        with new_connection(server) as channel:
            assert pb_grpc.RecommenderStub(channel).GetModel(pb.GetModelRequest(), timeout=WAIT_S).model_version == "2"


class Gate:
    """The Unix socket the gated engines connect to (tests/service/gated_server.py): holds
    each worker's first batch inside its engine until `release`, then lets everything through."""

    def __init__(self, path: Path) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(64)
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self.released = False
        self.pids: set[int] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            pid = int(connection.makefile().readline())
            with self._lock:
                self.pids.add(pid)
                if self.released:
                    connection.close()
                else:
                    self._held.append(connection)

    def release(self) -> None:
        with self._lock:
            self.released = True
            for connection in self._held:
                connection.close()

    def close(self) -> None:
        self.release()
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def test_sigterm_drains_every_worker_and_loses_no_accepted_call(repository: Path, tmp_path: Path, tiny_artifact: Path):
    gate = Gate(tmp_path / "gate.sock")
    server = start_workers(
        repository, tmp_path, "--drain-delay-s", "0", "--grace-period-s", "20",
        module="tests.service.gated_server", env={GATE_SOCKET_ENV: str(tmp_path / "gate.sock")},
    )
    channels = []
    try:
        ids = catalog_ids(tiny_artifact)
        rng = np.random.default_rng(2)
        futures = []
        for _ in range(64):  # until both workers hold a call inside their engine
            channel = new_connection(server)
            channels.append(channel)
            grpc.channel_ready_future(channel).result(timeout=WAIT_S)
            futures.append(pb_grpc.RecommenderStub(channel).Recommend.future(recommend_request(ids, 2, 5, rng), timeout=60))
            if len(futures) >= 8 and len(gate.pids) == 2:
                break
        wait_for(lambda: len(gate.pids) == 2, "a call inside each worker's engine")
        assert gate.pids == set(worker_pids(server))
        server.process.send_signal(signal.SIGTERM)
        log = Path(server.log.name)
        wait_for(lambda: log.read_text().count("shutting down: NOT_SERVING") == 2, "both workers draining")
        gate.release()
        for future in futures:
            assert len(future.result(timeout=WAIT_S).items) == 5
        assert server.process.wait(WAIT_S) == 0
        text = server.log_text()
        assert "[worker 0] service.server: stopped" in text and "[worker 1] service.server: stopped" in text
    finally:
        for channel in channels:
            channel.close()
        gate.close()
        server.stop()


def test_a_dead_worker_stops_the_server_with_an_error(repository: Path, tmp_path: Path):
    server = start_workers(repository, tmp_path, "--drain-delay-s", "0")
    try:
        victim, survivor = worker_pids(server)
        os.kill(victim, signal.SIGKILL)
        assert server.process.wait(WAIT_S) == 1
        text = server.log_text()
        assert f"(pid {victim}) exited unexpectedly (signal SIGKILL)" in text
        assert "service.server: stopped" in text  # the survivor drained
        assert not Path(f"/proc/{survivor}").exists()
        assert list(tmp_path.glob("warmstart-metrics-*")) == []  # the metrics directory went with it
    finally:
        server.stop()


def test_a_taken_port_fails_at_once(repository: Path, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service.server", "--model-repository", str(repository), "--workers", "2",
             "--host", HOST, "--port", str(port), "--metrics-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S, env=clean_environment(TMPDIR=str(tmp_path)),
        )
    assert result.returncode == 2
    assert f"cannot listen on {HOST}:{port}" in result.stderr
    assert list(tmp_path.glob("warmstart-metrics-*")) == []


def test_port_zero_is_one_port_for_all_workers():
    """The supervisor's reservation picks the port; a second SO_REUSEPORT socket (as each
    worker's gRPC server binds) shares it, a socket without SO_REUSEPORT cannot."""
    reserved = reserve_port(HOST, 0)
    try:
        port = reserved.getsockname()[1]
        assert port > 0
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind((HOST, port))
            worker.listen()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind((HOST, port))
    finally:
        reserved.close()


def test_workers_setting():
    assert resolve_workers(0) == available_cores() == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3
    with pytest.raises(ConfigError, match="--workers / WARMSTART_WORKERS"):
        parse_config(["--model-repository", str(ROOT), "--workers", "-1"], {})
    assert parse_config(["--model-repository", str(ROOT)], {}).workers == 1  # one process unless asked


def test_a_worker_is_serving_only_while_every_worker_is(tiny_repository: Path):
    """In-process: a worker's health waits for the supervisor's word that all are ready,
    and it reports its own readiness."""

    async def scenario() -> list:
        changes: list[bool] = []
        role = WorkerRole(0, on_ready_change=changes.append, on_model=lambda model: None)
        server = await create_server(make_config(tiny_repository, model_name="tiny"), worker=role)
        try:
            await server.wait_until_ready(WAIT_S)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def status() -> int:
                    return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status

                seen = [await status()]
                await server.set_peers_ready(True)
                seen.append(await status())
                await server.set_peers_ready(False)
                seen.append(await status())
        finally:
            await server.stop(grace_s=1.0, drain_delay_s=0.0)
        return [seen, changes]

    seen, changes = asyncio.run(scenario())
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen == [not_serving, serving, not_serving]
    assert changes == [True, False]  # loaded, then stopping
