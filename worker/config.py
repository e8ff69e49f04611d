"""One typed Settings model: ``fanout.toml`` plus ``FANOUT_*`` environment variables.

Read once at start-up by :func:`load_settings`; nothing else reads the environment.
Environment variables win over the file; nested keys use a double underscore:
``FANOUT_CONSUMER__CONCURRENCY=8`` sets ``[consumer] concurrency``. Errors name the
key and the bad value. Secrets are ``SecretStr`` so they never print.

With no Azure settings each family falls back to its embedded default (``kind =
"auto"``): the SQLite queue, the local executor and a local blob directory. With no
programs configured at all, a demo program (a Monte Carlo estimate of pi) is defined
so a new user can send a sweep right away.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from handlers import datapath
from handlers.base import ContainerRegistry, ContainerSettings, Program
from handlers.commands import CommandTemplate
from handlers.containers import REGISTRY_NAME, ContainerFields
from worker.errors import SettingsError

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProgramConfig(_Section, ContainerFields):
    """``[programs.<name>]``: a command template tasks may run, optionally in a
    container (``container_image``, ``container_registry``, ``container_run_options``,
    ``container_working_directory``: see ``handlers.containers``)."""

    command: str
    environment: dict[str, str] = Field(default_factory=dict)
    required_slots: PositiveInt = 1
    #: Per-task inputs, ``"<container>/<blob name>"`` templated by the task's fields.
    inputs: list[str] = Field(default_factory=list)
    #: ``"<container>"`` or ``"<container>/<name prefix>"`` a message's inputs may name.
    allowed_inputs: list[str] = Field(default_factory=list)
    #: File patterns uploaded after each task (to ``results/<job>/<task>/``).
    outputs: list[str] = Field(default_factory=list)
    upload_condition: Literal["success", "failure", "completion"] = "success"
    #: How long one of its tasks is expected to run (``PT10M``): the handler's estimate
    #: of a job's task-hours, checked against ``limits.max_task_hours``.
    expected_duration: timedelta | None = None

    @field_validator("expected_duration")
    @classmethod
    def _positive_duration(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("must be a positive duration (PT10M, say)")
        return value

    @field_validator("command")
    @classmethod
    def _parses(cls, value: str) -> str:
        CommandTemplate(value)  # raises ValueError with the offending field
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs_parse(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            datapath.parse_input(text, f"inputs[{i}]")  # ValueError naming the problem
        return value

    @field_validator("allowed_inputs")
    @classmethod
    def _allowed_parse(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            datapath.parse_allowed(text, f"allowed_inputs[{i}]")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs_parse(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            datapath.check_output_pattern(pattern, f"outputs[{i}]")
        return value


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RegistryConfig(_Section):
    """``[registries.<name>]``: a private container registry tasks pull images from.

    Either ``identity``, the resource id of a user-assigned managed identity assigned
    to the pool (an Azure Container Registry it has AcrPull on; Batch's
    ``identityReference``), or ``username`` with the password in the environment
    variable ``password_env``, read once at start-up (a missing or empty variable is a
    start-up error naming the variable). The password is never logged or printed.
    """

    server: str
    identity: str | None = None
    username: str | None = None
    password_env: str | None = None
    _password: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _credentials(self) -> RegistryConfig:
        if self.identity is not None and (self.username or self.password_env):
            raise ValueError("give identity, or username and password_env, not both")
        if self.identity is None:
            if not self.username or not self.password_env:
                raise ValueError("give identity (a user-assigned managed identity's resource "
                                 "id) or username and password_env")
            name = self.password_env
            if not _ENV_NAME.match(name) or name.upper().startswith("FANOUT_"):
                raise ValueError(f"password_env {name[:80]!r} is not an environment variable "
                                 "name outside FANOUT_* (those are settings)")
            value = os.environ.get(name)
            if not value:
                raise ValueError(f"password_env: the environment variable {name} is "
                                 f"{'empty' if value == '' else 'not set'}")
            self._password = SecretStr(value)
        self.spec()  # the server and identity are well-formed
        return self

    def spec(self, name: str | None = None) -> ContainerRegistry:
        """The handlers' ``ContainerRegistry`` (the password included)."""
        password = self._password.get_secret_value() if self._password is not None else None
        return ContainerRegistry(server=self.server, identity_reference=self.identity,
                                 username=self.username, password=password, name=name)


