"""The warmstart gRPC server: `create_server(config)` builds and starts one; `main()` runs it.

    python -m service.server --model-repository models --port 50051

One server = the Recommender service, grpc.health.v1 health, server reflection, and a
Prometheus /metrics endpoint on its own port, over one dynamic batcher and one model
manager. Health is SERVING for "" and "warmstart.v1.Recommender" only once a model is
loaded and warmed up. SIGHUP reloads (retrying refused versions); SIGTERM or SIGINT
drains: health NOT_SERVING, no new RPCs, in-flight ones finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.batcher import BatcherConfig, DynamicBatcher
from service.config import ConfigError, ServiceConfig, configure_logging, parse_config, unknown_environment
from service.core import RecommenderCore, RequestLimits
from service.engines import EngineConfig, create_engine
from service.metrics import Metrics, MetricsEndpoint, serve_metrics
from service.repository import EngineFactory, LoadedModel, ModelManager, ModelSettings, load_model, resolve_model_name
from service.servicer import SERVICE_NAME, InFlight, add_recommender

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)
SECOND_STOP_MARGIN_S = 0.2  # see WarmstartServer.stop
# gRPC's own receive limit: above the service's limit (which answers INVALID_ARGUMENT with
# a BadRequest), a guard against messages too large to buffer at all.
TRANSPORT_LIMIT_FACTOR = 2


@dataclass
class WarmstartServer:
    """A started server. `port` and `metrics_port` are the bound ports."""

    config: ServiceConfig
    port: int
    metrics_port: int
    metrics: Metrics
    models: ModelManager
    _grpc: grpc.aio.Server
    _health: health.aio.HealthServicer
    _batcher: DynamicBatcher
    _endpoint: MetricsEndpoint
    _ready: asyncio.Event
    _in_flight: InFlight
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _stopped: bool = False

    async def wait_until_ready(self, timeout_s: float) -> LoadedModel:
        """Waits until a model is served; raises TimeoutError."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        model = self.models.current
        assert model is not None
        return model

    async def reload(self, retry_refused: bool = True) -> LoadedModel | None:
        """Looks for a better version now (what SIGHUP does); returns the model served."""
        return await self.models.refresh(retry_refused=retry_refused)

    def request_reload(self) -> None:
        """Schedules a reload (for signal handlers)."""
        self._spawn(self.reload(), "reload")

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: health NOT_SERVING, refuse new RPCs, let in-flight ones finish (up to grace_s)."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period_s if grace_s is None else grace_s
        log.info("shutting down: draining in-flight requests (grace %.1f s)", grace)
        self.metrics.ready(False)
        await self._health.enter_graceful_shutdown()
        for task in list(self._tasks):
            task.cancel()
        self._batcher.drain()
        # New RPCs are refused from here on; Recommender calls in progress get up to the
        # grace period. Then whatever is left (health Watch streams never end) is cancelled.
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + grace
        stopping = asyncio.ensure_future(self._grpc.stop(grace))
        try:
            await asyncio.wait_for(self._in_flight.wait_idle(), grace)
        except TimeoutError:
            log.warning("%d requests still in flight after %.1f s: cancelling them", self._in_flight.count, grace)
        else:
            # Only health Watch streams can be left: end them now, not at the end of the
            # grace period. Not when the grace period is about to end anyway: a second stop
            # racing gRPC's own expiry crashed the process (grpcio 1.85, SIGSEGV).
            if loop.time() < grace_ends - SECOND_STOP_MARGIN_S:
                await self._grpc.stop(0)
        await stopping
        await self._batcher.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._endpoint.close)  # waits for the HTTP server's poll loop
        log.info("stopped")

    def _spawn(self, coroutine, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _server_credentials(config: ServiceConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def create_server(config: ServiceConfig, engine_factory: EngineFactory = create_engine) -> WarmstartServer:
    """Builds, binds and starts a server; the model loads in the background (see wait_until_ready).

    engine_factory: how an artifact becomes an engine (tests wrap the real one).
    """
    assert config.model_repository is not None
    model_dir = Path(config.model_repository) / resolve_model_name(Path(config.model_repository), config.model_name)
    metrics = Metrics()
    metrics.ready(False)
    batcher = DynamicBatcher(BatcherConfig(config.max_batch_size, config.max_wait_s, config.queue_size, config.batch_workers), metrics)
    settings = ModelSettings(
        engine=EngineConfig(
            kind=config.engine,  # type: ignore[arg-type]
            device=config.device,  # type: ignore[arg-type]
            ort_intra_op_threads=config.ort_intra_op_threads,
            ort_inter_op_threads=config.ort_inter_op_threads,
            torch_threads=config.torch_threads,
            cuda_graphs=config.cuda_graphs,
            precision=config.precision,  # type: ignore[arg-type]
        ),
        max_interactions=config.max_interactions,
        max_candidates=config.max_candidates,
        min_support_bucket=config.min_support_bucket,
        min_query_bucket=config.min_query_bucket,
        warmup_batch_size=config.max_batch_size,
    )
    health_servicer = health.aio.HealthServicer()
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    ready = asyncio.Event()

    async def on_loaded(model: LoadedModel) -> None:
        for service in HEALTH_SERVICES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        metrics.ready(True)
        ready.set()

    models = ModelManager(model_dir, partial(load_model, settings=settings, engine_factory=engine_factory), metrics, on_loaded)
    core = RecommenderCore(
        lambda: models.current,
        batcher,
        RequestLimits(config.max_interactions, config.max_candidates, config.allow_unknown_values, config.max_batch_size),
        metrics,
    )
    transport_limit = config.max_message_bytes * TRANSPORT_LIMIT_FACTOR
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", transport_limit), ("grpc.so_reuseport", 0)]
    )
    in_flight = add_recommender(server, core, metrics, config.max_message_bytes)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    try:
        if config.tls:
            port = server.add_secure_port(config.address, _server_credentials(config))
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
        raise ConfigError(f"--host / --port: cannot listen on {config.address}: {exc}") from exc
    try:
        endpoint = serve_metrics(metrics, config.metrics_host, config.metrics_port)
    except OSError as exc:
        raise ConfigError(f"--metrics-host / --metrics-port: cannot listen on {config.metrics_host}:{config.metrics_port}: {exc}") from exc
    await server.start()
    batcher.start()
    running = WarmstartServer(config, port, endpoint.port, metrics, models, server, health_servicer, batcher, endpoint, ready, in_flight)
    running._spawn(models.refresh(), "initial-load")
    if config.poll_interval_s > 0:
        running._spawn(models.poll(config.poll_interval_s), "poll")
    return running


async def serve(config: ServiceConfig, engine_factory: EngineFactory = create_engine) -> int:
    """Runs a server until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    server = await create_server(config, engine_factory)
    # One line on stdout that tools (and people) can read the bound ports from.
    print(f"warmstart listening on port {server.port} (metrics on port {server.metrics_port})", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`python -m service.server --help`)."""
    try:
        config = parse_config(argv, os.environ)
    except ConfigError as exc:
        print(f"warmstart: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    for name in unknown_environment(os.environ):
        log.warning("ignoring %s: no such setting (see --help)", name)
    try:
        return asyncio.run(serve(config))
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
