from warmstart.v1 import manifest_pb2 as _manifest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_BY_UNSPECIFIED: _ClassVar[RankBy]
    RANK_BY_ENGAGEMENT: _ClassVar[RankBy]
    RANK_BY_PREDICTED_RATING: _ClassVar[RankBy]

class UnknownItemHandling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN_ITEM_HANDLING_UNSPECIFIED: _ClassVar[UnknownItemHandling]
    ENCODED_FROM_ATTRIBUTES: _ClassVar[UnknownItemHandling]

class ItemRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_ROLE_UNSPECIFIED: _ClassVar[ItemRole]
    INTERACTION: _ClassVar[ItemRole]
    CANDIDATE: _ClassVar[ItemRole]

class OnboardStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ONBOARD_STRATEGY_UNSPECIFIED: _ClassVar[OnboardStrategy]
    ONBOARD_STRATEGY_D_OPTIMAL: _ClassVar[OnboardStrategy]
    ONBOARD_STRATEGY_GRADIENT_POPULARITY: _ClassVar[OnboardStrategy]
    ONBOARD_STRATEGY_POPULAR: _ClassVar[OnboardStrategy]
    ONBOARD_STRATEGY_RANDOM: _ClassVar[OnboardStrategy]
RANK_BY_UNSPECIFIED: RankBy
RANK_BY_ENGAGEMENT: RankBy
RANK_BY_PREDICTED_RATING: RankBy
UNKNOWN_ITEM_HANDLING_UNSPECIFIED: UnknownItemHandling
ENCODED_FROM_ATTRIBUTES: UnknownItemHandling
ITEM_ROLE_UNSPECIFIED: ItemRole
INTERACTION: ItemRole
CANDIDATE: ItemRole
ONBOARD_STRATEGY_UNSPECIFIED: OnboardStrategy
ONBOARD_STRATEGY_D_OPTIMAL: OnboardStrategy
ONBOARD_STRATEGY_GRADIENT_POPULARITY: OnboardStrategy
ONBOARD_STRATEGY_POPULAR: OnboardStrategy
ONBOARD_STRATEGY_RANDOM: OnboardStrategy

class Interaction(_message.Message):
    __slots__ = ("item_id", "label", "timestamp", "item_attributes")
    class ItemAttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ITEM_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    label: float
    timestamp: int
    item_attributes: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., label: _Optional[float] = ..., timestamp: _Optional[int] = ..., item_attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "item_attributes")
    class ItemAttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    item_attributes: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., item_attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("request_id", "user_attributes", "interactions", "candidates", "candidate_ids", "top_k", "exclude_interacted", "exclude_item_ids", "rank_by")
    class UserAttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_INTERACTED_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    RANK_BY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_attributes: _containers.ScalarMap[str, str]
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    exclude_interacted: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    rank_by: RankBy
    def __init__(self, request_id: _Optional[str] = ..., user_attributes: _Optional[_Mapping[str, str]] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., exclude_interacted: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., rank_by: _Optional[_Union[RankBy, str]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "engagement")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ENGAGEMENT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    engagement: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., engagement: _Optional[float] = ...) -> None: ...

class UnknownItem(_message.Message):
    __slots__ = ("item_id", "role", "handling")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HANDLING_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    role: ItemRole
    handling: UnknownItemHandling
    def __init__(self, item_id: _Optional[str] = ..., role: _Optional[_Union[ItemRole, str]] = ..., handling: _Optional[_Union[UnknownItemHandling, str]] = ...) -> None: ...

