"""The artifact loader: what it accepts, every way it refuses, and the encoding contract."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from service.artifact import (
    ArtifactError,
    ChecksumMismatchError,
    GraphMismatchError,
    ManifestError,
    MissingFileError,
    SignatureRefusedError,
    UnlistedFileError,
    UnsupportedSchemaError,
    load_artifact,
    sha256_file,
)
from service.engines import EngineConfig, create_engine
from service.errors import InvalidArgument
from service.repository import ModelLoadError, ModelSettings, load_model
from tests.service.harness import edit_manifest, reseal_manifest, writable_copy
from training.features import FeatureSchema, Field


@pytest.fixture()
def copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    return writable_copy(tiny_artifact, tmp_path / "tiny" / "1")


def training_schema(artifact: Path) -> FeatureSchema:
    """training's own FeatureSchema, rebuilt from the manifest (the encoding reference)."""
    schema = json.loads((artifact / "manifest.json").read_text())["feature_schema"]

    def fields(side: str) -> tuple[Field, ...]:
        return tuple(
            Field(f["name"], side.lower(), f.get("multi_valued", False), int(f["width"]), int(f.get("offset", 0)), tuple(f["vocabulary"]))
            for f in schema["fields"]
            if f["side"] == side
        )

    return FeatureSchema(fields("USER"), fields("ITEM"), schema["multi_value_separator"])


def test_loads_the_exported_artifact(tiny_artifact: Path):
    artifact = load_artifact(tiny_artifact)
    assert artifact.model_name == "tiny" and artifact.model_version == "1"
    assert artifact.catalog.size == len(artifact.catalog.item_ids) > 0
    assert artifact.catalog.codes.shape == (artifact.catalog.size, artifact.encoder.item_width)
    assert not artifact.catalog.codes.flags.writeable
    assert [t.name for t in artifact.outputs] == ["query_scores", "support_loss_before", "support_loss_after", "query_engagement"]
    assert artifact.has_engagement
    assert artifact.label.kind == "rating"


def test_encoding_matches_training(tiny_artifact: Path):
    """Random attribute sets (multi-valued overflow, unknown values, missing fields) encode
    exactly as training's FeatureSchema does, and catalog rows as the exporter wrote them."""
    artifact = load_artifact(tiny_artifact)
    reference = training_schema(tiny_artifact)
    encoder = artifact.encoder
    rng = np.random.default_rng(0)

    def random_values(fields) -> dict[str, tuple[str, ...]]:
        values = {}
        for f in fields:
            if f.name == "item_id" or rng.random() < 0.2:
                continue
            pool = list(f.vocabulary) + ["never-seen", "zz-unknown"]
            k = int(rng.integers(0, f.width + 3)) if f.multi_valued else 1
            values[f.name] = tuple(rng.choice(pool, size=k))
        return values

    for _ in range(300):
        user = random_values(reference.user_fields)
        np.testing.assert_array_equal(encoder.encode_user_values(user), reference.encode_user(user))
        item = random_values(reference.item_fields)
        item_id = str(rng.choice(["i0001", "i0149", "brand-new"]))
        np.testing.assert_array_equal(encoder.encode_item_values(item_id, item), reference.encode_item(item_id, item))
        # The request text form ("a|b") parses into the same values.
        text = {name: encoder.separator.join(vals) for name, vals in item.items()}
        row, problems = encoder.encode_item(item_id, text, "x", allow_unknown_values=True)
        assert not problems
        np.testing.assert_array_equal(row, reference.encode_item(item_id, item))


def test_request_text_is_parsed_like_training_loaders(tiny_artifact: Path):
    encoder = load_artifact(tiny_artifact).encoder
    row, _ = encoder.encode_item("new", {"genres": " drama|| comedy |drama", "year": " 1970s "}, "x", False)
    reference = training_schema(tiny_artifact).encode_item("new", {"genres": ("drama", "comedy"), "year": ("1970s",)})
    np.testing.assert_array_equal(row, reference)


