"""Export: the artifact is self-describing, its three implementations agree, and a failed
or interrupted export writes nothing a server could load."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import json_format
from safetensors.torch import load_file

from training import export as E
from training.features import FeatureSchema, Field
from warmstart.torch_program import load_program
from warmstart.v1 import manifest_pb2 as pb


def test_artifact_layout_and_manifest(tiny_artifact):
    manifest = E.read_manifest(tiny_artifact)
    assert manifest.schema_version == pb.MANIFEST_SCHEMA_V1
    assert (manifest.model_name, manifest.model_version) == ("tiny", "1")
    listed = {f.path for f in manifest.files}
    on_disk = {p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json", "manifest.sha256"}
    digest, name = (tiny_artifact / "manifest.sha256").read_text().split()
    assert name == "manifest.json" and digest == E.sha256_file(tiny_artifact / "manifest.json")
    assert {"init.safetensors", "model.onnx", E.TORCH_PROGRAM_FILE, "catalog.safetensors", "catalog_items.txt"} <= listed
    assert {"training_summary.json", "training_log.jsonl"} <= listed
    for entry in manifest.files:
        assert E.sha256_file(tiny_artifact / entry.path) == entry.sha256
        assert (tiny_artifact / entry.path).stat().st_size == entry.size_bytes
    assert [i.name for i in manifest.graph.inputs] == list(E.INPUT_NAMES)
    assert [o.name for o in manifest.graph.outputs] == [*E.OUTPUT_NAMES, E.ENGAGEMENT_OUTPUT]  # the served structure has the engagement head
    assert len(manifest.export_checks) >= 4
    assert all(c.max_abs_diff_onnx <= 1e-4 and c.max_abs_diff_torch_export <= 1e-4 for c in manifest.export_checks)
    assert manifest.inner_loop.steps == 2 and manifest.model.adapted_parameters == ["user.bias", "user.factors"]
    assert {m.method for m in manifest.evaluation.metrics} == {"model", "bias"}


def test_manifest_round_trips(tiny_artifact):
    manifest = E.read_manifest(tiny_artifact)
    assert pb.ArtifactManifest.FromString(manifest.SerializeToString()) == manifest
    again = json_format.Parse(json_format.MessageToJson(manifest), pb.ArtifactManifest())
    assert again == manifest


def test_catalog_matches_the_vocabulary(tiny_artifact):
    manifest = E.read_manifest(tiny_artifact)
    ids = (tiny_artifact / "catalog_items.txt").read_text().splitlines()
    codes = load_file(str(tiny_artifact / "catalog.safetensors"))["item_features"]
    assert codes.shape == (manifest.catalog.size, manifest.feature_schema.item_width) and len(ids) == codes.shape[0]
    id_field = next(f for f in manifest.feature_schema.fields if f.name == manifest.feature_schema.item_id_field)
    vocabulary = list(id_field.vocabulary)
    for row, item in enumerate(ids):
        expected = vocabulary.index(item) + 2 if item in vocabulary else 1
        assert int(codes[row, id_field.offset]) == expected


@pytest.mark.parametrize("shape", [E.CheckShape(1, 1, 3, False), E.CheckShape(7, 13, 41, True), E.CheckShape(2, 64, 5, True), E.CheckShape(33, 2, 300, True)])
def test_onnx_torch_export_and_training_agree_on_fresh_shapes(tiny_artifact, shape):
    reference_model = E.load_exported_model(tiny_artifact)
    session = ort.InferenceSession(str(tiny_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    program = load_program(tiny_artifact / E.TORCH_PROGRAM_FILE).module()
    batch = E.random_batch(reference_model.schema, shape, np.random.default_rng(shape.batch * 1000 + shape.query), reference_model.label)
    with torch.no_grad():
        reference = [t.numpy() for t in reference_model.forward(batch)]
        exported = [t.numpy() for t in program(*batch)]
    from_onnx = session.run(list(E.output_names(reference_model)), {n: t.numpy() for n, t in zip(E.INPUT_NAMES, batch)})
    assert len(reference) == len(from_onnx) == len(exported) == 4  # scores, losses, engagement
    for ref, a, b in zip(reference, from_onnx, exported):
        assert ref.shape == a.shape == b.shape
        np.testing.assert_allclose(a, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(b, ref, atol=1e-4, rtol=0)
    scores = from_onnx[0]
    assert scores.min() >= 1.0 and scores.max() <= 5.0  # label units, clamped to the rating range


def test_onnx_dimensions_are_dynamic_and_widths_static(tiny_artifact):
    manifest = E.read_manifest(tiny_artifact)
    graph = onnx.load(str(tiny_artifact / "model.onnx")).graph
    for tensor, spec in zip(graph.input, manifest.graph.inputs):
        dims = tensor.type.tensor_type.shape.dim
        assert len(dims) == len(spec.shape)
        for dim, want in zip(dims, spec.shape):
            if want.WhichOneof("value") == "size":
                assert dim.dim_value == want.size
            else:
                assert dim.dim_param and not dim.dim_value


def test_exported_program_pins_no_device(tiny_artifact):
    assert E.device_pinned_nodes(load_program(tiny_artifact / E.TORCH_PROGRAM_FILE)) == []


@pytest.fixture(scope="module")
def tiny_model(tiny_artifact):
    """The tiny artifact's model and a catalog to re-export it with."""
    from training.batching import EncodedCatalog
    from training.synthetic import generate_synthetic

    model = E.load_exported_model(tiny_artifact)
    # One unrolled inner step: atomicity and refusals do not depend on the graph's size, and
    # the re-export is several times quicker than with the artifact's two.
    model = replace(model, inner_config=replace(model.inner_config, steps=1))
    return model, EncodedCatalog(model.schema, generate_synthetic(seed=3, n_users=240, n_items=150))


