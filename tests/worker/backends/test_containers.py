"""Container tasks end to end: the Azure wire and pool checks against the Batch peer,
and the local executor with Docker or Podman (a recording fake engine here, the real
one where it answers), or a refusal naming the image where none does."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential
from prometheus_client import CollectorRegistry

from handlers.base import ContainerRegistry, ContainerSettings, JobSpec, TaskSpec
from tests.fakes.batch_peer import BatchPeer
from worker.backends.azure import AzureBatchBackend, wire
from worker.backends.azure.rest import ServiceError, path
from worker.backends.local import LocalBackend
from worker.backends.local.container import ContainerRuntime, container_name
from worker.backends.local.store import container_json, container_of
from worker.config import SubmitConfig
from worker.errors import ConfigFault, ContainerUnavailable
from worker.metrics import Metrics
from worker.submit import Submitter

IDENTITY = ("/subscriptions/0000/resourceGroups/rg/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/fanout-pool")
ACR = ContainerRegistry(server="myacr.azurecr.io", identity_reference=IDENTITY, name="acr")
HUB = ContainerRegistry(server="docker.io", username="bot", password="s3cret-pw", name="hub")
SIM = ContainerSettings("myacr.azurecr.io/sim:2", registry=ACR, run_options="--shm-size 1g",
                        working_directory="containerImageDefault")


def job(job_id: str = "job-1", **kwargs: Any) -> JobSpec:
    return JobSpec(tasks=[], task_count=0, id=job_id, **kwargs)


# -- the Azure wire ------------------------------------------------------------------


def test_container_settings_body_reads_back_as_the_sdk_model() -> None:
    """imageName, containerRunOptions, registry (identityReference or username and
    password) and workingDirectory, as BatchTaskContainerSettings has them; the default
    working directory is left to the service."""
    body = wire.container_settings_body(SIM)
    assert body == {"imageName": "myacr.azurecr.io/sim:2", "containerRunOptions": "--shm-size 1g",
                    "registry": {"registryServer": "myacr.azurecr.io",
                                 "identityReference": {"resourceId": IDENTITY}},
                    "workingDirectory": "containerImageDefault"}
    model = m.BatchTaskContainerSettings(body)
    assert model.registry is not None and model.registry.identity_reference is not None
    assert model.registry.identity_reference.resource_id == IDENTITY
    hub = m.BatchTaskContainerSettings(wire.container_settings_body(
        ContainerSettings("bot/sim:1", registry=HUB)))
    assert hub.registry is not None
    assert (hub.registry.username, hub.registry.password) == ("bot", "s3cret-pw")
    assert hub.working_directory is None
    assert wire.container_settings_body(SIM) is body  # one dict for a job's tasks


def code_of(problem: tuple[str, str] | None) -> str | None:
    return problem[0] if problem is not None else None


def test_pool_checks_follow_the_spec() -> None:
    """Errors: a container task on a plain pool, a plain task on a container pool, a
    registry identity the pool lists no such identity for. Only a warning: an image the
    pool does not prefetch that no registry covers (it may be public)."""
    plain, no_ids = None, wire.PoolContainers(type="dockerCompatible", images=("a:1",))
    with_ids = wire.PoolContainers(type="dockerCompatible", identities=("/other",))
    assert code_of(wire.container_problem("p", plain, SIM)) == "PoolNotContainerEnabled"
    assert code_of(wire.container_problem("p", no_ids, None)) == "ContainerImageRequired"
    assert wire.container_problem("p", no_ids, SIM) is None  # identities not listed
    problem = wire.container_problem("p", with_ids, SIM)
    assert problem is not None
    code, text = problem
    assert code == "ContainerRegistryIdentityNotOnPool" and IDENTITY in text
    ok = wire.PoolContainers(type="dockerCompatible", identities=(IDENTITY.lower(),))
    assert wire.container_problem("p", ok, SIM) is None
    assert wire.container_warning(no_ids, ContainerSettings("a:1")) is None  # prefetched
    assert wire.container_warning(no_ids, SIM) is None  # the task names a registry
    warning = wire.container_warning(no_ids, ContainerSettings("ghcr.io/x/y:1"))
    assert warning is not None and "ghcr.io" in warning
    covered = wire.PoolContainers(type="dockerCompatible", registries=("ghcr.io",))
    assert wire.container_warning(covered, ContainerSettings("ghcr.io/x/y:1")) is None
    pool = {"virtualMachineConfiguration": {"containerConfiguration": {
        "type": "dockerCompatible", "containerImageNames": ["a:1"],
        "containerRegistries": [{"registryServer": "https://GHCR.io/"}]}},
        "identity": {"type": "UserAssigned",
                     "userAssignedIdentities": [{"resourceId": IDENTITY}]}}
    assert wire.pool_containers(pool) == wire.PoolContainers(
        type="dockerCompatible", images=("a:1",), registries=("ghcr.io",),
        identities=(IDENTITY.lower(),))


@pytest.fixture
def azure(peer: BatchPeer) -> Iterator[Callable[..., AzureBatchBackend]]:
    made: list[AzureBatchBackend] = []

    def make(pool: str) -> AzureBatchBackend:
        backend = AzureBatchBackend(endpoint=peer.url, default_pool=pool,
                                    credential=AzureNamedKeyCredential(peer.account, peer.key))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def test_container_program_on_a_container_pool(peer: BatchPeer,
                                               azure: Callable[..., AzureBatchBackend]) -> None:
    """The tasks reach the service with the full containerSettings, every name the
    spec's; the pool was read once."""
    peer.add_pool("docker", container_images=["myacr.azurecr.io/sim:2"])
    backend = azure("docker")
    backend.create_job(job())
    tasks = [TaskSpec(id=str(i), command_line="/app/sim", container=SIM) for i in range(3)]
    result = backend.add_tasks("job-1", tasks)
    assert (result.added, result.errors) == (3, [])
    sent = peer.tasks("job-1")[0]["containerSettings"]
    assert sent == wire.container_settings_body(SIM)
    assert peer.requests["get_pool", "ok"] == 1 and peer.undocumented == []


