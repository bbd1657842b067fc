"""`python -m tests.service.gated_server <server flags>`: the real server process (signals,
drain, exit) with an engine that, for requests with interactions, prints ENGINE_ENTERED
and waits for a line on stdin. Lets a test hold a request in flight for as long as it
likes, without sleeping.

With --workers > 1 (several processes, one stdin) the gate is a Unix socket instead, named
by GATE_SOCKET_ENV: for a request with interactions the engine connects, sends its pid and
waits until the test closes the connection."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from service.artifact import Artifact
from service.config import configure_logging, parse_config
from service.engines import Engine, EngineConfig, create_engine
from service.padding import AdaptInputs, AdaptOutputs, EngineInputs, EngineOutputs
from service.server import serve
from service.workers import resolve_workers, supervise

GATE_SOCKET_ENV = "GATED_SERVER_SOCKET"


class StdinGatedEngine:
    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.description = inner.description
        self.on_gpu = inner.on_gpu
        self.scorer = inner.scorer

    @staticmethod
    def _gate(support_mask) -> None:
        if support_mask.any():  # a real request (warm-up batches are all padding)
            print("ENGINE_ENTERED", flush=True)
            sys.stdin.readline()

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        self._gate(inputs.support_mask)
        return self._inner.run(inputs)

    def adapt(self, inputs: AdaptInputs) -> AdaptOutputs:
        self._gate(inputs.support_mask)
        return self._inner.adapt(inputs)

    def gpu_memory_bytes(self) -> dict[str, int]:
        return {}


class SocketGatedEngine:
    def __init__(self, inner: Engine, gate: str) -> None:
        self._inner = inner
        self._gate_path = gate
        self.description = inner.description
        self.on_gpu = inner.on_gpu
        self.scorer = inner.scorer

    def _gate(self, support_mask) -> None:
        if support_mask.any():  # a real request (warm-up batches are all padding)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gate:
                gate.connect(self._gate_path)
                gate.sendall(f"{os.getpid()}\n".encode())
                gate.recv(1)  # returns when the test closes its end

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        self._gate(inputs.support_mask)
        return self._inner.run(inputs)

    def adapt(self, inputs: AdaptInputs) -> AdaptOutputs:
        self._gate(inputs.support_mask)
        return self._inner.adapt(inputs)

    def gpu_memory_bytes(self) -> dict[str, int]:
        return {}


def gated(artifact: Artifact, config: EngineConfig) -> Engine:
    return StdinGatedEngine(create_engine(artifact, config))


def socket_gated(artifact: Artifact, config: EngineConfig) -> Engine:
    return SocketGatedEngine(create_engine(artifact, config), os.environ[GATE_SOCKET_ENV])


def main() -> int:
    config = parse_config(sys.argv[1:], os.environ)
    configure_logging(config)
    if resolve_workers(config.workers) > 1:
        return supervise(config, engine_factory=socket_gated)
    return asyncio.run(serve(config, engine_factory=gated))


if __name__ == "__main__":
    sys.exit(main())
