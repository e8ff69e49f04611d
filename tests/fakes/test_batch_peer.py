"""Self-tests of the Batch peer's job-monitor rules, through the real azure-batch SDK.

Times come from a :class:`ManualClock` the tests move, so nothing here waits on the
wall clock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.batch.models._models import BatchJobTerminateOptions
from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.pipeline.policies import RetryPolicy
from azure.core.rest import HttpRequest

from tests.fakes.batch_peer import (
    FILE_UPLOAD_FAILURE,
    RESOURCE_FILE_FAILURE,
    TERMINATED_EXIT_CODE,
    BatchPeer,
    ManualClock,
    Runner,
    spec_shape,
    undocumented,
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def peer(clock: ManualClock) -> Iterator[BatchPeer]:
    with BatchPeer(clock=clock) as running:
        running.add_pool("fanout", dedicated={"idle": 2})
        yield running


def client(peer: BatchPeer) -> BatchClient:
    return BatchClient(peer.url, AzureNamedKeyCredential(peer.account, peer.key),
                       retry_policy=RetryPolicy.no_retries())


def make_job(sdk: BatchClient, job_id: str, **kwargs: Any) -> None:
    sdk.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id="fanout"),
                                           **kwargs))


def add(sdk: BatchClient, job_id: str, *tasks: dict[str, Any]) -> list[m.BatchTaskCreateResult]:
    values = [m.BatchTaskCreateOptions({"commandLine": "true", **t}) for t in tasks]
    result = sdk.create_task_collection(job_id, m.BatchTaskGroup(task_values=values))
    return list(result.result_values or [])


def terminate(sdk: BatchClient, job_id: str) -> int:
    """POST terminate without a body (the SDK's own call cannot build one without a
    reason), signed by the SDK's pipeline; returns the status and raises on an error."""
    answer = sdk.send_request(HttpRequest("POST", f"/jobs/{job_id}/terminate",
                                          params={"api-version": "2025-06-01"}))
    answer.raise_for_status()
    return answer.status_code