def test_container_program_on_a_plain_pool_is_refused(
        peer: BatchPeer, azure: Callable[..., AzureBatchBackend]) -> None:
    """On a pool without a container configuration nothing is sent: a ConfigFault
    naming the pool and the image."""
    backend = azure("fanout")
    backend.create_job(job())
    with pytest.raises(ConfigFault) as caught:
        backend.add_tasks("job-1", [TaskSpec(id="0", command_line="x", container=SIM)])
    assert caught.value.code == "PoolNotContainerEnabled"
    assert "pool fanout" in str(caught.value) and SIM.image in str(caught.value)
    assert peer.add_requests == []


def test_an_unregistered_image_is_added_with_a_warning(
        peer: BatchPeer, azure: Callable[..., AzureBatchBackend],
        capsys: pytest.CaptureFixture[str]) -> None:
    """An image the pool does not prefetch, with no registry: added (it may be public),
    and logged once per pool and image."""
    peer.add_pool("docker", container_images=[])
    backend = azure("docker")
    backend.create_job(job())
    image = ContainerSettings("ghcr.io/x/public:1")
    for start in (0, 2):
        tasks = [TaskSpec(id=str(i), command_line="x", container=image)
                 for i in range(start, start + 2)]
        assert backend.add_tasks("job-1", tasks).added == 2
    assert backend._container_warned == {("docker", "ghcr.io/x/public:1")}


def test_the_peer_holds_container_settings_to_the_spec(
        peer: BatchPeer, azure: Callable[..., AzureBatchBackend]) -> None:
    """A workingDirectory outside ContainerWorkingDirectory, or an identityReference
    without a resourceId, is 400 InvalidPropertyValue / MissingRequiredProperty."""
    peer.add_pool("docker", container_images=[])
    backend = azure("docker")
    backend.create_job(job())
    for settings, code in (({"imageName": "a", "workingDirectory": "/app"},
                            "InvalidPropertyValue"),
                           ({"imageName": "a", "registry": {"identityReference": {}}},
                            "MissingRequiredProperty")):
        body = json.dumps({"value": [{"id": "t", "commandLine": "x",
                                      "containerSettings": settings}]}).encode()
        with pytest.raises(ServiceError) as caught:
            backend._rest.call("POST", path("jobs", "job-1", "addtaskcollection"), body=body)
        assert caught.value.code == code


# -- the local executor --------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Callable[..., LocalBackend]]:
    made: list[LocalBackend] = []

    def make(engine: str, *, start: bool = True) -> LocalBackend:
        backend = LocalBackend(home=tmp_path / "home", slots=2, poll_interval=0.02,
                               kill_grace=0.5, container_engine=engine)
        made.append(backend)
        if start:
            backend.start()
        return backend

    yield make
    for backend in reversed(made):
        backend.close()


