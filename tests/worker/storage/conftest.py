"""Fixtures for the storage tests: Azurite (plain and with OAuth) and storage factories."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.azurite import ACCOUNT_KEY, Azurite, FakeEntraCredential, run_azurite
from worker.config import BlobConfig
from worker.storage.azure import AzureBlobStorage
from worker.storage.local import LocalStorage


def _start(tmp_path_factory: pytest.TempPathFactory, **options: bool) -> Iterator[Azurite]:
    try:
        with run_azurite(tmp_path_factory.mktemp("azurite"), **options) as azurite:
            yield azurite
    except FileNotFoundError as exc:  # the suite needs Node's package; say how to get it
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service over HTTP, shared-key auth, for the whole session."""
    yield from _start(tmp_path_factory)


@pytest.fixture(scope="session")
def azurite_oauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite over HTTPS accepting bearer tokens (user delegation keys need them)."""
    yield from _start(tmp_path_factory, oauth=True)


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    """A LocalStorage rooted in a fresh directory."""
    return LocalStorage(root=tmp_path / "blobs")


@pytest.fixture
def make_azure() -> Iterator[Callable[..., AzureBlobStorage]]:
    """Build AzureBlobStorage instances for an Azurite; closes them after the test.

    ``make(azurite, key=True, **blob_config)`` signs with the account key, ``key=False``
    with a user delegation key obtained through ``credential`` (a fake Entra ID);
    ``storage`` takes other ``AzureBlobStorage`` arguments (``max_lifetime``, ``clock``).
    """
    made: list[AzureBlobStorage] = []

    def make(azurite: Azurite, *, key: bool = True, credential: Any = None,
             storage: dict[str, Any] | None = None, **config: Any) -> AzureBlobStorage:
        settings: dict[str, Any] = {"account_url": azurite.account_url, **config}
        if key:
            settings.setdefault("account_key", ACCOUNT_KEY)
        options = {"connection_verify": str(azurite.ca_file)} if azurite.ca_file else {}
        built = AzureBlobStorage(
            config=BlobConfig(**settings),
            credential=None if key else (credential or FakeEntraCredential()),
            client_options=options,
            **(storage or {}),
        )
        made.append(built)
        return built

    yield make
    for storage in made:
        storage.close()


@pytest.fixture
def new_container(azurite: Azurite, make_azure: Callable[..., AzureBlobStorage]
                  ) -> Callable[[], str]:
    """Create a fresh, uniquely named container in the plain Azurite."""
    admin = make_azure(azurite)

    def create() -> str:
        name = f"c{uuid.uuid4().hex[:20]}"
        admin.ensure_container(name)
        return name

    return create


def tls_context(azurite: Azurite) -> ssl.SSLContext | None:
    """An SSL context trusting the Azurite's self-signed certificate (None for HTTP)."""
    return ssl.create_default_context(cafile=str(azurite.ca_file)) if azurite.ca_file else None
