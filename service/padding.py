"""Shape buckets, and padding users into one engine batch and splitting the result back.

The graph's support length and candidate count are dynamic, but every new shape costs
the engine (allocation plans in onnxruntime, CUDA graphs on GPU), so a batch is padded
to the next bucket size. Padding is exact by construction: padded support entries have
mask 0 and contribute nothing to a user's inner loop, padded query rows are all-zero
code rows whose scores are dropped, and users in one batch do not interact (the graph
vmaps over them).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


class EngineInputs(NamedTuple):
    user_features: np.ndarray  # (B, user_width) int64
    support_items: np.ndarray  # (B, S, item_width) int64
    support_labels: np.ndarray  # (B, S) float32
    support_mask: np.ndarray  # (B, S) float32, 1 = a real interaction
    query_items: np.ndarray  # (B, Q, item_width) int64


class EngineOutputs(NamedTuple):
    query_scores: np.ndarray  # (B, Q) float32
    support_loss_before: np.ndarray  # (B,) float32
    support_loss_after: np.ndarray  # (B,) float32
    query_engagement: np.ndarray | None = None  # (B, Q) float32, models with an engagement head


class AdaptInputs(NamedTuple):
    """The adapt graph's inputs: the fused graph's without the query items."""

    user_features: np.ndarray  # (B, user_width) int64
    support_items: np.ndarray  # (B, S, item_width) int64
    support_labels: np.ndarray  # (B, S) float32
    support_mask: np.ndarray  # (B, S) float32


class AdaptOutputs(NamedTuple):
    """Each user's adapted parameters (the adapt graph's outputs)."""

    user_bias: np.ndarray  # (B,) float32
    user_factors: np.ndarray  # (B, d) float32
    user_engagement: np.ndarray | None  # (B, e) float32, models with an engagement head
    support_loss_before: np.ndarray  # (B,) float32
    support_loss_after: np.ndarray  # (B,) float32


@dataclass(frozen=True, slots=True)
class Ranking:
    """What a Recommend call wants of its query: the top_k (0 = all) by one head, with
    the excluded query positions dropped before the partition."""

    top_k: int
    by_engagement: bool
    excluded: np.ndarray  # (n,) int64 positions in the query (catalog rows for the whole catalog)


@dataclass(slots=True)
class UserInputs:
    """One user's encoded request, unpadded (built per request: slotted, not frozen).

    The query is one of: `query_items`, encoded rows for the fused graph (candidates
    encoded from inline attributes, or a model without an item table); `query_rows`,
    rows of the item table; neither, the whole catalog (from the table)."""

    user_features: np.ndarray  # (user_width,)
    support_items: np.ndarray  # (n, item_width), n >= 0
    support_labels: np.ndarray  # (n,) float32
    query_items: np.ndarray | None = None  # (q, item_width), q >= 1
    query_rows: np.ndarray | None = None  # (q,) int64 item-table rows
    ranking: Ranking | None = None  # None: every query item's scores, in query order

    @property
    def support_size(self) -> int:
        return len(self.support_labels)

    @property
    def query_size(self) -> int:
        """Items of the fused graph's query (0 when the item table scores the query)."""
        return 0 if self.query_items is None else len(self.query_items)


@dataclass(slots=True)
class UserOutputs:
    query_scores: np.ndarray  # (q,) float32: the query's (in query order), or the ranked items' (best first)
    support_loss_before: float
    support_loss_after: float
    query_engagement: np.ndarray | None = None  # (q,) float32, models with an engagement head
    order: np.ndarray | None = None  # with a ranking: the chosen query positions, best first
    finite: bool = False  # True: every query score is known to be finite (False: not checked, or not)


