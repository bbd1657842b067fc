"""Configuration: flags beat WARMSTART_* variables beat defaults; bad values fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ConfigError, ServiceConfig, parse_config, unknown_environment

ROOT = Path(__file__).resolve().parents[2]


def test_defaults(tmp_path: Path):
    config = parse_config(["--model-repository", str(tmp_path)], {})
    assert config.port == 50051 and config.metrics_port == 9464 and config.engine == "onnxruntime"
    assert config.max_batch_size == 32 and config.queue_size == 256 and not config.allow_unknown_values
    assert config.address == "[::]:50051" and not config.tls


def test_environment_and_flags(tmp_path: Path):
    env = {
        "WARMSTART_MODEL_REPOSITORY": str(tmp_path),
        "WARMSTART_PORT": "6000",
        "WARMSTART_MAX_WAIT_S": "0.004",
        "WARMSTART_ALLOW_UNKNOWN_VALUES": "yes",
    }
    config = parse_config(["--port", "7000"], env)
    assert config.port == 7000  # the flag wins
    assert config.max_wait_s == 0.004 and config.allow_unknown_values
    assert config.model_repository == tmp_path


def test_unknown_variables_are_reported(tmp_path: Path):
    assert unknown_environment({"WARMSTART_PROT": "1", "WARMSTART_PORT": "2", "HOME": "/"}) == ["WARMSTART_PROT"]


@pytest.mark.parametrize(
    "flags, env, message",
    [
        ([], {}, "--model-repository / WARMSTART_MODEL_REPOSITORY: required"),
        (["--port", "70000"], {}, "--port / WARMSTART_PORT: must be in 0..65535"),
        (["--port", "abc"], {}, "--port: cannot read 'abc'"),
        ([], {"WARMSTART_QUEUE_SIZE": "many"}, "WARMSTART_QUEUE_SIZE: cannot read 'many'"),
        (["--engine", "tensorflow"], {}, "--engine / WARMSTART_ENGINE: must be one of onnxruntime, torch"),
        (["--max-batch-size", "0"], {}, "--max-batch-size / WARMSTART_MAX_BATCH_SIZE: must be >= 1"),
        (["--max-wait-s", "-1"], {}, "--max-wait-s / WARMSTART_MAX_WAIT_S: must be a finite number >= 0"),
        (["--max-wait-s", "5"], {}, "use <= 1"),
        (["--allow-unknown-values", "maybe"], {}, "not a boolean"),
        (["--tls-cert", "cert.pem"], {}, "--tls-key / WARMSTART_TLS_KEY: --tls-cert and --tls-key go together"),
        (["--port", "9000", "--metrics-port", "9000"], {}, "must differ from --port"),
        (["--model-name", "../etc"], {}, "--model-name / WARMSTART_MODEL_NAME"),
        (["--log-level", "LOUD"], {}, "--log-level"),
        (["--max-message-bytes", "10"], {}, "--max-message-bytes"),
    ],
)
def test_bad_settings_name_their_flag_and_variable(tmp_path: Path, flags, env, message):
    base = [] if "WARMSTART_MODEL_REPOSITORY" in message else ["--model-repository", str(tmp_path)]
    with pytest.raises(ConfigError) as refused:
        parse_config(base + flags, env)
    assert message in str(refused.value)


def test_repository_must_exist(tmp_path: Path):
    with pytest.raises(ConfigError, match="is not a directory"):
        ServiceConfig(model_repository=tmp_path / "missing")


def test_tls_files_must_exist(tmp_path: Path):
    with pytest.raises(ConfigError, match="--tls-cert / WARMSTART_TLS_CERT: .* is not a readable file"):
        ServiceConfig(model_repository=tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    with pytest.raises(ConfigError, match="mTLS needs"):
        ServiceConfig(model_repository=tmp_path, tls_client_ca=tmp_path / "ca.pem")


def test_help_explains_itself():
    result = subprocess.run([sys.executable, "-m", "service.server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--model-repository" in result.stdout and "WARMSTART_MAX_BATCH_SIZE" in result.stdout
    assert "SIGTERM" in result.stdout and "SIGHUP" in result.stdout


def test_bad_configuration_exits_with_a_message(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "service.server", "--model-repository", str(tmp_path / "nope")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "is not a directory" in result.stderr


def test_ambiguous_repository_needs_a_model_name(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "service.server", "--model-repository", str(tmp_path), "--port", "0", "--metrics-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "--model-name is needed" in result.stderr