class ProgramCatalog(dict[str, Program]):
    """The configured programs, keyed by name, with the configured container
    registries (``registries``) that programs and handler profiles may name."""

    registries: Mapping[str, ContainerRegistry]

    def __init__(self, programs: Mapping[str, Program],
                 registries: Mapping[str, ContainerRegistry]) -> None:
        super().__init__(programs)
        self.registries = registries


class QueueConfig(_Section):
    """``[queue]``: which queue to read and how messages are locked."""

    kind: Literal["auto", "local", "servicebus"] = "auto"
    name: str = "fanout"
    lock_duration: PositiveFloat = 60.0
    max_delivery_count: PositiveInt = 10
    max_message_bytes: PositiveInt = 256 * 1024
    poll_interval: PositiveFloat = 15.0


class ServiceBusConfig(_Section):
    """``[servicebus]``: Azure Service Bus; Entra ID unless a connection string is set."""

    namespace: str | None = None
    connection_string: SecretStr | None = None
    queue: str | None = None
    topic: str | None = None
    subscription: str | None = None
    prefetch: Annotated[int, Field(ge=0)] = 0
    batch_size: PositiveInt = 1
    managed_identity_client_id: str | None = None
    #: With ``UseDevelopmentEmulator=true``: the emulator's HTTP management port,
    #: where queue depth is read.
    emulator_admin_port: Annotated[int, Field(ge=1, le=65535)] = 5300

    @property
    def configured(self) -> bool:
        return bool(self.namespace or self.connection_string)


class ConsumerConfig(_Section):
    """``[consumer]``: concurrency, waits and the shutdown drain."""

    concurrency: PositiveInt = 4
    receive_wait: PositiveFloat = 5.0
    drain_grace: PositiveFloat = 25.0
    heartbeat_timeout: PositiveFloat = 60.0
    unready_backoff: PositiveFloat = 30.0


class SubmitConfig(_Section):
    """``[submit]``: chunking, request concurrency and retry backoff."""

    chunk_size: Annotated[int, Field(ge=1, le=100)] = 100
    concurrency: PositiveInt = 8
    max_retries: Annotated[int, Field(ge=0)] = 8
    backoff_base: PositiveFloat = 0.5
    backoff_max: PositiveFloat = 30.0


class BackendConfig(_Section):
    """``[backend]``: which batch engine runs the tasks."""

    kind: Literal["auto", "local", "azure"] = "auto"
    default_pool: str | None = None


class LocalExecutorConfig(_Section):
    """``[local]``: the local executor (embedded default)."""

    slots: Annotated[int, Field(ge=0)] = 0  # 0 means the machine's CPU count
    pool: str = "local"
    #: Seconds between scheduler ticks.
    poll_interval: PositiveFloat = 0.2
    #: Seconds between reads of the executor's stats (metrics, admission); unset: ten
    #: times ``poll_interval``, at least 1 (2 by default).
    stats_interval: PositiveFloat = 2.0
    #: Seconds between the job monitor's polls; unset: a tenth of
    #: ``jobs.poll_interval``, at least 1 (3 by default): a local poll costs a few
    #: SQLite reads.
    monitor_interval: PositiveFloat = 3.0
    #: What runs container tasks: ``auto`` (docker, else podman, whichever answers
    #: ``info``), one of them, or ``none`` (container tasks are refused).
    container_engine: Literal["auto", "docker", "podman", "none"] = "auto"

    @property
    def slot_count(self) -> int:
        return self.slots or os.cpu_count() or 1

    @property
    def uploads_logs(self) -> bool:
        """Whether tasks upload their logs: no, they stay in the task directory."""
        return False

    def with_intervals(self, jobs: JobsConfig) -> LocalExecutorConfig:
        """This section with the poll intervals it leaves unset derived, as above."""
        derived: dict[str, float] = {}
        if "stats_interval" not in self.model_fields_set:
            derived["stats_interval"] = max(1.0, self.poll_interval * 10)
        if "monitor_interval" not in self.model_fields_set:
            derived["monitor_interval"] = max(1.0, jobs.poll_interval / 10)
        return self.model_copy(update=derived) if derived else self


