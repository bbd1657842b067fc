"""The warmstart gRPC server: `create_server(config)` builds and starts one; `main()` runs it.

    python -m service.server --model-repository models --port 50051

One server = the Recommender service, grpc.health.v1 health, server reflection, and a
Prometheus /metrics endpoint on its own port, over one dynamic batcher and one model
manager. Health is SERVING for "" and "warmstart.v1.Recommender" only once a model is
loaded and warmed up. SIGHUP reloads (retrying refused versions). SIGTERM drains: health
NOT_SERVING at once, calls still served for the drain delay (so that balancers stop
routing here first), then no new calls, and the accepted ones finish within the grace
period. SIGINT does the same without the drain delay.

Overload is explicit: at most --max-in-flight Recommend/Score calls are in progress at
once, and the handler answers any call beyond that RESOURCE_EXHAUSTED at once.

With --workers N > 1, `main` runs the supervisor of service/workers.py instead: N such
servers in their own processes share the port, and one /metrics covers them all.
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
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.batcher import BatcherConfig, DynamicBatcher
from service.config import ConfigError, ServiceConfig, configure_logging, parse_config, unknown_environment
from service.core import RecommenderCore, RequestLimits
from service.engines import EngineConfig, create_engine
from service.metrics import Metrics, MetricsEndpoint, serve_metrics
from service.repository import EngineFactory, LoadedModel, ModelManager, ModelSettings, load_model, resolve_model_name
from service.servicer import SERVICE_NAME, Admission, add_recommender
from warmstart import signature

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)
# gRPC's own receive limit: above the service's limit (which answers INVALID_ARGUMENT with
# a BadRequest), a guard against messages too large to buffer at all.
TRANSPORT_LIMIT_FACTOR = 2
# gRPC's own limit on concurrent RPCs: room for the Recommender calls the handler admits,
# the ones it is refusing, and health / reflection / GetModel calls beside them.
GRPC_LIMIT_FACTOR = 2
GRPC_LIMIT_HEADROOM = 64


@dataclass
class WarmstartServer:
    """A started server. `port` and `metrics_port` are the bound ports."""

    config: ServiceConfig
    port: int
    metrics_port: int
    metrics: Metrics
    models: ModelManager
    _grpc: grpc.aio.Server
    _health: "DrainingHealthServicer"
    _batcher: DynamicBatcher
    _endpoint: MetricsEndpoint | None
    _readiness: "Readiness"
    _admission: Admission
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _stopped: bool = False

    async def wait_until_ready(self, timeout_s: float) -> LoadedModel:
        """Waits until a model is served; raises TimeoutError."""
        await asyncio.wait_for(self._readiness.loaded.wait(), timeout_s)
        model = self.models.current
        assert model is not None
        return model

    async def reload(self, retry_refused: bool = True) -> LoadedModel | None:
        """Looks for a better version now (what SIGHUP does); returns the model served."""
        return await self.models.refresh(retry_refused=retry_refused)

    def request_reload(self) -> None:
        """Schedules a reload (for signal handlers)."""
        self._spawn(self.reload(), "reload")

    async def set_peers_ready(self, ready: bool) -> None:
        """Whether the other workers sharing the port are ready: health says SERVING only
        when this server and all of them are (a balancer's check reaches any one of them)."""
        await self._readiness.set_peers(ready)

    async def stop(self, grace_s: float | None = None, drain_delay_s: float | None = None) -> None:
        """Drains, then stops: health NOT_SERVING at once; calls are still served for
        drain_delay_s (balancers and clients watching health stop routing here); then new
        calls are refused and those accepted get up to grace_s to finish."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period_s if grace_s is None else grace_s
        delay = self.config.drain_delay_s if drain_delay_s is None else drain_delay_s
        log.info("shutting down: NOT_SERVING, serving for %.1f s more, then %.1f s for calls in flight", delay, grace)
        await self._readiness.stopping()
        await self._health.enter_graceful_shutdown()
        for task in list(self._tasks):
            task.cancel()
        if delay > 0:
            await asyncio.sleep(delay)
        self._batcher.drain()
        # gRPC refuses new calls from here on and waits for every call it accepted (those
        # not yet in a handler too) up to the grace period, then cancels the rest. Health
        # Watch streams never end by themselves: they are ended now, so they do not hold
        # the stop for the whole grace period.
        stopping = asyncio.ensure_future(self._grpc.stop(grace))
        self._health.end_watches()
        await stopping
        if self._admission.count:
            log.warning("%d calls were still in progress after the %.1f s grace period: cancelled", self._admission.count, grace)
        await self._batcher.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._endpoint is not None:
            await asyncio.to_thread(self._endpoint.close)  # waits for the HTTP server's poll loop
        log.info("stopped")

    def _spawn(self, coroutine, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Readiness:
    """What health and warmstart_ready say: SERVING once a model is loaded and warmed up,
    while the peers (other workers on the port; none for a lone server) are ready too, and
    until the server stops. `on_change(ready)` hears this server's own readiness."""

    def __init__(
        self, health: "DrainingHealthServicer", metrics: Metrics, peers_ready: bool, on_change: Callable[[bool], None] | None
    ) -> None:
        self.loaded = asyncio.Event()
        self._health = health
        self._metrics = metrics
        self._peers_ready = peers_ready
        self._on_change = on_change
        self._stopping = False

    @property
    def own(self) -> bool:
        return self.loaded.is_set() and not self._stopping

    async def model_loaded(self) -> None:
        was = self.own
        self.loaded.set()
        await self._publish(was)

    async def set_peers(self, ready: bool) -> None:
        self._peers_ready = ready
        await self._publish(self.own)

    async def stopping(self) -> None:
        was = self.own
        self._stopping = True
        await self._publish(was)

    async def _publish(self, was: bool) -> None:
        own = self.own
        self._metrics.ready(own)
        status = health_pb2.HealthCheckResponse.SERVING if own and self._peers_ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if not self._stopping:  # once stopping, enter_graceful_shutdown owns the status
            for service in HEALTH_SERVICES:
                await self._health.set(service, status)
        if own != was and self._on_change is not None:
            self._on_change(own)


@dataclass(frozen=True)
class WorkerRole:
    """How a server runs as one of several workers sharing a port (service/workers.py)."""

    index: int
    on_ready_change: Callable[[bool], None]  # this worker's own readiness, for the supervisor
    on_model: Callable[[dict[str, str]], None]  # the model it now serves (name, version, engine)
    gpu_memory_refresh_s: float = 5.0


class DrainingHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose Watch streams end when the server stops (after sending the
    last status), instead of lasting until gRPC cancels them at the end of the grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._ending = asyncio.Event()

    def end_watches(self) -> None:
        self._ending.set()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            await asyncio.wait((watch, ending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, ending):
                task.cancel()
            await asyncio.gather(watch, ending, return_exceptions=True)


class _AnswerToAGoneCallFilter(logging.Filter):
    """gRPC logs an ERROR with a traceback when a handler's answer (a response or an abort)
    reaches a call the client already ended (cancelled, or its deadline passed) before the
    handler could see it: under overload that is routine, and nothing failed on this side.
    Those records become one DEBUG line; every other gRPC record passes unchanged."""

    MARKER = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self.MARKER):
            log.debug("an answer reached a call its client had already ended: %s", record.getMessage()[:200])
            return False
        return True


def _quiet_answers_to_gone_calls() -> None:
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _AnswerToAGoneCallFilter) for f in grpc_log.filters):
        grpc_log.addFilter(_AnswerToAGoneCallFilter())


