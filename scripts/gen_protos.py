"""Generate the Python protobuf and gRPC modules from protos/ (never edit their output).

Usage: python scripts/gen_protos.py [--out DIR]

Without --out the modules are written next to the .proto files (protos/warmstart/v1/),
which is where the installed `warmstart.v1` package imports them from. The test suite
runs this with --out into a temporary directory and fails if the committed modules differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ("warmstart/v1/manifest.proto", "warmstart/v1/recommender.proto")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto file; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return sorted(p for p in out_dir.rglob("*") if p.suffix in {".py", ".pyi"} and p.name != "__init__.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