class BatchConfig(_Section):
    """``[batch]``: Azure Batch; Entra ID unless ``account_key`` is set."""

    account_url: str | None = None
    account_name: str | None = None
    account_key: SecretStr | None = None
    pool: str | None = None
    #: Seconds between reads of the pools' and jobs' stats (metrics, admission).
    poll_interval: PositiveFloat = 30.0
    #: Seconds between the job monitor's polls; unset: ``jobs.poll_interval``.
    monitor_interval: PositiveFloat = 30.0
    managed_identity_client_id: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.account_url)

    @property
    def stats_interval(self) -> float:
        """Seconds between stats polls: ``poll_interval``."""
        return self.poll_interval

    @property
    def uploads_logs(self) -> bool:
        """Whether tasks upload their logs (to ``jobs.logs_container``, as
        ``jobs.log_upload`` says): yes, nodes may scale to zero."""
        return True

    def with_intervals(self, jobs: JobsConfig) -> BatchConfig:
        """This section with ``monitor_interval``, when unset, from ``jobs``."""
        if "monitor_interval" in self.model_fields_set:
            return self
        return self.model_copy(update={"monitor_interval": jobs.poll_interval})


class StorageConfig(_Section):
    """``[storage]``: where blob references point."""

    kind: Literal["auto", "local", "azure"] = "auto"


