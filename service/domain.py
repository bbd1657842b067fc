"""The service's request and result types, free of protobuf.

The servicer converts protobuf messages to these and back; everything else works on
them. Item attributes are the text the caller sent (field name -> value, several values
joined by the schema's separator); the encoder parses them.

The types built for every request are plain slotted dataclasses, not frozen ones: a frozen
dataclass costs about three times as much to build (each field set through
object.__setattr__), and a request builds several. Nothing changes them once built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})  # shared, immutable

ItemRole = Literal["interaction", "candidate"]
UnknownItemHandling = Literal["encoded_from_attributes"]


def _no_attributes(index: int) -> Mapping[str, str]:
    return NO_ATTRIBUTES


@dataclass(slots=True)
class ItemList:
    """Item ids in request order, and the inline attributes of item `i` on demand.

    Attributes are fetched only for the few items the catalog does not know: building a
    mapping per item for every request would cost more than the rest of the encoding.
    """

    ids: Sequence[str] = ()
    attributes: Callable[[int], Mapping[str, str]] = _no_attributes
    field: str = "items"  # the request field they came from (errors name it)
    bare_ids: bool = False  # given as plain ids (field[k]), not as messages (field[k].item_id)

    def __len__(self) -> int:
        return len(self.ids)

    def id_path(self, k: int) -> str:
        return f"{self.field}[{k}]" if self.bare_ids else f"{self.field}[{k}].item_id"

    def attributes_path(self, k: int) -> str:
        return f"{self.field}[{k}].item_attributes"

    @staticmethod
    def of(ids: Sequence[str], attributes: Mapping[str, Mapping[str, str]] | None = None, field: str = "items") -> "ItemList":
        """From ids and {item_id: attributes} (tests and other in-process callers)."""
        ids = tuple(ids)
        if not attributes:
            return ItemList(ids, field=field)
        return ItemList(ids, lambda i: attributes.get(ids[i], NO_ATTRIBUTES), field)


@dataclass(slots=True)
class Interactions:
    """What the user did: items, their labels, and timestamps (0 = not given)."""

    items: ItemList = field(default_factory=lambda: ItemList(field="interactions"))
    labels: Sequence[float] = ()
    timestamps: Sequence[int] = ()

    def __post_init__(self) -> None:
        if not len(self.items) == len(self.labels) == len(self.timestamps):
            raise ValueError("items, labels and timestamps must have one entry per interaction")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(slots=True)
class UserContext:
    """Who is asking: attributes, interactions, and when the caller stops waiting."""

    request_id: str = ""
    user_attributes: Mapping[str, str] = field(default_factory=lambda: NO_ATTRIBUTES)
    interactions: Interactions = field(default_factory=Interactions)
    deadline_s: float | None = None  # time.monotonic() value; None = no deadline


@dataclass(slots=True)
class RecommendQuery:
    user: UserContext
    candidates: ItemList = field(default_factory=lambda: ItemList(field="candidates"))  # empty = the whole catalog
    top_k: int = 0  # 0 = every candidate
    exclude_interacted: bool = False
    exclude_item_ids: Sequence[str] = ()
    # What orders the list: "auto" = engagement when the model has an engagement head,
    # else the predicted rating.
    rank_by: Literal["auto", "engagement", "rating"] = "auto"


@dataclass(slots=True)
class ScoreQuery:
    user: UserContext
    items: ItemList = field(default_factory=ItemList)


OnboardStrategy = Literal["dopt", "melu", "popular", "random"]  # warmstart.onboarding.Strategy


@dataclass(frozen=True)
class OnboardQuery:
    user: UserContext
    candidates: ItemList = field(default_factory=lambda: ItemList(field="candidate_ids", bare_ids=True))  # empty = the catalog
    count: int = 0  # items to ask about (>= 1)
    exclude_item_ids: Sequence[str] = ()
    strategy: OnboardStrategy = "dopt"


@dataclass(frozen=True)
class OnboardResult:
    """The items to ask about, best first, with the strategy's reason score each."""

    request_id: str
    model_name: str
    model_version: str
    item_ids: Sequence[str]
    reasons: np.ndarray  # (len(item_ids),) float64
    strategy: OnboardStrategy


@dataclass(slots=True)
class UnknownItem:
    item_id: str
    role: ItemRole
    handling: UnknownItemHandling = "encoded_from_attributes"


@dataclass(slots=True)
class AdaptationSummary:
    support_size: int
    adapted: bool
    inner_steps: int
    support_loss_before: float
    support_loss_after: float
    unknown_items: tuple[UnknownItem, ...] = ()
    interactions_truncated: int = 0


@dataclass(slots=True)
class ScoredItems:
    """The answer to Recommend (best first) or Score (request order)."""

    request_id: str
    model_name: str
    model_version: str
    item_ids: Sequence[str]
    scores: np.ndarray  # (len(item_ids),) float32, label units
    adaptation: AdaptationSummary
    engagement: np.ndarray | None = None  # (len(item_ids),) float32 engagement logits, if the model has them


@dataclass(frozen=True)
class FieldDescription:
    name: str
    multi_valued: bool
    vocabulary_size: int
    example_values: tuple[str, ...]


@dataclass(frozen=True)
class ModelDescription:
    model_name: str
    model_version: str
    created_at: str
    label_kind: Literal["rating", "click"]
    label_min: float
    label_max: float
    user_fields: tuple[FieldDescription, ...]
    item_fields: tuple[FieldDescription, ...]
    catalog_size: int
    inner_steps: int
    model_kind: str
    learner: str
    engine: str
    max_interactions: int
    max_candidates: int
    max_batch_size: int
    has_engagement: bool = False
