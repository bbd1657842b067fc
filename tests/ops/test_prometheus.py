"""promtool validates the alert rules (syntax and unit tests) and the live /metrics output."""

from __future__ import annotations

import subprocess

from tests.ops.conftest import OPS


def run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check(promtool):
    result = run([promtool, "check", "rules", str(OPS / "prometheus" / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_unit_tests_pass(promtool):
    # Each alert fires on the series the service exports, with the labels and text expected.
    result = run([promtool, "test", "rules", str(OPS / "prometheus" / "alerts.test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_live_metrics_pass_promtool_check(promtool, metrics_text):
    # The requests made by the fixture give the histograms samples, the counters children.
    assert "warmstart_request_duration_seconds_bucket{" in metrics_text
    assert "warmstart_support_loss_after_count" in metrics_text
    result = run([promtool, "check", "metrics"], stdin=metrics_text)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        "promtool check metrics found problems:\n" + result.stdout + result.stderr
    )
