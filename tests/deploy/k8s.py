"""Render deploy/k8s (the part of kustomize it uses) and check what fanout needs of it.

``render`` implements the two kustomize features the base uses: ``resources`` (files
of YAML documents) and ``namespace``. ``problems`` returns every broken promise of
the manifests (probes, drain, security context, workload identity, selectors, KEDA
and Prometheus-operator wiring, where completion events go) so tests can show it is
empty for the real files and non-empty for broken copies.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from worker.config import Settings

Obj = dict[str, Any]
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
#: Seconds fanout needs after its drain to close its links and exit, before SIGKILL.
CLOSE_MARGIN = 10


def render(directory: Path) -> list[Obj]:
    """The objects ``kubectl kustomize`` would emit for a base of plain resources."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "namespace", "resources"}
    assert not unsupported, f"render() does not implement {sorted(unsupported)}"
    objects: list[Obj] = []
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((directory / resource).read_text()):
            if doc:
                objects.append(doc)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    return objects


def one(objects: list[Obj], kind: str) -> Obj:
    """The single object of a kind."""
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def fanout_settings(objects: list[Obj]) -> tuple[Settings | None, list[str]]:
    """fanout's Settings from the ConfigMap the Deployment mounts, or why not."""
    deployment = _of_kind(objects, "Deployment")
    if not deployment:
        return None, ["no Deployment"]
    pod = deployment[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config_path = env.get("FANOUT_CONFIG")
    if not config_path:
        return None, ["the container does not set FANOUT_CONFIG"]
    for mount in container.get("volumeMounts", []):
        if config_path.startswith(mount["mountPath"].rstrip("/") + "/"):
            key = config_path[len(mount["mountPath"].rstrip("/")) + 1:]
            volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), None)
            if volume is None or "configMap" not in volume:
                return None, [f"{config_path} is not on a ConfigMap volume"]
            name = volume["configMap"]["name"]
            maps = [o for o in _of_kind(objects, "ConfigMap") if o["metadata"]["name"] == name]
            if not maps or key not in maps[0].get("data", {}):
                return None, [f"ConfigMap {name} has no key {key}"]
            data = tomllib.loads(maps[0]["data"][key])
            extra_env = {k[len("FANOUT_"):].lower(): v for k, v in env.items()
                         if k.startswith("FANOUT_") and "__" not in k and k != "FANOUT_CONFIG"}
            return Settings(**{**data, **extra_env}), []
    return None, [f"FANOUT_CONFIG={config_path} is not under any volume mount"]


def problems(objects: list[Obj]) -> list[str]:
    """Everything wrong with the manifests; empty when they are right."""
    found: list[str] = []
    settings, why = fanout_settings(objects)
    found += why
    if settings is None:
        return found
    deployment = one(objects, "Deployment")
    found += _pod_problems(deployment, settings)
    found += _identity_problems(objects, deployment)
    found += _service_problems(objects, deployment)
    found += _keda_problems(objects, deployment, settings)
    found += _events_problems(settings)
    namespaces = {o["metadata"].get("namespace") for o in objects
                  if o["kind"] not in CLUSTER_SCOPED}
    if len(namespaces) != 1:
        found.append(f"objects are spread over namespaces {namespaces}")
    return found


def _container_port(container: Obj, port: int | str) -> int | None:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    return None


def _probe_problems(container: Obj, settings: Settings) -> list[str]:
    found = []
    wanted = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in wanted.items():
        spec = container.get(probe)
        if spec is None:
            if probe != "startupProbe":
                found.append(f"no {probe}")
            continue
        get = spec.get("httpGet", {})
        if get.get("path") != path:
            found.append(f"{probe} probes {get.get('path')}, not {path}")
        if _container_port(container, get.get("port", "")) != settings.metrics.port:
            found.append(f"{probe} port {get.get('port')} is not fanout's metrics port "
                         f"{settings.metrics.port}")
    if settings.metrics.bind in ("127.0.0.1", "localhost", "::1"):
        found.append(f"metrics bind {settings.metrics.bind}: kubelet probes and Prometheus "
                     "reach the pod IP, so bind 0.0.0.0")
    return found


