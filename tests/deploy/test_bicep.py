"""deploy/bicep: structure, least-privilege roles, the queue and event wiring fanout
relies on, and the pools' autoscale formula run against simulated pool metrics.

No Bicep compiler is available offline, so this is a structural check: it does not
prove the template deploys (docs/deploy.md says what to run against Azure).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from tests.deploy import bicep
from tests.deploy.batch_formula import Evaluator, FormulaError, Samples
from worker.config import EventsConfig, JobsConfig, QueueConfig, Settings

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "deploy" / "bicep" / "main.bicep"
POOL = ROOT / "deploy" / "bicep" / "modules" / "batch-pool.bicep"

#: Azure built-in role definition ids (the same in every tenant).
BUILT_IN_ROLES = {
    "serviceBusDataReceiver": "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
    "serviceBusDataSender": "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
    "serviceBusDataOwner": "090c5cfd-751d-490a-894a-3ce6f1109419",
    "storageBlobDataContributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "storageBlobDelegator": "db58b8e5-c6ad-4a2a-8342-4190687cbf4a",
    "batchDataContributor": "6aaa78f1-f7de-44ca-8722-c64a23943cae",
    "acrPull": "7f951dda-4ed3-4680-a7ca-43fe172d538d",
}
#: Broad roles a least-privilege template never hands out.
BROAD_ROLES = {"8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
               "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
               "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9": "User Access Administrator"}
API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")


@pytest.fixture
def main_text() -> str:
    """main.bicep's text."""
    return MAIN.read_text()


def declarations(text: str) -> list[bicep.Declaration]:
    """Declarations of a Bicep text."""
    return bicep.declarations(text)


def resources(text: str) -> dict[str, bicep.Declaration]:
    """Resources of a Bicep text by symbol."""
    return bicep.by_name(declarations(text), "resource")


@pytest.mark.parametrize("path", [MAIN, POOL], ids=["main", "batch-pool"])
def test_brackets_balance(path: Path) -> None:
    """Every brace, bracket and parenthesis outside strings and comments pairs up."""
    assert bicep.unbalanced(path.read_text()) == []


def test_the_bracket_check_catches_a_missing_brace(main_text: str) -> None:
    """Dropping one closing brace is reported."""
    broken = main_text.replace("\n}\n", "\n\n", 1)
    assert bicep.unbalanced(broken)


@pytest.mark.parametrize("path", [MAIN, POOL], ids=["main", "batch-pool"])
def test_every_resource_names_a_type_and_an_api_version(path: Path) -> None:
    """Each resource declares 'Provider/type@yyyy-mm-dd'."""
    found = resources(path.read_text())
    assert found
    for decl in found.values():
        rtype, version = bicep.type_and_version(decl)
        assert rtype.startswith("Microsoft."), decl.name
        assert API_VERSION.match(version), f"{decl.name}: {version}"


def _symbols_used(text: str) -> set[str]:
    code = bicep.blank_strings_and_comments(text)
    used = set(re.findall(r"(?<![\w.'])([a-zA-Z_]\w*)\.(?:id|name|properties|outputs|identity)\b",
                          code))
    used |= set(re.findall(r"\b(?:parent|scope):\s*(\w+)", code))
    for strings in re.findall(r"'(?:[^'\\]|\\.)*'", bicep.strip_comments(text)):
        # ${name...}, not ${function(...)}
        used |= {m.split(".")[0] for m in re.findall(r"\$\{([\w.]+)\b(?![\w.(])", strings)}
    return used


@pytest.mark.parametrize("path", [MAIN, POOL], ids=["main", "batch-pool"])
def test_every_symbol_used_is_declared_and_every_param_is_used(path: Path) -> None:
    """References name declared resources, modules, params or vars; no param is dead."""
    text = path.read_text()
    decls = declarations(text)
    declared = {d.name for d in decls}
    builtins = {"resourceGroup", "subscription", "environment"}
    assert _symbols_used(text) - declared - builtins == set()
    code = bicep.blank_strings_and_comments(text)
    strings = " ".join(re.findall(r"'(?:[^'\\]|\\.)*'", bicep.strip_comments(text)))
    for param in bicep.by_name(decls, "param"):
        uses = len(re.findall(rf"\b{param}\b", code)) + len(re.findall(rf"\$\{{{param}\b",
                                                                         strings))
        assert uses > 1, f"param {param} is never used"


def test_role_ids_are_the_built_in_ones(main_text: str) -> None:
    """The roles map holds the well-known GUIDs of the roles it names, and nothing broad."""
    roles = bicep.by_name(declarations(main_text), "var")["roles"].body
    pairs = dict(re.findall(r"(\w+):\s*'([0-9a-f-]{36})'", roles))
    assert pairs == {name: BUILT_IN_ROLES[name] for name in pairs}
    assert not set(re.findall(r"[0-9a-f]{8}-[0-9a-f-]{27}", main_text)) & set(BROAD_ROLES)


def role_assignments(text: str) -> set[tuple[str, str, str]]:
    """(scope, principal, role) of each role assignment in a Bicep text."""
    found = set()
    for decl in resources(text).values():
        if bicep.type_and_version(decl)[0] != "Microsoft.Authorization/roleAssignments":
            continue
        scope = re.search(r"\bscope:\s*(\w+)", decl.body)
        role = re.search(r"roleDefinitions',\s*roles\.(\w+)\)", decl.body)
        principal = re.search(r"principalId:\s*(\w+)\.", decl.body)
        assert role and principal, decl.name
        assert re.search(r"name:\s*guid\(", decl.body), f"{decl.name} has no guid() name"
        found.add((scope.group(1) if scope else "resourceGroup", principal.group(1),
                   role.group(1)))
    return found


