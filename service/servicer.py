"""The gRPC servicer: the only module that touches warmstart.v1 request and response types.

Each RPC converts its protobuf request to domain objects, delegates to RecommenderCore,
and converts the result back. One wrapper around every RPC admits it or refuses it at
once when the server is full (Admission), maps exceptions to statuses (through
errors.to_status), records the RED metrics, and enforces the request size limit: the methods are registered with raw-bytes requests so that a message over
`max_message_bytes` gets INVALID_ARGUMENT with a BadRequest naming it (gRPC's own
receive limit, set higher as a memory guard, would answer RESOURCE_EXHAUSTED with no
detail).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from service import domain
from service.core import RecommenderCore
from service.errors import InvalidArgument, ServerFull, ServiceError, status_code, to_status
from service.metrics import Metrics
from warmstart.v1 import manifest_pb2, recommender_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name

_ROLES = {"interaction": pb.INTERACTION, "candidate": pb.CANDIDATE}
_HANDLING = {"encoded_from_attributes": pb.ENCODED_FROM_ATTRIBUTES}
_LABEL_KINDS = {"rating": manifest_pb2.RATING, "click": manifest_pb2.CLICK}
_RANK_BY = {pb.RANK_BY_UNSPECIFIED: "auto", pb.RANK_BY_ENGAGEMENT: "engagement", pb.RANK_BY_PREDICTED_RATING: "rating"}
_STRATEGIES = {
    pb.ONBOARD_STRATEGY_UNSPECIFIED: "dopt",
    pb.ONBOARD_STRATEGY_D_OPTIMAL: "dopt",
    pb.ONBOARD_STRATEGY_GRADIENT_POPULARITY: "melu",
    pb.ONBOARD_STRATEGY_POPULAR: "popular",
    pb.ONBOARD_STRATEGY_RANDOM: "random",
}
_STRATEGY_VALUES = {name: value for value, name in _STRATEGIES.items() if value != pb.ONBOARD_STRATEGY_UNSPECIFIED}


class RecommenderServicer:
    """warmstart.v1.Recommender over a RecommenderCore."""

    def __init__(self, core: RecommenderCore) -> None:
        self._core = core

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        query = domain.RecommendQuery(
            user=_user(request, context),
            candidates=_either(request.candidates, request.candidate_ids, "candidates", "candidate_ids"),
            top_k=request.top_k,
            exclude_interacted=request.exclude_interacted,
            exclude_item_ids=tuple(request.exclude_item_ids),
            rank_by=_rank_by(request.rank_by),
        )
        result = await self._core.recommend(query)
        response = pb.RecommendResponse(
            request_id=result.request_id, model_name=result.model_name, model_version=result.model_version
        )
        _fill(response, result)
        return response

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        query = domain.ScoreQuery(user=_user(request, context), items=_either(request.items, request.item_ids, "items", "item_ids"))
        result = await self._core.score(query)
        response = pb.ScoreResponse(request_id=result.request_id, model_name=result.model_name, model_version=result.model_version)
        _fill(response, result)
        return response

    async def Onboard(self, request: pb.OnboardRequest, context: grpc.aio.ServicerContext) -> pb.OnboardResponse:
        if request.strategy not in _STRATEGIES:
            raise InvalidArgument.one("strategy", f"unknown value {request.strategy}; use one of {', '.join(pb.OnboardStrategy.keys())}")
        query = domain.OnboardQuery(
            user=_user(request, context),
            candidates=domain.ItemList(list(request.candidate_ids), field="candidate_ids", bare_ids=True),
            count=request.count,
            exclude_item_ids=tuple(request.exclude_item_ids),
            strategy=_STRATEGIES[request.strategy],  # type: ignore[arg-type]
        )
        result = await self._core.onboard(query)
        response = pb.OnboardResponse(
            request_id=result.request_id,
            model_name=result.model_name,
            model_version=result.model_version,
            strategy=_STRATEGY_VALUES[result.strategy],
        )
        add = response.items.add
        for item_id, reason in zip(result.item_ids, result.reasons.tolist()):
            add(item_id=item_id, reason_score=reason)
        return response

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        d = self._core.describe()
        return pb.ModelInfo(
            model_name=d.model_name,
            model_version=d.model_version,
            created_at=d.created_at,
            label=manifest_pb2.LabelSpec(kind=_LABEL_KINDS[d.label_kind], min_value=d.label_min, max_value=d.label_max),
            user_fields=[_field_info(f) for f in d.user_fields],
            item_fields=[_field_info(f) for f in d.item_fields],
            catalog_size=d.catalog_size,
            inner_steps=d.inner_steps,
            model_kind=d.model_kind,
            learner=d.learner,
            engine=d.engine,
            limits=pb.Limits(max_interactions=d.max_interactions, max_candidates=d.max_candidates, max_batch_size=d.max_batch_size),
            has_engagement=d.has_engagement,
        )


def _rank_by(value: int) -> str:
    if value not in _RANK_BY:
        raise InvalidArgument.one("rank_by", f"unknown value {value}; use RANK_BY_ENGAGEMENT or RANK_BY_PREDICTED_RATING")
    return _RANK_BY[value]


def _user(request: pb.RecommendRequest | pb.ScoreRequest | pb.OnboardRequest, context: grpc.aio.ServicerContext) -> domain.UserContext:
    remaining = context.time_remaining()
    interactions = request.interactions
    # One pass: every access to a repeated message's element builds a new wrapper object.
    ids: list[str] = []
    labels: list[float] = []
    timestamps: list[int] = []
    add_id, add_label, add_timestamp = ids.append, labels.append, timestamps.append
    for m in interactions:
        add_id(m.item_id)
        add_label(m.label)
        add_timestamp(m.timestamp)
    return domain.UserContext(
        request_id=request.request_id,
        user_attributes=dict(request.user_attributes) if request.user_attributes else domain.NO_ATTRIBUTES,
        interactions=domain.Interactions(
            items=domain.ItemList(ids, lambda i: dict(interactions[i].item_attributes), "interactions"),
            labels=labels,
            timestamps=timestamps,
        ),
        deadline_s=time.monotonic() + remaining if remaining is not None else None,
    )


def _items(messages, field: str) -> domain.ItemList:
    """Ids now; a message's inline attributes only if the core asks (unknown items)."""
    return domain.ItemList([m.item_id for m in messages], lambda i: dict(messages[i].item_attributes), field)