class BlobConfig(_Section):
    """``[blob]``: Azure Blob storage accounts; user delegation SAS unless a key is set."""

    account_url: str | None = None
    account_key: SecretStr | None = None
    connection_string: SecretStr | None = None
    #: Added to each job's max wall clock to make its SAS lifetime: the time between
    #: signing (the handler's build) and the job's creation, plus slack. A SAS lives
    #: ``min(job wall clock, limits.max_wall_clock) + sas_wait_allowance``.
    sas_wait_allowance: timedelta = timedelta(hours=1)
    #: Removed (a fixed lifetime was too short for long jobs): kept only so a
    #: configuration that still sets it gets an error that says what replaced it.
    sas_ttl: None = Field(default=None, exclude=True, repr=False)
    #: Needed only when the account URL does not show it (a custom domain).
    account_name: str | None = None
    #: Other URLs of the same account that messages and events may name (private
    #: endpoints, custom domains); the ``.dfs.`` twin of a ``.blob.`` URL is implied.
    alias_urls: list[str] = Field(default_factory=list)
    managed_identity_client_id: str | None = None
    #: Data Lake Gen2 account: output SAS are scoped to the prefix's directory.
    hierarchical_namespace: bool = False

    @field_validator("sas_wait_allowance")
    @classmethod
    def _positive_allowance(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration (PT1H, say)")
        return value

    @field_validator("sas_ttl", mode="before")
    @classmethod
    def _sas_ttl_removed(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "blob.sas_ttl was removed: each job's SAS now lives its own max wall clock "
                "(its message's job option, else jobs.max_wall_clock, at most "
                "limits.max_wall_clock) plus blob.sas_wait_allowance (default PT1H); "
                "delete the key, and raise blob.sas_wait_allowance if tasks wait long")
        return None

    @property
    def configured(self) -> bool:
        return bool(self.account_url or self.connection_string)


class LimitsConfig(_Section):
    """``[limits]``: what one message may ask for."""

    max_tasks_per_message: PositiveInt = 100_000
    max_priority: Annotated[int, Field(ge=-1000, le=1000)] = 1000
    min_priority: Annotated[int, Field(ge=-1000, le=1000)] = -1000
    max_task_retries: Annotated[int, Field(ge=-1)] = 10
    #: Six days, so that with the default ``blob.sas_wait_allowance`` (one hour) a job's
    #: SAS still fits a user delegation key's seven days (docs/storage.md).
    max_wall_clock: timedelta = timedelta(days=6)
    allowed_pools: list[str] = Field(default_factory=list)
    #: The most task-hours one message's job may be estimated at (the handler's
    #: estimate: each task's expected duration times its required slots, summed);
    #: None: no budget. A job without an estimate is not checked.
    max_task_hours: Annotated[float, Field(gt=0)] | None = None


#: A cost tag's key: it becomes a Prometheus label name and a metadata name suffix.
COST_TAG_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Label names the cost metrics already use.
RESERVED_TAG_KEYS = frozenset({"handler", "pool", "vm_size"})


class CostConfig(_Section):
    """``[cost]``: cost tags messages may carry, node-seconds, and prices.

    ``allowed_tags`` are the tag keys a message's ``job.tags`` may use (none when
    empty); they become job metadata (``fanout-tag-<key>``) and labels of the cost
    metrics, fixed at start-up. ``node_seconds`` says whether the monitor reads a
    terminal job's task execution times (``at_completion``: one listing of its
    completed tasks, a page per 1,000, once per job; ``off``: never).
    ``max_tasks_listed`` skips that listing for a job with more completed tasks.
    ``prices`` are per node-hour, keyed by the pool's VM size (lower case).
    """

    allowed_tags: list[str] = Field(default_factory=list)
    node_seconds: Literal["at_completion", "off"] = "at_completion"
    max_tasks_listed: PositiveInt = 100_000
    prices: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"

    @field_validator("allowed_tags")
    @classmethod
    def _tag_keys(cls, value: list[str]) -> list[str]:
        for key in value:
            if not isinstance(key, str) or not COST_TAG_KEY.match(key):
                raise ValueError(f"tag key {str(key)[:40]!r} is not 1-32 lower-case letters, "
                                 "digits and underscores starting with a letter (it becomes "
                                 "a metric label)")
            if key in RESERVED_TAG_KEYS:
                raise ValueError(f"tag key {key!r} is a label the cost metrics already use "
                                 f"({', '.join(sorted(RESERVED_TAG_KEYS))})")
        if len(set(value)) != len(value):
            raise ValueError("a tag key is listed twice")
        if len(value) > 10:
            raise ValueError(f"{len(value)} tag keys; at most 10 (each is a metric label)")
        return value

    @field_validator("prices")
    @classmethod
    def _lower_sizes(cls, value: dict[str, float]) -> dict[str, float]:
        lowered = {k.lower(): v for k, v in value.items()}
        if len(lowered) != len(value):
            raise ValueError("a VM size is priced twice (sizes are compared in lower case)")
        return lowered


class PreemptionConfig(_Section):
    """``[preemption]``: Spot/low-priority preemptions (worker/preemption.py).

    With ``count`` (the default) the job monitor lists each active job's pool's
    preempted nodes once a poll and counts the tasks they were running, per job and
    per pool. With ``max_per_task`` and ``dedicated_pool`` both set, a task preempted
    that many times is ended in its job and run again in a companion job on the
    dedicated pool (off by default)."""

    count: bool = True
    max_per_task: Annotated[int, Field(ge=1)] | None = None
    dedicated_pool: str | None = None

    @model_validator(mode="after")
    def _both(self) -> PreemptionConfig:
        if (self.max_per_task is None) != (self.dedicated_pool is None):
            raise ValueError("preemption.max_per_task and preemption.dedicated_pool are "
                             "set together (or neither)")
        if self.max_per_task is not None and not self.count:
            raise ValueError("preemption.max_per_task needs preemption.count = true")
        return self

    @property
    def moves(self) -> bool:
        """Whether tasks are moved to the dedicated pool."""
        return self.max_per_task is not None and self.dedicated_pool is not None


class AdmissionConfig(_Section):
    """``[admission]``: stop receiving while the pools are backed up (worker/admission.py).

    With ``max_backlog_per_slot`` set, the consumer takes no new message while any
    pool's pending tasks (active tasks of fanout's active jobs on it) exceed that many
    per task slot; None (the default): it never waits for capacity."""

    max_backlog_per_slot: Annotated[float, Field(ge=0)] | None = None


class MetricsConfig(_Section):
    """``[metrics]``: the one HTTP port for /metrics, /healthz and /readyz."""

    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


class LogConfig(_Section):
    """``[log]``: format (``auto`` is JSON unless stderr is a terminal) and level."""

    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class TracingConfig(_Section):
    """``[tracing]``: OpenTelemetry traces, off by default (nothing is sent anywhere).

    With ``enabled = true`` a message's trace context (its ``traceparent`` or
    ``Diagnostic-Id`` property) continues through receive, plan, submit and the job
    monitor's report, every task gets it as ``TRACEPARENT``, and the Azure SDKs' calls
    are traced. ``exporter`` says where spans go: ``otlp`` (OTLP over HTTP to
    ``endpoint``, by default the OpenTelemetry SDK's, ``http://localhost:4318``),
    ``azure_monitor`` (Application Insights; needs the ``fanout[azure-monitor]``
    extra), ``console`` (stdout) or ``none`` (the context is propagated, no span is
    exported)."""

    enabled: bool = False
    exporter: Literal["none", "otlp", "azure_monitor", "console"] = "otlp"
    #: The OTLP/HTTP collector: a base URL (``/v1/traces`` is appended) or the full one.
    endpoint: str | None = None
    service_name: str = "fanout"
    #: The share of new traces recorded; a message's sampled flag wins (parent based).
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0
    #: Application Insights; else ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is read.
    azure_monitor_connection_string: SecretStr | None = None


class RouteConfig(_Section):
    """``[[routes]]``: which handler takes a blob-created event; first match wins.

    Every condition given must hold: ``account`` (storage account name),
    ``container``, ``prefix`` (of the blob name), ``suffix`` (one or a list, case
    insensitive) and ``content_type`` (exact, or a prefix ending in ``/``). The
    blob reference goes into the handler's params under ``blob_param``.
    """

    handler: str
    params: dict[str, Any] = Field(default_factory=dict)
    #: Job options (a table), or how events become jobs: ``"event"`` (the default, one
    #: job per event) or ``"window"`` (one job per route per ``window``); the table
    #: may say the same with ``mode = "window"`` next to its job options.
    job: Literal["event", "window"] | dict[str, Any] = Field(default_factory=dict)
    #: With ``job = "window"``: the window's length (``PT1H``), whole seconds.
    window: timedelta | None = None
    #: With ``job = "window"``: how long after its window ends the job is sealed (it
    #: covers late deliveries; a later event gets a job of its own).
    seal_after: timedelta = timedelta(minutes=5)
    #: A readable name for the route's window jobs (it shows in their ids).
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,24}$")] | None = None
    account: str | None = None
    container: str | None = None
    prefix: str | None = None
    suffix: str | list[str] | None = None
    content_type: str | None = None
    blob_param: str = "input"

    @model_validator(mode="after")
    def _check_window(self) -> RouteConfig:
        mode = self.mode
        if mode not in ("event", "window"):
            raise ValueError(f"job.mode must be \"event\" or \"window\", not {mode!r}")
        if mode == "window":
            if self.window is None:
                raise ValueError('job = "window" needs window, the window\'s length '
                                 '(window = "PT1H")')
            seconds = self.window.total_seconds()
            if seconds < 1 or seconds != int(seconds):
                raise ValueError(f"window must be whole seconds, at least one (got "
                                 f"{self.window})")
            if self.seal_after.total_seconds() < 0:
                raise ValueError("seal_after must not be negative")
        elif self.window is not None:
            raise ValueError('window applies only with job = "window"')
        return self

    @property
    def mode(self) -> str:
        """``"event"`` (one job per event) or ``"window"`` (one job per window)."""
        if isinstance(self.job, str):
            return self.job
        return str(self.job.get("mode", "event"))

    @property
    def job_options(self) -> dict[str, Any]:
        """The route's job options (``job`` without ``mode``)."""
        if isinstance(self.job, str):
            return {}
        return {k: v for k, v in self.job.items() if k != "mode"}

    @property
    def suffixes(self) -> tuple[str, ...]:
        if self.suffix is None:
            return ()
        items = [self.suffix] if isinstance(self.suffix, str) else self.suffix
        return tuple(s.lower() for s in items)