def test_identities_get_exactly_the_least_privilege_roles(main_text: str) -> None:
    """fanout's identity gets queue, events queue, blob and Batch data roles on those
    resources only."""
    granted = role_assignments(main_text)
    required = {
        ("queue", "workerIdentity", "serviceBusDataReceiver"),
        ("queue", "workerIdentity", "serviceBusDataSender"),
        ("eventsQueue", "workerIdentity", "serviceBusDataSender"),
        # Receive on the events queue is what lets `fanout events` peek it.
        ("eventsQueue", "workerIdentity", "serviceBusDataReceiver"),
        ("replyQueues", "workerIdentity", "serviceBusDataSender"),
        ("storage", "workerIdentity", "storageBlobDataContributor"),
        ("storage", "workerIdentity", "storageBlobDelegator"),
        ("batch", "workerIdentity", "batchDataContributor"),
        ("queue", "scalerIdentity", "serviceBusDataOwner"),
        ("queue", "blobEvents", "serviceBusDataSender"),
        # The container pools' nodes pull task images, and may do nothing else.
        ("registry", "poolIdentity", "acrPull"),
    }
    assert required <= granted
    assert {g for g in granted if g[1] == "poolIdentity"} == {
        ("registry", "poolIdentity", "acrPull")}
    optional = {("queue", "workerIdentity", "serviceBusDataOwner")}
    assert granted - required <= optional
    assert all(scope != "resourceGroup" for scope, _, _ in granted)


def test_a_broader_grant_is_caught(main_text: str) -> None:
    """Scoping a role to the namespace instead of the queue fails the least-privilege check."""
    broader = main_text.replace("scope: queue\n  properties: {\n    roleDefinitionId: "
                                "subscriptionResourceId('Microsoft.Authorization/roleDefinitions'"
                                ", roles.serviceBusDataReceiver)",
                                "scope: serviceBus\n  properties: {\n    roleDefinitionId: "
                                "subscriptionResourceId('Microsoft.Authorization/roleDefinitions'"
                                ", roles.serviceBusDataReceiver)")
    assert broader != main_text
    assert not {("queue", "workerIdentity", "serviceBusDataReceiver")} <= role_assignments(broader)


def _prop(body: str, key: str) -> str | None:
    match = re.search(rf"\b{key}:\s*([^\n]+)", body)
    return match.group(1).strip().strip("'") if match else None


def test_the_queue_matches_what_fanout_expects(main_text: str) -> None:
    """Duplicate detection and dead-lettering on expiry are on; lock and delivery count match
    fanout's queue settings."""
    queue = resources(main_text)["queue"]
    assert bicep.type_and_version(queue)[0] == "Microsoft.ServiceBus/namespaces/queues"
    assert _prop(queue.body, "requiresDuplicateDetection") == "true"
    assert _prop(queue.body, "deadLetteringOnMessageExpiration") == "true"
    assert _prop(queue.body, "requiresSession") in (None, "false")
    lock = _prop(queue.body, "lockDuration")
    assert lock in ("PT1M", "PT5M")
    defaults = QueueConfig()
    assert {"PT1M": 60, "PT5M": 300}[lock] == defaults.lock_duration
    assert int(_prop(queue.body, "maxDeliveryCount") or 0) == defaults.max_delivery_count == 10
    namespace = resources(main_text)["serviceBus"]
    assert _prop(namespace.body, "tier") in ("Standard", "Premium")  # duplicate detection


def test_blob_created_events_reach_the_queue_for_the_input_container_only(main_text: str) -> None:
    """The Event Grid subscription sends BlobCreated of the input container to the queue."""
    found = resources(main_text)
    topic = found["blobEvents"]
    assert bicep.type_and_version(topic)[0] == "Microsoft.EventGrid/systemTopics"
    assert _prop(topic.body, "source") == "storage.id"
    assert _prop(topic.body, "topicType") == "Microsoft.Storage.StorageAccounts"
    kind = "Microsoft.EventGrid/systemTopics/eventSubscriptions"
    subs = [d for d in found.values() if bicep.type_and_version(d)[0] == kind]
    (sub,) = subs
    assert "'Microsoft.Storage.BlobCreated'" in sub.body
    assert _prop(sub.body, "subjectBeginsWith") == \
        "/blobServices/default/containers/${inputContainerName}/blobs/"
    assert _prop(sub.body, "endpointType") == "ServiceBusQueue"
    assert _prop(sub.body, "resourceId") == "queue.id"
    assert _prop(sub.body, "eventDeliverySchema") in ("CloudEventSchemaV1_0", "EventGridSchema")
    assert "'Microsoft.Storage.BlobDeleted'" not in sub.body


def test_storage_has_private_input_and_output_containers(main_text: str) -> None:
    """Input and output containers exist, without public access, on a key-less account."""
    found = resources(main_text)
    names = {_prop(found[s].body, "name") for s in ("inputContainer", "outputContainer")}
    assert names == {"inputContainerName", "outputContainerName"}
    for symbol in ("inputContainer", "outputContainer"):
        assert _prop(found[symbol].body, "publicAccess") == "None"
    assert _prop(found["storage"].body, "allowBlobPublicAccess") == "false"
    assert _prop(found["storage"].body, "allowSharedKeyAccess") == "false"


