"""The client library and command line, in the clear and over TLS / mTLS."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from service.client import RecommenderClient, RecommenderError, TlsOptions, main
from tests.service.harness import ServerThread, make_config
from warmstart.v1 import recommender_pb2 as pb


def test_library_calls(shared_server, item_ids):
    with RecommenderClient(f"127.0.0.1:{shared_server.port}") as client:
        assert client.health() == "SERVING"
        assert client.get_model().model_name == "tiny"
        response = client.recommend(interactions=[(item_ids[0], 5.0), (item_ids[1], 1.0, 1700000000)], top_k=4)
        assert len(response.items) == 4 and response.adaptation.support_size == 2
        assert item_ids[0] not in {i.item_id for i in response.items}  # exclude_interacted defaults to True
        scores = client.score(items=item_ids[5:8], interactions=[(item_ids[0], 5.0)])
        assert [i.item_id for i in scores.items] == item_ids[5:8]
        new_item = pb.Candidate(item_id="brand-new", item_attributes={"genres": "drama"})
        assert client.score(items=[new_item]).adaptation.unknown_items[0].item_id == "brand-new"
        by_rating = client.recommend(interactions=[(item_ids[0], 5.0)], candidates=item_ids[10:40], top_k=30, rank_by="rating")
        ratings = [i.score for i in by_rating.items]
        assert ratings == sorted(ratings, reverse=True)
        by_engagement = client.recommend(interactions=[(item_ids[0], 5.0)], candidates=item_ids[10:40], top_k=30, rank_by="engagement")
        engagement = [i.engagement for i in by_engagement.items]
        assert engagement == sorted(engagement, reverse=True)
        with pytest.raises(ValueError, match="rank_by"):
            client.recommend(rank_by="loudness")


def test_library_errors_carry_the_fields(shared_server):
    with RecommenderClient(f"127.0.0.1:{shared_server.port}") as client:
        with pytest.raises(RecommenderError) as refused:
            client.recommend(interactions=[("ghost", 9.0)], top_k=-1)
    error = refused.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in error.field_violations} == {"interactions[0].item_id", "interactions[0].label", "top_k"}
    assert "top_k" in str(error)


def test_command_line(shared_server, item_ids, capsys):
    target = f"127.0.0.1:{shared_server.port}"
    code = main([
        "recommend", "--target", target, "--interaction", f"{item_ids[0]}=5", "--interaction", f"{item_ids[1]}=2@1700000000",
        "--user", "region=west", "--top-k", "3", "--exclude-interacted",
    ])
    assert code == 0
    response = json.loads(capsys.readouterr().out)
    assert len(response["items"]) == 3 and response["adaptation"]["support_size"] == 2

    code = main([
        "score", "--target", target, "--candidate", "new.item", "--candidate", item_ids[3],
        "--item-attribute", "new.item.genres=drama|comedy",
    ])
    assert code == 0
    response = json.loads(capsys.readouterr().out)
    assert [i["item_id"] for i in response["items"]] == ["new.item", item_ids[3]]

    assert main(["model", "--target", target]) == 0
    assert json.loads(capsys.readouterr().out)["catalog_size"] == "150"  # uint64 is a string in JSON
    assert main(["health", "--target", target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"

    assert main(["recommend", "--target", target, "--interaction", "ghost=3"]) == 1
    assert "interactions[0].item_id" in capsys.readouterr().err


# -- TLS ---------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1, and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=warmstart-test-ca", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d,
        )
    return d


def test_tls(tiny_repository: Path, certificates: Path):
    config = make_config(tiny_repository, model_name="tiny", tls_cert=certificates / "server.pem", tls_key=certificates / "server.key")
    with ServerThread(config) as server:
        with RecommenderClient(f"127.0.0.1:{server.port}", tls=TlsOptions(ca_cert=certificates / "ca.pem")) as client:
            assert client.get_model().model_name == "tiny"
        with RecommenderClient(f"127.0.0.1:{server.port}", timeout_s=2) as plaintext:
            with pytest.raises(RecommenderError) as refused:
                plaintext.get_model()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(tiny_repository: Path, certificates: Path):
    config = make_config(
        tiny_repository, model_name="tiny",
        tls_cert=certificates / "server.pem", tls_key=certificates / "server.key", tls_client_ca=certificates / "ca.pem",
    )
    with ServerThread(config) as server:
        target = f"127.0.0.1:{server.port}"
        with_cert = TlsOptions(certificates / "ca.pem", certificates / "client.pem", certificates / "client.key")
        with RecommenderClient(target, tls=with_cert) as client:
            assert client.health() == "SERVING"
        with RecommenderClient(target, tls=TlsOptions(ca_cert=certificates / "ca.pem"), timeout_s=2) as anonymous:
            with pytest.raises(RecommenderError) as refused:
                anonymous.health()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
