"""Simulated onboarding, the harness's protocol for the Onboard RPC's strategies.

For each held-out (test-fold) user, each strategy picks K items to ask among items the user
actually rated (the usual offline proxy: an answer is only known for those), starting from
no interactions; the user "answers" with their ratings, the model adapts to those K
answers, and is scored: RMSE on the scored ratings, and Recall@20 / nDCG@20 of the
engagement ranking over the whole catalog minus the asked items (relevant = the scored
items), as in training.topn. Two protocols, on the same users (PROTOCOL_HELP): ``remaining``
scores the items that were not asked, ``held_out`` keeps each user's last query-size items
out of the pool and scores those. Selections are nested (K = 3 is the first 3 of K = 10),
every strategy sees the same users, and the comparison with `popular` (training interaction
counts) is paired per user.

The model is the served one, trained per fold; the selection is warmstart.onboarding on
training.onboarding's item vectors and prior, the same function the service runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from training import model as M
from training.batching import EncodedCatalog
from training.dataset import Dataset
from training.harness import fit_context
from training.metrics import mean_ci, paired_difference_ci, rmse_ci, rmse_difference_ci
from training.onboarding import item_vectors, onboarding_prior
from training.splits import Split, Task, user_rows
from training.topn import Ranker, relevance_matrix, top_n, topn_metrics
from training.trainer import AdaptedModel, TrainConfig
from warmstart import onboarding as O

log = logging.getLogger(__name__)

ONBOARDING_SIZES: tuple[int, ...] = (3, 5, 10)
ONBOARDING_CUTOFF = 20
STRATEGY_HELP = {
    "random": "uniformly random among the user's rated items (seeded per fold and user)",
    "popular": "most training interactions first (the reference)",
    "melu": "MeLU-style: rating-head gradient norm per unit residual x knowledge weight",
    "dopt": "greedy D-optimal design on the inner loop's item vectors, weighted by the knowledge weight",
    "dopt_rating": "diagnostic: dopt counting the rating head's information only",
    "dopt_engagement": "diagnostic: dopt counting the engagement head's information only",
}
DEFAULT_STRATEGIES = ("random", "popular", "melu", "dopt")
DEFAULT_REFERENCE = "popular"


def parse_onboarding_sizes(text: str) -> tuple[int, ...]:
    """'3,5,10' -> (3, 5, 10): distinct positive numbers of asked items."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit() and int(part) > 0):
            raise ValueError(f"a number of asked items must be a positive integer, got {part!r}")
        sizes.append(int(part))
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"numbers of asked items must be distinct, got {text!r}")
    return tuple(sorted(sizes))


PROTOCOLS = ("held_out", "remaining")
PROTOCOL_HELP = {
    "held_out": "asked among the user's earlier items; scored on their last query-size items, the same for every strategy",
    "remaining": "asked among all the user's items; scored on the items not asked (a different set per strategy)",
}


@dataclass
class _User:
    user: str
    pool: np.ndarray  # (n,) catalog positions of the distinct items the user rated, in time order (first rating)
    labels: np.ndarray  # (n,) their ratings


def _users(dataset: Dataset, ranker: Ranker, users: Sequence[str], enough: int) -> list[_User]:
    """The test users with more than `enough` distinct rated items (every strategy alike)."""
    histories = user_rows(dataset)
    out = []
    for user in users:
        rows = histories[user]
        _, first = np.unique(dataset.item_ids[rows], return_index=True)
        order = np.sort(first)  # time order of the first interaction with each item
        if order.size <= enough:
            continue
        pool = np.array([ranker.index[i] for i in dataset.item_ids[rows[order]]], dtype=np.int64)
        out.append(_User(user, pool, dataset.labels[rows[order]].astype(np.float64)))
    return out


