"""The Service Bus source against Microsoft's Service Bus emulator (Docker, testcontainers).

The emulator (mcr.microsoft.com/azure-messaging/servicebus-emulator) keeps its state in
SQL Edge, so two containers share a network. Where no Docker engine answers, every test
here is skipped with the reason; the AMQP test peer covers the same ground in every run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from worker.config import QueueConfig, ServiceBusConfig
from worker.sources.servicebus import ServiceBusSource

pytestmark = pytest.mark.docker

EMULATOR = "mcr.microsoft.com/azure-messaging/servicebus-emulator:latest"
SQL_EDGE = "mcr.microsoft.com/azure-sql-edge:latest"
SA_PASSWORD = "Fanout-Test-Only-1"  # a throwaway password for a throwaway container
QUEUE = "jobs"
EMULATOR_CONFIG = {"UserConfig": {
    "Namespaces": [{"Name": "sbemulatorns", "Topics": [], "Queues": [{
        "Name": QUEUE, "Properties": {
            "DeadLetteringOnMessageExpiration": False, "DefaultMessageTimeToLive": "PT1H",
            "DuplicateDetectionHistoryTimeWindow": "PT20S", "ForwardDeadLetteredMessagesTo": "",
            "ForwardTo": "", "LockDuration": "PT5S", "MaxDeliveryCount": 3,
            "RequiresDuplicateDetection": False, "RequiresSession": False}}]}],
    "Logging": {"Type": "File"}}}


def _docker_or_skip() -> None:
    docker = pytest.importorskip("docker")
    try:
        docker.from_env().ping()
    except Exception as exc:  # any failure to reach an engine means: no Docker here
        pytest.skip(f"Docker engine not reachable: {type(exc).__name__}: {exc}"[:300])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(connection string, management port) of a running emulator; removed after."""
    _docker_or_skip()
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network
    from testcontainers.core.waiting_utils import wait_for_logs

    config = tmp_path_factory.mktemp("sb-emulator") / "Config.json"
    config.write_text(json.dumps(EMULATOR_CONFIG))
    with Network() as network:
        sql = (DockerContainer(SQL_EDGE).with_network(network).with_network_aliases("sqledge")
               .with_env("ACCEPT_EULA", "Y").with_env("MSSQL_SA_PASSWORD", SA_PASSWORD))
        bus = (DockerContainer(EMULATOR).with_network(network)
               .with_env("ACCEPT_EULA", "Y").with_env("SQL_SERVER", "sqledge")
               .with_env("MSSQL_SA_PASSWORD", SA_PASSWORD)
               .with_volume_mapping(str(Path(config)),
                                    "/ServiceBus_Emulator/ConfigFiles/Config.json")
               .with_exposed_ports(5672, 5300))
        with sql, bus:
            wait_for_logs(bus, "Emulator Service is Successfully Up!", timeout=300)
            host = bus.get_container_host_ip()
            connection = (f"Endpoint=sb://{host}:{bus.get_exposed_port(5672)};"
                          "SharedAccessKeyName=RootManageSharedAccessKey;"
                          "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;")
            yield connection, int(bus.get_exposed_port(5300))


def _source(emulator: tuple[str, int]) -> ServiceBusSource:
    connection, admin_port = emulator
    return ServiceBusSource(
        servicebus=ServiceBusConfig(connection_string=SecretStr(connection), queue=QUEUE,
                                    batch_size=10),
        queue=QueueConfig(name=QUEUE, lock_duration=5.0, max_delivery_count=3),
        client_options={"retry_total": 2}, emulator_admin_port=admin_port)


def run(coro: Any) -> Any:
    """Run one scenario on a fresh event loop."""
    return asyncio.run(coro)


def test_complete_abandon_and_dead_letter(emulator: tuple[str, int]) -> None:
    """Complete removes, abandon redelivers with count + 1, dead-letter keeps the reason."""
    async def scenario() -> None:
        source = _source(emulator)
        try:
            await source.send(b"done", message_id="e-1")
            [msg] = await source.receive(1, 10)
            assert (msg.message_id, msg.body, msg.delivery_count) == ("e-1", b"done", 0)
            await source.complete(msg)

            await source.send(b"again", message_id="e-2")
            [first] = await source.receive(1, 10)
            await source.abandon(first)
            [second] = await source.receive(1, 10)
            assert (second.message_id, second.delivery_count) == ("e-2", 1)
            await source.dead_letter(second, "InvalidParams", "seed must be a range")

            dead = await source.dead_letters()
            assert [(d.message_id, d.reason, d.description) for d in dead] == [
                ("e-2", "InvalidParams", "seed must be a range")]
        finally:
            await source.close()

    run(scenario())


def test_renewal_and_resubmit(emulator: tuple[str, int]) -> None:
    """A renewed lock moves forward; a resubmitted dead letter returns with its id."""
    async def scenario() -> None:
        source = _source(emulator)
        try:
            await source.send(b"renew", message_id="e-3")
            [msg] = await source.receive(1, 10)
            before = msg.locked_until
            await asyncio.sleep(1)
            after = await source.renew_lock(msg)
            assert before is not None and after > before
            await source.dead_letter(msg, "NoRoute", "no route")
            [dead] = [d for d in await source.dead_letters() if d.message_id == "e-3"]
            assert dead.sequence_number is not None
            assert await source.resubmit(dead.sequence_number) == "e-3"
            [back] = await source.receive(1, 10)
            assert back.message_id == "e-3"
            await source.complete(back)
        finally:
            await source.close()

    run(scenario())
