"""The service's own CPU per Recommend, from request bytes to engine inputs and back.

Everything a worker's event loop and engine thread do for one request apart from gRPC's
transport and the engine's graph: parse the bytes, convert to domain objects, validate and
encode, batch (pad into engine inputs), split the outputs, rank, fill and serialize the
response. Runs those very functions (service/servicer.py, core.py, batcher.py,
padding.py) on a real artifact, requests as bench/load.py sends them (10 interactions,
100 candidate_ids, top_k 10), batches of --batch users, with a fixed engine output in
place of the graph. Prints microseconds per request for each stage and in total, beside
one engine call per request's share of a batch (the same artifact, onnxruntime) measured
in the same run, so that the service's share is visible. Times are this thread's CPU time
(time.thread_time), not wall time: on a shared machine other processes' load does not
count (the engine runs on the calling thread, one onnxruntime thread).

    python bench/hot_path.py --artifact models/tiny/3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import build_tiny_artifact, make_requests  # noqa: E402
from service import servicer as S  # noqa: E402
from service.batcher import _execute  # noqa: E402
from service.core import RecommenderCore, RequestLimits  # noqa: E402
from service.engines import EngineConfig  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.padding import EngineOutputs  # noqa: E402
from service.repository import ModelSettings, load_model  # noqa: E402
from warmstart.v1 import recommender_pb2 as pb  # noqa: E402


class _Context:
    """What the servicer reads from a gRPC context."""

    def time_remaining(self) -> float:
        return 5.0


class _FixedOutputs:
    """The model with its engine replaced by fixed outputs of the right shape: the graph's
    time is measured apart."""

    def __init__(self, model) -> None:
        self._model = model
        self.buckets = model.buckets
        self.artifact = model.artifact
        self.name, self.version, self.engine = model.name, model.version, model.engine
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def run(self, inputs):
        self.calls += 1
        b, q = inputs.query_items.shape[:2]
        rng = np.random.default_rng(self.calls)
        engagement = rng.standard_normal((b, q)).astype(np.float32) if self.artifact.has_engagement else None
        return EngineOutputs(rng.uniform(1, 5, (b, q)).astype(np.float32), np.ones(b, np.float32), np.ones(b, np.float32), engagement)


class _Collecting:
    """A batcher that holds submitted users until `flush` runs them as one batch."""

    def __init__(self) -> None:
        self.waiting: list = []

    async def submit(self, model, user, deadline_s=None):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((model, user, future))
        return await future


def measure(artifact_dir: Path, batch: int, rounds: int):
    """Median microseconds per request of each stage, and the loaded model."""
    settings = ModelSettings(EngineConfig(), max_interactions=128, max_candidates=1024, warmup_batch_size=batch)
    model = load_model(artifact_dir, settings)
    fixed = _FixedOutputs(model)
    requests = [r.SerializeToString() for r in make_requests(artifact_dir, np.random.default_rng(0))]
    metrics = Metrics()
    collecting = _Collecting()
    core = RecommenderCore(lambda: fixed, collecting, RequestLimits(), metrics)  # type: ignore[arg-type]
    servicer = S.RecommenderServicer(core)
    context = _Context()
    totals: dict[str, list[float]] = {"request in (parse, domain, encode)": [], "batch (pad, split)": [], "request out (rank, fill, serialize)": []}

    async def one_round() -> None:
        loop = asyncio.get_running_loop()
        tasks = []
        started = time.thread_time()
        for k in range(batch):
            raw = requests[k % len(requests)]

            async def call(raw=raw):
                request = pb.RecommendRequest.FromString(raw)
                response = await servicer.Recommend(request, context)
                return response.SerializeToString()

            tasks.append(loop.create_task(call()))
        while len(collecting.waiting) < batch:  # every task has parsed, encoded and submitted
            await asyncio.sleep(0)
        inbound = time.thread_time()
        waiting, collecting.waiting = collecting.waiting, []
        users = [user for _, user, _ in waiting]
        query_length = fixed.buckets.query_length(max(u.query_size for u in users))
        support_length = fixed.buckets.support_length(max(u.support_size for u in users))
        padded = time.thread_time()
        outputs, _ = _execute(fixed, users, support_length, query_length, metrics)
        batched = time.thread_time()
        for (_, _, future), output in zip(waiting, outputs):
            future.set_result(output)
        await asyncio.gather(*tasks)
        done = time.thread_time()
        totals["request in (parse, domain, encode)"].append((inbound - started) / batch)
        totals["batch (pad, split)"].append((batched - padded) / batch)
        totals["request out (rank, fill, serialize)"].append((done - batched) / batch)

    async def run_all() -> None:
        for _ in range(rounds):
            await one_round()

    asyncio.run(run_all())
    result = {stage: statistics.median(values) * 1e6 for stage, values in totals.items()}
    result["service total"] = sum(result.values())
    return result, model


def engine_share(model, batch: int, rounds: int) -> float:
    """Microseconds of the real engine per user of a batch shaped like the requests'."""
    from service.padding import zero_batch

    encoder = model.artifact.encoder
    inputs = zero_batch(batch, model.buckets.support_length(10), model.buckets.query_length(100), encoder.user_width, encoder.item_width)
    inputs.support_mask[:, :10] = 1.0
    model.run(inputs)
    times = []
    for _ in range(rounds):
        started = time.thread_time()
        model.run(inputs)
        times.append(time.thread_time() - started)
    return statistics.median(times) / batch * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="artifact directory (default: build the tiny one)")
    parser.add_argument("--batch", type=int, default=32, help="users per batch (default 32)")
    parser.add_argument("--rounds", type=int, default=300, help="batches measured (default 300)")
    args = parser.parse_args(argv)
    if args.artifact is None:
        import tempfile

        artifact = build_tiny_artifact(Path(tempfile.mkdtemp(prefix="warmstart-hot-path-")))
    else:
        artifact = args.artifact.resolve()
    stages, model = measure(artifact, args.batch, args.rounds)
    engine_us = engine_share(model, args.batch, args.rounds)
    print(f"artifact {artifact}; batches of {args.batch}; median of {args.rounds} batches; CPU microseconds per request")
    for stage, us in stages.items():
        print(f"{stage:<40} {us:>8.1f}")
    print(f"{'engine (onnxruntime, share of a batch)':<40} {engine_us:>8.1f}")
    print(f"{'service / engine':<40} {stages['service total'] / engine_us:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
