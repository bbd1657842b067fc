"""A real `python -m service.server` process on free loopback ports, for tests that talk to
it from outside (grpcurl, promtool, the main job's banner) as a user would.

The server prints one line with its bound ports (service/server.py `serve`); readiness is
the gRPC health service's SERVING, watched (not polled with sleeps).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on port (?P<port>\d+) \(metrics on port (?P<metrics_port>\d+)\)")
HOST = "127.0.0.1"


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without WARMSTART_* settings (a developer's own would leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMSTART_")}
    env.update(extra)
    return env


@dataclass
class LiveServer:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log: IO[str]

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the server drains), then its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.log.close()


def wait_until_serving(target: str, timeout_s: float) -> None:
    """Blocks until grpc.health.v1 says SERVING for the whole server; raises on timeout."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        for response in stream:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                stream.cancel()
                return
    raise TimeoutError(f"{target} never reported SERVING")


def start_server(
    repository: Path,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 120.0,
    python: str = sys.executable,
    cwd: Path = ROOT,
) -> LiveServer:
    """Starts a server on the repository (port 0 for both ports) and waits until it is ready.

    python, cwd: another installation of the service (the image's install steps) and a
    working directory outside the source tree, so that nothing is imported from it.
    """
    log = tempfile.NamedTemporaryFile("w+", prefix="warmstart-server-", suffix=".log", delete=False)
    command = [
        python, "-m", "service.server",
        "--model-repository", str(repository),
        "--host", HOST, "--port", "0",
        "--metrics-host", HOST, "--metrics-port", "0",
        "--poll-interval-s", "0",
        *extra_args,
    ]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True, env=clean_environment())
    assert process.stdout is not None
    line = process.stdout.readline()  # the server prints its ports once it listens
    match = LISTENING.search(line)
    if match is None:
        process.kill()
        process.wait()
        log.flush()
        raise RuntimeError(f"the server did not start: {line!r}\n{Path(log.name).read_text()}")
    server = LiveServer(process, int(match["port"]), int(match["metrics_port"]), log)
    try:
        wait_until_serving(server.target, ready_timeout_s)
    except Exception:
        text = server.log_text()
        server.stop()
        raise RuntimeError(f"the server never became ready:\n{text}") from None
    return server
