"""Overload and drain benchmark: goodput beyond capacity, and calls lost at SIGTERM.

Starts `python -m service.server` in a subprocess on free ports (the clients run in this
process: on a small machine both share the cores) and measures, with Recommend requests
of 10 interactions and 100 candidates:

1. capacity: closed-loop clients (--clients, as many as the server admits) for
   --duration-s; capacity = OK calls/s, measured again after each overload part;
2. unloaded latency: open-loop arrivals at --unloaded-fraction of capacity;
3. overload: open-loop arrivals at each --factors multiple of capacity for --duration-s,
   every call with a --deadline-s deadline: goodput (OK/s) as a share of capacity, the
   status codes of the rest, how fast RESOURCE_EXHAUSTED answers come, and the p99 of
   the accepted calls against the unloaded p99;
4. drain (--drain-rounds): a fresh server with --drain-delay-s, --drain-clients
   closed-loop clients and one health Watch; SIGTERM with calls in flight; counts the
   calls in flight at SIGTERM that did not end OK, and the lead of NOT_SERVING (seen on
   the Watch) over the first refused call.

Lines the server logs at ERROR (and tracebacks) are counted for each part.

    python bench/overload.py                              # builds the tiny test artifact first (~30 s)
    python bench/overload.py --artifact models/warmstart/1 --duration-s 20
    python bench/overload.py --server-arg=--max-in-flight=64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench.load import LISTENING, build_tiny_artifact, make_requests  # noqa: E402
from warmstart.v1 import recommender_pb2 as pb  # noqa: E402

CLOSED_LOOP_TIMEOUT_S = 10.0
RECOMMEND = f"/{pb.DESCRIPTOR.services_by_name['Recommender'].full_name}/Recommend"


class RawStub:
    """Recommend with pre-serialized requests and unparsed responses: the client's own
    cost per call stays small, so that more of the shared machine is left to the server."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Recommend = channel.unary_unary(RECOMMEND, request_serializer=None, response_deserializer=None)


@dataclass
class Outcomes:
    """Every call of one part: its status code and latency."""

    seconds: float = 0.0
    offered: int = 0
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    server: Counter = field(default_factory=Counter)  # the server's count of the same calls by code
    details: Counter = field(default_factory=Counter)  # (code, details) of the calls that failed

    def add(self, code: str, latency_s: float) -> None:
        self.latencies_s.setdefault(code, []).append(latency_s)

    def count(self, code: str) -> int:
        return len(self.latencies_s.get(code, []))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.latencies_s.values())

    def rate(self, code: str = "OK") -> float:
        return self.count(code) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, code: str, q: float) -> float:
        values = self.latencies_s.get(code)
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    def codes(self) -> str:
        """Each status code with its count and its median latency."""
        counts = Counter({c: len(v) for c, v in self.latencies_s.items()})
        return ", ".join(f"{code} {n} ({self.percentile_ms(code, 50):.0f} ms)" for code, n in counts.most_common())


async def _one(call, request, timeout_s: float, outcomes: Outcomes) -> None:
    started = time.perf_counter()
    try:
        await call(request, timeout=timeout_s)
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
        outcomes.details[(code, (error.details() or "")[:60])] += 1
    outcomes.add(code, time.perf_counter() - started)


async def closed_loop(stub, requests, clients: int, seconds: float) -> Outcomes:
    outcomes = Outcomes()
    stop_at = time.perf_counter() + seconds

    async def client(k: int) -> None:
        while time.perf_counter() < stop_at:
            await _one(stub.Recommend, requests[k % len(requests)], CLOSED_LOOP_TIMEOUT_S, outcomes)
            k += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    outcomes.seconds = time.perf_counter() - started
    outcomes.offered = outcomes.total
    return outcomes


async def open_loop(stub, requests, rate_per_s: float, seconds: float, deadline_s: float) -> Outcomes:
    """Arrivals at a fixed rate whatever the answers (a Poisson process, seeded), each call
    its own task; the part ends when the last call has ended."""
    outcomes = Outcomes()
    rng = np.random.default_rng(1)
    loop = asyncio.get_running_loop()
    tasks = []
    started = loop.time()
    next_at = started
    k = 0
    while next_at < started + seconds:
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(stub.Recommend, requests[k % len(requests)], deadline_s, outcomes)))
        k += 1
        next_at += rng.exponential(1.0 / rate_per_s)
    outcomes.seconds = loop.time() - started
    outcomes.offered = len(tasks)
    await asyncio.gather(*tasks)
    return outcomes


