"""Onboard latency against Recommend over the whole catalog, on the same server, per catalog.

For each artifact given (e.g. the MovieLens-100K model, 1,682 items, and a synthetic one
with 200k items), starts `python -m service.server` on free ports and, from one client,
calls in interleaved rounds (one call of each kind per round, so that all see the same
background load):

- Recommend, the baseline: 3 interactions, the whole catalog ranked, top_k 10;
- Onboard D-optimal (the default strategy) with the same 3 interactions, count 5;
- Onboard D-optimal for a user with no interactions, count 5;
- Onboard MeLU-style, popular and random, 3 interactions, count 5;
- Onboard D-optimal over a pool of 100 catalog items, count 5.

and prints p50 / p95 / mean latency in ms (client side, loopback) and each p50 over
Recommend's. Run it under the shared bench lock:

    flock /work/notes/bench.lock python bench/onboard.py --artifact models/ml100k/1 --tile-to 200000

--tile-to N adds a copy of the (last) artifact whose catalog is its own repeated to N items
(new ids; encoded rows and item-table rows repeated, the manifest's sizes and digests
rewritten): the same model and graph, a catalog of that size, so the serving cost
of the catalog's size is measured without training on one (the synthetic generator takes
minutes for 200k items: --build-items N does that instead).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import start_server  # noqa: E402
from warmstart.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pb_grpc  # noqa: E402

INTERACTIONS = 3
COUNT = 5
POOL = 100


def build_synthetic_artifact(repository: Path, n_items: int, seed: int = 0) -> Path:
    """A served-structure model on synthetic data with `n_items` catalog items (a few meta-steps:
    the bench measures serving, not accuracy)."""
    from training import model as M
    from training.pipeline import JobConfig, train_and_export
    from training.synthetic import generate_synthetic

    dataset = generate_synthetic(seed=seed, n_users=2000, n_items=n_items)
    config = JobConfig.default(meta_steps=20, eval_every=10, meta_batch_size=16)
    config.model = M.served_config()
    return train_and_export(dataset, repository, f"synthetic{n_items}", config, version="1").export.path


def tile_artifact(source: Path, target: Path, size: int) -> Path:
    """A copy of `source` whose catalog is its own repeated to `size` items (see the module docstring)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from warmstart import contract as C

    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    ids = (source / "catalog_items.txt").read_text(encoding="utf-8").split("\n")[:-1]
    reps = -(-size // len(ids))
    tiled = [f"{item}~{r}" if r else item for r in range(reps) for item in ids][:size]
    (target / "catalog_items.txt").write_text("".join(f"{i}\n" for i in tiled), encoding="utf-8")

    def tile(name: str) -> None:
        tensors = load_file(str(source / name))
        save_file({k: np.ascontiguousarray(np.concatenate([v] * reps)[:size]) for k, v in tensors.items()}, str(target / name))

    tile(C.CATALOG_FEATURES_FILE)
    manifest = C.parse_manifest((source / C.MANIFEST_FILE).read_bytes())
    if not manifest.HasField("item_table"):
        raise ValueError(f"{source} has no item table: re-export it")
    spec = manifest.item_table
    table = C.parse_item_table((source / spec.file).read_bytes(), spec.size, spec.rating_factors, spec.engagement_factors)
    (target / spec.file).write_bytes(C.item_table_bytes(table.take(np.arange(size) % table.size)))
    manifest.catalog.size = size
    manifest.item_table.size = size
    C.write_manifest(target, manifest)  # lists every file with its new digest
    return target


def calls(item_ids: list[str], rng: np.random.Generator) -> dict[str, tuple[str, object]]:
    """(method, request) per measured kind; interactions drawn from the catalog."""
    chosen = rng.choice(len(item_ids), size=INTERACTIONS + POOL, replace=False)
    interactions = [pb.Interaction(item_id=item_ids[i], label=float(rng.integers(1, 6))) for i in chosen[:INTERACTIONS]]
    pool = [item_ids[i] for i in chosen[INTERACTIONS:]]
    onboard = lambda **fields: pb.OnboardRequest(interactions=interactions, count=COUNT, **fields)  # noqa: E731
    return {
        "Recommend (catalog, top 10)": ("Recommend", pb.RecommendRequest(interactions=interactions, top_k=10, exclude_interacted=True)),
        "Onboard D-optimal": ("Onboard", onboard()),
        "Onboard D-optimal, no interactions": ("Onboard", pb.OnboardRequest(count=COUNT)),
        "Onboard MeLU-style": ("Onboard", onboard(strategy=pb.ONBOARD_STRATEGY_GRADIENT_POPULARITY)),
        "Onboard popular": ("Onboard", onboard(strategy=pb.ONBOARD_STRATEGY_POPULAR)),
        "Onboard random": ("Onboard", onboard(strategy=pb.ONBOARD_STRATEGY_RANDOM)),
        f"Onboard D-optimal, pool of {POOL}": ("Onboard", onboard(candidate_ids=pool)),
    }


def measure(port: int, item_ids: list[str], rounds: int, warmup: int, seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        kinds = calls(item_ids, rng)
        latencies: dict[str, list[float]] = {name: [] for name in kinds}
        for r in range(warmup + rounds):
            kinds = calls(item_ids, rng)  # fresh users every round
            for name, (method, request) in kinds.items():
                started = time.perf_counter()
                response = getattr(stub, method)(request, timeout=60)
                elapsed = time.perf_counter() - started
                if not response.items:
                    raise RuntimeError(f"{name}: an empty answer")
                if r >= warmup:
                    latencies[name].append(elapsed)
    return latencies


def wait_until_serving(port: int, timeout_s: float = 300.0) -> None:
    """Blocks until the server's health check says SERVING (the model loaded and warmed up)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server on port {port} did not become SERVING within {timeout_s} s")
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, action="append", default=[], help="artifact directory <repo>/<name>/<version> (repeat)")
    parser.add_argument("--build-items", type=int, default=0, help="first build a synthetic artifact with this many items and add it")
    parser.add_argument("--tile-to", type=int, default=0, help="add a copy of the last artifact with its catalog repeated to this many items")
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds per artifact (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeat)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="warmstart-bench-onboard-") as tmp:
        artifacts = [a.resolve() for a in args.artifact]
        if args.build_items:
            print(f"building a synthetic artifact with {args.build_items} items ...", file=sys.stderr)
            artifacts.append(build_synthetic_artifact(Path(tmp) / "built", args.build_items, args.seed))
        if not artifacts:
            parser.error("give --artifact or --build-items")
        if args.tile_to:
            source = artifacts[-1]
            artifacts.append(tile_artifact(source, Path(tmp) / "tiled" / f"{source.parent.name}-x{args.tile_to}" / source.name, args.tile_to))
        rows = []
        for k, artifact in enumerate(artifacts):
            repository = Path(tmp) / f"repository{k}"
            (repository / artifact.parent.name).mkdir(parents=True)
            (repository / artifact.parent.name / artifact.name).symlink_to(artifact, target_is_directory=True)
            item_ids = (artifact / "catalog_items.txt").read_text(encoding="utf-8").split("\n")[:-1]
            process, port = start_server(repository, artifact.parent.name, args.server_arg)
            try:
                wait_until_serving(port)
                latencies = measure(port, item_ids, args.rounds, args.warmup, args.seed)
            finally:
                process.terminate()
                process.wait(timeout=60)
            base = float(np.median(latencies["Recommend (catalog, top 10)"]))
            for name, values in latencies.items():
                ms = np.array(values) * 1e3
                rows.append((len(item_ids), name, np.median(ms), np.percentile(ms, 95), ms.mean(), np.median(ms) / (base * 1e3)))
    print(f"{args.rounds} interleaved rounds per catalog ({args.warmup} warm-up), one client, loopback; "
          f"server flags: {' '.join(args.server_arg) or '(defaults)'}")
    print("| catalog items | call | p50 ms | p95 ms | mean ms | p50 / Recommend p50 |")
    print("|---|---|---|---|---|---|")
    for items, name, p50, p95, mean, ratio in rows:
        print(f"| {items:,} | {name} | {p50:.2f} | {p95:.2f} | {mean:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
