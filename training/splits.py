"""Cold-start splits and few-shot tasks.

One task per user: the support set is the user's earliest interactions, the query set
their later ones, in time order, so nothing from the query leaks into the support set or
into training. Scenarios follow MeLU:

- ``new_users``: test users are held out of training entirely; the query is each test
  user's last ``query_size`` interactions.
- ``new_items``: items are split by first appearance; the newest ``new_item_fraction``
  of items and every interaction with them are held out of training. Test users are
  known users (their interactions with old items stay in training); the query is their
  last ``query_size`` interactions with new items, the support what came before.
- ``new_users_items``: both: held-out users, queried on new items.

Users eligible for evaluation (``min_interactions`` .. ``max_interactions``) are dealt
into ``folds`` seeded folds; in each split one fold is the test set and a seeded share of
the remaining eligible users validates hyper-parameters. Everybody else trains,
heavy users included. Splits are written to disk and reused, so numbers reproduce.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from training.dataset import Dataset

Scenario = Literal["new_users", "new_items", "new_users_items"]
SCENARIOS: tuple[str, ...] = ("new_users", "new_items", "new_users_items")
SPLIT_FORMAT = 1


@dataclass(frozen=True)
class Protocol:
    """How splits are made. Every default is the documented evaluation protocol."""

    scenario: Scenario = "new_users"
    min_interactions: int = 13  # users with fewer are never evaluated
    max_interactions: int = 100  # heavier users train but are never evaluated
    query_size: int = 10  # each test user's last interactions form the query
    folds: int = 5
    valid_fraction: float = 0.1  # of eligible non-test users, for tuning
    new_item_fraction: float = 0.2  # newest items by first appearance (item scenarios)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.min_interactions < 2:
            raise ValueError("min_interactions must be >= 2 (one support and one query interaction)")
        if self.max_interactions < self.min_interactions:
            raise ValueError("max_interactions must be >= min_interactions")
        if not 1 <= self.query_size < self.min_interactions:
            raise ValueError("query_size must be >= 1 and < min_interactions, so every test user has support")
        if self.folds < 2:
            raise ValueError("folds must be >= 2")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError("valid_fraction must be in (0, 1)")
        if not 0.0 < self.new_item_fraction < 1.0:
            raise ValueError("new_item_fraction must be in (0, 1)")


@dataclass
class Split:
    """One fold's partition of users (and items), bound to the data it was made from."""

    protocol: Protocol
    fold: int
    dataset: str
    dataset_fingerprint: str
    train_users: list[str]
    valid_users: list[str]
    test_users: list[str]
    new_items: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = SPLIT_FORMAT
        return d

    @staticmethod
    def from_dict(d: dict) -> "Split":
        if d.get("format") != SPLIT_FORMAT:
            raise ValueError(f"unsupported split format {d.get('format')!r} (this code reads {SPLIT_FORMAT})")
        d = dict(d)
        d.pop("format")
        d["protocol"] = Protocol(**d["protocol"])
        return Split(**d)


@dataclass(frozen=True)
class Task:
    """One user's few-shot problem: support (earliest) and query (later), time ordered."""

    user: str
    support_items: np.ndarray  # (S,) str objects
    support_labels: np.ndarray  # (S,) float64
    query_items: np.ndarray  # (Q,) str objects
    query_labels: np.ndarray  # (Q,) float64

    def with_support_size(self, k: int | None) -> "Task":
        """The same task keeping only the earliest k support interactions (None = all)."""
        if k is None or k >= len(self.support_items):
            return self
        return Task(self.user, self.support_items[:k], self.support_labels[:k], self.query_items, self.query_labels)


def time_order(dataset: Dataset) -> np.ndarray:
    """Row indices sorted by (timestamp, row): a stable, total time order."""
    return np.lexsort((np.arange(len(dataset)), dataset.timestamps))


def item_first_seen(dataset: Dataset) -> dict[str, int]:
    """The time rank at which each item first appears."""
    distinct, codes = dataset.factorized("item_ids")
    order = time_order(dataset)
    _, first_rank = np.unique(codes[order], return_index=True)  # first position of each code in time order
    return dict(zip(distinct.tolist(), first_rank.tolist()))


def newest_items(dataset: Dataset, fraction: float) -> list[str]:
    """The newest `fraction` of interacted items by first appearance (sorted ids)."""
    first = item_first_seen(dataset)
    ordered = sorted(first, key=first.__getitem__)
    count = int(round(len(ordered) * fraction))
    return sorted(ordered[len(ordered) - count :])


def user_rows(dataset: Dataset) -> dict[str, np.ndarray]:
    """Each user's interaction rows in time order."""
    users, offsets, rows = grouped_rows(dataset)
    return dict(zip(users.tolist(), np.split(rows, offsets[1:-1])))


def grouped_rows(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted user ids (U,), offsets (U + 1,), rows (N,)): user u's rows in time order are
    rows[offsets[u]:offsets[u + 1]]. One stable sort, no Python loop per interaction."""
    users, codes = dataset.factorized("user_ids")
    order = time_order(dataset)
    rows = order[np.argsort(codes[order], kind="stable")]
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=len(users)), out=offsets[1:])
    return users, offsets, rows


def _task_rows(rows: np.ndarray, new_row: np.ndarray | None, query_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(support rows, query rows) of one user's time-ordered rows.

    Without new items the query is the last `query_size` interactions. With new items it
    is the last `query_size` interactions with new items, and the support is every
    old-item interaction before the first of them (the model cannot know new items).
    """
    if new_row is None:
        return rows[:-query_size], rows[-query_size:]
    is_new = new_row[rows]
    positions = np.flatnonzero(is_new)[-query_size:]
    if len(positions) == 0:
        return rows[:0], rows[:0]
    before = np.arange(positions[0])
    return rows[before[~is_new[before]]], rows[positions]


