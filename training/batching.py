"""Turning users' interactions into padded tensor batches, and sampling training episodes.

Everything is encoded once up front (every item of the dataset -> one row of codes), so a
meta-step only gathers rows: no Python work per interaction inside the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import logging

import numpy as np
import torch

from training.dataset import Dataset
from training.features import FeatureSchema, encode_users
from training.inner_loop import Batch
from training.splits import Task, grouped_rows

log = logging.getLogger(__name__)


class EncodedCatalog:
    """Every item the dataset knows, encoded once; items are addressed by row."""

    def __init__(self, schema: FeatureSchema, dataset: Dataset, extra_item_ids: Sequence[str] = ()) -> None:
        ids = sorted(set(dataset.items.values) | set(dataset.item_ids.tolist()) | set(extra_item_ids))
        self.schema = schema
        self.item_ids: list[str] = ids
        self.row_of: dict[str, int] = {item: row for row, item in enumerate(ids)}
        codes = np.zeros((len(ids) + 1, schema.item_width), dtype=np.int64)  # last row: an all-padding item
        for row, item in enumerate(ids):
            codes[row] = schema.encode_item(item, dataset.items.get(item))
        self.codes = torch.from_numpy(codes)
        self.padding_row = len(ids)
        self._users = dataset.users

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter(map(self.row_of.__getitem__, item_ids), np.int64, len(item_ids))

    def user_codes(self, user_ids: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(encode_users(self.schema, self._users, user_ids))


def pad_batch(
    catalog: EncodedCatalog,
    user_ids: Sequence[str],
    supports: Sequence[np.ndarray],
    support_labels: Sequence[np.ndarray],
    queries: Sequence[np.ndarray],
    min_support: int = 1,
) -> Batch:
    """A Batch from per-user item rows; support padded to the longest (at least min_support)."""
    b = len(user_ids)
    s = max([min_support, *(len(x) for x in supports)])
    q = max([1, *(len(x) for x in queries)])
    support_rows = np.full((b, s), catalog.padding_row, dtype=np.int64)
    query_rows = np.full((b, q), catalog.padding_row, dtype=np.int64)
    labels = np.zeros((b, s), dtype=np.float32)
    mask = np.zeros((b, s), dtype=np.float32)
    for i, (sup, lab, qry) in enumerate(zip(supports, support_labels, queries)):
        support_rows[i, : len(sup)] = sup
        labels[i, : len(sup)] = lab
        mask[i, : len(sup)] = 1.0
        query_rows[i, : len(qry)] = qry
    return Batch(
        user_features=catalog.user_codes(user_ids),
        support_items=catalog.codes[torch.from_numpy(support_rows)],
        support_labels=torch.from_numpy(labels),
        support_mask=torch.from_numpy(mask),
        query_items=catalog.codes[torch.from_numpy(query_rows)],
    )


def task_batches(catalog: EncodedCatalog, tasks: Sequence[Task], batch_size: int = 256):
    """Yields (tasks, Batch) chunks for prediction."""
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        yield chunk, pad_batch(
            catalog,
            [t.user for t in chunk],
            [catalog.rows(t.support_items) for t in chunk],
            [t.support_labels for t in chunk],
            [catalog.rows(t.query_items) for t in chunk],
        )


@dataclass(frozen=True)
class EpisodeConfig:
    """How meta-training episodes are cut from a training user's history."""

    min_support: int = 0  # smallest support size sampled (0 trains the zero-shot score too)
    max_support: int = 30  # support size drawn uniformly in [min_support, max_support] ...
    all_but_query_prob: float = 0.2  # ... or, with this probability, everything but the query
    # The query: the user's last query_size interactions, as the evaluation protocol asks
    # ("last"), or a random subset of everything after the support ("later"). "auto" picks
    # "last" when the item side is frozen (meta-training then learns only how to adapt) and
    # "later" when it learns the item side too, which needs every rating, not the last few.
    query: Literal["auto", "last", "later"] = "auto"
    query_size: int = 10  # size of the "last" query, and what all-but-query episodes leave out
    max_query: int = 64  # "later" queries: at most this many
    support_cap: int = 128  # never more support than this (the earliest interactions)
    # "last" episodes only from users with at most this many interactions (0 = everyone).
    # Heavy users still shape the item side, but their long histories are unlike the cold
    # users the inner loop is for; the evaluation protocol's cap, 100, measured best.
    max_user_interactions: int = 100

    def __post_init__(self) -> None:
        if not 0 <= self.min_support <= self.max_support:
            raise ValueError("need 0 <= min_support <= max_support")
        if not 0.0 <= self.all_but_query_prob <= 1.0:
            raise ValueError("all_but_query_prob must be in [0, 1]")
        if self.query_size < 1 or self.max_query < 1 or self.support_cap < 1:
            raise ValueError("query_size, max_query and support_cap must be positive")
        if self.query not in ("auto", "last", "later"):
            raise ValueError(f"episode query must be 'auto', 'last' or 'later', got {self.query!r}")
        if self.max_user_interactions < 0:
            raise ValueError("max_user_interactions must be >= 0")


