"""Tests for the Azure Batch peer itself, through the SDK's own operations: that it
speaks the dialect of azure-batch 15.x and enforces the service's rules."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.batch._patch import BatchSharedKeyAuthPolicy
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ServiceResponseError
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.policies import RetryPolicy
from azure.core.rest import HttpRequest, HttpResponse

from tests.fakes.batch_peer import BatchPeer, FaultPlan, shared_key_signature

MakePeer = Callable[..., BatchPeer]  # the make_peer fixture (conftest.py)


def client(peer: BatchPeer, key: str | None = None) -> BatchClient:
    """The real SDK client on the peer, its retries off so each call is one request."""
    return BatchClient(peer.url, AzureNamedKeyCredential(peer.account, key or peer.key),
                       retry_policy=RetryPolicy.no_retries())


def new_job(job_id: str, **kwargs: Any) -> m.BatchJobCreateOptions:
    return m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id="fanout"),
                                   **kwargs)


def new_tasks(n: int, prefix: str = "t") -> list[m.BatchTaskCreateOptions]:
    return [m.BatchTaskCreateOptions(id=f"{prefix}{i}", command_line="true") for i in range(n)]


def test_signature_matches_the_sdk_policy(peer: BatchPeer) -> None:
    """The peer's string-to-sign gives the signature the SDK's policy puts on a request."""
    request = HttpRequest("PATCH", f"{peer.url}/jobs/j%201?api-version=2025-06-01&$select=id",
                          headers={"Content-Type": "application/json", "ocp-date": "x"},
                          content=b'{"priority":1}')
    policy = BatchSharedKeyAuthPolicy(AzureNamedKeyCredential(peer.account, peer.key))
    policy.on_request(PipelineRequest(request, PipelineContext(None)))
    sent = request.headers["Authorization"].split(":", 1)[1]
    assert sent == shared_key_signature(
        account=peer.account, key=peer.key, method="PATCH", path="/jobs/j%201",
        query="api-version=2025-06-01&%24select=id", headers=request.headers)


def test_sdk_job_and_task_operations(peer: BatchPeer) -> None:
    """Create, get, update and list jobs, add tasks, and read task counts via the SDK."""
    sdk = client(peer)
    sdk.create_job(new_job("j1", uses_task_dependencies=True))
    with pytest.raises(ResourceExistsError) as exists:
        sdk.create_job(new_job("J1"))
    assert exists.value.error is not None and exists.value.error.code == "JobExists"
    sdk.create_tasks("j1", new_tasks(250))  # the SDK chunks to 100 per request itself
    assert [len(ids) for ids in sorted(peer.add_requests, key=len)] == [50, 100, 100]
    result = sdk.create_task_collection("j1", m.BatchTaskGroup(task_values=new_tasks(2)))
    assert sorted((r.task_id, r.error.code) for r in result.result_values or []
                  if r.error is not None) == [("t0", "TaskExists"), ("t1", "TaskExists")]
    peer.set_task_state("j1", "t0", "completed")
    counts = sdk.get_job_task_counts("j1")
    assert (counts.task_counts.active, counts.task_counts.succeeded) == (249, 1)
    sdk.update_job("j1", m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
    job = sdk.get_job("j1")
    assert (job.all_tasks_complete_mode, job.state, job.uses_task_dependencies) == (
        "terminatejob", "active", True)


def test_sdk_lists_follow_next_links(peer: BatchPeer) -> None:
    """``list_jobs`` pages with ``odata.nextLink`` (signed again) and filters by state."""
    sdk = client(peer)
    for i in range(5):
        sdk.create_job(new_job(f"j{i}"))
    sdk.update_job("j0", m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
    assert [j.id for j in sdk.list_jobs(max_results=2)] == [f"j{i}" for i in range(5)]
    assert peer.requests["list_jobs", "ok"] == 3
    active = sdk.list_jobs(filter="state eq 'active'", select=["id"])
    assert [j.id for j in active] == ["j1", "j2", "j3", "j4"]  # j0 had no tasks: completed


def test_sdk_pool_and_node_counts(peer: BatchPeer) -> None:
    """``get_pool`` and ``list_pool_node_counts`` read what the test set."""
    peer.add_pool("gpu", dedicated={"running": 3, "waitingForStartTask": 1},
                  low_priority={"preempted": 2}, target_dedicated=8)
    sdk = client(peer)
    pool = sdk.get_pool("gpu")
    assert (pool.current_dedicated_nodes, pool.target_dedicated_nodes) == (4, 8)
    assert pool.current_low_priority_nodes == 2 and pool.allocation_state == "steady"
    counts = {c.pool_id: c for c in sdk.list_pool_node_counts()}
    assert counts["gpu"].dedicated is not None and counts["gpu"].low_priority is not None
    assert counts["gpu"].dedicated.waiting_for_start_task == 1
    assert counts["gpu"].low_priority.preempted == 2
    with pytest.raises(HttpResponseError) as missing:
        sdk.get_pool("nope")
    assert missing.value.error is not None and missing.value.error.code == "PoolNotFound"


def test_wrong_key_or_no_auth_is_refused(peer: BatchPeer) -> None:
    """A signature made with another key is 403 ``AuthenticationFailed``; none is 401."""
    with pytest.raises(HttpResponseError) as refused:
        client(peer, key="V3Jvbmc=").get_pool("fanout")
    assert refused.value.status_code == 403
    assert refused.value.error is not None and refused.value.error.code == "AuthenticationFailed"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{peer.url}/pools/fanout?api-version=2025-06-01")
    assert anonymous.value.code == 401
    anonymous.value.close()
    assert peer.outcomes["auth_failed"] == 2 and peer.outcomes["ok"] == 0


def test_collection_limits(make_peer: MakePeer) -> None:
    """Over 100 tasks is 400; a body over the byte limit is 413 ``RequestBodyTooLarge``."""
    peer = make_peer(max_body_bytes=10_000)
    sdk = client(peer)
    sdk.create_job(new_job("j"))
    with pytest.raises(HttpResponseError) as many:
        sdk.create_task_collection("j", m.BatchTaskGroup(task_values=new_tasks(101)))
    assert many.value.status_code == 400
    big = [m.BatchTaskCreateOptions(id="big", command_line="x" * 20_000)]
    with pytest.raises(HttpResponseError) as large:
        sdk.create_task_collection("j", m.BatchTaskGroup(task_values=big))
    assert large.value.status_code == 413
    assert large.value.error is not None and large.value.error.code == "RequestBodyTooLarge"
    assert peer.tasks("j") == []


def test_ids_are_validated_and_unique_regardless_of_case(peer: BatchPeer) -> None:
    """Ids must be 1-64 letters, digits, hyphens or underscores; ``T1`` exists as ``t1``."""
    sdk = client(peer)
    with pytest.raises(HttpResponseError) as bad_job:
        sdk.create_job(new_job("x" * 65))
    assert bad_job.value.status_code == 400
    sdk.create_job(new_job("j"))
    sdk.create_task_collection("j", m.BatchTaskGroup(task_values=new_tasks(1)))
    result = sdk.create_task_collection("j", m.BatchTaskGroup(task_values=new_tasks(1, "T")))
    assert [r.error.code for r in result.result_values or [] if r.error] == ["TaskExists"]
    with pytest.raises(HttpResponseError, match="InvalidPropertyValue"):
        sdk.create_task_collection("j", m.BatchTaskGroup(task_values=new_tasks(1, "a.b")))


def test_tasks_cannot_be_added_to_a_completed_job(peer: BatchPeer) -> None:
    """A job set to terminate with every task complete refuses new tasks (409)."""
    sdk = client(peer)
    sdk.create_job(new_job("j", all_tasks_complete_mode="terminatejob"))
    with pytest.raises(ResourceExistsError) as done:
        sdk.create_task_collection("j", m.BatchTaskGroup(task_values=new_tasks(1)))
    assert done.value.error is not None and done.value.error.code == "JobCompleted"


def test_same_seed_same_fault_sequence(make_peer: MakePeer) -> None:
    """Two peers with the same seed answer a sequence of requests the same way."""
    plan = FaultPlan(throttle=0.2, unavailable=0.2, drop=0.1, seed=11)
    runs = []
    for _ in range(2):
        peer = make_peer(faults=plan)
        sdk = client(peer)
        for _ in range(30):
            with contextlib.suppress(HttpResponseError, ServiceResponseError):
                sdk.get_pool("fanout")
        runs.append([outcome for _, outcome in peer.log])
    assert runs[0] == runs[1]
    assert {"ok", "throttled", "unavailable", "dropped"} <= set(runs[0])


def test_throttled_answer_carries_retry_after(peer: BatchPeer) -> None:
    """A throttled request is 429 with the plan's ``Retry-After``."""
    peer.set_faults(FaultPlan(throttle=1.0, retry_after=7))
    with pytest.raises(HttpResponseError) as throttled:
        client(peer).get_pool("fanout")
    assert throttled.value.status_code == 429
    assert isinstance(throttled.value.response, HttpResponse)
    assert throttled.value.response.headers["Retry-After"] == "7"


