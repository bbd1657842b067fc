"""gRPC load benchmark: Recommend against the same server's empty-RPC ceiling, by workers.

For each worker count W (--workers N: 1..N; default 1) starts `python -m service.server
--workers W` in a subprocess on free ports (and, with --baseline-tree, one more server from
another source tree, the baseline), all at once; then for each number of concurrent asyncio
clients C (default 1, 8, 32) drives, for T seconds each, in alternating one-second slices
over the servers and RPCs (so that every cell sees the same background load):

- the ceiling: grpc.health.v1 Check, an RPC that does no work;
- Recommend with 10 interactions and 100 candidates (top_k 10), random catalog items,
  sent as `candidate_ids` (or as Candidate messages with --candidate-messages).

and prints requests/s, p50/p95/p99 latency and the reject rate of each, the ratio
Recommend / ceiling, and each server's rates against the first one's (the baseline, else
one worker) measured in the same run. Every client has a channel (a TCP connection) of its own: the kernel spreads
connections, not calls, over the workers. The clients run in this process, so on a small
machine client and server share the cores, as they do in the numbers the goals were set on.

    python bench/load.py --artifact models/tiny/3 --duration-s 10
    python bench/load.py                       # builds the tiny test artifact first (~30 s)
    python bench/load.py --workers 2           # 1 and 2 workers, one table
    python bench/load.py --baseline-tree /tmp/before   # against an export of an earlier commit
    python bench/load.py --server-arg=--max-wait-s=0.002 --server-arg=--max-batch-size=64
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from warmstart.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pb_grpc  # noqa: E402

LISTENING = re.compile(r"listening on port (\d+) \(metrics on port (\d+)\)")
INTERACTIONS = 10
CANDIDATES = 100
DISTINCT_REQUESTS = 64


CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel


@dataclass
class Cell:
    rpc: str
    clients: int
    seconds: float
    latencies_s: list[float]
    rejected: int
    failed: int

    def add(self, other: "Cell") -> None:
        self.seconds += other.seconds
        self.latencies_s += other.latencies_s
        self.rejected += other.rejected
        self.failed += other.failed

    @property
    def total(self) -> int:
        return len(self.latencies_s) + self.rejected + self.failed

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")

    @property
    def reject_rate(self) -> float:
        return self.rejected / self.total if self.total else 0.0


def build_tiny_artifact(repository: Path) -> Path:
    """The test suite's tiny artifact (synthetic data, a few meta-steps)."""
    from training import model as M
    from training.pipeline import JobConfig, train_and_export
    from training.synthetic import generate_synthetic

    dataset = generate_synthetic(seed=3, n_users=240, n_items=150)
    config = JobConfig.default(meta_steps=30, eval_every=10, meta_batch_size=16)
    config.model = M.ModelConfig(kind="bias_factor", factors=8)
    return train_and_export(dataset, repository, "tiny", config, version="1").export.path


def make_requests(artifact: Path, rng: np.random.Generator, candidate_messages: bool = False) -> list[pb.RecommendRequest]:
    """Distinct Recommend requests over random catalog items; candidates as bare ids (the
    API's form for catalog items) unless candidate_messages."""
    item_ids = (artifact / "catalog_items.txt").read_text(encoding="utf-8").split("\n")[:-1]
    import json

    label = json.loads((artifact / "manifest.json").read_text())["label"]
    low, high = float(label.get("min_value", 0.0)), float(label.get("max_value", 1.0))
    click = label.get("kind") == "CLICK"
    requests = []
    for k in range(DISTINCT_REQUESTS):
        chosen = rng.choice(len(item_ids), size=min(len(item_ids), INTERACTIONS + CANDIDATES), replace=False)
        support, candidates = chosen[:INTERACTIONS], chosen[INTERACTIONS:]
        labels = rng.integers(0, 2, INTERACTIONS) if click else rng.integers(int(low), int(high) + 1, INTERACTIONS)
        request = pb.RecommendRequest(
            request_id=f"bench-{k}",
            interactions=[pb.Interaction(item_id=item_ids[i], label=float(y)) for i, y in zip(support, labels)],
            top_k=10,
        )
        if candidate_messages:
            request.candidates.extend(pb.Candidate(item_id=item_ids[i]) for i in candidates)
        else:
            request.candidate_ids.extend(item_ids[i] for i in candidates)
        requests.append(request)
    return requests


