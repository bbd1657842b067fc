"""Every RPC over a real server on loopback: answers, references, and every bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.numpy import load_file

from tests.service.harness import bad_request_fields, recommend_request
from tests.service.test_artifact import training_schema
from warmstart.v1 import manifest_pb2, recommender_pb2 as pb


class Reference:
    """The artifact's graph run directly on one unpadded user, encoded independently of
    the service (catalog rows from catalog.safetensors, user rows by training's schema)."""

    def __init__(self, artifact: Path) -> None:
        self.artifact = artifact
        self.ids = (artifact / "catalog_items.txt").read_text().split("\n")[:-1]
        self.row = {item: k for k, item in enumerate(self.ids)}
        self.codes = load_file(str(artifact / "catalog.safetensors"))["item_features"]
        self.schema = training_schema(artifact)
        self.session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])

    def inputs(self, request, candidates: list[str]):
        interactions = list(request.interactions)
        user = {k: (v,) for k, v in request.user_attributes.items()}
        n = max(1, len(interactions))  # the graph wants one support slot; mask 0 for none
        support = np.zeros((1, n, self.codes.shape[1]), dtype=np.int64)
        labels = np.zeros((1, n), dtype=np.float32)
        mask = np.zeros((1, n), dtype=np.float32)
        for k, i in enumerate(interactions):
            support[0, k] = self.codes[self.row[i.item_id]]
            labels[0, k] = i.label
            mask[0, k] = 1.0
        return {
            "user_features": self.schema.encode_user(user)[None, :],
            "support_items": support,
            "support_labels": labels,
            "support_mask": mask,
            "query_items": self.codes[[self.row[c] for c in candidates]][None, :, :],
        }

    def run(self, request, candidates: list[str]) -> tuple[np.ndarray, float, float]:
        """(scores, support loss before, after) of one user."""
        scores, before, after, _ = self.run_all(request, candidates)
        return scores, before, after

    def run_all(self, request, candidates: list[str]) -> tuple[np.ndarray, float, float, np.ndarray]:
        """... and the engagement logits Recommend ranks by."""
        scores, before, after, engagement = self.session.run(
            ["query_scores", "support_loss_before", "support_loss_after", "query_engagement"], self.inputs(request, candidates)
        )
        return scores[0], float(before[0]), float(after[0]), engagement[0]


@pytest.fixture(scope="module")
def reference(tiny_artifact: Path) -> Reference:
    return Reference(tiny_artifact)


# -- happy paths -------------------------------------------------------------------------


def test_recommend_ranks_candidates(shared_server, item_ids, reference):
    request = recommend_request(item_ids, 8, 40, np.random.default_rng(1), request_id="r-1", top_k=5)
    request.user_attributes["region"] = "west"
    response = shared_server.stub.Recommend(request)
    assert response.request_id == "r-1" and response.model_name == "tiny" and response.model_version == "1"
    candidates = [c.item_id for c in request.candidates]
    scores, before, after, engagement = reference.run_all(request, candidates)
    best = np.argsort(-engagement, kind="stable")[:5]  # ranked by engagement: the model has the head
    assert [i.item_id for i in response.items] == [candidates[k] for k in best]
    np.testing.assert_allclose([i.engagement for i in response.items], engagement[best], atol=1e-5)
    np.testing.assert_allclose([i.score for i in response.items], scores[best], atol=1e-5)
    summary = response.adaptation
    assert summary.support_size == 8 and summary.adapted and summary.inner_steps == 2
    assert math.isclose(summary.support_loss_before, before, abs_tol=1e-5)
    assert math.isclose(summary.support_loss_after, after, abs_tol=1e-5)
    assert summary.interactions_truncated == 0 and not summary.unknown_items


def test_recommend_the_whole_catalog_with_exclusions(shared_server, item_ids, reference):
    request = recommend_request(item_ids, 5, 0, np.random.default_rng(2), top_k=0, exclude_interacted=True)
    request.exclude_item_ids.extend([item_ids[0], "not-an-item"])
    response = shared_server.stub.Recommend(request)
    excluded = {i.item_id for i in request.interactions} | {item_ids[0]}
    assert len(response.items) == len(item_ids) - len(excluded)
    assert not excluded & {i.item_id for i in response.items}
    engagement = [i.engagement for i in response.items]
    assert engagement == sorted(engagement, reverse=True)
    full, _, _, full_engagement = reference.run_all(request, item_ids)
    by_id = dict(zip(item_ids, full))
    np.testing.assert_allclose([i.score for i in response.items], [by_id[i.item_id] for i in response.items], atol=1e-5)
    engagement_by_id = dict(zip(item_ids, full_engagement))
    np.testing.assert_allclose(engagement, [engagement_by_id[i.item_id] for i in response.items], atol=1e-5)