def test_there_is_a_cpu_pool_and_a_gpu_pool(main_text: str) -> None:
    """Pool modules cpu and gpu always, the gpu one on a GPU VM size; the container
    pools cpu-containers and gpu-containers only with containerPools."""
    modules = bicep.by_name(declarations(main_text), "module")
    params = {name: bicep.module_params(m) for name, m in modules.items()}
    assert {p["poolName"] for p in params.values()} == {"cpu", "gpu", "cpu-containers",
                                                        "gpu-containers"}
    defaults = bicep.param_defaults(declarations(main_text))
    for pool in ("gpu", "gpu-containers"):
        gpu = next(p for p in params.values() if p["poolName"] == pool)
        assert re.match(r"Standard_N", defaults[gpu["vmSize"]])
    for name, module in modules.items():
        conditional = "= if (containerPools)" in module.header
        assert conditional == params[name]["poolName"].endswith("-containers"), name
        # A plain pool passes no container settings, so the module makes none.
        assert ("containerRegistryServer" in params[name]) == conditional, name


#: What only a deployment knows, as it would fill the fanoutToml output in.
RUNTIME = {"serviceBusFqdn": "sb-fanout-x.servicebus.windows.net",
           "batchAccountUrl": "https://bafanoutx.westeurope.batch.azure.com",
           "cpuPool.outputs.name": "cpu",
           "blobAccountUrl": "https://stfanoutx.blob.core.windows.net/",
           "allowedReplyTo": "[]"}


def test_the_fanout_toml_output_configures_fanout_for_azure(main_text: str) -> None:
    """The fanoutToml output, with sample values, loads into Settings as all-Azure, naming
    the queue, events queue and logs container the template creates."""
    settings = Settings(**tomllib.loads(bicep.fanout_toml(main_text, RUNTIME)))
    assert (settings.queue_kind, settings.backend_kind, settings.storage_kind) == \
        ("servicebus", "azure", "azure")
    assert settings.servicebus.queue == "fanout" and settings.default_pool == "cpu"
    defaults = bicep.param_defaults(declarations(main_text))
    assert settings.events.queue == defaults["eventsQueueName"] == "fanout-events"
    assert settings.events.queue != settings.servicebus.queue  # never read its own events
    assert settings.events.topic is None and settings.events.allowed_reply_to == []
    assert settings.jobs.logs_container == defaults["logsContainerName"] == "fanout-logs"
    assert settings.jobs.max_wall_clock == timedelta(days=1)
    assert settings.jobs.retention == timedelta(days=7)
    outputs = bicep.by_name(declarations(main_text), "output")
    assert {"workerClientId", "scalerClientId", "serviceBusNamespaceName", "eventsQueueName",
            "logsContainerName"} <= set(outputs)


def test_reply_to_queues_reach_allowed_reply_to(main_text: str) -> None:
    """Deployed with replyToQueueNames, the output allows exactly those queues (the
    string() of a Bicep array is JSON, which TOML reads as an array)."""
    decls = declarations(main_text)
    assert bicep.by_name(decls, "var")["allowedReplyTo"].body.endswith(
        "string(replyToQueueNames)")
    names = ["team-render-events", "team-qa"]
    text = bicep.fanout_toml(main_text, {**RUNTIME, "allowedReplyTo": json.dumps(names)})
    assert Settings(**tomllib.loads(text)).events.allowed_reply_to == names


def test_the_static_values_resolve_resource_names_from_params(main_text: str) -> None:
    """The helper behind fanout_toml: names come from param defaults, not guesses."""
    values = bicep.static_values(declarations(main_text))
    assert values["eventsQueue.name"] == values["eventsQueueName"] == "fanout-events"
    assert values["blobService.name"] == "default"
    assert "serviceBus.name" not in values  # a var built at deployment time
    changed = main_text.replace("param eventsQueueName string = 'fanout-events'",
                                "param eventsQueueName string = 'other-events'")
    assert bicep.static_values(declarations(changed))["eventsQueue.name"] == "other-events"


def _duration(value: str | None) -> timedelta:
    assert value, "no duration"
    return TypeAdapter(timedelta).validate_python(value)


def events_queue_problems(text: str) -> list[str]:
    """What is wrong with the events queue (and the reply-to queues) of a main.bicep."""
    found = []
    decls = declarations(text)
    queues = resources(text)
    events, replies = queues.get("eventsQueue"), queues.get("replyQueues")
    if events is None or replies is None:
        return ["no eventsQueue or replyQueues resource"]
    for decl in (events, replies):
        if bicep.type_and_version(decl)[0] != "Microsoft.ServiceBus/namespaces/queues":
            found.append(f"{decl.name} is not a Service Bus queue")
        if _prop(decl.body, "parent") != "serviceBus":
            found.append(f"{decl.name} is not on the namespace")
    if _prop(events.body, "name") != "eventsQueueName" or \
            _prop(replies.body, "name") != "replyTo":
        found.append("the events queues are not named by their params")
    # Both take their properties from one var; read it.
    props_var = {_prop(d.body, "properties") for d in (events, replies)}
    if len(props_var) != 1:
        return [*found, f"the events queues differ in properties: {props_var}"]
    (name,) = props_var
    body = bicep.by_name(decls, "var").get(name or "")
    if body is None:
        return [*found, f"properties {name} is not a var"]
    props = body.body
    if _prop(props, "requiresDuplicateDetection") != "true":
        found.append("no duplicate detection: repeated events from replicas would pass")
    elif _duration(_prop(props, "duplicateDetectionHistoryTimeWindow")) < timedelta(
            seconds=EventsConfig().duplicate_window):
        found.append("duplicate detection window shorter than the embedded queue's")
    if _prop(props, "deadLetteringOnMessageExpiration") != "true":
        found.append("expired events are dropped, not dead-lettered")
    if _duration(_prop(props, "defaultMessageTimeToLive")) < timedelta(days=1):
        found.append("events expire within a day")
    if _prop(props, "requiresSession") not in (None, "false"):
        found.append("sessions on: fanout sends no session id")
    if bicep.param_defaults(decls).get("eventsQueueName") == bicep.param_defaults(decls).get(
            "queueName"):
        found.append("the events queue is the work queue")
    return found


