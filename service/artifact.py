"""Loading an exported artifact: verify every file, then read the schema and the catalog.

An artifact is the directory `<repository>/<model_name>/<version>/` that training's
export writes: `manifest.json` (warmstart.v1.ArtifactManifest in protobuf's JSON
mapping) beside the files it lists with their sha256. Nothing in the directory is used
before every listed file has been checked, and a file the manifest does not list is an
error too: versions are immutable, so an extra file means the directory is not what the
exporter wrote.

The encoder reproduces training's encoding (training/features.py) exactly: each field
owns `width` int64 slots holding 0 = no value, 1 = out of vocabulary, 2 + i =
vocabulary[i]; a multi-valued field takes its distinct values sorted as text, the first
`width` of them; the item-id field is filled from the item id itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
from safetensors.numpy import load as load_safetensors

from service.errors import FieldViolation, InvalidArgument, echo, echo_key
from warmstart import contract, onboarding, signature
from warmstart.contract import ItemTable
from warmstart.signature import SIGNATURE_FILE
from warmstart.v1 import manifest_pb2 as pb

MANIFEST_FILE = contract.MANIFEST_FILE
MANIFEST_DIGEST_FILE = contract.MANIFEST_DIGEST_FILE
UNLISTED_FILES = contract.UNLISTED_FILES
SUPPORTED_SCHEMA_VERSIONS = contract.SUPPORTED_SCHEMA_VERSIONS
INPUT_NAMES = contract.INPUT_NAMES
OUTPUT_NAMES = contract.OUTPUT_NAMES
REQUIRED_OUTPUTS = contract.REQUIRED_OUTPUTS  # engagement: optional head
CATALOG_TENSOR = contract.CATALOG_TENSOR

PAD = contract.PAD
OOV = contract.OOV
FIRST_CODE = contract.FIRST_CODE

DType = Literal["int64", "float32"]
_DTYPES: dict[int, DType] = {pb.INT64: "int64", pb.FLOAT32: "float32"}


class ArtifactError(Exception):
    """An artifact was refused; `file` names the file at fault (relative to the artifact)."""

    reason = "invalid"  # label of warmstart_model_load_failures_total

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


class ManifestError(ArtifactError):
    """manifest.json is unreadable or describes something the service cannot serve."""

    reason = "manifest"


class UnsupportedSchemaError(ArtifactError):
    reason = "schema_version"


class MissingFileError(ArtifactError):
    reason = "missing_file"


class ChecksumMismatchError(ArtifactError):
    """A listed file's size or sha256 differs from the manifest: it was changed or truncated."""

    reason = "checksum"


class UnlistedFileError(ArtifactError):
    reason = "unlisted_file"


class ContentError(ArtifactError):
    """A listed file is intact but its content contradicts the manifest."""

    reason = "content"


class SignatureRefusedError(ArtifactError):
    """The server trusts signed versions only, and this one is unsigned or signed by a key it does not trust."""

    reason = "signature"


class GraphMismatchError(ArtifactError):
    """A graph's inputs or outputs differ from the manifest's GraphSpec."""

    reason = "graph_mismatch"


_BY_REASON: dict[str, type[ArtifactError]] = {
    cls.reason: cls
    for cls in (ManifestError, UnsupportedSchemaError, MissingFileError, ChecksumMismatchError, UnlistedFileError, ContentError)
}


def _refused(exc: contract.ContractError) -> ArtifactError:
    """The service's error for a broken contract (its class labels the load-failure metric)."""
    return _BY_REASON.get(exc.reason, ContentError)(exc.file, exc.problem)


# ---------------------------------------------------------------------------------------
# Feature encoding