def test_unknown_values_are_rejected_unless_allowed(tiny_artifact: Path):
    encoder = load_artifact(tiny_artifact).encoder
    with pytest.raises(InvalidArgument) as refused:
        encoder.encode_user({"region": "atlantis"}, "user_attributes", allow_unknown_values=False)
    assert refused.value.violations[0].field == 'user_attributes["region"]'
    row = encoder.encode_user({"region": "atlantis"}, "user_attributes", allow_unknown_values=True)
    np.testing.assert_array_equal(row, training_schema(tiny_artifact).encode_user({"region": ("atlantis",)}))


def test_every_tampered_file_is_named(copy: Path):
    """Flipping one byte of any listed file makes the loader refuse, naming that file."""
    listed = [entry["path"] for entry in json.loads((copy / "manifest.json").read_text())["files"]]
    assert {"model.onnx", "torch_program.safetensors", "init.safetensors", "catalog.safetensors", "catalog_items.txt"} <= set(listed)
    for relative in listed:
        path = copy / relative
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(ChecksumMismatchError) as refused:
            load_artifact(copy)
        assert refused.value.file == relative and relative in str(refused.value)
        path.write_bytes(original)
    load_artifact(copy)


def test_truncated_file_is_refused(copy: Path):
    path = copy / "catalog_items.txt"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ChecksumMismatchError, match="catalog_items.txt: size"):
        load_artifact(copy)


def test_missing_file_is_named(copy: Path):
    os.remove(copy / "init.safetensors")
    with pytest.raises(MissingFileError) as refused:
        load_artifact(copy)
    assert refused.value.file == "init.safetensors"


def test_missing_manifest(copy: Path):
    os.remove(copy / "manifest.json")
    with pytest.raises(MissingFileError, match="manifest.json"):
        load_artifact(copy)


def test_unlisted_file_is_refused(copy: Path):
    """Versions are immutable: a file the manifest does not list means the directory is
    not what the exporter wrote."""
    (copy / "vocab").mkdir()
    (copy / "vocab" / "extra.txt").write_text("surprise\n")
    with pytest.raises(UnlistedFileError) as refused:
        load_artifact(copy)
    assert refused.value.file == "vocab/extra.txt"


@pytest.mark.parametrize("version", [0, 2, 99, "1"])
def test_unknown_schema_version_is_refused(copy: Path, version):
    edit_manifest(copy, lambda m: m.update(schema_version=version))
    with pytest.raises(UnsupportedSchemaError, match="schema_version"):
        load_artifact(copy)


def test_malformed_manifest(copy: Path):
    edit_manifest(copy, lambda m: m.update(no_such_field=1))
    with pytest.raises(ManifestError, match="manifest.json"):
        load_artifact(copy)
    (copy / "manifest.json").write_text("{not json")
    reseal_manifest(copy)
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_artifact(copy)


def test_an_edited_manifest_fails_its_digest(copy: Path):
    path = copy / "manifest.json"
    path.chmod(0o644)
    path.write_text(path.read_text().replace('"max_value": 5.0', '"max_value": 50.0'))
    with pytest.raises(ChecksumMismatchError, match="manifest.sha256") as refused:
        load_artifact(copy)
    assert refused.value.file == "manifest.json"


def test_a_missing_manifest_digest_is_refused(copy: Path):
    os.remove(copy / "manifest.sha256")
    with pytest.raises(MissingFileError) as refused:
        load_artifact(copy)
    assert refused.value.file == "manifest.sha256"


def test_paths_outside_the_artifact_are_refused(copy: Path):
    edit_manifest(copy, lambda m: m["files"].append({"path": "../escape", "sha256": "0" * 64, "size_bytes": "1"}))
    with pytest.raises(ManifestError, match="inside the artifact"):
        load_artifact(copy)


def test_manifest_graph_spec_must_fit_the_schema(copy: Path):
    def widen(m: dict) -> None:
        m["graph"]["inputs"][0]["shape"][1] = {"size": "7"}  # user_features: the schema says 2

    edit_manifest(copy, widen)
    with pytest.raises(ManifestError, match="user_features"):
        load_artifact(copy)


