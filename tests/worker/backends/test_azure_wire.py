"""Tests for the Azure Batch backend's JSON shapes and error classification."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from azure.batch import models as m

from handlers.base import (
    SATISFY_DEPENDENTS,
    ContainerSettings,
    ExitConditions,
    ExitOptions,
    JobSpec,
    OutputFile,
    ResourceFile,
    TaskSpec,
)
from worker.backends.azure import wire
from worker.backends.azure.rest import ServiceError, _retry_after, account_name, classify
from worker.backends.base import FAILURE_CATEGORIES, JobRecord
from worker.errors import BatchRejected, ConfigFault, SystemFault


@pytest.mark.parametrize(("value", "expected"), [
    (timedelta(0), "PT0H0M0S"),
    (timedelta(minutes=90), "PT1H30M0S"),
    (timedelta(days=7), "P7DT0H0M0S"),
    (timedelta(days=1, seconds=3.25), "P1DT0H0M3.25S"),
    (timedelta(microseconds=1), "PT0H0M0.000001S"),
])
def test_iso_duration(value: timedelta, expected: str) -> None:
    """Durations are ISO 8601 as Batch reads them, and round-trip through the SDK."""
    assert wire.iso_duration(value) == expected
    parsed = m.BatchTaskConstraints({"maxWallClockTime": expected}).max_wall_clock_time
    assert parsed == value


def test_negative_duration_is_refused() -> None:
    """A negative duration is a programming error, not something to send."""
    with pytest.raises(ValueError, match="negative"):
        wire.iso_duration(timedelta(seconds=-1))


def test_bodies_read_back_as_sdk_models() -> None:
    """The hand-built JSON deserializes into the SDK's own models field for field."""
    task = TaskSpec(id="t1", command_line="run", environment={"K": "V"},
                    resource_files=[ResourceFile(http_url="https://h/x", file_path="x")],
                    output_files=[OutputFile(file_pattern="*.out", container_url="https://h/c",
                                             path="p", upload_condition="failure")],
                    depends_on_ranges=((1, 5),), required_slots=4,
                    container=ContainerSettings("img"))
    model = m.BatchTaskCreateOptions(json.loads(wire.collection_body([task]))["value"][0])
    assert model.environment_settings is not None
    assert model.environment_settings[0].value == "V"
    assert model.output_files is not None
    assert model.output_files[0].upload_options.upload_condition == "taskfailure"
    assert model.depends_on is not None and model.depends_on.task_id_ranges is not None
    assert model.depends_on.task_id_ranges[0].end == 5
    assert model.container_settings is not None and model.container_settings.image_name == "img"
    assert model.required_slots == 4
    job = m.BatchJobCreateOptions(wire.job_body(JobSpec(tasks=[], task_count=0, id="j"), "p"))
    assert (job.all_tasks_complete_mode, job.pool_info.pool_id) == ("noaction", "p")


def test_add_results_in_any_order_and_case() -> None:
    """Results map by task id: success, TaskExists, permanent and transient errors, and
    a task the answer left out is a transient error."""
    tasks = [TaskSpec(id=i, command_line="x") for i in ("a", "b", "c", "d", "e")]
    payload = {"value": [
        {"status": "ClientError", "taskId": "C",
         "error": {"code": "TaskDependencyListTooLong", "message": {"value": "too long"}}},
        {"status": "Success", "taskId": "a"},
        {"status": "clienterror", "taskId": "b", "error": {"code": "TaskExists"}},
        {"status": "serverError", "taskId": "d", "error": {"code": "InternalError"}},
    ]}
    result = wire.parse_add_results(payload, tasks)
    assert (result.added, result.existed) == (1, 1)
    assert [(e.task_id, e.code, e.transient) for e in result.errors] == [
        ("C", "TaskDependencyListTooLong", False), ("d", "InternalError", True),
        ("e", "NoResult", True)]


def test_error_details_never_echo_values() -> None:
    """Only PropertyName and Reason are kept from an error's details: a PropertyValue
    may be a SAS URL."""
    code, message = wire.error_parts({
        "code": "InvalidPropertyValue",
        "message": {"lang": "en-US", "value": "Bad value.\nRequestId:abc\nTime:now"},
        "values": [{"key": "PropertyName", "value": "httpUrl"},
                   {"key": "PropertyValue", "value": "https://a/b?sig=SECRET"},
                   {"key": "Reason", "value": "unreachable"}]})
    assert code == "InvalidPropertyValue"
    assert message == "Bad value. (PropertyName=httpUrl, Reason=unreachable)"