@dataclass(frozen=True)
class FieldCodec:
    """One categorical field: its slots in the encoded row and its vocabulary."""

    name: str
    multi_valued: bool
    width: int
    offset: int
    vocabulary: tuple[str, ...]
    index: Mapping[str, int]  # value -> code

    @staticmethod
    def build(name: str, multi_valued: bool, width: int, offset: int, vocabulary: Sequence[str]) -> "FieldCodec":
        return FieldCodec(name, multi_valued, width, offset, tuple(vocabulary), contract.vocabulary_index(vocabulary))

    @property
    def num_codes(self) -> int:
        return FIRST_CODE + len(self.vocabulary)

    def parse(self, text: str, separator: str) -> tuple[str, ...]:
        """Values in an attribute's text (warmstart.contract.parse_values)."""
        return contract.parse_values(text, separator, self.multi_valued)

    def codes(self, values: Sequence[str]) -> list[int]:
        """Codes of the distinct values sorted as text, at most `width` of them."""
        return contract.field_codes(self.index, values, self.width)


class FeatureEncoder:
    """Encodes user attributes and items into the model's int64 rows."""

    def __init__(
        self,
        user_fields: Sequence[FieldCodec],
        item_fields: Sequence[FieldCodec],
        separator: str,
        item_id_field: str,
    ) -> None:
        self.user_fields = tuple(user_fields)
        self.item_fields = tuple(item_fields)
        self.user_width = sum(f.width for f in user_fields)
        self.item_width = sum(f.width for f in item_fields)
        self.separator = separator
        self.item_id_field = item_id_field
        self._user_by_name = {f.name: f for f in user_fields}
        self._item_by_name = {f.name: f for f in item_fields}
        self._id_codec = self._item_by_name.get(item_id_field) if item_id_field else None

    # Parsed values (what training's FeatureSchema.encode_user / encode_item take).

    def encode_user_values(self, values: Mapping[str, Sequence[str]]) -> np.ndarray:
        """(user_width,) codes; fields absent from `values` are padding."""
        row = np.zeros(self.user_width, dtype=np.int64)
        for f in self.user_fields:
            _put(row, f, f.codes(values.get(f.name, ())))
        return row

    def encode_item_values(self, item_id: str, values: Mapping[str, Sequence[str]]) -> np.ndarray:
        """(item_width,) codes; the item id fills the item-id field when the model has one."""
        row = np.zeros(self.item_width, dtype=np.int64)
        for f in self.item_fields:
            _put(row, f, f.codes((item_id,) if f is self._id_codec else values.get(f.name, ())))
        return row

    # Request text, validated.

    def encode_user(self, attributes: Mapping[str, str], field: str, allow_unknown_values: bool) -> np.ndarray:
        """Encodes a request's user attributes; unknown names (and values, unless allowed) raise."""
        row = np.zeros(self.user_width, dtype=np.int64)
        if not attributes:
            return row
        violations = self._fill(row, self._user_by_name, attributes, field, "user", allow_unknown_values)
        if violations:
            raise InvalidArgument(violations)
        return row

    def encode_item(
        self, item_id: str, attributes: Mapping[str, str], field: str, allow_unknown_values: bool
    ) -> tuple[np.ndarray | None, list[FieldViolation]]:
        """Encodes an item the catalog does not know from its inline attributes.

        Returns the row, or None and the violations (the caller gathers them across items).
        """
        row = np.zeros(self.item_width, dtype=np.int64)
        violations = self._fill(row, self._item_by_name, attributes, field, "item", allow_unknown_values)
        if violations:
            return None, violations
        if self._id_codec is not None:
            _put(row, self._id_codec, self._id_codec.codes((item_id,)))
        return row, violations

    def _fill(
        self,
        row: np.ndarray,
        by_name: Mapping[str, FieldCodec],
        attributes: Mapping[str, str],
        field: str,
        side: str,
        allow_unknown_values: bool,
    ) -> list[FieldViolation]:
        violations: list[FieldViolation] = []
        for name, text in attributes.items():
            codec = by_name.get(name)
            where = f"{field}[{echo_key(name)}]"
            if codec is None:
                known = ", ".join(sorted(n for n in by_name if by_name[n] is not self._id_codec)) or "none"
                violations.append(FieldViolation(where, f"unknown {side} attribute (known: {echo(known, 120)})"))
                continue
            if codec is self._id_codec:
                violations.append(FieldViolation(where, "reserved: the item id itself fills this field"))
                continue
            values = codec.parse(text, self.separator)
            if not allow_unknown_values:
                unknown = sorted({v for v in values if v not in codec.index})
                if unknown:
                    shown = ", ".join(echo(v, 40) for v in unknown[:3])
                    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                    violations.append(FieldViolation(where, f"value(s) not in the vocabulary: {shown}{more}"))
                    continue
            _put(row, codec, codec.codes(values))
        return violations


