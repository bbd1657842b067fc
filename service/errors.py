"""Domain errors of the service and the one place that maps them to gRPC statuses.

Everything below the servicer raises these plain exceptions; `to_status` turns any
exception into a google.rpc.Status (code, message, details). Unexpected exceptions
become INTERNAL with a generic message: their detail goes to the log, never to the
caller.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger(__name__)

MAX_VIOLATIONS = 50  # a BadRequest names at most this many fields; the rest are counted
# Bounds on what an error repeats of a request: the status travels in trailers, and a
# client refuses trailers over its metadata limit (8 KiB by default) with
# RESOURCE_EXHAUSTED, which would turn a permanently bad request into a "retry" answer.
ECHO_CHARS = 64  # a request string quoted in an error or a log line
MAX_MESSAGE_CHARS = 300
MAX_FIELD_CHARS = 160
MAX_DESCRIPTION_CHARS = 240
MAX_DETAILS_BYTES = 4096  # the serialized BadRequest (base64 in the trailer: a third more)


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A request value quoted for an error or a log line: ASCII (gRPC percent-encodes the
    rest, tripling it) and at most about `limit` characters, with the length it had."""
    text = value if isinstance(value, str) else str(value)
    quoted = ascii(text[:limit])  # cut first: a request string may be megabytes long
    if len(text) <= limit and len(quoted) <= limit:
        return quoted
    return f"{quoted[: limit - 4]}...' ({len(text)} chars)"


def echo_key(name: str, limit: int = ECHO_CHARS) -> str:
    """A request map key as it appears in a field path (`user_attributes["region"]`):
    double-quoted ASCII, cut to about `limit` characters."""
    return json.dumps(name if len(name) <= limit else name[: limit - 3] + "...")


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, as a path in the request ("interactions[3].label")."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of the errors a request can end with, other than a bug."""

    reject_reason = "error"  # label of warmstart_rejects_total


class InvalidArgument(ServiceError):
    """The request is malformed; `violations` name the fields."""

    reject_reason = "invalid_argument"

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one violation")
        self.violations = tuple(violations)
        first = self.violations[0]
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        super().__init__(f"invalid {first.field}: {first.description}{more}")

    @staticmethod
    def one(field: str, description: str) -> "InvalidArgument":
        return InvalidArgument([FieldViolation(field, description)])


class NotReady(ServiceError):
    """No model is loaded yet, or the server is shutting down."""

    reject_reason = "not_ready"


class Overloaded(ServiceError):
    """The batcher's queue is full: the caller should back off and retry."""

    reject_reason = "queue_full"


class ServerFull(Overloaded):
    """As many calls as the server admits at once are in progress (--max-in-flight)."""

    reject_reason = "server_full"


class DeadlineExpired(ServiceError):
    """The request's deadline passed before the engine ran it."""

    reject_reason = "deadline_exceeded"


class FailedPrecondition(ServiceError):
    """The request is well formed but the model being served cannot answer it (e.g. Onboard
    on a version exported without what onboarding needs): not worth retrying as it is."""

    reject_reason = "failed_precondition"


class EngineFailure(ServiceError):
    """The engine raised while running a batch (already logged with its traceback)."""

    reject_reason = "engine_failure"


_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    EngineFailure: grpc.StatusCode.INTERNAL,
}

GENERIC_INTERNAL_MESSAGE = "internal error; the server log has the detail"


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code an exception ends a call with."""
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: BaseException, rpc: str, request_id: str = "") -> status_pb2.Status:
    """The google.rpc.Status for an exception; unexpected ones are logged here."""
    code = status_code(exc)
    if isinstance(exc, InvalidArgument):
        bad_request = error_details_pb2.BadRequest()
        shown = 0
        for violation in exc.violations[:MAX_VIOLATIONS]:
            entry = bad_request.field_violations.add(
                field=_bounded(violation.field, MAX_FIELD_CHARS), description=_bounded(violation.description, MAX_DESCRIPTION_CHARS)
            )
            if bad_request.ByteSize() > MAX_DETAILS_BYTES:
                bad_request.field_violations.remove(entry)
                break
            shown += 1
        if len(exc.violations) > shown:
            bad_request.field_violations.add(field="", description=f"{len(exc.violations) - shown} more violations")
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        return status_pb2.Status(code=code.value[0], message=_bounded(str(exc), MAX_MESSAGE_CHARS), details=[detail])
    if isinstance(exc, EngineFailure):
        return status_pb2.Status(code=code.value[0], message=GENERIC_INTERNAL_MESSAGE)
    if isinstance(exc, ServiceError):
        return status_pb2.Status(code=code.value[0], message=_bounded(str(exc), MAX_MESSAGE_CHARS))
    log.error("%s failed unexpectedly (request_id=%s)", rpc, echo(request_id), exc_info=exc)
    return status_pb2.Status(code=code.value[0], message=GENERIC_INTERNAL_MESSAGE)
