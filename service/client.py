"""A small synchronous client for warmstart, and a command line over it.

Library (copy it into a backend as it is):

    with RecommenderClient("localhost:50051") as client:
        response = client.recommend(interactions=[("i0050", 5.0), ("i0012", 3.0)], top_k=10)
        for item in response.items:
            print(item.item_id, item.score)

Command line:

    python -m service.client recommend --target localhost:50051 --interaction i0050=5 --top-k 10
    python -m service.client score --target localhost:50051 --interaction i0050=5 --candidate i0001
    python -m service.client onboard --target localhost:50051 --count 3 --interaction i0050=5
    python -m service.client model --target localhost:50051
    python -m service.client health --target localhost:50051

Errors raise RecommenderError with the status code and, for INVALID_ARGUMENT, the
fields the server named (google.rpc.BadRequest).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from warmstart.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pb_grpc

# (item_id, label) or (item_id, label, timestamp); pb.Interaction for inline attributes.
InteractionLike = tuple[str, float] | tuple[str, float, int] | pb.Interaction
CandidateLike = str | pb.Candidate


RANK_BY = {"auto": pb.RANK_BY_UNSPECIFIED, "engagement": pb.RANK_BY_ENGAGEMENT, "rating": pb.RANK_BY_PREDICTED_RATING}
STRATEGIES = {
    "auto": pb.ONBOARD_STRATEGY_UNSPECIFIED,
    "dopt": pb.ONBOARD_STRATEGY_D_OPTIMAL,
    "melu": pb.ONBOARD_STRATEGY_GRADIENT_POPULARITY,
    "popular": pb.ONBOARD_STRATEGY_POPULAR,
    "random": pb.ONBOARD_STRATEGY_RANDOM,
}


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the server: its CA (None = system roots), and a client certificate for mTLS."""

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None  # expected name in the server certificate, if not the target's host

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("a client certificate needs its key, and the other way round")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes() if self.ca_cert else None,
            private_key=self.client_key.read_bytes() if self.client_key else None,
            certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
        )


class RecommenderError(Exception):
    """An RPC failed: `code` (grpc.StatusCode), the server's message, and bad fields if any."""

    def __init__(self, code: grpc.StatusCode, message: str, field_violations: Sequence[tuple[str, str]] = ()) -> None:
        fields = "".join(f"\n  {f}: {d}" for f, d in field_violations)
        super().__init__(f"{code.name}: {message}{fields}")
        self.code = code
        self.message = message
        self.field_violations = list(field_violations)

    @staticmethod
    def from_rpc_error(error: grpc.RpcError) -> "RecommenderError":
        violations: list[tuple[str, str]] = []
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    violations.extend((v.field, v.description) for v in bad_request.field_violations)
        return RecommenderError(error.code(), error.details() or "", violations)  # type: ignore[attr-defined]