def _pod_problems(deployment: Obj, settings: Settings) -> list[str]:
    found: list[str] = []
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    found += _probe_problems(container, settings)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < settings.consumer.drain_grace + CLOSE_MARGIN:
        found.append(f"terminationGracePeriodSeconds {grace} leaves less than {CLOSE_MARGIN} s "
                     f"after consumer.drain_grace {settings.consumer.drain_grace}")
    resources = container.get("resources", {})
    for part in ("requests", "limits"):
        for what in ("cpu", "memory"):
            if what not in resources.get(part, {}):
                found.append(f"no {what} {part}")
    pod_sc = pod.get("securityContext", {})
    sc = container.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True:
        found.append("the root filesystem is writable (readOnlyRootFilesystem)")
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        found.append("runAsNonRoot is not set")
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append("allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        found.append("capabilities are not all dropped")
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if uid == 0:
        found.append("runAsUser is root")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
    for writable in (str(settings.home), "/tmp"):
        if writable not in mounts:
            found.append(f"{writable} is not a writable mount on a read-only root filesystem")
    return found


def _identity_problems(objects: list[Obj], deployment: Obj) -> list[str]:
    found = []
    template = deployment["spec"]["template"]
    account = template["spec"].get("serviceAccountName")
    accounts = {o["metadata"]["name"]: o for o in _of_kind(objects, "ServiceAccount")}
    if account not in accounts:
        found.append(f"serviceAccountName {account} is not among {sorted(accounts)}")
    elif "azure.workload.identity/client-id" not in accounts[account]["metadata"].get(
            "annotations", {}):
        found.append(f"ServiceAccount {account} has no azure.workload.identity/client-id")
    if template["metadata"].get("labels", {}).get("azure.workload.identity/use") != "true":
        found.append("pods lack the label azure.workload.identity/use: \"true\"")
    return found


def _service_problems(objects: list[Obj], deployment: Obj) -> list[str]:
    found = []
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if not _selects(deployment["spec"]["selector"]["matchLabels"], labels):
        found.append("the Deployment's selector does not match its pods")
    service = one(objects, "Service")
    if not _selects(service["spec"]["selector"], labels):
        found.append("the Service does not select fanout's pods")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in ports.values():
        if _container_port(container, port.get("targetPort", port["port"])) is None:
            found.append(f"Service port {port['name']} targets no container port")
    for monitor in _of_kind(objects, "ServiceMonitor"):
        if not _selects(monitor["spec"]["selector"].get("matchLabels", {}),
                        service["metadata"].get("labels", {})):
            found.append("the ServiceMonitor does not select the Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in ports:
                found.append(f"ServiceMonitor port {endpoint.get('port')} is not a Service port")
            if endpoint.get("path", "/metrics") != "/metrics":
                found.append(f"ServiceMonitor scrapes {endpoint.get('path')}")
    for monitor in _of_kind(objects, "PodMonitor"):
        if not _selects(monitor["spec"]["selector"].get("matchLabels", {}), labels):
            found.append("the PodMonitor does not select fanout's pods")
    if not _of_kind(objects, "ServiceMonitor") + _of_kind(objects, "PodMonitor"):
        found.append("no ServiceMonitor or PodMonitor")
    pdb = one(objects, "PodDisruptionBudget")
    if not _selects(pdb["spec"]["selector"]["matchLabels"], labels):
        found.append("the PodDisruptionBudget does not select fanout's pods")
    if pdb["spec"].get("minAvailable") in (1, "100%"):
        found.append("minAvailable 1 blocks node drains while one replica runs")
    return found


def _keda_problems(objects: list[Obj], deployment: Obj, settings: Settings) -> list[str]:
    found = []
    scaled = one(objects, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    if target.get("kind", "Deployment") != "Deployment" or \
            target["name"] != deployment["metadata"]["name"]:
        found.append(f"scaleTargetRef {target} is not the Deployment")
    auths = {o["metadata"]["name"]: o for o in _of_kind(objects, "TriggerAuthentication")}
    triggers = scaled["spec"].get("triggers", [])
    if not triggers:
        found.append("the ScaledObject has no trigger")
    for trigger in triggers:
        meta = trigger.get("metadata", {})
        if trigger["type"] != "azure-servicebus":
            found.append(f"trigger type {trigger['type']} is not azure-servicebus")
        if meta.get("queueName") != settings.servicebus.queue:
            found.append(f"trigger queueName {meta.get('queueName')} is not fanout's queue "
                         f"{settings.servicebus.queue}")
        fqdn = settings.servicebus.namespace or ""
        if not meta.get("namespace") or fqdn.split(".")[0] != meta["namespace"]:
            found.append(f"trigger namespace {meta.get('namespace')} is not fanout's {fqdn}")
        ref = trigger.get("authenticationRef", {}).get("name")
        if ref not in auths:
            found.append(f"authenticationRef {ref} is not a TriggerAuthentication")
        elif auths[ref]["spec"].get("podIdentity", {}).get("provider") != "azure-workload":
            found.append(f"TriggerAuthentication {ref} does not use azure-workload identity")
        if any(k.startswith("connection") for k in meta):
            found.append("the trigger reads a connection string")
    if scaled["spec"].get("minReplicaCount", 0) > scaled["spec"].get("maxReplicaCount", 100):
        found.append("minReplicaCount is above maxReplicaCount")
    if "replicas" in deployment["spec"]:
        found.append("the Deployment sets replicas, which every apply resets under KEDA")
    return found


def _events_problems(settings: Settings) -> list[str]:
    found: list[str] = []
    events = settings.events
    if not events.enabled or events.topic:
        return found
    if not events.queue:
        found.append("events are enabled but name no queue or topic")
    elif settings.queue_kind == "servicebus" and events.queue == settings.servicebus.queue:
        found.append(f"events.queue {events.queue} is the work queue: fanout would receive "
                     "its own completion events")
    return found
