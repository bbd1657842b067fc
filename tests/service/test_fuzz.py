"""A few thousand malformed and hostile requests: each gets OK or INVALID_ARGUMENT (never
INTERNAL, UNKNOWN or a RESOURCE_EXHAUSTED made of oversized error trailers), answers stay
finite and in range, and nothing the request says reaches an error or a log line unbounded."""

from __future__ import annotations

import logging
import math

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.service.harness import recommend_request
from warmstart.v1 import recommender_pb2 as pb

REQUESTS = 3000
MAX_TRAILER_TEXT = 6000  # what a bounded status may take; the client's metadata limit is 8 KiB
RECOMMEND = "/warmstart.v1.Recommender/Recommend"


def _huge(rng: np.random.Generator, n: int) -> str:
    alphabet = np.array(list("abcxyz\u00e9\u4e2d\U0001f600'\"\\\n"))
    return "".join(rng.choice(alphabet, size=n))


def _mutations(item_ids: list[str], rng: np.random.Generator):
    """Request builders, each a kind of bad (or borderline) input; returns serialized bytes."""

    def base() -> pb.RecommendRequest:
        return recommend_request(item_ids, int(rng.integers(0, 6)), int(rng.integers(1, 12)), rng, top_k=int(rng.integers(0, 5)))

    def unknown_item():
        r = base()
        r.interactions.add(item_id=_huge(rng, int(rng.integers(1, 7000))), label=3.0)
        return r.SerializeToString()

    def unknown_value():
        r = base()
        r.user_attributes["region"] = _huge(rng, int(rng.integers(1, 7000)))
        return r.SerializeToString()

    def unknown_attribute_name():
        r = base()
        r.user_attributes[_huge(rng, int(rng.integers(1, 5000)))] = "x"
        return r.SerializeToString()

    def many_bad_items():
        r = base()
        for _ in range(int(rng.integers(20, 30))):
            r.candidates.add(item_id=_huge(rng, 300), item_attributes={_huge(rng, 200): _huge(rng, 300)})
        return r.SerializeToString()

    def bad_labels():
        r = base()
        for value in rng.choice([math.nan, math.inf, -math.inf, -1e30, 1e30, 0.0, 6.0, 2.5], size=3):
            r.interactions.add(item_id=item_ids[int(rng.integers(len(item_ids)))], label=float(value))
        return r.SerializeToString()

    def huge_request_id():
        r = base()
        r.request_id = _huge(rng, int(rng.integers(10_000, 200_000)))
        r.interactions.add(item_id="no-such-item", label=3.0)
        return r.SerializeToString()

    def duplicates_and_limits():
        r = base()
        r.candidate_ids.extend(item_ids[:3] * int(rng.integers(1, 4)))
        r.top_k = int(rng.integers(-5, 5))
        return r.SerializeToString()

    def too_many():
        r = base()
        for _ in range(int(rng.integers(33, 60))):
            r.interactions.add(item_id=item_ids[0], label=4.0)
        return r.SerializeToString()

    def flipped_bytes():
        data = bytearray(base().SerializeToString())
        for _ in range(int(rng.integers(1, 8))):
            if data:
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        return bytes(data)

    def random_bytes():
        return rng.bytes(int(rng.integers(0, 400)))

    def timestamps():
        r = base()
        for interaction in r.interactions:
            interaction.timestamp = int(rng.choice([-(2**63), 2**63 - 1, 0, -1]))
        return r.SerializeToString()

    return [unknown_item, unknown_value, unknown_attribute_name, many_bad_items, bad_labels, huge_request_id,
            duplicates_and_limits, too_many, flipped_bytes, random_bytes, timestamps]


def test_thousands_of_malformed_requests_get_a_clear_bounded_answer(shared_server, item_ids, caplog):
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(12)
    mutations = _mutations(item_ids, rng)
    call = shared_server.channel.unary_unary(RECOMMEND, request_serializer=None, response_deserializer=pb.RecommendResponse.FromString)
    codes: dict[str, int] = {}
    pending = []
    for k in range(REQUESTS):
        mutation = mutations[k % len(mutations)]
        pending.append((mutation.__name__, call.future(mutation(), timeout=30)))
        if len(pending) == 64 or k == REQUESTS - 1:
            for name, future in pending:
                error = future.exception()
                if error is None:
                    response = future.result()
                    scores = [item.score for item in response.items]
                    assert all(math.isfinite(s) and 1.0 <= s <= 5.0 for s in scores), (name, scores[:5])
                    codes["OK"] = codes.get("OK", 0) + 1
                    continue
                code = error.code()
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, error.details()[:200])
                codes[code.name] = codes.get(code.name, 0) + 1
                status = rpc_status.from_call(error)
                assert status is not None, name
                assert len(status.message) + sum(len(d.value) for d in status.details) < MAX_TRAILER_TEXT, name
                for detail in status.details:
                    bad = error_details_pb2.BadRequest()
                    assert detail.Unpack(bad)
                    assert bad.field_violations, name
            pending = []
    assert codes.get("INVALID_ARGUMENT", 0) > REQUESTS // 2 and codes.get("OK", 0) > 0, codes
    longest = max((len(r.getMessage()) for r in caplog.records), default=0)
    assert longest < 2000, longest  # request ids and values are quoted bounded in logs too


@pytest.mark.parametrize("size", [6000, 100_000])
def test_a_huge_unknown_id_is_invalid_argument_with_a_short_echo(shared_server, item_ids, size):
    """An unknown id of many KB once made the trailers exceed the client's metadata limit:
    the client saw RESOURCE_EXHAUSTED (retry) for a permanently bad request."""
    request = pb.RecommendRequest(interactions=[pb.Interaction(item_id="q" * size, label=3.0)], request_id="r" * size)
    with pytest.raises(grpc.RpcError) as refused:
        shared_server.stub.Recommend(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(refused.value.details()) < 400
    assert f"({size} chars)" in refused.value.details()
