"""Several server processes on one port (`--workers N`): a supervisor and N workers.

gRPC's documented pattern for using every core from Python: processes that share the
listening port with SO_REUSEPORT, so that the kernel spreads connections over them, and
no gRPC object created before the processes split. Here the workers are *spawned*
(fresh interpreters), so nothing of the supervisor's state, gRPC's or anyone's, is
inherited, and each worker may initialise CUDA itself (a forked child of a process
that had, could not). Each worker is a whole server of service/server.py: its own
batcher, engine, model manager and drain; on a GPU the workers share the device (each
its own CUDA context and graphs: plan GPU memory for N copies of the engine).

The supervisor (this module's `supervise`, the process `main` runs) creates no gRPC
object. It
- holds the port: binds it with SO_REUSEPORT (not listening: connections only reach
  the workers) before any worker starts, so that port 0 means one free port the kernel
  picks for all of them, and a port already taken fails at once with a clear error;
- serves the one /metrics endpoint, over prometheus-client's multiprocess files of
  every worker (PROMETHEUS_MULTIPROC_DIR: a fresh directory per start, removed at exit);
- makes health mean the whole server: a worker says SERVING only while every worker is
  ready (a balancer's check reaches whichever worker the kernel picks);
- forwards SIGHUP (reload) and SIGTERM / SIGINT (drain) to every worker, and exits once
  all have drained, 0 when every one stopped cleanly; each polls for versions itself;
- when a worker dies, logs it, drains the others and exits 1: the orchestrator restarts
  the server (its restart backoff, counts and alerts see a crash loop, which a
  supervisor restarting workers in place would hide behind a pod that looks healthy;
  and a worker dies of a bug or of the memory limit, where a fresh start of the whole
  pod is what helps). Workers also stop (drain) when the supervisor itself dies.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from service.config import ConfigError, ServiceConfig, configure_logging
from service.metrics import MetricsEndpoint, serve_multiprocess_metrics
from service.engines import create_engine
from service.repository import EngineFactory, resolve_model_name
from service.server import WorkerRole, create_server, listening_line, run_until_signalled

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# After the drain delay and grace period, how long the supervisor still waits for a
# worker to exit before it kills it.
STOP_MARGIN_S = 10.0
EXIT_WORKER_DIED = 1


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    return len(os.sched_getaffinity(0))


def resolve_workers(requested: int) -> int:
    """--workers: 0 = one per available core."""
    if requested < 0:
        raise ValueError(f"workers must be >= 0, got {requested}")
    return requested if requested > 0 else available_cores()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, not listening: it holds the port
    (port 0: a free one the kernel picks, see getsockname) while workers bind it too."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host: cannot resolve {host!r}: {exc}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack, as gRPC binds [::]
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host / --port: cannot listen on {host}:{port}: {exc}") from exc
    return sock


def supervise(config: ServiceConfig, engine_factory: EngineFactory = create_engine) -> int:
    """Runs resolve_workers(config.workers) workers on one port until they have all
    stopped; returns the exit code (0 clean, 1 a worker died, 2 a worker could not start).

    engine_factory: a module-level function (it is pickled into each worker: tests wrap
    the real one)."""
    assert config.model_repository is not None
    count = resolve_workers(config.workers)
    resolve_model_name(Path(config.model_repository), config.model_name)  # a bad setting fails here, once
    reserved = reserve_port(config.host, config.port)
    metrics_dir = tempfile.mkdtemp(prefix="warmstart-metrics-")
    if os.environ.get(MULTIPROC_ENV):
        log.warning("%s=%s is replaced by this start's own directory %s", MULTIPROC_ENV, os.environ[MULTIPROC_ENV], metrics_dir)
    # Spawned workers inherit it before they import prometheus_client (which reads it then).
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        worker_config = replace(config, port=reserved.getsockname()[1])
        return asyncio.run(_Supervisor(worker_config, count, metrics_dir, engine_factory).run())
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


@dataclass(eq=False)
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    bound: bool = False
    ready: bool = False
    model: dict[str, str] | None = None
    exited: bool = False

    def send(self, *message: object) -> None:
        try:
            self.conn.send(message)
        except OSError:  # it is exiting: its sentinel says so next
            pass

    def signal(self, signum: signal.Signals) -> None:
        if not self.exited and self.process.pid is not None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass


@dataclass
class _Supervisor:
    config: ServiceConfig
    count: int
    metrics_dir: str
    engine_factory: EngineFactory
    workers: list[_Worker] = field(default_factory=list)
    stopping: signal.Signals | None = None
    peers_ready: bool = False
    exit_code: int = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._all_bound = loop.create_future()
        self._all_exited = loop.create_future()
        endpoint = self._serve_metrics()
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop, signum)
            loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
            context = multiprocessing.get_context("spawn")
            for index in range(self.count):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=_worker_main, args=(self.config, index, theirs, self.engine_factory), name=f"warmstart-worker-{index}", daemon=False
                )
                process.start()
                theirs.close()
                worker = _Worker(index, process, ours)
                self.workers.append(worker)
                loop.add_reader(ours.fileno(), self._on_message, worker)
                loop.add_reader(process.sentinel, self._on_exit, worker)
            await asyncio.wait([self._all_bound, self._all_exited], return_when=asyncio.FIRST_COMPLETED)
            if self._all_bound.done() and not self._all_exited.done():
                print(listening_line(self.config.port, endpoint.port, self.count), flush=True)
                log.info("%d workers on port %d; metrics of all of them on port %d", self.count, self.config.port, endpoint.port)
            await self._all_exited
            return self.exit_code
        finally:
            for worker in self.workers:
                if not worker.exited:
                    worker.process.kill()
                    worker.process.join()
            await asyncio.to_thread(endpoint.close)

    def _serve_metrics(self) -> MetricsEndpoint:
        try:
            return serve_multiprocess_metrics(
                self.metrics_dir, lambda: [w.model for w in self.workers if w.model and not w.exited],
                self.config.metrics_host, self.config.metrics_port,
            )
        except OSError as exc:
            raise ConfigError(
                f"--metrics-host / --metrics-port: cannot listen on {self.config.metrics_host}:{self.config.metrics_port}: {exc}"
            ) from exc

    def _on_message(self, worker: _Worker) -> None:
        try:
            kind, *args = worker.conn.recv()
        except (EOFError, OSError):  # it has exited (or is exiting): its sentinel tells how
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            return
        if kind == "bound":
            worker.bound = True
            if all(w.bound for w in self.workers) and len(self.workers) == self.count and not self._all_bound.done():
                self._all_bound.set_result(None)
        elif kind == "ready":
            worker.ready = bool(args[0])
            self._publish_readiness()
        elif kind == "model":
            worker.model = dict(args[0])

    def _publish_readiness(self) -> None:
        ready = self.stopping is None and len(self.workers) == self.count and all(w.ready for w in self.workers)
        if ready != self.peers_ready:
            self.peers_ready = ready
            log.info("every worker is ready: SERVING" if ready else "not every worker is ready: NOT_SERVING")
            for worker in self.workers:
                worker.send("peers", ready)

    def _on_exit(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        worker.process.join()
        worker.exited = True
        worker.ready = False
        code = worker.process.exitcode
        mark_process_dead(worker.process.pid, self.metrics_dir)  # its live gauges leave the sums
        if self.stopping is None:
            what = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"code {code}"
            log.error(
                "worker %d (pid %d) exited unexpectedly (%s): draining the others; the server exits %d so that it is restarted",
                worker.index, worker.process.pid, what, 2 if code == 2 else EXIT_WORKER_DIED,
            )
            self.exit_code = 2 if code == 2 else EXIT_WORKER_DIED
            self._stop(signal.SIGTERM)
        elif code != 0:
            log.error("worker %d (pid %d) ended its drain with code %s", worker.index, worker.process.pid, code)
            self.exit_code = self.exit_code or EXIT_WORKER_DIED
        if all(w.exited for w in self.workers) and not self._all_exited.done():
            self._all_exited.set_result(None)

    def _stop(self, signum: signal.Signals) -> None:
        if self.stopping is not None:
            return
        self.stopping = signum
        self._publish_readiness()
        log.info("%s: draining %d workers", signum.name, sum(not w.exited for w in self.workers))
        self._forward(signum)
        drain = 0.0 if signum == signal.SIGINT else self.config.drain_delay_s
        asyncio.get_running_loop().call_later(drain + self.config.grace_period_s + STOP_MARGIN_S, self._kill_stragglers)

    def _forward(self, signum: signal.Signals) -> None:
        for worker in self.workers:
            worker.signal(signum)

    def _kill_stragglers(self) -> None:
        for worker in self.workers:
            if not worker.exited:
                log.error("worker %d (pid %d) did not stop in time: killed", worker.index, worker.process.pid)
                self.exit_code = self.exit_code or EXIT_WORKER_DIED
                worker.process.kill()


def _worker_main(config: ServiceConfig, index: int, conn: Connection, engine_factory: EngineFactory) -> None:
    """A worker process: one server on the shared port, reporting to the supervisor."""
    configure_logging(config, f"worker {index}")
    # Until the server's own handlers are installed, a forwarded signal must neither kill
    # this worker (the default of SIGHUP and SIGTERM) nor raise in the middle of loading
    # (SIGINT): a stop is remembered and carried out once serving; a reload is moot (the
    # first load takes the newest version).
    early: list[signal.Signals] = []

    def remember(signum: int, frame: object) -> None:
        if signum != signal.SIGHUP:
            early.append(signal.Signals(signum))

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, remember)
    try:
        code = asyncio.run(_serve_worker(config, index, conn, engine_factory, early))
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        code = 2
    sys.exit(code)


async def _serve_worker(
    config: ServiceConfig, index: int, conn: Connection, engine_factory: EngineFactory, early: list[signal.Signals]
) -> int:
    loop = asyncio.get_running_loop()

    def send(*message: object) -> None:
        try:
            conn.send(message)
        except OSError:  # the supervisor is gone: the reader below stops this worker
            pass

    role = WorkerRole(index, on_ready_change=lambda ready: send("ready", ready), on_model=lambda model: send("model", model))
    server = await create_server(config, engine_factory, worker=role)
    stop: asyncio.Future[signal.Signals] = loop.create_future()
    updates: set[asyncio.Task] = set()

    def on_message() -> None:
        try:
            kind, *args = conn.recv()
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            if not stop.done():
                log.error("the supervisor is gone: draining")
                stop.set_result(signal.SIGTERM)
            return
        if kind == "peers":
            task = asyncio.ensure_future(server.set_peers_ready(bool(args[0])))
            updates.add(task)
            task.add_done_callback(updates.discard)

    def stop_if_asked_early() -> None:  # runs once run_until_signalled has its handlers
        if early and not stop.done():
            stop.set_result(early[0])

    loop.add_reader(conn.fileno(), on_message)
    send("bound", server.port)
    loop.call_soon(stop_if_asked_early)
    return await run_until_signalled(server, stop)
