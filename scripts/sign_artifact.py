"""Sign artifacts so that a server started with --trusted-keys serves them.

    python scripts/sign_artifact.py keygen --private-key ~/keys/warmstart.key --public-key trusted.pem
    python scripts/sign_artifact.py sign --private-key ~/keys/warmstart.key models/warmstart/3
    python scripts/sign_artifact.py verify --public-key trusted.pem models/warmstart/3

Keep the private key outside the model repository (whoever can write the repository must
not be able to sign). `sign` writes `<version>/manifest.sig` (Ed25519 over the manifest's
sha256, see warmstart/signature.py); a server polling the repository retries a version it
refused as unsigned once the signature appears. Exit status: 0 done, 1 verification
failed, 2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "protos"))

from warmstart import signature  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="write a new Ed25519 key pair")
    keygen.add_argument("--private-key", type=Path, required=True, help="where to write the private key (must not exist)")
    keygen.add_argument("--public-key", type=Path, required=True, help="where to write the public key (for --trusted-keys)")
    sign = sub.add_parser("sign", help="write manifest.sig into artifact versions")
    sign.add_argument("--private-key", type=Path, required=True)
    sign.add_argument("artifacts", type=Path, nargs="+", help="version directories <repository>/<name>/<version>")
    verify = sub.add_parser("verify", help="check artifact versions' signatures against trusted public keys")
    verify.add_argument("--public-key", type=Path, required=True, help="PEM file of one or more public keys")
    verify.add_argument("artifacts", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            print(f"key {signature.generate_key_pair(args.private_key, args.public_key)}: "
                  f"private {args.private_key}, public {args.public_key}")
            return 0
        if args.command == "sign":
            key = signature.load_private_key(args.private_key)
            for artifact in args.artifacts:
                written = signature.sign_artifact(artifact, key)
                written.chmod(0o444)  # versions are immutable
                print(f"signed {artifact} with key {signature.key_id(key.public_key())}")
            return 0
        keys = signature.load_public_keys(args.public_key)
        failed = 0
        for artifact in args.artifacts:
            try:
                text = (artifact / signature.SIGNATURE_FILE).read_text(encoding="ascii")
                signer = signature.verify((artifact / "manifest.json").read_bytes(), text, keys)
            except (OSError, signature.SignatureError) as exc:
                print(f"{artifact}: NOT verified: {exc}")
                failed += 1
            else:
                print(f"{artifact}: signed by trusted key {signer}")
        return 1 if failed else 0
    except (OSError, signature.SignatureError) as exc:
        print(f"sign_artifact: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