def _either(messages, ids, messages_field: str, ids_field: str) -> domain.ItemList:
    """The items of a request, given as messages (attributes possible) or as bare ids."""
    if messages and ids:
        raise InvalidArgument.one(ids_field, f"set {messages_field} or {ids_field}, not both")
    if ids:
        return domain.ItemList(list(ids), field=ids_field, bare_ids=True)
    return _items(messages, messages_field)


def _fill(response: pb.RecommendResponse | pb.ScoreResponse, result: domain.ScoredItems) -> None:
    add = response.items.add  # add() in a loop: half the cost of extend() with new messages
    if result.engagement is None:
        for item_id, score in zip(result.item_ids, result.scores.tolist()):
            add(item_id=item_id, score=score)
    else:
        for item_id, score, engagement in zip(result.item_ids, result.scores.tolist(), result.engagement.tolist()):
            add(item_id=item_id, score=score, engagement=engagement)
    a = result.adaptation
    summary = response.adaptation
    summary.support_size = a.support_size
    summary.adapted = a.adapted
    summary.inner_steps = a.inner_steps
    summary.support_loss_before = a.support_loss_before
    summary.support_loss_after = a.support_loss_after
    summary.interactions_truncated = a.interactions_truncated
    for u in a.unknown_items:
        summary.unknown_items.add(item_id=u.item_id, role=_ROLES[u.role], handling=_HANDLING[u.handling])