def test_an_interrupted_export_leaves_no_version(tiny_model, tmp_path):
    model, catalog = tiny_model

    def crash(partial: Path) -> None:
        assert (partial / "manifest.json").exists()  # everything was written ...
        raise KeyboardInterrupt  # ... and the process dies before the rename

    with pytest.raises(KeyboardInterrupt):
        E.export_artifact(model, catalog, tmp_path, "m", version="1", before_rename=crash)
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize("graph", ["fused", "adapt"])
def test_export_refuses_when_engines_disagree_and_writes_nothing(tiny_model, tmp_path, monkeypatch, graph):
    """Either graph's disagreement refuses the export; the fused graph's before the adapt graph is built."""
    model, catalog = tiny_model
    check = E.verify if graph == "fused" else E.verify_adapt
    adapt_exports = []
    real_adapt_export = E._export_adapt_graph

    def skewed(*args, **kwargs):
        checks = check(*args, **kwargs)
        checks[1].max_abs_diff_onnx = 3e-3
        return checks

    def counted(*args, **kwargs):
        adapt_exports.append(1)
        return real_adapt_export(*args, **kwargs)

    monkeypatch.setattr(E, check.__name__, skewed)
    monkeypatch.setattr(E, "_export_adapt_graph", counted)
    with pytest.raises(E.ExportError, match=r"disagree by up to 3\.00e-03"):
        E.export_artifact(model, catalog, tmp_path, "m", version="1")
    assert list((tmp_path / "m").iterdir()) == []
    assert len(adapt_exports) == (0 if graph == "fused" else 1)


def test_export_refuses_an_existing_version_and_bad_names(tiny_artifact, tiny_model):
    model, catalog = tiny_model
    repository = tiny_artifact.parent.parent
    with pytest.raises(E.ExportError, match="immutable"):
        E.export_artifact(model, catalog, repository, "tiny", version="1")
    with pytest.raises(E.ExportError, match="model name"):
        E.export_artifact(model, catalog, repository, "../evil", version="1")


def test_next_version_counts_up(tmp_path):
    assert E.next_version(tmp_path / "absent") == "1"
    for name in ("1", "2", "10", ".3.partial-x", "notes"):
        (tmp_path / name).mkdir()
    assert E.next_version(tmp_path) == "11"


def test_large_vocabularies_go_to_files(tmp_path):
    values = tuple(f"v{i:05d}" for i in range(E.INLINE_VOCABULARY_MAX + 1))
    schema = FeatureSchema((), (Field("item_id", "item", False, 1, 0, values),))
    spec = E._feature_schema(schema, tmp_path)
    field = spec.fields[0]
    assert not field.vocabulary and field.vocabulary_file == "vocab/item.item_id.txt"
    assert tuple((tmp_path / field.vocabulary_file).read_text().splitlines()) == values
    assert field.vocabulary_size == len(values)


def test_partial_directories_of_killed_exports_are_removed(tmp_path: Path):
    """An export killed midway leaves `.<version>.partial-<host>-<pid>-*`; the next export
    removes it once that process is gone, and leaves one still being written alone."""
    import os
    import subprocess
    import sys
    import time

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    tag = E.owner_tag().rsplit("-", 1)[0]
    dead = tmp_path / f".3.partial-{tag}-{dead_pid}-abc"
    live = tmp_path / f".4.partial-{tag}-{os.getpid()}-def"
    foreign_old = tmp_path / ".5.partial-otherhost-1-ghi"
    foreign_new = tmp_path / ".6.partial-otherhost-1-jkl"
    for directory in (dead, live, foreign_old, foreign_new):
        (directory / "vocab").mkdir(parents=True)
        (directory / "vocab" / "f.txt").write_text("x\n")
    (dead / "vocab").chmod(0o555)  # as make_read_only leaves it
    old = time.time() - E.PARTIAL_MAX_AGE_S - 60
    os.utime(foreign_old, (old, old))
    removed = E.remove_abandoned_partials(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, foreign_old.name])
    assert not dead.exists() and not foreign_old.exists() and live.exists() and foreign_new.exists()