def _trusted_keys(config: ServiceConfig) -> tuple | None:
    if config.trusted_keys is None:
        return None
    try:
        keys = tuple(signature.load_public_keys(config.trusted_keys))
    except signature.SignatureError as exc:
        raise ConfigError(f"--trusted-keys / WARMSTART_TRUSTED_KEYS: {exc}") from exc
    log.info("serving signed versions only: %d trusted key(s) %s", len(keys), ", ".join(signature.key_id(k) for k in keys))
    return keys


def _server_credentials(config: ServiceConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def create_server(
    config: ServiceConfig, engine_factory: EngineFactory = create_engine, worker: WorkerRole | None = None
) -> WarmstartServer:
    """Builds, binds and starts a server; the model loads in the background (see wait_until_ready).

    engine_factory: how an artifact becomes an engine (tests wrap the real one).
    worker: run as one of several workers: bind the port shared (SO_REUSEPORT), record
    metrics into the multiprocess files (no /metrics endpoint of its own), and say SERVING
    only once the supervisor reports every worker ready (`set_peers_ready`).
    """
    assert config.model_repository is not None
    model_dir = Path(config.model_repository) / resolve_model_name(Path(config.model_repository), config.model_name)
    _quiet_answers_to_gone_calls()
    metrics = Metrics(multiprocess=worker is not None)
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
        trusted_keys=_trusted_keys(config),
    )
    health_servicer = DrainingHealthServicer()
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    readiness = Readiness(health_servicer, metrics, peers_ready=worker is None, on_change=worker.on_ready_change if worker else None)

    async def on_loaded(model: LoadedModel) -> None:
        if worker is not None:
            worker.on_model({"name": model.name, "version": model.version, "engine": model.engine.description})
        await readiness.model_loaded()

    models = ModelManager(model_dir, partial(load_model, settings=settings, engine_factory=engine_factory), metrics, on_loaded)
    core = RecommenderCore(
        lambda: models.current,
        batcher,
        RequestLimits(config.max_interactions, config.max_candidates, config.allow_unknown_values, config.max_batch_size),
        metrics,
    )
    transport_limit = config.max_message_bytes * TRANSPORT_LIMIT_FACTOR
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            # A lone server refuses a port another process listens on; workers share theirs.
            ("grpc.so_reuseport", 1 if worker is not None else 0),
            # Calls wait in gRPC until the event loop takes them; when a CPU-bound loop falls
            # behind, this queue (1000 by default) held calls until their deadlines passed.
            # Bounded, gRPC refuses calls beyond it at once (randomly from the soft limit,
            # all at the hard one); the client sees CANCELLED.
            ("grpc.server.max_pending_requests", config.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_pending_rpcs),
        ],
        # A backstop behind the handler's own limit (which answers with metrics and a
        # message): gRPC refuses RPCs of any kind beyond this many at once, RESOURCE_EXHAUSTED.
        maximum_concurrent_rpcs=config.max_in_flight * GRPC_LIMIT_FACTOR + GRPC_LIMIT_HEADROOM,
    )
    admission = add_recommender(server, core, metrics, config.max_message_bytes, config.max_in_flight)
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
    endpoint = None
    if worker is None:  # workers' metrics are served by their supervisor
        try:
            endpoint = serve_metrics(metrics, config.metrics_host, config.metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-host / --metrics-port: cannot listen on {config.metrics_host}:{config.metrics_port}: {exc}"
            ) from exc
    await server.start()
    batcher.start()
    metrics_port = endpoint.port if endpoint is not None else config.metrics_port
    running = WarmstartServer(
        config, port, metrics_port, metrics, models, server, health_servicer, batcher, endpoint, readiness, admission
    )
    running._spawn(models.refresh(), "initial-load")
    if config.poll_interval_s > 0:
        running._spawn(models.poll(config.poll_interval_s), "poll")
    if worker is not None:
        running._spawn(_refresh_gpu_memory(metrics, worker.gpu_memory_refresh_s), "gpu-memory")
    return running