def test_the_events_queue_drops_repeats_and_keeps_expired_events(main_text: str) -> None:
    """fanout-events has duplicate detection (an hour), dead-lettering on expiry and a
    two-week time to live; reply-to queues get the same properties."""
    assert events_queue_problems(main_text) == []
    props = bicep.by_name(declarations(main_text), "var")["eventQueueProperties"].body
    assert _duration(_prop(props, "duplicateDetectionHistoryTimeWindow")) == timedelta(hours=1)
    assert _duration(_prop(props, "defaultMessageTimeToLive")) == timedelta(days=14)


EVENTS_BREAKAGES = {
    "no duplicate detection": ("requiresDuplicateDetection: true\n  duplicateDetectionHistory"
                               "TimeWindow: 'PT1H'\n  deadLetteringOnMessageExpiration: true\n"
                               "  defaultMessageTimeToLive: 'P14D'",
                               "requiresDuplicateDetection: false\n  duplicateDetectionHistory"
                               "TimeWindow: 'PT1H'\n  deadLetteringOnMessageExpiration: true\n"
                               "  defaultMessageTimeToLive: 'P14D'"),
    "a window too short": ("duplicateDetectionHistoryTimeWindow: 'PT1H'\n  deadLetteringOn"
                           "MessageExpiration: true\n  defaultMessageTimeToLive: 'P14D'",
                           "duplicateDetectionHistoryTimeWindow: 'PT1M'\n  deadLetteringOn"
                           "MessageExpiration: true\n  defaultMessageTimeToLive: 'P14D'"),
    "expiry drops events": ("deadLetteringOnMessageExpiration: true\n  defaultMessageTimeToLive"
                            ": 'P14D'", "deadLetteringOnMessageExpiration: false\n  default"
                            "MessageTimeToLive: 'P14D'"),
    "events expire in an hour": ("defaultMessageTimeToLive: 'P14D'",
                                 "defaultMessageTimeToLive: 'PT1H'"),
    "events on the work queue": ("param eventsQueueName string = 'fanout-events'",
                                 "param eventsQueueName string = 'fanout'"),
    "reply queues differ": ("  name: replyTo\n  properties: eventQueueProperties",
                            "  name: replyTo\n  properties: {}"),
}


@pytest.mark.parametrize("breakage", sorted(EVENTS_BREAKAGES))
def test_each_events_queue_breakage_is_caught(main_text: str, breakage: str) -> None:
    """An events queue broken in one way has at least one problem."""
    old, new = EVENTS_BREAKAGES[breakage]
    assert main_text.count(old) == 1, old
    assert events_queue_problems(main_text.replace(old, new)), f"{breakage} went unnoticed"


def logs_problems(text: str) -> list[str]:
    """What is wrong with the task-log container and its lifecycle rule."""
    found = []
    decls = declarations(text)
    found_resources = resources(text)
    defaults = bicep.param_defaults(decls)
    logs = found_resources.get("logsContainer")
    if logs is None:
        return ["no logsContainer"]
    if _prop(logs.body, "name") != "logsContainerName":
        found.append("the logs container is not named by logsContainerName")
    if defaults.get("logsContainerName") != JobsConfig().logs_container:
        found.append("logsContainerName is not fanout's default [jobs] logs_container")
    if _prop(logs.body, "publicAccess") != "None":
        found.append("task logs are public")
    policies = [d for d in found_resources.values() if bicep.type_and_version(d)[0] ==
                "Microsoft.Storage/storageAccounts/managementPolicies"]
    if len(policies) != 1:
        return [*found, f"{len(policies)} management policies"]
    (policy,) = policies
    if _prop(policy.body, "parent") != "storage" or _prop(policy.body, "name") != "default":
        found.append("the management policy is not the storage account's 'default'")
    if _prop(policy.body, "enabled") != "true" or _prop(policy.body, "type") != "Lifecycle":
        found.append("the lifecycle rule is not an enabled Lifecycle rule")
    prefixes = re.search(r"prefixMatch:\s*\[([^\]]*)\]", policy.body)
    if not prefixes or [p.strip() for p in prefixes.group(1).split()] != [
            "'${logsContainerName}/'"]:
        found.append("the rule does not match exactly the logs container")
    if "'blockBlob'" not in policy.body:
        found.append("the rule skips block blobs (what tasks upload)")
    delete = re.search(r"baseBlob:\s*\{\s*delete:\s*\{\s*daysAfterModificationGreaterThan:"
                       r"\s*(\w+)\s*\}", policy.body)
    if not delete or delete.group(1) != "logRetentionDays":
        found.append("the rule does not delete base blobs after logRetentionDays")
    days = int(defaults.get("logRetentionDays", "0"))
    if days < _duration(defaults.get("jobRetention")).days:
        found.append("logs are deleted before the jobs they belong to")
    return found


def test_task_logs_are_private_and_deleted_after_logRetentionDays(main_text: str) -> None:
    """fanout-logs exists without public access, and a lifecycle rule deletes blobs under
    it 14 days (by default) after they were written, no earlier than jobs are deleted."""
    assert logs_problems(main_text) == []
    assert bicep.param_defaults(declarations(main_text))["logRetentionDays"] == "14"


