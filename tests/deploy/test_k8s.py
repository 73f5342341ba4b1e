"""The Kubernetes manifests (ops/k8s): the production overlay renders with kustomize, every
document is valid for a recent Kubernetes (strictly: no unknown fields), and each process
of the local stack runs there the way the platform expects of it."""

from __future__ import annotations

import copy
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from auth.config import AuthSettings
from billing_grpc.config import BillingConfig
from notifications.config import NotifierConfig
from runtime.settings import Settings
from tests.deploy.local_stack import DEV_ONLY, ROOT, stack_services

OVERLAY = ROOT / "ops/k8s/overlays/production"
KUBERNETES = "1.37.0"
"""The Kubernetes version whose schemas the documents must satisfy."""
SECRETS = (
    "carelog-database",
    "carelog-redis",
    "carelog-kafka",
    "carelog-auth-keys",
    "carelog-smtp",
    "carelog-claims",
    "carelog-master-key",
)
"""The Secrets created beside the manifests (docs/deploy.md), never committed."""

Doc = dict[str, Any]


def kustomize() -> list[str]:
    """The command that builds an overlay: ops/local/install.sh's kustomize, else one on PATH."""
    local = ROOT / ".stack/bin/kustomize"
    if local.is_file():
        return [str(local), "build"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    pytest.fail("no kustomize to render ops/k8s with: run ops/local/install.sh")


@pytest.fixture(scope="module")
def documents() -> list[Doc]:
    built = subprocess.run(
        [*kustomize(), str(OVERLAY)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert docs, "the overlay rendered nothing"
    return docs


def of_kind(documents: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector of matchLabels (the only form the manifests use) against labels."""
    assert set(selector) <= {"matchLabels"}, f"unexpected selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_every_document_is_valid_for_kubernetes(documents: list[Doc]) -> None:
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validation_refuses_what_kubernetes_would(documents: list[Doc]) -> None:
    deployment = copy.deepcopy(next(iter(of_kind(documents, "Deployment").values())))
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_every_process_of_the_local_stack_runs_with_its_command(documents: list[Doc]) -> None:
    deployments = of_kind(documents, "Deployment")
    for name, command in stack_services().items():
        if name in DEV_ONLY:
            continue
        assert name in deployments, f"{name} runs in the local stack but has no Deployment"
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == command, name
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert "carelog gateway-config" in " ".join(gateway["command"])
    assert "exec haproxy" in " ".join(gateway["command"])
    job = of_kind(documents, "Job")["migrate"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "carelog",
        "db",
        "migrate",
    ]


def test_every_deployment_has_probes_resources_and_a_locked_down_pod(
    documents: list[Doc],
) -> None:
    for name, deployment in of_kind(documents, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        main = pod["containers"][0]
        assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready", name
        assert main["livenessProbe"]["httpGet"]["path"] == "/health/live", name
        for container in containers(pod):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)
            security = container["securityContext"]
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
    job = of_kind(documents, "Job")["migrate"]["spec"]["template"]["spec"]
    assert job["automountServiceAccountToken"] is False
    assert {"requests", "limits"} <= set(job["containers"][0]["resources"])


def test_every_pod_runs_as_its_own_service_account(documents: list[Doc]) -> None:
    accounts = of_kind(documents, "ServiceAccount")
    pods = {
        name: d["spec"]["template"]["spec"] for name, d in of_kind(documents, "Deployment").items()
    }
    pods["migrate"] = of_kind(documents, "Job")["migrate"]["spec"]["template"]["spec"]
    used = [pod["serviceAccountName"] for pod in pods.values()]
    assert len(used) == len(set(used)), "two processes share a service account"
    for name, pod in pods.items():
        account = accounts[pod["serviceAccountName"]]
        assert account["automountServiceAccountToken"] is False, name


def test_every_deployment_has_a_disruption_budget_and_an_autoscaler(
    documents: list[Doc],
) -> None:
    budgets = of_kind(documents, "PodDisruptionBudget").values()
    scalers = {
        d["spec"]["scaleTargetRef"]["name"]: d
        for d in of_kind(documents, "HorizontalPodAutoscaler").values()
        if d["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    }
    for name, deployment in of_kind(documents, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if matches(b["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} disruption budgets"
        if deployment["metadata"].get("annotations", {}).get("carelog.io/singleton") == "true":
            # One copy at a time (the relay): no autoscaler, and never two during a rollout.
            assert name not in scalers, name
            assert deployment["spec"]["replicas"] == 1, name
            assert deployment["spec"]["strategy"]["type"] == "Recreate", name
            assert covering[0]["spec"] == {
                "maxUnavailable": 1,
                "selector": covering[0]["spec"]["selector"],
            }, name
            continue
        assert name in scalers, f"{name} has no HorizontalPodAutoscaler"
        spec = scalers[name]["spec"]
        assert 2 <= spec["minReplicas"] <= spec["maxReplicas"], name
        assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"], name


def test_the_relay_is_the_only_singleton(documents: list[Doc]) -> None:
    singletons = {
        name
        for name, d in of_kind(documents, "Deployment").items()
        if d["metadata"].get("annotations", {}).get("carelog.io/singleton") == "true"
    }
    assert singletons == {"relay"}


def test_network_policies_deny_by_default(documents: list[Doc]) -> None:
    policies = of_kind(documents, "NetworkPolicy").values()
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny NetworkPolicy"


def allowed(
    documents: list[Doc], direction: str, pod: dict[str, str], peer: dict[str, str], port: int
) -> bool:
    """Whether some policy selecting `pod` lets it talk (`ingress` from or `egress` to) to a
    pod labelled `peer` of the same namespace on `port`."""
    key = "from" if direction == "ingress" else "to"
    for policy in of_kind(documents, "NetworkPolicy").values():
        if not matches(policy["spec"]["podSelector"], pod):
            continue
        for rule in policy["spec"].get(direction, []):
            peers = rule.get(key)
            peer_ok = peers is None or any(
                "podSelector" in p
                and "namespaceSelector" not in p
                and matches(p["podSelector"], peer)
                for p in peers
            )
            ports = rule.get("ports")
            port_ok = ports is None or any(
                p["port"] <= port <= p.get("endPort", p["port"]) for p in ports
            )
            if peer_ok and port_ok:
                return True
    return False


def test_the_gateway_reaches_its_upstreams_and_nothing_else_does(documents: list[Doc]) -> None:
    deployments = of_kind(documents, "Deployment")

    def labels(name: str) -> dict[str, str]:
        return dict(deployments[name]["spec"]["template"]["metadata"]["labels"])

    for upstream, port in (("commands", 4000), ("read-api", 4003), ("auth", 4005)):
        assert allowed(documents, "egress", labels("gateway"), labels(upstream), port), upstream
        assert allowed(documents, "ingress", labels(upstream), labels("gateway"), port), upstream
        assert not allowed(documents, "ingress", labels(upstream), labels("relay"), port + 1)
    for writer in ("commands", "read-api"):
        assert not allowed(documents, "ingress", labels(writer), labels("notifier"), 4000)
        assert not allowed(documents, "ingress", labels(writer), labels("notifier"), 4003)
    client = {"carelog.io/billing-client": "true"}
    billing = labels("billing")
    policies = [p for p in of_kind(documents, "NetworkPolicy").values()]
    grpc_from = [
        peer
        for p in policies
        if matches(p["spec"]["podSelector"], billing)
        for rule in p["spec"].get("ingress", [])
        if any(q["port"] == 9001 for q in rule.get("ports", []))
        for peer in rule.get("from", [])
    ]
    assert grpc_from, "nothing may call billing's gRPC port"
    assert all(matches(peer["podSelector"], client) for peer in grpc_from)


def test_every_process_may_reach_postgresql_kafka_redis_and_dns(documents: list[Doc]) -> None:
    deployments = of_kind(documents, "Deployment")
    nowhere = {"example": "outside"}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for port in (5432, 6379, 9092, 53):
            reachable = allowed(documents, "egress", labels, nowhere, port) or any(
                p["spec"]["podSelector"] == {}
                and any(
                    any(q["port"] == port for q in rule.get("ports", []))
                    for rule in p["spec"].get("egress", [])
                )
                for p in of_kind(documents, "NetworkPolicy").values()
            )
            assert reachable, f"{name} cannot reach port {port}"


def test_no_secret_value_is_committed(documents: list[Doc]) -> None:
    assert not of_kind(documents, "Secret"), "Secrets are created beside the manifests"
    referenced = set()
    for doc in documents:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in containers(pod):
            for env in container.get("env", []):
                assert "value" not in env or not env["name"].endswith(("_URL", "PASSWORD")), env
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    referenced.add(ref["name"])
        referenced |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    assert referenced == set(SECRETS)
    docs = (ROOT / "docs/deploy.md").read_text()
    for name in SECRETS:
        assert f"create secret generic {name} " in docs, name


def test_the_settings_load_in_production_from_the_config_map(documents: list[Doc]) -> None:
    (config,) = of_kind(documents, "ConfigMap").values()
    environ = {
        **config["data"],
        "CARELOG_DATABASE_URL": "postgresql://carelog:placeholder@postgres:5432/carelog",
        "CARELOG_REDIS_URL": "rediss://:placeholder@redis:6380/0",
        "CARELOG_KAFKA_USERNAME": "carelog",
        "CARELOG_KAFKA_PASSWORD": "placeholder",
    }
    settings = Settings.from_env(environ, stack_secrets=None)
    assert not settings.development
    services = of_kind(documents, "Service")
    for upstream in ("commands", "read-api", "auth"):
        assert settings.upstream(upstream) in services, upstream
    assert settings.jwks_url.startswith("http://auth:4005/")
    auth = AuthSettings.from_env(environ)
    assert auth.keys_directory == "/var/run/carelog/keys"
    NotifierConfig.from_env(environ)
    BillingConfig.from_env(environ)
    gateway = of_kind(documents, "Deployment")["gateway"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in gateway["containers"][0]["volumeMounts"]}
    assert settings.gateway_dir in mounts, "the gateway's directory must be writable"