@pytest.mark.parametrize(("status", "code", "fault"), [
    (429, "TooManyRequests", SystemFault),
    (503, "ServerBusy", SystemFault),
    (500, "InternalError", SystemFault),
    (408, "RequestTimeout", SystemFault),
    (403, "AuthenticationFailed", ConfigFault),
    (401, "AuthenticationRequired", ConfigFault),
    (403, "InsufficientAccountPermissions", ConfigFault),
    (404, "PoolNotFound", ConfigFault),
    (409, "ActiveJobAndScheduleQuotaReached", ConfigFault),
    (400, "InvalidPropertyValue", BatchRejected),
    (409, "JobCompleted", BatchRejected),
])
def test_classify(status: int, code: str, fault: type[Exception]) -> None:
    """Service errors map to system, configuration or message faults by status and code."""
    err = ServiceError(status, code, "it said no", retry_after=2.0)
    result = classify(err, what="add tasks")
    assert type(result) is fault
    assert code in str(result)
    if isinstance(result, SystemFault):
        assert result.retry_after == 2.0
    if isinstance(result, ConfigFault):
        assert result.code == code


def test_classified_messages_are_redacted() -> None:
    """A signature in the service's message does not reach the fault's description."""
    err = ServiceError(400, "InvalidPropertyValue", "bad url https://a/b?sv=1&sig=SECRET")
    assert "SECRET" not in str(classify(err, what="add tasks"))


def test_retry_after_forms() -> None:
    """Retry-After is read as seconds or as an HTTP date; garbage is ignored."""
    assert _retry_after("5") == 5.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = _retry_after(later)
    assert seconds is not None and 25 < seconds <= 30


def test_account_name_comes_from_the_url() -> None:
    """The shared-key account defaults to the first label of the account URL's host."""
    assert account_name("https://batchfanout.westeurope.batch.azure.com/") == "batchfanout"


# -- the job monitor's shapes -----------------------------------------------------------

_BLOCK = ExitOptions(dependency_action="block")
_CONDITIONS = ExitConditions(
    exit_codes=((0, ExitOptions(job_action="none")), (3, ExitOptions(job_action="terminate",
                                                                       dependency_action="block"))),
    exit_code_ranges=((10, 20, ExitOptions(dependency_action="satisfy")),),
    pre_processing_error=_BLOCK, file_upload_error=ExitOptions(job_action="disable"),
    default=ExitOptions(dependency_action="satisfy"))


def test_exit_conditions_json_exactly() -> None:
    """exitConditions carries every field set, exitOptions only the actions set, as
    BatchService.json names them; an unset part is left out; the SDK reads it back."""
    task = TaskSpec(id="t", command_line="x", exit_conditions=_CONDITIONS)
    body = json.loads(wire.collection_body([task]))["value"][0]
    assert body["exitConditions"] == {
        "exitCodes": [{"code": 0, "exitOptions": {"jobAction": "none"}},
                      {"code": 3, "exitOptions": {"jobAction": "terminate",
                                                  "dependencyAction": "block"}}],
        "exitCodeRanges": [{"start": 10, "end": 20,
                            "exitOptions": {"dependencyAction": "satisfy"}}],
        "preProcessingError": {"dependencyAction": "block"},
        "fileUploadError": {"jobAction": "disable"},
        "default": {"dependencyAction": "satisfy"},
    }
    model = m.BatchTaskCreateOptions(body)
    assert model.exit_conditions is not None and model.exit_conditions.exit_code_ranges
    assert model.exit_conditions.exit_code_ranges[0].exit_options.dependency_action == "satisfy"
    assert wire.task_body(TaskSpec(id="u", command_line="x",
                                   exit_conditions=SATISFY_DEPENDENTS))["exitConditions"] == {
        "preProcessingError": {"dependencyAction": "satisfy"},
        "fileUploadError": {"dependencyAction": "satisfy"},
        "default": {"dependencyAction": "satisfy"}}
    assert "exitConditions" not in wire.task_body(TaskSpec(id="v", command_line="x"))


def test_exit_conditions_are_serialized_once_per_object() -> None:
    """Tasks sharing one ExitConditions object share one serialized dict; an equal but
    distinct object is serialized on its own (the cache is by identity)."""
    a = wire.task_body(TaskSpec(id="a", command_line="x", exit_conditions=_CONDITIONS))
    b = wire.task_body(TaskSpec(id="b", command_line="x", exit_conditions=_CONDITIONS))
    assert a["exitConditions"] is b["exitConditions"]
    twin = ExitConditions(default=ExitOptions(dependency_action="satisfy"))
    other = ExitConditions(default=ExitOptions(dependency_action="block"))
    assert wire.exit_conditions_body(twin) == {"default": {"dependencyAction": "satisfy"}}
    assert wire.exit_conditions_body(other) == {"default": {"dependencyAction": "block"}}