def test_recommend_can_rank_by_predicted_rating(shared_server, item_ids, reference):
    request = recommend_request(item_ids, 6, 30, np.random.default_rng(12), top_k=7, rank_by=pb.RANK_BY_PREDICTED_RATING)
    response = shared_server.stub.Recommend(request)
    candidates = [c.item_id for c in request.candidates]
    scores, _, _, engagement = reference.run_all(request, candidates)
    best = np.argsort(-scores, kind="stable")[:7]
    assert [i.item_id for i in response.items] == [candidates[k] for k in best]
    np.testing.assert_allclose([i.engagement for i in response.items], engagement[best], atol=1e-5)
    by_engagement = shared_server.stub.Recommend(pb.RecommendRequest(
        interactions=request.interactions, candidates=request.candidates, top_k=7, rank_by=pb.RANK_BY_ENGAGEMENT
    ))
    assert [i.item_id for i in by_engagement.items] == [candidates[k] for k in np.argsort(-engagement, kind="stable")[:7]]
    assert [i.item_id for i in by_engagement.items] != [i.item_id for i in response.items]  # the two orders differ here


def test_zero_interactions_use_the_initialisation(shared_server, item_ids, reference):
    request = pb.RecommendRequest(candidates=[pb.Candidate(item_id=i) for i in item_ids[:20]], top_k=3)
    response = shared_server.stub.Recommend(request)
    summary = response.adaptation
    assert summary.support_size == 0 and not summary.adapted and summary.inner_steps == 0
    assert summary.support_loss_before == 0 and summary.support_loss_after == 0
    _, _, _, engagement = reference.run_all(request, item_ids[:20])
    np.testing.assert_allclose([i.engagement for i in response.items], np.sort(engagement)[::-1][:3], atol=1e-5)


def test_score_keeps_request_order(shared_server, item_ids, reference):
    rng = np.random.default_rng(3)
    chosen = [item_ids[k] for k in rng.choice(len(item_ids), 30, replace=False)]
    request = pb.ScoreRequest(
        request_id="s",
        interactions=[pb.Interaction(item_id=i, label=4.0) for i in chosen[:6]],
        items=[pb.Candidate(item_id=i) for i in chosen[6:]],
    )
    response = shared_server.stub.Score(request)
    assert [i.item_id for i in response.items] == chosen[6:]
    scores, _, _ = reference.run(request, chosen[6:])
    np.testing.assert_allclose([i.score for i in response.items], scores, atol=1e-5)
    assert response.adaptation.support_size == 6


def test_timestamps_order_interactions_without_changing_the_answer(shared_server, item_ids):
    forward = [pb.Interaction(item_id=item_ids[k], label=1.0 + k % 5, timestamp=1000 + k) for k in range(6)]
    candidates = [pb.Candidate(item_id=i) for i in item_ids[50:60]]
    a = shared_server.stub.Score(pb.ScoreRequest(interactions=forward, items=candidates))
    b = shared_server.stub.Score(pb.ScoreRequest(interactions=forward[::-1], items=candidates))
    np.testing.assert_allclose([i.score for i in a.items], [i.score for i in b.items], atol=1e-6)


def test_unknown_items_with_attributes_are_encoded(shared_server, item_ids):
    request = pb.RecommendRequest(
        interactions=[
            pb.Interaction(item_id="new-interaction", label=5.0, item_attributes={"genres": "drama|comedy", "year": "1990-1994"}),
            pb.Interaction(item_id=item_ids[3], label=2.0),
        ],
        candidates=[pb.Candidate(item_id="new-candidate", item_attributes={"genres": "horror"}), pb.Candidate(item_id=item_ids[4])],
    )
    response = shared_server.stub.Recommend(request)
    unknown = {(u.item_id, u.role, u.handling) for u in response.adaptation.unknown_items}
    assert unknown == {
        ("new-interaction", pb.INTERACTION, pb.ENCODED_FROM_ATTRIBUTES),
        ("new-candidate", pb.CANDIDATE, pb.ENCODED_FROM_ATTRIBUTES),
    }
    assert {i.item_id for i in response.items} == {"new-candidate", item_ids[4]}


def test_get_model_describes_the_model(shared_server, tiny_artifact):
    info = shared_server.stub.GetModel(pb.GetModelRequest())
    assert (info.model_name, info.model_version, info.model_kind) == ("tiny", "1", "bias_factor")
    assert info.label.kind == manifest_pb2.RATING
    assert (info.label.min_value, info.label.max_value) == (1.0, 5.0)
    assert {f.name for f in info.user_fields} == {"age_group", "region"}
    assert {f.name for f in info.item_fields} == {"genres", "year"}  # the item id fills itself
    assert next(f for f in info.item_fields if f.name == "genres").multi_valued
    assert info.catalog_size == 150 and info.inner_steps == 2
    assert info.engine == "onnxruntime:CPUExecutionProvider"
    assert (info.limits.max_interactions, info.limits.max_candidates, info.limits.max_batch_size) == (32, 256, 16)