def _new_rows(dataset: Dataset, new_items: Sequence[str]) -> np.ndarray | None:
    """Which rows are interactions with a new item (None when no item is new)."""
    return _member(dataset, "item_ids", new_items) if len(new_items) else None


def _eligible_users(dataset: Dataset, protocol: Protocol, new_items: Sequence[str]) -> list[str]:
    eligible = []
    new_row = _new_rows(dataset, new_items)
    for user, r in user_rows(dataset).items():
        if not protocol.min_interactions <= len(r) <= protocol.max_interactions:
            continue
        support, query = _task_rows(r, new_row, protocol.query_size)
        if len(support) and len(query):
            eligible.append(user)
    return sorted(eligible)


def make_splits(dataset: Dataset, protocol: Protocol) -> list[Split]:
    """All `protocol.folds` splits, deterministic for the protocol's seed."""
    new_items: list[str] = []
    if protocol.scenario != "new_users":
        new_items = newest_items(dataset, protocol.new_item_fraction)
    eligible = _eligible_users(dataset, protocol, new_items)
    if len(eligible) < protocol.folds * 2:
        raise ValueError(
            f"only {len(eligible)} users have {protocol.min_interactions}-{protocol.max_interactions} "
            f"interactions: too few for {protocol.folds} folds"
        )
    rng = np.random.default_rng(protocol.seed)
    shuffled = [eligible[i] for i in rng.permutation(len(eligible))]
    folds = [sorted(shuffled[f :: protocol.folds]) for f in range(protocol.folds)]
    all_users = dataset.factorized("user_ids")[0].tolist()
    fingerprint = dataset.fingerprint()  # once: it hashes every row
    splits = []
    for f in range(protocol.folds):
        test = folds[f]
        rest = [u for g, fold in enumerate(folds) if g != f for u in fold]
        fold_rng = np.random.default_rng([protocol.seed, f])
        n_valid = max(1, int(round(len(rest) * protocol.valid_fraction)))
        valid = sorted(rest[i] for i in fold_rng.permutation(len(rest))[:n_valid])
        # new_items evaluates known users: validation and test users keep their old-item
        # interactions in training (only new items are withheld, by training_rows).
        held = set() if protocol.scenario == "new_items" else set(valid) | set(test)
        train = [u for u in all_users if u not in held]
        splits.append(
            Split(
                protocol=protocol,
                fold=f,
                dataset=dataset.name,
                dataset_fingerprint=fingerprint,
                train_users=train,
                valid_users=valid,
                test_users=test,
                new_items=new_items,
            )
        )
    return splits


def save_splits(splits: Sequence[Split], directory: Path) -> None:
    """Writes one JSON file per fold (split-<fold>.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in splits:
        path = directory / f"split-{split.fold}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(split.to_dict(), indent=1, sort_keys=True))
        tmp.replace(path)


def load_splits(directory: Path, dataset: Dataset, protocol: Protocol) -> list[Split]:
    """Reads the splits written by save_splits, refusing ones made from other data or settings."""
    splits = []
    for f in range(protocol.folds):
        path = directory / f"split-{f}.json"
        split = Split.from_dict(json.loads(path.read_text()))
        if split.dataset_fingerprint != dataset.fingerprint():
            raise ValueError(f"{path}: made from different data (fingerprint mismatch); delete it to rebuild")
        if split.protocol != protocol:
            raise ValueError(f"{path}: made with protocol {split.protocol}, asked for {protocol}")
        splits.append(split)
    return splits


def load_or_make_splits(dataset: Dataset, protocol: Protocol, directory: Path | None) -> list[Split]:
    """Reuses splits on disk when present, else makes and (if a directory is given) saves them."""
    if directory is not None and (directory / "split-0.json").exists():
        return load_splits(directory, dataset, protocol)
    splits = make_splits(dataset, protocol)
    if directory is not None:
        save_splits(splits, directory)
    return splits


def training_rows(dataset: Dataset, split: Split, users: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of the interactions a model may learn from in this split.

    Training users' interactions, minus every interaction with a held-out new item.
    In the new-items scenario test users are known users, so their old-item
    interactions stay in training; only their query (new items) is withheld.
    """
    mask = _member(dataset, "user_ids", split.train_users if users is None else users)
    if split.new_items:
        mask &= ~_member(dataset, "item_ids", split.new_items)
    return mask


def _member(dataset: Dataset, column: str, ids: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows whose id in `column` is one of `ids` (one lookup per distinct id)."""
    distinct, codes = dataset.factorized(column)  # type: ignore[arg-type]
    wanted = set(ids)
    return np.fromiter((d in wanted for d in distinct.tolist()), bool, len(distinct))[codes]


def build_tasks(dataset: Dataset, split: Split, users: Sequence[str]) -> list[Task]:
    """The evaluation task of each user (support pool = everything usable before the query)."""
    rows = user_rows(dataset)
    new_row = _new_rows(dataset, split.new_items)
    tasks = []
    for user in users:
        support, query = _task_rows(rows[user], new_row, split.protocol.query_size)
        if not len(support) or not len(query):
            raise ValueError(f"user {user!r} has no support or no query under {split.protocol}")
        tasks.append(
            Task(
                user=user,
                support_items=dataset.item_ids[support],
                support_labels=dataset.labels[support].astype(np.float64),
                query_items=dataset.item_ids[query],
                query_labels=dataset.labels[query].astype(np.float64),
            )
        )
    return tasks
