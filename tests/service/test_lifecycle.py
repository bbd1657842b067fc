"""Model lifecycle, overload, engine failure, deadlines, shutdown: real servers, real files."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.artifact import Artifact
from service.engines import Engine, EngineConfig, create_engine
from service.errors import GENERIC_INTERNAL_MESSAGE
from service.metrics import METRIC_NAMES
from service.padding import AdaptInputs, AdaptOutputs, EngineInputs, EngineOutputs
from tests.service.harness import (
    WAIT_S,
    ServerThread,
    flip_byte,
    make_config,
    new_version,
    recommend_request,
    wait_for,
)
from warmstart.v1 import recommender_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


class GatedEngine:
    """A real engine behind a gate the test opens and closes; records every batch shape."""

    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.description = inner.description
        self.on_gpu = inner.on_gpu
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False
        self.shapes: list[tuple[int, int, int]] = []  # (users, support, query)

        self.scorer = inner.scorer

    def _enter(self, shape: tuple[int, int, int]) -> None:
        self.shapes.append(shape)
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if self.fail:
            raise RuntimeError("simulated engine failure")

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        b, s, _ = inputs.support_items.shape
        self._enter((b, s, inputs.query_items.shape[1]))
        return self._inner.run(inputs)

    def adapt(self, inputs: AdaptInputs) -> AdaptOutputs:
        b, s, _ = inputs.support_items.shape
        self._enter((b, s, 0))  # query 0: the adapt graph (candidates scored from the item table)
        return self._inner.adapt(inputs)

    def gpu_memory_bytes(self) -> dict[str, int]:
        return {}


class GatedFactory:
    def __init__(self) -> None:
        self.engines: list[GatedEngine] = []

    def __call__(self, artifact: Artifact, config: EngineConfig) -> Engine:
        engine = GatedEngine(create_engine(artifact, config))
        self.engines.append(engine)
        return engine

    @property
    def engine(self) -> GatedEngine:
        return self.engines[-1]


def health_status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    (tmp_path / "repo" / "tiny").mkdir(parents=True)
    return tmp_path / "repo"


def test_not_ready_until_a_version_appears(repository: Path, tiny_artifact: Path, item_ids):
    with ServerThread(make_config(repository), wait_ready=False) as server:
        assert health_status(server.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(server.channel, "warmstart.v1.Recommender") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Recommend(pb.RecommendRequest())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.metric("warmstart_ready") == 0
        new_version(tiny_artifact, repository / "tiny", "1")
        server.run(server.server.reload())
        assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING
        assert server.metric("warmstart_ready") == 1
        assert server.stub.Recommend(recommend_request(item_ids, 3, 5, np.random.default_rng(0))).model_version == "1"


def test_bad_version_is_refused_and_a_good_one_is_picked_up(repository: Path, tiny_artifact: Path, item_ids, caplog):
    """Polling: a corrupt v2 is refused (old serves, metric + log, not retried), a good v3
    replaces v1; requests keep flowing throughout and none fails."""
    caplog.set_level(logging.DEBUG, logger="service.repository")
    new_version(tiny_artifact, repository / "tiny", "1")
    (repository / "tiny" / ".4.partial-abc").mkdir()  # an export in progress: ignored
    with ServerThread(make_config(repository, poll_interval_s=0.05)) as server:
        failures: list[BaseException] = []
        versions: set[str] = set()
        stop = threading.Event()

        def traffic() -> None:
            rng = np.random.default_rng(1)
            while not stop.is_set():
                try:
                    versions.add(server.stub.Recommend(recommend_request(item_ids, 4, 20, rng), timeout=10).model_version)
                except grpc.RpcError as error:
                    failures.append(error)

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            new_version(tiny_artifact, repository / "tiny", "2", tamper=lambda v: flip_byte(v / "model.onnx"))
            wait_for(lambda: server.metric("warmstart_model_load_failures_total", reason="checksum") == 1, "v2 refused")
            assert "model.onnx" in server.server.models.refused()["2"]
            assert any("refused" in r.message and "still serving version 1" in r.message for r in caplog.records)
            checks_after_refusal = len(caplog.records)
            wait_for(
                lambda: sum("checking" in r.getMessage() for r in caplog.records[checks_after_refusal:]) >= 3,
                "three more polls",
            )
            assert server.metric("warmstart_model_load_failures_total", reason="checksum") == 1  # not retried
            assert server.stub.GetModel(pb.GetModelRequest()).model_version == "1"
            assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING

            new_version(tiny_artifact, repository / "tiny", "3")
            wait_for(lambda: server.stub.GetModel(pb.GetModelRequest()).model_version == "3", "v3 served")
            wait_for(lambda: "3" in versions, "a request answered by v3")
        finally:
            stop.set()
            sender.join(WAIT_S)
        assert not failures
        assert server.metric("warmstart_model_reloads_total", outcome="success") == 2
        assert server.metric("warmstart_model_info", name="tiny", version="3", engine="onnxruntime:CPUExecutionProvider") == 1


def test_a_refused_version_is_retried_when_it_changes_or_on_reload(repository: Path, tiny_artifact: Path):
    """Polling skips a refused version while its directory stays as it was, retries it
    once it changes (an operator's repair); a reload (SIGHUP) retries it anyway."""
    new_version(tiny_artifact, repository / "tiny", "1")
    with ServerThread(make_config(repository)) as server:
        v2 = new_version(tiny_artifact, repository / "tiny", "2", tamper=lambda v: (v / "extra.bin").write_bytes(b"x"))
        assert server.run(server.server.models.refresh()).version == "1"
        assert server.metric("warmstart_model_load_failures_total", reason="unlisted_file") == 1
        assert server.run(server.server.models.refresh()).version == "1"
        assert server.metric("warmstart_model_load_failures_total", reason="unlisted_file") == 1  # unchanged: not retried
        assert server.run(server.server.reload(retry_refused=True)).version == "1"
        assert server.metric("warmstart_model_load_failures_total", reason="unlisted_file") == 2  # reload: retried
        (v2 / "extra.bin").unlink()  # fixed in place
        assert server.run(server.server.models.refresh()).version == "2"


def test_a_version_copied_in_file_by_file_is_served_once_complete(repository: Path, tiny_artifact: Path, tmp_path: Path):
    """`cp -r` into the repository: polling finds the version half copied and refuses it,
    then serves it once the copy is complete (no SIGHUP needed)."""
    new_version(tiny_artifact, repository / "tiny", "1")
    (tmp_path / "elsewhere").mkdir()
    complete = new_version(tiny_artifact, tmp_path / "elsewhere", "2")
    files = sorted(p.relative_to(complete) for p in complete.rglob("*") if p.is_file())
    target = repository / "tiny" / "2"
    with ServerThread(make_config(repository)) as server:
        target.mkdir()
        for relative in files[: len(files) // 2]:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(complete / relative, target / relative)
        assert server.run(server.server.models.refresh()).version == "1"
        assert "2" in server.server.models.refused()
        for relative in files[len(files) // 2 :]:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(complete / relative, target / relative)
        assert server.run(server.server.models.refresh()).version == "2"


def test_with_trusted_keys_only_signed_versions_are_served(repository: Path, tiny_artifact: Path, tmp_path: Path):
    from warmstart import signature

    keys = tmp_path / "keys"
    keys.mkdir()
    signature.generate_key_pair(keys / "signer.key", keys / "trusted.pem")
    signature.generate_key_pair(keys / "other.key", keys / "other.pem")
    v1 = new_version(tiny_artifact, repository / "tiny", "1")
    with ServerThread(make_config(repository, trusted_keys=keys / "trusted.pem"), wait_ready=False) as server:
        server.run(server.server.models.refresh())
        assert server.server.models.current is None  # unsigned: refused
        assert server.metric("warmstart_model_load_failures_total", reason="signature") == 1
        signature.sign_artifact(v1, signature.load_private_key(keys / "other.key"))
        server.run(server.server.models.refresh())
        assert server.server.models.current is None  # signed by a key it does not trust
        assert "no trusted key" in server.server.models.refused()["1"]
        signature.sign_artifact(v1, signature.load_private_key(keys / "signer.key"))
        assert server.run(server.server.models.refresh()).version == "1"  # the signature changed: retried
        assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING


def test_full_queue_answers_resource_exhausted(tiny_repository: Path, item_ids):
    factory = GatedFactory()
    config = make_config(tiny_repository, model_name="tiny", max_batch_size=1, queue_size=2, max_wait_s=0.0)
    with ServerThread(config, engine_factory=factory) as server:
        engine = factory.engine
        engine.gate.clear()
        engine.entered.clear()
        rng = np.random.default_rng(2)
        first = server.stub.Recommend.future(recommend_request(item_ids, 2, 5, rng))
        assert engine.entered.wait(WAIT_S)
        queued = [server.stub.Recommend.future(recommend_request(item_ids, 2, 5, rng)) for _ in range(2)]
        wait_for(lambda: server.metric("warmstart_queue_depth") == 2, "two queued requests")
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Recommend(recommend_request(item_ids, 2, 5, rng), timeout=WAIT_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - started < 2.0  # at once, not after the queue drains
        engine.gate.set()
        for future in [first, *queued]:
            assert len(future.result(timeout=WAIT_S).items) == 5
        assert server.metric("warmstart_rejects_total", reason="queue_full") == 1


def test_engine_failure_reaches_every_caller(tiny_repository: Path, item_ids, caplog):
    factory = GatedFactory()
    with ServerThread(make_config(tiny_repository, model_name="tiny"), engine_factory=factory) as server:
        factory.engine.fail = True
        rng = np.random.default_rng(3)
        futures = [server.stub.Recommend.future(recommend_request(item_ids, 3, 8, rng)) for _ in range(40)]
        for future in futures:
            error = future.exception(timeout=WAIT_S)
            assert error is not None and error.code() == grpc.StatusCode.INTERNAL
            assert error.details() == GENERIC_INTERNAL_MESSAGE  # the detail stays in the log
        assert any("simulated engine failure" in (r.exc_text or str(r.exc_info)) for r in caplog.records if r.exc_info)
        factory.engine.fail = False
        assert server.stub.Recommend(recommend_request(item_ids, 3, 8, rng)).items
        assert server.metric("warmstart_rejects_total", reason="engine_failure") == 40


def test_expired_requests_are_dropped_before_the_engine(tiny_repository: Path, item_ids):
    factory = GatedFactory()
    config = make_config(tiny_repository, model_name="tiny", max_wait_s=0.0)
    with ServerThread(config, engine_factory=factory) as server:
        engine = factory.engine
        engine.gate.clear()
        engine.entered.clear()
        engine.shapes.clear()
        rng = np.random.default_rng(4)
        blocker = server.stub.Recommend.future(recommend_request(item_ids, 2, 10, rng))
        assert engine.entered.wait(WAIT_S)
        # Its deadline passes while the engine is held (the gate stays shut until then); 2 s
        # so that it reaches the handler first even with another test process on the cores
        # (with 0.3 s gRPC once dropped it before the handler, which then counted nothing).
        doomed = server.stub.Recommend.future(recommend_request(item_ids, 2, 100, rng), timeout=2.0)
        assert doomed.exception(timeout=WAIT_S).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        engine.gate.set()
        blocker.result(timeout=WAIT_S)
        after = server.stub.Recommend(recommend_request(item_ids, 2, 40, rng))  # queued after the doomed one
        assert after.items
        assert [b for b, _, _ in engine.shapes] == [1, 1]  # two calls of one user each: the doomed request never ran
        dropped = server.metric("warmstart_rejects_total", reason="cancelled") + server.metric(
            "warmstart_rejects_total", reason="deadline_exceeded"
        )
        assert dropped == 1


def test_metrics_endpoint_exposes_the_documented_names(shared_server, item_ids):
    shared_server.stub.Recommend(recommend_request(item_ids, 3, 5, np.random.default_rng(5)))
    url = f"http://127.0.0.1:{shared_server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=WAIT_S).read().decode()
    exposed = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    exposed |= set(re.findall(r"^# HELP (\S+)", text, re.M))  # labelled metrics with no sample yet
    for name in METRIC_NAMES:
        assert name in exposed or f"{name}_count" in exposed, name
    capacity = shared_server.metric("warmstart_queue_capacity")
    assert capacity == shared_server.config.queue_size
    labels = {key for family in text_string_to_metric_families(text) if family.name.startswith("warmstart") for s in family.samples for key in s.labels}
    assert labels <= {"rpc", "code", "reason", "outcome", "name", "version", "engine", "kind", "le"}  # never a user or item
    promtool = subprocess.run(["which", "promtool"], capture_output=True, text=True).stdout.strip()
    if promtool:
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the real process: signals ----------------------------------------------------------


class GatedProcess:
    """`python -m tests.service.gated_server` as a subprocess on free ports."""

    def __init__(self, repository: Path, *flags: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "tests.service.gated_server",
                "--model-repository", str(repository), "--model-name", "tiny",
                "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                "--poll-interval-s", "0", "--max-interactions", "8", "--max-candidates", "32", "--log-level", "WARNING",
                "--drain-delay-s", "0", *flags,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        )
        line = self.process.stdout.readline()
        match = re.search(r"listening on port (\d+)", line)
        assert match, f"unexpected first line {line!r}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
        grpc.channel_ready_future(self.channel).result(timeout=WAIT_S)
        wait_for(lambda: health_status(self.channel) == health_pb2.HealthCheckResponse.SERVING, "SERVING")

    def hold_a_request(self, item_ids) -> grpc.Future:
        future = pb_stub(self.channel).Recommend.future(recommend_request(item_ids, 2, 5, np.random.default_rng(6)), timeout=60)
        assert self.process.stdout.readline().strip() == "ENGINE_ENTERED"
        return future

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_S)


def pb_stub(channel):
    from warmstart.v1 import recommender_pb2_grpc

    return recommender_pb2_grpc.RecommenderStub(channel)


def test_sigterm_drains_in_flight_requests(tiny_repository: Path, item_ids):
    server = GatedProcess(tiny_repository, "--grace-period-s", "20")
    try:
        watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = server.hold_a_request(item_ids)
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.process.stdin.write("\n")  # let the engine finish the batch
        server.process.stdin.flush()
        assert len(in_flight.result(timeout=WAIT_S).items) == 5
        assert server.process.wait(WAIT_S) == 0
    finally:
        server.close()


def test_sigterm_keeps_serving_through_the_drain_delay_and_loses_no_call(tiny_repository: Path, item_ids):
    """SIGTERM: health turns NOT_SERVING at once, the server keeps answering for the drain
    delay (calls sent after NOT_SERVING are served), every call in flight at SIGTERM ends
    OK, the Watch stream ends, then the process exits 0."""
    server = GatedProcess(tiny_repository, "--drain-delay-s", "3", "--grace-period-s", "20", "--max-batch-size", "4")
    try:
        watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        held = server.hold_a_request(item_ids)  # inside the engine
        rng = np.random.default_rng(8)
        queued = [pb_stub(server.channel).Recommend.future(recommend_request(item_ids, 2, 5, rng), timeout=60) for _ in range(6)]
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        after = pb_stub(server.channel).Recommend.future(recommend_request(item_ids, 0, 5, rng), timeout=60)
        server.process.stdin.write("\n" * 8)  # let every gated batch through
        server.process.stdin.flush()
        for future in [held, *queued, after]:
            assert len(future.result(timeout=WAIT_S).items) == 5
        assert server.process.wait(WAIT_S) == 0
        assert time.monotonic() - signalled >= 2.5  # it served through the delay before stopping
        assert list(watch) == []  # the Watch stream ended with the server, without an error
    finally:
        server.close()


def test_sigterm_exits_within_the_grace_period_even_if_the_engine_hangs(tiny_repository: Path, item_ids):
    server = GatedProcess(tiny_repository, "--grace-period-s", "0.5")
    try:
        in_flight = server.hold_a_request(item_ids)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(WAIT_S) == 0
        assert time.monotonic() - signalled < 15
        assert in_flight.exception(timeout=WAIT_S).code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        server.close()


def test_sighup_reloads(tmp_path: Path, tiny_artifact: Path):
    repository = tmp_path / "repo"
    (repository / "tiny").mkdir(parents=True)
    new_version(tiny_artifact, repository / "tiny", "1")
    server = GatedProcess(repository)
    try:
        new_version(tiny_artifact, repository / "tiny", "2")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: pb_stub(server.channel).GetModel(pb.GetModelRequest()).model_version == "2", "v2 after SIGHUP")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(WAIT_S) == 0
    finally:
        server.close()
