"""The one place exceptions become gRPC statuses."""

from __future__ import annotations

import logging

import grpc
from google.rpc import error_details_pb2

from service.errors import (
    GENERIC_INTERNAL_MESSAGE,
    MAX_VIOLATIONS,
    DeadlineExpired,
    EngineFailure,
    FieldViolation,
    InvalidArgument,
    NotReady,
    Overloaded,
    status_code,
    to_status,
)


def test_codes():
    assert status_code(InvalidArgument.one("top_k", "bad")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(NotReady("loading")) == grpc.StatusCode.UNAVAILABLE
    assert status_code(Overloaded("full")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(DeadlineExpired("late")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_code(EngineFailure("boom")) == grpc.StatusCode.INTERNAL
    assert status_code(KeyError("bug")) == grpc.StatusCode.INTERNAL


def test_invalid_argument_carries_a_bad_request():
    status = to_status(InvalidArgument([FieldViolation("a", "x"), FieldViolation("b", "y")]), "Recommend")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "invalid a: x (and 1 more)"
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("a", "x"), ("b", "y")]


def test_violations_are_capped():
    status = to_status(InvalidArgument([FieldViolation(f"f{k}", "bad") for k in range(MAX_VIOLATIONS + 7)]), "Score")
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert len(bad.field_violations) == MAX_VIOLATIONS + 1
    assert bad.field_violations[-1].description == "7 more violations"


def test_unexpected_errors_are_generic_outside_and_detailed_in_the_log(caplog):
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        status = to_status(KeyError("secret internal detail"), "Recommend", request_id="r-9")
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert status.message == GENERIC_INTERNAL_MESSAGE and "secret" not in status.message
    assert "r-9" in caplog.text and "secret internal detail" in caplog.text


def test_engine_failures_do_not_leak_their_detail():
    status = to_status(EngineFailure("onnxruntime said: shape mismatch at node 42"), "Recommend")
    assert status.message == GENERIC_INTERNAL_MESSAGE