class WatchConfig(_Section):
    """``[watch]``: turn new files in local storage containers into BlobCreated events.

    Only with local storage. A file is sent once its size and mtime have held for
    ``settle`` seconds; names matching an ``ignore`` pattern (in any path segment)
    are never sent. Checked every ``interval`` seconds.
    """

    containers: list[str] = Field(default_factory=list)
    interval: PositiveFloat = 2.0
    settle: Annotated[float, Field(ge=0)] = 2.0
    ignore: list[str] = Field(default_factory=lambda: [
        ".*", "*.tmp", "*.part", "*.partial", "*.crdownload", "*.swp", "*~"])


class EventsConfig(_Section):
    """``[events]``: completion events, and what happens to blob events no route takes.

    When a job fanout created is terminal, the job monitor publishes one CloudEvents
    1.0 event (``fanout.job.completed``) to ``queue`` or ``topic`` (on the embedded
    default: a second local queue, ``fanout.events``), and to the message's reply-to
    when it names an entity in ``allowed_reply_to``. ``enabled = false`` publishes
    nothing (the monitor still ends and cleans up jobs).
    """

    unrouted: Literal["dead_letter", "drop"] = "dead_letter"
    enabled: bool = True
    #: The events queue (Service Bus queue, or the local queue's name).
    queue: str | None = "fanout.events"
    #: A Service Bus topic instead of a queue (then ``queue`` is ignored).
    topic: str | None = None
    #: Entities a message's reply-to may name (Service Bus queue or topic names).
    allowed_reply_to: list[str] = Field(default_factory=list)
    #: The CloudEvents ``source`` attribute: this worker's name.
    source: str = "fanout"
    #: Failed tasks listed in one event, at most.
    max_failed_tasks: Annotated[int, Field(ge=0, le=1000)] = 20
    #: Bytes of each failed task's stderr carried in the event.
    stderr_tail_bytes: Annotated[int, Field(ge=0, le=64 * 1024)] = 4096
    #: The local events queue drops a repeated message id within this window, as
    #: Service Bus duplicate detection does.
    duplicate_window: PositiveFloat = 600.0