def start_server(repository: Path, model_name: str, server_args: list[str], log_path: Path) -> tuple[subprocess.Popen, int, int]:
    command = [
        sys.executable, "-m", "service.server",
        "--model-repository", str(repository), "--model-name", model_name,
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--poll-interval-s", "0",
        *server_args,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = log_path.open("w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = LISTENING.search(line)
    if not match:
        process.kill()
        raise RuntimeError(f"the server did not start (first line: {line!r}; log {log_path})")
    return process, int(match.group(1)), int(match.group(2))


def server_counts(metrics_port: int) -> Counter:
    """The server's own count of Recommend calls by status code (warmstart_requests_total)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "warmstart_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("rpc") == "Recommend":
                    counts[sample.labels["code"]] += int(sample.value)
    return counts


def error_lines(log_path: Path, start: int = 0) -> tuple[int, int, list[str]]:
    """(ERROR lines, tracebacks, the first few ERROR lines and exception lines) in the
    server's log from byte `start`."""
    with log_path.open("rb") as fh:
        fh.seek(start)
        text = fh.read().decode("utf-8", "replace")
    lines = text.splitlines()
    errors = [line for line in lines if " ERROR " in line]
    shown = [line[:200] for line in lines if " ERROR " in line or (line and not line[0].isspace() and "Error" in line.split(":")[0])]
    return len(errors), text.count("Traceback"), shown[:6]


async def wait_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 120
    while (await health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True)).status != health_pb2.HealthCheckResponse.SERVING:
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not become SERVING within 120 s")
        await asyncio.sleep(0.1)


async def measure_overload(port: int, metrics_port: int, requests, args, log_path: Path) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel)
        stub = RawStub(channel)
        requests = [r.SerializeToString() for r in requests]
        await closed_loop(stub, requests, args.clients, args.warmup_s)
        mark = log_path.stat().st_size
        capacity = await closed_loop(stub, requests, args.clients, args.duration_s)
        one_client = await closed_loop(stub, requests, 1, min(5.0, args.duration_s))
        rate = capacity.rate()
        unloaded = await open_loop(stub, requests, args.unloaded_fraction * rate, min(10.0, args.duration_s), args.deadline_s)
        overloads: dict[float, Outcomes] = {}
        after: dict[float, float] = {}
        for factor in args.factors:
            before = await asyncio.to_thread(server_counts, metrics_port)
            overloads[factor] = await open_loop(stub, requests, factor * rate, args.duration_s, args.deadline_s)
            await asyncio.sleep(args.deadline_s)  # let the backlog of one part clear before the next
            overloads[factor].server = await asyncio.to_thread(server_counts, metrics_port) - before
            # Capacity again right after: on a shared machine the background load drifts,
            # and a part is best compared with the capacity measured next to it.
            after[factor] = (await closed_loop(stub, requests, args.clients, max(3.0, args.duration_s / 3))).rate()
        errors = error_lines(log_path, mark)
    return {"capacity": capacity, "one_client": one_client, "unloaded": unloaded, "overloads": overloads, "after": after,
            "errors": errors}


@dataclass
class DrainRound:
    in_flight: int  # calls started and not ended when SIGTERM was sent
    lost: int  # of those, the ones that did not end OK
    lost_codes: str
    lead_s: float | None  # first refused call minus NOT_SERVING on the Watch (None: no call refused)
    not_serving_after_s: float | None  # NOT_SERVING seen this long after SIGTERM
    exit_after_s: float


