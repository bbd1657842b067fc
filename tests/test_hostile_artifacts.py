"""An artifact is data, never code: nothing in an artifact directory can make a loader run
code, whatever an attacker who can write the model repository puts there (checksums
recomputed, as they can).

A pickle payload is planted in every file in turn (and, for the torch program, the attack
that worked before: a torch.export archive whose sample inputs are a pickle), then the
version is loaded with both engines and through training's reader. The payload would
create a marker file; every unpickling entry point is also replaced by a tripwire, so an
unpickle that fails before running the payload is caught too.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from service.engines import EngineConfig
from service.repository import ModelLoadError, ModelSettings, load_model
from tests.service.harness import make_writable, reseal_manifest
from training.export import load_exported_model
from warmstart import torch_program
from warmstart.torch_program import ProgramFormatError, load_program


class _Payload:
    """Unpickling this creates the marker file (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class Tripwire(AssertionError):
    pass


@pytest.fixture()
def tripwires(monkeypatch):
    """Every way to unpickle raises (and is recorded) for the duration of a test."""
    calls: list[str] = []

    def trip(name):
        def tripped(*args, **kwargs):
            calls.append(name)
            raise Tripwire(f"{name} was called while loading an artifact")

        return tripped

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, trip(f"{module.__name__}.{name}"))
    monkeypatch.setattr(torch._C, "_pickle_load_obj", trip("torch._C._pickle_load_obj"), raising=False)
    return calls


def pickled(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def planted_pt2(marker: Path, program_path: Path) -> bytes:
    """A real torch.export archive of the tiny program whose sample inputs are the payload
    (the attack of issue 12, which torch.export.load executed)."""
    buffer = io.BytesIO()
    torch.export.save(load_program(program_path), buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if "sample_inputs" in info.filename:
                data = pickled(marker)
            target.writestr(info, data)
    return out.getvalue()


def reseal(artifact: Path) -> None:
    """Recomputes every sha256 in the manifest and the manifest's own digest."""
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["files"]:
        data = (artifact / entry["path"]).read_bytes()
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        entry["size_bytes"] = str(len(data))
    path.write_text(json.dumps(manifest, indent=1))
    reseal_manifest(artifact)


def load_everything(artifact: Path) -> list[str]:
    """Loads the version every way the project does; returns the outcome of each."""
    outcomes = []
    for kind in ("onnxruntime", "torch"):
        settings = ModelSettings(EngineConfig(kind=kind, device="cpu"), max_interactions=1, max_candidates=1, warmup_batch_size=1)
        try:
            load_model(artifact, settings)
            outcomes.append(f"{kind}: loaded")
        except ModelLoadError as exc:
            outcomes.append(f"{kind}: refused ({exc.reason})")
    try:
        load_exported_model(artifact)
        outcomes.append("training: loaded")
    except Exception as exc:  # training's reader raises what its parsers raise: refusing is the point
        outcomes.append(f"training: refused ({type(exc).__name__})")
    return outcomes


def artifact_files(tiny_artifact: Path) -> list[str]:
    return sorted(p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file())


def test_a_pickle_planted_in_any_file_never_runs(tiny_artifact: Path, tmp_path: Path, tripwires):
    marker = tmp_path / "payload-ran"
    program = tiny_artifact / "torch_program.safetensors"
    files = artifact_files(tiny_artifact)
    assert {"manifest.json", "model.onnx", "torch_program.safetensors", "init.safetensors", "catalog.safetensors"} <= set(files)
    plants = [(name, pickled(marker)) for name in files] + [("torch_program.safetensors", planted_pt2(marker, program))]
    for k, (name, payload) in enumerate(plants):
        artifact = tmp_path / f"plant-{k}" / "tiny" / "1"
        shutil.copytree(tiny_artifact, artifact)
        make_writable(artifact)
        (artifact / name).write_bytes(payload)
        if name not in ("manifest.json", "manifest.sha256"):
            reseal(artifact)
        outcomes = load_everything(artifact)
        assert not marker.exists(), f"the payload in {name} ran ({outcomes})"
        assert tripwires == [], f"{name}: {tripwires}"
        # The files an engine reads are refused by it; the rest are data nobody executes.
        refused_by = {
            "model.onnx": ["onnxruntime"],
            "torch_program.safetensors": ["torch"],
            "manifest.json": ["onnxruntime", "torch"],
            "manifest.sha256": ["onnxruntime", "torch"],
        }.get(name, [])
        for reader in refused_by:
            assert any(o.startswith(f"{reader}: refused") for o in outcomes), (name, outcomes)


def test_the_untouched_artifact_loads_every_way(tiny_artifact: Path, tripwires):
    assert load_everything(tiny_artifact) == ["onnxruntime: loaded", "torch: loaded", "training: loaded"]
    assert tripwires == []


def _program_document(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["program"])


def _rewrite_program(source: Path, target: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    document = json.loads(metadata["program"])
    edit(document)
    metadata["program"] = json.dumps(document)
    save_file(tensors, str(target), metadata=metadata)


def _first_expression_holder(document: dict) -> dict:
    found = []

    def walk(value):
        if isinstance(value, dict):
            if "expr_str" in value:
                found.append(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)
    assert found, "the tiny program has symbolic shapes"
    return found[0]


def _code(marker: Path) -> str:
    return f"__import__('builtins').open({str(marker)!r}, 'w')"


@pytest.mark.parametrize(
    "attack",
    ["shape expression", "operator target", "guard code", "node name", "tensor file"],
)
def test_code_hidden_in_the_program_json_is_refused(tiny_artifact: Path, tmp_path: Path, tripwires, attack):
    """torch's own JSON deserializer evaluates shape expressions with sympy (eval), looks
    targets up as attributes of torch, and executes guard code: load_program checks the
    document first."""
    marker = tmp_path / "payload-ran"
    source = tiny_artifact / "torch_program.safetensors"
    target = tmp_path / "program.safetensors"

    def edit(document: dict) -> None:
        nodes = document["graph_module"]["graph"]["nodes"]
        if attack == "shape expression":
            _first_expression_holder(document)["expr_str"] = _code(marker)
        elif attack == "operator target":
            nodes[0]["target"] = "torch.hub.load"
        elif attack == "guard code":
            document["guards_code"] = [_code(marker)]
        elif attack == "node name":
            nodes[0]["name"] = "x = " + _code(marker) + "  #"
        elif attack == "tensor file":
            nodes[0]["target"] = "torch.ops.aten.from_file.default"

    _rewrite_program(source, target, edit)
    with pytest.raises(ProgramFormatError):
        load_program(target)
    assert not marker.exists()
    assert tripwires == []


def test_a_program_written_and_read_back_runs_the_same(tiny_artifact: Path, tmp_path: Path):
    program = load_program(tiny_artifact / "torch_program.safetensors")
    torch_program.save_program(program, tmp_path / "again.safetensors")
    again = load_program(tmp_path / "again.safetensors")
    generator = torch.Generator().manual_seed(0)
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    user_width, item_width = manifest["feature_schema"]["user_width"], manifest["feature_schema"]["item_width"]
    inputs = (
        torch.randint(0, 3, (3, user_width), generator=generator),
        torch.randint(0, 3, (3, 4, item_width), generator=generator),
        torch.rand(3, 4, generator=generator) * 4 + 1,
        torch.ones(3, 4),
        torch.randint(0, 3, (3, 6, item_width), generator=generator),
    )
    for a, b in zip(program.module()(*inputs), again.module()(*inputs)):
        assert torch.equal(a, b)
    assert _program_document(tmp_path / "again.safetensors")["guards_code"] == []
