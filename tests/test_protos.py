"""The committed protobuf / gRPC modules are exactly what scripts/gen_protos.py generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_up_to_date(tmp_path: Path):
    generated = load_generator().generate(tmp_path)
    fresh = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in generated}
    committed = {
        p.relative_to(PROTO_ROOT).as_posix(): p.read_bytes()
        for p in PROTO_ROOT.rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    }
    # every .proto yields a message module, its type stubs and its gRPC module
    assert len(fresh) == 3 * len(list(PROTO_ROOT.rglob("*.proto")))
    stale = sorted(name for name in fresh if committed.get(name) != fresh[name])
    extra = sorted(set(committed) - set(fresh))
    assert not stale and not extra, (
        f"generated protobuf modules are out of date (differ: {stale}; no longer generated: {extra}): "
        "run `make protos` and commit the result"
    )
