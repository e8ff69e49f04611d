"""deploy/k8s: schema-valid, and wired the way fanout needs (probes, drain, identity,
KEDA on the queue, Prometheus on the metrics port)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy import bicep, k8s

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
TOOLS = ROOT / ".tools"
CRD_MODELS = TOOLS / "node_modules" / "@kubernetes-models" / "prometheus-operator"
BUILTIN_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
                 "PodDisruptionBudget"}
#: The oldest AKS-supported minor we target, and the newest schemas shipped.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

Obj = dict[str, Any]


@pytest.fixture
def objects() -> list[Obj]:
    """A fresh rendering of the kustomize base."""
    return k8s.render(BASE)


def test_the_base_has_every_object_fanout_needs(objects: list[Obj]) -> None:
    """Deployment, ServiceAccount, ConfigMap, KEDA, Service, monitor and PDB are there."""
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ServiceAccount", "ConfigMap", "ScaledObject", "TriggerAuthentication",
            "Service", "ServiceMonitor", "PodDisruptionBudget", "PrometheusRule"} <= kinds


def test_the_manifests_have_no_problem(objects: list[Obj]) -> None:
    """The real manifests break none of the rules in tests/deploy/k8s.py."""
    assert k8s.problems(objects) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_validate_strictly_against_the_kubernetes_schemas(
        objects: list[Obj], version: str) -> None:
    """Every built-in object passes kubernetes-validate --strict (no unknown field)."""
    checked = set()
    for obj in objects:
        if obj["kind"] in BUILTIN_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)
            checked.add(obj["kind"])
    assert checked == BUILTIN_KINDS


def test_the_schema_check_rejects_a_misspelt_field(objects: list[Obj]) -> None:
    """A typo in the Deployment (livenesProbe) fails strict schema validation."""
    deployment = copy.deepcopy(k8s.one(objects, "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _validate_crds(objects: list[Obj]) -> list[Obj]:
    script = Path(__file__).with_name("validate_crds.mjs")
    out = subprocess.run(["node", str(script), str(TOOLS)], input=json.dumps(objects),
                         capture_output=True, text=True, timeout=60, check=True)
    results: list[Obj] = json.loads(out.stdout)
    return results


crd_models = pytest.mark.skipif(
    shutil.which("node") is None or not CRD_MODELS.exists(),
    reason="node or the CRD validators are missing: run `make tools`")


@crd_models
def test_keda_and_prometheus_objects_validate_against_their_crd_schemas(
        objects: list[Obj]) -> None:
    """ScaledObject, TriggerAuthentication, ServiceMonitor and PrometheusRule match the CRDs."""
    custom = [o for o in objects if o["kind"] not in BUILTIN_KINDS]
    results = _validate_crds(custom)
    assert [r["kind"] for r in results] == [o["kind"] for o in custom]
    assert [r for r in results if r["errors"]] == []


@crd_models
def test_the_crd_check_rejects_a_wrongly_typed_field(objects: list[Obj]) -> None:
    """A ScaledObject with a string minReplicaCount fails the CRD schema."""
    scaled = copy.deepcopy(k8s.one(objects, "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "one"
    (result,) = _validate_crds([scaled])
    assert result["errors"] and "minReplicaCount" in result["errors"][0]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_same_objects(objects: list[Obj]) -> None:
    """The real kustomize (kubectl kustomize) agrees with the test's renderer."""
    out = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True,
                         timeout=60, check=True)
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(objects, key=key)


def _deployment(objects: list[Obj]) -> Obj:
    return k8s.one(objects, "Deployment")


def _container(objects: list[Obj]) -> Obj:
    container: Obj = _deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    return container


def _config(objects: list[Obj], old: str, new: str) -> None:
    data = k8s.one(objects, "ConfigMap")["data"]
    assert old in data["fanout.toml"]
    data["fanout.toml"] = data["fanout.toml"].replace(old, new)


def _set(getter: Callable[[list[Obj]], Obj], key: str, value: Any) -> Callable[[list[Obj]], None]:
    def mutate(objects: list[Obj]) -> None:
        getter(objects)[key] = value

    return mutate


def _drop(getter: Callable[[list[Obj]], Obj], key: str) -> Callable[[list[Obj]], None]:
    def mutate(objects: list[Obj]) -> None:
        del getter(objects)[key]

    return mutate


def _pod(objects: list[Obj]) -> Obj:
    pod: Obj = _deployment(objects)["spec"]["template"]["spec"]
    return pod


