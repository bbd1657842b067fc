"""Fixtures of the ops checks: promtool, and one live server whose /metrics have samples."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.live_server import ROOT, LiveServer, start_server

OPS = ROOT / "ops"


@pytest.fixture(scope="session")
def promtool() -> str:
    """The promtool binary. Missing promtool fails (not skips): `make test` installs it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: install Debian's prometheus package "
            "(`sudo apt-get install prometheus`; `make test` does it), then rerun",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def live_server(tiny_repository: Path):
    """A real server on the tiny artifact that has answered every kind of request once."""
    from service.client import RecommenderClient, RecommenderError

    server = start_server(tiny_repository)
    try:
        with RecommenderClient(server.target, timeout_s=10) as client:
            client.recommend(interactions=[("i0000", 5.0), ("i0001", 2.0), ("i0002", 4.0)], top_k=5)
            client.recommend(top_k=3)  # no interactions: the initialisation scores
            client.score(["i0003", "i0004"], interactions=[("i0000", 1.0)])
            client.get_model()
            with pytest.raises(RecommenderError):
                client.recommend(interactions=[("not-in-the-catalog", 5.0)])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def metrics_text(live_server: LiveServer) -> str:
    """The /metrics exposition after the requests above."""
    with urllib.request.urlopen(live_server.metrics_url, timeout=10) as response:
        return response.read().decode()
