"""The dashboard and the alert rules use only metrics the service exports, and use them all.

Names are taken from the PromQL expressions (dashboard targets, annotations and template
queries; rule `expr`s) and checked against the families a live server's /metrics declares
(`# TYPE` lines), allowing the sample suffixes of histograms and counters.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from service.metrics import METRIC_NAMES
from tests.ops.conftest import OPS

DASHBOARD = OPS / "grafana" / "warmstart-dashboard.json"
RULES = OPS / "prometheus" / "alerts.yml"
NAME = re.compile(r"\bwarmstart_[a-zA-Z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total", "_info")
# Exported metrics the dashboard deliberately shows no panel for, with the reason.
NOT_ON_DASHBOARD: dict[str, str] = {}


def exported_families(metrics_text: str) -> dict[str, str]:
    """name -> type, from the `# TYPE` lines (counters are declared without `_total`)."""
    families = {}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[name] = kind
    return families


def exported_names(metrics_text: str) -> set[str]:
    """Every name a PromQL expression may use: families, their samples and suffixes."""
    names = set()
    for name, kind in exported_families(metrics_text).items():
        names.add(name)
        if kind == "counter":
            names |= {name + "_total", name + "_created"}
        elif kind == "histogram":
            names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def family_of(name: str, families: set[str]) -> str:
    """The exported family a sample name belongs to (warmstart_x_bucket -> warmstart_x)."""
    if name in families:
        return name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            return name[: -len(suffix)]
    return name


def dashboard_expressions() -> list[str]:
    """Every PromQL string in the dashboard: panel targets, annotations, template queries."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                elif key == "query" and isinstance(value, str) and "warmstart_" in value:
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def names_in(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in NAME.findall(expr)}


def test_metric_name_list_matches_what_is_exported(metrics_text):
    # service/metrics.py METRIC_NAMES is the documented list (README's table comes from it).
    exported = exported_names(metrics_text)
    missing = [name for name in METRIC_NAMES if name not in exported]
    assert not missing, f"METRIC_NAMES lists names /metrics does not declare: {missing}"


def test_dashboard_uses_only_exported_metrics(metrics_text):
    exported = exported_names(metrics_text)
    used = names_in(dashboard_expressions())
    assert used, "no warmstart_* metric found in the dashboard's expressions"
    unknown = sorted(used - exported)
    assert not unknown, f"the dashboard queries metrics the service does not export: {unknown}"


def test_alert_rules_use_only_exported_metrics(metrics_text):
    exported = exported_names(metrics_text)
    used = names_in(rule_expressions())
    assert used, "no warmstart_* metric found in the alert rules"
    unknown = sorted(used - exported)
    assert not unknown, f"the alert rules query metrics the service does not export: {unknown}"


def test_every_exported_metric_has_a_panel(metrics_text):
    # The reverse direction: a metric nobody looks at is either missing from the dashboard
    # or should not exist. Exceptions go into NOT_ON_DASHBOARD with their reason.
    # prometheus_client declares each counter's and histogram's creation time as a gauge
    # family of its own (`<name>_created`): a timestamp, not something to chart.
    families = {n for n in exported_families(metrics_text) if n.startswith("warmstart_") and not n.endswith("_created")}
    shown = {family_of(n, families) for n in names_in(dashboard_expressions())}
    unused = sorted(families - shown - set(NOT_ON_DASHBOARD))
    assert not unused, f"exported metrics no dashboard panel uses (add a panel or list them in NOT_ON_DASHBOARD): {unused}"


def test_alerts_cover_the_failure_modes():
    alerts = {rule["alert"]: rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    covers = {
        "service down": any(expr.strip().startswith("up{") for expr in alerts.values()),
        "not ready": any("warmstart_ready" in expr for expr in alerts.values()),
        "no model loaded": any("warmstart_model_info" in expr for expr in alerts.values()),
        "reload failures": any('outcome="failure"' in expr for expr in alerts.values()),
        "error rate": any("warmstart_requests_total" in expr and "code" in expr for expr in alerts.values()),
        "p99 latency": any("histogram_quantile(0.99" in expr for expr in alerts.values()),
        "queue saturation": any("warmstart_queue_depth" in expr or "queue_full" in expr for expr in alerts.values()),
    }
    assert all(covers.values()), f"alert rules miss: {[k for k, v in covers.items() if not v]}"


def test_dashboard_expressions_are_valid_promql(promtool, tmp_path: Path):
    # promtool has no expression checker, but it parses recording rules: wrap each panel
    # query in one, with Grafana's variables replaced by what Grafana would send.
    grafana_variables = {"$__rate_interval": "1m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_expressions()):
        for variable, value in grafana_variables.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):  # Grafana's template function, not PromQL
            expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr)
        assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:expression_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: not filtered by $instance"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("rate", "errors", "latency", "queue", "batch", "engine", "support loss", "model", "reload", "gpu"):
        assert topic in titles, f"no panel about {topic}"