async def drain_round(repository: Path, model_name: str, server_args: list[str], requests, clients: int, log_path: Path) -> DrainRound:
    process, port, _ = start_server(repository, model_name, server_args, log_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel)
            stub = RawStub(channel)
            requests = [r.SerializeToString() for r in requests]
            health = health_pb2_grpc.HealthStub(channel)
            await closed_loop(stub, requests, 8, 1.0)
            not_serving_at: list[float] = []

            async def watch() -> None:
                try:
                    async for reply in health.Watch(health_pb2.HealthCheckRequest()):
                        if reply.status != health_pb2.HealthCheckResponse.SERVING and not not_serving_at:
                            not_serving_at.append(time.perf_counter())
                except grpc.aio.AioRpcError:
                    pass

            watcher = asyncio.create_task(watch())
            in_flight: dict[int, float] = {}
            results: dict[int, str] = {}
            refused_at: list[float] = []
            stop = asyncio.Event()
            counter = iter(range(1 << 30))

            async def client(k: int) -> None:
                while not stop.is_set():
                    key = next(counter)
                    in_flight[key] = time.perf_counter()
                    try:
                        await stub.Recommend(requests[key % len(requests)], timeout=CLOSED_LOOP_TIMEOUT_S)
                        results[key] = "OK"
                    except grpc.aio.AioRpcError as error:
                        results[key] = error.code().name
                        if not refused_at:
                            refused_at.append(time.perf_counter())
                    finally:
                        in_flight.pop(key, None)
                    if results[key] != "OK":
                        break  # a client that is refused goes elsewhere

            tasks = [asyncio.create_task(client(i)) for i in range(clients)]
            await asyncio.sleep(1.0)
            sigterm_at = time.perf_counter()
            at_sigterm = set(in_flight)
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 60)
            exit_after = time.perf_counter() - sigterm_at
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        lost = Counter(results.get(k, "UNFINISHED") for k in at_sigterm if results.get(k) != "OK")
        lead = refused_at[0] - not_serving_at[0] if refused_at and not_serving_at else None
        return DrainRound(
            len(at_sigterm), sum(lost.values()), ", ".join(f"{c} {n}" for c, n in lost.items()) or "-",
            lead, not_serving_at[0] - sigterm_at if not_serving_at else None, exit_after,
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def report(result: dict, drains: list[DrainRound], args) -> None:
    capacity, one, unloaded = result["capacity"], result["one_client"], result["unloaded"]
    cap = capacity.rate()
    unloaded_p99 = unloaded.percentile_ms("OK", 99)
    print(f"capacity ({args.clients} closed-loop clients, {capacity.seconds:.1f} s): {cap:.0f} OK/s, "
          f"p50 {capacity.percentile_ms('OK', 50):.1f} ms, p99 {capacity.percentile_ms('OK', 99):.1f} ms; codes: {capacity.codes()}")
    print(f"one client: p50 {one.percentile_ms('OK', 50):.2f} ms, p99 {one.percentile_ms('OK', 99):.2f} ms")
    print(f"unloaded (open loop at {args.unloaded_fraction:.0%} of capacity): p50 {unloaded.percentile_ms('OK', 50):.2f} ms, "
          f"p99 {unloaded_p99:.2f} ms; codes: {unloaded.codes()}")
    print()
    print("goodput = OK/s over the capacity measured first; 'after' = over the capacity measured again right after the part;")
    print("RE share = RESOURCE_EXHAUSTED among the calls that did not end OK; fast = share of those answered within 100 ms")
    header = (f"{'load':>5} {'offered/s':>9} {'OK/s':>7} {'goodput':>8} {'after':>7} {'RE share':>8} {'fast':>6} {'RE p50 ms':>9} "
              f"{'RE p99 ms':>9} {'OK p50 ms':>9} {'OK p99 ms':>9} {'p99/unl.':>8}  codes")
    print(header)
    print("-" * len(header))
    for factor, o in result["overloads"].items():
        excess = o.total - o.count("OK")
        share = o.count("RESOURCE_EXHAUSTED") / excess if excess else float("nan")
        failed = [t for code, times in o.latencies_s.items() if code != "OK" for t in times]
        fast = sum(t < 0.1 for t in failed) / len(failed) if failed else float("nan")
        print(f"{factor:>4.1f}x {o.offered / o.seconds:>9.0f} {o.rate():>7.0f} {o.rate() / cap:>8.1%} "
              f"{o.rate() / result['after'][factor]:>7.1%} {share:>8.1%} {fast:>6.1%} "
              f"{o.percentile_ms('RESOURCE_EXHAUSTED', 50):>9.2f} {o.percentile_ms('RESOURCE_EXHAUSTED', 99):>9.2f} "
              f"{o.percentile_ms('OK', 50):>9.1f} {o.percentile_ms('OK', 99):>9.1f} {o.percentile_ms('OK', 99) / unloaded_p99:>7.1f}x  {o.codes()}")
    for factor, o in result["overloads"].items():
        print(f"{factor:>4.1f}x as the server counted them (calls that reached the handler): "
              + (", ".join(f"{c} {n}" for c, n in o.server.most_common()) or "none"))
        print("      failures as the client saw them: "
              + "; ".join(f"{c} {d!r} {n}" for (c, d), n in o.details.most_common(5)))
    errors, tracebacks, shown = result["errors"]
    print(f"server log during the measured parts: {errors} ERROR lines, {tracebacks} tracebacks")
    for line in shown:
        print(f"  {line}")
    print("goals: goodput >= 90 % of capacity at 2x and 3x; accepted p99 <= 3x the unloaded p99")
    if drains:
        print()
        print(f"drain: {args.drain_clients} closed-loop clients, SIGTERM with calls in flight, server flags "
              f"{' '.join(args.drain_server_args) or '(defaults)'}")
        print(f"{'round':>5} {'in flight':>9} {'lost':>5} {'NOT_SERVING after':>17} {'lead before 1st refusal':>23} {'exit after':>10}  lost codes")
        for i, d in enumerate(drains, 1):
            ns = f"{d.not_serving_after_s * 1e3:.1f} ms" if d.not_serving_after_s is not None else "never"
            lead = f"{d.lead_s * 1e3:.0f} ms" if d.lead_s is not None else "no refusal"
            print(f"{i:>5} {d.in_flight:>9} {d.lost:>5} {ns:>17} {lead:>23} {d.exit_after_s:>9.2f}s  {d.lost_codes}")
        print(f"total: {sum(d.lost for d in drains)} of {sum(d.in_flight for d in drains)} in-flight calls lost (goal 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="artifact directory <repo>/<name>/<version> (default: build the tiny one)")
    parser.add_argument("--duration-s", type=float, default=15.0, help="seconds of each measured part (default 15)")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=64,
                        help="closed-loop clients measuring capacity (default 64: as many as the server admits at once by default)")
    parser.add_argument("--factors", type=lambda s: [float(x) for x in s.split(",")], default=[2.0, 3.0],
                        help="offered load as multiples of capacity (default 2,3)")
    parser.add_argument("--unloaded-fraction", type=float, default=0.25, help="open-loop rate of the unloaded part (default 0.25)")
    parser.add_argument("--deadline-s", type=float, default=2.0, help="deadline of each open-loop call (default 2)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeat)")
    parser.add_argument("--drain-rounds", type=int, default=3)
    parser.add_argument("--drain-clients", type=int, default=50)
    parser.add_argument("--drain-server-arg", dest="drain_server_args", action="append", default=None,
                        help="server flags of the drain rounds (default: --grace-period-s=10 --drain-delay-s=1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.drain_server_args is None:
        args.drain_server_args = ["--grace-period-s=10", "--drain-delay-s=1"]
    with tempfile.TemporaryDirectory(prefix="warmstart-overload-") as tmp:
        if args.artifact is None:
            print("building the tiny artifact ...", file=sys.stderr)
            artifact = build_tiny_artifact(Path(tmp) / "built")
        else:
            artifact = args.artifact.resolve()
        repository = Path(tmp) / "repository"
        (repository / artifact.parent.name).mkdir(parents=True)
        (repository / artifact.parent.name / artifact.name).symlink_to(artifact, target_is_directory=True)
        requests = make_requests(artifact, np.random.default_rng(args.seed))
        log_path = Path(tmp) / "server.log"
        process, port, metrics_port = start_server(repository, artifact.parent.name, ["--log-level", "INFO", *args.server_arg], log_path)
        try:
            result = asyncio.run(measure_overload(port, metrics_port, requests, args, log_path))
        finally:
            process.terminate()
            process.wait(timeout=60)
        drains = [
            asyncio.run(drain_round(repository, artifact.parent.name, args.drain_server_args + args.server_arg, requests,
                                    args.drain_clients, Path(tmp) / f"drain-{i}.log"))
            for i in range(args.drain_rounds)
        ]
    print(f"artifact {artifact}; {args.duration_s:g} s per part, {args.deadline_s:g} s deadlines; "
          f"server flags: {' '.join(args.server_arg) or '(defaults)'}")
    report(result, drains, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