def test_health_is_serving_for_both_names(shared_server):
    health = health_pb2_grpc.HealthStub(shared_server.channel)
    for service in ("", "warmstart.v1.Recommender"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_requests_each_get_their_own_answer(shared_server, item_ids, reference):
    """300 requests in flight at once, support sizes 0..31, candidate counts 1..120."""
    rng = np.random.default_rng(4)
    requests = [
        recommend_request(item_ids, int(rng.integers(0, 32)), int(rng.integers(1, 121)), rng, request_id=str(k), top_k=0)
        for k in range(300)
    ]
    stub = shared_server.stub
    futures = [stub.Score.future(pb.ScoreRequest(request_id=r.request_id, interactions=r.interactions, items=r.candidates)) for r in requests]
    for request, future in zip(requests, futures):
        response = future.result(timeout=30)
        assert response.request_id == request.request_id
        scores, before, _ = reference.run(request, [c.item_id for c in request.candidates])
        np.testing.assert_allclose([i.score for i in response.items], scores, atol=1e-5)
        if request.interactions:
            assert math.isclose(response.adaptation.support_loss_before, before, abs_tol=1e-5)


def test_reflection_lists_the_services(shared_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(shared_server.channel)
    services = set(database.get_services())
    assert {"warmstart.v1.Recommender", "grpc.health.v1.Health"} <= services
    file = database.FindFileContainingSymbol("warmstart.v1.Recommender")
    assert file.name == "warmstart/v1/recommender.proto"


# -- bad input ---------------------------------------------------------------------------


def _interaction(item: str, label: float = 4.0, **kw) -> pb.Interaction:
    return pb.Interaction(item_id=item, label=label, **kw)


BAD_RECOMMENDS = {
    "unknown user attribute": (lambda ids: pb.RecommendRequest(user_attributes={"shoe_size": "44"}), 'user_attributes["shoe_size"]'),
    "unknown user value": (lambda ids: pb.RecommendRequest(user_attributes={"region": "atlantis"}), 'user_attributes["region"]'),
    "unknown interaction item": (lambda ids: pb.RecommendRequest(interactions=[_interaction(ids[0]), _interaction("ghost")]), "interactions[1].item_id"),
    "unknown candidate item": (
        lambda ids: pb.RecommendRequest(candidates=[pb.Candidate(item_id=ids[0]), pb.Candidate(item_id="ghost")]),
        "candidates[1].item_id",
    ),
    "empty item id": (lambda ids: pb.RecommendRequest(interactions=[_interaction("")]), "interactions[0].item_id"),
    "unknown item attribute": (
        lambda ids: pb.RecommendRequest(candidates=[pb.Candidate(item_id="new", item_attributes={"colour": "red"})]),
        'candidates[0].item_attributes["colour"]',
    ),
    "unknown item attribute value": (
        lambda ids: pb.RecommendRequest(candidates=[pb.Candidate(item_id="new", item_attributes={"genres": "polka"})]),
        'candidates[0].item_attributes["genres"]',
    ),
    "item id given as attribute": (
        lambda ids: pb.RecommendRequest(candidates=[pb.Candidate(item_id="new", item_attributes={"item_id": "i0001"})]),
        'candidates[0].item_attributes["item_id"]',
    ),
    "NaN label": (lambda ids: pb.RecommendRequest(interactions=[_interaction(ids[0], float("nan"))]), "interactions[0].label"),
    "infinite label": (lambda ids: pb.RecommendRequest(interactions=[_interaction(ids[0], float("inf"))]), "interactions[0].label"),
    "label above range": (lambda ids: pb.RecommendRequest(interactions=[_interaction(ids[0]), _interaction(ids[1], 5.5)]), "interactions[1].label"),
    "label below range": (lambda ids: pb.RecommendRequest(interactions=[_interaction(ids[0], 0.0)]), "interactions[0].label"),
    "duplicate candidates": (
        lambda ids: pb.RecommendRequest(candidates=[pb.Candidate(item_id=i) for i in (ids[0], ids[1], ids[0])]),
        "candidates[2].item_id",
    ),
    "negative top_k": (lambda ids: pb.RecommendRequest(top_k=-1), "top_k"),
    "unknown rank_by": (lambda ids: pb.RecommendRequest(rank_by=99), "rank_by"),
    "too many interactions": (lambda ids: pb.RecommendRequest(interactions=[_interaction(i) for i in ids[:33]]), "interactions"),
    "too many candidates": (lambda ids: pb.RecommendRequest(candidates=[pb.Candidate(item_id=f"c{k}") for k in range(257)]), "candidates"),
    "too many candidate ids": (lambda ids: pb.RecommendRequest(candidate_ids=[f"c{k}" for k in range(257)]), "candidate_ids"),
    "duplicate candidate ids": (lambda ids: pb.RecommendRequest(candidate_ids=[ids[0], ids[1], ids[1]]), "candidate_ids[2]"),
    "unknown candidate id": (lambda ids: pb.RecommendRequest(candidate_ids=[ids[0], "ghost"]), "candidate_ids[1]"),
    "both candidate forms": (
        lambda ids: pb.RecommendRequest(candidates=[pb.Candidate(item_id=ids[0])], candidate_ids=[ids[1]]),
        "candidate_ids",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECOMMENDS))
def test_bad_recommend_names_the_field(shared_server, item_ids, case):
    build, field = BAD_RECOMMENDS[case]
    with pytest.raises(grpc.RpcError) as refused:
        shared_server.stub.Recommend(build(item_ids))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(refused.value)


def test_every_bad_field_is_named_at_once(shared_server, item_ids):
    request = pb.RecommendRequest(
        user_attributes={"shoe_size": "44"}, interactions=[_interaction("ghost", 9.0)], top_k=-2
    )
    with pytest.raises(grpc.RpcError) as refused:
        shared_server.stub.Recommend(request)
    assert set(bad_request_fields(refused.value)) == {
        'user_attributes["shoe_size"]', "interactions[0].label", "interactions[0].item_id", "top_k"
    }


def test_candidate_ids_are_the_same_as_candidate_messages(shared_server, item_ids):
    rng = np.random.default_rng(8)
    as_messages = recommend_request(item_ids, 5, 60, rng, top_k=7)
    as_ids = pb.RecommendRequest(interactions=as_messages.interactions, candidate_ids=[c.item_id for c in as_messages.candidates], top_k=7)
    a, b = shared_server.stub.Recommend(as_messages), shared_server.stub.Recommend(as_ids)
    assert [(i.item_id, i.score) for i in a.items] == [(i.item_id, i.score) for i in b.items]
    scored = shared_server.stub.Score(pb.ScoreRequest(interactions=as_messages.interactions, item_ids=item_ids[40:50]))
    assert [i.item_id for i in scored.items] == item_ids[40:50]


def test_score_needs_items(shared_server):
    with pytest.raises(grpc.RpcError) as refused:
        shared_server.stub.Score(pb.ScoreRequest())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["items"]


def test_oversized_message_is_invalid_argument(tiny_repository):
    from tests.service.harness import ServerThread, make_config

    with ServerThread(make_config(tiny_repository, model_name="tiny", max_message_bytes=2048)) as server:
        request = pb.RecommendRequest(request_id="x" * 4000)
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Recommend(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(refused.value) == ["request"]
        # Far above the limit, gRPC's own guard answers before any handler runs.
        with pytest.raises(grpc.RpcError) as guarded:
            server.stub.Recommend(pb.RecommendRequest(request_id="x" * 10000))
        assert guarded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metrics_count_requests_by_code(shared_server, item_ids):
    before = shared_server.metric("warmstart_requests_total", rpc="GetModel", code="OK")
    invalid = shared_server.metric("warmstart_rejects_total", reason="invalid_argument")
    shared_server.stub.GetModel(pb.GetModelRequest())
    with pytest.raises(grpc.RpcError):
        shared_server.stub.Recommend(pb.RecommendRequest(top_k=-1))
    assert shared_server.metric("warmstart_requests_total", rpc="GetModel", code="OK") == before + 1
    assert shared_server.metric("warmstart_rejects_total", reason="invalid_argument") == invalid + 1
    assert shared_server.metric("warmstart_requests_total", rpc="Recommend", code="INVALID_ARGUMENT") >= 1


def test_many_clients_on_threads(shared_server, item_ids):
    """Blocking clients on several threads (how a threaded backend calls it)."""
    rng = np.random.default_rng(5)
    requests = [recommend_request(item_ids, 10, 100, rng, top_k=10) for _ in range(64)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(shared_server.stub.Recommend, requests))
    assert all(len(r.items) == 10 for r in responses)


def test_grpcurl_needs_no_proto_files(shared_server):
    """Reflection is enough for grpcurl to list, describe and call the service."""
    grpcurl = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if grpcurl is None:
        pytest.skip("grpcurl is not installed")
    target = f"127.0.0.1:{shared_server.port}"

    def call(*args: str) -> str:
        result = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "warmstart.v1.Recommender" in call(target, "list").split()
    assert "rpc Recommend" in call(target, "describe", "warmstart.v1.Recommender")
    response = json.loads(call("-d", '{"top_k": 2}', target, "warmstart.v1.Recommender/Recommend"))
    assert len(response["items"]) == 2