LOGS_BREAKAGES = {
    "rule on another container": ("'${logsContainerName}/'", "'${outputContainerName}/'"),
    "rule on every blob": ("              prefixMatch: [\n                '${logsContainerName}/'"
                           "\n              ]\n", ""),
    "rule disabled": ("          enabled: true\n          type: 'Lifecycle'",
                      "          enabled: false\n          type: 'Lifecycle'"),
    "fixed days": ("daysAfterModificationGreaterThan: logRetentionDays",
                   "daysAfterModificationGreaterThan: 14"),
    "logs gone before jobs": ("param logRetentionDays int = 14", "param logRetentionDays int = 3"),
    "public logs": ("  name: logsContainerName\n  properties: {\n    publicAccess: 'None'",
                    "  name: logsContainerName\n  properties: {\n    publicAccess: 'Blob'"),
    "another container name": ("param logsContainerName string = 'fanout-logs'",
                               "param logsContainerName string = 'logs'"),
}


@pytest.mark.parametrize("breakage", sorted(LOGS_BREAKAGES))
def test_each_logs_breakage_is_caught(main_text: str, breakage: str) -> None:
    """A logs container or lifecycle rule broken in one way has at least one problem."""
    old, new = LOGS_BREAKAGES[breakage]
    assert main_text.count(old) == 1, old
    assert logs_problems(main_text.replace(old, new)), f"{breakage} went unnoticed"


# ---------------------------------------------------------------- autoscale formula


def pool_formula(pool: str, text: str | None = None) -> str:
    """The autoscale formula of a pool, with main.bicep's default parameters filled in."""
    main = declarations(MAIN.read_text())
    module = next(m for m in bicep.by_name(main, "module").values()
                  if bicep.module_params(m)["poolName"] == pool)
    given = bicep.module_params(module)
    defaults = bicep.param_defaults(main)
    pool_decls = declarations(text if text is not None else POOL.read_text())
    values = bicep.param_defaults(pool_decls)
    values.update({k: defaults.get(v, v) for k, v in given.items()})
    lines = bicep.join_lines(bicep.by_name(pool_decls, "var")["autoScaleFormula"].body)
    return "\n".join(bicep.interpolate(line, values) for line in lines)


def evaluate(formula: str, *, pending: Sequence[float], slots: int, preempted: float = 0,
             ) -> tuple[float, float, str]:
    """(spot target, dedicated target, deallocation) for samples newest-last."""
    result = Evaluator({
        "$PendingTasks": Samples(tuple(pending)),
        "$PreemptedNodeCount": Samples((preempted,) * len(pending)),
        "$TaskSlotsPerNode": float(slots),
    }).run(formula)
    spot, dedicated = result["$TargetLowPriorityNodes"], result["$TargetDedicatedNodes"]
    assert isinstance(spot, float) and isinstance(dedicated, float)
    return spot, dedicated, str(result["$NodeDeallocationOption"])


TEN_MINUTES = 20  # samples, one each 30 s


def test_an_idle_pool_scales_to_zero_and_deallocates_on_task_completion() -> None:
    """No pending task for the whole idle window: zero nodes, taskcompletion."""
    spot, dedicated, dealloc = evaluate(pool_formula("cpu"), pending=[0] * TEN_MINUTES, slots=4)
    assert (spot, dedicated, dealloc) == (0, 0, "taskcompletion")


def test_nodes_follow_pending_tasks_per_slot() -> None:
    """Eight pending one-slot tasks need two 4-slot nodes, or eight 1-slot nodes."""
    formula = pool_formula("cpu")
    assert evaluate(formula, pending=[8] * TEN_MINUTES, slots=4)[0] == 2
    assert evaluate(formula, pending=[8] * TEN_MINUTES, slots=1)[0] == 8
    assert evaluate(formula, pending=[9] * TEN_MINUTES, slots=4)[0] == 3


def test_a_burst_is_capped_and_overflows_to_dedicated() -> None:
    """100 pending on 4 slots wants 25 nodes: 20 spot (the cap) and 2 dedicated (its cap)."""
    spot, dedicated, _ = evaluate(pool_formula("cpu"), pending=[0] * 10 + [100], slots=4)
    assert (spot, dedicated) == (20, 2)


def test_preempted_spot_nodes_are_backfilled_with_dedicated_ones() -> None:
    """With 12 pending on 4 slots and one spot node preempted, one dedicated node joins."""
    formula = pool_formula("cpu")
    assert evaluate(formula, pending=[12] * TEN_MINUTES, slots=4, preempted=0)[1] == 0
    assert evaluate(formula, pending=[12] * TEN_MINUTES, slots=4, preempted=1)[1] == 1
    assert evaluate(formula, pending=[12] * TEN_MINUTES, slots=4, preempted=5)[1] == 2


def test_a_recently_busy_pool_keeps_its_nodes_for_the_idle_window() -> None:
    """Work that ended minutes ago keeps nodes (no thrash); a new pool uses the last sample."""
    formula = pool_formula("cpu")
    assert evaluate(formula, pending=[40] * 5 + [0] * 15, slots=4)[0] == 10
    assert evaluate(formula, pending=[0, 6], slots=4)[0] == 2


def test_the_gpu_pool_counts_one_task_per_gpu_node() -> None:
    """GPU nodes have one slot: three pending tasks want three spot GPU nodes."""
    assert evaluate(pool_formula("gpu"), pending=[3] * TEN_MINUTES, slots=1)[0] == 3


FORMULA_BREAKAGES = {
    "no deallocation option": ("'$NodeDeallocationOption = taskcompletion;'\n", ""),
    "requeue on scale-down": ("= taskcompletion;", "= requeue;"),
    "not slot-aware": ("floor($TaskSlotsPerNode / $slotsPerTask)", "1"),
    "ignores preemption": ("$preempted + max", "max"),
    "never scales to zero": ("$wanted = ceil(", "$wanted = 1 + ceil("),
}