async def drive(call, make_request, clients: int, seconds: float, rpc: str) -> Cell:
    """`clients` closed-loop callers for `seconds`; call is one stub method, or a list of
    them (caller i uses call[i % len(call)])."""
    calls = call if isinstance(call, list) else [call]
    latencies: list[float] = []
    counts = {"rejected": 0, "failed": 0}
    stop_at = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        k = offset
        method = calls[offset % len(calls)]
        while time.perf_counter() < stop_at:
            request = make_request(k)
            k += 1
            started = time.perf_counter()
            try:
                await method(request, timeout=5.0)
            except grpc.aio.AioRpcError as error:
                counts["rejected" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"] += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return Cell(rpc, clients, time.perf_counter() - started, latencies, counts["rejected"], counts["failed"])


class Target:
    """One server under test: its label, port and a channel (connection) per client."""

    def __init__(self, label: str, port: int, clients: int) -> None:
        self.label = label
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) for _ in range(clients)]
        self.health = [health_pb2_grpc.HealthStub(c).Check for c in self.channels]
        self.recommend = [pb_grpc.RecommenderStub(c).Recommend for c in self.channels]

    async def wait_until_serving(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (await self.health[0](CHECK, wait_for_ready=True)).status != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label} did not become SERVING within {timeout_s} s")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


CHECK = health_pb2.HealthCheckRequest()


async def run_bench(
    servers: dict[str, int], requests: list[pb.RecommendRequest], client_counts: list[int], seconds: float, warmup_s: float, slice_s: float
) -> dict[str, list[Cell]]:
    """Every server (label -> port) at every client count, in alternating slices: each
    slice runs the ceiling then Recommend on one server, then the next server, so that all
    cells see the same background load (a shared machine's drifts a lot over a run)."""
    targets = [Target(label, port, max(client_counts)) for label, port in servers.items()]
    try:
        for target in targets:
            await target.wait_until_serving()
            await drive(target.health, lambda k: CHECK, len(target.channels), warmup_s, "warm-up")
            await drive(target.recommend, lambda k: requests[k % len(requests)], len(target.channels), warmup_s, "warm-up")
        cells: dict[str, list[Cell]] = {t.label: [] for t in targets}
        slices = max(1, math.ceil(seconds / slice_s))
        for n in client_counts:
            pairs = {t.label: (Cell("Check (ceiling)", n, 0.0, [], 0, 0), Cell("Recommend", n, 0.0, [], 0, 0)) for t in targets}
            for _ in range(slices):
                for target in targets:
                    ceiling, answered = pairs[target.label]
                    ceiling.add(await drive(target.health, lambda k: CHECK, n, seconds / slices, ceiling.rpc))
                    answered.add(await drive(target.recommend, lambda k: requests[k % len(requests)], n, seconds / slices, answered.rpc))
            for label, pair in pairs.items():
                cells[label] += list(pair)
        return cells
    finally:
        for target in targets:
            await target.close()


def print_table(results: dict[str, list[Cell]], baseline: str | None) -> None:
    """One row per (server, clients, rpc), then the ratios: Recommend / ceiling, each rate
    against one worker's ("1 worker"), Recommend against the baseline server's."""
    width = max(len(label) for label in results)
    header = (
        f"{'server':<{width}} {'clients':>7}  {'rpc':<16} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'reject %':>9} {'failed':>6}"
    )
    print(header)
    print("-" * len(header))
    rates: dict[tuple[str, int, str], float] = {}
    for label, cells in results.items():
        for c in cells:
            rates[(label, c.clients, c.rpc)] = c.rps
            print(
                f"{label:<{width}} {c.clients:>7}  {c.rpc:<16} {c.rps:>8.0f} {c.percentile_ms(50):>8.2f} {c.percentile_ms(95):>8.2f} "
                f"{c.percentile_ms(99):>8.2f} {100 * c.reject_rate:>9.2f} {c.failed:>6}"
            )
    print()
    one = "1 worker"

    def versus(label: str, reference: str | None, clients: int, rpc: str) -> str:
        base = rates.get((reference, clients, rpc)) if reference else None
        return "" if label in (reference, baseline) or not base else f"{rates[(label, clients, rpc)] / base:.2f}x"

    header = (
        f"{'server':<{width}} {'clients':>7}  {'Recommend / ceiling':>19} {'Recommend vs 1 worker':>22} "
        f"{'ceiling vs 1 worker':>20} {'Recommend vs baseline':>22}"
    )
    print(header)
    print("-" * len(header))
    for (label, clients, rpc), rate in rates.items():
        if rpc != "Recommend":
            continue
        ceiling = rates[(label, clients, "Check (ceiling)")]
        print(
            f"{label:<{width}} {clients:>7}  {100 * rate / ceiling:>18.0f}% {versus(label, one, clients, 'Recommend'):>22} "
            f"{versus(label, one, clients, 'Check (ceiling)'):>20} {versus(label, baseline, clients, 'Recommend'):>22}"
        )


