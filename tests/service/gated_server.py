"""`python -m tests.service.gated_server <server flags>`: the real server process (signals,
drain, exit) with an engine that, for requests with interactions, prints ENGINE_ENTERED
and waits for a line on stdin. Lets a test hold a request in flight for as long as it
likes, without sleeping."""

from __future__ import annotations

import asyncio
import os
import sys

from service.artifact import Artifact
from service.config import configure_logging, parse_config
from service.engines import Engine, EngineConfig, create_engine
from service.padding import AdaptInputs, AdaptOutputs, EngineInputs, EngineOutputs
from service.server import serve


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


def gated(artifact: Artifact, config: EngineConfig) -> Engine:
    return StdinGatedEngine(create_engine(artifact, config))


def main() -> int:
    config = parse_config(sys.argv[1:], os.environ)
    configure_logging(config)
    return asyncio.run(serve(config, engine_factory=gated))


if __name__ == "__main__":
    sys.exit(main())