@pytest.mark.parametrize("breakage", sorted(FORMULA_BREAKAGES))
def test_each_formula_breakage_is_caught(breakage: str) -> None:
    """A formula broken in one way fails at least one of the behaviours above."""
    old, new = FORMULA_BREAKAGES[breakage]
    text = POOL.read_text()
    assert old in text
    formula = pool_formula("cpu", text.replace(old, new))
    checks: list[Callable[[], bool]] = [
        lambda: evaluate(formula, pending=[0] * TEN_MINUTES, slots=4) == (0, 0, "taskcompletion"),
        lambda: evaluate(formula, pending=[8] * TEN_MINUTES, slots=4)[0] == 2,
        lambda: evaluate(formula, pending=[12] * TEN_MINUTES, slots=4, preempted=1)[1] == 1,
    ]
    results = []
    for check in checks:
        try:
            results.append(check())
        except (FormulaError, KeyError):
            results.append(False)
    assert not all(results), f"{breakage} went unnoticed"


def test_the_interpreter_rejects_what_batch_rejects() -> None:
    """Unknown names and reading a variable before setting it are errors."""
    with pytest.raises(FormulaError):
        Evaluator({}).run("$a = $b + 1;")
    with pytest.raises(FormulaError):
        Evaluator({}).run("$a = nosuchfunction(1);")
    assert Evaluator({}).run("$a = 1 > 2 ? 3 : max(4, 5);")["$a"] == 5


# ---------------------------------------------------------------- container pools

IMAGES = ROOT / "deploy" / "images"
#: What only a deployment knows, for the container outputs.
CONTAINER_RUNTIME = {
    "registryServer": "acrfanoutx.azurecr.io",
    "poolIdentity.id": "/subscriptions/0000/resourceGroups/rg-fanout/providers/"
                       "Microsoft.ManagedIdentity/userAssignedIdentities/id-fanout-pool",
}


def _var_list(decls: list[bicep.Declaration], name: str) -> list[str]:
    """The items of an array var, as source text."""
    body = bicep.by_name(decls, "var")[name].body
    match = re.search(r"=\s*\[(.*)\]\s*$", body, re.S)
    assert match, f"var {name} is not an array"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def _var_string(decls: list[bicep.Declaration], name: str) -> str:
    """A string var's literal (with its ${...} left in)."""
    body = bicep.by_name(decls, "var")[name].body
    match = re.fullmatch(r"\w+\s*=\s*'(.*)'", body.strip())
    assert match, f"var {name} is not a string literal"
    return match.group(1)


def container_images(text: str, pool: str) -> list[str]:
    """The image references a container pool of main.bicep prefetches, resolved with
    the sample registry server and the default tag."""
    decls = declarations(text)
    module = next(m for m in bicep.by_name(decls, "module").values()
                  if bicep.module_params(m)["poolName"] == pool)
    names = bicep.module_params(module).get("containerImageNames")
    if names is None:
        return []
    values = {**bicep.param_defaults(decls), **CONTAINER_RUNTIME}
    return [bicep.interpolate(_var_string(decls, item), values)
            for item in _var_list(decls, names)]


def container_problems(main: str, pool: str) -> list[str]:
    """What keeps main.bicep's container pools from pulling their images from the
    registry as an identity that holds AcrPull there, and nothing more."""
    found: list[str] = []
    decls = declarations(main)
    found_resources = resources(main)
    registry = found_resources.get("registry")
    identity = found_resources.get("poolIdentity")
    if registry is None or identity is None:
        return ["no registry or poolIdentity resource"]
    if bicep.type_and_version(registry)[0] != "Microsoft.ContainerRegistry/registries":
        found.append("registry is not a container registry")
    if _prop(registry.body, "adminUserEnabled") != "false":
        found.append("the registry's admin user (a password) is not disabled")
    if _prop(registry.body, "name") != "registryName":
        found.append("the registry is not named registryName")
    if bicep.type_and_version(identity)[0] != \
            "Microsoft.ManagedIdentity/userAssignedIdentities":
        found.append("poolIdentity is not a user-assigned identity")
    for decl in (registry, identity):
        if "= if (containerPools)" not in decl.header:
            found.append(f"{decl.name} is deployed without containerPools")
    # The server the pools log in to is that registry's.
    server = bicep.by_name(decls, "var").get("registryServer")
    if server is None or not re.search(
            r"=\s*toLower\('\$\{registryName\}\$\{environment\(\)\.suffixes\.acrLoginServer\}'\)$",
            server.body.strip()):
        found.append("registryServer is not the registry's login server")
    if ("registry", "poolIdentity", "acrPull") not in role_assignments(main):
        found.append("poolIdentity does not hold AcrPull on the registry")
    grants = next((d for d in found_resources.values()
                   if "roles.acrPull" in d.body and "Microsoft.Authorization" in d.header), None)
    modules = bicep.by_name(decls, "module")
    containers = {name: m for name, m in modules.items()
                  if bicep.module_params(m)["poolName"].endswith("-containers")}
    if set(containers) != {"cpuContainerPool", "gpuContainerPool"}:
        return [*found, f"container pool modules: {sorted(containers)}"]
    defaults = bicep.param_defaults(decls)
    for module in containers.values():
        given = bicep.module_params(module)
        pool_name = given["poolName"]
        if given.get("nodeIdentityId") != "poolIdentity.id":
            found.append(f"{pool_name}: its nodes are not poolIdentity "
                         f"({given.get('nodeIdentityId')})")
        if given.get("containerRegistryServer") != "registryServer":
            found.append(f"{pool_name}: it logs in to {given.get('containerRegistryServer')}, "
                         "not the registry")
        images = container_images(main, pool_name)
        if not images:
            found.append(f"{pool_name}: it prefetches no image")
        for image in images:
            if not image.startswith(CONTAINER_RUNTIME["registryServer"] + "/"):
                found.append(f"{pool_name}: {image} is not from the registry")
        if grants is None or not re.search(rf"dependsOn:\s*\[[^\]]*\b{grants.name}\b",
                                           module.body):
            found.append(f"{pool_name}: its nodes may start before AcrPull is granted")
        if given.get("imageReference") != "containerPoolImageReference":
            found.append(f"{pool_name}: not on the container node image")
    reference = re.search(r"param containerPoolImageReference object = \{(.*?)\}", main, re.S)
    agent = defaults.get("containerPoolNodeAgentSkuId", "")
    if not reference or "'microsoft-dsvm'" not in reference.group(1) or \
            "'ubuntu-hpc'" not in reference.group(1):
        found.append("the container node image is not microsoft-dsvm ubuntu-hpc "
                     "(Docker-compatible, NVIDIA container toolkit)")
    else:
        sku = re.search(r"sku:\s*'(\d\d)(\d\d)'", reference.group(1))
        if not sku or agent != f"batch.node.ubuntu {sku.group(1)}.{sku.group(2)}":
            found.append(f"node agent {agent!r} does not match the image's Ubuntu")
    return found + pool_module_problems(pool)