def test_exit_conditions_round_trip_through_the_parser() -> None:
    """The parser reads back what task_body sends (enum values in any case), and None
    for a task without exit conditions."""
    assert wire.exit_conditions(wire.exit_conditions_body(_CONDITIONS)) == _CONDITIONS
    assert wire.exit_conditions({"default": {"dependencyAction": "Block",
                                             "jobAction": "None"}}) == ExitConditions(
        default=ExitOptions(job_action="none", dependency_action="block"))
    assert wire.exit_conditions(None) is None


def test_job_body_sends_on_task_failure_only_when_it_acts() -> None:
    """onTaskFailure is sent for performexitoptionsjobaction, never for the default."""
    spec = JobSpec(tasks=[], task_count=0, id="j", max_wall_clock=timedelta(hours=1))
    assert "onTaskFailure" not in wire.job_body(spec, "p")
    spec.on_task_failure = "performexitoptionsjobaction"
    body = wire.job_body(spec, "p")
    assert body["onTaskFailure"] == "performexitoptionsjobaction"
    assert body["constraints"] == {"maxWallClockTime": "PT1H0M0S"}
    assert m.BatchJobCreateOptions(body).task_failure_mode == "performexitoptionsjobaction"


def test_fanout_jobs_filter_uses_only_documented_operators() -> None:
    """No filter for every job; with completed_since, every non-completed state by eq
    (list-jobs allows only eq on state) or completed since a DateTime literal; prefixes
    as startswith on id, quotes doubled."""
    assert wire.fanout_jobs_filter(None) is None
    since = datetime(2026, 11, 24, 11, 30, 5, 250000, tzinfo=timezone(timedelta(hours=1)))
    text = wire.fanout_jobs_filter(since, ["fo-", "o'k"])
    assert text == (
        "(state eq 'active' or state eq 'disabling' or state eq 'disabled' or "
        "state eq 'enabling' or state eq 'terminating' or state eq 'deleting' or "
        "(state eq 'completed' and stateTransitionTime ge "
        "datetime'2026-11-24T10:30:05.250000Z')) and "
        "(startswith(id, 'fo-') or startswith(id, 'o''k'))")
    assert " ne " not in text
    assert wire.fanout_jobs_filter(None, ["x"]) == "(startswith(id, 'x'))"


def test_job_record_and_times() -> None:
    """A listed job maps to a JobRecord with aware UTC times (7 fractional digits read)."""
    record = wire.job_record({
        "id": "j", "state": "completed", "poolInfo": {"poolId": "p"},
        "metadata": [{"name": "fanout-handler", "value": "sweep"}],
        "creationTime": "2026-11-24T10:00:00.1234567Z",
        "stateTransitionTime": "2026-11-24T10:05:00Z",
        "executionInfo": {"startTime": "2026-11-24T10:00:01.5Z",
                          "endTime": "2026-11-24T10:05:00.000Z",
                          "terminateReason": "AllTasksComplete"}})
    assert record == JobRecord(
        id="j", state="completed", metadata={"fanout-handler": "sweep"}, pool="p",
        created=datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC),
        start_time=datetime(2026, 11, 24, 10, 0, 1, 500000, tzinfo=UTC),
        end_time=datetime(2026, 11, 24, 10, 5, tzinfo=UTC), terminate_reason="AllTasksComplete",
        state_changed=datetime(2026, 11, 24, 10, 5, tzinfo=UTC))
    assert wire.parse_time("garbage") is None and wire.parse_time(None) is None
    assert wire.job_record({"id": "k", "state": "active"}).terminate_reason is None


@pytest.mark.parametrize(("info", "constraints", "expected"), [
    ({"exitCode": 3, "failureInfo": {"category": "usererror", "code": "FailureExitCode"}},
     None, ("exit_code", "exit")),
    ({"failureInfo": {"category": "usererror", "code": "BlobNotFound"}},
     None, ("resource_file_failure", "pre_processing_error")),
    ({"failureInfo": {"category": "usererror", "code": "ResourceContainerAccessDenied"}},
     None, ("resource_file_failure", "pre_processing_error")),
    ({"failureInfo": {"category": "usererror", "code": "CommandProgramNotFound"}},
     None, ("start_task_failed", "pre_processing_error")),
    ({"exitCode": 0, "failureInfo": {"category": "usererror", "code": "FileUploadMiscError"}},
     None, ("output_upload_failure", "file_upload_error")),
    ({"exitCode": 137, "failureInfo": {"category": "usererror", "code": "TaskEnded",
                                       "message": "Task Was Ended by User Request"}},
     None, ("cancelled", "exit")),
    ({"exitCode": 137, "failureInfo": {"code": "TaskEnded",
                                       "message": "The task exceeded its max wall clock time"}},
     None, ("wall_clock_timeout", "exit")),
    ({"exitCode": 137, "startTime": "2026-11-24T10:00:00Z", "endTime": "2026-11-24T11:00:01Z",
      "failureInfo": {"code": "TaskEnded", "message": "ended"}},
     {"maxWallClockTime": "PT1H0M0S"}, ("wall_clock_timeout", "exit")),
    ({"exitCode": 137, "startTime": "2026-11-24T10:00:00Z", "endTime": "2026-11-24T10:10:00Z",
      "failureInfo": {"code": "TaskEnded", "message": "ended"}},
     {"maxWallClockTime": "PT1H0M0S"}, ("cancelled", "exit")),
    ({"failureInfo": {"category": "servererror", "code": "SomethingNew"}},
     None, ("node_unusable", "exit")),
    ({"exitCode": 1}, None, ("exit_code", "exit")),
])
def test_failure_categories(info: dict[str, Any], constraints: Any,
                            expected: tuple[str, str]) -> None:
    """Batch's failureInfo codes map to fanout's categories and to the exit condition
    Batch applied (the table in wire.FAILURE_CODES)."""
    assert wire.failure_category(info, constraints) == expected