def test_dropped_after_means_it_took_effect(peer: BatchPeer) -> None:
    """A request dropped after taking effect fails for the client but is in the record."""
    peer.set_faults(FaultPlan(drop_after=1.0, operations=frozenset({"create_job"})))
    with pytest.raises(ServiceResponseError):
        client(peer).create_job(new_job("ghost"))
    assert peer.job("ghost") is not None
    assert peer.requests["create_job", "dropped_after"] == 1


def test_latency_is_added_to_each_answer(peer: BatchPeer) -> None:
    """With a latency set, no answer comes sooner than it."""
    peer.set_faults(FaultPlan(latency=0.05))
    sdk = client(peer)
    started = time.monotonic()
    for _ in range(3):
        sdk.get_pool("fanout")
    assert time.monotonic() - started >= 0.15


def test_record_endpoint_shows_accepted_jobs_and_tasks(peer: BatchPeer) -> None:
    """``GET /_peer/record`` returns the jobs with their tasks as received."""
    sdk = client(peer)
    sdk.create_job(new_job("j"))
    sdk.create_task_collection("j", m.BatchTaskGroup(task_values=new_tasks(2)))
    with urllib.request.urlopen(f"{peer.url}/_peer/record") as answer:
        record = json.load(answer)
    assert [(j["id"], [t["id"] for t in j["tasks"]]) for j in record["jobs"]] == [
        ("j", ["t0", "t1"])]
    assert record["task_outcomes"] == {"added": 2}