def test_vocabulary_file_is_loaded(copy: Path):
    """Large vocabularies live in vocab/<side>.<name>.txt; the loader reads them the same."""
    inline = load_artifact(copy).encoder

    def move_region(m: dict) -> None:
        field = next(f for f in m["feature_schema"]["fields"] if f["name"] == "region")
        (copy / "vocab").mkdir(exist_ok=True)
        text = "".join(f"{v}\n" for v in field["vocabulary"])
        (copy / "vocab" / "user.region.txt").write_text(text)
        field["vocabulary"] = []
        field["vocabulary_file"] = "vocab/user.region.txt"
        digest = sha256_file(copy / "vocab" / "user.region.txt")
        m["files"].append({"path": "vocab/user.region.txt", "sha256": digest, "size_bytes": str(len(text.encode()))})

    edit_manifest(copy, move_region)
    from_file = load_artifact(copy).encoder
    for region in ("east", "west", "unknown"):
        np.testing.assert_array_equal(
            from_file.encode_user({"region": region}, "u", True), inline.encode_user({"region": region}, "u", True)
        )


def test_graph_that_differs_from_the_manifest_is_named(copy: Path):
    """model.onnx with a renamed input (checksum updated, so only the graph check can tell)."""
    import onnx

    model = onnx.load(str(copy / "model.onnx"))
    old = model.graph.input[3].name  # support_mask
    model.graph.input[3].name = "mask"
    for node in model.graph.node:
        node.input[:] = ["mask" if name == old else name for name in node.input]
    onnx.save(model, str(copy / "model.onnx"))

    def update(m: dict) -> None:
        entry = next(f for f in m["files"] if f["path"] == "model.onnx")
        entry["sha256"] = sha256_file(copy / "model.onnx")
        entry["size_bytes"] = str((copy / "model.onnx").stat().st_size)

    edit_manifest(copy, update)
    artifact = load_artifact(copy)  # the files are intact ...
    with pytest.raises(GraphMismatchError) as refused:  # ... the graph is not what the manifest says
        create_engine(artifact, EngineConfig())
    assert refused.value.file == "model.onnx" and "support_mask" in str(refused.value)
    with pytest.raises(ModelLoadError) as load_refused:
        load_model(copy, ModelSettings(EngineConfig(), max_interactions=4, max_candidates=16))
    assert load_refused.value.reason == "graph_mismatch"


def test_graph_dtype_mismatch(copy: Path):
    def retype(m: dict) -> None:
        m["graph"]["outputs"][1]["dtype"] = "INT64"  # support_loss_before is float32

    edit_manifest(copy, retype)
    with pytest.raises(ArtifactError, match="support_loss_before"):
        create_engine(load_artifact(copy), EngineConfig())


def test_catalog_content_must_match_the_manifest(copy: Path):
    def grow(m: dict) -> None:
        m["catalog"]["size"] = str(int(m["catalog"]["size"]) + 1)

    edit_manifest(copy, grow)
    with pytest.raises(ArtifactError, match="catalog_items.txt"):
        load_artifact(copy)


def test_version_directory_must_match_the_manifest(copy: Path, tmp_path: Path):
    renamed = copy.parent / "7"
    copy.rename(renamed)
    with pytest.raises(ModelLoadError, match="manifest.json says version '1'"):
        load_model(renamed, ModelSettings(EngineConfig(), max_interactions=4, max_candidates=16))


