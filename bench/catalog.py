"""Catalog-scale benchmark: whole-catalog Recommend against the memory-bandwidth floor.

Two steps, so that only the measuring holds the benchmark lock:

    python bench/catalog.py prepare --out /tmp/catalogs            # trains the served structure
    python bench/catalog.py prepare --out /tmp/catalogs --artifact models/warmstart/1
    flock /work/notes/bench.lock python bench/catalog.py run --catalogs /tmp/catalogs

`prepare` makes catalogs of every size (default 10^3, 10^4, 10^5, 2*10^5, 10^6) from one
trained artifact with the catalog refresh itself (training.refresh: synthetic items with
random attribute values, encoded by the trained item side), one version per size.

`run`, per catalog size, interleaving what it compares round by round:

- end to end: a real server (`python -m service.server`, default flags), one client,
  sequential Recommend calls with 10 interactions: the whole catalog (top_k 10) and 100
  catalog candidates; p50 / p99;
- engine only, in this process: the loaded model's adapt + score + top-k for one
  whole-catalog user (what the engine thread runs), the score step alone, and beside them
  the floor: a numpy matrix-vector product over the same table (the engagement head's
  [bias | factors] rows) and an argpartition for the top 10.

Then onnxruntime users/s at B=64, S=10, Q=1000 (each user 1000 catalog candidates, both
heads' scores for all): the adapt graph + the score step against the fused graph, and the
wall time of a refresh adding 10,000 items to the 2*10^5 version. The last lines check the
issue's targets. One thread everywhere (OMP/OpenBLAS set before numpy loads).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one CPU thread: before numpy and torch load

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import start_server  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from warmstart.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pb_grpc  # noqa: E402

SIZES = (1_000, 10_000, 100_000, 200_000, 1_000_000)
MODEL = "catalog"
INTERACTIONS = 10
CANDIDATES = 100
TOP_K = 10


# -- prepare ---------------------------------------------------------------------------------------


def build_served_artifact(repository: Path) -> Path:
    """The served model structure (rating and engagement heads, served sizes) trained briefly
    on the synthetic data set."""
    from training import model as M
    from training.pipeline import JobConfig, train_and_export
    from training.synthetic import generate_synthetic

    dataset = generate_synthetic(seed=3, n_users=400, n_items=300)
    config = JobConfig.default(meta_steps=40, eval_every=20, meta_batch_size=16)
    config.model = M.served_config()
    return train_and_export(dataset, repository, MODEL, config, version="1").export.path


def synthetic_items(artifact: Path, n: int, seed: int, prefix: str) -> dict[str, dict[str, str]]:
    """n new items with random values of every attribute field (ids outside the vocabulary)."""
    from service.artifact import load_artifact

    encoder = load_artifact(artifact).encoder
    fields = [f for f in encoder.item_fields if f.name != encoder.item_id_field]
    rng = np.random.default_rng(seed)
    choices = {f.name: rng.integers(0, len(f.vocabulary), size=(n, min(2, f.width))) for f in fields}
    items = {}
    for k in range(n):
        attributes = {}
        for f in fields:
            picked = choices[f.name][k] if f.multi_valued else choices[f.name][k][:1]
            attributes[f.name] = encoder.separator.join(f.vocabulary[int(i)] for i in picked)
        items[f"{prefix}{k}"] = attributes
    return items


def prepare(out: Path, artifact: Path | None, sizes: list[int]) -> None:
    from training.refresh import refresh_catalog

    model_dir = out / MODEL
    if model_dir.exists():
        raise SystemExit(f"{model_dir} exists: prepare into a new directory")
    if artifact is None:
        print("training the served structure on synthetic data ...", file=sys.stderr)
        artifact = build_served_artifact(out / ".source")
    model_dir.mkdir(parents=True)
    base = model_dir / "1"
    shutil.copytree(artifact, base)
    base_size = len((base / "catalog_items.txt").read_text(encoding="utf-8").split("\n")) - 1
    for version, size in enumerate(sizes, start=2):
        if size <= base_size:
            raise SystemExit(f"catalog size {size} is not above the trained catalog's {base_size}")
        started = time.perf_counter()
        result = refresh_catalog(base, synthetic_items(base, size - base_size, version, f"syn{version}-"), version=str(version))
        print(f"version {version}: {size} items ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
        (out / f"size-{size}").write_text(str(result.path) + "\n")


# -- run -----------------------------------------------------------------------------------------


@dataclass
class Timings:
    values_s: list[float]

    def ms(self, q: float) -> float:
        return float(np.percentile(self.values_s, q) * 1e3)


def requests_for(model, rng: np.random.Generator, n: int) -> tuple[list[pb.RecommendRequest], list[pb.RecommendRequest]]:
    """n whole-catalog and n 100-candidate Recommend requests with 10 interactions each."""
    ids = model.artifact.catalog.item_ids
    whole, candidates = [], []
    for k in range(n):
        chosen = rng.choice(len(ids), size=INTERACTIONS + CANDIDATES, replace=False)
        interactions = [pb.Interaction(item_id=ids[i], label=float(rng.integers(1, 6))) for i in chosen[:INTERACTIONS]]
        whole.append(pb.RecommendRequest(request_id=f"w{k}", interactions=interactions, top_k=TOP_K))
        candidates.append(
            pb.RecommendRequest(
                request_id=f"c{k}", interactions=interactions, top_k=TOP_K, candidate_ids=[ids[i] for i in chosen[INTERACTIONS:]]
            )
        )
    return whole, candidates


def user_inputs(model, request: pb.RecommendRequest):
    from service.padding import Ranking, UserInputs

    catalog = model.artifact.catalog
    rows = np.array([catalog.row_of[i.item_id] for i in request.interactions])
    labels = np.array([i.label for i in request.interactions], dtype=np.float32)
    user = UserInputs(
        np.zeros(model.artifact.encoder.user_width, dtype=np.int64),
        catalog.codes[rows],
        labels,
        ranking=Ranking(TOP_K, True, np.zeros(0, dtype=np.int64)),
    )
    return user


def measure_size(path: Path, size: int, reps: int, rng: np.random.Generator) -> dict:
    from service.engines import EngineConfig
    from service.padding import pad_support
    from service.repository import ModelSettings, load_model

    model = load_model(path, ModelSettings(EngineConfig(kind="onnxruntime")))
    scorer = model.engine.scorer
    whole, candidates = requests_for(model, rng, reps)
    users = [user_inputs(model, r) for r in whole]
    support = model.buckets.support_length(INTERACTIONS)
    item_table = model.artifact.item_table  # the floor reads what the ranking reads: the engagement head's [bias | factors] rows
    table = np.ascontiguousarray(np.concatenate([item_table.engagement_bias[:, None], item_table.engagement_factors], axis=1))
    vectors = rng.standard_normal((reps, table.shape[1])).astype(np.float32)
    engine, score, floor = Timings([]), Timings([]), Timings([])
    for k, user in enumerate(users):
        started = time.perf_counter()
        model.run_users([user], support, 0)
        engine.values_s.append(time.perf_counter() - started)
        adapted = model.engine.adapt(pad_support([user], support))
        started = time.perf_counter()
        scorer.score([user], adapted)
        score.values_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        np.argpartition(-(table @ vectors[k]), TOP_K)[:TOP_K]
        floor.values_s.append(time.perf_counter() - started)
    del model, scorer, table, item_table

    with tempfile.TemporaryDirectory(prefix="warmstart-catalog-") as tmp:
        repository = Path(tmp)
        (repository / MODEL).mkdir()
        (repository / MODEL / path.name).symlink_to(path, target_is_directory=True)
        process, port = start_server(repository, MODEL, [])
        try:
            e2e_whole, e2e_candidates = end_to_end(port, whole, candidates)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"size": size, "engine": engine, "score": score, "floor": floor, "whole": e2e_whole, "candidates": e2e_candidates}


def end_to_end(port: int, whole: list, candidates: list) -> tuple[Timings, Timings]:
    """Sequential calls from one client, whole catalog and 100 candidates alternating."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        while health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60).status != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become SERVING within 180 s")
            time.sleep(0.1)
        stub = pb_grpc.RecommenderStub(channel)
        for request in (whole + candidates)[:10]:  # warm the client and connection
            stub.Recommend(request, timeout=60, wait_for_ready=True)
        a, b = Timings([]), Timings([])
        for w, c in zip(whole, candidates):
            for request, into in ((w, a), (c, b)):
                started = time.perf_counter()
                response = stub.Recommend(request, timeout=60)
                into.values_s.append(time.perf_counter() - started)
                if len(response.items) != TOP_K:
                    raise RuntimeError(f"{len(response.items)} items returned, expected {TOP_K}")
    return a, b


