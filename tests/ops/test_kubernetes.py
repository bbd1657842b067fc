"""The Kubernetes manifests parse, probe the gRPC health service, and agree with the service."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from service.config import ServiceConfig, unknown_environment
from service.server import HEALTH_SERVICES
from tests.ops.conftest import OPS

KUBERNETES = OPS / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
DEFAULTS = {f.name: f.default for f in fields(ServiceConfig)}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents() -> list[dict]:
    return [d for path in MANIFESTS for d in documents(path)]


def of_kind(kind: str) -> list[dict]:
    return [d for d in all_documents() if d.get("kind") == kind]


def deployments() -> list[dict]:
    return of_kind("Deployment")


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def environment(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", [])}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_into_kubernetes_objects(path):
    docs = documents(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document without apiVersion/kind"


def test_there_is_a_cpu_and_a_gpu_deployment_a_service_and_a_volume():
    names = {d["metadata"]["name"]: d for d in deployments()}
    assert {"warmstart", "warmstart-gpu"} <= set(names)
    assert of_kind("Service") and of_kind("PersistentVolumeClaim")
    gpu = container(names["warmstart-gpu"])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(names["warmstart"])["resources"].get("limits", {})
    assert environment(names["warmstart-gpu"])["WARMSTART_DEVICE"] == "cuda"


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_probes_use_the_grpc_health_service(deployment):
    c = container(deployment)
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c[probe]
        assert set(spec) - {"periodSeconds", "failureThreshold", "timeoutSeconds", "initialDelaySeconds", "successThreshold"} == {"grpc"}, (
            f"{probe} must be a native gRPC probe"
        )
        assert spec["grpc"]["port"] == grpc_port
        # The server sets these health services (SERVING once a model is warmed up).
        assert spec["grpc"].get("service", "") in HEALTH_SERVICES, f"{probe} asks about a service the server does not report"


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_deployment_matches_the_service_configuration(deployment):
    c = container(deployment)
    env = environment(deployment)
    assert not unknown_environment(env), f"variables the server does not know: {unknown_environment(env)}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": int(env.get("WARMSTART_PORT", DEFAULTS["port"])),
        "metrics": int(env.get("WARMSTART_METRICS_PORT", DEFAULTS["metrics_port"])),
    }
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    # The pod gets longer than the server's own drain before it is killed.
    grace = float(env.get("WARMSTART_GRACE_PERIOD_S", DEFAULTS["grace_period_s"]))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_deployment_mounts_the_model_repository_read_only_as_non_root(deployment):
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    env = environment(deployment)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    repository = next(m for m in mounts.values() if m["mountPath"] == env["WARMSTART_MODEL_REPOSITORY"])
    assert repository["readOnly"] is True
    claim = volumes[repository["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in {p["metadata"]["name"] for p in of_kind("PersistentVolumeClaim")}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_services_select_the_deployments_pods_and_name_their_ports():
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in deployments()]
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        assert all(labels.items() >= selector.items() for labels in pods), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {"grpc", "metrics"}


def test_deployment_selectors_do_not_overlap():
    # Two Deployments whose selectors match each other's pods fight over them.
    all_deployments = deployments()
    for i, a in enumerate(all_deployments):
        for j, b in enumerate(all_deployments):
            if i != j:
                selector = a["spec"]["selector"]["matchLabels"]
                labels = b["spec"]["template"]["metadata"]["labels"]
                assert not labels.items() >= selector.items(), (a["metadata"]["name"], b["metadata"]["name"])


def test_kustomization_lists_existing_files():
    (kustomization,) = of_kind("Kustomization")
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource
