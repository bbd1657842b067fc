"""The in-memory dataset every loader returns and everything downstream consumes.

A dataset is a log of (user, item, label, timestamp) interactions plus categorical
attribute tables for users and items. Attribute values are already categorical strings
(MovieLens ages are bucketed, zip codes cut to a prefix, release years bucketed by the
loader), so the feature code only builds vocabularies over them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

LabelKind = Literal["rating", "click"]


class DataError(ValueError):
    """A data file is unusable. The message names the file, the line and the problem."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class LabelSpec:
    """What a label means: a rating in [min_value, max_value], or a 0/1 click."""

    kind: LabelKind
    min_value: float
    max_value: float

    def __post_init__(self) -> None:
        if self.kind not in ("rating", "click"):
            raise ValueError(f"label kind must be 'rating' or 'click', got {self.kind!r}")
        if self.kind == "click" and (self.min_value, self.max_value) != (0.0, 1.0):
            raise ValueError("a click label has the range [0, 1]")
        if not self.min_value < self.max_value:
            raise ValueError(f"label range [{self.min_value}, {self.max_value}] is empty")

    @staticmethod
    def click() -> "LabelSpec":
        return LabelSpec("click", 0.0, 1.0)


@dataclass(frozen=True)
class AttributeField:
    """One categorical attribute column of the user or item table."""

    name: str
    multi_valued: bool = False


@dataclass
class AttributeTable:
    """Categorical attributes of users or of items.

    `values[entity_id][field_name]` is a tuple of strings: one value for a single-valued
    field, zero or more for a multi-valued one; a missing value is an empty tuple.
    """

    fields: list[AttributeField] = field(default_factory=list)
    values: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def get(self, entity_id: str) -> dict[str, tuple[str, ...]]:
        """Attributes of one entity; an unknown entity has none."""
        return self.values.get(entity_id, {})


@dataclass
class Dataset:
    """Interactions (parallel arrays, one row per interaction) and attribute tables.

    `items` lists every item the data knows, including items nobody interacted with;
    every interacted item appears in `items.values` when the source has an item table.
    Row order is the source's order; time order is (timestamp, row index).
    """

    name: str
    label: LabelSpec
    user_ids: np.ndarray  # (N,) str objects
    item_ids: np.ndarray  # (N,) str objects
    labels: np.ndarray  # (N,) float64
    timestamps: np.ndarray  # (N,) int64, seconds since the epoch
    users: AttributeTable
    items: AttributeTable

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        for name in ("item_ids", "labels", "timestamps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Dataset column {name} has {len(getattr(self, name))} rows, user_ids has {n}")

    def __len__(self) -> int:
        return len(self.user_ids)

    def fingerprint(self) -> str:
        """sha256 over the interactions in row order: identifies the data a split was built on."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        for column in (self.user_ids, self.item_ids):
            digest.update("\x1f".join(map(str, column)).encode())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.timestamps, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def subset(self, rows: np.ndarray) -> "Dataset":
        """The same dataset restricted to the given interaction rows (a bool mask or indices)."""
        return Dataset(
            name=self.name,
            label=self.label,
            user_ids=self.user_ids[rows],
            item_ids=self.item_ids[rows],
            labels=self.labels[rows],
            timestamps=self.timestamps[rows],
            users=self.users,
            items=self.items,
        )