def _field_info(f: domain.FieldDescription) -> pb.FieldInfo:
    return pb.FieldInfo(
        name=f.name, multi_valued=f.multi_valued, vocabulary_size=f.vocabulary_size, example_values=list(f.example_values)
    )


Handler = Callable[[object, grpc.aio.ServicerContext], Awaitable[object]]


class Admission:
    """Counts the Recommender calls in progress and admits at most `limit` Recommend and
    Score calls at once: when the server is full the handler itself answers
    RESOURCE_EXHAUSTED at once, instead of letting calls wait in front of it until their
    deadline."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the admission limit must be >= 1, got {limit}")
        self.limit = limit
        self.count = 0

    def try_enter(self) -> bool:
        """Admits one call unless `limit` are in progress."""
        if self.count >= self.limit:
            return False
        self.enter()
        return True

    def enter(self) -> None:
        """Counts one call whatever the limit (cheap RPCs that are never refused)."""
        self.count += 1

    def leave(self) -> None:
        self.count -= 1


# Refusals of a full server are answered from one prebuilt status: the cheaper a refusal,
# the more of the machine is left for the calls that were admitted.
_FULL = ServerFull("the server is at its limit of calls in progress; retry with backoff")


def _guarded(rpc: str, request_type, handle: Handler, metrics: Metrics, max_message_bytes: int, admission: Admission, limited: bool):
    """The RPC behaviour gRPC calls: admission, size check, parse, handle, map errors, record metrics."""
    full_status = rpc_status.to_status(to_status(_FULL, rpc))

    async def behaviour(raw: bytes, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        if limited:
            if not admission.try_enter():
                metrics.reject(_FULL.reject_reason)
                metrics.request(rpc, "RESOURCE_EXHAUSTED", time.perf_counter() - started)
                await context.abort_with_status(full_status)
        else:
            admission.enter()
        code = "OK"
        request_id = ""
        try:
            if len(raw) > max_message_bytes:
                raise InvalidArgument.one("request", f"{len(raw)} bytes; the server accepts at most {max_message_bytes}")
            try:
                request = request_type.FromString(raw)
            except DecodeError as exc:
                raise InvalidArgument.one("request", f"not a valid {request_type.DESCRIPTOR.full_name}: {exc}") from exc
            request_id = getattr(request, "request_id", "")
            return await handle(request, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status = to_status(exc, rpc, request_id)
            code = status_code(exc).name
            if isinstance(exc, ServiceError):
                metrics.reject(exc.reject_reason)
            if context.done():
                # The client went away (cancelled, or its deadline passed): there is nobody
                # to tell, and aborting a finished call only makes gRPC log an error.
                code = "CANCELLED"
                return None
            await context.abort_with_status(rpc_status.to_status(status))
        finally:
            admission.leave()
            metrics.request(rpc, code, time.perf_counter() - started)

    return behaviour


def add_recommender(
    server: grpc.aio.Server, core: RecommenderCore, metrics: Metrics, max_message_bytes: int, max_in_flight: int
) -> Admission:
    """Registers warmstart.v1.Recommender on a server; returns its admission counter
    (Recommend, Score and Onboard beyond max_in_flight at once get RESOURCE_EXHAUSTED; GetModel
    is counted but never refused)."""
    servicer = RecommenderServicer(core)
    admission = Admission(max_in_flight)
    methods = {
        "Recommend": (pb.RecommendRequest, pb.RecommendResponse, servicer.Recommend, True),
        "Score": (pb.ScoreRequest, pb.ScoreResponse, servicer.Score, True),
        "Onboard": (pb.OnboardRequest, pb.OnboardResponse, servicer.Onboard, True),
        "GetModel": (pb.GetModelRequest, pb.ModelInfo, servicer.GetModel, False),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _guarded(name, request_type, handle, metrics, max_message_bytes, admission, limited),
            request_deserializer=None,  # raw bytes: the size check comes before parsing
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type, handle, limited) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return admission
