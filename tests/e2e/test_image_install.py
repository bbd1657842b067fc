"""The CPU image's build stage, run here without Docker: its COPY, ENV and RUN instructions
(read from the Dockerfile, not copied into this test) build a virtual environment that
serves the tiny artifact with no training dependency, and the image's health probe agrees.

No Docker engine is needed (CI has none); the package index is, as for `make install`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.live_server import ROOT, clean_environment, start_server
from tests.ops.test_dockerfile import Stage, stages

pytestmark = pytest.mark.slow


def stage_environment(*chain: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain:
        for arguments in stage.all("ENV"):
            for pair in arguments.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def build_cpu_stage(workdir: Path) -> Path:
    """Runs build-cpu's instructions with /opt/venv -> workdir/venv; returns the venv."""
    all_stages = stages()
    build = all_stages["build-cpu"]
    (workdir_instruction,) = build.all("WORKDIR")
    context = workdir / "src"
    context.mkdir()
    for copy in build.all("COPY"):
        *sources, destination = copy.split()
        target = context / destination.replace(workdir_instruction, "").lstrip("/")
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target if destination.endswith("/") and len(sources) == 1 else target / path.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
    venv = workdir / "venv"
    env = clean_environment(**stage_environment(all_stages["base-cpu"], build))
    # The base image's python3.11 is the one that made this test's own environment.
    python = shutil.which(env["PYTHON"]) or getattr(sys, "_base_executable", sys.executable)
    env["PYTHON"] = python
    for run in build.all("RUN"):
        command = run.replace("/opt/venv", str(venv))
        result = subprocess.run(["bash", "-c", command], cwd=context, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"RUN {run}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return venv


def test_the_cpu_image_install_serves_without_training_dependencies(tiny_repository: Path, tmp_path: Path):
    venv = build_cpu_stage(tmp_path)
    python = venv / "bin" / "python"
    outside = tmp_path / "elsewhere"  # not the source tree: everything comes from the venv
    outside.mkdir()
    for module in ("torch", "training.pipeline"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], cwd=outside, capture_output=True, text=True, env=clean_environment())
        assert probe.returncode != 0, f"the image's environment can import {module}: it must hold the service's runtime only"
    server = start_server(tiny_repository, python=str(python), cwd=outside)
    try:
        # The image's HEALTHCHECK: scripts/healthcheck.py on $WARMSTART_PORT.
        probe = subprocess.run(
            [str(python), str(ROOT / "scripts" / "healthcheck.py")],
            cwd=outside, capture_output=True, text=True, timeout=30,
            env=clean_environment(WARMSTART_PORT=str(server.port)),
        )
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stdout + probe.stderr
    finally:
        assert server.stop() == 0
    # Once the server is gone, the probe reports it unhealthy.
    probe = subprocess.run(
        [str(python), str(ROOT / "scripts" / "healthcheck.py"), "--target", server.target, "--timeout-s", "1"],
        capture_output=True, text=True, timeout=30, env=clean_environment(),
    )
    assert probe.returncode == 2, probe.stdout


def test_healthcheck_reports_not_serving_before_a_model_loads(tmp_path: Path):
    from tests.e2e.live_server import LISTENING

    (tmp_path / "empty").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.server", "--model-repository", str(tmp_path), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--poll-interval-s", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_environment(),
    )
    try:
        assert process.stdout is not None
        match = LISTENING.search(process.stdout.readline())
        assert match, "the server did not start"
        probe = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "healthcheck.py"), "--target", f"127.0.0.1:{match['port']}"],
            capture_output=True, text=True, timeout=30, env=clean_environment(),
        )
        assert probe.returncode == 1 and "NOT_SERVING" in probe.stdout, probe.stdout + probe.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
