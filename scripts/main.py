"""The main job (`make run`): train a model if the repository has none, then serve it.

    python scripts/main.py                                    # synthetic data, models/, ports 50051 and 9464
    python scripts/main.py --dataset ml-100k --data-path ../shared/data/ml-100k
    python scripts/main.py --repository /srv/models -- --port 50052 --max-batch-size 64

1. If `<repository>/<model-name>/` holds no version with a manifest (or --retrain is
   given), it runs `python -m training.cli train` on the chosen dataset (the embedded
   synthetic one by default). An interrupted training resumes from its checkpoints in
   `<repository>/.work/<model-name>` on the next run.
2. It starts `python -m service.server` on the repository (flags after `--` go to the
   server; WARMSTART_* variables reach it too), waits until the gRPC health service
   says SERVING, and prints where gRPC and /metrics listen with ready-to-paste grpcurl
   and Python examples built from the served artifact's own item ids.
3. It stays in the foreground until the server exits: Ctrl-C or SIGTERM drains the
   server (in-flight requests finish), and the job exits with the server's exit code.

Training and serving run as child processes: this script imports neither training/
nor service/ (and neither of them imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
# The server prints this line once it listens (service/server.py `serve`).
LISTENING = re.compile(r"listening on port (?P<port>\d+) \(metrics on port (?P<metrics_port>\d+)\)")
DATASETS = ("synthetic", "ml-100k", "ml-1m", "ml-latest", "generic")
# The first run's training, sized to end in a few minutes on two CPU cores (the training
# CLI's own defaults are sized for a real dataset and run longer). TRAIN_ARGS come after
# these, so they win.
QUICK_TRAINING = ("--meta-steps", "300")


class JobError(Exception):
    """The job cannot go on; the message says why and what to do (exit code 1)."""


@dataclass(frozen=True)
class ArtifactSummary:
    """What the banner tells about the served version (read from the artifact's files)."""

    path: Path
    version: str
    dataset: str
    label_kind: str
    label_min: float
    label_max: float
    example_items: tuple[str, ...]


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="scripts/main.py",
        description="warmstart's main job: train on the embedded synthetic data (or a named dataset) "
        "unless the model repository already holds a version, then serve it in the foreground.",
        epilog="Arguments after `--` go to `python -m service.server` (see its --help); WARMSTART_* "
        "variables configure the server too.",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path(env.get("WARMSTART_MODEL_REPOSITORY") or "models"),
        help="model repository (default: $WARMSTART_MODEL_REPOSITORY or models)",
    )
    parser.add_argument(
        "--model-name",
        default=env.get("WARMSTART_MODEL_NAME") or "warmstart",
        help="model to train and serve (default: $WARMSTART_MODEL_NAME or warmstart)",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic", help="what to train on when there is no model yet")
    parser.add_argument("--data-path", type=Path, help="the dataset's directory or file (every dataset but synthetic)")
    parser.add_argument("--train-args", default="", help="more flags for `python -m training.cli train`, as one string")
    parser.add_argument("--retrain", action="store_true", help="train a new version even if one exists")
    parser.add_argument(
        "--ready-timeout-s", type=float, default=600.0, help="how long to wait for the server to become ready (default 600)"
    )
    return parser


def split_server_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(main job arguments, server arguments): the server's come after a `--`."""
    args = list(argv)
    if "--" in args:
        at = args.index("--")
        return args[:at], args[at + 1 :]
    return args, []


def served_version(model_dir: Path) -> Path | None:
    """The version the server will serve: the highest integer directory with a manifest."""
    if not model_dir.is_dir():
        return None
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / "manifest.json").is_file()]
    return max(versions, key=lambda p: int(p.name), default=None)