def start_server(repository: Path, model_name: str, server_args: list[str], root: Path = ROOT) -> tuple[subprocess.Popen, int]:
    """`python -m service.server` of the source tree `root` on free ports; returns it and its port."""
    command = [
        sys.executable, "-m", "service.server",
        "--model-repository", str(repository), "--model-name", model_name,
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--poll-interval-s", "0", "--log-level", "WARNING",
        *server_args,
    ]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
    assert process.stdout is not None
    line = process.stdout.readline()
    match = LISTENING.search(line)
    if not match:
        process.kill()
        raise RuntimeError(f"the server did not start (first line: {line!r})")
    return process, int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="artifact directory <repo>/<name>/<version> (default: build the tiny one)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per cell (default 10)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="seconds of unmeasured load first (default 1)")
    parser.add_argument("--slice-s", type=float, default=1.0, help="ceiling and Recommend alternate in slices this long (default 1)")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeat), e.g. --server-arg=--max-wait-s=0.002")
    parser.add_argument("--candidate-messages", action="store_true", help="send candidates as Candidate messages, not candidate_ids")
    parser.add_argument(
        "--workers", default="1", help="N: server worker counts 1..N, one server each (or a comma-separated list); default 1"
    )
    parser.add_argument(
        "--baseline-tree", type=Path,
        help="another source tree of the service (e.g. an export of an earlier commit): one more server, one worker, from it",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",")] if "," in args.workers else list(range(1, int(args.workers) + 1))
    if not worker_counts or min(worker_counts) < 1:
        parser.error(f"--workers: need counts >= 1, got {args.workers!r}")
    with tempfile.TemporaryDirectory(prefix="warmstart-bench-") as tmp:
        if args.artifact is None:
            print("building the tiny artifact ...", file=sys.stderr)
            artifact = build_tiny_artifact(Path(tmp) / "built")
        else:
            artifact = args.artifact.resolve()
        # A repository holding exactly this version, whatever else sits beside it.
        repository = Path(tmp) / "repository"
        (repository / artifact.parent.name).mkdir(parents=True)
        (repository / artifact.parent.name / artifact.name).symlink_to(artifact, target_is_directory=True)
        requests = make_requests(artifact, np.random.default_rng(args.seed), args.candidate_messages)
        clients = [int(n) for n in args.clients.split(",")]
        # Every server runs from the start (an idle one costs next to nothing) and the
        # cells interleave across them.
        plan = [(f"{w} worker{'s' if w > 1 else ''}", ROOT, w) for w in worker_counts]
        if args.baseline_tree is not None:
            plan.insert(0, ("baseline, 1 worker", args.baseline_tree.resolve(), 1))
        processes = []
        try:
            servers = {}
            for label, root, workers in plan:
                process, port = start_server(repository, artifact.parent.name, [f"--workers={workers}", *args.server_arg], root)
                processes.append(process)
                servers[label] = port
            results = asyncio.run(run_bench(servers, requests, clients, args.duration_s, args.warmup_s, args.slice_s))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=60)
    form = "Candidate messages" if args.candidate_messages else "candidate_ids"
    print(
        f"artifact {artifact}; {args.duration_s:g} s per cell; candidates as {form}; {os.cpu_count()} cores; "
        f"server flags: {' '.join(args.server_arg) or '(defaults)'}"
    )
    if args.baseline_tree is not None:
        print(f"baseline: the server of {args.baseline_tree.resolve()}")
    print_table(results, plan[0][0] if args.baseline_tree is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
