"""The main job (`make run` -> scripts/main.py): train when there is no model, then serve,
print working examples, and stop cleanly."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.live_server import ROOT, clean_environment

MAIN = ROOT / "scripts" / "main.py"
BANNER_END = "Ctrl-C stops it"
# The tiny fixture's training, through the CLI (a few tens of seconds on two cores).
TINY_TRAINING = (
    "--synthetic-users 240 --synthetic-items 150 --meta-steps 30 --eval-every 10 "
    "--meta-batch-size 16 --factors 8 --inner-steps 1 --no-progress"
)  # one unrolled inner step: the job's plumbing is under test, and the export is quicker
SERVER_ARGS = ["--", "--port", "0", "--metrics-port", "0", "--poll-interval-s", "0"]


def start_main(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(MAIN), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_environment(),
    )


def read_banner(job: subprocess.Popen) -> list[str]:
    """The job's output up to the end of its banner (fails if the job exits first)."""
    assert job.stdout is not None
    lines = []
    for line in job.stdout:
        lines.append(line.rstrip("\n"))
        if BANNER_END in line:
            return lines
    job.wait()
    pytest.fail(f"the main job exited ({job.returncode}) without printing its banner:\n" + "\n".join(lines))


def stop(job: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Sends the signal to the job alone (it forwards it to the server) and waits."""
    job.send_signal(signum)
    try:
        rest, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return job.returncode, rest


def run_banner_examples(lines: list[str]) -> list[str]:
    """Runs every command the banner tells the user to paste; returns their outputs."""
    commands = [line.strip() for line in lines if line.strip().startswith((".venv/", "/")) and ("grpcurl" in line or "python" in line)]
    assert len(commands) == 5, lines  # list, Recommend, Score, the client CLI, the Python one-liner
    outputs = []
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60, env=clean_environment())
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)
    return outputs


def test_second_run_reuses_the_model_and_its_examples_work(tiny_repository: Path):
    started = time.monotonic()
    job = start_main("--repository", str(tiny_repository), "--model-name", "tiny", *SERVER_ARGS)
    try:
        lines = read_banner(job)
        elapsed = time.monotonic() - started
        text = "\n".join(lines)
        assert "[main] reusing" in text and "training one" not in text
        assert "warmstart is ready: model tiny version 1" in text
        assert "/metrics" in text
        outputs = run_banner_examples(lines)
        assert "warmstart.v1.Recommender" in outputs[0]
        assert '"items"' in outputs[1] and '"adapted": true' in outputs[1]
        # Serving an existing artifact takes seconds (a generous bound: CI shares its cores).
        assert elapsed < 60, f"the second run took {elapsed:.1f} s to be ready"
    finally:
        code, rest = stop(job, signal.SIGINT)
    assert code == 0, rest
    assert "stopped" in rest


def test_first_run_trains_exports_and_serves(tmp_path: Path):
    repository = tmp_path / "models"
    job = start_main("--repository", str(repository), "--train-args", TINY_TRAINING, *SERVER_ARGS)
    try:
        lines = read_banner(job)
        text = "\n".join(lines)
        assert "no model in" in text and "training.cli train --dataset synthetic" in text
        assert "warmstart is ready: model warmstart version 1 (trained on synthetic)" in text
        assert (repository / "warmstart" / "1" / "manifest.json").is_file()
        assert (repository / ".work" / "warmstart" / "job_summary.json").is_file()
        outputs = run_banner_examples(lines)
        assert '"model_version": "1"' in outputs[1]
    finally:
        code, rest = stop(job, signal.SIGTERM)
    assert code == 0, rest


def test_failed_training_stops_the_job_with_the_reason(tmp_path: Path):
    job = start_main("--repository", str(tmp_path / "models"), "--dataset", "generic", "--data-path", str(tmp_path / "missing.csv"))
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 1, output
    assert "training failed (exit code 2)" in output and "missing.csv" in output
    assert not (tmp_path / "models" / "warmstart").exists()


def test_a_dataset_other_than_synthetic_needs_a_path(tmp_path: Path):
    job = start_main("--repository", str(tmp_path), "--dataset", "ml-100k")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 1 and "needs --data-path" in output


def test_make_run_passes_its_variables_to_the_job():
    result = subprocess.run(
        ["make", "-n", "run", "DATASET=ml-100k", "DATA_PATH=../data/ml 100k", "RETRAIN=1",
         "REPOSITORY=/srv/models", "MODEL_NAME=films", "TRAIN_ARGS=--meta-steps 5", "SERVE_ARGS=--port 50099"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [l for l in result.stdout.splitlines() if "scripts/main.py" in l]
    words = shlex.split(line)
    assert words[words.index("--dataset") + 1] == "ml-100k"
    assert words[words.index("--data-path") + 1] == "../data/ml 100k"
    assert words[words.index("--repository") + 1] == "/srv/models"
    assert words[words.index("--model-name") + 1] == "films"
    assert words[words.index("--train-args") + 1] == "--meta-steps 5"
    assert "--retrain" in words
    assert words[words.index("--") + 1 :] == ["--port", "50099"]