class Episode(NamedTuple):
    """A meta-batch of episodes, with the catalog rows of its items (padding_row = none)."""

    batch: Batch
    query_labels: torch.Tensor  # (B, Q)
    query_mask: torch.Tensor  # (B, Q)
    support_rows: torch.Tensor  # (B, S) int64
    query_rows: torch.Tensor  # (B, Q) int64


class EpisodeSampler:
    """Chronological episodes: support = a user's earliest K interactions, query = later ones."""

    def __init__(self, catalog: EncodedCatalog, train: Dataset, config: EpisodeConfig, learns_item_side: bool = True) -> None:
        self.catalog = catalog
        self.config = config
        self.query = config.query if config.query != "auto" else ("later" if learns_item_side else "last")
        # Every user's history as one flat array in time order (CSR): a meta-step slices it,
        # nothing per interaction is copied or looked up again.
        users, offsets, rows = grouped_rows(train)
        lengths = np.diff(offsets)
        usable = lengths >= 2
        if not usable.any():
            raise ValueError("no training user has two or more interactions: nothing to meta-train on")
        cap = (config.max_user_interactions or None) if self.query == "last" else None
        keep = usable & (lengths <= cap) if cap is not None else usable
        if keep.sum() < max(1, int(usable.sum()) // 10):
            log.warning(
                "only %d of %d training users have at most %d interactions: episodes use every user",
                int(keep.sum()),
                int(usable.sum()),
                cap,
            )
            keep = usable
        self.users: list[str] = users[keep].tolist()  # sorted ids
        self.starts = offsets[:-1][keep]  # (U,) each user's first position in the flat arrays
        self.lengths = lengths[keep]  # (U,)
        distinct, codes = train.factorized("item_ids")
        self.flat_rows = catalog.rows(distinct.tolist())[codes[rows]]  # (N,) catalog rows, user-major, time order
        self.flat_labels = train.labels[rows].astype(np.float32)  # (N,)

    def sample(
        self, rng: np.random.Generator, batch_size: int, shard: tuple[int, int] = (0, 1)
    ) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """(batch, query_labels (B, Q), query_mask (B, Q)) for batch_size distinct users."""
        episode = self.sample_episode(rng, batch_size, shard)
        return episode.batch, episode.query_labels, episode.query_mask

    def sample_episode(self, rng: np.random.Generator, batch_size: int, shard: tuple[int, int] = (0, 1)) -> Episode:
        """Episodes for batch_size distinct users, with their items' catalog rows.

        shard = (index, count): the episodes are drawn for the whole batch (the same random
        draws whatever the count), and only the index-th of `count` contiguous blocks of it
        is built: with one process per shard, the shards together are exactly the batch
        one process would build.
        """
        c = self.config
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {index} of {count} does not exist")
        chosen = rng.choice(len(self.users), size=min(batch_size, len(self.users)), replace=False)
        if len(chosen) < count:
            raise ValueError(f"a meta-batch of {len(chosen)} users cannot be split over {count} processes")
        low, high = len(chosen) * index // count, len(chosen) * (index + 1) // count
        users, supports, support_labels, queries, query_labels = [], [], [], [], []
        for position, user_index in enumerate(chosen):
            n = int(self.lengths[user_index])
            if self.query == "last":
                q = min(c.query_size, n - 1)
                later = np.arange(n - q, n)
                pool = n - q  # support comes from what precedes the query
            else:
                pool = n - 1
            if rng.random() < c.all_but_query_prob:
                k = pool if self.query == "last" else max(1, n - c.query_size)
            else:
                k = int(rng.integers(c.min_support, c.max_support + 1))
            k = min(k, pool, c.support_cap)
            if self.query == "later":
                later = np.arange(k, n)
                if len(later) > c.max_query:
                    later = np.sort(rng.choice(later, size=c.max_query, replace=False))
            if not low <= position < high:
                continue  # another process builds this episode; its draws were still taken
            start = int(self.starts[user_index])
            rows, labels = self.flat_rows[start : start + n], self.flat_labels[start : start + n]
            users.append(self.users[user_index])
            supports.append(rows[:k])
            support_labels.append(labels[:k])
            queries.append(rows[later])
            query_labels.append(labels[later])
        batch = pad_batch(self.catalog, users, supports, support_labels, queries)
        s, q = batch.support_items.shape[1], batch.query_items.shape[1]
        labels_out = torch.zeros((len(users), q))
        mask_out = torch.zeros((len(users), q))
        support_rows = torch.full((len(users), s), self.catalog.padding_row, dtype=torch.int64)
        query_rows = torch.full((len(users), q), self.catalog.padding_row, dtype=torch.int64)
        for i, (lab, sup, qry) in enumerate(zip(query_labels, supports, queries)):
            labels_out[i, : len(lab)] = torch.from_numpy(lab)
            mask_out[i, : len(lab)] = 1.0
            support_rows[i, : len(sup)] = torch.from_numpy(sup)
            query_rows[i, : len(qry)] = torch.from_numpy(qry)
        return Episode(batch, labels_out, mask_out, support_rows, query_rows)