def powers_of_two(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2 * smallest, ... below largest, then largest itself."""
    if not 1 <= smallest <= largest:
        raise ValueError(f"need 1 <= smallest ({smallest}) <= largest ({largest})")
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return tuple(sizes)


@dataclass(frozen=True)
class ShapeBuckets:
    """The padded sizes a batch may take along the support and query axes."""

    support: tuple[int, ...]
    query: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, sizes in (("support", self.support), ("query", self.query)):
            if not sizes or sizes[0] < 1 or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"{name} buckets must be increasing positive sizes, got {sizes}")

    @staticmethod
    def build(min_support: int, max_support: int, min_query: int, max_query: int) -> "ShapeBuckets":
        return ShapeBuckets(
            powers_of_two(min(min_support, max_support), max_support), powers_of_two(min(min_query, max_query), max_query)
        )

    def support_length(self, n: int) -> int:
        """The padded support length for n interactions (at least 1: the graph needs one slot)."""
        return _bucket(self.support, max(n, 1), "support")

    def query_length(self, n: int) -> int:
        return _bucket(self.query, max(n, 1), "query")

    def shapes(self) -> list[tuple[int, int]]:
        return [(s, q) for s in self.support for q in self.query]


def _bucket(sizes: tuple[int, ...], n: int, axis: str) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{axis} length {n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]


def batch_bucket(sizes: tuple[int, ...], users: int) -> int:
    """The padded batch size for `users` users: the smallest bucket that holds them."""
    if users < 1:
        raise ValueError(f"a batch needs at least one user, got {users}")
    return _bucket(sizes, users, "batch")


def batch_slices(users: int, largest: int) -> list[slice]:
    """Consecutive chunks of at most `largest` users covering a batch of `users`."""
    if users < 1 or largest < 1:
        raise ValueError(f"need users >= 1 and largest >= 1, got {users} and {largest}")
    return [slice(start, min(start + largest, users)) for start in range(0, users, largest)]


def take_users(inputs: EngineInputs, rows: slice) -> EngineInputs:
    """The users `rows` of a batch (views, no copy)."""
    return EngineInputs(*(a[rows] for a in inputs))


def concat_outputs(parts: Sequence[EngineOutputs]) -> EngineOutputs:
    """The outputs of consecutive chunks of one batch, joined back in order."""
    if len(parts) == 1:
        return parts[0]
    return EngineOutputs(*(None if arrays[0] is None else np.concatenate(arrays) for arrays in zip(*parts)))


def fill_padded(target: np.ndarray, source: np.ndarray) -> None:
    """Copies `source` into the leading corner of the larger `target` and zeroes the rest.

    Only the padding region is cleared (not the whole buffer first): a staging buffer of
    a large bucket is rewritten in one pass. Zero is padding everywhere: code PAD, mask 0,
    label 0."""
    if source.ndim != target.ndim or any(s > t for s, t in zip(source.shape, target.shape)):
        raise ValueError(f"cannot pad shape {source.shape} into {target.shape}")
    corner = tuple(slice(0, n) for n in source.shape)
    target[corner] = source
    for axis, n in enumerate(source.shape):
        if n < target.shape[axis]:
            # Rows inside the corner along the earlier axes, beyond it along this one: the
            # pieces are disjoint and together cover everything outside the corner.
            target[corner[:axis] + (slice(n, None),)] = 0


def pad_batch(users: Sequence[UserInputs], support_length: int, query_length: int) -> EngineInputs:
    """Stacks users into one batch padded to (support_length, query_length)."""
    b = len(users)
    item_width = users[0].query_items.shape[1]
    user_features = np.stack([u.user_features for u in users])
    support_items = np.zeros((b, support_length, item_width), dtype=np.int64)
    support_labels = np.zeros((b, support_length), dtype=np.float32)
    support_mask = np.zeros((b, support_length), dtype=np.float32)
    query_items = np.zeros((b, query_length, item_width), dtype=np.int64)
    for i, user in enumerate(users):
        n = user.support_size
        support_items[i, :n] = user.support_items
        support_labels[i, :n] = user.support_labels
        support_mask[i, :n] = 1.0
        query_items[i, : user.query_size] = user.query_items
    return EngineInputs(user_features, support_items, support_labels, support_mask, query_items)


def pad_support(users: Sequence[UserInputs], support_length: int) -> AdaptInputs:
    """Stacks users' support sets into one adapt batch padded to support_length."""
    b = len(users)
    item_width = users[0].support_items.shape[1]
    user_features = np.stack([u.user_features for u in users])
    support_items = np.zeros((b, support_length, item_width), dtype=np.int64)
    support_labels = np.zeros((b, support_length), dtype=np.float32)
    support_mask = np.zeros((b, support_length), dtype=np.float32)
    for i, user in enumerate(users):
        n = user.support_size
        support_items[i, :n] = user.support_items
        support_labels[i, :n] = user.support_labels
        support_mask[i, :n] = 1.0
    return AdaptInputs(user_features, support_items, support_labels, support_mask)


def split_batch(outputs: EngineOutputs, users: Sequence[UserInputs]) -> list[UserOutputs]:
    """Each user's unpadded share of a batch's outputs (views), each marked finite when the
    whole batch's scores are: one check per batch instead of one per user."""
    before = outputs.support_loss_before.tolist()
    after = outputs.support_loss_after.tolist()
    scores = outputs.query_scores
    engagement = outputs.query_engagement
    finite = bool(np.isfinite(scores).all())
    return [
        UserOutputs(
            scores[i, : user.query_size],
            before[i],
            after[i],
            None if engagement is None else engagement[i, : user.query_size],
            finite=finite,
        )
        for i, user in enumerate(users)
    ]


def zero_support(batch_size: int, support_length: int, user_width: int, item_width: int) -> AdaptInputs:
    """An all-padding adapt batch of the given shape (warm-up)."""
    return AdaptInputs(*zero_batch(batch_size, support_length, 1, user_width, item_width)[:4])


def zero_batch(batch_size: int, support_length: int, query_length: int, user_width: int, item_width: int) -> EngineInputs:
    """An all-padding batch of the given shape (warm-up)."""
    return EngineInputs(
        np.zeros((batch_size, user_width), dtype=np.int64),
        np.zeros((batch_size, support_length, item_width), dtype=np.int64),
        np.zeros((batch_size, support_length), dtype=np.float32),
        np.zeros((batch_size, support_length), dtype=np.float32),
        np.zeros((batch_size, query_length, item_width), dtype=np.int64),
    )