def users_per_s(path: Path, rounds: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(adapt + score, fused graph) users/s at B=64, S=10, Q=1000, and the largest
    difference between the two's scores."""
    from service.engines import EngineConfig
    from service.padding import UserInputs, pad_batch, pad_support
    from service.repository import ModelSettings, load_model

    model = load_model(path, ModelSettings(EngineConfig(kind="onnxruntime"), max_candidates=1024))
    catalog = model.artifact.catalog
    b, s, q = 64, 10, 1000
    support_rows = rng.integers(0, catalog.size, size=(b, s))
    labels = rng.integers(1, 6, size=(b, s)).astype(np.float32)
    query_rows = np.stack([rng.choice(catalog.size, size=q, replace=False) for _ in range(b)])
    zeros = np.zeros(model.artifact.encoder.user_width, dtype=np.int64)
    by_rows = [UserInputs(zeros, catalog.codes[support_rows[i]], labels[i], query_rows=query_rows[i]) for i in range(b)]
    by_codes = [UserInputs(zeros, catalog.codes[support_rows[i]], labels[i], query_items=catalog.codes[query_rows[i]]) for i in range(b)]
    fused_inputs = pad_batch(by_codes, s, model.buckets.query_length(q))
    table_times, fused_times = [], []
    worst = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        outputs = model.engine.scorer.score(by_rows, model.engine.adapt(pad_support(by_rows, s)))
        table_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        fused = model.engine.run(fused_inputs)
        fused_times.append(time.perf_counter() - started)
        worst = max(worst, max(float(np.abs(o.query_scores - fused.query_scores[i, :q]).max()) for i, o in enumerate(outputs)))
    return b / float(np.median(table_times)), b / float(np.median(fused_times)), worst


def refresh_time(path: Path) -> float:
    from training.refresh import refresh_catalog

    items = synthetic_items(path, 10_000, 99, "fresh-")
    with tempfile.TemporaryDirectory(prefix="warmstart-refresh-", dir=path.parent.parent) as tmp:
        # A model directory of its own holding the served version, so the bench adds no version to the prepared one.
        model_dir = Path(tmp) / MODEL
        model_dir.mkdir()
        served = model_dir / path.name
        served.symlink_to(path, target_is_directory=True)
        started = time.perf_counter()
        refresh_catalog(served, items)
        return time.perf_counter() - started


def run(catalogs: Path, sizes: list[int], reps: int, rounds: int, extras: bool = True) -> int:
    rng = np.random.default_rng(0)
    paths = {size: Path((catalogs / f"size-{size}").read_text().strip()) for size in sizes}
    rows = []
    for size in sizes:
        print(f"measuring {size} items ...", file=sys.stderr)
        rows.append(measure_size(paths[size], size, reps, rng))
    throughput_size = min((s for s in sizes if s >= 10_000), default=max(sizes))
    if extras:
        table_ups, fused_ups, diff = users_per_s(paths[throughput_size], rounds, rng)
        refresh_size = 200_000 if 200_000 in paths else max(sizes)
        refresh_s = refresh_time(paths[refresh_size])

    print(f"whole-catalog Recommend, one client, sequential, {INTERACTIONS} interactions, top_k {TOP_K}; {reps} calls per cell")
    header = (
        f"{'items':>9} | {'whole p50':>9} {'whole p99':>9} | {'100 cand p50':>12} {'ratio':>6} | "
        f"{'engine p50':>10} {'score p50':>9} {'floor p50':>9} {'engine/floor':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["whole"].ms(50) / r["candidates"].ms(50)
        floor_ratio = r["engine"].ms(50) / r["floor"].ms(50)
        print(
            f"{r['size']:>9} | {r['whole'].ms(50):>7.2f}ms {r['whole'].ms(99):>7.2f}ms | {r['candidates'].ms(50):>10.2f}ms {ratio:>5.1f}x | "
            f"{r['engine'].ms(50):>8.2f}ms {r['score'].ms(50):>7.2f}ms {r['floor'].ms(50):>7.2f}ms {floor_ratio:>11.2f}x"
        )
    print()
    if extras:
        print(f"onnxruntime, B=64 S=10 Q=1000 ({throughput_size} items): adapt + score {table_ups:,.0f} users/s, "
              f"fused graph {fused_ups:,.0f} users/s ({table_ups / fused_ups:.1f}x); max |score difference| {diff:.1e}")
        print(f"refresh adding 10,000 items to the {refresh_size:,}-item version: {refresh_s:.2f} s")
        print()
    by_size = {r["size"]: r for r in rows}
    if 200_000 in by_size:
        r = by_size[200_000]
        ratio = r["whole"].ms(50) / r["candidates"].ms(50)
        print(f"target: 200k whole-catalog p50 <= 3x the 100-candidate p50: {ratio:.1f}x -> {'met' if ratio <= 3 else 'MISSED'}")
    if 1_000_000 in by_size:
        r = by_size[1_000_000]
        ratio = r["engine"].ms(50) / r["floor"].ms(50)
        print(f"target: 1M engine time <= 2x the numpy floor: {ratio:.2f}x -> {'met' if ratio <= 2 else 'MISSED'}")
    if extras:
        print(f"target: >= 30,000 users/s at B=64 S=10 Q=1000: {table_ups:,.0f} -> {'met' if table_ups >= 30_000 else 'MISSED'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build one version per catalog size (no timing: no lock needed)")
    p.add_argument("--out", type=Path, required=True, help="directory for the catalogs (a model repository)")
    p.add_argument("--artifact", type=Path, default=None, help="trained artifact with an item table (default: train one, a few minutes)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated catalog sizes")
    p = sub.add_parser("run", help="measure (hold the benchmark lock)")
    p.add_argument("--catalogs", type=Path, required=True, help="what prepare wrote")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated catalog sizes (prepared ones)")
    p.add_argument("--reps", type=int, default=60, help="calls per cell (default 60)")
    p.add_argument("--rounds", type=int, default=30, help="batches per method at B=64 (default 30)")
    p.add_argument("--no-extras", action="store_true", help="catalog sizes only: no B=64 throughput, no refresh timing")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.command == "prepare":
        prepare(args.out.resolve(), args.artifact, sizes)
        return 0
    return run(args.catalogs.resolve(), sizes, args.reps, args.rounds, not args.no_extras)


if __name__ == "__main__":
    sys.exit(main())