class JobsConfig(_Section):
    """``[jobs]``: operator limits on every job, and the job monitor.

    Every job gets ``max_wall_clock`` unless its message asks for less; the monitor
    polls fanout's jobs every ``monitor_interval`` of the backend's section
    (``[batch]``: by default ``poll_interval``; ``[local]``: by default a tenth of it,
    at least one second), ends jobs whose remaining tasks can never run, reports each
    terminal job once, and deletes terminal jobs after ``retention``.
    """

    max_wall_clock: timedelta = timedelta(days=1)
    retention: timedelta = timedelta(days=7)
    monitor: bool = True
    poll_interval: PositiveFloat = 30.0
    #: Completed jobs re-read every poll: those whose state changed this recently.
    lookback: timedelta = timedelta(minutes=30)
    #: Every this often, every completed job of fanout's is read (reports missed by
    #: a long outage, deletions past retention).
    full_sweep_interval: timedelta = timedelta(minutes=10)
    #: Jobs deleted per poll, at most.
    delete_batch: PositiveInt = 50
    #: A job with more active tasks than this is not checked for blocked tasks.
    blocked_check_limit: PositiveInt = 1000
    #: Jobs the monitor follows at once in a poll (each its requests in order): a
    #: burst of completed jobs costs a few round trips each, so one at a time a
    #: thousand take minutes; this many backend requests are in flight at most.
    #: Unset on the local executor: 1 (see :meth:`for_backend`).
    monitor_concurrency: PositiveInt = 16
    #: Azure: where tasks upload stdout.txt and stderr.txt (``<job>/<task>/``).
    logs_container: str = "fanout-logs"
    #: Azure: upload logs of failed tasks only (``failure``) or of every task.
    log_upload: Literal["failure", "completion", "never"] = "failure"


    def for_backend(self, kind: str) -> JobsConfig:
        """This section with ``monitor_concurrency``, when unset, for the backend: 1 on
        the local executor, whose store answers from SQLite in this process, so
        requests in flight gain nothing there while each of the monitor's threads
        keeps a connection and its page cache of its own."""
        if kind == "azure" or "monitor_concurrency" in self.model_fields_set:
            return self
        return self.model_copy(update={"monitor_concurrency": 1})


