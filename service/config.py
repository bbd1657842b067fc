"""The server's configuration: one dataclass, filled from flags and WARMSTART_* variables.

Every field is a flag (`--max-batch-size`) and an environment variable
(`WARMSTART_MAX_BATCH_SIZE`); a flag wins over the variable, the variable over the
default. The dataclass validates itself when built, and its errors name both spellings.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from service.engines import DEVICES, ENGINE_KINDS, PRECISIONS

ENV_PREFIX = "WARMSTART_"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting is invalid; the message names its flag and environment variable."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, 1/0, yes/no)")


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _option(default: Any, help: str, parse: Callable[[str], Any], metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `python -m service.server` can be told."""

    # Where to find the model.
    model_repository: Path | None = _option(
        None, "model repository: serves <repository>/<model-name>/<highest integer version>/", _optional_path, "DIR"
    )
    model_name: str = _option("", "model to serve (default: the only model in the repository)", str, "NAME")
    poll_interval_s: float = _option(30.0, "seconds between checks for a new version; 0 = only on SIGHUP", float, "S")
    trusted_keys: Path | None = _option(
        None,
        "PEM file of Ed25519 public keys: serve only versions whose manifest.sig one of them verifies (unsigned ones are refused)",
        _optional_path,
        "FILE",
    )
    # Network.
    host: str = _option("[::]", "gRPC listen address (IPv6 in brackets)", str, "HOST")
    port: int = _option(50051, "gRPC port; 0 = pick a free one (printed at start)", int, "PORT")
    metrics_host: str = _option("0.0.0.0", "Prometheus /metrics listen address", str, "HOST")
    metrics_port: int = _option(9464, "Prometheus /metrics port; 0 = pick a free one (printed at start)", int, "PORT")
    tls_cert: Path | None = _option(None, "PEM server certificate (with --tls-key: serve TLS)", _optional_path, "FILE")
    tls_key: Path | None = _option(None, "PEM private key of --tls-cert", _optional_path, "FILE")
    tls_client_ca: Path | None = _option(None, "PEM CA bundle: require client certificates signed by it (mTLS)", _optional_path, "FILE")
    drain_delay_s: float = _option(
        5.0,
        "on SIGTERM, seconds the server keeps serving after health turns NOT_SERVING, so that balancers stop routing to it",
        float,
        "S",
    )
    grace_period_s: float = _option(10.0, "after the drain delay, seconds in-flight requests get to finish", float, "S")
    # Processes.
    workers: int = _option(
        1,
        "server processes sharing the gRPC port (SO_REUSEPORT), each with its own batcher and engine; 0 = one per available core",
        int,
        "N",
    )
    # Engine.
    engine: str = _option("onnxruntime", f"engine: {' | '.join(ENGINE_KINDS)}", str, "KIND")
    device: str = _option("auto", f"device: {' | '.join(DEVICES)} (auto = a GPU when one is usable)", str, "DEVICE")
    ort_intra_op_threads: int = _option(1, "onnxruntime threads inside one operator; 0 = one per core", int, "N")
    ort_inter_op_threads: int = _option(1, "onnxruntime threads across operators", int, "N")
    torch_threads: int = _option(1, "torch CPU threads (torch engine); 0 = torch's default", int, "N")
    cuda_graphs: bool = _option(True, "torch engine on CUDA: replay one captured CUDA graph per shape bucket", _bool, "BOOL")
    precision: str = _option(
        "fp32",
        f"torch engine matmuls: {' | '.join(PRECISIONS)}; tf32/bf16 only if the scores stay within 1e-3 of fp32 (checked at load)",
        str,
        "P",
    )
    # Batching.
    max_batch_size: int = _option(32, "most users in one engine call", int, "N")
    max_wait_s: float = _option(
        0.002, "under load, longest a request waits for others to join its batch (idle: none)", float, "S"
    )
    queue_size: int = _option(256, "most requests waiting for a batch; beyond it requests get RESOURCE_EXHAUSTED", int, "N")
    max_in_flight: int = _option(
        64, "most Recommend/Score/Onboard calls in progress at once; beyond it calls get RESOURCE_EXHAUSTED at once", int, "N"
    )
    max_pending_rpcs: int = _option(
        128,
        "calls waiting inside gRPC for the server to take them up; beyond it gRPC refuses some at once (all at twice it): CANCELLED",
        int,
        "N",
    )
    batch_workers: int = _option(1, "engine calls in flight at once", int, "N")
    min_support_bucket: int = _option(1, "smallest padded support length (buckets double up to --max-interactions)", int, "N")
    min_query_bucket: int = _option(16, "smallest padded candidate count (buckets double up to the candidate limit)", int, "N")
    # Request limits and policy.
    max_interactions: int = _option(128, "most interactions per request (more: INVALID_ARGUMENT)", int, "N")
    max_candidates: int = _option(1024, "most candidates per request (more: INVALID_ARGUMENT)", int, "N")
    max_message_bytes: int = _option(4 << 20, "largest request accepted, in bytes (larger: INVALID_ARGUMENT)", int, "BYTES")
    allow_unknown_values: bool = _option(
        False, "encode attribute values outside the vocabulary as out-of-vocabulary instead of rejecting them", _bool, "BOOL"
    )
    log_level: str = _option("INFO", "DEBUG | INFO | WARNING | ERROR", str, "LEVEL")

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ConfigError(f"{_flag(name)} / {_env(name)}: {problem}")

        if self.model_repository is None:
            fail("model_repository", "required")
        elif not Path(self.model_repository).is_dir():
            fail("model_repository", f"{self.model_repository} is not a directory")
        if self.model_name and not _MODEL_NAME.match(self.model_name):
            fail("model_name", f"{self.model_name!r}: use letters, digits, '.', '_' or '-'")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                fail(name, f"must be in 0..65535, got {getattr(self, name)}")
        if self.port and self.port == self.metrics_port:
            fail("metrics_port", f"must differ from --port ({self.port})")
        for name in ("host", "metrics_host"):
            if not getattr(self, name):
                fail(name, "must not be empty")
        if self.engine not in ENGINE_KINDS:
            fail("engine", f"must be one of {', '.join(ENGINE_KINDS)}, got {self.engine!r}")
        if self.device not in DEVICES:
            fail("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            fail("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("ort_intra_op_threads", "ort_inter_op_threads", "torch_threads", "workers"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        for name in (
            "max_batch_size", "queue_size", "max_in_flight", "max_pending_rpcs", "batch_workers", "min_support_bucket", "min_query_bucket",
            "max_interactions", "max_candidates",
        ):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_message_bytes < 1024:
            fail("max_message_bytes", f"must be >= 1024, got {self.max_message_bytes}")
        for name in ("max_wait_s", "poll_interval_s", "grace_period_s", "drain_delay_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                fail(name, f"must be a finite number >= 0, got {value}")
        if self.max_wait_s > 1.0:
            fail("max_wait_s", f"{self.max_wait_s} s would hold every request that long; use <= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            fail("tls_cert" if self.tls_cert is None else "tls_key", "--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            fail("tls_client_ca", "mTLS needs the server's own --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "trusted_keys"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                fail(name, f"{path} is not a readable file")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            fail("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m service.server` (every flag also reads WARMSTART_<FLAG>)."""
    parser = argparse.ArgumentParser(
        prog="python -m service.server",
        description=(
            "warmstart gRPC server: adapts a meta-learned recommendation model to each user's few "
            "interactions and returns scores or a ranked list. It serves the highest integer version "
            "under <model-repository>/<model-name>/, picks up new versions (polling and SIGHUP), "
            "exposes grpc.health.v1, server reflection and Prometheus metrics, and drains on SIGTERM."
        ),
        epilog=(
            "Every flag can also be set by an environment variable: --max-batch-size is "
            "WARMSTART_MAX_BATCH_SIZE. Flags win over variables.\n"
            "Example: python -m service.server --model-repository models --port 50051"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    for f in fields(ServiceConfig):
        default = "required" if f.name == "model_repository" else "none" if f.default in (None, "") else f.default
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            metavar=f.metadata["metavar"],
            help=f"{f.metadata['help']} [env {_env(f.name)}; default {default}]",
        )
    return parser


def parse_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> ServiceConfig:
    """ServiceConfig from flags (winning) and WARMSTART_* variables; raises ConfigError."""
    given = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for f in fields(ServiceConfig):
        if f.name in given:
            text, source = given[f.name], _flag(f.name)
        elif _env(f.name) in environ:
            text, source = environ[_env(f.name)], _env(f.name)
        else:
            continue
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as exc:
            raise ConfigError(f"{source}: cannot read {text!r}: {exc}") from None
    return ServiceConfig(**values)


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """WARMSTART_* variables that name no setting (likely typos; the server warns)."""
    names = {f.name for f in fields(ServiceConfig)}
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() not in names)


def configure_logging(config: ServiceConfig, process: str = "") -> None:
    """Log lines to stderr; `process` (e.g. "worker 1") tags each line when several processes share it."""
    tag = f"[{process}] " if process else ""
    logging.basicConfig(level=config.log_level.upper(), format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")