def _put(row: np.ndarray, codec: FieldCodec, codes: list[int]) -> None:
    row[codec.offset : codec.offset + len(codes)] = codes


# ---------------------------------------------------------------------------------------
# The artifact


@dataclass(frozen=True)
class TensorSignature:
    """A graph input or output: name, dtype and dims (an int is static, None is dynamic)."""

    name: str
    dtype: DType
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass(frozen=True)
class LabelRange:
    kind: Literal["rating", "click"]
    min_value: float
    max_value: float


@dataclass(frozen=True)
class Catalog:
    """The items the model knows, encoded once: row r of `codes` is item_ids[r]."""

    item_ids: tuple[str, ...]
    codes: np.ndarray  # (size, item_width) int64, read-only
    row_of: Mapping[str, int]

    @property
    def size(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: its manifest, encoder, catalog and graph files."""

    path: Path
    manifest: pb.ArtifactManifest
    encoder: FeatureEncoder
    catalog: Catalog
    label: LabelRange
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    # Every catalog item's scoring vectors (None in artifacts from before the table, and for
    # models without one: those rank the catalog through the fused graph).
    item_table: ItemTable | None = None
    adapt_inputs: tuple[TensorSignature, ...] = ()  # the adapt graph's (present with the item table)
    adapt_outputs: tuple[TensorSignature, ...] = ()
    # The user's prior precision per head for the Onboard RPC (warmstart.onboarding.PRIOR_FILE);
    # None for a version exported without it.
    onboarding_prior: onboarding.Prior | None = None

    @property
    def model_name(self) -> str:
        return self.manifest.model_name

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def inner_steps(self) -> int:
        return self.manifest.inner_loop.steps

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's outputs, in OUTPUT_NAMES order (what engines return, positionally)."""
        present = {t.name for t in self.outputs}
        return tuple(n for n in OUTPUT_NAMES if n in present)

    @property
    def has_engagement(self) -> bool:
        """The model has an engagement head: Recommend ranks by it unless asked otherwise."""
        return "query_engagement" in self.output_names

    @property
    def adapt_output_names(self) -> tuple[str, ...]:
        """The adapt graph's outputs, in contract order (what engines return, positionally)."""
        present = {t.name for t in self.adapt_outputs}
        return tuple(n for n in contract.ADAPT_OUTPUT_NAMES if n in present)

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.graph.onnx_file

    @property
    def adapt_onnx_path(self) -> Path:
        return self.path / self.manifest.adapt_graph.onnx_file

    @property
    def adapt_torch_export_path(self) -> Path:
        return self.path / self.manifest.adapt_graph.torch_export_file

    @property
    def torch_export_path(self) -> Path:
        return self.path / self.manifest.graph.torch_export_file

    def check_graph(
        self, file: str, inputs: Sequence[TensorSignature], outputs: Sequence[TensorSignature], extra_inputs_ok: bool = False
    ) -> None:
        """Raises GraphMismatchError unless a loaded graph has the manifest's inputs and outputs.

        extra_inputs_ok: the graph may take more of the known inputs than the manifest
        lists (the torch program always takes all five; the ONNX export drops unused ones).
        """
        _compare_signatures(file, "input", self.inputs, inputs, extra_inputs_ok)
        _compare_signatures(file, "output", self.outputs, outputs, False)

    def check_adapt_graph(
        self, file: str, inputs: Sequence[TensorSignature], outputs: Sequence[TensorSignature], extra_inputs_ok: bool = False
    ) -> None:
        """check_graph for the adapt graph, against the manifest's adapt_graph."""
        _compare_signatures(file, "input", self.adapt_inputs, inputs, extra_inputs_ok)
        _compare_signatures(file, "output", self.adapt_outputs, outputs, False)


def _compare_signatures(
    file: str, kind: str, expected: Sequence[TensorSignature], actual: Sequence[TensorSignature], extra_ok: bool
) -> None:
    by_name = {t.name: t for t in actual}
    for want in expected:
        got = by_name.get(want.name)
        if got is None:
            raise GraphMismatchError(file, f"the graph has no {kind} {want.name!r} (manifest: {want.describe()})")
        same_dims = len(got.shape) == len(want.shape) and all(
            (g is None) == (w is None) and (w is None or g == w) for g, w in zip(got.shape, want.shape)
        )
        if got.dtype != want.dtype or not same_dims:
            raise GraphMismatchError(file, f"{kind} {got.describe()} differs from the manifest's {want.describe()}")
    unexpected = sorted(set(by_name) - {t.name for t in expected})
    if extra_ok:
        unexpected = [n for n in unexpected if n not in INPUT_NAMES]
    if unexpected:
        raise GraphMismatchError(file, f"the graph has {kind}(s) the manifest does not list: {', '.join(unexpected)}")


def load_artifact(path: Path, trusted_keys: Sequence | None = None) -> Artifact:
    """Verifies and loads one artifact directory; raises an ArtifactError naming the file at fault.

    trusted_keys: Ed25519 public keys; when given, the version must carry a manifest.sig
    that one of them verifies (warmstart.signature)."""
    path = Path(path)
    manifest = read_manifest(path, trusted_keys)
    verify_files(path, manifest)
    encoder = _encoder(path, manifest)
    label = _label(manifest.label)
    inputs, outputs = _graph_signatures(manifest, encoder)
    catalog = _catalog(path, manifest, encoder)
    item_table = _item_table(path, manifest, catalog, "query_engagement" in {t.name for t in outputs})
    adapt_inputs, adapt_outputs = _adapt_signatures(manifest, encoder, item_table)
    return Artifact(
        path, manifest, encoder, catalog, label, inputs, outputs, item_table, adapt_inputs, adapt_outputs, _onboarding_prior(path, manifest)
    )


def read_manifest(path: Path, trusted_keys: Sequence | None = None) -> pb.ArtifactManifest:
    """Parses manifest.json (after its digest, and its signature when trusted_keys are
    given); the schema version is checked before the rest is interpreted."""
    file = path / MANIFEST_FILE
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(MANIFEST_FILE, f"no manifest in {path}") from None
    except OSError as exc:
        raise ManifestError(MANIFEST_FILE, f"unreadable: {exc}") from exc
    try:
        contract.check_manifest_digest(path, data)
        if trusted_keys is not None:
            _check_signature(path, data, trusted_keys)
        return contract.parse_manifest(data)
    except contract.ContractError as exc:
        raise _refused(exc) from exc


def _check_signature(path: Path, manifest_bytes: bytes, trusted_keys: Sequence) -> None:
    try:
        text = (path / SIGNATURE_FILE).read_text(encoding="ascii")
    except FileNotFoundError:
        raise SignatureRefusedError(SIGNATURE_FILE, "missing: this server serves signed versions only (--trusted-keys)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SignatureRefusedError(SIGNATURE_FILE, f"unreadable: {exc}") from exc
    try:
        signature.verify(manifest_bytes, text, trusted_keys)
    except signature.SignatureError as exc:
        raise SignatureRefusedError(SIGNATURE_FILE, str(exc)) from exc


sha256_file = contract.sha256_file


def verify_files(path: Path, manifest: pb.ArtifactManifest) -> None:
    """Every listed file exists with its size and sha256; no other file is there."""
    try:
        contract.verify_files(path, manifest)
    except contract.ContractError as exc:
        raise _refused(exc) from exc


def _listed(manifest: pb.ArtifactManifest, relative: str, what: str) -> str:
    if relative not in {entry.path for entry in manifest.files}:
        raise ManifestError(MANIFEST_FILE, f"{what} {relative!r} is not among the listed files")
    return relative


def _read_lines(path: Path, relative: str) -> list[str]:
    """One value per line, by the contract's one rule (warmstart.contract.parse_lines)."""
    try:
        return contract.parse_lines((path / relative).read_bytes(), relative)
    except contract.ContractError as exc:
        raise _refused(exc) from exc


def _encoder(path: Path, manifest: pb.ArtifactManifest) -> FeatureEncoder:
    schema = manifest.feature_schema
    if not schema.multi_value_separator:
        raise ManifestError(MANIFEST_FILE, "feature_schema.multi_value_separator is empty")
    sides: dict[int, list[FieldCodec]] = {pb.USER: [], pb.ITEM: []}
    for field in schema.fields:
        if field.side not in sides:
            raise ManifestError(MANIFEST_FILE, f"field {field.name!r} has no side")
        codecs = sides[field.side]
        where = f"field {field.name!r}"
        if not field.name or any(c.name == field.name for c in codecs):
            raise ManifestError(MANIFEST_FILE, f"{where}: names must be non-empty and unique per side")
        if field.width < 1 or (not field.multi_valued and field.width != 1):
            raise ManifestError(MANIFEST_FILE, f"{where}: width {field.width} (single-valued fields have width 1)")
        expected_offset = sum(c.width for c in codecs)
        if field.offset != expected_offset:
            raise ManifestError(MANIFEST_FILE, f"{where}: offset {field.offset}, expected {expected_offset} (slot order)")
        if field.vocabulary_file:
            if field.vocabulary:
                raise ManifestError(MANIFEST_FILE, f"{where}: both an inline vocabulary and a vocabulary_file")
            vocabulary = _read_lines(path, _listed(manifest, field.vocabulary_file, f"{where}: vocabulary_file"))
            source = field.vocabulary_file
        else:
            vocabulary = list(field.vocabulary)
            source = MANIFEST_FILE
        if len(vocabulary) != field.vocabulary_size:
            raise ContentError(source, f"{where}: {len(vocabulary)} values, vocabulary_size says {field.vocabulary_size}")
        if len(set(vocabulary)) != len(vocabulary):
            raise ContentError(source, f"{where}: the vocabulary has duplicate values")
        codecs.append(FieldCodec.build(field.name, field.multi_valued, field.width, field.offset, vocabulary))
    user_fields, item_fields = sides[pb.USER], sides[pb.ITEM]
    if sum(f.width for f in user_fields) != schema.user_width or sum(f.width for f in item_fields) != schema.item_width:
        raise ManifestError(MANIFEST_FILE, "feature_schema widths differ from the sum of their fields' widths")
    if schema.item_width < 1:
        raise ManifestError(MANIFEST_FILE, "feature_schema has no item field")
    id_field = schema.item_id_field
    if id_field and not any(f.name == id_field and not f.multi_valued for f in item_fields):
        raise ManifestError(MANIFEST_FILE, f"item_id_field {id_field!r} is not a single-valued item field")
    return FeatureEncoder(user_fields, item_fields, schema.multi_value_separator, id_field)


def _label(spec: pb.LabelSpec) -> LabelRange:
    if spec.kind == pb.CLICK:
        if (spec.min_value, spec.max_value) != (0.0, 1.0):
            raise ManifestError(MANIFEST_FILE, "a CLICK label has the range [0, 1]")
        return LabelRange("click", 0.0, 1.0)
    if spec.kind == pb.RATING:
        if not (math.isfinite(spec.min_value) and math.isfinite(spec.max_value) and spec.min_value < spec.max_value):
            raise ManifestError(MANIFEST_FILE, f"label range [{spec.min_value}, {spec.max_value}] is not a finite interval")
        return LabelRange("rating", spec.min_value, spec.max_value)
    raise ManifestError(MANIFEST_FILE, f"label kind {spec.kind} is neither RATING nor CLICK")


def _signature(spec: pb.TensorSpec) -> TensorSignature:
    if spec.dtype not in _DTYPES:
        raise ManifestError(MANIFEST_FILE, f"graph tensor {spec.name!r} has dtype {spec.dtype}")
    dims = tuple(int(d.size) if d.WhichOneof("value") == "size" else None for d in spec.shape)
    return TensorSignature(spec.name, _DTYPES[spec.dtype], dims)


def _graph_signatures(
    manifest: pb.ArtifactManifest, encoder: FeatureEncoder
) -> tuple[tuple[TensorSignature, ...], tuple[TensorSignature, ...]]:
    graph = manifest.graph
    _listed(manifest, graph.onnx_file, "graph.onnx_file")
    _listed(manifest, graph.torch_export_file, "graph.torch_export_file")
    expected = contract.graph_shapes(encoder.user_width, encoder.item_width)
    inputs = tuple(_signature(s) for s in graph.inputs)
    outputs = tuple(_signature(s) for s in graph.outputs)
    for kind, tensors, names, required in (
        ("input", inputs, INPUT_NAMES, {"support_items", "query_items"}),
        ("output", outputs, OUTPUT_NAMES, set(REQUIRED_OUTPUTS)),
    ):
        seen = [t.name for t in tensors]
        if len(set(seen)) != len(seen) or not set(seen) <= set(names) or not required <= set(seen):
            raise ManifestError(MANIFEST_FILE, f"graph {kind}s {seen} must be distinct names among {list(names)}, with {sorted(required)}")
        for tensor in tensors:
            if (tensor.dtype, tensor.shape) != expected[tensor.name]:
                want = TensorSignature(tensor.name, *expected[tensor.name])
                raise ManifestError(MANIFEST_FILE, f"graph {kind} {tensor.describe()}; the feature schema implies {want.describe()}")
    return inputs, outputs


def _adapt_signatures(
    manifest: pb.ArtifactManifest, encoder: FeatureEncoder, table: ItemTable | None
) -> tuple[tuple[TensorSignature, ...], tuple[TensorSignature, ...]]:
    """The adapt graph's inputs and outputs; the graph comes with the item table or not at all."""
    if not manifest.HasField("adapt_graph"):
        if table is not None:
            raise ManifestError(MANIFEST_FILE, "an item_table without the adapt_graph that scores against it")
        return (), ()
    if table is None:
        raise ManifestError(MANIFEST_FILE, "an adapt_graph without the item_table it scores against")
    graph = manifest.adapt_graph
    _listed(manifest, graph.onnx_file, "adapt_graph.onnx_file")
    _listed(manifest, graph.torch_export_file, "adapt_graph.torch_export_file")
    expected = contract.graph_shapes(encoder.user_width, encoder.item_width, table.factors, table.engagement_width)
    inputs = tuple(_signature(s) for s in graph.inputs)
    outputs = tuple(_signature(s) for s in graph.outputs)
    required_outputs = set(contract.adapt_output_names(table.has_engagement))
    for kind, tensors, names, required in (
        ("input", inputs, contract.ADAPT_INPUT_NAMES, {"support_items"}),
        ("output", outputs, required_outputs, required_outputs),
    ):
        seen = [t.name for t in tensors]
        if len(set(seen)) != len(seen) or not set(seen) <= set(names) or not required <= set(seen):
            raise ManifestError(MANIFEST_FILE, f"adapt graph {kind}s {seen} must be distinct names among {sorted(names)}, with {sorted(required)}")
        for tensor in tensors:
            if (tensor.dtype, tensor.shape) != expected[tensor.name]:
                want = TensorSignature(tensor.name, *expected[tensor.name])
                raise ManifestError(MANIFEST_FILE, f"adapt graph {kind} {tensor.describe()}; the schema and item table imply {want.describe()}")
    return inputs, outputs


def _catalog(path: Path, manifest: pb.ArtifactManifest, encoder: FeatureEncoder) -> Catalog:
    spec = manifest.catalog
    if not spec.ids_file and not spec.features_file and spec.size == 0:
        return Catalog((), np.zeros((0, encoder.item_width), dtype=np.int64), {})
    ids_file = _listed(manifest, spec.ids_file, "catalog.ids_file")
    features_file = _listed(manifest, spec.features_file, "catalog.features_file")
    item_ids = _read_lines(path, ids_file)
    if len(item_ids) != spec.size:
        raise ContentError(ids_file, f"{len(item_ids)} item ids, catalog.size says {spec.size}")
    row_of = {item: row for row, item in enumerate(item_ids)}
    if len(row_of) != len(item_ids):
        raise ContentError(ids_file, "duplicate item ids")
    try:
        tensors = load_safetensors((path / features_file).read_bytes())
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ContentError(features_file, f"not a readable safetensors file: {exc}") from exc
    codes = tensors.get(CATALOG_TENSOR)
    expected_shape = (len(item_ids), encoder.item_width)
    if codes is None or codes.dtype != np.int64 or codes.shape != expected_shape:
        found = "missing" if codes is None else f"{codes.dtype}{list(codes.shape)}"
        raise ContentError(features_file, f"{CATALOG_TENSOR!r} must be int64{list(expected_shape)}, found {found}")
    for f in encoder.item_fields:
        block = codes[:, f.offset : f.offset + f.width]
        if block.size and (block.min() < 0 or block.max() >= f.num_codes):
            raise ContentError(features_file, f"codes of field {f.name!r} outside [0, {f.num_codes})")
    codes = np.ascontiguousarray(codes)
    codes.setflags(write=False)
    return Catalog(tuple(item_ids), codes, row_of)


def _item_table(path: Path, manifest: pb.ArtifactManifest, catalog: Catalog, engagement: bool) -> ItemTable | None:
    """The item table the manifest describes (rows = catalog rows), or None without one."""
    if not manifest.HasField("item_table"):
        return None
    spec = manifest.item_table
    file = _listed(manifest, spec.file, "item_table.file")
    if spec.size != catalog.size:
        raise ManifestError(MANIFEST_FILE, f"item_table.size {spec.size} differs from catalog.size {catalog.size}")
    if spec.rating_factors < 1 or bool(spec.engagement_factors) != engagement:
        raise ManifestError(
            MANIFEST_FILE,
            f"item_table has {spec.rating_factors} rating and {spec.engagement_factors} engagement factors "
            f"for a model {'with' if engagement else 'without'} the engagement head",
        )
    try:
        return contract.parse_item_table((path / file).read_bytes(), catalog.size, spec.rating_factors, spec.engagement_factors, file)
    except contract.ContractError as exc:
        raise _refused(exc) from exc


def _onboarding_prior(path: Path, manifest: pb.ArtifactManifest) -> onboarding.Prior | None:
    """The onboarding prior, when the version has one (checked like every listed file)."""
    if not any(f.path == onboarding.PRIOR_FILE for f in manifest.files):
        return None
    try:
        tensors = load_safetensors((path / onboarding.PRIOR_FILE).read_bytes())
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ContentError(onboarding.PRIOR_FILE, f"not a readable safetensors file: {exc}") from exc
    try:
        return onboarding.prior_from_tensors(tensors)
    except ValueError as exc:
        raise ContentError(onboarding.PRIOR_FILE, str(exc)) from exc