def test_failure_table_uses_known_categories() -> None:
    """Every category in the table is one fanout reports."""
    assert {c for c, _ in wire.FAILURE_CODES.values()} <= set(FAILURE_CATEGORIES)


def test_durations_read_back() -> None:
    """Batch's ISO 8601 durations, including its 'unlimited' one."""
    assert wire.parse_duration("PT2H0M0S") == timedelta(hours=2)
    assert wire.parse_duration("P1DT0H0M3.25S") == timedelta(days=1, seconds=3.25)
    assert wire.parse_duration("P10675199DT2H48M5.4775807S") is not None
    assert wire.parse_duration("soon") is None


def test_job_record_is_sealed_only_once_set_to_terminate() -> None:
    """The monitor may end a blocked job only once every task was added: sealed means
    onAllTasksComplete is terminatejob (any case, as the service may answer)."""
    assert "onAllTasksComplete" in wire.JOB_RECORD_SELECT.split(",")
    assert wire.job_record({"id": "j", "onAllTasksComplete": "terminateJob"}).sealed
    assert not wire.job_record({"id": "j", "onAllTasksComplete": "noaction"}).sealed
    assert not wire.job_record({"id": "j"}).sealed


def _reference_body(tasks: list[TaskSpec]) -> bytes:
    return json.dumps({"value": [wire.task_body(t) for t in tasks]},
                      separators=(",", ":")).encode("utf-8")


def test_collection_body_is_byte_for_byte_the_json_dumps_of_task_bodies() -> None:
    """The fragment-joined body is exactly ``json.dumps`` of ``task_body``'s dicts, for
    every field, shared settings objects, and strings needing escapes (quotes,
    backslashes, control characters, non-ASCII)."""
    shared = ContainerSettings("ghcr.io/x/ffmpeg:7", run_options="--rm")
    other = ContainerSettings("ghcr.io/x/other:1")
    odd = 'é "quoted" \\ back\tslash\n\u2603 \x01'
    tasks = [
        TaskSpec(id="plain", command_line="true"),
        TaskSpec(id="env", command_line=odd, environment={"A": "1", odd: odd, "EMPTY": ""}),
        TaskSpec(id="named", command_line="x", display_name=odd, container=shared),
        TaskSpec(id="same-container", command_line="y", container=shared,
                 exit_conditions=_CONDITIONS),
        TaskSpec(id="other-container", command_line="z", container=other,
                 exit_conditions=_CONDITIONS),
        TaskSpec(id="all", command_line="ffmpeg", environment={"B": "2"},
                 resource_files=[ResourceFile(http_url="https://h/x?sig=s", file_path="x",
                                              file_mode="0644")],
                 output_files=[OutputFile(file_pattern="*.out", container_url="https://h/c",
                                          path="p", upload_condition="failure")],
                 depends_on=("plain",), depends_on_ranges=((1, 4),), max_task_retries=-1,
                 max_wall_clock=timedelta(hours=1), retention=timedelta(seconds=1.5),
                 required_slots=3, container=shared, display_name="d"),
    ]
    assert wire.collection_body(tasks) == _reference_body(tasks)
    assert wire.collection_body(tasks[:1]) == b'{"value":[{"id":"plain","commandLine":"true"}]}'


def test_collection_body_encodes_a_value_that_is_not_a_string_as_json_dumps_does() -> None:
    """A handler that puts a number in the environment gets what ``json.dumps`` made of
    it before (the general encoder), not an error."""
    task = TaskSpec(id="n", command_line="x", environment={"N": 5})  # type: ignore[dict-item]
    assert wire.collection_body([task]) == _reference_body([task])
    assert b'"value":5' in wire.collection_body([task])