#: Each breaks the manifests in place; what it returns is ignored.
BREAKAGES: dict[str, Callable[[list[Obj]], object]] = {
    "liveness on the wrong path": lambda o: _container(o)["livenessProbe"]["httpGet"].update(
        path="/metrics"),
    "readiness on the liveness path": lambda o: _container(o)["readinessProbe"]["httpGet"].update(
        path="/healthz"),
    "liveness on the wrong port": lambda o: _container(o)["livenessProbe"]["httpGet"].update(
        port=8080),
    "no liveness probe": _drop(_container, "livenessProbe"),
    "grace equal to the drain": _set(_pod, "terminationGracePeriodSeconds", 25),
    "grace below a longer drain": lambda o: _config(o, "drain_grace = 25", "drain_grace = 60"),
    "default grace (30 s) against the drain": _drop(_pod, "terminationGracePeriodSeconds"),
    "writable root filesystem": lambda o: _container(o)["securityContext"].pop(
        "readOnlyRootFilesystem"),
    "runAsNonRoot missing": lambda o: (_container(o)["securityContext"].pop("runAsNonRoot"),
                                       _pod(o)["securityContext"].pop("runAsNonRoot")),
    "privilege escalation allowed": lambda o: _container(o)["securityContext"].update(
        allowPrivilegeEscalation=True),
    "no memory limit": lambda o: _container(o)["resources"]["limits"].pop("memory"),
    "no resources": _drop(_container, "resources"),
    "metrics bound to loopback": lambda o: _config(o, 'bind = "0.0.0.0"', 'bind = "127.0.0.1"'),
    "no writable home": lambda o: _container(o)["volumeMounts"].pop(1),
    "config file not mounted": lambda o: _container(o)["env"][0].update(
        value="/etc/other/fanout.toml"),
    "invalid fanout.toml": lambda o: _config(o, "concurrency = 4", "concurrency = 0"),
    "no workload identity label": lambda o: _deployment(o)["spec"]["template"]["metadata"][
        "labels"].pop("azure.workload.identity/use"),
    "no client-id annotation": lambda o: k8s.one(o, "ServiceAccount")["metadata"].pop(
        "annotations"),
    "another service account": _set(_pod, "serviceAccountName", "default"),
    "KEDA scales another deployment": lambda o: k8s.one(o, "ScaledObject")["spec"][
        "scaleTargetRef"].update(name="other"),
    "KEDA watches another queue": lambda o: k8s.one(o, "ScaledObject")["spec"]["triggers"][0][
        "metadata"].update(queueName="other"),
    "KEDA trigger of another type": lambda o: k8s.one(o, "ScaledObject")["spec"]["triggers"][0]
    .update(type="azure-queue"),
    "KEDA auth reference dangling": lambda o: k8s.one(o, "ScaledObject")["spec"]["triggers"][0][
        "authenticationRef"].update(name="nope"),
    "KEDA auth without workload identity": lambda o: k8s.one(o, "TriggerAuthentication")[
        "spec"]["podIdentity"].update(provider="none"),
    "Service selects nothing": lambda o: k8s.one(o, "Service")["spec"]["selector"].update(
        {"app.kubernetes.io/name": "other"}),
    "ServiceMonitor on a missing port": lambda o: k8s.one(o, "ServiceMonitor")["spec"][
        "endpoints"][0].update(port="http"),
    "ServiceMonitor selects nothing": lambda o: k8s.one(o, "ServiceMonitor")["spec"]["selector"][
        "matchLabels"].update({"app.kubernetes.io/component": "web"}),
    "PDB selects nothing": lambda o: k8s.one(o, "PodDisruptionBudget")["spec"]["selector"][
        "matchLabels"].update({"app.kubernetes.io/name": "other"}),
    "replicas fight KEDA": lambda o: _deployment(o)["spec"].update(replicas=2),
    "events on the work queue": lambda o: _config(o, 'queue = "fanout-events"',
                                                   'queue = "fanout"'),
    "events enabled without a destination": lambda o: _config(
        o, 'queue = "fanout-events"', 'queue = ""'),
    "invalid [jobs]": lambda o: _config(o, 'retention = "P7D"', 'retention = "a week"'),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_breakage_is_caught(objects: list[Obj], breakage: str) -> None:
    """Manifests broken in one way have at least one problem (or fail to load)."""
    BREAKAGES[breakage](objects)
    try:
        found = k8s.problems(objects)
    except ValueError as exc:  # pydantic's ValidationError: fanout.toml itself is invalid
        found = [str(exc)]
    assert found, f"{breakage} went unnoticed"


def test_the_prometheus_rule_carries_exactly_the_alert_rules(objects: list[Obj]) -> None:
    """deploy/k8s/prometheusrule.yaml and deploy/prometheus/alerts.yaml have the same groups."""
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert k8s.one(objects, "PrometheusRule")["spec"]["groups"] == rules["groups"]


def _overlay_from_docs() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    match = re.search(r"cat > \$OVERLAY/kustomization\.yaml <<EOF\n(.*?)\nEOF\n", text, re.S)
    assert match, "docs/deploy.md lost its overlay heredoc"
    return match.group(1)


def _fanout_toml_from_docs() -> str:
    """The Bicep fanoutToml output (sample values) plus what the docs append to it."""
    runtime = {"serviceBusFqdn": "sb-fanout-abc.servicebus.windows.net",
               "batchAccountUrl": "https://bafanoutabc.westeurope.batch.azure.com",
               "cpuPool.outputs.name": "cpu",
               "blobAccountUrl": "https://stfanoutabc.blob.core.windows.net/",
               "allowedReplyTo": "[]"}
    output = bicep.fanout_toml((ROOT / "deploy" / "bicep" / "main.bicep").read_text(), runtime)
    text = (ROOT / "docs" / "deploy.md").read_text()
    match = re.search(r"cat >> \$OVERLAY/fanout\.toml <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert match, "docs/deploy.md lost the heredoc that completes fanout.toml"
    return output + match.group(1) + "\n"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_overlay_in_the_docs_fills_every_placeholder(tmp_path: Path) -> None:
    """The docs' overlay, with the Bicep outputs substituted, renders a complete setup."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    values = {"ACR": "myacr", "IMAGE_TAG": "0.1.0", "WORKER_CLIENT_ID": "1111-worker",
              "SB_NAMESPACE": "sb-fanout-abc", "BASE": os.path.relpath(BASE, overlay)}
    text = re.sub(r"\$(\w+)|\$\{(\w+)\}",
                  lambda m: values.get(m.group(1) or m.group(2), m.group(0)), _overlay_from_docs())
    assert "$" not in text, text
    (overlay / "kustomization.yaml").write_text(text)
    (overlay / "fanout.toml").write_text(_fanout_toml_from_docs())
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert "CHANGEME" not in out.stdout
    assert "00000000-0000-0000-0000-000000000000" not in out.stdout
    assert k8s.problems(rendered) == []
    assert _container(rendered)["image"] == "myacr.azurecr.io/fanout:0.1.0"
