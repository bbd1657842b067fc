"""Prometheus metrics of one server, in a registry of its own, served on their own port.

With several worker processes (`--workers`) every worker records into prometheus-client's
multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor before the worker
starts) and the supervisor serves one /metrics over all of them (`serve_metrics` with
`multiprocess_dir`): counters and histograms are summed over workers; each gauge says how
it combines (queue depth and capacity, GPU memory: summed over live workers; ready: the
minimum, so 1 only when every worker is ready). The model info is not a file value (a
version a worker no longer serves must vanish, which a file value cannot): workers report
what they serve to the supervisor, whose collector exposes it.

`METRIC_NAMES` is the list ops dashboards and alerts are checked against: every name
here is what /metrics exposes (counters with their `_total`). Labels never carry a user
or item id: only RPC names, status codes, reasons, outcomes and the model's name/version.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
QUEUE_WAIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ONBOARD_ITEMS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 250, 1000)
LOSS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

METRIC_NAMES = (
    "warmstart_requests_total",  # {rpc, code}
    "warmstart_request_duration_seconds",  # {rpc} histogram
    "warmstart_queue_depth",  # requests waiting for a batch
    "warmstart_queue_capacity",  # --queue-size: requests beyond it are refused at once
    "warmstart_queue_wait_seconds",  # histogram: enqueue -> taken into a batch
    "warmstart_batch_size",  # histogram: users per engine call
    "warmstart_engine_duration_seconds",  # histogram: padding + engine + split, per batch
    "warmstart_support_loss_before",  # histogram: a user's support loss at the initialisation
    "warmstart_support_loss_after",  # histogram: ... after the inner steps
    "warmstart_rejects_total",  # {reason}
    "warmstart_nonfinite_scores_total",  # scores the engine returned as NaN/inf, answered as the label floor
    "warmstart_model_info",  # {name, version, engine}: the model being served
    "warmstart_model_reloads_total",  # {outcome="success"|"failure"}
    "warmstart_model_load_failures_total",  # {reason}
    "warmstart_ready",  # 1 once a model is loaded and warmed up, 0 before and while shutting down
    "warmstart_gpu_memory_bytes",  # {kind="allocated"|"reserved"}, only on a GPU engine
    "warmstart_onboard_asks_total",  # {strategy}: Onboard calls answered
    "warmstart_onboard_items",  # histogram: items returned per Onboard call
)


MODEL_INFO_LABELS = ("name", "version", "engine")


class Metrics:
    """All of one server's metrics; methods are what the service code records.

    multiprocess: this is one of several workers (see the module docstring): GPU memory
    is then recorded by `refresh_gpu_memory` (a callback gauge is not a file value)."""

    def __init__(self, registry: CollectorRegistry | None = None, multiprocess: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess
        self._gpu_memory_source: Callable[[], dict[str, int]] | None = None
        r = self.registry
        self._requests = Counter("warmstart_requests_total", "RPCs by method and status code", ["rpc", "code"], registry=r)
        self._latency = Histogram(
            "warmstart_request_duration_seconds", "RPC latency in the server", ["rpc"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.queue_depth = Gauge("warmstart_queue_depth", "Requests waiting to be batched", registry=r, multiprocess_mode="livesum")
        self.queue_capacity = Gauge(
            "warmstart_queue_capacity", "Most requests that may wait (--queue-size, times the workers)", registry=r, multiprocess_mode="livesum"
        )
        self._queue_wait = Histogram(
            "warmstart_queue_wait_seconds", "Time from enqueue to batch", buckets=QUEUE_WAIT_BUCKETS_S, registry=r
        )
        self._batch_size = Histogram("warmstart_batch_size", "Users per engine call", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self._engine = Histogram(
            "warmstart_engine_duration_seconds", "Padding, engine run and split of one batch", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self._loss_before = Histogram(
            "warmstart_support_loss_before", "Support loss at the initialisation (users with interactions)", buckets=LOSS_BUCKETS, registry=r
        )
        self._loss_after = Histogram(
            "warmstart_support_loss_after", "Support loss after the inner steps (users with interactions)", buckets=LOSS_BUCKETS, registry=r
        )
        self._rejects = Counter("warmstart_rejects_total", "Requests refused, by reason", ["reason"], registry=r)
        self._nonfinite = Counter(
            "warmstart_nonfinite_scores_total", "Scores the engine returned as NaN or infinite (answered as the label floor)", registry=r
        )
        self._model = Info("warmstart_model", "The model being served", registry=r)
        self._reloads = Counter("warmstart_model_reloads_total", "Attempts to load a model version, by outcome", ["outcome"], registry=r)
        self._load_failures = Counter(
            "warmstart_model_load_failures_total", "Model versions refused, by reason", ["reason"], registry=r
        )
        self._ready = Gauge(
            "warmstart_ready", "1 when a model is loaded and warmed up (in every worker)", registry=r, multiprocess_mode="livemin"
        )
        self._gpu_memory = Gauge(
            "warmstart_gpu_memory_bytes", "GPU memory held by the engine (of every worker)", ["kind"], registry=r, multiprocess_mode="livesum"
        )
        self._onboard_asks = Counter("warmstart_onboard_asks_total", "Onboard calls answered, by strategy", ["strategy"], registry=r)
        self._onboard_items = Histogram(
            "warmstart_onboard_items", "Items returned per Onboard call", buckets=ONBOARD_ITEMS_BUCKETS, registry=r
        )
        self._request_children: dict[tuple[str, str], Callable[[], None]] = {}
        self._latency_children: dict[str, Histogram] = {}

    def request(self, rpc: str, code: str, seconds: float) -> None:
        counter = self._request_children.get((rpc, code))
        if counter is None:
            counter = self._request_children[(rpc, code)] = self._requests.labels(rpc=rpc, code=code).inc
        counter()
        histogram = self._latency_children.get(rpc)
        if histogram is None:
            histogram = self._latency_children[rpc] = self._latency.labels(rpc=rpc)
        histogram.observe(seconds)

    def reject(self, reason: str, count: int = 1) -> None:
        self._rejects.labels(reason=reason).inc(count)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def batch(self, size: int, engine_seconds: float) -> None:
        self._batch_size.observe(size)
        self._engine.observe(engine_seconds)

    def support_loss(self, before: float, after: float) -> None:
        if math.isfinite(before) and math.isfinite(after):  # a NaN would poison the histograms' sums
            self._loss_before.observe(before)
            self._loss_after.observe(after)

    def onboard(self, strategy: str, items: int) -> None:
        """One Onboard call answered with `items` items."""
        self._onboard_asks.labels(strategy=strategy).inc()
        self._onboard_items.observe(items)

    def nonfinite_scores(self, count: int) -> None:
        self._nonfinite.inc(count)

    def model_loaded(self, name: str, version: str, engine: str, gpu_memory: Callable[[], dict[str, int]]) -> None:
        self._model.info({"name": name, "version": version, "engine": engine})
        self._reloads.labels(outcome="success").inc()
        if not gpu_memory():
            return
        if self.multiprocess:
            self._gpu_memory_source = gpu_memory
            self.refresh_gpu_memory()
        else:
            for kind in ("allocated", "reserved"):
                self._gpu_memory.labels(kind=kind).set_function(lambda kind=kind: gpu_memory().get(kind, 0))

    def refresh_gpu_memory(self) -> bool:
        """Records the engine's GPU memory now (multiprocess workers, periodically);
        False when there is nothing to record (no model on a GPU)."""
        if self._gpu_memory_source is None:
            return False
        memory = self._gpu_memory_source()
        for kind in ("allocated", "reserved"):
            self._gpu_memory.labels(kind=kind).set(memory.get(kind, 0))
        return True

    def model_refused(self, reason: str) -> None:
        self._reloads.labels(outcome="failure").inc()
        self._load_failures.labels(reason=reason).inc()

    def ready(self, is_ready: bool) -> None:
        self._ready.set(1 if is_ready else 0)


@dataclass
class MetricsEndpoint:
    """The HTTP server exposing /metrics."""

    port: int
    _server: object
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5)


class ModelInfoCollector(Collector):
    """warmstart_model_info over workers: one series per (name, version, engine) that some
    worker serves now, from what the workers report (`served` maps a worker to its labels)."""

    def __init__(self, served: Callable[[], Iterable[Mapping[str, str]]]) -> None:
        self._served = served

    def collect(self):
        family = GaugeMetricFamily("warmstart_model_info", "The model being served", labels=MODEL_INFO_LABELS)
        for labels in sorted({tuple(labels[k] for k in MODEL_INFO_LABELS) for labels in self._served()}):
            family.add_metric(list(labels), 1.0)
        yield family


def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsEndpoint:
    """Starts the /metrics HTTP server of one process (port 0 = a free port; see .port)."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsEndpoint(server.server_port, server, thread)


def serve_multiprocess_metrics(
    multiprocess_dir: str, served_models: Callable[[], Iterable[Mapping[str, str]]], host: str, port: int
) -> MetricsEndpoint:
    """Starts the supervisor's /metrics: every worker's files in multiprocess_dir, summed
    or combined as each metric says, and the model info the workers report."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiprocess_dir)
    registry.register(ModelInfoCollector(served_models))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server.server_port, server, thread)
