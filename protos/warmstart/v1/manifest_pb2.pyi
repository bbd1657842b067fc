from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ManifestSchema(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MANIFEST_SCHEMA_UNSPECIFIED: _ClassVar[ManifestSchema]
    MANIFEST_SCHEMA_V1: _ClassVar[ManifestSchema]

class Side(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIDE_UNSPECIFIED: _ClassVar[Side]
    USER: _ClassVar[Side]
    ITEM: _ClassVar[Side]

class LabelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_KIND_UNSPECIFIED: _ClassVar[LabelKind]
    RATING: _ClassVar[LabelKind]
    CLICK: _ClassVar[LabelKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    INT64: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
MANIFEST_SCHEMA_UNSPECIFIED: ManifestSchema
MANIFEST_SCHEMA_V1: ManifestSchema
SIDE_UNSPECIFIED: Side
USER: Side
ITEM: Side
LABEL_KIND_UNSPECIFIED: LabelKind
RATING: LabelKind
CLICK: LabelKind
DTYPE_UNSPECIFIED: DType
INT64: DType
FLOAT32: DType

class ArtifactManifest(_message.Message):
    __slots__ = ("schema_version", "model_name", "model_version", "created_at", "feature_schema", "label", "model", "inner_loop", "graph", "catalog", "evaluation", "training", "files", "export_checks", "item_table", "adapt_graph", "refresh")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INNER_LOOP_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    EXPORT_CHECKS_FIELD_NUMBER: _ClassVar[int]
    ITEM_TABLE_FIELD_NUMBER: _ClassVar[int]
    ADAPT_GRAPH_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    model_name: str
    model_version: str
    created_at: str
    feature_schema: FeatureSchema
    label: LabelSpec
    model: ModelSpec
    inner_loop: InnerLoopSpec
    graph: GraphSpec
    catalog: Catalog
    evaluation: EvaluationSummary
    training: TrainingInfo
    files: _containers.RepeatedCompositeFieldContainer[FileDigest]
    export_checks: _containers.RepeatedCompositeFieldContainer[ExportCheck]
    item_table: ItemTable
    adapt_graph: GraphSpec
    refresh: CatalogRefresh
    def __init__(self, schema_version: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., created_at: _Optional[str] = ..., feature_schema: _Optional[_Union[FeatureSchema, _Mapping]] = ..., label: _Optional[_Union[LabelSpec, _Mapping]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., inner_loop: _Optional[_Union[InnerLoopSpec, _Mapping]] = ..., graph: _Optional[_Union[GraphSpec, _Mapping]] = ..., catalog: _Optional[_Union[Catalog, _Mapping]] = ..., evaluation: _Optional[_Union[EvaluationSummary, _Mapping]] = ..., training: _Optional[_Union[TrainingInfo, _Mapping]] = ..., files: _Optional[_Iterable[_Union[FileDigest, _Mapping]]] = ..., export_checks: _Optional[_Iterable[_Union[ExportCheck, _Mapping]]] = ..., item_table: _Optional[_Union[ItemTable, _Mapping]] = ..., adapt_graph: _Optional[_Union[GraphSpec, _Mapping]] = ..., refresh: _Optional[_Union[CatalogRefresh, _Mapping]] = ...) -> None: ...

class CatalogRefresh(_message.Message):
    __slots__ = ("from_version", "items_added", "items_removed")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_ADDED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    from_version: str
    items_added: int
    items_removed: int
    def __init__(self, from_version: _Optional[str] = ..., items_added: _Optional[int] = ..., items_removed: _Optional[int] = ...) -> None: ...

class FeatureField(_message.Message):
    __slots__ = ("name", "side", "multi_valued", "width", "offset", "vocabulary", "vocabulary_file", "vocabulary_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    MULTI_VALUED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FILE_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    side: Side
    multi_valued: bool
    width: int
    offset: int
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    vocabulary_file: str
    vocabulary_size: int
    def __init__(self, name: _Optional[str] = ..., side: _Optional[_Union[Side, str]] = ..., multi_valued: _Optional[bool] = ..., width: _Optional[int] = ..., offset: _Optional[int] = ..., vocabulary: _Optional[_Iterable[str]] = ..., vocabulary_file: _Optional[str] = ..., vocabulary_size: _Optional[int] = ...) -> None: ...

class FeatureSchema(_message.Message):
    __slots__ = ("fields", "user_width", "item_width", "item_id_field", "multi_value_separator")
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    USER_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ITEM_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_FIELD_NUMBER: _ClassVar[int]
    MULTI_VALUE_SEPARATOR_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.RepeatedCompositeFieldContainer[FeatureField]
    user_width: int
    item_width: int
    item_id_field: str
    multi_value_separator: str
    def __init__(self, fields: _Optional[_Iterable[_Union[FeatureField, _Mapping]]] = ..., user_width: _Optional[int] = ..., item_width: _Optional[int] = ..., item_id_field: _Optional[str] = ..., multi_value_separator: _Optional[str] = ...) -> None: ...

class LabelSpec(_message.Message):
    __slots__ = ("kind", "min_value", "max_value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: LabelKind
    min_value: float
    max_value: float
    def __init__(self, kind: _Optional[_Union[LabelKind, str]] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("kind", "learner", "hyperparameters", "adapted_parameters", "parameter_count")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    learner: str
    hyperparameters: _containers.ScalarMap[str, str]
    adapted_parameters: _containers.RepeatedScalarFieldContainer[str]
    parameter_count: int
    def __init__(self, kind: _Optional[str] = ..., learner: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, str]] = ..., adapted_parameters: _Optional[_Iterable[str]] = ..., parameter_count: _Optional[int] = ...) -> None: ...

class InnerLoopSpec(_message.Message):
    __slots__ = ("steps", "learning_rate_kind", "learning_rate_tensors", "normalise_by_support_size", "prior_pull", "max_step_norm", "max_support_trained", "keep_best")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_KIND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NORMALISE_BY_SUPPORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_PULL_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_SUPPORT_TRAINED_FIELD_NUMBER: _ClassVar[int]
    KEEP_BEST_FIELD_NUMBER: _ClassVar[int]
    steps: int
    learning_rate_kind: str
    learning_rate_tensors: _containers.RepeatedScalarFieldContainer[str]
    normalise_by_support_size: bool
    prior_pull: bool
    max_step_norm: float
    max_support_trained: int
    keep_best: bool
    def __init__(self, steps: _Optional[int] = ..., learning_rate_kind: _Optional[str] = ..., learning_rate_tensors: _Optional[_Iterable[str]] = ..., normalise_by_support_size: _Optional[bool] = ..., prior_pull: _Optional[bool] = ..., max_step_norm: _Optional[float] = ..., max_support_trained: _Optional[int] = ..., keep_best: _Optional[bool] = ...) -> None: ...

class Dim(_message.Message):
    __slots__ = ("size", "name")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    size: int
    name: str
    def __init__(self, size: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedCompositeFieldContainer[Dim]
    description: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[_Union[Dim, _Mapping]]] = ..., description: _Optional[str] = ...) -> None: ...

class GraphSpec(_message.Message):
    __slots__ = ("onnx_file", "torch_export_file", "onnx_opset", "inputs", "outputs")
    ONNX_FILE_FIELD_NUMBER: _ClassVar[int]
    TORCH_EXPORT_FILE_FIELD_NUMBER: _ClassVar[int]
    ONNX_OPSET_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    onnx_file: str
    torch_export_file: str
    onnx_opset: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, onnx_file: _Optional[str] = ..., torch_export_file: _Optional[str] = ..., onnx_opset: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Catalog(_message.Message):
    __slots__ = ("ids_file", "features_file", "size")
    IDS_FILE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FILE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ids_file: str
    features_file: str
    size: int
    def __init__(self, ids_file: _Optional[str] = ..., features_file: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ItemTable(_message.Message):
    __slots__ = ("file", "size", "rating_factors", "engagement_factors", "max_abs_diff")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RATING_FACTORS_FIELD_NUMBER: _ClassVar[int]
    ENGAGEMENT_FACTORS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    file: str
    size: int
    rating_factors: int
    engagement_factors: int
    max_abs_diff: float
    def __init__(self, file: _Optional[str] = ..., size: _Optional[int] = ..., rating_factors: _Optional[int] = ..., engagement_factors: _Optional[int] = ..., max_abs_diff: _Optional[float] = ...) -> None: ...

class MetricValue(_message.Message):
    __slots__ = ("scenario", "support_size", "metric", "method", "value", "ci_low", "ci_high", "reference")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    support_size: str
    metric: str
    method: str
    value: float
    ci_low: float
    ci_high: float
    reference: str
    def __init__(self, scenario: _Optional[str] = ..., support_size: _Optional[str] = ..., metric: _Optional[str] = ..., method: _Optional[str] = ..., value: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., reference: _Optional[str] = ...) -> None: ...

class EvaluationSummary(_message.Message):
    __slots__ = ("dataset", "protocol", "metrics")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    protocol: str
    metrics: _containers.RepeatedCompositeFieldContainer[MetricValue]
    def __init__(self, dataset: _Optional[str] = ..., protocol: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[MetricValue, _Mapping]]] = ...) -> None: ...

class TrainingInfo(_message.Message):
    __slots__ = ("dataset", "dataset_fingerprint", "meta_steps", "seed", "wall_time_s", "torch_version", "checkpoint_sha256", "best_validation_loss")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    META_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    BEST_VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    dataset_fingerprint: str
    meta_steps: int
    seed: int
    wall_time_s: float
    torch_version: str
    checkpoint_sha256: str
    best_validation_loss: float
    def __init__(self, dataset: _Optional[str] = ..., dataset_fingerprint: _Optional[str] = ..., meta_steps: _Optional[int] = ..., seed: _Optional[int] = ..., wall_time_s: _Optional[float] = ..., torch_version: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., best_validation_loss: _Optional[float] = ...) -> None: ...

class FileDigest(_message.Message):
    __slots__ = ("path", "sha256", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ExportCheck(_message.Message):
    __slots__ = ("shape", "max_abs_diff_onnx", "max_abs_diff_torch_export")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_ONNX_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_TORCH_EXPORT_FIELD_NUMBER: _ClassVar[int]
    shape: str
    max_abs_diff_onnx: float
    max_abs_diff_torch_export: float
    def __init__(self, shape: _Optional[str] = ..., max_abs_diff_onnx: _Optional[float] = ..., max_abs_diff_torch_export: _Optional[float] = ...) -> None: ...
