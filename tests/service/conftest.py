"""Fixtures of the service tests: one shared server over the session's tiny artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.harness import ServerThread, catalog_ids, make_config


@pytest.fixture(scope="session")
def shared_server(tiny_repository: Path):
    """A server over the tiny artifact, shared by tests that do not change it. It admits
    every call the concurrency tests have in flight at once (300): admission itself is
    tested in test_overload.py with its own limits."""
    with ServerThread(make_config(tiny_repository, model_name="tiny", max_in_flight=512, max_pending_rpcs=1024)) as server:
        yield server


@pytest.fixture(scope="session")
def item_ids(tiny_artifact: Path) -> list[str]:
    return catalog_ids(tiny_artifact)