def pool_module_problems(text: str) -> list[str]:
    """What keeps batch-pool.bicep from giving a pool with a registry server a Docker
    container configuration that logs in as the nodes' identity, and the nodes that
    identity."""
    found: list[str] = []
    decls = declarations(text)
    variables = bicep.by_name(decls, "var")
    config = variables.get("containerConfiguration")
    if config is None:
        return ["no containerConfiguration var"]
    if _prop(config.body, "type") != "DockerCompatible":
        found.append("the container type is not DockerCompatible")
    if _prop(config.body, "containerImageNames") != "containerImageNames":
        found.append("the images given are not prefetched")
    registries = re.search(r"containerRegistries:\s*\[(.*)\]", config.body, re.S)
    if not registries:
        return [*found, "no containerRegistries"]
    entry = registries.group(1)
    if _prop(entry, "registryServer") != "containerRegistryServer":
        found.append("the registry is not containerRegistryServer")
    if not re.search(r"identityReference:\s*\{\s*resourceId:\s*nodeIdentityId\s*\}", entry):
        found.append("the registry is not logged in to as the nodes' identity")
    if re.search(r"\b(username|password):", entry):
        found.append("the registry is logged in to with a password")
    identity = variables.get("nodeIdentity")
    if identity is None or _prop(identity.body, "type") != "UserAssigned" or \
            "'${nodeIdentityId}': {}" not in identity.body:
        found.append("the nodes are not given nodeIdentityId")
    pool = resources(text)["pool"]
    if not re.search(r"^\s*identity:\s*empty\(nodeIdentityId\)\s*\?\s*null\s*:\s*nodeIdentity\s*$",
                     pool.body, re.M):
        found.append("the pool does not carry nodeIdentity")
    if _prop(pool.body, "containerConfiguration") != \
            "containerized ? containerConfiguration : null":
        found.append("the pool's virtualMachineConfiguration lacks containerConfiguration")
    containerized = variables.get("containerized")
    if containerized is None or not re.fullmatch(
            r"containerized\s*=\s*!empty\(containerRegistryServer\)", containerized.body.strip()):
        found.append("containerized does not follow containerRegistryServer")
    return found


def test_container_pools_pull_their_images_from_the_registry_as_the_acrpull_identity(
        main_text: str) -> None:
    """With containerPools, the registry (admin user off), the pool identity with AcrPull
    on it, and pools whose containerConfiguration logs in to that registry as that
    identity and prefetches images from it."""
    assert container_problems(main_text, POOL.read_text()) == []
    assert bicep.param_defaults(declarations(main_text))["containerPools"] == "false"


def test_the_container_pools_prefetch_the_images_deploy_images_builds(main_text: str) -> None:
    """cpu-containers prefetches the ffmpeg and Blender images, gpu-containers Blender;
    each is <registry>/fanout/<dir>:<tag> for a directory of deploy/images/."""
    tag = bicep.param_defaults(declarations(main_text))["taskImageTag"]
    server = CONTAINER_RUNTIME["registryServer"]
    assert container_images(main_text, "cpu-containers") == [
        f"{server}/fanout/ffmpeg:{tag}", f"{server}/fanout/blender:{tag}"]
    assert container_images(main_text, "gpu-containers") == [f"{server}/fanout/blender:{tag}"]
    assert container_images(main_text, "cpu") == []
    for image in container_images(main_text, "cpu-containers"):
        repository = image.removeprefix(server + "/").split(":")[0]
        assert (IMAGES / repository.removeprefix("fanout/") / "Dockerfile").is_file(), image