def raw_tasks(sdk: BatchClient, job_id: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    return {t.id: t.as_dict() for t in sdk.list_tasks(job_id, **kwargs)}


def execution(job: m.BatchJob) -> m.BatchJobExecutionInfo:
    """The job's executionInfo, which the service always reports."""
    assert job.execution_info is not None, f"job {job.id} has no executionInfo"
    return job.execution_info


def error_code(err: pytest.ExceptionInfo[HttpResponseError]) -> str | None:
    return err.value.error.code if err.value.error is not None else None


# -- runner mode, executionInfo and failureInfo ----------------------------------------


def test_runner_moves_tasks_with_chosen_exit_codes(peer: BatchPeer, clock: ManualClock) -> None:
    """Runnable tasks go running after the delay and complete after another, with the
    exit code the test chose; executionInfo is as the service reports it."""
    peer.set_runner(Runner(delay=10, exit_codes={"bad": 3}))
    sdk = client(peer)
    make_job(sdk, "j")
    add(sdk, "j", {"id": "good"}, {"id": "bad"})
    assert {t["state"] for t in raw_tasks(sdk, "j").values()} == {"active"}
    clock.advance(10)
    assert {t["state"] for t in raw_tasks(sdk, "j").values()} == {"running"}
    clock.advance(10)
    tasks = raw_tasks(sdk, "j")
    good, bad = tasks["good"]["executionInfo"], tasks["bad"]["executionInfo"]
    assert (good["exitCode"], good["result"], "failureInfo" in good) == (0, "success", False)
    assert (bad["exitCode"], bad["result"], bad["retryCount"]) == (3, "failure", 0)
    assert bad["failureInfo"]["code"] == "FailureExitCode"
    assert bad["failureInfo"]["category"] == "usererror"
    assert good["endTime"] > good["startTime"]
    counts = sdk.get_job_task_counts("j").task_counts
    assert (counts.completed, counts.succeeded, counts.failed) == (2, 1, 1)


def test_runner_failure_kinds(peer: BatchPeer, clock: ManualClock) -> None:
    """Resource file, file upload and wall clock failures carry the service's codes; a
    task whose maxWallClockTime is shorter than its run is killed at it."""
    peer.set_runner(Runner(delay=5, exit_codes={"up": 0},
                           failures={"res": "resource_file", "up": "file_upload",
                                     "wall": "wall_clock"}))
    sdk = client(peer)
    make_job(sdk, "j")
    add(sdk, "j", {"id": "res"}, {"id": "up"}, {"id": "wall"},
        {"id": "short", "constraints": {"maxWallClockTime": "PT2S"}})
    clock.advance(10)
    info = {k: t["executionInfo"] for k, t in raw_tasks(sdk, "j").items()}
    assert "exitCode" not in info["res"]
    assert info["res"]["failureInfo"]["code"] == RESOURCE_FILE_FAILURE
    assert (info["up"]["exitCode"], info["up"]["failureInfo"]["code"]) == (0, FILE_UPLOAD_FAILURE)
    for task_id in ("wall", "short"):
        assert info[task_id]["exitCode"] == TERMINATED_EXIT_CODE
        assert info[task_id]["failureInfo"]["code"] == "TaskEnded"
    assert info["short"]["endTime"] < info["up"]["endTime"]  # killed after 2 s, not 5
    assert {i["result"] for i in info.values()} == {"failure"}


def test_runner_retries_nonzero_exit_up_to_max_retry_count(peer: BatchPeer,
                                                           clock: ManualClock) -> None:
    """A non-zero exit is retried maxTaskRetryCount times; retryCount says so."""
    peer.set_runner(Runner(delay=1, exit_codes=lambda task_id: 2))
    sdk = client(peer)
    make_job(sdk, "j")
    add(sdk, "j", {"id": "t", "constraints": {"maxTaskRetryCount": 2}})
    clock.advance(3)
    assert raw_tasks(sdk, "j")["t"]["state"] == "running"
    clock.advance(1)
    info = raw_tasks(sdk, "j")["t"]["executionInfo"]
    assert (info["retryCount"], info["exitCode"], info["result"]) == (2, 2, "failure")


def test_manual_set_task_state_still_works(peer: BatchPeer) -> None:
    """Without a runner tasks move only by hand, and get executionInfo when they do."""
    sdk = client(peer)
    make_job(sdk, "j")
    add(sdk, "j", {"id": "t"})
    peer.set_task_state("j", "t", "running")
    assert raw_tasks(sdk, "j")["t"]["state"] == "running"
    peer.set_task_state("j", "t", "completed", exit_code=4)
    info = raw_tasks(sdk, "j")["t"]["executionInfo"]
    assert (info["exitCode"], info["failureInfo"]["code"]) == (4, "FailureExitCode")


# -- exit conditions and dependencies ---------------------------------------------------


def test_default_dependency_action_blocks_on_failure(peer: BatchPeer, clock: ManualClock) -> None:
    """A failed dependency blocks its dependents for ever; a succeeded one lets them run;
    exit conditions can make a failure satisfy; ranges cover integer ids only."""
    peer.set_runner(Runner(delay=1, exit_codes={"1": 1, "2": 1, "bad": 1}))
    sdk = client(peer)
    make_job(sdk, "j", uses_task_dependencies=True)
    satisfy = {"exitCodes": [{"code": 1, "exitOptions": {"dependencyAction": "satisfy"}}]}
    add(sdk, "j", {"id": "ok"}, {"id": "bad"}, {"id": "1", "exitConditions": satisfy},
        {"id": "2"}, {"id": "03"},
        {"id": "after-ok", "dependsOn": {"taskIds": ["ok"]}},
        {"id": "after-bad", "dependsOn": {"taskIds": ["bad"]}},
        {"id": "after-1", "dependsOn": {"taskIdRanges": [{"start": 1, "end": 1}]}},
        {"id": "after-2", "dependsOn": {"taskIdRanges": [{"start": 2, "end": 3}]}},
        {"id": "after-3", "dependsOn": {"taskIdRanges": [{"start": 3, "end": 3}]}})
    clock.advance(60)
    states = {k: t["state"] for k, t in raw_tasks(sdk, "j").items()}
    assert states["after-ok"] == states["after-1"] == states["after-3"] == "completed"
    assert states["after-bad"] == states["after-2"] == "active"


def test_exit_option_validation_per_task(peer: BatchPeer) -> None:
    """dependencyAction needs usesTaskDependencies, jobAction needs onTaskFailure
    performexitoptionsjobaction: otherwise 400 InvalidPropertyValue for that task."""
    sdk = client(peer)
    make_job(sdk, "plain")
    results = add(sdk, "plain",
                  {"id": "dep", "exitConditions": {"default": {"dependencyAction": "satisfy"}}},
                  {"id": "act", "exitConditions": {"default": {"jobAction": "terminate"}}},
                  {"id": "fine", "exitConditions": {"exitCodes": []}})
    errors = {r.task_id: r.error.code for r in results if r.error is not None}
    assert errors == {"dep": "InvalidPropertyValue", "act": "InvalidPropertyValue"}
    assert [t["id"] for t in peer.tasks("plain")] == ["fine"]
    make_job(sdk, "acts", task_failure_mode="performexitoptionsjobaction",
             uses_task_dependencies=True)
    results = add(sdk, "acts", {"id": "both", "exitConditions": {
        "default": {"jobAction": "none", "dependencyAction": "block"}}})
    assert [r.error for r in results] == [None]


def test_job_action_terminate_on_failed_task(peer: BatchPeer, clock: ManualClock) -> None:
    """On a job with performexitoptionsjobaction a failed task terminates the job
    (default jobAction terminate) with terminateReason TaskFailed; jobAction none
    does not."""
    peer.set_runner(Runner(delay=1, exit_codes={"soft": 1, "hard": 1}))
    sdk = client(peer)
    make_job(sdk, "j", task_failure_mode="performexitoptionsjobaction")
    add(sdk, "j", {"id": "soft", "exitConditions": {"default": {"jobAction": "none"}}})
    clock.advance(5)
    assert sdk.get_job("j").state == "active"
    add(sdk, "j", {"id": "hard"}, {"id": "never", "constraints": {"maxWallClockTime": "PT1H"}})
    peer.set_runner(Runner(delay=1, exit_codes={"hard": 1}, failures={}))
    peer.set_task_state("j", "never", "running")
    clock.advance(2)
    job = sdk.get_job("j")
    assert (job.state, execution(job).termination_reason) == ("completed", "TaskFailed")


# -- terminate, delete, wall clock, all tasks complete ---------------------------------


def test_terminate_ends_running_tasks_and_leaves_active_ones(peer: BatchPeer) -> None:
    """Terminate: running tasks end with TaskEnded, active ones stay active; the reason
    defaults to UserTerminate; terminating a completed job is 409 JobCompleted."""
    sdk = client(peer)
    make_job(sdk, "j")
    add(sdk, "j", {"id": "run"}, {"id": "wait"})
    peer.set_task_state("j", "run", "running")
    assert terminate(sdk, "j") == 202
    job = sdk.get_job("j")
    assert (job.state, execution(job).termination_reason) == ("completed", "UserTerminate")
    assert execution(job).end_time is not None
    tasks = raw_tasks(sdk, "j")
    assert tasks["wait"]["state"] == "active"
    ended = tasks["run"]["executionInfo"]
    assert (tasks["run"]["state"], ended["failureInfo"]["code"]) == ("completed", "TaskEnded")
    with pytest.raises(HttpResponseError) as again:
        sdk.begin_terminate_job("j", BatchJobTerminateOptions(termination_reason="again"),
                                polling_interval=0)
    assert (again.value.status_code, error_code(again)) == (409, "JobCompleted")
    assert peer.requests["terminate_job", "ok"] == 1


def test_terminate_reason_and_terminating_state(clock: ManualClock) -> None:
    """A given reason is kept; with terminate_delay the job reads terminating first."""
    with BatchPeer(clock=clock, terminate_delay=30) as peer:
        peer.add_pool("fanout")
        sdk = client(peer)
        make_job(sdk, "j")
        sdk._terminate_job_internal(  # noqa: SLF001 - one request, no polling
            "j", BatchJobTerminateOptions(termination_reason="FanoutCancelled"))
        assert sdk.get_job("j").state == "terminating"
        with pytest.raises(HttpResponseError) as busy:
            terminate(sdk, "j")
        assert busy.value.status_code == 409
        assert "JobBeingTerminated" in str(busy.value)
        clock.advance(30)
        job = sdk.get_job("j")
        assert (job.state, execution(job).termination_reason) == (
            "completed", "FanoutCancelled")


def test_delete_job(clock: ManualClock) -> None:
    """Delete answers 202, the job is deleting for delete_delay, then 404 JobNotFound."""
    with BatchPeer(clock=clock, delete_delay=5) as peer:
        peer.add_pool("fanout")
        sdk = client(peer)
        make_job(sdk, "j")
        sdk._delete_job_internal("j")  # noqa: SLF001 - one request, no polling
        assert sdk.get_job("j").state == "deleting"
        with pytest.raises(HttpResponseError) as busy:
            sdk.update_job("j", m.BatchJobUpdateOptions(priority=5))
        assert error_code(busy) == "JobBeingDeleted"
        clock.advance(5)
        with pytest.raises(ResourceNotFoundError) as gone:
            sdk.get_job("j")
        assert error_code(gone) == "JobNotFound"
        with pytest.raises(ResourceNotFoundError):
            sdk._delete_job_internal("j")  # noqa: SLF001
    assert peer.requests["delete_job", "ok"] == 1


def test_job_max_wall_clock_and_all_tasks_complete(peer: BatchPeer, clock: ManualClock) -> None:
    """A job past its maxWallClockTime is terminated (MaxWallClockTimeExpiry); a sealed
    job whose tasks all completed ends with AllTasksComplete."""
    sdk = client(peer)
    make_job(sdk, "slow", constraints=m.BatchJobConstraints(
        max_wall_clock_time=timedelta(minutes=5)))
    make_job(sdk, "done")
    add(sdk, "done", {"id": "t"})
    sdk.update_job("done", m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
    clock.advance(299)
    assert sdk.get_job("slow").state == "active"
    peer.set_task_state("done", "t", "completed")
    clock.advance(1)
    reasons = {j.id: (j.state, execution(j).termination_reason) for j in sdk.list_jobs()}
    assert reasons == {"slow": ("completed", "MaxWallClockTimeExpiry"),
                       "done": ("completed", "AllTasksComplete")}


# -- job updates ---------------------------------------------------------------------


def test_patch_replaces_metadata_and_keeps_the_rest(peer: BatchPeer) -> None:
    """PATCH metadata replaces the list and leaves omitted properties; on a completed job
    metadata may change, other properties may not (409); terminatejob cannot go back to
    noaction (400); a stale If-Match is 412 ConditionNotMet."""
    sdk = client(peer)
    make_job(sdk, "j", priority=7, metadata=[m.BatchMetadataItem(name="a", value="1"),
                                             m.BatchMetadataItem(name="b", value="2")])
    sdk.update_job("j", m.BatchJobUpdateOptions(metadata=[m.BatchMetadataItem(name="c",
                                                                               value="3")]))
    job = sdk.get_job("j")
    assert ([(i.name, i.value) for i in job.metadata or []], job.priority) == ([("c", "3")], 7)
    stale = job.etag
    sdk.update_job("j", m.BatchJobUpdateOptions(priority=8))
    with pytest.raises(HttpResponseError) as condition:
        sdk.update_job("j", m.BatchJobUpdateOptions(priority=9), etag=stale,
                       match_condition=MatchConditions.IfNotModified)
    assert (condition.value.status_code, error_code(condition)) == (412, "ConditionNotMet")
    sdk.update_job("j", m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
    with pytest.raises(HttpResponseError) as back:
        sdk.update_job("j", m.BatchJobUpdateOptions(all_tasks_complete_mode="noaction"))
    assert (back.value.status_code, error_code(back)) == (400, "InvalidPropertyValue")
    assert sdk.get_job("j").state == "completed"  # no tasks: complete at once
    sdk.update_job("j", m.BatchJobUpdateOptions(metadata=[m.BatchMetadataItem(name="done",
                                                                               value="y")]))
    assert [i.name for i in sdk.get_job("j").metadata or []] == ["done"]
    with pytest.raises(HttpResponseError) as completed:
        sdk.update_job("j", m.BatchJobUpdateOptions(priority=1))
    assert (completed.value.status_code, error_code(completed)) == (409, "JobCompleted")


# -- listings ------------------------------------------------------------------------


def test_list_tasks_filter_select_and_paging(peer: BatchPeer) -> None:
    """$filter on state, executionInfo/result and exitCode with and/or/parentheses,
    $select of top-level properties, maxresults paging; bad filters are 400."""
    sdk = client(peer)
    make_job(sdk, "j")
    add(sdk, "j", *({"id": f"t{i}"} for i in range(6)))
    for task_id, code in (("t0", 0), ("t1", 1), ("t2", 2)):
        peer.set_task_state("j", task_id, "completed", exit_code=code)
    peer.set_task_state("j", "t3", "running")
    failed = sdk.list_tasks("j", filter="state eq 'completed' and executionInfo/result eq "
                            "'failure'", select=["id", "executionInfo"])
    assert sorted(t.id for t in failed) == ["t1", "t2"]
    either = raw_tasks(sdk, "j", filter="(executionInfo/exitCode gt 1) or state eq 'running'",
                       select=["id"])
    assert (sorted(either), set(either["t2"])) == (["t2", "t3"], {"id"})
    assert sorted(raw_tasks(sdk, "j", filter="startswith(id, 'T')")) == [
        f"t{i}" for i in range(6)]  # property values compare case-insensitively
    before = peer.requests["list_tasks", "ok"]
    assert len(list(sdk.list_tasks("j", max_results=4))) == 6
    assert peer.requests["list_tasks", "ok"] == before + 2
    for bad in ("commandLine eq 'true'", "state gt 'active'", "executionInfo/exitCode eq '1'",
                "state eq 'active' xor id eq 't1'"):
        with pytest.raises(HttpResponseError) as refused:
            list(sdk.list_tasks("j", filter=bad))
        assert (refused.value.status_code, error_code(refused)) == (
            400, "InvalidQueryParameterValue"), bad
    with pytest.raises(HttpResponseError) as too_many:
        list(sdk.list_tasks("j", max_results=1001))
    assert too_many.value.status_code == 400


def test_list_jobs_filter(peer: BatchPeer, clock: ManualClock) -> None:
    """List jobs filters id (startswith), state (eq/ne) and times with DateTime'...'
    literals (W3C-DTF or RFC 1123); a bare timestamp is 400."""
    sdk = client(peer)
    make_job(sdk, "fan-1")
    clock.advance(60)
    cut = clock.now
    make_job(sdk, "fan-2")
    make_job(sdk, "other")
    terminate(sdk, "fan-2")

    def ids(text: str) -> list[str]:
        return sorted(j.id for j in sdk.list_jobs(filter=text, select=["id"]))

    stamp = cut.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids("startswith(id, 'fan-') and state ne 'completed'") == ["fan-1"]
    assert ids(f"creationTime ge DateTime'{stamp}'") == ["fan-2", "other"]
    rfc = cut.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert ids(f"creationTime lt DateTime'{rfc}' or id eq 'OTHER'") == ["fan-1", "other"]
    assert ids(f"state eq 'completed' and executionInfo/endTime ge DateTime'{stamp}'") == [
        "fan-2"]
    for bad in (f"creationTime ge {stamp}", f"creationTime ge '{stamp}'", "metadata eq 'x'"):
        with pytest.raises(HttpResponseError) as refused:
            list(sdk.list_jobs(filter=bad))
        assert error_code(refused) == "InvalidQueryParameterValue", bad


# -- counts, bulk seeding, counters --------------------------------------------------


def test_task_counts_lag_the_task_states(clock: ManualClock) -> None:
    """With counts_lag the counts show the states of that many seconds ago, so a job
    can read completed before its counts settle."""
    with BatchPeer(clock=clock, counts_lag=10) as peer:
        peer.add_pool("fanout")
        sdk = client(peer)
        make_job(sdk, "j")
        add(sdk, "j", {"id": "t"})
        sdk.update_job("j", m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
        clock.advance(10)
        peer.set_task_state("j", "t", "completed")
        assert sdk.get_job("j").state == "completed"
        counts = sdk.get_job_task_counts("j").task_counts
        assert (counts.active, counts.completed) == (1, 0)
        clock.advance(10)
        counts = sdk.get_job_task_counts("j").task_counts
        assert (counts.active, counts.succeeded) == (0, 1)


def test_seeded_jobs_are_cheap_and_answer_counts(peer: BatchPeer) -> None:
    """seed_job makes 200 jobs of 10,000 tasks without bodies; counts, listings and
    terminate work on them; per-operation request counters count the calls."""
    for i in range(200):
        peer.seed_job(f"seed-{i}", tasks=10_000, metadata={"fanout-handler": "sweep"})
    peer.seed_job("mixed", counts={"active": 3, "running": 2, "succeeded": 4, "failed": 1})
    peer.seed_job("old", tasks=5, state="completed")
    sdk = client(peer)
    counts = sdk.get_job_task_counts("seed-7").task_counts
    assert (counts.active, counts.running, counts.completed) == (10_000, 0, 0)
    job = sdk.get_job("seed-7")
    assert [(i.name, i.value) for i in job.metadata or []] == [("fanout-handler", "sweep")]
    assert execution(sdk.get_job("old")).termination_reason == "AllTasksComplete"
    failed = list(sdk.list_tasks("mixed", filter="executionInfo/result eq 'failure'"))
    assert [t.id for t in failed] == ["seed9"]
    terminate(sdk, "mixed")
    counts = sdk.get_job_task_counts("mixed").task_counts
    assert (counts.active, counts.running, counts.failed) == (3, 0, 3)
    assert len(list(sdk.list_jobs(filter="state eq 'active'", select=["id"]))) == 200
    assert peer.requests["get_task_counts", "ok"] == 2
    assert peer.requests["list_jobs", "ok"] == 1
    assert peer.requests["terminate_job", "ok"] == 1
    assert peer.requests["list_tasks", "ok"] == 1


# -- the spec's rules ----------------------------------------------------------------


def raw(peer: BatchPeer, method: str, url: str, body: Any) -> tuple[int, dict[str, Any]]:
    """A request with a hand-made JSON body (the SDK's models cannot send unknown names)."""
    request = HttpRequest(method, f"{peer.url}{url}?api-version=2025-06-01", json=body,
                          headers={"Content-Type": "application/json; odata=minimalmetadata"})
    try:
        response = client(peer).send_request(request)
    except HttpResponseError as err:  # BatchClient.send_request raises on an error answer
        assert err.status_code is not None and err.response is not None
        return err.status_code, json.loads(err.response.text())
    return response.status_code, (response.json() if response.content else {})


def reason(answer: dict[str, Any]) -> str:
    return next((v["value"] for v in answer.get("values") or [] if v["key"] == "Reason"), "")


def test_property_tables_come_from_the_sdk_models() -> None:
    """The allowed names are the REST names the generated models carry: a body the SDK
    builds from its own models has no undocumented property, an added one has."""
    assert {"containerSettings", "dependsOn", "exitConditions", "requiredSlots"} <= set(
        spec_shape("BatchTaskCreateOptions"))
    assert spec_shape("BatchTaskCreateOptions")["resourceFiles"] == "ResourceFile"
    assert set(spec_shape("BatchTaskContainerSettings")) >= {"imageName", "containerRunOptions"}
    assert "nodeAgentSKUId" in spec_shape("VirtualMachineConfiguration")
    task = m.BatchTaskCreateOptions(
        id="t", command_line="true",
        resource_files=[m.ResourceFile(http_url="https://x/y", file_path="y")],
        environment_settings=[m.EnvironmentSetting(name="A", value="1")],
        container_settings=m.BatchTaskContainerSettings(image_name="img"),
        constraints=m.BatchTaskConstraints(max_task_retry_count=1),
        depends_on=m.BatchTaskDependencies(task_ids=["a"]),
        exit_conditions=m.ExitConditions(default=m.ExitOptions(dependency_action="block")))
    body = task.as_dict()
    assert undocumented(body, "BatchTaskCreateOptions") == []
    body["containerSettings"]["ImageName"] = "img"
    body["bogus"] = 1
    assert undocumented(body, "BatchTaskCreateOptions") == ["containerSettings.ImageName",
                                                            "bogus"]


@pytest.mark.parametrize("task", [
    {"id": "t", "CommandLine": "true"},
    {"id": "t", "commandLine": "true", "resourceFiles": [{"httpUrl": "u", "filepath": "f"}]},
    {"id": "t", "commandLine": "true", "outputFiles": [{"filePattern": "*", "uploadOptions": {
        "uploadCondition": "taskcompletion"}, "destination": {"container": {
            "containerUrl": "u", "Path": "p"}}}]},
    {"id": "t", "commandLine": "true", "constraints": {"maxWallclockTime": "PT1M"}},
    {"id": "t", "commandLine": "true", "exitConditions": {"Default": {}}},
    {"id": "t", "commandLine": "true", "containerSettings": {"imageName": "i", "image": "i"}},
    {"id": "t", "commandLine": "true", "environmentSettings": [{"Name": "A", "value": "1"}]},
    {"id": "t", "commandLine": "true", "dependsOn": {"taskids": ["a"]}},
])
def test_unknown_or_miscased_task_properties_are_400(peer: BatchPeer,
                                                     task: dict[str, Any]) -> None:
    """An unknown or mis-cased name anywhere in a task refuses the whole request with
    400 InvalidRequestBody naming it; the same task spelled right is added."""
    make_job(client(peer), "j")
    status, answer = raw(peer, "POST", "/jobs/j/addtaskcollection", {"value": [task]})
    assert (status, answer["code"]) == (400, "InvalidRequestBody")
    assert answer["message"]["value"] == "The specified Request Body is not syntactically valid."
    assert "does not exist on type" in reason(answer)
    assert peer.tasks("j") == [] and peer.add_requests == []


def test_unknown_property_in_the_hundredth_task_is_named(peer: BatchPeer) -> None:
    """A misspelt environment setting in the last of 100 tasks refuses the request,
    and the reason names its path; none of the 100 is added."""
    make_job(client(peer), "j")
    settings: list[dict[str, str]] = [{"name": "A", "value": "1"}, {"name": "B", "Value": "2"}]
    tasks = [{"id": f"t{i}", "commandLine": "true",
              "environmentSettings": settings if i == 99 else settings[:1]}
             for i in range(100)]
    status, answer = raw(peer, "POST", "/jobs/j/addtaskcollection", {"value": tasks})
    assert (status, answer["code"]) == (400, "InvalidRequestBody")
    assert "'value[99].environmentSettings[1].Value'" in reason(answer)
    assert peer.tasks("j") == []


def test_tasks_of_one_request_share_its_time_and_not_their_etags(
        peer: BatchPeer, clock: ManualClock) -> None:
    """Tasks added in one request have its creation and lastModified time, each its own
    ETag (and none the job's); the task counts' history gains one entry a request."""
    sdk = client(peer)
    make_job(sdk, "j")
    first = add(sdk, "j", *({"id": f"a{i}"} for i in range(5)))
    clock.advance(1)
    second = add(sdk, "j", {"id": "b"})
    assert len({r.last_modified for r in first}) == 1
    stamp = first[0].last_modified
    assert stamp is not None and second[0].last_modified == stamp + timedelta(seconds=1)
    etags = {r.etag for r in first + second}
    job = peer.job("j")
    assert job is not None and len(etags) == 6 and job.etag not in etags
    created = {t["id"]: t["creationTime"] for t in raw_tasks(sdk, "j").values()}
    assert len({created[f"a{i}"] for i in range(5)}) == 1 and created["b"] != created["a0"]
    assert [counts["active"] for _, counts, _ in job.history[-2:]] == [5, 6]


def test_unknown_job_properties_are_400(peer: BatchPeer) -> None:
    """Job create, update and terminate bodies are held to their models as well."""
    status, answer = raw(peer, "POST", "/jobs", {"id": "j", "poolInfo": {"poolID": "fanout"}})
    assert (status, answer["code"]) == (400, "InvalidRequestBody")
    assert "poolInfo.poolID" in reason(answer) and peer.jobs() == []
    assert raw(peer, "POST", "/jobs", {"id": "j", "poolInfo": {"poolId": "fanout"}})[0] == 201
    status, answer = raw(peer, "PATCH", "/jobs/j", {"onAllTaskComplete": "terminatejob"})
    assert (status, answer["code"]) == (400, "InvalidRequestBody")
    status, answer = raw(peer, "POST", "/jobs/j/terminate", {"reason": "x"})
    assert (status, answer["code"]) == (400, "InvalidRequestBody")
    assert peer.jobs()[0].state == "active"


def test_a_job_for_a_missing_pool_is_accepted_and_its_tasks_wait(peer: BatchPeer,
                                                                 clock: ManualClock) -> None:
    """BatchPoolInfo.poolId: the service does not reject the job; its tasks do not run
    until the pool exists."""
    sdk = client(peer)
    sdk.create_job(m.BatchJobCreateOptions(id="j", pool_info=m.BatchPoolInfo(pool_id="later")))
    add(sdk, "j", {"id": "a"})
    peer.set_runner(Runner(delay=1))
    clock.advance(60)
    assert peer.task("j", "a").state == "active"
    peer.add_pool("later")
    clock.advance(1.5)
    assert peer.task("j", "a").state == "running"
    clock.advance(1)
    assert peer.task("j", "a").result == "success"


def test_container_pools_and_mismatched_tasks(peer: BatchPeer, clock: ManualClock) -> None:
    """A pool's containerConfiguration is in get_pool; a task without containerSettings
    on a container pool, or with them on another pool, is added and fails when
    scheduled (ContainerTaskSettingsNotFound, ContainerInvalidSettings)."""
    peer.add_pool("docker", container_images=["repo/img:1"])
    sdk = client(peer)
    pool = sdk.get_pool("docker")
    config = pool.virtual_machine_configuration
    assert config is not None and config.container_configuration is not None
    assert config.container_configuration.container_image_names == ["repo/img:1"]
    plain = sdk.get_pool("fanout").virtual_machine_configuration
    assert plain is not None and plain.container_configuration is None
    sdk.create_job(m.BatchJobCreateOptions(id="c", pool_info=m.BatchPoolInfo(pool_id="docker")))
    image = {"containerSettings": {"imageName": "repo/img:1"}}
    add(sdk, "c", {"id": "bare"}, {"id": "boxed", **image})
    make_job(sdk, "p")
    add(sdk, "p", {"id": "bare"}, {"id": "boxed", **image})
    peer.set_runner(Runner(delay=1))
    clock.advance(3)
    codes = {(job, task): (peer.task(job, task).result,
                           (peer.task(job, task).failure_info or {}).get("code"))
             for job in ("c", "p") for task in ("bare", "boxed")}
    assert codes == {("c", "bare"): ("failure", "ContainerTaskSettingsNotFound"),
                     ("c", "boxed"): ("success", None),
                     ("p", "bare"): ("success", None),
                     ("p", "boxed"): ("failure", "ContainerInvalidSettings")}
    assert peer.task_json("c", "bare")["executionInfo"]["failureInfo"]["category"] == "usererror"


def test_request_bodies_must_be_under_1_mb(clock: ManualClock) -> None:
    """1,048,576 bytes is too large (413 RequestBodyTooLarge), one byte less is read."""
    with BatchPeer(clock=clock) as peer:
        peer.add_pool("fanout")
        make_job(client(peer), "j")
        for size, status in ((1024 * 1024, 413), (1024 * 1024 - 1, 200)):
            head = b'{"value":[{"id":"t","commandLine":"'
            tail = b'"}]}'
            body = head + b"x" * (size - len(head) - len(tail)) + tail
            assert len(body) == size
            request = HttpRequest("POST", f"{peer.url}/jobs/j/addtaskcollection"
                                  "?api-version=2025-06-01", content=body,
                                  headers={"Content-Type": "application/json"})
            if status == 413:
                with pytest.raises(HttpResponseError) as large:
                    client(peer).send_request(request)
                assert large.value.status_code == 413 and error_code(large) == (
                    "RequestBodyTooLarge")
            else:
                assert client(peer).send_request(request).status_code == status


def test_dependency_list_limit_is_64000_characters(peer: BatchPeer) -> None:
    """taskIds "limited to 64000 characters total": 64,000 is accepted, 64,001 not."""
    sdk = client(peer)
    make_job(sdk, "j", uses_task_dependencies=True)
    ids = ["a" * 64] * 1000  # 64,000 characters
    ok, long = add(sdk, "j", {"id": "ok", "dependsOn": {"taskIds": ids}},
                   {"id": "long", "dependsOn": {"taskIds": [*ids, "b"]}})
    results = {r.task_id: r for r in (ok, long)}
    assert results["ok"].status == "success"
    assert results["long"].error is not None
    assert results["long"].error.code == "TaskDependencyListTooLong"


@pytest.mark.parametrize(("resource", "code"), [
    ({"filePath": "f"}, "MissingRequiredProperty"),
    ({"httpUrl": "https://x/f"}, "MissingRequiredProperty"),
    ({"httpUrl": "https://x/f", "storageContainerUrl": "https://x/c", "filePath": "f"},
     "InvalidPropertyValue"),
    ({"storageContainerUrl": "https://x/c", "autoStorageContainerName": "c"},
     "InvalidPropertyValue"),
    ({"httpUrl": "https://x/f", "filePath": "f", "blobPrefix": "p"}, "InvalidPropertyValue"),
    ({"storageContainerUrl": "https://x/c"}, None),
    ({"autoStorageContainerName": "c", "blobPrefix": "p", "filePath": "d"}, None),
    ({"httpUrl": "https://x/f", "filePath": "f"}, None),
])
def test_resource_files_take_one_source(peer: BatchPeer, resource: dict[str, str],
                                        code: str | None) -> None:
    """Exactly one of httpUrl, storageContainerUrl, autoStorageContainerName; filePath
    with httpUrl; blobPrefix only with a container."""
    make_job(client(peer), "j")
    status, answer = raw(peer, "POST", "/jobs/j/addtaskcollection", {"value": [
        {"id": "t", "commandLine": "true", "resourceFiles": [resource]}]})
    assert (status, answer.get("code")) == ((200, None) if code is None else (400, code))
    assert len(peer.tasks("j")) == (1 if code is None else 0)


def test_a_completed_job_refuses_adds_and_a_second_seal(peer: BatchPeer) -> None:
    """Adding to or sealing a completed job is 409 JobCompleted (the seal even though
    the job already has terminatejob); its metadata may still change."""
    sdk = client(peer)
    make_job(sdk, "j")
    add(sdk, "j", {"id": "a"})
    sdk.update_job("j", m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
    peer.set_task_state("j", "a", "completed")
    assert sdk.get_job("j").state == "completed"
    with pytest.raises(HttpResponseError) as sealed:
        sdk.update_job("j", m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
    assert (sealed.value.status_code, error_code(sealed)) == (409, "JobCompleted")
    with pytest.raises(HttpResponseError) as added:
        add(sdk, "j", {"id": "b"})
    assert (added.value.status_code, error_code(added)) == (409, "JobCompleted")
    sdk.update_job("j", m.BatchJobUpdateOptions(metadata=[m.BatchMetadataItem(name="k",
                                                                               value="v")]))


def test_every_answer_has_only_documented_properties(peer: BatchPeer,
                                                     clock: ManualClock) -> None:
    """Jobs, tasks (with their executionInfo and failureInfo), pools, counts, pages and
    errors as the peer answers them hold only the spec's names; a name the spec lacks
    is recorded."""
    sdk = client(peer)
    peer.add_pool("docker", container_images=["i"])
    make_job(sdk, "j", metadata=[m.BatchMetadataItem(name="a", value="1")],
             uses_task_dependencies=True)
    add(sdk, "j", {"id": "1", "resourceFiles": [{"httpUrl": "https://x/f", "filePath": "f"}]},
        {"id": "2", "dependsOn": {"taskIds": ["1"]}}, {"id": "1"})
    peer.set_task_state("j", "1", "completed", exit_code=3)
    peer.set_task_state("j", "2", "running")
    list(sdk.list_jobs())
    list(sdk.list_tasks("j"))
    sdk.get_task("j", "1")
    sdk.get_job_task_counts("j")
    sdk.get_pool("docker")
    list(sdk.list_pool_node_counts())
    terminate(sdk, "j")
    sdk.get_job("j")
    with pytest.raises(ResourceNotFoundError):
        sdk.get_job("nope")
    assert len(peer.log) >= 11 and peer.undocumented == []
    original = peer._job_json
    peer._job_json = lambda job: {**original(job), "secretField": 1}  # type: ignore[method-assign]
    sdk.get_job("j")
    assert peer.undocumented == [("get_job", "secretField")]