def train(args: argparse.Namespace) -> None:
    """Runs the training CLI; raises JobError if it fails."""
    command = [
        sys.executable, "-m", "training.cli", "train",
        "--dataset", args.dataset,
        *(["--path", str(args.data_path)] if args.data_path is not None else []),
        "--repository", str(args.repository),
        "--name", args.model_name,
        *QUICK_TRAINING,
        *shlex.split(args.train_args),
    ]
    say(f"no model in {_shown(args.repository / args.model_name)} yet: training one on {args.dataset} data")
    say("$ " + shlex.join(_relative(command)))
    started = time.perf_counter()
    training = subprocess.Popen(command, cwd=ROOT)
    forward_signals(training)
    code = training.wait()
    if code != 0:
        raise JobError(
            f"training failed (exit code {code}); fix the error above and run again "
            f"(training resumes from its checkpoints in {_shown(args.repository / '.work' / args.model_name)})"
        )
    say(f"trained and exported in {time.perf_counter() - started:.0f} s")


def describe(version_dir: Path) -> ArtifactSummary:
    """The banner's facts about an artifact, from manifest.json and catalog_items.txt."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    label = manifest.get("label", {})
    catalog = version_dir / "catalog_items.txt"
    items: list[str] = []
    if catalog.is_file():
        with catalog.open() as fh:
            for line in fh:
                if line.strip():
                    items.append(line.strip())
                if len(items) == 3:
                    break
    kind = str(label.get("kind", "RATING")).upper()
    return ArtifactSummary(
        path=version_dir,
        version=str(manifest.get("model_version", version_dir.name)),
        dataset=str(manifest.get("training", {}).get("dataset", "unknown data")),
        label_kind="click" if kind == "CLICK" else "rating",
        label_min=float(label.get("min_value", 0.0)),
        label_max=float(label.get("max_value", 1.0)),
        example_items=tuple(items),
    )


def _number(value: float) -> str:
    return f"{value:g}"


def banner(summary: ArtifactSummary, model_name: str, port: int, metrics_port: int, ready: bool, tls: bool) -> str:
    """What the job prints once the server listens: addresses and examples to paste."""
    target = f"localhost:{port}"
    grpcurl = _relative([str(Path(sys.executable).parent / "grpcurl")])[0]
    python = _relative([sys.executable])[0]
    first, second, third = (summary.example_items + ("ITEM",) * 3)[:3]
    high, low = _number(summary.label_max), _number(summary.label_min)
    request = json.dumps(
        {"interactions": [{"item_id": first, "label": float(high)}, {"item_id": second, "label": float(low)}], "top_k": 5}
    )
    plaintext = "" if tls else "-plaintext "
    state = "ready" if ready else "NOT ready yet (see the log above)"
    lines = [
        "",
        f"warmstart is {state}: model {model_name} version {summary.version} (trained on {summary.dataset}), from {_shown(summary.path)}",
        f"  gRPC     {target}   services warmstart.v1.Recommender, grpc.health.v1.Health, reflection"
        + ("   (TLS)" if tls else ""),
        f"  metrics  http://localhost:{metrics_port}/metrics",
        "",
        "Try it from another terminal:",
        f"  {grpcurl} {plaintext}{target} list",
        f"  {grpcurl} {plaintext}-d '{request}' {target} warmstart.v1.Recommender/Recommend",
        f"  {grpcurl} {plaintext}-d '{{\"items\": [{{\"item_id\": \"{third}\"}}]}}' {target} warmstart.v1.Recommender/Score",
        f"  {python} -m service.client recommend --target {target} --interaction {first}={high} --interaction {second}={low} --top-k 5",
        "",
        "From Python (service/client.py):",
        f"  {python} -c 'from service.client import RecommenderClient; "
        f"print(RecommenderClient(\"{target}\").recommend(interactions=[(\"{first}\", {high}), (\"{second}\", {low})], top_k=5))'",
        "",
        "Ctrl-C stops it (in-flight requests finish first). Run it again to reuse the model; "
        "--retrain (make run RETRAIN=1) trains a new version.",
        "",
    ]
    if tls:
        lines.insert(-2, "TLS is on: give grpcurl -cacert (and -cert/-key for mTLS) and the client TlsOptions.")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    return _relative([str(path)])[0]


def _relative(command: list[str]) -> list[str]:
    """Paths under the working directory shown relative to it (shorter to paste)."""
    cwd = Path.cwd()
    shown = []
    for part in command:
        path = Path(part)
        if path.is_absolute() and path.is_relative_to(cwd):
            shown.append(str(path.relative_to(cwd)))
        else:
            shown.append(part)
    return shown


def forward_signals(child: subprocess.Popen) -> None:
    """SIGINT, SIGTERM and SIGHUP go to the child, which decides what they mean (the server
    drains on SIGINT/SIGTERM and reloads on SIGHUP; training stops at SIGINT and resumes
    from its checkpoint next time). Ctrl-C in a terminal reaches the child directly too
    (same process group): this job then only waits for it to finish."""

    def forward(signum: int, _frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)


def wait_until_serving(port: int, server: subprocess.Popen, timeout_s: float) -> bool:
    """Watches grpc.health.v1 until SERVING; False on timeout or if the server exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while server.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=remaining):
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                    return False
                # UNAVAILABLE: the server is not accepting calls (yet, or any more). Watch
                # again shortly, unless it has exited in the meantime.
                try:
                    server.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
    return False


