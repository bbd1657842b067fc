"""Feature schema: categorical fields, vocabularies and the integer encoding.

Every entity (user or item) is encoded as a fixed-width int64 row: each field owns
`width` consecutive slots holding codes 0 = no value, 1 = value outside the vocabulary,
2 + i = vocabulary[i]. Multi-valued fields (genres) fill up to `width` slots with their
values sorted; the model mean-pools the non-empty slots of a field. The same encoding is
written into the artifact manifest so that the service encodes requests identically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from training.dataset import AttributeTable, Dataset
from warmstart import contract

log = logging.getLogger(__name__)

PAD = contract.PAD  # no value in this slot
OOV = contract.OOV  # a value the vocabulary does not hold (a new item's id, a new genre)
FIRST_CODE = contract.FIRST_CODE
ITEM_ID_FIELD = "item_id"

Side = Literal["user", "item"]


@dataclass(frozen=True)
class Field:
    """One categorical field and where its slots sit in the encoded row."""

    name: str
    side: Side
    multi_valued: bool
    width: int
    offset: int
    vocabulary: tuple[str, ...]
    _index: dict[str, int] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"field {self.name!r}: width must be >= 1, got {self.width}")
        if not self.multi_valued and self.width != 1:
            raise ValueError(f"field {self.name!r}: a single-valued field has width 1")
        try:
            index = contract.vocabulary_index(self.vocabulary)
        except ValueError:
            raise ValueError(f"field {self.name!r}: vocabulary has duplicate values") from None
        object.__setattr__(self, "_index", index)

    @property
    def num_codes(self) -> int:
        """Rows of this field's embedding table: padding, out-of-vocabulary, then the values."""
        return FIRST_CODE + len(self.vocabulary)

    def code(self, value: str) -> int:
        return self._index.get(value, OOV)

    def encode(self, values: Sequence[str]) -> tuple[list[int], int]:
        """Codes for this field's slots, and how many values did not fit the width."""
        codes = contract.field_codes(self._index, values, self.width)
        dropped = len(set(values)) - len(codes)
        return codes + [PAD] * (self.width - len(codes)), dropped

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "side": self.side,
            "multi_valued": self.multi_valued,
            "width": self.width,
            "offset": self.offset,
            "vocabulary": list(self.vocabulary),
        }

    @staticmethod
    def from_dict(d: Mapping) -> "Field":
        return Field(
            name=d["name"],
            side=d["side"],
            multi_valued=bool(d["multi_valued"]),
            width=int(d["width"]),
            offset=int(d["offset"]),
            vocabulary=tuple(d["vocabulary"]),
        )


@dataclass(frozen=True)
class FeatureSchema:
    """The user and item fields of a model, in slot order."""

    user_fields: tuple[Field, ...]
    item_fields: tuple[Field, ...]
    separator: str = "|"

    @property
    def user_width(self) -> int:
        return sum(f.width for f in self.user_fields)

    @property
    def item_width(self) -> int:
        return sum(f.width for f in self.item_fields)

    @property
    def item_id_field(self) -> Field | None:
        return next((f for f in self.item_fields if f.name == ITEM_ID_FIELD), None)

    def encode_user(self, attributes: Mapping[str, Sequence[str]]) -> np.ndarray:
        """(user_width,) int64 codes for one user's attributes (missing fields -> padding)."""
        return _encode(self.user_fields, attributes, self.user_width)

    def encode_item(self, item_id: str, attributes: Mapping[str, Sequence[str]]) -> np.ndarray:
        """(item_width,) int64 codes for one item; its id fills the item-id field if there is one."""
        values = dict(attributes)
        if self.item_id_field is not None:
            values[ITEM_ID_FIELD] = (item_id,)
        return _encode(self.item_fields, values, self.item_width)

    def to_dict(self) -> dict:
        return {
            "user_fields": [f.to_dict() for f in self.user_fields],
            "item_fields": [f.to_dict() for f in self.item_fields],
            "separator": self.separator,
        }

    @staticmethod
    def from_dict(d: Mapping) -> "FeatureSchema":
        return FeatureSchema(
            user_fields=tuple(Field.from_dict(f) for f in d["user_fields"]),
            item_fields=tuple(Field.from_dict(f) for f in d["item_fields"]),
            separator=d.get("separator", "|"),
        )


def _encode(fields: Sequence[Field], values: Mapping[str, Sequence[str]], width: int) -> np.ndarray:
    row = np.zeros(width, dtype=np.int64)
    for f in fields:
        codes, _ = f.encode(values.get(f.name, ()))
        row[f.offset : f.offset + f.width] = codes
    return row


def _fields(side: Side, columns: Sequence["_Column"], max_multi_width: int) -> tuple[Field, ...]:
    out: list[Field] = []
    offset = 0
    for column in columns:
        width = min(max_multi_width, column.widest) if column.multi_valued else 1
        out.append(Field(column.name, side, column.multi_valued, width, offset, tuple(sorted(column.values))))
        offset += width
    return tuple(out)


@dataclass(frozen=True)
class _Column:
    name: str
    multi_valued: bool
    values: frozenset[str]
    widest: int  # most values one entity has in this field


def _columns(table_fields, values: Mapping[str, Mapping[str, tuple[str, ...]]]) -> list[_Column]:
    """Distinct values per field over every entity of a table, and the widest row."""
    result = []
    for f in table_fields:
        seen: set[str] = set()
        widest = 1
        for attributes in values.values():
            vals = set(attributes.get(f.name, ()))
            seen |= vals
            widest = max(widest, len(vals))
        result.append(_Column(f.name, f.multi_valued, frozenset(seen), widest))
    return result


def build_schema(
    dataset: Dataset,
    train_item_ids: Iterable[str],
    *,
    use_item_id: bool = True,
    max_multi_width: int = 8,
    exclude_user_fields: Sequence[str] = (),
    exclude_item_fields: Sequence[str] = (),
) -> FeatureSchema:
    """Builds the schema from the attribute tables and the items seen in training.

    Attribute vocabularies come from the whole attribute tables (attributes are not
    labels, so a new item's genre may be known); the item-id vocabulary holds only items
    with training interactions, so held-out new items encode to the out-of-vocabulary row.
    """
    for name in exclude_user_fields:
        if name not in dataset.users.field_names():
            raise ValueError(f"no user field {name!r} to exclude; fields: {dataset.users.field_names()}")
    for name in exclude_item_fields:
        if name not in dataset.items.field_names():
            raise ValueError(f"no item field {name!r} to exclude; fields: {dataset.items.field_names()}")
    if ITEM_ID_FIELD in dataset.items.field_names():
        raise ValueError(f"an item attribute may not be called {ITEM_ID_FIELD!r}: the name is reserved")
    user_cols = _columns([f for f in dataset.users.fields if f.name not in exclude_user_fields], dataset.users.values)
    item_cols = _columns([f for f in dataset.items.fields if f.name not in exclude_item_fields], dataset.items.values)
    if use_item_id:
        item_cols = [_Column(ITEM_ID_FIELD, False, frozenset(map(str, train_item_ids)), 1)] + item_cols
    return FeatureSchema(
        user_fields=_fields("user", user_cols, max_multi_width),
        item_fields=_fields("item", item_cols, max_multi_width),
    )


def encode_users(schema: FeatureSchema, users: AttributeTable, user_ids: Sequence[str]) -> np.ndarray:
    """(len(user_ids), user_width) int64 codes of users from an attribute table."""
    out = np.zeros((len(user_ids), schema.user_width), dtype=np.int64)
    for row, user in enumerate(user_ids):
        out[row] = schema.encode_user(users.get(user))
    return out