def test_a_symlinked_directory_inside_a_version_is_refused(copy: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "payload.bin").write_bytes(b"not part of the artifact")
    (copy / "extra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnlistedFileError, match="symbolic link") as refused:
        load_artifact(copy)
    assert refused.value.file == "extra"


def test_signatures_are_checked_only_when_keys_are_trusted(copy: Path, tmp_path: Path):
    from warmstart import signature

    signature.generate_key_pair(tmp_path / "a.key", tmp_path / "a.pem")
    signature.generate_key_pair(tmp_path / "b.key", tmp_path / "b.pem")
    trusted = signature.load_public_keys(tmp_path / "a.pem")
    load_artifact(copy)  # no keys: an unsigned version is served as before
    with pytest.raises(SignatureRefusedError, match="missing"):
        load_artifact(copy, trusted)
    signature.sign_artifact(copy, signature.load_private_key(tmp_path / "b.key"))
    with pytest.raises(SignatureRefusedError, match="no trusted key"):
        load_artifact(copy, trusted)
    signature.sign_artifact(copy, signature.load_private_key(tmp_path / "a.key"))
    assert load_artifact(copy, trusted).model_version == "1"
    load_artifact(copy)  # manifest.sig is the one file beside the manifest it need not list
    # A tampered manifest with recomputed digests (what a repository writer can do) fails
    # the signature, which covers the manifest and through it every file.
    edit_manifest(copy, lambda m: m["label"].update(max_value=6.0))
    with pytest.raises(SignatureRefusedError, match="no trusted key"):
        load_artifact(copy, trusted)
    # Both keys in one file (a rotation): either verifies.
    (tmp_path / "both.pem").write_bytes((tmp_path / "a.pem").read_bytes() + (tmp_path / "b.pem").read_bytes())
    assert len(signature.load_public_keys(tmp_path / "both.pem")) == 2


def test_the_signing_script_signs_what_the_loader_verifies(copy: Path, tmp_path: Path):
    import subprocess
    import sys

    from warmstart import signature

    script = [sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "sign_artifact.py")]
    key, public = tmp_path / "signer.key", tmp_path / "trusted.pem"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*script, *args], capture_output=True, text=True, timeout=60)

    assert run("keygen", "--private-key", str(key), "--public-key", str(public)).returncode == 0
    assert key.stat().st_mode & 0o077 == 0  # the private key is its owner's only
    assert run("verify", "--public-key", str(public), str(copy)).returncode == 1  # unsigned
    assert run("sign", "--private-key", str(key), str(copy)).returncode == 0
    assert run("verify", "--public-key", str(public), str(copy)).returncode == 0
    assert load_artifact(copy, signature.load_public_keys(public)).model_version == "1"
    assert run("sign", "--private-key", str(tmp_path / "missing.key"), str(copy)).returncode == 2


def test_item_table_is_loaded_in_catalog_row_order(tiny_artifact: Path):
    from safetensors.numpy import load_file

    artifact = load_artifact(tiny_artifact)
    table = artifact.item_table
    assert table is not None and table.size == artifact.catalog.size
    on_disk = load_file(str(tiny_artifact / "item_table.safetensors"))
    np.testing.assert_array_equal(table.rating_bias, on_disk["rating_bias"])
    np.testing.assert_array_equal(table.engagement_factors, on_disk["engagement_factors"])
    assert table.rating_offset == float(on_disk["rating_offset"]) and table.engagement_scale == float(on_disk["engagement_scale"])
    assert table.rating_factors.shape[1] == artifact.manifest.item_table.rating_factors
    assert not table.rating_factors.flags.writeable


def test_an_item_table_of_the_wrong_shape_is_refused(copy: Path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(copy / "item_table.safetensors"))
    tensors["rating_bias"] = tensors["rating_bias"][:-1]
    save_file(tensors, str(copy / "item_table.safetensors"))

    def relist(manifest: dict) -> None:
        entry = next(f for f in manifest["files"] if f["path"] == "item_table.safetensors")
        entry.update(sha256=sha256_file(copy / "item_table.safetensors"), size_bytes=str((copy / "item_table.safetensors").stat().st_size))

    edit_manifest(copy, relist)
    with pytest.raises(ArtifactError, match="rating_bias") as caught:
        load_artifact(copy)
    assert caught.value.reason == "content" and caught.value.file == "item_table.safetensors"


def test_an_item_table_for_another_catalog_size_is_refused(copy: Path):
    edit_manifest(copy, lambda m: m["item_table"].update(size=str(int(m["item_table"]["size"]) + 1)))
    with pytest.raises(ManifestError, match="item_table.size"):
        load_artifact(copy)
