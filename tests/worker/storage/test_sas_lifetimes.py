"""SAS lifetimes computed from the limits, through the real planner, the real
azure-storage-blob SDK and Azurite: each job's SAS expires at its own max wall clock
(the message's job option, else `jobs.max_wall_clock`, capped by
`limits.max_wall_clock`) plus `blob.sas_wait_allowance`, and the emulator takes it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from handlers.base import BlobRef, BuildContext, BuildRequest, JobSpec, TaskSpec
from handlers.errors import BudgetExceeded
from tests.fakes.azurite import ACCOUNT_KEY, Azurite, FakeEntraCredential
from tests.worker.storage.conftest import tls_context
from worker.app import build_planner, longest_sas_lifetime
from worker.config import Settings
from worker.plan import Planner
from worker.routing import HandlerRegistry
from worker.storage.azure import AzureBlobStorage

NOW = datetime.now(UTC).replace(microsecond=0)
CONTAINER = "lifetimes"


def _expiry(url: str, key: str = "se") -> datetime:
    value = parse_qs(urlsplit(url).query)[key][0]
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _get(url: str, azurite: Azurite) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10, context=tls_context(azurite)) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class Plain:
    """A plug-in handler that asks for one input URL, an output URL and a staging URL,
    and may set a job wall clock of its own."""

    def __init__(self, wall: timedelta | None = None) -> None:
        self.wall = wall

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        from handlers.base import OutputFile, ResourceFile

        ref = ctx.blob_ref({"container": CONTAINER, "blob": "in put.bin"})
        task = TaskSpec(id="0", command_line="true",
                        resource_files=[ResourceFile(ctx.input_url(ref), "in.bin"),
                                        ResourceFile("", "all", storage_container_url=ctx
                                                     .input_container_url(CONTAINER, "in"),
                                                     blob_prefix="in")],
                        output_files=[OutputFile("out.bin", ctx.output_container_url(
                            CONTAINER, "out/"), "out/out.bin")])
        return JobSpec(tasks=[task], task_count=1, max_wall_clock=self.wall)


@pytest.fixture
def lifetimes(make_settings: Callable[..., Settings]
              ) -> Iterator[Callable[..., tuple[Planner, AzureBlobStorage]]]:
    """A planner over an AzureBlobStorage whose clock stands at NOW, built the way the
    worker builds it (`max_lifetime` from the limits), with Azure log uploads on."""
    made: list[AzureBlobStorage] = []

    def make(azurite: Azurite, *, key: bool = True, handler: Any = None,
             **overrides: Any) -> tuple[Planner, AzureBlobStorage]:
        blob = {"account_url": azurite.account_url, **overrides.pop("blob", {})}
        if key:
            blob["account_key"] = ACCOUNT_KEY
        settings = make_settings(blob=blob, batch={"account_url": "https://b.batch.invalid"},
                                 **overrides)
        options = {"connection_verify": str(azurite.ca_file)} if azurite.ca_file else {}
        storage = AzureBlobStorage(config=settings.blob, clock=lambda: NOW,
                                   credential=None if key else FakeEntraCredential(),
                                   client_options=options,
                                   max_lifetime=longest_sas_lifetime(settings))
        made.append(storage)
        handlers = HandlerRegistry({"plain": handler or Plain()})
        storage.ensure_container(CONTAINER)
        storage.ensure_container(settings.jobs.logs_container)
        storage.upload(BlobRef(CONTAINER, "in put.bin"), b"input")
        return build_planner(settings, storage, handlers=handlers), storage

    yield make
    for storage in made:
        storage.close()


def _urls(planner: Planner, job: dict[str, Any] | None = None) -> list[str]:
    """Every SAS URL of the one task of a `plain` message: input, staging, output, logs."""
    body = json.dumps({"handler": "plain", "id": f"k-{json.dumps(job)}",
                       "job": job or {}}).encode()
    (planned,) = planner.plan(body).jobs
    (task,) = list(planned.job.tasks)
    inputs = [r.http_url or r.storage_container_url or "" for r in task.resource_files]
    return inputs + [o.container_url for o in task.output_files]


@pytest.mark.parametrize("job, lifetime", [
    (None, timedelta(days=1, hours=1)),  # jobs.max_wall_clock P1D + PT1H
    ({"max_wall_clock": "PT6H"}, timedelta(hours=7)),  # the message's own wall clock
    ({"max_wall_clock": "P6D"}, timedelta(days=6, hours=1)),  # at the limit
])
def test_every_sas_of_a_job_lives_its_wall_clock_plus_the_allowance(
        azurite: Azurite, lifetimes: Callable[..., tuple[Planner, AzureBlobStorage]],
        job: dict[str, Any] | None, lifetime: timedelta) -> None:
    """Inputs, staging, outputs and log uploads: `se` is NOW + wall clock + allowance,
    and the emulator accepts the signature (the input downloads)."""
    planner, _ = lifetimes(azurite)
    urls = _urls(planner, job)
    assert len(urls) == 4
    assert {_expiry(url) for url in urls} == {NOW + lifetime}
    assert _get(urls[0], azurite) == 200


def test_the_allowance_and_the_default_wall_clock_are_settings(
        azurite: Azurite, lifetimes: Callable[..., tuple[Planner, AzureBlobStorage]]) -> None:
    """`blob.sas_wait_allowance` and `jobs.max_wall_clock` set the default lifetime."""
    planner, _ = lifetimes(azurite, blob={"sas_wait_allowance": "PT3H"},
                           jobs={"max_wall_clock": "PT2H"})
    assert {_expiry(url) for url in _urls(planner)} == {NOW + timedelta(hours=5)}
    assert {_expiry(url) for url in _urls(planner, {"max_wall_clock": "P2D"})} == {
        NOW + timedelta(days=2, hours=3)}


def test_a_wall_clock_over_the_limit_is_refused(
        azurite: Azurite, lifetimes: Callable[..., tuple[Planner, AzureBlobStorage]]) -> None:
    """A job asking for more than the limit is BudgetExceeded (its SAS are never used)."""
    planner, _ = lifetimes(azurite)
    with pytest.raises(BudgetExceeded, match="limits.max_wall_clock"):
        _urls(planner, {"max_wall_clock": "P30D"})


def test_a_handler_s_own_longer_wall_clock_gets_sas_that_long(
        azurite: Azurite, lifetimes: Callable[..., tuple[Planner, AzureBlobStorage]]) -> None:
    """A handler that sets a longer job wall clock than the default is built again, so
    its SAS cover it; a message's option still wins over the handler's."""
    planner, _ = lifetimes(azurite, handler=Plain(wall=timedelta(days=3)))
    assert {_expiry(url) for url in _urls(planner)} == {NOW + timedelta(days=3, hours=1)}
    assert {_expiry(url) for url in _urls(planner, {"max_wall_clock": "PT1H"})} == {
        NOW + timedelta(hours=2)}


def test_user_delegation_sas_at_the_limit_is_accepted_by_the_service(
        azurite_oauth: Azurite, lifetimes: Callable[..., tuple[Planner, AzureBlobStorage]]
        ) -> None:
    """With Entra ID signing the longest job (limits.max_wall_clock P6D + PT1H) still
    fits the delegation key: the key outlives the SAS and Azurite serves the blob."""
    planner, storage = lifetimes(azurite_oauth, key=False)
    assert storage.sas_kind == "user_delegation"
    urls = _urls(planner, {"max_wall_clock": "P6D"})
    assert {_expiry(url) for url in urls} == {NOW + timedelta(days=6, hours=1)}
    assert all(_expiry(url, "ske") >= NOW + timedelta(days=6, hours=1) for url in urls)
    assert _get(urls[0], azurite_oauth) == 200
    default = _urls(planner)
    assert {_expiry(url) for url in default} == {NOW + timedelta(days=1, hours=1)}
    assert _get(default[0], azurite_oauth) == 200
