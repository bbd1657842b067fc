"""The artifact contract, written once: what export writes and the service reads.

numpy only (plus safetensors' numpy reader and the generated manifest module): the
service imports it without torch, training writes through it.

- graph names and shapes: the fused adapt-then-score graph and the adapt graph;
- the field codec: codes of a field's values (0 = no value, 1 = out of vocabulary,
  2 + i = vocabulary[i]; a multi-valued field takes its distinct values sorted as text,
  the first `width` of them);
- line files (vocabularies, catalog ids): one value per line, split on "\\n" only, every
  line ended by "\\n";
- the manifest: its JSON form, the digest sidecar, the file digests;
- the item table: every catalog item's scoring vectors, in catalog row order.

Errors are ContractError (a ValueError) naming the file at fault; the service maps
them to its own load-failure reasons.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

import numpy as np
from google.protobuf import json_format

from warmstart.signature import SIGNATURE_FILE
from warmstart.v1 import manifest_pb2 as pb

# -- files ---------------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = "manifest.sha256"  # the manifest's own sha256, in sha256sum format
ONNX_FILE = "model.onnx"
TORCH_PROGRAM_FILE = "torch_program.safetensors"
ADAPT_ONNX_FILE = "adapt.onnx"
ADAPT_TORCH_PROGRAM_FILE = "adapt_program.safetensors"
INIT_FILE = "init.safetensors"
CATALOG_IDS_FILE = "catalog_items.txt"
CATALOG_FEATURES_FILE = "catalog.safetensors"
CATALOG_TENSOR = "item_features"  # int64 (items, item_width) in catalog.safetensors
ITEM_TABLE_FILE = "item_table.safetensors"
# Files beside the manifest that it cannot list: itself, its digest, its optional signature.
UNLISTED_FILES = (MANIFEST_FILE, MANIFEST_DIGEST_FILE, SIGNATURE_FILE)
SUPPORTED_SCHEMA_VERSIONS = (pb.MANIFEST_SCHEMA_V1,)

# -- item table tensors ----------------------------------------------------------------------

RATING_OFFSET = "rating_offset"  # float32 () mu
RATING_BIAS = "rating_bias"  # float32 (N,) b_i: base + id + pooled attribute biases (no mu)
RATING_FACTORS = "rating_factors"  # float32 (N, d) q_i
ENGAGEMENT_BIAS = "engagement_bias"  # float32 (N,) c_i
ENGAGEMENT_FACTORS = "engagement_factors"  # float32 (N, e) p_i, unscaled, as the inner loop sees them
ENGAGEMENT_SCALE = "engagement_scale"  # float32 () exp(eng.log_scale)
RATING_TENSORS = (RATING_OFFSET, RATING_BIAS, RATING_FACTORS)
ENGAGEMENT_TENSORS = (ENGAGEMENT_BIAS, ENGAGEMENT_FACTORS, ENGAGEMENT_SCALE)

# -- graphs ----------------------------------------------------------------------------------

SUPPORT_INPUTS = ("user_features", "support_items", "support_labels", "support_mask")
INPUT_NAMES = (*SUPPORT_INPUTS, "query_items")  # the fused graph's inputs, in order
OUTPUT_NAMES = ("query_scores", "support_loss_before", "support_loss_after", "query_engagement")  # fused, in order
REQUIRED_OUTPUTS = OUTPUT_NAMES[:3]  # query_engagement: only with the engagement head
ENGAGEMENT_OUTPUT = "query_engagement"
ADAPT_INPUT_NAMES = SUPPORT_INPUTS  # the adapt graph's inputs, in order
# The adapt graph's outputs, in order: the adapted user parameters, then the support losses.
ADAPT_OUTPUT_NAMES = ("user_bias", "user_factors", "user_engagement", "support_loss_before", "support_loss_after")
ADAPT_REQUIRED_OUTPUTS = ("user_bias", "user_factors", "support_loss_before", "support_loss_after")
ADAPT_ENGAGEMENT_OUTPUT = "user_engagement"


class ContractError(ValueError):
    """A file breaks the artifact contract; `file` names it (relative to the artifact),
    `reason` says how: "manifest", "schema_version", "missing_file", "checksum",
    "unlisted_file" or "content" (the service's load-failure reasons)."""

    def __init__(self, file: str, problem: str, reason: str = "content") -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem
        self.reason = reason


def fused_output_names(engagement: bool) -> tuple[str, ...]:
    """The fused graph's outputs for a model with or without the engagement head."""
    return OUTPUT_NAMES if engagement else REQUIRED_OUTPUTS


def adapt_output_names(engagement: bool) -> tuple[str, ...]:
    """The adapt graph's outputs for a model with or without the engagement head."""
    return ADAPT_OUTPUT_NAMES if engagement else ADAPT_REQUIRED_OUTPUTS


Shape = tuple[int | None, ...]  # an int is static, None is dynamic


def graph_shapes(user_width: int, item_width: int, factors: int = 0, engagement_factors: int = 0) -> dict[str, tuple[str, Shape]]:
    """(dtype, shape) of every graph input and output the service feeds or reads.

    factors / engagement_factors: the adapt graph's user_factors / user_engagement
    widths (the item table's d and e)."""
    return {
        "user_features": ("int64", (None, user_width)),
        "support_items": ("int64", (None, None, item_width)),
        "support_labels": ("float32", (None, None)),
        "support_mask": ("float32", (None, None)),
        "query_items": ("int64", (None, None, item_width)),
        "query_scores": ("float32", (None, None)),
        "support_loss_before": ("float32", (None,)),
        "support_loss_after": ("float32", (None,)),
        "query_engagement": ("float32", (None, None)),
        "user_bias": ("float32", (None,)),
        "user_factors": ("float32", (None, factors)),
        "user_engagement": ("float32", (None, engagement_factors)),
    }


# -- the item table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemTable:
    """Every catalog item's scoring vectors, row r = catalog row r (arrays read-only).

    rating = rating_offset + rating_bias + user_bias + rating_factors . user_factors
    (then in label units: clamped to the rating range, or a probability for clicks);
    engagement = engagement_bias + engagement_scale * engagement_factors . user_engagement.
    """

    rating_offset: float
    rating_bias: np.ndarray  # (N,) float32
    rating_factors: np.ndarray  # (N, d) float32
    engagement_bias: np.ndarray | None = None  # (N,) float32; None without the engagement head
    engagement_factors: np.ndarray | None = None  # (N, e) float32
    engagement_scale: float | None = None

    @property
    def size(self) -> int:
        return int(self.rating_bias.shape[0])

    @property
    def factors(self) -> int:
        return int(self.rating_factors.shape[1])

    @property
    def has_engagement(self) -> bool:
        return self.engagement_factors is not None

    @property
    def engagement_width(self) -> int:
        return 0 if self.engagement_factors is None else int(self.engagement_factors.shape[1])

    def tensors(self) -> dict[str, np.ndarray]:
        """The safetensors content (contract names, float32, contiguous)."""
        out = {
            RATING_OFFSET: np.asarray(self.rating_offset, dtype=np.float32).reshape(()),
            RATING_BIAS: np.ascontiguousarray(self.rating_bias, dtype=np.float32),
            RATING_FACTORS: np.ascontiguousarray(self.rating_factors, dtype=np.float32),
        }
        if self.has_engagement:
            out[ENGAGEMENT_BIAS] = np.ascontiguousarray(self.engagement_bias, dtype=np.float32)
            out[ENGAGEMENT_FACTORS] = np.ascontiguousarray(self.engagement_factors, dtype=np.float32)
            out[ENGAGEMENT_SCALE] = np.asarray(self.engagement_scale, dtype=np.float32).reshape(())
        return out

    def take(self, rows: np.ndarray) -> "ItemTable":
        """The table of the given rows, in that order (a refreshed catalog's kept items)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ItemTable(
            self.rating_offset,
            self.rating_bias[rows],
            self.rating_factors[rows],
            None if self.engagement_bias is None else self.engagement_bias[rows],
            None if self.engagement_factors is None else self.engagement_factors[rows],
            self.engagement_scale,
        )

    @staticmethod
    def concatenate(first: "ItemTable", second: "ItemTable") -> "ItemTable":
        """Rows of `first` then `second` (same model: offsets and scales must agree)."""
        if first.rating_offset != second.rating_offset or first.engagement_scale != second.engagement_scale:
            raise ValueError("item tables of different models cannot be joined")

        def join(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        return ItemTable(
            first.rating_offset,
            join(first.rating_bias, second.rating_bias),
            join(first.rating_factors, second.rating_factors),
            join(first.engagement_bias, second.engagement_bias),
            join(first.engagement_factors, second.engagement_factors),
            first.engagement_scale,
        )


def item_table_bytes(table: ItemTable) -> bytes:
    """The table as item_table.safetensors' bytes."""
    from safetensors.numpy import save

    return save(table.tensors())


def parse_item_table(data: bytes, size: int, factors: int, engagement_factors: int, file: str = ITEM_TABLE_FILE) -> ItemTable:
    """Reads item_table.safetensors and checks it against what the manifest says: `size`
    rows, `factors` rating factors, `engagement_factors` engagement factors (0 = none)."""
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ContractError(file, f"not a readable safetensors file: {exc}") from exc
    expected: dict[str, tuple[int, ...]] = {RATING_OFFSET: (), RATING_BIAS: (size,), RATING_FACTORS: (size, factors)}
    if engagement_factors:
        expected.update({ENGAGEMENT_BIAS: (size,), ENGAGEMENT_FACTORS: (size, engagement_factors), ENGAGEMENT_SCALE: ()})
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ContractError(file, f"tensors the manifest does not describe: {', '.join(unexpected)}")
    for name, shape in expected.items():
        value = tensors.get(name)
        if value is None or value.dtype != np.float32 or value.shape != shape:
            found = "missing" if value is None else f"{value.dtype}{list(value.shape)}"
            raise ContractError(file, f"{name!r} must be float32{list(shape)}, found {found}")
        if not np.all(np.isfinite(value)):
            raise ContractError(file, f"{name!r} holds non-finite values")
        value.setflags(write=False)
    scale = float(tensors[ENGAGEMENT_SCALE]) if engagement_factors else None
    return ItemTable(
        float(tensors[RATING_OFFSET]),
        tensors[RATING_BIAS],
        tensors[RATING_FACTORS],
        tensors.get(ENGAGEMENT_BIAS),
        tensors.get(ENGAGEMENT_FACTORS),
        scale,
    )


def rating_scores(table: ItemTable, user_bias: float, user_factors: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Raw rating scores (float32) of the table's rows (all when rows is None) for one
    user; the reference formula of the contract (the service's scorers compute the same)."""
    bias = table.rating_bias if rows is None else table.rating_bias[rows]
    factors = table.rating_factors if rows is None else table.rating_factors[rows]
    return (np.float32(table.rating_offset) + bias + np.float32(user_bias) + factors @ user_factors.astype(np.float32)).astype(np.float32)


def engagement_scores(table: ItemTable, user_engagement: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Engagement logits (float32) of the table's rows for one user (see rating_scores)."""
    if not table.has_engagement:
        raise ValueError("this item table has no engagement head")
    bias = table.engagement_bias if rows is None else table.engagement_bias[rows]
    factors = table.engagement_factors if rows is None else table.engagement_factors[rows]
    return (bias + np.float32(table.engagement_scale) * (factors @ user_engagement.astype(np.float32))).astype(np.float32)


# -- line files and digests -----------------------------------------------------------------------


def lines_bytes(values: Sequence[str], file: str) -> bytes:
    """One value per line, each ended by "\\n"; a value holding a line break is refused
    (it would read back as two)."""
    for value in values:
        if "\n" in value or "\r" in value:
            raise ContractError(file, f"value {value[:64]!r} contains a line break")
    return "".join(f"{v}\n" for v in values).encode("utf-8")


def write_lines(path: Path, values: Sequence[str]) -> None:
    """Writes a line file (vocabulary, catalog ids) by the contract's one rule."""
    path.write_bytes(lines_bytes(values, path.name))


def parse_lines(data: bytes, file: str) -> list[str]:
    """The values of a line file: split on "\\n" only (values may hold other Unicode line
    separators, which str.splitlines would split on), the last line ended too."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError(file, f"not UTF-8: {exc}") from exc
    if not text:
        return []
    if not text.endswith("\n"):
        raise ContractError(file, "the last line has no line break (truncated?)")
    return text[:-1].split("\n")


def read_lines(path: Path, file: str | None = None) -> list[str]:
    """parse_lines of a file on disk."""
    return parse_lines(Path(path).read_bytes(), file or Path(path).name)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- the manifest --------------------------------------------------------------------------------


def manifest_json(manifest: pb.ArtifactManifest) -> str:
    """The manifest as manifest.json holds it (protobuf's JSON mapping, field names as in
    the proto, sorted keys, every field written)."""
    text = json_format.MessageToJson(
        manifest, indent=1, sort_keys=True, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return text + "\n"


def parse_manifest(data: bytes) -> pb.ArtifactManifest:
    """manifest.json's bytes, parsed; the schema version is checked before the rest is read."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ContractError(MANIFEST_FILE, f"unreadable: {exc}", "manifest") from exc
    except json.JSONDecodeError as exc:
        raise ContractError(MANIFEST_FILE, f"not valid JSON: {exc}", "manifest") from exc
    if not isinstance(raw, dict):
        raise ContractError(MANIFEST_FILE, "not a JSON object", "manifest")
    version = raw.get("schema_version", raw.get("schemaVersion"))
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        raise ContractError(MANIFEST_FILE, f"schema_version {version!r} is not supported (this code reads {supported})", "schema_version")
    try:
        return json_format.ParseDict(raw, pb.ArtifactManifest())
    except json_format.ParseError as exc:
        raise ContractError(MANIFEST_FILE, f"does not match ArtifactManifest: {exc}", "manifest") from exc


def manifest_digest_line(manifest_bytes: bytes) -> str:
    """manifest.sha256's content: the manifest's sha256 in sha256sum format."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST_FILE}\n"


def check_manifest_digest(directory: Path, manifest_bytes: bytes) -> None:
    """The manifest's bytes must match manifest.sha256 (`<hex>  manifest.json`)."""
    try:
        line = (Path(directory) / MANIFEST_DIGEST_FILE).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ContractError(MANIFEST_DIGEST_FILE, "the manifest's digest file is missing", "missing_file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractError(MANIFEST_DIGEST_FILE, f"unreadable: {exc}", "manifest") from exc
    parts = line.split()
    if len(parts) != 2 or parts[1].lstrip("*") != MANIFEST_FILE or len(parts[0]) != 64:
        raise ContractError(MANIFEST_DIGEST_FILE, f"expected '<sha256>  {MANIFEST_FILE}', got {line[:100]!r}", "manifest")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if digest != parts[0].lower():
        raise ContractError(MANIFEST_FILE, f"sha256 {digest} does not match {MANIFEST_DIGEST_FILE} ({parts[0]})", "checksum")


def file_digests(directory: Path) -> list[pb.FileDigest]:
    """A FileDigest of every file under `directory` but the unlisted ones, sorted by path."""
    directory = Path(directory)
    digests = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative not in UNLISTED_FILES:
            digests.append(pb.FileDigest(path=relative, sha256=sha256_file(path), size_bytes=path.stat().st_size))
    return digests


def write_manifest(directory: Path, manifest: pb.ArtifactManifest) -> None:
    """Lists every file of `directory` in the manifest (replacing `files`), then writes
    manifest.json and its digest sidecar: the manifest cannot list its own digest, so
    `sha256sum -c manifest.sha256` checks it and no byte of the artifact goes unchecked."""
    directory = Path(directory)
    del manifest.files[:]
    manifest.files.extend(file_digests(directory))
    data = manifest_json(manifest).encode("utf-8")
    (directory / MANIFEST_FILE).write_bytes(data)
    (directory / MANIFEST_DIGEST_FILE).write_text(manifest_digest_line(data), encoding="ascii")


def safe_relative(text: str) -> str:
    """A listed path, checked to be relative, inside the artifact and not the manifest."""
    relative = PurePosixPath(text)
    if not text or relative.is_absolute() or ".." in relative.parts or "\\" in text:
        raise ContractError(MANIFEST_FILE, f"file path {text!r} must be relative and inside the artifact", "manifest")
    if relative.as_posix() == MANIFEST_FILE:
        raise ContractError(MANIFEST_FILE, "lists manifest.json itself", "manifest")
    return relative.as_posix()


def verify_files(directory: Path, manifest: pb.ArtifactManifest) -> None:
    """Every listed file exists with its size and sha256; no other file is there (nor a
    symbolic link: an artifact holds plain files and directories only)."""
    path = Path(directory)
    root = path.resolve()
    listed: set[str] = set()
    for entry in manifest.files:
        relative = safe_relative(entry.path)
        if relative in listed:
            raise ContractError(MANIFEST_FILE, f"lists {relative!r} twice", "manifest")
        listed.add(relative)
        file = path / relative
        if not file.resolve().is_relative_to(root):
            raise ContractError(MANIFEST_FILE, f"{relative!r} resolves outside the artifact", "manifest")
        if not file.is_file():
            raise ContractError(relative, "listed in the manifest but missing", "missing_file")
        size = file.stat().st_size
        if size != entry.size_bytes:
            raise ContractError(relative, f"size {size} bytes, the manifest says {entry.size_bytes}", "checksum")
        digest = sha256_file(file)
        if digest != entry.sha256.lower():
            raise ContractError(relative, f"sha256 {digest} does not match the manifest's {entry.sha256}", "checksum")
    # os.walk does not enter linked directories but names them: every entry is seen.
    for current, subdirectories, files in os.walk(path):
        for name in sorted(subdirectories + files):
            entry_path = Path(current) / name
            relative = entry_path.relative_to(path).as_posix()
            if entry_path.is_symlink():
                raise ContractError(relative, "a symbolic link: an artifact holds plain files and directories only", "unlisted_file")
            if name in files and relative not in UNLISTED_FILES and relative not in listed:
                raise ContractError(relative, "present in the artifact but not listed in the manifest", "unlisted_file")


# -- field codec --------------------------------------------------------------------------------

PAD = 0  # no value in this slot
OOV = 1  # a value outside the vocabulary
FIRST_CODE = 2


def vocabulary_index(vocabulary: Sequence[str]) -> dict[str, int]:
    """value -> code of a field's vocabulary; duplicates are refused."""
    index = {value: FIRST_CODE + i for i, value in enumerate(vocabulary)}
    if len(index) != len(vocabulary):
        raise ValueError("the vocabulary has duplicate values")
    return index


def field_codes(index: Mapping[str, int], values: Sequence[str], width: int) -> list[int]:
    """Codes of a field's distinct values sorted as text, at most `width` of them (unpadded)."""
    return [index.get(v, OOV) for v in sorted(set(values))][:width]


def parse_values(text: str, separator: str, multi_valued: bool) -> tuple[str, ...]:
    """The values in an attribute's text: a multi-valued field's parts split on the
    separator, stripped, empty parts dropped; a single value stripped."""
    if multi_valued:
        return tuple(part.strip() for part in text.split(separator) if part.strip())
    value = text.strip()
    return (value,) if value else ()


def to_label_units(raw: np.ndarray, kind: str, low: float, high: float) -> np.ndarray:
    """Raw rating scores -> what a caller sees, as the fused graph computes it: ratings
    clamped to [low, high], or click probabilities (the logistic of the logit)."""
    if kind == "click":
        with np.errstate(over="ignore"):  # exp overflow is a probability of 0, as in the graph
            return (1.0 / (1.0 + np.exp(-raw))).astype(np.float32)
    return np.clip(raw, np.float32(low), np.float32(high)).astype(np.float32)


# -- sample batches ---------------------------------------------------------------------------------


def random_codes(fields: Sequence, width: int, lead: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """(*lead, width) int64 random codes of the given fields (anything with offset, width
    and num_codes), padding and out-of-vocabulary included: what export's checks and the
    service's load-time checks feed the graphs."""
    out = np.zeros((*lead, width), dtype=np.int64)
    for f in fields:
        out[..., f.offset : f.offset + f.width] = rng.integers(0, f.num_codes, size=(*lead, f.width))
    return out


def random_support(
    batch: int, support: int, kind: str, low: float, high: float, rng: np.random.Generator, ragged: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, mask), both (batch, support) float32: labels in the label range (0 / 1 for
    clicks); ragged masks are prefixes of random lengths, the first user with none."""
    if kind == "click":
        labels = rng.integers(0, 2, size=(batch, support)).astype(np.float32)
    else:
        labels = rng.uniform(low, high, size=(batch, support)).astype(np.float32)
    mask = np.ones((batch, support), dtype=np.float32)
    if ragged:
        lengths = rng.integers(0, support + 1, size=batch)
        lengths[0] = 0  # one user with no interactions at all
        mask = (np.arange(support)[None, :] < lengths[:, None]).astype(np.float32)
    return labels, mask
