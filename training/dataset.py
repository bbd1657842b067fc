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
    # Cache of factorized(): column name -> (distinct values, code of each row). Loaders that
    # know integer codes (the synthetic generator) fill it; subset() carries it along.
    _codes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        for name in ("item_ids", "labels", "timestamps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Dataset column {name} has {len(getattr(self, name))} rows, user_ids has {n}")
        for name, (distinct, codes) in self._codes.items():
            if name not in ("user_ids", "item_ids") or len(codes) != n:
                raise ValueError(f"Dataset codes of {name!r} do not match its {n} rows")

    def factorized(self, column: Literal["user_ids", "item_ids"]) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct ids, index of each row's id in them), like np.unique(return_inverse=True).

        Computed once per dataset and cached: np.unique sorts every row's string (tens of
        seconds at 10^7 rows), while this sorts only the distinct ids.
        """
        if column not in self._codes:
            self._codes[column] = factorize(getattr(self, column))
        return self._codes[column]

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
        codes = {name: _compress(distinct, codes[rows]) for name, (distinct, codes) in self._codes.items()}
        return Dataset(
            name=self.name,
            label=self.label,
            user_ids=self.user_ids[rows],
            item_ids=self.item_ids[rows],
            labels=self.labels[rows],
            timestamps=self.timestamps[rows],
            users=self.users,
            items=self.items,
            _codes=codes,
        )


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, int64 index of each value in them) of an array of str objects.

    One hash lookup per row (done by dict and map in C, no Python loop per row) instead of
    np.unique's sort of every row.
    """
    items = values.tolist()
    distinct = sorted(dict.fromkeys(items))
    index = {value: i for i, value in enumerate(distinct)}
    codes = np.fromiter(map(index.__getitem__, items), np.int64, len(items))
    return np.array(distinct, dtype=object), codes


def _compress(distinct: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops the distinct values no row uses any more, renumbering the codes (order kept)."""
    present = np.bincount(codes, minlength=len(distinct)) > 0
    renumber = np.cumsum(present) - 1
    return distinct[present], renumber[codes]