CONTAINER_BREAKAGES: dict[str, tuple[str, str, str]] = {
    # name: (file, old, new)
    "admin user on": ("main", "adminUserEnabled: false", "adminUserEnabled: true"),
    "registry always deployed": (
        "main", "resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = "
                "if (containerPools) {",
        "resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {"),
    "AcrPull for the worker": ("main", "principalId: poolIdentity.properties.principalId",
                               "principalId: workerIdentity.properties.principalId"),
    "AcrPull on the resource group": ("main", "  scope: registry\n", ""),
    "nodes are the worker": ("main", "    nodeIdentityId: poolIdentity.id\n"
                                     "    containerRegistryServer: registryServer\n"
                                     "    containerImageNames: cpuContainerImages",
                             "    nodeIdentityId: workerIdentity.id\n"
                                     "    containerRegistryServer: registryServer\n"
                                     "    containerImageNames: cpuContainerImages"),
    "images from Docker Hub": ("main", "var ffmpegImage = '${registryServer}/",
                               "var ffmpegImage = 'docker.io/"),
    "nothing prefetched": ("main", "    containerImageNames: gpuContainerImages\n", ""),
    "nodes start before the grant": ("main", "  dependsOn: [\n    poolPullsImages\n  ]\n"
                                             "  params: {\n    batchAccountName: batch.name\n"
                                             "    poolName: 'gpu-containers'",
                                     "  params: {\n    batchAccountName: batch.name\n"
                                     "    poolName: 'gpu-containers'"),
    "plain Ubuntu nodes": ("main", "  publisher: 'microsoft-dsvm'\n  offer: 'ubuntu-hpc'\n"
                                   "  sku: '2404'",
                           "  publisher: 'canonical'\n  offer: 'ubuntu-24_04-lts'\n"
                           "  sku: 'server'"),
    "agent of another Ubuntu": ("main", "param containerPoolNodeAgentSkuId string = "
                                        "'batch.node.ubuntu 24.04'",
                                "param containerPoolNodeAgentSkuId string = "
                                "'batch.node.ubuntu 22.04'"),
    "registry password": ("pool", "      identityReference: {\n        resourceId: "
                                  "nodeIdentityId\n      }",
                          "      username: 'fanout'\n      password: 'secret'"),
    "nodes without the identity": ("pool", "identity: empty(nodeIdentityId) ? null : "
                                           "nodeIdentity", "identity: null"),
    "no container configuration": ("pool", "        containerConfiguration: containerized ? "
                                           "containerConfiguration : null\n", ""),
    "images not prefetched": ("pool", "  containerImageNames: containerImageNames\n",
                              "  containerImageNames: []\n"),
}


@pytest.mark.parametrize("breakage", sorted(CONTAINER_BREAKAGES))
def test_each_container_breakage_is_caught(main_text: str, breakage: str) -> None:
    """A registry, grant or container pool broken in one way has at least one problem."""
    where, old, new = CONTAINER_BREAKAGES[breakage]
    pool_text = POOL.read_text()
    target = main_text if where == "main" else pool_text
    assert target.count(old) == 1, old
    broken = target.replace(old, new)
    main, pool = (broken, pool_text) if where == "main" else (main_text, broken)
    assert container_problems(main, pool), f"{breakage} went unnoticed"


def container_toml(text: str) -> dict[str, object]:
    """The containerToml output, with sample deployment values, parsed."""
    decls = declarations(text)
    values = {**bicep.param_defaults(decls), **CONTAINER_RUNTIME}
    for image in ("ffmpegImage", "blenderImage"):
        values[image] = bicep.interpolate(_var_string(decls, image), values)
    lines = bicep.join_lines(bicep.by_name(decls, "output")["containerToml"].body)
    return tomllib.loads("\n".join(bicep.interpolate(line, values) for line in lines))


def test_the_container_toml_output_names_the_registry_identity_and_images(
        main_text: str) -> None:
    """containerToml: a [registries.acr] with the login server and the pool identity, the
    transcode handler and the blender profile in the prefetched images, from that
    registry, in the task working directory, with the built-in blender command."""
    from handlers.render import BLENDER

    toml = container_toml(main_text)
    registries = toml["registries"]
    assert registries == {"acr": {"server": CONTAINER_RUNTIME["registryServer"],
                                  "identity": CONTAINER_RUNTIME["poolIdentity.id"]}}
    handlers = toml["handlers"]
    assert isinstance(handlers, dict)
    transcode, blender = handlers["transcode"], handlers["render"]["profiles"]["blender"]
    assert transcode["container_image"] in container_images(main_text, "cpu-containers")
    assert blender["container_image"] in container_images(main_text, "gpu-containers")
    assert blender["command"] == BLENDER
    for table in (transcode, blender):
        assert table["container_registry"] in registries
        assert table["container_working_directory"] == "taskWorkingDirectory"
    outputs = bicep.by_name(declarations(main_text), "output")
    assert {"registryLoginServer", "poolIdentityId", "cpuContainerPoolName",
            "gpuContainerPoolName", "ffmpegImage", "blenderImage"} <= set(outputs)
    assert outputs["registryLoginServer"].body.endswith(
        "containerPools ? registry.properties.loginServer : ''")


def test_the_container_toml_output_loads_into_settings(main_text: str, tmp_path: Path) -> None:
    """fanoutToml plus containerToml is a configuration fanout accepts, start-up checks
    included (every container_registry names a [registries] table)."""
    text = bicep.fanout_toml(main_text, RUNTIME)
    decls = declarations(main_text)
    values = {**bicep.param_defaults(decls), **CONTAINER_RUNTIME}
    for image in ("ffmpegImage", "blenderImage"):
        values[image] = bicep.interpolate(_var_string(decls, image), values)
    lines = bicep.join_lines(bicep.by_name(decls, "output")["containerToml"].body)
    text += "\n".join(bicep.interpolate(line, values) for line in lines)
    settings = Settings(**tomllib.loads(text))
    assert settings.registries["acr"].identity == CONTAINER_RUNTIME["poolIdentity.id"]
    from worker.app import build_planner, make_storage
    from worker.config import load_settings

    path = tmp_path / "fanout.toml"
    path.write_text(text)
    loaded = load_settings(path, overrides={"home": str(tmp_path / "home")})
    build_planner(loaded, make_storage(loaded))