def serve(args: argparse.Namespace, server_args: list[str], summary: ArtifactSummary) -> int:
    """Runs the server in the foreground; returns its exit code."""
    command = [
        sys.executable, "-m", "service.server",
        "--model-repository", str(args.repository),
        "--model-name", args.model_name,
        *server_args,
    ]
    say("$ " + shlex.join(_relative(command)))
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    forward_signals(server)
    assert server.stdout is not None
    ports = None
    for line in server.stdout:
        print(line, end="", flush=True)
        match = LISTENING.search(line)
        if match:
            ports = int(match["port"]), int(match["metrics_port"])
            break
    if ports is None:
        return server.wait()
    relay = threading.Thread(target=_relay, args=(server.stdout,), daemon=True)
    relay.start()
    tls = any(a.startswith("--tls-cert") for a in server_args) or bool(os.environ.get("WARMSTART_TLS_CERT"))
    ready = False
    if not tls:
        ready = wait_until_serving(ports[0], server, args.ready_timeout_s)
    if server.poll() is None:
        print(banner(summary, args.model_name, ports[0], ports[1], ready or tls, tls), flush=True)
    code = server.wait()
    relay.join(timeout=5)
    return code


def _relay(stream) -> None:
    for line in stream:
        print(line, end="", flush=True)


def say(message: str) -> None:
    print(f"[main] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    job_argv, server_args = split_server_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(job_argv)
    # The children run in the project root: paths given relative to here must not move.
    args.repository = args.repository.resolve()
    if args.data_path is not None:
        args.data_path = args.data_path.resolve()
    try:
        if args.dataset != "synthetic" and args.data_path is None:
            raise JobError(f"--dataset {args.dataset} needs --data-path (make run DATASET={args.dataset} DATA_PATH=...)")
        if args.dataset == "synthetic" and args.data_path is not None:
            raise JobError("--data-path is not used with the synthetic dataset; name the dataset with --dataset")
        model_dir = args.repository / args.model_name
        existing = served_version(model_dir)
        if existing is None or args.retrain:
            train(args)
            existing = served_version(model_dir)
            if existing is None:
                raise JobError(f"training ended but {_shown(model_dir)} holds no version with a manifest.json")
        else:
            say(f"reusing {_shown(existing)} (delete it or pass --retrain to train again)")
        summary = describe(existing)
        if args.dataset != "synthetic" and not args.retrain and summary.dataset != args.dataset:
            say(f"note: {_shown(existing)} was trained on {summary.dataset}, not {args.dataset}; --retrain trains on {args.dataset}")
        return serve(args, server_args, summary)
    except JobError as error:
        print(f"main job: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