def simulate_onboarding(
    dataset: Dataset,
    splits: Sequence[Split],
    fit_model: Callable[[object], tuple[AdaptedModel, EncodedCatalog]],
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    sizes: Sequence[int] = ONBOARDING_SIZES,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Per-user rows {protocol, fold, asked, strategy, user, n_scored, se, recall@20, ndcg@20}.

    Two protocols on the same users (PROTOCOL_HELP): ``remaining`` is the usual proxy (ask
    among everything the user rated, score the rest), but what is left to score depends on
    what was asked (asking the popular items removes the easiest hits from the relevant
    set), so its Recall@20 compares strategies on different targets; ``held_out`` keeps
    each user's last `protocol.query_size` items out of the pool and scores every strategy
    on them. fit_model(context) trains the model of a split (training.harness.fit_context)
    and returns it with its encoded catalog.
    """
    unknown = [s for s in strategies if s not in STRATEGY_HELP]
    if unknown:
        raise ValueError(f"unknown onboarding strategies {unknown}; choose from {', '.join(STRATEGY_HELP)}")
    if dataset.label.kind != "rating":
        raise ValueError("simulated onboarding asks for ratings: it needs rating data")
    sizes = tuple(sorted(sizes))
    largest = sizes[-1]
    rows: list[dict] = []
    for split in splits:
        held = split.protocol.query_size
        context = fit_context(dataset, split, (0, *sizes), seed=split.protocol.seed + split.fold)
        ranker = Ranker.of(context)
        if progress:
            progress(f"fold {split.fold}: training")
        adapted, catalog = fit_model(context)
        catalog_rows = catalog.rows(list(ranker.items))
        vectors = item_vectors(adapted, catalog, catalog_rows)
        prior = onboarding_prior(adapted)
        users = _users(dataset, ranker, split.test_users, largest + held)
        empty = [Task(u.user, np.array([], dtype=object), np.zeros(0), np.array([], dtype=object), np.zeros(0)) for u in users]
        # The knowledge weights before any answer: engagement logits at no interactions.
        logits = adapted.score_catalog(catalog, empty, catalog_rows) if adapted.model_config.engagement_factors else None
        if progress:
            progress(f"fold {split.fold}: {len(users)} users")
        for protocol in PROTOCOLS:
            for strategy in strategies:
                asked = []
                for t, u in enumerate(users):
                    pool = u.pool[: u.pool.size - held] if protocol == "held_out" else u.pool
                    chosen = O.select(
                        strategy.split("_")[0],  # type: ignore[arg-type]
                        vectors,
                        prior,
                        largest,
                        candidates=pool,
                        engagement_logits=None if logits is None else logits[t, pool],
                        popularity=ranker.counts[pool],
                        rng=np.random.default_rng([split.protocol.seed, split.fold, t]),
                        heads=(strategy.split("_")[1],) if "_" in strategy else O.HEADS,
                    )
                    asked.append(_positions(pool, chosen.rows))
                for k in sizes:
                    tasks = []
                    for u, picks in zip(users, asked):
                        ask = picks[:k]
                        scored = np.arange(u.pool.size - held, u.pool.size) if protocol == "held_out" else np.setdiff1d(np.arange(u.pool.size), ask)
                        tasks.append(
                            Task(u.user, ranker.items[u.pool[ask]], u.labels[ask], ranker.items[u.pool[scored]], u.labels[scored])
                        )
                    for row in _score(adapted, catalog, catalog_rows, ranker, tasks, split.fold, k, strategy):
                        rows.append({"protocol": protocol, **row})
    return rows


def _positions(pool: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Positions in `pool` of the chosen catalog positions, in chosen order."""
    where = {int(p): i for i, p in enumerate(pool.tolist())}
    return np.array([where[int(c)] for c in chosen.tolist()], dtype=np.int64)


def _score(
    adapted: AdaptedModel,
    catalog: EncodedCatalog,
    catalog_rows: np.ndarray,
    ranker: Ranker,
    tasks: list[Task],
    fold: int,
    k: int,
    strategy: str,
) -> list[dict]:
    predictions = adapted.predict(catalog, tasks)
    low, high = adapted.label.min_value, adapted.label.max_value
    se = [float(np.mean((np.clip(p, low, high) - t.query_labels) ** 2)) for p, t in zip(predictions, tasks)]
    scores = adapted.score_catalog(catalog, tasks, catalog_rows)
    excluded = np.zeros(scores.shape, dtype=bool)
    for t, task in enumerate(tasks):
        excluded[t, [ranker.index[i] for i in task.support_items]] = True
    lists = top_n(scores, excluded, ranker.order, ONBOARDING_CUTOFF)
    metrics = topn_metrics(lists, relevance_matrix(tasks, ranker.index, len(ranker.items)), (ONBOARDING_CUTOFF,))
    return [
        {
            "fold": fold,
            "asked": k,
            "strategy": strategy,
            "user": task.user,
            "n_scored": len(task.query_items),
            "se": se[t],
            **{name: float(values[t]) for name, values in metrics.items()},
        }
        for t, task in enumerate(tasks)
    ]


def onboarding_table(rows: Sequence[dict], reference: str = DEFAULT_REFERENCE) -> str:
    """Markdown: per K and strategy, RMSE and Recall@20 (95% t intervals), and their paired
    differences from `reference` on the same users (rows of one protocol)."""
    if len({r["protocol"] for r in rows}) > 1:
        raise ValueError("one table per protocol: filter the rows first")
    recall = f"recall@{ONBOARDING_CUTOFF}"
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    sizes = sorted({r["asked"] for r in rows})
    lines = [
        f"| K asked | strategy | users | RMSE | ΔRMSE vs {reference} | Recall@{ONBOARDING_CUTOFF} | ΔRecall@{ONBOARDING_CUTOFF} vs {reference} |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in sizes:
        by = {s: sorted((r for r in rows if r["asked"] == k and r["strategy"] == s), key=lambda r: (r["fold"], r["user"])) for s in strategies}
        base = by.get(reference)
        for s in strategies:
            entries = by[s]
            se = np.array([r["se"] for r in entries])
            hits = np.array([r[recall] for r in entries])
            value, low, high = rmse_ci(se)
            r_mean, r_low, r_high = mean_ci(hits)
            if base is not None and s != reference:
                if [(r["fold"], r["user"]) for r in base] != [(r["fold"], r["user"]) for r in entries]:
                    raise ValueError(f"{s} and {reference} were not scored on the same users at K={k}")
                d, dl, dh = rmse_difference_ci(se, np.array([r["se"] for r in base]))
                h, hl, hh = paired_difference_ci(hits, np.array([r[recall] for r in base]))
                delta_rmse, delta_recall = f"{d:+.4f} [{dl:+.4f}, {dh:+.4f}]", f"{h:+.4f} [{hl:+.4f}, {hh:+.4f}]"
            else:
                delta_rmse = delta_recall = "—"
            lines.append(
                f"| {k} | {s} | {len(entries)} | {value:.4f} [{low:.4f}, {high:.4f}] | {delta_rmse} | "
                f"{r_mean:.4f} [{r_low:.4f}, {r_high:.4f}] | {delta_recall} |"
            )
    return "\n".join(lines)


def summary(rows: Sequence[dict], reference: str = DEFAULT_REFERENCE) -> list[dict]:
    """The table's numbers as records (summary.json)."""
    recall = f"recall@{ONBOARDING_CUTOFF}"
    out = []
    for protocol, k in sorted({(r["protocol"], r["asked"]) for r in rows}):
        cell = [r for r in rows if r["asked"] == k and r["protocol"] == protocol]
        base = sorted((r for r in cell if r["strategy"] == reference), key=lambda r: (r["fold"], r["user"]))
        for s in dict.fromkeys(r["strategy"] for r in rows):
            entries = sorted((r for r in cell if r["strategy"] == s), key=lambda r: (r["fold"], r["user"]))
            se = np.array([r["se"] for r in entries])
            hits = np.array([r[recall] for r in entries])
            record = {"protocol": protocol, "asked": k, "strategy": s, "users": len(entries), "rmse": list(rmse_ci(se)), recall: list(mean_ci(hits))}
            if base and s != reference:
                record["rmse_minus_reference"] = list(rmse_difference_ci(se, np.array([r["se"] for r in base])))
                record[f"{recall}_minus_reference"] = list(paired_difference_ci(hits, np.array([r[recall] for r in base])))
            out.append({key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in record.items()})
    return out


def served_model_fitter(train_config: TrainConfig, inner_steps: int = 5, progress: bool = False):
    """fit_model for simulate_onboarding: the served model, meta-trained as `train` does."""
    from training.learners import learner_config
    from training.methods import MetaLearnedTopN

    def fit(context) -> tuple[AdaptedModel, EncodedCatalog]:
        method = MetaLearnedTopN("warmstart", M.served_config(), learner_config("warmstart", inner_steps), replace(train_config), progress=progress)
        method.fit(context)
        assert method.model is not None and method.catalog is not None
        return method.model, method.catalog

    return fit
