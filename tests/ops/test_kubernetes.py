"""The Kubernetes manifests parse, probe the gRPC health service, and agree with the service."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from service.config import ServiceConfig, unknown_environment
from service.server import HEALTH_SERVICES
from tests.ops.conftest import OPS
from tests.ops.test_dockerfile import stages

KUBERNETES = OPS / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
DEFAULTS = {f.name: f.default for f in fields(ServiceConfig)}
TRAINING_JOB = TRAINING_SERVICE = "warmstart-train"


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


def server_services() -> list[dict]:
    return [s for s in of_kind("Service") if s["metadata"]["name"] != TRAINING_SERVICE]


def test_services_select_the_deployments_pods_and_name_their_ports():
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in deployments()]
    for service in server_services():
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


# --- the distributed training job --------------------------------------------------------------


def training_job() -> dict:
    (job,) = [d for d in of_kind("Job") if d["metadata"]["name"] == TRAINING_JOB]
    return job


def training_container() -> dict:
    (only,) = training_job()["spec"]["template"]["spec"]["containers"]
    return only


def torchrun_and_train_arguments():
    """(torchrun's parsed flags, training.cli's parsed flags) of the job's command line,
    parsed by torchrun's and warmstart-train's own parsers, so a misspelt flag fails here."""
    from torch.distributed.run import get_args_parser

    from training.cli import build_parser

    c = training_container()
    assert c["command"] == ["torchrun"]
    # The kubelet expands $(VAR) from the container's env; the node rank is the pod's index.
    defined = {e["name"] for e in c["env"]}
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
    assert referenced <= defined, f"args use undefined variables {referenced - defined}"
    args = [a.replace("$(NODE_RANK)", "1") for a in c["args"]]
    torchrun = get_args_parser().parse_args(args)
    assert torchrun.module and torchrun.training_script == "training.cli"
    return torchrun, build_parser().parse_args(torchrun.training_script_args)


def test_training_job_runs_torchrun_on_every_indexed_pod():
    spec = training_job()["spec"]
    torchrun, train = torchrun_and_train_arguments()
    assert train.command == "train"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(torchrun.nnodes)
    # The node rank is the pod's completion index, through the downward API.
    env = {e["name"]: e for e in training_container()["env"]}
    assert "--node-rank=$(NODE_RANK)" in training_container()["args"] and torchrun.node_rank == 1
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # One torch thread per process: the CPU request is the processes per pod.
    assert int(training_container()["resources"]["requests"]["cpu"]) == int(torchrun.nproc_per_node)


def test_training_job_finds_rank_0_through_its_headless_service():
    torchrun, _ = torchrun_and_train_arguments()
    pod = training_job()["spec"]["template"]
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == TRAINING_SERVICE]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == TRAINING_SERVICE
    assert torchrun.master_addr == f"{TRAINING_JOB}-0.{TRAINING_SERVICE}"  # the pod of completion index 0
    (port,) = service["spec"]["ports"]
    assert port["port"] == int(torchrun.master_port)
    container_ports = {p["name"]: p["containerPort"] for p in training_container()["ports"]}
    assert container_ports[port["targetPort"]] == int(torchrun.master_port)
    assert pod["metadata"]["labels"].items() >= service["spec"]["selector"].items()


def test_training_job_writes_into_the_repository_the_deployments_serve():
    _, train = torchrun_and_train_arguments()
    c = training_container()
    pod = training_job()["spec"]["template"]["spec"]
    server = next(d for d in deployments() if d["metadata"]["name"] == "warmstart")
    server_env = environment(server)
    # The server's image with training's dependencies: the Dockerfile's train variant.
    name, _, tag = c["image"].partition(":")
    assert name == container(server)["image"].partition(":")[0] and tag == "train"
    assert "build-train" in stages() and "${VARIANT}" in stages()["build"].base
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    repository = mounts[str(train.repository)]
    assert not repository.get("readOnly", False)
    volumes = {v["name"]: v for v in pod["volumes"]}
    server_volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    server_mount = next(m for m in container(server)["volumeMounts"] if m["mountPath"] == server_env["WARMSTART_MODEL_REPOSITORY"])
    claim = volumes[repository["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == server_volumes[server_mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert train.name == server_env["WARMSTART_MODEL_NAME"]
    # Several pods write one repository: the claim must be mountable by all of them.
    (pvc,) = [p for p in of_kind("PersistentVolumeClaim") if p["metadata"]["name"] == claim]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False


def test_server_and_training_pods_are_not_each_others_endpoints():
    job_pods = training_job()["spec"]["template"]["metadata"]["labels"]
    for service in server_services():
        assert not job_pods.items() >= service["spec"]["selector"].items(), service["metadata"]["name"]
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == TRAINING_SERVICE]
    for d in deployments():
        assert not d["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()


def test_applying_the_kustomization_does_not_start_a_training_run():
    (kustomization,) = of_kind("Kustomization")
    assert "training-job.yaml" not in kustomization["resources"]
