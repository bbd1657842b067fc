"""Catalog refresh without retraining: a new version of an artifact with items added or removed.

A shop adds items daily; retraining for each is neither needed nor wanted (the model is
the same model). The new version keeps every graph, the initialisation and the
vocabularies byte for byte, and changes only the catalog (catalog_items.txt,
catalog.safetensors) and the item table:

- removed items' rows are dropped (the others keep their rows' values exactly);
- added items are encoded from their attributes with the artifact's own schema (an id
  outside the trained vocabulary takes the out-of-vocabulary row, as an inline item in a
  request does) and their scoring vectors are computed by the trained item side, the
  same function export used: the refreshed version scores a new item exactly as the old
  version scores it sent inline.

The engagement head's catalog term (the mean p p' over the training catalog, a parameter
of the graphs) is kept as trained: it is part of the model, and changing it would change
every user's adaptation, which is what a retraining does.

Like an export it is verified before anything is published (the source version's
digests first; then the new table against the fused graph on random rows, the new items'
among them) and assembled under a temporary name, then renamed into place.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.export import (
    ExportError,
    check_item_table,
    compute_item_table,
    fsync_tree,
    load_exported_model,
    make_read_only,
    next_version,
    owner_tag,
    remove_abandoned_partials,
    verify_artifact,
)
from training.features import ITEM_ID_FIELD, FeatureSchema
from warmstart import contract as C
from warmstart.v1 import manifest_pb2 as pb

log = logging.getLogger(__name__)

# Files a refresh writes anew; every other file of the source version is copied as it is.
REWRITTEN = {C.CATALOG_IDS_FILE, C.CATALOG_FEATURES_FILE, C.ITEM_TABLE_FILE, *C.UNLISTED_FILES}


@dataclass(frozen=True)
class RefreshResult:
    path: Path
    manifest: pb.ArtifactManifest
    added: int
    removed: int
    wall_time_s: float


def read_items_csv(path: Path) -> dict[str, dict[str, str]]:
    """Items to add from a CSV file: a header `item_id,<attribute>,...`, then one item per
    row, attributes as text (several values of a multi-valued field joined by the schema's
    separator, "|"); an empty cell is no value."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or not rows[0] or rows[0][0] != ITEM_ID_FIELD:
        raise ValueError(f"{path}: the header must start with {ITEM_ID_FIELD!r}")
    header = rows[0]
    items: dict[str, dict[str, str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{number}: {len(row)} cells, the header has {len(header)}")
        item_id = row[0].strip()
        if not item_id:
            raise ValueError(f"{path}:{number}: empty item id")
        if item_id in items:
            raise ValueError(f"{path}:{number}: item {item_id!r} appears twice")
        items[item_id] = {name: cell for name, cell in zip(header[1:], row[1:]) if cell.strip()}
    return items


def read_ids(path: Path) -> list[str]:
    """Item ids to remove: one per line (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def encode_items(schema: FeatureSchema, items: Mapping[str, Mapping[str, str]], allow_unknown_values: bool = False) -> torch.Tensor:
    """(len(items), item_width) codes of items from their attribute text, as the service
    encodes an item sent inline; unknown fields, and unknown values unless allowed, are refused."""
    fields = {f.name: f for f in schema.item_fields if f.name != ITEM_ID_FIELD}
    rows = np.zeros((len(items), schema.item_width), dtype=np.int64)
    problems: list[str] = []
    for row, (item_id, attributes) in enumerate(items.items()):
        values: dict[str, tuple[str, ...]] = {}
        for name, text in attributes.items():
            field = fields.get(name)
            if field is None:
                problems.append(f"{item_id}: unknown item attribute {name!r} (known: {', '.join(sorted(fields)) or 'none'})")
                continue
            parsed = C.parse_values(text, schema.separator, field.multi_valued)
            unknown = sorted(v for v in set(parsed) if field.code(v) == C.OOV)
            if unknown and not allow_unknown_values:
                problems.append(f"{item_id}: {name} value(s) not in the vocabulary: {', '.join(unknown[:3])}")
                continue
            values[name] = parsed
        rows[row] = schema.encode_item(item_id, values)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("items to add refused: " + "; ".join(problems[:5]) + more)
    return torch.from_numpy(rows)


def refresh_catalog(
    source: Path,
    added: Mapping[str, Mapping[str, str]],
    removed: Sequence[str] = (),
    version: str | None = None,
    allow_unknown_values: bool = False,
    before_rename: Callable[[Path], None] | None = None,
) -> RefreshResult:
    """Writes `<model dir>/<version>/`: the verified version `source` with the `removed`
    item ids dropped from its catalog and the `added` items ({item_id: attribute text})
    appended. An id both removed and added is replaced (its new attributes)."""
    started = time.perf_counter()
    source = Path(source)
    manifest = verify_artifact(source)
    if not manifest.HasField("item_table"):
        raise ExportError(f"{source} has no item table (exported before it, or a {manifest.model.kind} model): re-export it")
    ids = C.read_lines(source / manifest.catalog.ids_file, manifest.catalog.ids_file)
    position = {item: row for row, item in enumerate(ids)}
    removed_set = set(removed)
    missing = sorted(removed_set - set(position))
    if missing:
        raise ValueError(f"cannot remove items the catalog does not hold: {', '.join(missing[:5])}")
    clashes = sorted(i for i in added if i in position and i not in removed_set)
    if clashes:
        raise ValueError(f"items already in the catalog (remove them too to replace them): {', '.join(clashes[:5])}")
    if not added and not removed_set:
        raise ValueError("nothing to add or remove")

    adapted = load_exported_model(source)
    codes = load_file(str(source / manifest.catalog.features_file))[C.CATALOG_TENSOR]
    spec = manifest.item_table
    table = C.parse_item_table((source / spec.file).read_bytes(), spec.size, spec.rating_factors, spec.engagement_factors, spec.file)
    keep = np.array([row for row, item in enumerate(ids) if item not in removed_set], dtype=np.int64)
    new_codes = encode_items(adapted.schema, added, allow_unknown_values)
    new_table = C.ItemTable.concatenate(table.take(keep), compute_item_table(adapted, new_codes))
    all_codes = torch.cat([codes[torch.from_numpy(keep)], new_codes]).contiguous()
    all_ids = [ids[row] for row in keep.tolist()] + list(added)
    if not all_ids:
        raise ValueError("the refreshed catalog would be empty")

    model_dir = source.parent
    version = version or next_version(model_dir)
    final = model_dir / version
    if final.exists():
        raise ExportError(f"{final} already exists: artifact versions are immutable")
    remove_abandoned_partials(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-{owner_tag()}-", dir=model_dir))
    try:
        for entry in manifest.files:
            if entry.path not in REWRITTEN:
                target = tmp / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / entry.path, target)
        save_file({C.CATALOG_TENSOR: all_codes}, str(tmp / C.CATALOG_FEATURES_FILE))
        C.write_lines(tmp / C.CATALOG_IDS_FILE, all_ids)
        (tmp / C.ITEM_TABLE_FILE).write_bytes(C.item_table_bytes(new_table))
        worst = check_item_table(adapted, tmp, new_table, all_codes)
        if added:  # the new items' rows, checked on their own
            worst = max(worst, check_item_table(adapted, tmp, new_table, all_codes, pool=np.arange(len(keep), len(all_ids))))

        refreshed = pb.ArtifactManifest()
        refreshed.CopyFrom(manifest)
        refreshed.model_version = version
        refreshed.created_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        refreshed.catalog.CopyFrom(pb.Catalog(ids_file=C.CATALOG_IDS_FILE, features_file=C.CATALOG_FEATURES_FILE, size=len(all_ids)))
        refreshed.item_table.size = new_table.size
        refreshed.item_table.max_abs_diff = worst
        refreshed.refresh.CopyFrom(
            pb.CatalogRefresh(from_version=manifest.model_version, items_added=len(added), items_removed=len(removed_set))
        )
        C.write_manifest(tmp, refreshed)
        fsync_tree(tmp)
        make_read_only(tmp)
        if before_rename is not None:
            before_rename(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    log.info("refreshed %s -> %s: %d added, %d removed, in %.2f s", source, final, len(added), len(removed_set), elapsed)
    return RefreshResult(final, refreshed, len(added), len(removed_set), elapsed)
