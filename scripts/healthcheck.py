"""Container health probe: exits 0 when the server's grpc.health.v1 status is SERVING.

    python scripts/healthcheck.py [--target localhost:50051] [--service ""] [--timeout-s 3]

The Docker image's HEALTHCHECK runs it (Kubernetes uses its native gRPC probes instead).
The target defaults to localhost on $WARMSTART_PORT (50051). Plaintext only: behind TLS,
use an exec probe with grpcurl's -cacert or the orchestrator's own gRPC probe.
Exit codes: 0 SERVING, 1 any other status, 2 no answer (down, refusing, too slow).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=f"localhost:{os.environ.get('WARMSTART_PORT') or 50051}")
    parser.add_argument("--service", default="", help='health service name ("" = the whole server)')
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
        except grpc.RpcError as error:
            print(f"unhealthy: {args.target}: {error.code().name}: {error.details()}")  # type: ignore[attr-defined]
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