class RecommenderClient:
    """Blocking client of warmstart.v1.Recommender (thread-safe: share one per process)."""

    def __init__(self, target: str, tls: TlsOptions | None = None, timeout_s: float = 2.0) -> None:
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls and tls.server_name else []
        self._channel = (
            grpc.secure_channel(target, tls.credentials(), options=options) if tls else grpc.insecure_channel(target)
        )
        self._stub = pb_grpc.RecommenderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout_s = timeout_s

    def recommend(
        self,
        interactions: Iterable[InteractionLike] = (),
        candidates: Iterable[CandidateLike] = (),
        user_attributes: Mapping[str, str] | None = None,
        top_k: int = 10,
        exclude_interacted: bool = True,
        exclude_item_ids: Iterable[str] = (),
        request_id: str | None = None,
        timeout_s: float | None = None,
        rank_by: str = "auto",
    ) -> pb.RecommendResponse:
        """The top_k items for this user, best first (candidates empty = the whole catalog).

        rank_by: "auto" (engagement when the model has it), "engagement" or "rating"."""
        if rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {sorted(RANK_BY)}, got {rank_by!r}")
        request = pb.RecommendRequest(
            request_id=request_id or uuid.uuid4().hex,
            user_attributes=dict(user_attributes or {}),
            interactions=[_interaction(i) for i in interactions],
            top_k=top_k,
            exclude_interacted=exclude_interacted,
            exclude_item_ids=list(exclude_item_ids),
            rank_by=RANK_BY[rank_by],
        )
        _set_items(request.candidate_ids, request.candidates, candidates)
        return self._call(self._stub.Recommend, request, timeout_s)

    def score(
        self,
        items: Iterable[CandidateLike],
        interactions: Iterable[InteractionLike] = (),
        user_attributes: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.ScoreResponse:
        """One score per item, in the order given."""
        request = pb.ScoreRequest(
            request_id=request_id or uuid.uuid4().hex,
            user_attributes=dict(user_attributes or {}),
            interactions=[_interaction(i) for i in interactions],
        )
        _set_items(request.item_ids, request.items, items)
        return self._call(self._stub.Score, request, timeout_s)

    def onboard(
        self,
        count: int = 3,
        interactions: Iterable[InteractionLike] = (),
        candidate_ids: Iterable[str] = (),
        user_attributes: Mapping[str, str] | None = None,
        exclude_item_ids: Iterable[str] = (),
        strategy: str = "auto",
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.OnboardResponse:
        """The `count` items to ask this user about next, best first (candidate_ids empty = the
        catalog). strategy: "auto" (the model-based default, D-optimal), "dopt", "melu",
        "popular" or "random". Send the answers as interactions for the next round."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        request = pb.OnboardRequest(
            request_id=request_id or uuid.uuid4().hex,
            user_attributes=dict(user_attributes or {}),
            interactions=[_interaction(i) for i in interactions],
            candidate_ids=list(candidate_ids),
            count=count,
            exclude_item_ids=list(exclude_item_ids),
            strategy=STRATEGIES[strategy],
        )
        return self._call(self._stub.Onboard, request, timeout_s)

    def get_model(self, timeout_s: float | None = None) -> pb.ModelInfo:
        return self._call(self._stub.GetModel, pb.GetModelRequest(), timeout_s)

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... for a service ("" = the whole server)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method, request, timeout_s: float | None):
        try:
            return method(request, timeout=timeout_s if timeout_s is not None else self._timeout_s)
        except grpc.RpcError as error:
            raise RecommenderError.from_rpc_error(error) from None


def _interaction(value: InteractionLike) -> pb.Interaction:
    if isinstance(value, pb.Interaction):
        return value
    item_id, label, *rest = value
    return pb.Interaction(item_id=item_id, label=float(label), timestamp=int(rest[0]) if rest else 0)


def _set_items(id_field, message_field, items: Iterable[CandidateLike]) -> None:
    """Plain ids go in the cheap id list; if any item carries attributes, all go as messages."""
    items = list(items)
    if all(isinstance(item, str) for item in items):
        id_field.extend(items)
    else:
        message_field.extend(item if isinstance(item, pb.Candidate) else pb.Candidate(item_id=item) for item in items)


# ---------------------------------------------------------------------------------------
# Command line


def _parse_interaction(text: str) -> tuple[str, float, int]:
    """ITEM=LABEL or ITEM=LABEL@TIMESTAMP."""
    item, sep, rest = text.rpartition("=")
    if not sep or not item:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ITEM=LABEL or ITEM=LABEL@TIMESTAMP")
    label, _, timestamp = rest.partition("@")
    try:
        return item, float(label), int(timestamp) if timestamp else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: LABEL must be a number and TIMESTAMP an integer") from None


def _parse_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.client", description="Call a warmstart server.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="localhost:50051", help="server address (default localhost:50051)")
    common.add_argument("--timeout-s", type=float, default=2.0, help="deadline per call (default 2)")
    common.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-cert / --cert)")
    common.add_argument("--ca-cert", type=Path, help="PEM CA that signed the server certificate (default: system roots)")
    common.add_argument("--cert", type=Path, help="PEM client certificate (mTLS)")
    common.add_argument("--key", type=Path, help="PEM key of --cert")
    common.add_argument("--server-name", help="name expected in the server certificate, if not the target's host")
    user = argparse.ArgumentParser(add_help=False)
    user.add_argument("--user", type=_parse_pair, action="append", default=[], metavar="FIELD=VALUE", help="user attribute (repeat)")
    user.add_argument(
        "--interaction", type=_parse_interaction, action="append", default=[], metavar="ITEM=LABEL[@TS]",
        help="an item the user rated or clicked (repeat; TS = seconds since the epoch)",
    )
    user.add_argument(
        "--item-attribute", type=_parse_pair, action="append", default=[], metavar="ITEM.FIELD=VALUE",
        help="attribute of an item the catalog does not know (repeat; '|' joins several values)",
    )
    user.add_argument("--candidate", action="append", default=[], metavar="ITEM", help="item to rank or score (repeat)")
    user.add_argument("--request-id", help="echoed back (default: a random id)")
    commands = parser.add_subparsers(dest="command", required=True)
    recommend = commands.add_parser("recommend", parents=[common, user], help="rank candidates (default: the catalog)")
    recommend.add_argument("--top-k", type=int, default=10, help="items to return; 0 = all (default 10)")
    recommend.add_argument("--exclude-interacted", action="store_true", help="drop the items the user interacted with")
    recommend.add_argument("--exclude", action="append", default=[], metavar="ITEM", help="drop this item (repeat)")
    recommend.add_argument(
        "--rank-by", choices=sorted(RANK_BY), default="auto", help="order by engagement or predicted rating (default auto: engagement when the model has it)"
    )
    commands.add_parser("score", parents=[common, user], help="score the candidates, in order")
    onboard = commands.add_parser("onboard", parents=[common, user], help="the items to ask a new user about next")
    onboard.add_argument("--count", type=int, default=3, help="items to ask about (default 3)")
    onboard.add_argument("--exclude", action="append", default=[], metavar="ITEM", help="never return this item (repeat)")
    onboard.add_argument(
        "--strategy", choices=sorted(STRATEGIES), default="auto", help="how to choose (default auto: D-optimal)"
    )
    commands.add_parser("model", parents=[common], help="describe the model being served")
    health = commands.add_parser("health", parents=[common], help="grpc.health.v1 status")
    health.add_argument("--service", default="", help='service to check (default "": the server)')
    return parser


def _item_attributes(pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, str]]:
    by_item: dict[str, dict[str, str]] = {}
    for key, value in pairs:
        item, dot, field = key.rpartition(".")
        if not dot or not item or not field:
            raise SystemExit(f"--item-attribute {key}={value}: expected ITEM.FIELD=VALUE")
        by_item.setdefault(item, {})[field] = value
    return by_item


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tls = None
    if args.tls or args.ca_cert or args.cert:
        tls = TlsOptions(args.ca_cert, args.cert, args.key, args.server_name)
    with RecommenderClient(args.target, tls=tls, timeout_s=args.timeout_s) as client:
        try:
            if args.command == "health":
                print(client.health(args.service))
                return 0
            if args.command == "model":
                response = client.get_model()
            else:
                attributes = _item_attributes(args.item_attribute)
                interactions = [
                    pb.Interaction(item_id=i, label=label, timestamp=ts, item_attributes=attributes.get(i, {}))
                    for i, label, ts in args.interaction
                ]
                candidates = [pb.Candidate(item_id=c, item_attributes=attributes[c]) if c in attributes else c for c in args.candidate]
                if args.command == "recommend":
                    response = client.recommend(
                        interactions,
                        candidates,
                        dict(args.user),
                        args.top_k,
                        args.exclude_interacted,
                        args.exclude,
                        args.request_id,
                        rank_by=args.rank_by,
                    )
                elif args.command == "onboard":
                    if attributes:
                        raise SystemExit("onboard asks about catalog items: --item-attribute is not used")
                    response = client.onboard(
                        args.count, interactions, args.candidate, dict(args.user), args.exclude, args.strategy, args.request_id
                    )
                else:
                    response = client.score(candidates, interactions, dict(args.user), args.request_id)
        except RecommenderError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(json_format.MessageToJson(response, preserving_proto_field_name=True, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
