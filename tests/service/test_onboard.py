"""Onboard over a real server: the served selection is training's, sequential asking never
repeats, every bad input gets its status code, a version without onboarding data is refused."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.artifact import load_artifact
from tests.service.harness import ServerThread, bad_request_fields, make_config, writable_copy, reseal_manifest
from training.batching import EncodedCatalog
from training.export import load_exported_model
from training.onboarding import item_vectors, onboarding_prior
from training.splits import Task
from training.synthetic import generate_synthetic
from warmstart import onboarding as O
from warmstart.v1 import recommender_pb2 as pb


class TrainingSide:
    """Training's model rebuilt from the artifact's files, its item vectors computed from the
    parameters (not read from the item table), and the selection run on them."""

    def __init__(self, artifact: Path, item_ids: list[str]) -> None:
        self.model = load_exported_model(artifact)
        dataset = generate_synthetic(seed=3, n_users=240, n_items=150)  # the tiny artifact's data (tests/conftest.py)
        self.catalog = EncodedCatalog(self.model.schema, dataset)
        self.ids = item_ids
        self.rows = self.catalog.rows(item_ids)  # artifact catalog order
        self.vectors = item_vectors(self.model, self.catalog, self.rows)
        self.prior = onboarding_prior(self.model)

    def select(self, strategy: str, count: int, interactions: list[tuple[str, float]], pool: list[str] | None = None, excluded=()):
        task = Task("u", np.array([i for i, _ in interactions], dtype=object), np.array([l for _, l in interactions]), np.array([], dtype=object), np.zeros(0))
        position = {item: k for k, item in enumerate(self.ids)}
        candidates = None if pool is None else np.array([position[i] for i in pool])
        logits = self.model.score_catalog(self.catalog, [task], self.rows)[0]
        chosen = O.select(
            strategy, self.vectors, self.prior, count,
            candidates=candidates,
            engagement_logits=logits if candidates is None else logits[candidates],
            answered=np.array([position[i] for i, _ in interactions], dtype=np.int64),
            excluded=np.array([position[i] for i in excluded], dtype=np.int64),
        )
        return [self.ids[r] for r in chosen.rows.tolist()], chosen.reasons


@pytest.fixture(scope="module")
def training_side(tiny_artifact, item_ids) -> TrainingSide:
    return TrainingSide(tiny_artifact, item_ids)


def _request(interactions=(), **fields) -> pb.OnboardRequest:
    return pb.OnboardRequest(interactions=[pb.Interaction(item_id=i, label=l) for i, l in interactions], **fields)


def test_the_artifact_carries_training_s_prior(tiny_artifact):
    served = load_artifact(tiny_artifact).onboarding_prior
    trained = onboarding_prior(load_exported_model(tiny_artifact))
    assert served is not None and trained.engagement is not None
    np.testing.assert_allclose(served.rating, trained.rating, rtol=1e-12)
    np.testing.assert_allclose(served.engagement, trained.engagement, rtol=1e-12)


@pytest.mark.parametrize("strategy, value", [("dopt", pb.ONBOARD_STRATEGY_D_OPTIMAL), ("melu", pb.ONBOARD_STRATEGY_GRADIENT_POPULARITY)])
@pytest.mark.parametrize("case", ["cold, catalog", "answers, catalog", "answers, pool"])
def test_served_selection_equals_training_selection(shared_server, item_ids, training_side, strategy, value, case):
    interactions = [] if case.startswith("cold") else [(item_ids[3], 5.0), (item_ids[17], 1.0), (item_ids[40], 4.0)]
    pool = item_ids[10:90] if case.endswith("pool") else None
    response = shared_server.stub.Onboard(_request(interactions, count=6, strategy=value, candidate_ids=pool or [], exclude_item_ids=[item_ids[12]]))
    expected_ids, expected_reasons = training_side.select(strategy, 6, interactions, pool, excluded=[item_ids[12]])
    assert [i.item_id for i in response.items] == expected_ids
    np.testing.assert_allclose([i.reason_score for i in response.items], expected_reasons, rtol=1e-4, atol=1e-7)
    assert response.strategy == value and response.model_version == "1"


def test_default_is_d_optimal_with_non_increasing_gains(shared_server, item_ids):
    response = shared_server.stub.Onboard(_request(count=8, request_id="onb-1"))
    assert response.strategy == pb.ONBOARD_STRATEGY_D_OPTIMAL and response.request_id == "onb-1"
    reasons = [i.reason_score for i in response.items]
    assert len(reasons) == 8 and len({i.item_id for i in response.items}) == 8
    assert all(a >= b - 1e-9 for a, b in zip(reasons, reasons[1:])), reasons  # submodular: the gains only shrink
    assert reasons[-1] > 0


def test_popular_follows_the_learned_popularity(shared_server, tiny_artifact, item_ids):
    bias = load_artifact(tiny_artifact).item_table.engagement_bias
    response = shared_server.stub.Onboard(_request(count=5, strategy=pb.ONBOARD_STRATEGY_POPULAR))
    expected = np.argsort(-np.asarray(bias, dtype=np.float64), kind="stable")[:5]
    assert [i.item_id for i in response.items] == [item_ids[r] for r in expected]
    np.testing.assert_allclose([i.reason_score for i in response.items], np.asarray(bias)[expected], rtol=1e-6)


@pytest.mark.parametrize("strategy", [pb.ONBOARD_STRATEGY_D_OPTIMAL, pb.ONBOARD_STRATEGY_GRADIENT_POPULARITY, pb.ONBOARD_STRATEGY_POPULAR, pb.ONBOARD_STRATEGY_RANDOM])
def test_sequential_asking_never_repeats(shared_server, item_ids, strategy):
    pool = item_ids[:20]
    excluded = [item_ids[0], item_ids[7]]
    answers: list[tuple[str, float]] = []
    asked: list[str] = []
    for round_ in range(7):
        response = shared_server.stub.Onboard(_request(answers, count=3, strategy=strategy, candidate_ids=pool, exclude_item_ids=excluded))
        ids = [i.item_id for i in response.items]
        assert not set(ids) & set(excluded) and not set(ids) & set(asked) and set(ids) <= set(pool)
        asked += ids
        answers += [(i, float(1 + (round_ + k) % 5)) for k, i in enumerate(ids)]
    assert len(asked) == len(set(asked)) == 18  # the pool of 20 minus the 2 excluded, then nothing left
    assert shared_server.stub.Onboard(_request(answers, count=3, strategy=strategy, candidate_ids=pool, exclude_item_ids=excluded)).items == []


def test_metrics_count_asks_and_items(shared_server):
    asks = shared_server.metric("warmstart_onboard_asks_total", strategy="random")
    items = shared_server.metric("warmstart_onboard_items_sum")
    ok = shared_server.metric("warmstart_requests_total", rpc="Onboard", code="OK")
    shared_server.stub.Onboard(_request(count=4, strategy=pb.ONBOARD_STRATEGY_RANDOM))
    assert shared_server.metric("warmstart_onboard_asks_total", strategy="random") == asks + 1
    assert shared_server.metric("warmstart_onboard_items_sum") == items + 4
    assert shared_server.metric("warmstart_requests_total", rpc="Onboard", code="OK") == ok + 1


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"count": 0}, {"count"}),
        ({"count": -2}, {"count"}),
        ({"count": 257}, {"count"}),  # the test server's max_candidates
        ({"count": 3, "candidate_ids": ["no-such-item"]}, {"candidate_ids[0]"}),
        ({"count": 3, "strategy": 99}, {"strategy"}),
        ({"count": 3, "user_attributes": {"nope": "x"}}, {'user_attributes["nope"]'}),
    ],
)
def test_bad_requests_are_invalid_argument(shared_server, fields, expected):
    with pytest.raises(grpc.RpcError) as refused:
        shared_server.stub.Onboard(pb.OnboardRequest(**fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad_request_fields(refused.value)) == expected


def test_bad_interactions_and_pools_name_every_field(shared_server, item_ids):
    request = _request([(item_ids[0], 9.0), ("unknown-item", 3.0)], count=3, candidate_ids=[item_ids[1], item_ids[1]])
    with pytest.raises(grpc.RpcError) as refused:
        shared_server.stub.Onboard(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad_request_fields(refused.value)) == {"interactions[0].label", "interactions[1].item_id", "candidate_ids[1]"}
    with pytest.raises(grpc.RpcError) as too_many:
        shared_server.stub.Onboard(_request(count=3, candidate_ids=[f"x{k}" for k in range(300)]))
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("missing", ["prior", "item table"])
def test_a_version_without_onboarding_data_is_failed_precondition(tiny_artifact, tmp_path, missing):
    copy = writable_copy(tiny_artifact, tmp_path / "repo" / "tiny" / "1")
    manifest = json.loads((copy / "manifest.json").read_text())
    if missing == "prior":
        gone = {O.PRIOR_FILE}
    else:  # an artifact from before the item table: the fused graph alone serves it
        gone = {manifest["item_table"]["file"], manifest["adapt_graph"]["onnx_file"], manifest["adapt_graph"]["torch_export_file"]}
        del manifest["item_table"], manifest["adapt_graph"]
    for name in gone:
        (copy / name).unlink()
    manifest["files"] = [f for f in manifest["files"] if f["path"] not in gone]
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
    reseal_manifest(copy)
    with ServerThread(make_config(tmp_path / "repo", model_name="tiny")) as server:
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Onboard(_request(count=3))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot onboard" in refused.value.details()
        assert server.stub.Recommend(pb.RecommendRequest(top_k=3)).items  # the rest still serves