class Settings(BaseSettings):
    """Everything fanout reads from its configuration, parsed once."""

    model_config = SettingsConfigDict(
        env_prefix="FANOUT_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    home: Path = Path(".fanout")
    allow_message_commands: bool = False
    queue: QueueConfig = Field(default_factory=QueueConfig)
    servicebus: ServiceBusConfig = Field(default_factory=ServiceBusConfig)
    consumer: ConsumerConfig = Field(default_factory=ConsumerConfig)
    submit: SubmitConfig = Field(default_factory=SubmitConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    local: LocalExecutorConfig = Field(default_factory=LocalExecutorConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    blob: BlobConfig = Field(default_factory=BlobConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    preemption: PreemptionConfig = Field(default_factory=PreemptionConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    programs: dict[str, ProgramConfig] = Field(default_factory=dict)
    registries: dict[str, RegistryConfig] = Field(default_factory=dict)
    handlers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    events: EventsConfig = Field(default_factory=EventsConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    #: Where the settings came from, for ``fanout run`` to log (not a setting).
    _source: str = PrivateAttr(default="defaults")

    @property
    def source(self) -> str:
        return self._source

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        if self.limits.min_priority > self.limits.max_priority:
            raise ValueError("limits.min_priority is above limits.max_priority")
        if not self.programs:
            self.programs = demo_programs(self.backend_kind)
        self.jobs = self.jobs.for_backend(self.backend_kind)
        self.local = self.local.with_intervals(self.jobs)
        self.batch = self.batch.with_intervals(self.jobs)
        self._check_registries()
        return self

    def _check_registries(self) -> None:
        """Registry names, every program's container, and every ``container_registry``
        a ``[handlers.*]`` table names (``handlers.containers``), checked once here."""
        for name in self.registries:
            if not REGISTRY_NAME.match(name):
                raise ValueError(f"registries.{name[:80]}: a registry name is 1-64 letters, "
                                 "digits, hyphens and underscores")
        self.program_specs()  # ValueError naming the program
        known = ", ".join(sorted(self.registries)) or "none"
        for where, value in _registry_keys(self.handlers, "handlers"):
            if not isinstance(value, str) or value not in self.registries:
                raise ValueError(f"{where}: no registry named {str(value)[:64]!r} is "
                                 f"configured ([registries]: {known})")

    @property
    def queue_kind(self) -> str:
        if self.queue.kind == "auto":
            return "servicebus" if self.servicebus.configured else "local"
        return self.queue.kind

    @property
    def backend_kind(self) -> str:
        if self.backend.kind == "auto":
            return "azure" if self.batch.configured else "local"
        return self.backend.kind

    @property
    def backend_config(self) -> LocalExecutorConfig | BatchConfig:
        """The configured backend's own section (``[batch]`` on Azure, else
        ``[local]``): its ``stats_interval``, ``monitor_interval`` and
        ``uploads_logs``."""
        return self.batch if self.backend_kind == "azure" else self.local

    @property
    def storage_kind(self) -> str:
        if self.storage.kind == "auto":
            return "azure" if self.blob.configured else "local"
        return self.storage.kind

    @property
    def default_pool(self) -> str:
        if self.backend.default_pool:
            return self.backend.default_pool
        if self.backend_kind == "azure":
            return self.batch.pool or "fanout"
        return self.local.pool

    def registry_specs(self) -> dict[str, ContainerRegistry]:
        """The configured ``[registries]`` as the handlers' ``ContainerRegistry``."""
        return {name: reg.spec(name) for name, reg in self.registries.items()}

    def program_specs(self) -> ProgramCatalog:
        """The configured programs as the handlers' ``Program`` objects (their
        containers' registries resolved), with the registries (``.registries``)."""
        registries = self.registry_specs()
        programs: dict[str, Program] = {}
        for name, p in self.programs.items():
            container = None
            if p.container_image is not None:
                registry = None
                if p.container_registry is not None:
                    if p.container_registry not in registries:
                        known = ", ".join(sorted(registries)) or "none"
                        raise ValueError(f"programs.{name}.container_registry: no registry "
                                         f"named {p.container_registry!r} is configured "
                                         f"([registries]: {known})")
                    registry = registries[p.container_registry]
                try:
                    container = ContainerSettings(
                        image=p.container_image, registry=registry,
                        run_options=p.container_run_options,
                        working_directory=p.container_working_directory)
                except ValueError as exc:
                    raise ValueError(f"programs.{name}: {exc}") from None
            programs[name] = Program(name=name, command=p.command,
                                     environment=dict(p.environment), container=container,
                                     required_slots=p.required_slots,
                                     inputs=tuple(p.inputs),
                                     allowed_inputs=tuple(p.allowed_inputs),
                                     outputs=tuple(p.outputs),
                                     upload_condition=p.upload_condition,
                                     expected_duration=p.expected_duration)
        return ProgramCatalog(programs, registries)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first (it wins), then what load_settings read from the file.
        return (env_settings, init_settings)


def _registry_keys(value: Any, where: str) -> typing.Iterator[tuple[str, Any]]:
    """Every ``container_registry`` key in nested tables, with its dotted path."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}"
            if key == "container_registry" and item is not None:
                yield path, item
            else:
                yield from _registry_keys(item, path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _registry_keys(item, f"{where}[{index}]")


def demo_programs(backend_kind: str = "local") -> dict[str, ProgramConfig]:
    """The built-in demo: a Monte Carlo estimate of pi, and a task that sums the runs.

    Locally the tasks run this worker's own interpreter; on Azure Batch the node has no
    such path, so they run ``python3`` from the node's PATH.
    """
    python = (sys.executable or "python3") if backend_kind == "local" else "python3"
    return {
        "pi": ProgramConfig(
            command=f"{python} -m worker.demo pi --samples {{samples}} --seed {{seed}}",
            outputs=["estimate.json"],
        ),
        "pi-summary": ProgramConfig(command=f"{python} -m worker.demo summary",
                                    outputs=["summary.json"]),
    }


def find_config(explicit: str | os.PathLike[str] | None,
                environ: dict[str, str] | None = None) -> Path | None:
    """``--config``, else ``$FANOUT_CONFIG``, else ``./fanout.toml`` if it exists."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get("FANOUT_CONFIG"):
        return Path(env["FANOUT_CONFIG"])
    default = Path("fanout.toml")
    return default if default.is_file() else None


def load_settings(path: str | os.PathLike[str] | None = None, *,
                  overrides: dict[str, Any] | None = None) -> Settings:
    """Read the config file (if any) and the environment into one ``Settings``.

    Raises ``SettingsError`` naming each bad key and value.
    """
    config_path = find_config(path)
    data: dict[str, Any] = {}
    source = "defaults"
    if config_path is not None:
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"config file {config_path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config_path} is not valid TOML: {exc}") from None
        source = str(config_path)
    if overrides:
        data = _merge(data, overrides)
    unknown = unknown_environment(os.environ)
    if unknown:
        raise SettingsError(_header(source) + "\n".join(f"  {line}" for line in unknown))
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc, source)) from None
    settings._source = source
    return settings


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def describe_settings_error(exc: ValidationError, source: str) -> str:
    """``invalid configuration (fanout.toml): consumer.concurrency = 'x': ...``.

    Values of secret keys are never echoed.
    """
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        secret = any(word in key.lower() for word in ("key", "secret", "connection", "password"))
        shown = "" if secret or "input" not in err else f" = {err['input']!r}"
        if isinstance(err.get("input"), dict):
            shown = ""
        lines.append(f"  {key}{shown}: {err['msg']}")
    return _header(source) + "\n".join(lines)


def _header(source: str) -> str:
    return f"invalid configuration ({source}; FANOUT_* environment):\n"


ENV_PREFIX = "FANOUT_"
#: ``FANOUT_*`` variables that are not settings: the config file's path, and what the
#: handlers put in a task's environment (a task may run ``fanout`` itself).
NON_SETTING_VARIABLES = frozenset({
    "FANOUT_CONFIG", "FANOUT_TASK_INDEX", "FANOUT_REPEAT_INDEX", "FANOUT_TASK_COUNT",
    "FANOUT_FAN_IN_RANGE", "FANOUT_ON_DEPENDENCY_FAILURE", "FANOUT_INPUT_CONTAINER",
    "FANOUT_INPUT_BLOB", "FANOUT_RENDITION", "FANOUT_FRAME_START", "FANOUT_FRAME_END",
    "FANOUT_FRAME_STEP",
})
#: A sweep task's ``FANOUT_PARAM_<NAME>`` values.
NON_SETTING_PREFIXES = ("FANOUT_PARAM_",)


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """One line per ``FANOUT_*`` variable that sets nothing, with the nearest setting.

    pydantic-settings ignores a variable that names no field, so without this
    ``FANOUT_METRICS_PORT`` (for ``FANOUT_METRICS__PORT``) would pass without a word.
    Names are case-insensitive, as the settings read them.
    """
    problems = []
    for raw in sorted(environ):
        name = raw.upper()
        if (not name.startswith(ENV_PREFIX) or name in NON_SETTING_VARIABLES
                or name.startswith(NON_SETTING_PREFIXES)):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if _names_setting(Settings, parts):
            continue
        problems.append(f"{raw}: no such setting; {_hint(name, parts)}")
    return problems


def _hint(name: str, parts: list[str]) -> str:
    """The nearest setting's name (compared without the common prefix), else a hint."""
    known = {n[len(ENV_PREFIX):]: n for n in _setting_names(Settings, ENV_PREFIX, parts, 0)}
    near = difflib.get_close_matches(name[len(ENV_PREFIX):], list(known), n=1, cutoff=0.6)
    if near:
        return f"did you mean {known[near[0]]}?"
    for end in range(len(parts) - 1, 0, -1):
        if _names_setting(Settings, parts[:end]):
            whole = ENV_PREFIX + "__".join(parts[:end]).upper()
            return f"{whole} takes the whole value (JSON for a list or a table)"
    return "nested keys take a double underscore, as in FANOUT_CONSUMER__CONCURRENCY"


def _names_setting(annotation: Any, parts: list[str]) -> bool:
    """Whether the name segments ``parts`` reach a setting under ``annotation``."""
    if not parts:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_names_setting(arg, parts) for arg in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(parts[0])
        return field is not None and _names_setting(field.annotation, parts[1:])
    if origin is dict:  # dict[str, X]: any key, then X
        return bool(parts[0]) and _names_setting(typing.get_args(annotation)[1], parts[1:])
    return annotation is Any


def _setting_names(annotation: Any, prefix: str, parts: list[str],
                   depth: int) -> typing.Iterator[str]:
    """Every variable name of the settings, a table's keys taken from ``parts``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            env = prefix + name.upper()
            yield env
            yield from _setting_names(field.annotation, env + "__", parts, depth + 1)
    elif typing.get_origin(annotation) is dict:
        key = parts[depth].upper() if depth < len(parts) and parts[depth] else "<NAME>"
        yield from _setting_names(typing.get_args(annotation)[1], f"{prefix}{key}__", parts,
                                  depth + 1)
