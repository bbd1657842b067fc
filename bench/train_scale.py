"""Meta-training at 10^7 interactions: wall time and peak memory, one process vs torchrun.

    .venv/bin/python -m bench.train_scale                 # 200k users, ~10^7 interactions
    .venv/bin/python -m bench.train_scale --users 20000   # a quick look (~10^6)

Runs the production job's stages (the synthetic loader, the validation split, preparation:
schema, catalog, the tuned bias baseline, ALS item factors, the attribute prior and the
inner-loop start, then meta-steps) twice, each in fresh processes: once in one process with
a meta-batch of P x B users, once under `torchrun --nproc_per_node P` with B users per
process (the same global meta-batch: the two runs train the same model up to float
order). Every process reports its wall time per stage and its peak resident memory
(getrusage ru_maxrss) after each stage; the table gives the slowest process and the
largest peak, and the torchrun/one-process ratio. No artifact is exported (export does not
depend on the number of interactions).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load", "split", "prepare", "meta-steps")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """One process of a run: times each stage and writes rank<r>.json into args.out."""
    import torch

    from training.distributed import Ranks, process_group
    from training.initialisation import meta_train
    from training.pipeline import JobConfig, validation_split
    from training.splits import build_tasks, training_rows
    from training.synthetic import generate_synthetic

    torch.set_num_threads(1)
    ranks = Ranks.from_environment()
    report: dict = {"rank": ranks.rank, "world_size": ranks.world_size, "stages": {}}

    def stage(name: str, started: float) -> None:
        report["stages"][name] = {"wall_s": time.perf_counter() - started, "peak_rss_gib": _peak_rss_gib()}

    with process_group(ranks) as collective:
        started = time.perf_counter()
        dataset = generate_synthetic(seed=0, n_users=args.users, n_items=args.items, min_interactions=args.min_interactions)
        report["interactions"] = len(dataset)
        stage("load", started)

        started = time.perf_counter()
        config = JobConfig.default(
            meta_steps=args.meta_steps, meta_batch_size=args.meta_batch_size, eval_every=args.eval_every, patience=0
        )
        split = validation_split(dataset, config)
        train = dataset.subset(training_rows(dataset, split))
        valid_tasks = build_tasks(dataset, split, split.valid_users)
        report["train_users"], report["valid_users"] = len(split.train_users), len(valid_tasks)
        stage("split", started)

        started = time.perf_counter()
        _, result, _ = meta_train(
            dataset,
            train,
            valid_tasks,
            config.model,
            config.inner,
            config.train,
            support_sizes=config.train.validation_support_sizes,
            collective=collective,
        )
        total = time.perf_counter() - started
        # meta_train = preparation, then the trainer's loop (which times itself).
        report["stages"]["prepare"] = {"wall_s": total - result.wall_time_s, "peak_rss_gib": None}
        report["stages"]["meta-steps"] = {"wall_s": result.wall_time_s, "peak_rss_gib": _peak_rss_gib()}
        report["meta_steps"] = result.steps_done
        report["evaluations"] = len(result.history)
        report["best_validation_loss"] = result.best_validation_loss
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_s"] = usage.ru_utime + usage.ru_stime
    Path(args.out, f"rank{ranks.rank}.json").write_text(json.dumps(report))


def run(processes: int, args: argparse.Namespace, out: Path) -> list[dict]:
    """One configuration in fresh processes; returns every rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    per_process = args.meta_batch_size if processes > 1 else args.meta_batch_size * args.processes
    common = [
        "-m", "bench.train_scale", "--worker", "--out", str(out),
        "--users", str(args.users), "--items", str(args.items), "--min-interactions", str(args.min_interactions),
        "--meta-steps", str(args.meta_steps), "--eval-every", str(args.eval_every), "--meta-batch-size", str(per_process),
    ]  # fmt: skip
    if processes == 1:
        command = [sys.executable, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    for report in reports:
        report["job_wall_s"] = time.perf_counter() - started
    return reports


def table(one: list[dict], many: list[dict], processes: int, batch: int) -> str:
    def slowest(reports: list[dict], name: str) -> float:
        return max(r["stages"][name]["wall_s"] for r in reports)

    def peak(reports: list[dict], name: str) -> float | None:
        values = [r["stages"][name]["peak_rss_gib"] for r in reports]
        return None if None in values else max(values)

    lines = [
        f"| stage | 1 process (meta-batch {batch * processes}): wall s | peak RSS GiB | "
        f"torchrun x {processes} ({batch} each): wall s | peak RSS GiB per process | wall ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in STAGES:
        a, b = slowest(one, name), slowest(many, name)
        pa, pb = peak(one, name), peak(many, name)
        fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {name} | {a:.1f} | {fmt(pa)} | {b:.1f} | {fmt(pb)} | {b / a:.2f} |")
    a, b = one[0]["job_wall_s"], many[0]["job_wall_s"]
    lines.append(f"| whole job (with process start) | {a:.1f} | | {b:.1f} | | {b / a:.2f} |")
    a, b = sum(r["cpu_s"] for r in one), sum(r["cpu_s"] for r in many)
    lines.append(f"| CPU seconds, all processes | {a:.1f} | | {b:.1f} | | {b / a:.2f} |")
    steps = one[0]["meta_steps"]
    a, b = slowest(one, "meta-steps") / steps, slowest(many, "meta-steps") / steps
    lines.append(f"| per meta-step (incl. {one[0]['evaluations']} validations / {steps} steps) | {a:.3f} | | {b:.3f} | | {b / a:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=2_500, help="the generator costs users x items (a key per pair)")
    parser.add_argument("--min-interactions", type=int, default=25, help="with 200k users: ~1.0e7 interactions")
    parser.add_argument("--meta-steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--meta-batch-size", type=int, default=32, help="per process under torchrun")
    parser.add_argument("--processes", type=int, default=2, help="torchrun's --nproc_per_node")
    parser.add_argument("--out", type=Path, default=None, help="(worker) where rank<r>.json goes; (main) a JSON of all reports")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.processes < 2:
        parser.error("--processes must be >= 2 (it is compared with one process)")
    with tempfile.TemporaryDirectory(prefix="train-scale-") as scratch:
        one = run(1, args, Path(scratch) / "one")
        many = run(args.processes, args, Path(scratch) / "many")
    print(
        f"\n{one[0]['interactions']:,} interactions ({args.users:,} users x {args.items:,} items), "
        f"{one[0]['train_users']:,} training and {one[0]['valid_users']:,} validation users; "
        f"{args.meta_steps} meta-steps, a validation every {args.eval_every}; {os.cpu_count()} CPU cores, one torch thread per process\n"
    )
    print(table(one, many, args.processes, args.meta_batch_size))
    print(
        f"\nbest validation loss: 1 process {one[0]['best_validation_loss']:.6f}, "
        f"torchrun {many[0]['best_validation_loss']:.6f} (the same global meta-batch)"
    )
    if args.out is not None:
        args.out.write_text(json.dumps({"one": one, "many": many}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