def wait_done(backend: LocalBackend, job_id: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = backend.job_status(job_id)
        if status is not None and status.counts["completed"] >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{count} tasks of {job_id} did not complete in {timeout} s")


@pytest.mark.parametrize("engine", ["none", "docker"])
def test_no_engine_refuses_container_tasks_naming_the_image(
        local: Callable[..., LocalBackend], engine: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """With container_engine "none", or an engine not on PATH, a container task is
    refused when added (ContainerUnavailable naming the image), nothing is stored, the
    submitter ends the job, and no process ran on the host."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    backend = local(engine)
    marker = tmp_path / "ran-on-host"
    task = TaskSpec(id="0", command_line=f"/usr/bin/touch {marker}",
                    container=ContainerSettings("repo/tool:1"))
    submitter = Submitter(backend=backend, config=SubmitConfig(max_retries=0),
                          metrics=Metrics(registry=CollectorRegistry()))
    try:
        with pytest.raises(ContainerUnavailable) as caught:
            submitter.submit(JobSpec(tasks=[task], task_count=1, id="job-c"), handler="t")
    finally:
        submitter.close()
    assert caught.value.reason == "ContainerUnavailable"
    text = caught.value.description
    assert "repo/tool:1" in text
    assert ("container_engine = \"none\"" in text if engine == "none"
            else "docker is not on PATH" in text)
    assert backend.tasks("job-c") == []
    status = backend.job_status("job-c")
    assert status is not None and status.state == "completed"
    time.sleep(0.2)
    assert not marker.exists()


def test_a_stored_container_task_without_an_engine_fails_never_on_the_host(
        local: Callable[..., LocalBackend], tmp_path: Path) -> None:
    """A container task already in the store (added by another process, or before an
    upgrade) fails as a pre-processing error when no engine runs it."""
    backend = local("none", start=False)
    marker = tmp_path / "ran-on-host"
    backend.create_job(job("job-s"))
    backend.store.add_tasks("job-s", [TaskSpec(id="0", command_line=f"/usr/bin/touch {marker}",
                                               container=ContainerSettings("repo/tool:1"))])
    backend.seal_job("job-s")
    backend.start()
    wait_done(backend, "job-s", 1)
    info = backend.task("job-s", "0")
    assert info is not None and info.failure_code == "ContainerUnavailable"
    assert info.failure_message is not None and "repo/tool:1" in info.failure_message
    failed = backend.failed_tasks("job-s", 5)
    assert failed[0].category == "start_task_failed"
    assert not marker.exists()


def test_the_store_keeps_container_settings_without_the_password() -> None:
    """JSON in the container_image column, read back equal but for the password (the
    local engine pulls with its own credentials); a bare image name is an old row's."""
    hub = ContainerSettings("bot/sim:1", registry=HUB, run_options="--rm")
    text = container_json(hub)
    assert "s3cret" not in text
    back = container_of(text)
    assert back is not None and back.registry is not None
    assert (back.image, back.run_options, back.registry.username) == ("bot/sim:1", "--rm", "bot")
    assert container_of(container_json(SIM)) == SIM
    assert container_of("repo/old:1") == ContainerSettings("repo/old:1")
    assert container_of(None) is None


FAKE_ENGINE = r'''#!{python}
"""A stand-in for docker: `info` answers; `run` records its argv and runs the command
as the engine would, in --workdir, with the --env variables; `rm` records."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ENGINE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[:1] == ["info"] or args[:1] == ["rm"]:
    sys.exit(0)
assert args[0] == "run", args
valued = {{"--name", "--user", "--volume", "--workdir", "--env", "--label", "--entrypoint",
          "--shm-size", "--cap-drop"}}
opts, i = [], 1
while args[i].startswith("-"):
    if args[i] in valued:
        opts.append((args[i], args[i + 1])); i += 2
    else:
        opts.append((args[i], None)); i += 1
image, rest = args[i], args[i + 1:]
if image == "fail/pull:1":
    print("Unable to find image", file=sys.stderr); sys.exit(125)
entry = [v for k, v in opts if k == "--entrypoint"]
workdir = [v for k, v in opts if k == "--workdir"] or ["/"]
env = {{"PATH": "/usr/bin:/bin"}}
env.update({{v: os.environ[v] for k, v in opts if k == "--env"}})
sys.exit(subprocess.run(entry + rest, cwd=workdir[-1], env=env).returncode)
'''


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `docker` on PATH that records each call in the returned log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    engine = bin_dir / "docker"
    engine.write_text(FAKE_ENGINE.format(python=sys.executable))
    engine.chmod(engine.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "engine.log"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_container_tasks_run_through_the_engine_as_batch_runs_them(
        local: Callable[..., LocalBackend], fake_docker: Path) -> None:
    """The engine gets: --rm, a name, this user, the task and shared directories at
    their own paths, the working directory, the task's and Batch's variables by name
    (not the host's PATH), the command's first word as the entrypoint, the run options
    as words, then the image and the rest of the command. The task's files land in its
    working directory; the engine was asked `info` once."""
    backend = local("auto")
    backend.create_job(job("job-d"))
    settings = ContainerSettings("ghcr.io/x/tool:1", run_options="--shm-size 1g --cap-drop ALL")
    tasks = [TaskSpec(id=str(i), environment={"FOO": f"bar {i}"}, container=settings,
                      command_line="/bin/sh -c 'echo \"$FOO $AZ_BATCH_TASK_ID\" > out.txt'")
             for i in range(2)]
    assert backend.add_tasks("job-d", tasks).added == 2
    backend.seal_job("job-d")
    wait_done(backend, "job-d", 2)
    status = backend.job_status("job-d")
    assert status is not None and status.succeeded == 2, backend.tasks("job-d")
    task_dir = backend.task_dir("job-d", "1").absolute()
    assert (task_dir / "wd" / "out.txt").read_text() == "bar 1 1\n"
    recorded = calls(fake_docker)
    assert [c for c in recorded if c[0] == "info"] == [["info"]]
    run = next(c for c in recorded if c[0] == "run" and f"{task_dir}:{task_dir}" in c)
    assert run[:3] == ["run", "--rm", "--name"] and run[3].startswith("fanout-")
    shared = str((backend.home / "shared").absolute())
    pairs = list(zip(run[4::2], run[5::2], strict=False))
    assert ("--user", f"{os.getuid()}:{os.getgid()}") in pairs
    assert ("--volume", f"{shared}:{shared}") in pairs
    assert ("--workdir", str(task_dir / "wd")) in pairs
    env_names = [v for k, v in pairs if k == "--env"]
    assert "FOO" in env_names and "AZ_BATCH_TASK_WORKING_DIR" in env_names
    assert "PATH" not in env_names and "HOME" not in env_names
    assert ("--label", "fanout.task=1") in pairs
    tail = run[run.index("--entrypoint"):]
    assert tail == ["--entrypoint", "/bin/sh", "--shm-size", "1g", "--cap-drop", "ALL",
                    "ghcr.io/x/tool:1", "-c", "echo \"$FOO $AZ_BATCH_TASK_ID\" > out.txt"]


def test_image_default_working_directory_and_engine_errors(
        local: Callable[..., LocalBackend], fake_docker: Path) -> None:
    """containerImageDefault passes no --workdir; an engine error (exit 125: a pull
    that failed) is ContainerMiscError, not retried, and the container is removed."""
    backend = local("docker")
    backend.create_job(job("job-e", max_task_retries=3))
    backend.add_tasks("job-e", [
        TaskSpec(id="wd", command_line="/bin/pwd", container=ContainerSettings(
            "ghcr.io/x/tool:1", working_directory="containerImageDefault")),
        TaskSpec(id="pull", command_line="/bin/true",
                 container=ContainerSettings("fail/pull:1"))])
    backend.seal_job("job-e")
    wait_done(backend, "job-e", 2)
    (run,) = [c for c in calls(fake_docker) if c[0] == "run" and "fanout.task=wd" in c]
    assert "--workdir" not in run
    assert (backend.task_dir("job-e", "wd") / "stdout.txt").read_text() == "/\n"
    pull = backend.task("job-e", "pull")
    assert pull is not None and pull.failure_code == "ContainerMiscError"
    assert pull.retry_count == 0 and pull.exit_code == 125
    assert any(c[:2] == ["rm", "--force"] for c in calls(fake_docker))


def test_engine_detection_is_done_once_and_explains_itself() -> None:
    """`info` is asked once; a missing binary, a failing `info` and "none" each say why."""
    asked: list[list[str]] = []

    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        asked.append(argv)
        if "docker" in argv[0]:
            return subprocess.CompletedProcess(argv, 1, None,  # stdout is DEVNULL
                                               b"Cannot connect to the Docker daemon")
        return subprocess.CompletedProcess(argv, 0, None, b"")

    runtime = ContainerRuntime("auto", which=lambda n: f"/usr/bin/{n}", run=run)
    engine = runtime.engine()
    assert engine is not None and engine.name == "podman"
    assert runtime.engine() is engine and len(asked) == 2
    docker = ContainerRuntime("docker", which=lambda n: f"/usr/bin/{n}", run=run)
    assert docker.engine() is None
    assert "exited 1: Cannot connect to the Docker daemon" in docker.why_not()
    assert "not on PATH" in ContainerRuntime("podman", which=lambda n: None).why_not()
    assert "off" in ContainerRuntime("none").refusal("a:1")
    with pytest.raises(ValueError, match="not auto"):
        ContainerRuntime("lxc")


@pytest.mark.skipif(ContainerRuntime("auto").engine() is None,
                    reason="no container engine answers here (docker info / podman info): "
                           "the real-engine run is covered by the recording fake above")
def test_a_real_engine_runs_a_container_task(local: Callable[..., LocalBackend]) -> None:
    """Where Docker or Podman answers: a busybox task writes into its working directory."""
    backend = local("auto")
    backend.create_job(job("job-r"))
    backend.add_tasks("job-r", [TaskSpec(id="0", container=ContainerSettings("busybox:1.36"),
                                         command_line="/bin/sh -c 'echo hi > out.txt'")])
    backend.seal_job("job-r")
    wait_done(backend, "job-r", 1, timeout=300)
    assert (backend.task_dir("job-r", "0") / "wd" / "out.txt").read_text() == "hi\n"


def test_a_configured_container_program_runs_on_a_container_pool_only(
        peer: BatchPeer, make_settings: Callable[..., Any],
        azure: Callable[..., AzureBatchBackend]) -> None:
    """A sweep of a program configured with an image and an ACR registry, planned by
    the worker's planner and submitted: on a container pool every task carries the
    program's containerSettings; on a pool without containers the submission stops
    with a ConfigFault before a task is sent (the message stays on the queue)."""
    from worker.app import make_planner, make_storage
    from worker.routing import HandlerRegistry, Router

    settings = make_settings(
        registries={"acr": {"server": "myacr.azurecr.io", "identity": IDENTITY}},
        programs={"sim": {"command": "/app/sim --a {a}",
                          "container_image": "myacr.azurecr.io/sim:2",
                          "container_registry": "acr",
                          "container_run_options": "--shm-size 1g"}})
    storage = make_storage(settings)
    planner = make_planner(settings, Router(registry=HandlerRegistry.from_entry_points(),
                                            routes=[], storage=storage, drop_unrouted=False),
                           storage)
    peer.add_pool("docker", container_images=["myacr.azurecr.io/sim:2"])

    def submit(pool: str, key: str) -> None:
        body = {"handler": "sweep", "id": key, "job": {"pool": pool},
                "params": {"program": "sim", "parameters": {"a": [1, 2, 3]}}}
        (planned,) = planner.plan(json.dumps(body).encode(), {}, message_id=key).jobs
        submitter = Submitter(backend=azure(pool), config=SubmitConfig(max_retries=0),
                              metrics=Metrics(registry=CollectorRegistry()))
        try:
            submitter.submit(planned.job, handler="sweep")
        finally:
            submitter.close()

    submit("docker", "boxed")
    (job_id,) = [str(j.body["id"]) for j in peer.jobs() if "boxed" in str(j.body["id"])]
    sent = peer.tasks(job_id)
    assert len(sent) == 3 and all(t["containerSettings"] == {
        "imageName": "myacr.azurecr.io/sim:2", "containerRunOptions": "--shm-size 1g",
        "registry": {"registryServer": "myacr.azurecr.io",
                     "identityReference": {"resourceId": IDENTITY}}} for t in sent)
    assert peer.undocumented == []
    before = len(peer.add_requests)
    with pytest.raises(ConfigFault, match="pool fanout has no container configuration"):
        submit("fanout", "plain")
    assert len(peer.add_requests) == before


def test_recovery_removes_the_container_a_dead_scheduler_left(
        local: Callable[..., LocalBackend], fake_docker: Path) -> None:
    """A container task found running at start-up (its scheduler died with the engine's
    client) has its container removed by name before the task runs again under it."""
    backend = local("docker", start=False)
    backend.create_job(job("job-o"))
    backend.store.add_tasks("job-o", [TaskSpec(id="0", command_line="/bin/true",
                                               container=ContainerSettings("repo/tool:1"))])
    backend.seal_job("job-o")
    (claimed,) = backend.store.claim(1, 2)
    backend.store.mark_running(claimed.seq, 2**22 + 7, None)  # a pid that is not running
    backend.start()
    wait_done(backend, "job-o", 1)
    name = container_name(backend.home, claimed.seq)
    recorded = calls(fake_docker)
    removed = recorded.index(["rm", "--force", name])
    ran = next(i for i, c in enumerate(recorded) if c[0] == "run")
    assert removed < ran and recorded[ran][3] == name
    info = backend.task("job-o", "0")
    assert info is not None and info.result == "success" and info.requeue_count == 1