async def _refresh_gpu_memory(metrics: Metrics, interval_s: float) -> None:
    """A worker's GPU memory into its metrics files every interval_s (a callback gauge
    cannot reach the supervisor's /metrics)."""
    while True:
        await asyncio.sleep(interval_s)
        metrics.refresh_gpu_memory()


async def serve(config: ServiceConfig, engine_factory: EngineFactory = create_engine) -> int:
    """Runs a server until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    server = await create_server(config, engine_factory)
    # One line on stdout that tools (and people) can read the bound ports from.
    print(listening_line(server.port, server.metrics_port, 1), flush=True)
    return await run_until_signalled(server)


def listening_line(port: int, metrics_port: int, workers: int) -> str:
    """The start-up line tools read the bound ports from."""
    suffix = f" with {workers} workers" if workers > 1 else ""
    return f"warmstart listening on port {port} (metrics on port {metrics_port}){suffix}"


async def run_until_signalled(server: WarmstartServer, stop: "asyncio.Future[signal.Signals] | None" = None) -> int:
    """Serves until SIGTERM/SIGINT (or `stop` resolves with one of them), then drains;
    SIGHUP reloads. Returns the exit code."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = loop.create_future()

    def on_signal(signum: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(signum)

    loop.add_signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    signum = await stop
    # SIGTERM comes from an orchestrator whose balancers need the drain delay to stop
    # routing here; SIGINT from a person at a terminal, who has no balancer to wait for.
    await server.stop(drain_delay_s=0.0 if signum == signal.SIGINT else None)
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
    from service.workers import resolve_workers, supervise  # it builds on this module

    try:
        if resolve_workers(config.workers) > 1:
            return supervise(config)
        return asyncio.run(serve(config))
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