class AdaptationSummary(_message.Message):
    __slots__ = ("support_size", "adapted", "inner_steps", "support_loss_before", "support_loss_after", "unknown_items", "interactions_truncated")
    SUPPORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    support_size: int
    adapted: bool
    inner_steps: int
    support_loss_before: float
    support_loss_after: float
    unknown_items: _containers.RepeatedCompositeFieldContainer[UnknownItem]
    interactions_truncated: int
    def __init__(self, support_size: _Optional[int] = ..., adapted: _Optional[bool] = ..., inner_steps: _Optional[int] = ..., support_loss_before: _Optional[float] = ..., support_loss_after: _Optional[float] = ..., unknown_items: _Optional[_Iterable[_Union[UnknownItem, _Mapping]]] = ..., interactions_truncated: _Optional[int] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("request_id", "model_name", "model_version", "items", "adaptation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    model_version: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    adaptation: AdaptationSummary
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., adaptation: _Optional[_Union[AdaptationSummary, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "user_attributes", "interactions", "items", "item_ids")
    class UserAttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_attributes: _containers.ScalarMap[str, str]
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    items: _containers.RepeatedCompositeFieldContainer[Candidate]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., user_attributes: _Optional[_Mapping[str, str]] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "model_name", "model_version", "items", "adaptation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    model_version: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    adaptation: AdaptationSummary
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., adaptation: _Optional[_Union[AdaptationSummary, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FieldInfo(_message.Message):
    __slots__ = ("name", "multi_valued", "vocabulary_size", "example_values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MULTI_VALUED_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    multi_valued: bool
    vocabulary_size: int
    example_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., multi_valued: _Optional[bool] = ..., vocabulary_size: _Optional[int] = ..., example_values: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_interactions", "max_candidates", "max_batch_size")
    MAX_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_interactions: int
    max_candidates: int
    max_batch_size: int
    def __init__(self, max_interactions: _Optional[int] = ..., max_candidates: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "model_version", "created_at", "label", "user_fields", "item_fields", "catalog_size", "inner_steps", "model_kind", "learner", "engine", "limits", "has_engagement")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELDS_FIELD_NUMBER: _ClassVar[int]
    CATALOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    HAS_ENGAGEMENT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    created_at: str
    label: _manifest_pb2.LabelSpec
    user_fields: _containers.RepeatedCompositeFieldContainer[FieldInfo]
    item_fields: _containers.RepeatedCompositeFieldContainer[FieldInfo]
    catalog_size: int
    inner_steps: int
    model_kind: str
    learner: str
    engine: str
    limits: Limits
    has_engagement: bool
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., created_at: _Optional[str] = ..., label: _Optional[_Union[_manifest_pb2.LabelSpec, _Mapping]] = ..., user_fields: _Optional[_Iterable[_Union[FieldInfo, _Mapping]]] = ..., item_fields: _Optional[_Iterable[_Union[FieldInfo, _Mapping]]] = ..., catalog_size: _Optional[int] = ..., inner_steps: _Optional[int] = ..., model_kind: _Optional[str] = ..., learner: _Optional[str] = ..., engine: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., has_engagement: _Optional[bool] = ...) -> None: ...

class OnboardRequest(_message.Message):
    __slots__ = ("request_id", "user_attributes", "interactions", "candidate_ids", "count", "exclude_item_ids", "strategy")
    class UserAttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_attributes: _containers.ScalarMap[str, str]
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    count: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    strategy: OnboardStrategy
    def __init__(self, request_id: _Optional[str] = ..., user_attributes: _Optional[_Mapping[str, str]] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., strategy: _Optional[_Union[OnboardStrategy, str]] = ...) -> None: ...

class OnboardItem(_message.Message):
    __slots__ = ("item_id", "reason_score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    reason_score: float
    def __init__(self, item_id: _Optional[str] = ..., reason_score: _Optional[float] = ...) -> None: ...

class OnboardResponse(_message.Message):
    __slots__ = ("request_id", "model_name", "model_version", "items", "strategy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    model_version: str
    items: _containers.RepeatedCompositeFieldContainer[OnboardItem]
    strategy: OnboardStrategy
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., items: _Optional[_Iterable[_Union[OnboardItem, _Mapping]]] = ..., strategy: _Optional[_Union[OnboardStrategy, str]] = ...) -> None: ...
