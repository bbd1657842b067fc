"""warmstart-train: build splits, evaluate methods, meta-train and export models.

    python -m training.cli splits    --dataset ml-100k --path ../shared/data/ml-100k --out runs/splits
    python -m training.cli evaluate  --dataset ml-100k --path ../shared/data/ml-100k --out runs/eval
    python -m training.cli train     --dataset synthetic --repository models --name warmstart
    python -m training.cli export    --checkpoint models/.work/warmstart/checkpoint --repository models
    torchrun --standalone --nproc_per_node 2 -m training.cli train ...   (several processes)

Every command exits 0 on success and non-zero with one clear line on stderr on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from training.dataset import DataError, Dataset, LabelSpec
from training.topn import DEFAULT_TOPN_METHODS, DEFAULT_TOPN_REFERENCE

log = logging.getLogger("training")

DEFAULT_METHODS = "global_mean,item_mean,bias,baseline_only,svd,mlp,mlp_finetune,mlp_maml,mlp_fomaml,mlp_metasgd,warmstart"


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


# -- dataset options shared by every command -----------------------------------------------------
def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="synthetic",
        choices=("synthetic", "ml-100k", "ml-1m", "ml-latest", "generic"),
        help="format of the data (default: synthetic, generated, needs no download)",
    )
    group.add_argument("--path", type=Path, help="dataset directory (MovieLens) or interactions CSV / directory (generic)")
    group.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic generator")
    group.add_argument("--synthetic-users", type=int, default=1200, help="users the synthetic generator makes")
    group.add_argument("--synthetic-items", type=int, default=600, help="items the synthetic generator makes")
    group.add_argument("--label-kind", choices=("rating", "click"), default="rating", help="generic: what a label is")
    group.add_argument("--label-min", type=float, default=1.0, help="generic ratings: lowest rating")
    group.add_argument("--label-max", type=float, default=5.0, help="generic ratings: highest rating")
    group.add_argument("--users-csv", type=Path, help="generic: user attributes CSV (user,<field>...)")
    group.add_argument("--items-csv", type=Path, help="generic: item attributes CSV (item,<field>...)")
    group.add_argument("--multi-valued", default="", help="generic: comma-separated attribute fields holding several values joined by '|'")


def load_from_args(args: argparse.Namespace) -> Dataset:
    from training.data import load_dataset

    if args.dataset == "synthetic":
        if args.path is not None:
            raise UsageError("--path is not used with --dataset synthetic")
        return load_dataset(
            "synthetic", seed=args.synthetic_seed, n_users=args.synthetic_users, n_items=args.synthetic_items
        )
    if args.path is None:
        raise UsageError(f"--dataset {args.dataset} needs --path")
    if args.dataset == "generic":
        label = LabelSpec.click() if args.label_kind == "click" else LabelSpec("rating", args.label_min, args.label_max)
        options: dict = {"label": label, "multi_valued": [f for f in args.multi_valued.split(",") if f]}
        if args.users_csv:
            options["user_attributes_csv"] = args.users_csv
        if args.items_csv:
            options["item_attributes_csv"] = args.items_csv
        return load_dataset("generic", args.path, **options)
    return load_dataset(args.dataset, args.path)


# -- model / training options --------------------------------------------------------------------
def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("meta-training")
    group.add_argument("--meta-steps", type=int, default=3000, help="most meta-steps (early stopping usually ends sooner)")
    group.add_argument(
        "--meta-batch-size",
        type=int,
        default=32,
        help="users per meta-step and process (under torchrun a meta-step takes N x this many users)",
    )
    group.add_argument("--outer-lr", type=float, default=None, help="Adam learning rate of the outer loop")
    group.add_argument("--inner-steps", type=int, default=5, help="gradient steps per user (fixed in the served graph)")
    group.add_argument("--eval-every", type=int, default=100, help="meta-steps between validation evaluations")
    group.add_argument("--patience", type=int, default=8, help="evaluations without improvement before stopping (0 = never)")
    group.add_argument("--seed", type=int, default=0, help="seed of splits, initialisation and episode sampling")
    group.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the per-user ops are small, and more threads measured "
        "slower, 3x slower when another process shares the cores; 0 = torch's default)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from(args: argparse.Namespace):
    from training.trainer import TrainConfig

    values = {
        "meta_steps": args.meta_steps,
        "meta_batch_size": args.meta_batch_size,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "seed": args.seed,
    }
    if args.outer_lr is not None:
        values["outer_lr"] = args.outer_lr
    return TrainConfig(**values)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _limit_blas_threads(args: argparse.Namespace) -> None:
    """numpy's BLAS as threaded as torch (--threads) for the evaluation's many small matrix
    ops, which measured about 5x slower with two BLAS threads on two shared cores."""
    if not args.threads:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without the eval extra numpy keeps its default
        return
    threadpool_limits(args.threads)


# -- commands ------------------------------------------------------------------------------------
def cmd_splits(args: argparse.Namespace) -> int:
    from training.splits import load_or_make_splits

    dataset = load_from_args(args)
    for scenario in _scenarios(args.scenario):
        protocol = _protocol(args, scenario)
        directory = args.out / f"{dataset.name}-{scenario}-seed{args.seed}"
        splits = load_or_make_splits(dataset, protocol, directory)
        sizes = ", ".join(f"fold {s.fold}: {len(s.test_users)} test" for s in splits)
        print(f"{directory}: {sizes}")
    return 0


def _scenarios(text: str) -> list[str]:
    from training.splits import SCENARIOS

    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise UsageError(f"--scenario: choose from {', '.join(SCENARIOS)} (got {text!r})")
    return names


def _protocol(args: argparse.Namespace, scenario: str):
    from training.splits import Protocol

    return Protocol(
        scenario=scenario,  # type: ignore[arg-type]
        min_interactions=args.min_interactions,
        max_interactions=args.max_interactions,
        query_size=args.query_size,
        folds=args.folds,
        seed=args.seed,
    )


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation protocol")
    group.add_argument("--scenario", default="new_users", help="comma-separated: new_users, new_items, new_users_items")
    group.add_argument("--folds", type=int, default=5, help="user folds (each is the test set once)")
    group.add_argument("--min-interactions", type=int, default=13, help="evaluate users with at least this many")
    group.add_argument("--max-interactions", type=int, default=100, help="... and at most this many (heavier users only train)")
    group.add_argument("--query-size", type=int, default=10, help="each test user's last N interactions are the query")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.harness import evaluate, parse_support_sizes
    from training.methods import make_methods
    from training.report import write_report
    from training.splits import load_or_make_splits

    if args.engagement_id_dropout and args.protocol != "topn":
        raise UsageError("--engagement-id-dropout is for --protocol topn (it trains the engagement head Recommend ranks by)")
    if args.protocol == "topn":
        return cmd_evaluate_topn(args)
    if args.protocol == "onboarding":
        return cmd_evaluate_onboarding(args)
    if args.liked_threshold is not None:
        raise UsageError("--liked-threshold is for --protocol topn")
    args.methods = args.methods or DEFAULT_METHODS
    args.reference = args.reference or "baseline_only"
    _set_threads(args)
    _limit_blas_threads(args)
    dataset = load_from_args(args)
    sizes = parse_support_sizes(args.support_sizes or "1,3,5,10,20,all")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.reference not in names:
        raise UsageError(f"--reference {args.reference} must be one of --methods")
    train_config = train_config_from(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.perf_counter()
    folds = _only_folds(args)
    for scenario in _scenarios(args.scenario):
        protocol = _protocol(args, scenario)
        splits = load_or_make_splits(dataset, protocol, args.out / "splits" / f"{dataset.name}-{scenario}-seed{args.seed}")
        if folds is not None:
            splits = [s for s in splits if s.fold in folds]
        bar = _bar(len(splits) * len(names), f"evaluating {scenario}", enabled=not args.no_progress)
        rows += evaluate(
            dataset,
            splits,
            lambda: make_methods(names, train_config, args.inner_steps),
            sizes,
            progress=(lambda message: (bar.update(1), bar.set_postfix_str(message))) if bar else None,
        )
        if bar:
            bar.close()
    with (args.out / "results.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    elapsed = time.perf_counter() - started
    notes = (
        f"Dataset `{dataset.name}` ({len(dataset)} interactions, fingerprint `{dataset.fingerprint()[:12]}`); "
        f"protocol seed {args.seed}, {args.folds} folds, users with {args.min_interactions}-{args.max_interactions} "
        f"interactions, query = last {args.query_size}; meta-training {asdict(train_config)}; "
        f"wall time {elapsed:.0f} s."
    )
    report = write_report(rows, args.out, reference=args.reference, title=f"warmstart evaluation: {dataset.name}", notes=notes)
    print(f"report: {report}")
    return 0


def _only_folds(args: argparse.Namespace) -> list[int] | None:
    try:
        return [int(f) for f in args.only_folds.split(",")] if args.only_folds else None
    except ValueError:
        raise UsageError(f"--only-folds takes comma-separated fold numbers, got {args.only_folds!r}") from None


def cmd_evaluate_topn(args: argparse.Namespace) -> int:
    """evaluate --protocol topn: the catalog-wide top-N protocol (training.topn)."""
    from training.report import write_report
    from training.splits import load_or_make_splits
    from training.topn import (
        COVERAGE_CUTOFF,
        TOPN_METHOD_HELP,
        coverage_table,
        evaluate_topn,
        make_topn_methods,
        parse_topn_sizes,
        relevances,
    )

    names = [m.strip() for m in (args.methods or DEFAULT_TOPN_METHODS).split(",") if m.strip()]
    unknown = [n for n in names if n not in TOPN_METHOD_HELP]
    if unknown:
        raise UsageError(f"--methods: unknown top-N methods {unknown}; choose from {', '.join(TOPN_METHOD_HELP)}")
    reference = args.reference or DEFAULT_TOPN_REFERENCE
    if reference not in names:
        raise UsageError(f"--reference {reference} must be one of --methods")
    try:
        sizes = parse_topn_sizes(args.support_sizes or "0,1,3,5,10,20")
    except ValueError as error:
        raise UsageError(f"--support-sizes: {error}") from None
    _set_threads(args)
    _limit_blas_threads(args)
    dataset = load_from_args(args)
    sections = relevances(dataset, args.liked_threshold)
    train_config = train_config_from(args)
    folds = _only_folds(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    coverage: list[dict] = []
    settings: list[dict] = []
    section_names: list[str] = []
    from training import model as M

    overrides = {"engagement_id_dropout": args.engagement_id_dropout}
    try:
        M.served_config(**overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for scenario in _scenarios(args.scenario):
        protocol = _protocol(args, scenario)
        splits = load_or_make_splits(dataset, protocol, args.out / "splits" / f"{dataset.name}-{scenario}-seed{args.seed}")
        if folds is not None:
            splits = [s for s in splits if s.fold in folds]
        bar = _bar(len(splits) * len(names), f"top-N {scenario}", enabled=not args.no_progress)
        result = evaluate_topn(
            dataset,
            splits,
            lambda: make_topn_methods(names, train_config, args.inner_steps, model_overrides=overrides),
            sizes,
            liked_threshold=args.liked_threshold,
            progress=(lambda message: (bar.update(1), bar.set_postfix_str(message))) if bar else None,
        )
        if bar:
            bar.close()
        rows += result.rows
        coverage += result.coverage
        settings += result.settings
        section_names += [r.section(scenario) for r in sections]
    with (args.out / "results.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    elapsed = time.perf_counter() - started
    relevant = "; ".join(f"`{r.name}`" + ("" if r.min_label is None else f" (label >= {r.min_label:g})") for r in sections)
    notes = (
        f"Top-N protocol. Dataset `{dataset.name}` ({len(dataset)} interactions, fingerprint "
        f"`{dataset.fingerprint()[:12]}`); protocol seed {args.seed}, {args.folds} folds, users with "
        f"{args.min_interactions}-{args.max_interactions} interactions; support = each test user's first K "
        f"interactions, relevant = their later ones, sections: {relevant}; candidates = the whole catalog "
        f"minus the support (in scenarios with withheld new items: the new items minus the support); wall time {elapsed:.0f} s."
    )
    extra = {
        f"Catalog coverage@{COVERAGE_CUTOFF}": "Distinct items in the top-20 lists of every evaluated user (all folds "
        "pooled) / candidate items (the catalog; the new items where they are withheld); in brackets the range over folds.\n\n"
        + "\n\n".join(f"**{name}**\n\n{coverage_table(coverage, name)}" for name in section_names if any(c["scenario"] == name for c in coverage)),
        "Chosen hyper-parameters": _settings_table(settings),
    }
    report = write_report(
        rows,
        args.out,
        reference=reference,
        title=f"warmstart top-N evaluation: {dataset.name}",
        notes=notes,
        extra_sections=extra,
        extra_summary={"coverage": coverage, "settings": settings, "wall_time_s": elapsed},
    )
    print(f"report: {report}")
    return 0


def cmd_evaluate_onboarding(args: argparse.Namespace) -> int:
    """evaluate --protocol onboarding: simulated onboarding of held-out users (training/onboarding_eval.py)."""
    from training.onboarding_eval import (
        DEFAULT_REFERENCE,
        DEFAULT_STRATEGIES,
        ONBOARDING_CUTOFF,
        PROTOCOL_HELP,
        STRATEGY_HELP,
        onboarding_table,
        parse_onboarding_sizes,
        served_model_fitter,
        simulate_onboarding,
        summary,
    )
    from training.splits import load_or_make_splits

    if args.liked_threshold is not None:
        raise UsageError("--liked-threshold is for --protocol topn")
    names = [m.strip() for m in (args.methods or ",".join(DEFAULT_STRATEGIES)).split(",") if m.strip()]
    unknown = [n for n in names if n not in STRATEGY_HELP]
    if unknown:
        raise UsageError(f"--methods: unknown onboarding strategies {unknown}; choose from {', '.join(STRATEGY_HELP)}")
    reference = args.reference or DEFAULT_REFERENCE
    if reference not in names:
        raise UsageError(f"--reference {reference} must be one of --methods")
    try:
        sizes = parse_onboarding_sizes(args.support_sizes or "3,5,10")
    except ValueError as error:
        raise UsageError(f"--support-sizes: {error}") from None
    _set_threads(args)
    _limit_blas_threads(args)
    dataset = load_from_args(args)
    train_config = train_config_from(args)
    folds = _only_folds(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    for scenario in _scenarios(args.scenario):
        if scenario != "new_users":
            raise UsageError("--protocol onboarding simulates new users: use --scenario new_users")
        protocol = _protocol(args, scenario)
        splits = load_or_make_splits(dataset, protocol, args.out / "splits" / f"{dataset.name}-{scenario}-seed{args.seed}")
        if folds is not None:
            splits = [s for s in splits if s.fold in folds]
        rows += simulate_onboarding(
            dataset,
            splits,
            served_model_fitter(train_config, args.inner_steps),
            names,
            sizes,
            progress=None if args.no_progress else (lambda message: log.info("onboarding: %s", message)),
        )
    with (args.out / "results.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    elapsed = time.perf_counter() - started
    strategies = "\n".join(f"- `{n}`: {STRATEGY_HELP[n]}" for n in names)
    tables = "\n\n".join(
        f"## Protocol `{p}`: {PROTOCOL_HELP[p]}\n\n{onboarding_table([r for r in rows if r['protocol'] == p], reference)}"
        for p in PROTOCOL_HELP
        if any(r["protocol"] == p for r in rows)
    )
    report = args.out / "report.md"
    report.write_text(
        f"# warmstart simulated onboarding: {dataset.name}\n\n"
        f"Dataset `{dataset.name}` ({len(dataset)} interactions, fingerprint `{dataset.fingerprint()[:12]}`); "
        f"protocol seed {args.seed}, {args.folds} folds (run: {sorted({r['fold'] for r in rows})}), test users with "
        f"{args.min_interactions}-{args.max_interactions} interactions and more distinct items than the largest K "
        f"plus --query-size ({args.query_size}). Each strategy asks K items among items the user rated, from no "
        f"interactions; the model adapts to the K answers; RMSE on the scored ratings, Recall@{ONBOARDING_CUTOFF} "
        f"of the engagement ranking over the catalog minus the asked items (relevant: the scored items). 95% t "
        f"intervals; differences paired per user against `{reference}`. Meta-training {asdict(train_config)}; "
        f"wall time {elapsed:.0f} s.\n\n{strategies}\n\n{tables}\n",
        encoding="utf-8",
    )
    (args.out / "summary.json").write_text(
        json.dumps({"reference": reference, "rows": summary(rows, reference), "wall_time_s": elapsed}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(f"report: {report}")
    return 0


def _settings_table(settings: list[dict]) -> str:
    if not settings:
        return "No tuned method."
    lines = ["| scenario | fold | method | setting |", "|---|---|---|---|"]
    for entry in settings:
        chosen = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("scenario", "fold", "method"))
        lines.append(f"| {entry['scenario']} | {entry['fold']} | {entry['method']} | {chosen} |")
    return "\n".join(lines)


def _bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="fit", dynamic_ncols=True, disable=None)


def cmd_train(args: argparse.Namespace) -> int:
    from training import model as M
    from training.distributed import Ranks, process_group
    from training.learners import learner_config
    from training.pipeline import JobConfig, train_and_export

    _set_threads(args)
    ranks = Ranks.from_environment()  # torchrun's RANK / WORLD_SIZE; one process without them
    config = JobConfig(
        model=M.served_config(
            kind=args.model,
            factors=args.factors,
            attribute_prior=args.attribute_prior,
            engagement_factors=args.engagement_factors if args.model == "bias_factor" else 0,
            memory_slots=args.memory_slots if args.learner == "memory" else 0,
            engagement_id_dropout=args.engagement_id_dropout,
        ),
        learner=args.learner,
        inner=learner_config(args.learner, steps=args.inner_steps),
        train=train_config_from(args),
        max_valid_users=args.max_valid_users,
    )
    workdir = args.workdir or (args.repository / ".work" / args.name)
    with process_group(ranks) as collective:
        dataset = load_from_args(args)
        result = train_and_export(
            dataset,
            args.repository,
            args.name,
            config,
            workdir=workdir,
            progress=not args.no_progress,
            version=args.version,
            collective=collective,
        )
    if result is None:  # not rank 0: rank 0 exported, and reports
        return 0
    if args.pushgateway:
        from training.ops import push_summary

        push_summary(args.pushgateway, args.name, result.summary)
    print(f"artifact: {result.export.path}")
    return 0


def cmd_inspect_memory(args: argparse.Namespace) -> int:
    """Prints the memory report (training.memory.inspect) of an artifact for the dataset's users."""
    import numpy as np

    from training import memory
    from training.batching import EncodedCatalog, task_batches
    from training.export import load_exported_model
    from training.splits import Task
    from training.trainer import loss_kind_of

    if args.support_size < 0:
        raise UsageError("--support-size must be >= 0")
    model = load_exported_model(args.artifact)
    if not model.model_config.memory_slots:
        raise ValueError(f"{args.artifact}: this model has no memory (train it with --learner memory)")
    dataset = load_from_args(args)
    catalog = EncodedCatalog(model.schema, dataset)
    users, rows = dataset.factorized("user_ids")
    tasks = []
    order = np.lexsort((dataset.timestamps, rows))
    for user_index in range(len(users)):
        mine = order[rows[order] == user_index][: args.support_size]
        items = dataset.item_ids[mine]
        tasks.append(Task(str(users[user_index]), items, dataset.labels[mine].astype(np.float64), items[:0], dataset.labels[mine][:0]))
    batches = [batch for _, batch in task_batches(catalog, tasks, 512)]
    print(memory.inspect(model.model_config, model.schema, model.params, batches, loss_kind_of(model.label)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.distributed import Ranks
    from training.pipeline import export_checkpoint

    if not Ranks.from_environment().is_main:  # started by torchrun: one export, by rank 0
        return 0
    dataset = load_from_args(args)
    result = export_checkpoint(args.checkpoint, dataset, args.repository, args.name, version=args.version)
    print(f"artifact: {result.path}")
    return 0


def cmd_refresh_catalog(args: argparse.Namespace) -> int:
    from training.export import next_version
    from training.refresh import read_ids, read_items_csv, refresh_catalog

    model_dir = args.repository / args.name
    source = args.from_version or str(int(next_version(model_dir)) - 1)
    if source == "0":
        raise FileNotFoundError(f"{model_dir} holds no version to refresh")
    added = read_items_csv(args.add) if args.add else {}
    removed = read_ids(args.remove) if args.remove else []
    result = refresh_catalog(model_dir / source, added, removed, version=args.version, allow_unknown_values=args.allow_unknown_values)
    print(f"artifact: {result.path} ({result.added} items added, {result.removed} removed, {result.wall_time_s:.2f} s)")
    return 0


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmstart-train",
        description="Offline side of warmstart: evaluate cold-start methods honestly, meta-train a "
        "user-preference model, and export it as an artifact the service can load.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every validation evaluation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("splits", help="build (or check) the seeded cold-start splits and write them to disk")
    add_dataset_arguments(p)
    add_protocol_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the user folds")
    p.add_argument("--out", type=Path, default=Path("runs/splits"), help="where split files go")
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser(
        "evaluate",
        help="run baselines and meta-learners on the cold-start splits; write a Markdown report with plots",
    )
    add_dataset_arguments(p)
    add_protocol_arguments(p)
    add_training_arguments(p)
    p.add_argument(
        "--protocol",
        choices=("rating", "topn", "onboarding"),
        default="rating",
        help="rating: predict each test user's query ratings; topn: rank the whole catalog for them (training/topn.py); "
        "onboarding: choose K items to ask each test user, then score the rest (training/onboarding_eval.py)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated (default: {DEFAULT_METHODS}; topn: {DEFAULT_TOPN_METHODS}; onboarding: random,popular,melu,dopt)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help=f"method every other is compared with (paired 95%% CI; default: baseline_only; topn: {DEFAULT_TOPN_REFERENCE}; onboarding: popular)",
    )
    p.add_argument("--support-sizes", default=None, help="support sizes K to evaluate at (default: 1,3,5,10,20,all; topn: 0,1,3,5,10,20; onboarding: items asked, 3,5,10)")
    p.add_argument(
        "--liked-threshold",
        type=float,
        default=None,
        help="topn, rating data: a later rating at least this high is 'liked' (default: 3/4 up the label range, 4 on 1-5)",
    )
    p.add_argument(
        "--engagement-id-dropout",
        type=float,
        default=0.0,
        help="topn: warmstart and memory train their engagement head hiding this share of item ids "
        "(train --engagement-id-dropout; default 0, the served model)",
    )
    p.add_argument("--only-folds", default="", help="comma-separated folds to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="report directory")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="meta-train on all users (a validation share stops early) and export an artifact")
    add_dataset_arguments(p)
    add_training_arguments(p)
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository (artifacts go to <repository>/<name>/<version>)")
    p.add_argument("--name", default="warmstart", help="model name")
    p.add_argument("--version", default=None, help="version to write (default: one above the highest present)")
    p.add_argument("--model", choices=("bias_factor", "mlp"), default="bias_factor", help="model structure")
    from training import model as M

    served = M.served_config()
    p.add_argument("--factors", type=int, default=served.factors, help=f"bias_factor: rating factor dimension (default {served.factors})")
    p.add_argument(
        "--engagement-factors",
        type=int,
        default=served.engagement_factors,
        help=f"bias_factor: engagement head dimension, what Recommend ranks by (default {served.engagement_factors}; 0 = none)",
    )
    p.add_argument(
        "--engagement-id-dropout",
        type=float,
        default=served.engagement_id_dropout,
        help="bias_factor: share of the catalog whose item ids the engagement head's training hides each "
        f"meta-step, so that items are also ranked by their attributes (new items); default {served.engagement_id_dropout:g}",
    )
    p.add_argument(
        "--attribute-prior",
        choices=("on", "off", "tune"),
        default=served.attribute_prior,
        help="bias_factor: shrink items toward what their attributes predict (on), toward the mean (off), "
        f"or let the validation users choose its weight (tune); default {served.attribute_prior}",
    )
    p.add_argument(
        "--learner",
        choices=("warmstart", "memory", "maml", "fomaml", "metasgd", "none"),
        default="warmstart",
        help="meta-learner (memory: the served model plus a learned memory of earlier users, training/memory.py)",
    )
    from training.learners import MEMORY_SLOTS

    p.add_argument("--memory-slots", type=int, default=MEMORY_SLOTS, help=f"--learner memory: slots of the memory (default {MEMORY_SLOTS})")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoints and logs (default: <repository>/.work/<name>); a rerun resumes")
    p.add_argument(
        "--max-valid-users",
        type=int,
        default=2000,
        help="most validation users (a seeded sample of 10%% of the eligible users; the rest train)",
    )
    p.add_argument("--pushgateway", default=None, help="Prometheus Pushgateway URL to push the job's summary to")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "inspect-memory",
        help="what a memory learner's artifact learned: its slots by attention mass, and which user attributes map to which slots",
    )
    add_dataset_arguments(p)
    p.add_argument("--artifact", type=Path, required=True, help="artifact directory (<repository>/<name>/<version>) of a `train --learner memory` run")
    p.add_argument("--support-size", type=int, default=0, help="read the memory for every user with their first K interactions (default 0: attributes only)")
    p.set_defaults(func=cmd_inspect_memory)

    p = sub.add_parser("export", help="export a training checkpoint (a finished or interrupted run) as an artifact")
    add_dataset_arguments(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory of a training run")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--name", default="warmstart", help="model name")
    p.add_argument("--version", default=None, help="version to write (default: one above the highest present)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "refresh-catalog",
        help="write a new version of an artifact with catalog items added (encoded from their attributes) or removed, without retraining",
    )
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--name", default="warmstart", help="model name")
    p.add_argument("--from-version", default=None, help="version to start from (default: the highest integer version)")
    p.add_argument("--version", default=None, help="version to write (default: one above the highest present)")
    p.add_argument("--add", type=Path, default=None, help="CSV of items to add: header item_id,<attribute>,...; multi-valued values joined by |")
    p.add_argument("--remove", type=Path, default=None, help="file of item ids to remove, one per line")
    p.add_argument(
        "--allow-unknown-values",
        action="store_true",
        help="encode attribute values outside the vocabulary as out-of-vocabulary instead of refusing them",
    )
    p.set_defaults(func=cmd_refresh_catalog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from training.distributed import Ranks

    try:
        ranks = Ranks.from_environment()
    except ValueError as error:
        print(f"warmstart-train {args.command}: error: {error}", file=sys.stderr)
        return 2
    where = f" rank {ranks.rank}/{ranks.world_size}" if ranks.world_size > 1 else ""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("training").setLevel(logging.INFO)
        logging.getLogger("training.trainer").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except UsageError as error:
        parser.error(str(error))
    except (DataError, ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"warmstart-train {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"warmstart-train {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the job must fail loudly and clearly, with the detail in the log
        log.exception("unexpected failure")
        print(f"warmstart-train {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
