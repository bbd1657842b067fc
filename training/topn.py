"""The top-N protocol: rank the whole catalog for each new user, as Recommend does.

Same seeded user folds and splits as the rating protocol (training.splits). For each test
user and each support size K:

- support = the user's first K interactions in time order (labels kept);
- relevant = the user's later interactions (every one after the first K), de-duplicated,
  minus items already in the support. Two sections for rating data: ``later`` (every later
  interaction) and ``liked`` (later ratings >= a threshold, by default the rating 3/4 up
  the label range: 4 on a 1-5 scale). Click data has one: later positive clicks. In the
  scenarios with withheld new items only later interactions with those new items count,
  because the user's other interactions are training data there;
- a user with no relevant item at a K is left out at that K, for every method alike, so
  comparisons stay paired;
- candidates = every catalog item (every item the dataset knows, the served catalog, new
  items included) not in the support; in the scenarios with withheld new items, the new
  items not in the support (a product's "new arrivals" shelf, what Recommend serves when
  it is sent those items as candidates). Ranked against the whole catalog there, no
  method measured on MovieLens-100K put a single new item in any user's top 20 (trained
  items outranked every item known only by its attributes), so every method scored 0 and
  the scenario said nothing. The harness masks, never the method.

Ties at the cut are broken deterministically: among equal scores the item with more
training interactions comes first, then the earlier item in catalog (sorted id) order. A
method with no information (all scores equal, e.g. item-kNN at K = 0) thus returns the
most-popular list, the fallback a practitioner would ship.

Metrics per user: Recall@N = hits / min(N, |relevant|); nDCG@N with binary gains and the
ideal of min(N, |relevant|) hits at the top; popularity@20 = the mean popularity
percentile (training counts) of the user's top 20. Per method and K, catalog coverage@20 =
distinct items in the top-20 lists of all evaluated users / catalog size.

A top-N method has `name`, `fit(context)` (the rating harness's FitContext) and
`score_catalog(tasks, items)`, which returns a (len(tasks), len(items)) float matrix,
higher = better. Tasks carry the K-sized support and the relevant items as
query_items / query_labels: methods must not look at the query. A method may expose
`chosen`, a dict of the hyper-parameters its tuning picked, for the report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol as TypingProtocol, Sequence

import numpy as np

from training.dataset import Dataset
from training.harness import FitContext, fit_context
from training.splits import Split, Task, user_rows

log = logging.getLogger(__name__)

TOPN_SUPPORT_SIZES: tuple[int, ...] = (0, 1, 3, 5, 10, 20)
CUTOFFS: tuple[int, ...] = (10, 20)
COVERAGE_CUTOFF = 20
TUNING_CUTOFF = 20  # validation objective: mean Recall@20 over the support sizes
LIKED_FRACTION = 0.75  # default "liked" threshold: this far up the rating range (4 on 1-5)


class TopNMethod(TypingProtocol):
    name: str

    def fit(self, context: FitContext) -> None: ...

    def score_catalog(self, tasks: Sequence[Task], items: np.ndarray) -> np.ndarray: ...


# --- Catalog, relevance, tasks --------------------------------------------------------


def catalog_items(dataset: Dataset) -> np.ndarray:
    """Every item the dataset knows, sorted: the served catalog (str objects)."""
    ids = sorted(set(dataset.items.values) | set(dataset.item_ids.tolist()))
    return np.array(ids, dtype=object)


def default_liked_threshold(dataset: Dataset) -> float:
    """The rating 3/4 up the label range (4 on a 1-5 scale, 3.875 on 0.5-5)."""
    label = dataset.label
    return label.min_value + LIKED_FRACTION * (label.max_value - label.min_value)


@dataclass(frozen=True)
class Relevance:
    """Which later interactions count as relevant: labels >= min_label (None: every one)."""

    name: str  # "later", "liked" or "clicked"
    min_label: float | None

    def section(self, scenario: str) -> str:
        """The report section (the rows' "scenario" value) of this relevance."""
        if self.name != "liked":
            return scenario
        return f"{scenario} ({self.name}: label >= {self.min_label:g})"


def relevances(dataset: Dataset, liked_threshold: float | None = None) -> list[Relevance]:
    """The relevance sections of a dataset; the first is primary (tuning, the main table)."""
    label = dataset.label
    if label.kind == "click":
        if liked_threshold is not None:
            raise ValueError("a liked threshold is for rating data; click data counts positive clicks")
        return [Relevance("clicked", 0.5)]
    threshold = default_liked_threshold(dataset) if liked_threshold is None else float(liked_threshold)
    if not label.min_value < threshold <= label.max_value:
        raise ValueError(
            f"liked threshold {threshold:g} must lie in ({label.min_value:g}, {label.max_value:g}] (the rating range)"
        )
    return [Relevance("later", None), Relevance("liked", threshold)]


def build_topn_tasks(
    dataset: Dataset,
    split: Split,
    users: Sequence[str],
    k: int,
    relevance: Relevance,
    histories: dict[str, np.ndarray] | None = None,
) -> list[Task]:
    """Top-N tasks at support size k (see the module docstring); users with nothing relevant are left out.

    `histories` (training.splits.user_rows of the dataset) can be passed to save recomputing it.
    """
    if k < 0:
        raise ValueError(f"support size must be >= 0, got {k}")
    rows_of = user_rows(dataset) if histories is None else histories
    new_items = set(split.new_items)
    tasks = []
    for user in users:
        if user not in rows_of:
            raise ValueError(f"user {user!r} has no interactions in {dataset.name}")
        rows = rows_of[user]
        support, later = rows[:k], rows[k:]
        support_items = dataset.item_ids[support]
        seen = set(support_items.tolist())
        relevant_items, relevant_labels = [], []
        for item, label in zip(dataset.item_ids[later], dataset.labels[later]):
            if item in seen:
                continue
            if relevance.min_label is not None and label < relevance.min_label:
                continue
            if new_items and item not in new_items:
                continue
            seen.add(item)
            relevant_items.append(item)
            relevant_labels.append(float(label))
        if not relevant_items:
            continue
        tasks.append(
            Task(
                user=user,
                support_items=support_items,
                support_labels=dataset.labels[support].astype(np.float64),
                query_items=np.array(relevant_items, dtype=object),
                query_labels=np.array(relevant_labels, dtype=np.float64),
            )
        )
    return tasks


# --- Ranking and metrics --------------------------------------------------------------


def positive_counts(train: Dataset, items: np.ndarray) -> np.ndarray:
    """Training interactions per catalog item (positive clicks only for click data)."""
    index = {item: j for j, item in enumerate(items)}
    keep = train.labels > 0 if train.label.kind == "click" else np.ones(len(train), bool)
    columns = np.fromiter((index[i] for i in train.item_ids[keep]), np.int64, int(keep.sum()))
    return np.bincount(columns, minlength=len(items)).astype(np.float64)


def tie_order(counts: np.ndarray) -> np.ndarray:
    """Catalog positions in tie-breaking order: more training interactions first, then position."""
    return np.lexsort((np.arange(len(counts)), -counts))


def popularity_percentiles(counts: np.ndarray) -> np.ndarray:
    """Each item's popularity percentile in the catalog: 100 * (items with fewer
    interactions + half the other items with as many) / (catalog size - 1)."""
    n = len(counts)
    if n < 2:
        return np.full(n, 50.0)
    sorted_counts = np.sort(counts)
    less = np.searchsorted(sorted_counts, counts, side="left")
    equal = np.searchsorted(sorted_counts, counts, side="right") - less - 1
    return 100.0 * (less + 0.5 * equal) / (n - 1)


def _membership(tasks: Sequence[Task], index: dict[str, int], n_items: int, relevant: bool) -> np.ndarray:
    """(T, C) bool: True where a catalog item is among the task's support items (or, with
    `relevant`, its query: the relevant items)."""
    what = "relevant" if relevant else "support"
    matrix = np.zeros((len(tasks), n_items), dtype=bool)
    for t, task in enumerate(tasks):
        for item in task.query_items if relevant else task.support_items:
            j = index.get(item)
            if j is None:
                raise ValueError(f"{what} item {item!r} of user {task.user!r} is not in the catalog")
            matrix[t, j] = True
    return matrix


def support_mask(tasks: Sequence[Task], index: dict[str, int], n_items: int) -> np.ndarray:
    """(T, C) bool: True where a catalog item is in the task's support."""
    return _membership(tasks, index, n_items, relevant=False)


def top_n(scores: np.ndarray, excluded: np.ndarray, order: np.ndarray, n: int) -> np.ndarray:
    """(T, n) catalog positions of each row's n best non-excluded items, best first.

    Ties go to the item earlier in `order` (see tie_order). Rows with fewer than n
    candidates are padded with -1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != excluded.shape:
        raise ValueError(f"scores have shape {scores.shape}, expected {excluded.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    permuted = np.where(excluded[:, order], -np.inf, scores[:, order])
    best = np.argsort(-permuted, axis=1, kind="stable")[:, :n]  # stable: earlier in `order` wins a tie
    chosen = order[best]
    chosen[np.take_along_axis(permuted, best, axis=1) == -np.inf] = -1
    if chosen.shape[1] < n:  # a catalog smaller than n
        chosen = np.pad(chosen, ((0, 0), (0, n - chosen.shape[1])), constant_values=-1)
    return chosen


def relevance_matrix(tasks: Sequence[Task], index: dict[str, int], n_items: int) -> np.ndarray:
    """(T, C) bool: True where a catalog item is relevant to the task (its query)."""
    return _membership(tasks, index, n_items, relevant=True)


def topn_metrics(lists: np.ndarray, relevant: np.ndarray, cutoffs: Sequence[int] = CUTOFFS) -> dict[str, np.ndarray]:
    """Per-user Recall@N and nDCG@N (binary gain) of ranked lists against relevance.

    lists: (T, L) catalog positions (-1 = no item), L >= max(cutoffs);
    relevant: (T, C) bool. Recall@N = hits / min(N, |relevant|); nDCG@N = DCG / ideal DCG,
    the ideal having min(N, |relevant|) hits at the top. Users with nothing relevant get NaN.
    """
    if lists.shape[1] < max(cutoffs):
        raise ValueError(f"lists hold {lists.shape[1]} items, fewer than the cut-off {max(cutoffs)}")
    n_relevant = relevant.sum(axis=1)
    safe = np.where(lists >= 0, lists, 0)
    hits = np.take_along_axis(relevant, safe, axis=1) & (lists >= 0)  # (T, L)
    discounts = 1.0 / np.log2(np.arange(2, lists.shape[1] + 2, dtype=np.float64))
    ideal_cumulative = np.cumsum(discounts)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for n in cutoffs:
            ideal_hits = np.minimum(n, n_relevant)
            found = hits[:, :n].sum(axis=1)
            out[f"recall@{n}"] = np.where(n_relevant > 0, found / ideal_hits, np.nan)
            dcg = (hits[:, :n] * discounts[:n]).sum(axis=1)
            ideal = np.where(ideal_hits > 0, ideal_cumulative[np.maximum(ideal_hits, 1) - 1], np.nan)
            out[f"ndcg@{n}"] = dcg / ideal
    return out


def mean_popularity(lists: np.ndarray, percentiles: np.ndarray, n: int = COVERAGE_CUTOFF) -> np.ndarray:
    """Per-user mean popularity percentile of the items in the top n (NaN for an empty list)."""
    head = lists[:, :n]
    valid = head >= 0
    values = np.where(valid, percentiles[np.where(valid, head, 0)], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return values.sum(axis=1) / valid.sum(axis=1)


# --- Scoring a method -----------------------------------------------------------------


@dataclass
class Ranker:
    """The catalog of one split and how its ties are broken; turns scores into lists."""

    items: np.ndarray  # (C,) catalog item ids, str objects
    counts: np.ndarray  # (C,) training interactions per item
    candidates: np.ndarray | None = None  # (C,) bool: the items a list may hold (None = all)
    index: dict[str, int] = field(init=False)
    order: np.ndarray = field(init=False)
    percentiles: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.index = {item: j for j, item in enumerate(self.items)}
        self.order = tie_order(self.counts)
        self.percentiles = popularity_percentiles(self.counts)
        if self.candidates is not None:
            self.candidates = np.asarray(self.candidates, dtype=bool)
            if self.candidates.shape != self.items.shape or not self.candidates.any():
                raise ValueError(f"candidates must be a non-empty ({len(self.items)},) bool mask of the catalog")

    @property
    def n_candidates(self) -> int:
        return len(self.items) if self.candidates is None else int(self.candidates.sum())

    @staticmethod
    def of(context: FitContext) -> "Ranker":
        """The split's catalog; with withheld new items (and a split), only they are candidates."""
        items = catalog_items(context.dataset)
        candidates = None
        new_items = set(context.split.new_items) if context.split is not None else set()
        if new_items:
            candidates = np.fromiter((item in new_items for item in items.tolist()), bool, len(items))
        return Ranker(items, positive_counts(context.train, items), candidates)

    def lists(self, method: TopNMethod, tasks: Sequence[Task], n: int = COVERAGE_CUTOFF) -> np.ndarray:
        """(T, n) catalog positions each task's top n, the support masked out."""
        if not tasks:
            return np.zeros((0, n), dtype=np.int64)
        scores = np.asarray(method.score_catalog(tasks, self.items), dtype=np.float64)
        expected = (len(tasks), len(self.items))
        if scores.shape != expected:
            raise RuntimeError(f"{method.name}: score_catalog returned shape {scores.shape}, expected {expected}")
        if not np.all(np.isfinite(scores)):
            raise RuntimeError(f"{method.name}: score_catalog returned non-finite scores")
        excluded = support_mask(tasks, self.index, len(self.items))
        if self.candidates is not None:
            excluded |= ~self.candidates
        return top_n(scores, excluded, self.order, n)


@dataclass
class Validation:
    """Top-N validation tasks of a FitContext (validation users, primary relevance): the tuning set."""

    ranker: Ranker
    tasks: dict[int, list[Task]]  # per support size

    @staticmethod
    def of(context: FitContext, support_sizes: Sequence[int] | None = None) -> "Validation":
        sizes = _topn_sizes(context.support_sizes if support_sizes is None else support_sizes)
        primary = relevances(context.dataset)[0]
        histories = user_rows(context.dataset)
        tasks = {
            k: build_topn_tasks(context.dataset, context.split, context.split.valid_users, k, primary, histories)
            for k in sizes
        }
        return Validation(Ranker.of(context), tasks)

    def recall(self, method: TopNMethod, cutoff: int = TUNING_CUTOFF) -> float:
        """Mean over support sizes of the mean validation Recall@cutoff."""
        per_k = []
        for tasks in self.tasks.values():
            if not tasks:
                continue
            lists = self.ranker.lists(method, tasks, cutoff)
            relevant = relevance_matrix(tasks, self.ranker.index, len(self.ranker.items))
            per_k.append(float(np.mean(topn_metrics(lists, relevant, (cutoff,))[f"recall@{cutoff}"])))
        if not per_k:
            raise ValueError("no validation user has a relevant item at any support size: cannot tune")
        return float(np.mean(per_k))


def _topn_sizes(sizes: Sequence[int | None]) -> list[int]:
    """The integer support sizes of a context (top-N contexts carry 0, 1, 3, ...)."""
    out = [k for k in sizes if k is not None]
    if any(k < 0 for k in out) or not out:
        raise ValueError(f"top-N support sizes must be integers >= 0, got {tuple(sizes)}")
    return out


def tune(method, grid: Sequence[dict], validation: Validation, refit: Callable[[dict], None]) -> tuple[dict, dict]:
    """Tries each setting of `grid` (refit(setting), then validation Recall@20); keeps the best.

    Returns (best setting, {str(setting): score}). The method is left refitted at the best.
    """
    scores: dict[str, float] = {}
    best, best_score = None, -math.inf
    for setting in grid:
        refit(setting)
        score = validation.recall(method)
        scores[_setting_text(setting)] = score
        if score > best_score:
            best, best_score = setting, score
    assert best is not None, "empty grid"
    refit(best)
    log.info("%s: %s (validation Recall@%d %.4f)", method.name, _setting_text(best), TUNING_CUTOFF, best_score)
    return best, scores


def _setting_text(setting: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in setting.items()) or "default"


# --- The protocol ---------------------------------------------------------------------


def parse_topn_sizes(text: str) -> tuple[int, ...]:
    """'0,1,5' -> (0, 1, 5)."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()):
            raise ValueError(f"top-N support size must be an integer >= 0, got {part!r}")
        sizes.append(int(part))
    if not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"top-N support sizes must be distinct integers, got {text!r}")
    return tuple(sizes)


@dataclass
class TopNResult:
    """Per-user rows (training.report format) and the set-level coverage per (section, K, method)."""

    rows: list[dict]
    coverage: list[dict]
    catalog_size: int
    settings: list[dict]  # per (fold, method): the hyper-parameters it chose, when it reports them


def evaluate_topn(
    dataset: Dataset,
    splits: Sequence[Split],
    make_methods: Callable[[], Sequence[TopNMethod]],
    support_sizes: Sequence[int] = TOPN_SUPPORT_SIZES,
    liked_threshold: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> TopNResult:
    """Fits fresh methods on each split and ranks the catalog for every test user at every K."""
    support_sizes = tuple(_topn_sizes(support_sizes))
    sections = relevances(dataset, liked_threshold)
    histories = user_rows(dataset)
    rows: list[dict] = []
    recommended: dict[tuple[str, int, str], set[int]] = {}  # (section, K, method) -> catalog positions
    per_fold: dict[tuple[str, int, str, int], int] = {}
    settings: list[dict] = []
    catalog_size = 0
    for split in splits:
        context = fit_context(dataset, split, support_sizes, seed=split.protocol.seed + split.fold)
        ranker = Ranker.of(context)
        catalog_size = ranker.n_candidates  # the denominator of coverage
        tasks = {
            (relevance.name, k): build_topn_tasks(dataset, split, split.test_users, k, relevance, histories)
            for relevance in sections
            for k in support_sizes
        }
        for method in make_methods():
            if progress:
                progress(f"fold {split.fold}: {method.name}")
            method.fit(context)
            chosen = getattr(method, "chosen", None)
            if chosen is not None:
                settings.append({"scenario": split.protocol.scenario, "fold": split.fold, "method": method.name, **chosen})
            for k in support_sizes:
                primary = tasks[(sections[0].name, k)]
                lists = ranker.lists(method, primary, max(max(CUTOFFS), COVERAGE_CUTOFF))
                position = {task.user: t for t, task in enumerate(primary)}
                for relevance in sections:
                    section_tasks = tasks[(relevance.name, k)]
                    if not section_tasks:
                        continue
                    # every section's users are a subset of the primary section's (relevant only shrinks)
                    section_lists = lists[[position[task.user] for task in section_tasks]]
                    relevant = relevance_matrix(section_tasks, ranker.index, len(ranker.items))
                    metrics = topn_metrics(section_lists, relevant)
                    popularity = mean_popularity(section_lists, ranker.percentiles)
                    section = relevance.section(split.protocol.scenario)
                    head = section_lists[:, :COVERAGE_CUTOFF]
                    distinct = set(np.unique(head[head >= 0]).tolist())
                    recommended.setdefault((section, k, method.name), set()).update(distinct)
                    per_fold[(section, k, method.name, split.fold)] = len(distinct)
                    for t, task in enumerate(section_tasks):
                        rows.append(
                            {
                                "scenario": section,
                                "relevance": relevance.name,
                                "fold": split.fold,
                                "support_size": str(k),
                                "method": method.name,
                                "user": task.user,
                                "n_relevant": len(task.query_items),
                                **{name: float(values[t]) for name, values in metrics.items()},
                                f"popularity@{COVERAGE_CUTOFF}": float(popularity[t]),
                            }
                        )
    folds = [split.fold for split in splits]
    coverage = [
        {
            "scenario": section,
            "support_size": str(k),
            "method": method,
            f"coverage@{COVERAGE_CUTOFF}": len(items) / catalog_size,
            "per_fold": [per_fold.get((section, k, method, fold), 0) / catalog_size for fold in folds],
            "folds": folds,
        }
        for (section, k, method), items in recommended.items()
    ]
    return TopNResult(rows, coverage, catalog_size, settings)


def coverage_table(coverage: Sequence[dict], section: str) -> str:
    """Markdown table of coverage@20 (pooled over folds; per-fold range) for one section."""
    entries = [c for c in coverage if c["scenario"] == section]
    sizes = list(dict.fromkeys(c["support_size"] for c in entries))
    sizes.sort(key=int)
    methods = list(dict.fromkeys(c["method"] for c in entries))
    cell = {(c["method"], c["support_size"]): c for c in entries}
    lines = ["| method | " + " | ".join(f"K={k}" for k in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in methods:
        cells = []
        for k in sizes:
            c = cell.get((method, k))
            if c is None:
                cells.append("")
                continue
            low, high = min(c["per_fold"]), max(c["per_fold"])
            cells.append(f"{c[f'coverage@{COVERAGE_CUTOFF}']:.3f} (folds {low:.3f}–{high:.3f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- Registry -------------------------------------------------------------------------

TOPN_METHOD_HELP = {
    "popular": "most popular: training interaction counts (no personalisation)",
    "itemknn": "item-kNN: cosine on the binary user-item matrix, neighbourhood size and shrinkage tuned",
    "ease": "EASE (Steck 2019): closed-form item-item ridge, zero diagonal, lambda tuned",
    "ials": "implicit ALS (Hu, Koren & Volinsky), item factors by the implicit package, the user folded in by a ridge solve",
    "warmstart": "the served model: meta-learned engagement head (implicit fold-in in the inner loop, listwise meta-training)",
    "memory": "the served model plus a learned memory of earlier users (training.memory) personalising phi_0, meta-trained on top of it",
}
DEFAULT_TOPN_METHODS = "popular,itemknn,ease,ials,warmstart"
DEFAULT_TOPN_REFERENCE = "ease"


def make_topn_methods(
    names: Sequence[str], train_config=None, inner_steps: int = 5, progress: bool = False, model_overrides: dict | None = None
) -> list:
    """Fresh top-N method instances, in the given order.

    `train_config`, `inner_steps` and `progress` are the rating registry's arguments, for
    learned methods; the baselines do not use them. `model_overrides` change the served
    model's config (training.model.served_config) for warmstart and memory.
    """
    overrides = dict(model_overrides or {})
    from training import topn_baselines as B

    unknown = [n for n in names if n not in TOPN_METHOD_HELP]
    if unknown:
        raise ValueError(f"unknown top-N methods {unknown}; choose from {', '.join(TOPN_METHOD_HELP)}")
    served: dict = {}  # the served model trained once per split for both warmstart and memory
    out = []
    for name in names:
        if name == "popular":
            out.append(B.Popular())
        elif name == "itemknn":
            out.append(B.ItemKNN())
        elif name == "ease":
            out.append(B.EASE())
        elif name == "ials":
            out.append(B.ImplicitALS())
        elif name == "warmstart":
            from training.learners import learner_config
            from training.methods import MetaLearnedTopN
            from training.trainer import TrainConfig

            from training import model as M

            config = train_config or TrainConfig()
            keep = served if "memory" in names else None
            out.append(MetaLearnedTopN(name, M.served_config(**overrides), learner_config("warmstart", inner_steps), config, progress=progress, served=keep))
        elif name == "memory":
            from training.learners import MEMORY_SLOTS, learner_config
            from training.methods import Memory
            from training.trainer import TrainConfig

            from training import model as M

            config = train_config or TrainConfig()
            model_config = M.served_config(memory_slots=MEMORY_SLOTS, **overrides)
            out.append(Memory(name, model_config, learner_config("memory", inner_steps), config, progress=progress, served=served))
    return out
