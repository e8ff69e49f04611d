"""Tests for the Azure Batch backend's JSON shapes and error classification."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from azure.batch import models as m

from handlers.base import JobSpec, OutputFile, ResourceFile, TaskSpec
from worker.backends.azure import wire
from worker.backends.azure.rest import ServiceError, _retry_after, account_name, classify
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
                    depends_on_ranges=((1, 5),), required_slots=4, container_image="img")
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