def test_item_table_holds_every_catalog_item_in_row_order(tiny_artifact):
    from warmstart import contract as C

    manifest = E.read_manifest(tiny_artifact)
    spec = manifest.item_table
    assert spec.file == C.ITEM_TABLE_FILE and spec.file in {f.path for f in manifest.files}
    assert spec.size == manifest.catalog.size and spec.max_abs_diff <= E.TABLE_TOLERANCE
    table = C.parse_item_table((tiny_artifact / spec.file).read_bytes(), spec.size, spec.rating_factors, spec.engagement_factors)
    model = E.load_exported_model(tiny_artifact)
    codes = load_file(str(tiny_artifact / "catalog.safetensors"))["item_features"]
    with torch.no_grad():
        b, q = E.M.item_repr(model.model_config, model.schema, model.params, codes)
        c, p = E.M.item_engagement(model.model_config, model.schema, model.params, codes)
    assert (table.factors, table.engagement_width) == (model.model_config.factors, model.model_config.engagement_factors)
    np.testing.assert_array_equal(table.rating_bias, b.numpy())
    np.testing.assert_array_equal(table.rating_factors, q.numpy())
    np.testing.assert_array_equal(table.engagement_bias, c.numpy())
    np.testing.assert_array_equal(table.engagement_factors, p.numpy())
    assert table.rating_offset == float(model.params["mu"])
    assert table.engagement_scale == pytest.approx(float(torch.exp(model.params["eng.log_scale"])), rel=1e-6)


def test_item_table_scores_equal_the_fused_graph(tiny_artifact):
    """Catalog rows scored from the table, for users adapted by training's adapt step,
    equal the fused ONNX graph's outputs to 1e-5 (fresh shapes, not the export's check)."""
    from training.inner_loop import adapt_users
    from training.trainer import loss_kind_of
    from warmstart import contract as C

    model = E.load_exported_model(tiny_artifact)
    spec = E.read_manifest(tiny_artifact).item_table
    table = C.parse_item_table((tiny_artifact / spec.file).read_bytes(), spec.size, spec.rating_factors, spec.engagement_factors)
    codes = load_file(str(tiny_artifact / "catalog.safetensors"))["item_features"]
    session = ort.InferenceSession(str(tiny_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    batch, rows = E._table_batch(model.schema, E.CheckShape(9, 17, 60, ragged=True), rng, model.label, codes)
    fused = session.run(list(E.output_names(model)), {n: t.numpy() for n, t in zip(E.INPUT_NAMES, batch)})
    with torch.no_grad():
        users = adapt_users(model.model_config, model.inner_config, model.schema, model.params, batch, loss_kind_of(model.label))
    for u in range(9):
        raw = C.rating_scores(table, float(users.user_params["user.bias"][u]), users.user_params["user.factors"][u].numpy(), rows[u])
        np.testing.assert_allclose(C.to_label_units(raw, "rating", 1.0, 5.0), fused[0][u], atol=1e-5, rtol=0)
        np.testing.assert_allclose(C.engagement_scores(table, users.engagement_user[u].numpy(), rows[u]), fused[3][u], atol=1e-5, rtol=0)


def test_the_trace_example_avoids_every_size_the_model_has():
    """make_fx's symbolic trace gives equal sizes one symbol: the example batch it traces
    with takes sizes no parameter or feature row has (tests/training/test_memory.py
    exports a model with 4 factors and 3 engagement factors, the default sizes)."""
    from types import SimpleNamespace

    params = {"a": torch.zeros(4, 3), "b": torch.zeros(6)}
    model = SimpleNamespace(params=params, schema=SimpleNamespace(user_width=5, item_width=8))
    shape = E.trace_shape(model)
    assert (shape.batch, shape.support, shape.query) == (7, 9, 10)
    free = SimpleNamespace(params={"a": torch.zeros(16, 32)}, schema=SimpleNamespace(user_width=2, item_width=11))
    assert (E.trace_shape(free).batch, E.trace_shape(free).support, E.trace_shape(free).query) == (3, 4, 5)
