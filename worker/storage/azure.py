"""Azure Blob storage: tasks get SAS URLs the worker signs (azure-storage-blob 12.x).

- An input is the blob's URL with a read-only SAS scoped to that one blob.
- An output destination is the container's URL with a SAS that may create and
  write blobs, and nothing else (no read, list or delete): what Batch's
  ``OutputFileBlobContainerDestination`` needs. Blob storage cannot scope a
  container SAS to a name prefix; on a Data Lake Gen2 account
  (``hierarchical_namespace = true``) the SAS is scoped to the prefix's directory
  instead (``sr=d``), the narrowest the service allows.

Every SAS starts five minutes in the past (clock skew between here and the
service) and ends ``lifetime`` from now. The worker passes each job's own lifetime:
its max wall clock (Batch counts it from the job's creation, so it includes the
time tasks wait in the pool) plus ``blob.sas_wait_allowance``, so no SAS expires
while its task waits or runs (``worker.context.sas_lifetime``). Without one, a SAS
gets the storage's ``max_lifetime``, the longest any job may need.

Signing: a *user delegation* SAS (no account key; the worker's Entra ID identity
needs *Storage Blob Data Contributor* and *Storage Blob Delegator*), unless an
account key or a connection string with a key is configured, then an account-key
(service) SAS. The delegation key is fetched once and reused until shortly before
it expires. Signatures never reach logs or exception messages: URLs are logged
through :func:`redact_url`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContainerSasPermissions,
    UserDelegationKey,
    generate_blob_sas,
    generate_container_sas,
)

from handlers.base import BlobRef
from worker.config import BlobConfig
from worker.errors import ConfigFault, SettingsError, SystemFault
from worker.storage.refs import (
    AccountEndpoint,
    check_container,
    check_prefix,
    make_ref,
    parse_blob_url,
    redact_text,
)

__all__ = ["AzureBlobStorage", "SasKind"]

log = structlog.get_logger(__name__)

SasKind = Literal["account_key", "user_delegation"]

#: How far in the past a SAS (and a delegation key) starts: clock skew allowance.
CLOCK_SKEW = timedelta(minutes=5)
#: The service's limit on a user delegation key's life, less a safety margin. A user
#: delegation key's expiry must be within 7 days of the current time ("Get User
#: Delegation Key", https://learn.microsoft.com/rest/api/storageservices/get-user-delegation-key)
#: and a user delegation SAS cannot outlive the key that signed it ("Create a user
#: delegation SAS", https://learn.microsoft.com/rest/api/storageservices/create-user-delegation-sas),
#: so no user delegation SAS lives longer. A service SAS signed with the account key
#: has no such cap (an account's SAS expiration policy may still refuse long ones).
MAX_DELEGATION = timedelta(days=7) - timedelta(minutes=10)
#: The longest SAS lifetime when the caller names none: the default
#: ``limits.max_wall_clock`` (6 days) plus the default ``blob.sas_wait_allowance``.
DEFAULT_MAX_LIFETIME = timedelta(days=6, hours=1)
#: A delegation key is asked for at least this long, so it is not fetched per task.
MIN_DELEGATION = timedelta(days=1)
#: The SDK's retry waits 15 s, then more; these calls sit in a message's path.
CLIENT_DEFAULTS: Mapping[str, Any] = {"retry_total": 3, "initial_backoff": 1, "increment_base": 2}
STORAGE_SCOPE = "https://storage.azure.com/.default"
_FAULTS = (HttpResponseError, ServiceRequestError, ServiceResponseError)


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class AzureBlobStorage:
    """Blob storage in one Azure Storage account; implements ``Storage``.

    ``credential`` overrides the Entra ID credential (default: a managed identity
    when ``managed_identity_client_id`` is set, else ``DefaultAzureCredential``).
    ``client_options`` go to ``BlobServiceClient`` (``connection_verify`` for a test
    peer's certificate, say); ``clock`` returns the current UTC time. ``max_lifetime``
    is the longest SAS lifetime any job may ask for (``limits.max_wall_clock`` plus
    ``blob.sas_wait_allowance``): the lifetime of a SAS whose caller names none, and
    what a delegation key is fetched to cover; with user delegation signing, more than
    :data:`MAX_DELEGATION` is a ``SettingsError``.
    """

    def __init__(
        self,
        *,
        config: BlobConfig,
        credential: TokenCredential | None = None,
        client_options: Mapping[str, Any] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
    ) -> None:
        if max_lifetime <= timedelta(0):
            raise SettingsError(f"the longest SAS lifetime must be positive, not {max_lifetime}")
        self.max_lifetime = max_lifetime
        self._hns = config.hierarchical_namespace
        self._clock = clock
        self._lock = threading.Lock()
        self._delegation: tuple[UserDelegationKey, datetime] | None = None
        options = {**CLIENT_DEFAULTS, **(client_options or {})}
        self._service, self._account_key = _client(config, credential, options)
        self._credential = None if self._account_key else self._service.credential
        name = config.account_name or getattr(self._service, "account_name", None)
        self.endpoint = _endpoint(self._service.url, name)
        self.endpoints = _accepted(self.endpoint, config)
        self.sas_kind: SasKind = "account_key" if self._account_key else "user_delegation"
        cap = longest_sas(self.sas_kind)
        if cap is not None and max_lifetime > cap:
            raise SettingsError(
                f"a SAS lifetime of {max_lifetime} is longer than a user delegation SAS may "
                f"live ({cap}: a user delegation key is valid at most 7 days, less a "
                "10-minute margin); lower limits.max_wall_clock or blob.sas_wait_allowance, "
                "or sign with an account key"
            )

    def __repr__(self) -> str:
        return f"AzureBlobStorage(account_url={self.endpoint.url!r}, sas={self.sas_kind})"

    @property
    def account_name(self) -> str:
        """The storage account's name (signs the SAS)."""
        return self.endpoint.account

    @property
    def service(self) -> BlobServiceClient:
        """The SDK client, for tooling and tests."""
        return self._service

    def close(self) -> None:
        """Close the SDK client's connections."""
        self._service.close()

    def parse_url(self, url: str) -> BlobRef:
        """Parse a blob URL of the configured account (its ``.blob.`` or ``.dfs.``
        endpoint, or an alias); any other is ``ForeignStorage``."""
        return parse_blob_url(url, self.endpoints)

    def input_url(self, ref: BlobRef, *, lifetime: timedelta | None = None) -> str:
        """The blob's URL with a read-only SAS for that one blob, valid ``lifetime``
        from now (default: ``max_lifetime``)."""
        ref = make_ref(ref.container, ref.blob)
        start, expiry = self._window(lifetime)
        sas = generate_blob_sas(
            self.account_name,
            ref.container,
            ref.blob,
            permission=BlobSasPermissions(read=True),
            start=start,
            expiry=expiry,
            protocol=self._protocol,
            **self._signer(expiry),
        )
        url = self.endpoint.blob_url(ref)
        log.debug("sas_issued", url=url, rights="r", scope="blob", expiry=expiry.isoformat())
        return f"{url}?{sas}"

    def output_container_url(self, container: str, prefix: str, *,
                             lifetime: timedelta | None = None) -> str:
        """The container's URL with a create+write SAS (no read, list or delete), valid
        ``lifetime`` from now (default: ``max_lifetime``).

        On a hierarchical-namespace account the SAS covers only the directory of
        ``prefix`` (``renders/job1/`` or ``renders/job1/frame-`` -> ``renders/job1``);
        otherwise, and for a prefix with no directory, the whole container.
        """
        container = check_container(container)
        directory = _directory(check_prefix(prefix)) if self._hns else ""
        start, expiry = self._window(lifetime)
        rights = dict(create=True, write=True)
        if directory:
            sas = generate_blob_sas(
                self.account_name, container, directory, is_directory=True,
                permission=BlobSasPermissions(**rights), start=start, expiry=expiry,
                protocol=self._protocol, **self._signer(expiry),
            )
        else:
            sas = generate_container_sas(
                self.account_name, container, permission=ContainerSasPermissions(**rights),
                start=start, expiry=expiry, protocol=self._protocol, **self._signer(expiry),
            )
        url = self.endpoint.container_url(container)
        log.debug("sas_issued", url=url, rights="cw", scope=directory or "container",
                  expiry=expiry.isoformat())
        return f"{url}?{sas}"

    def input_container_url(self, container: str, prefix: str, *,
                            lifetime: timedelta | None = None) -> str:
        """The container's URL with a read+list SAS, for a resource file that stages
        every blob under ``prefix`` (Batch lists the container, so the SAS is
        container-wide; it grants no write, create or delete); valid ``lifetime``."""
        container = check_container(container)
        check_prefix(prefix)
        start, expiry = self._window(lifetime)
        sas = generate_container_sas(
            self.account_name, container,
            permission=ContainerSasPermissions(read=True, list=True),
            start=start, expiry=expiry, protocol=self._protocol, **self._signer(expiry),
        )
        url = self.endpoint.container_url(container)
        log.debug("sas_issued", url=url, rights="rl", scope="container",
                  expiry=expiry.isoformat())
        return f"{url}?{sas}"

    def upload(self, ref: BlobRef, data: bytes) -> None:
        """Write (or overwrite) a block blob."""
        ref = make_ref(ref.container, ref.blob)
        with _faults(f"upload of {ref}"):
            self._service.get_blob_client(ref.container, ref.blob).upload_blob(
                data, overwrite=True
            )

    def download(self, ref: BlobRef) -> bytes:
        """Read a blob; ``FileNotFoundError`` if there is none."""
        ref = make_ref(ref.container, ref.blob)
        with _faults(f"download of {ref}"):
            try:
                blob = self._service.get_blob_client(ref.container, ref.blob)
                return bytes(blob.download_blob().readall())
            except ResourceNotFoundError:
                raise FileNotFoundError(f"blob {ref} does not exist") from None

    def read_tail(self, ref: BlobRef, max_bytes: int) -> bytes | None:
        """The last ``max_bytes`` of a blob: its size from Get Blob Properties, then one
        ranged Get Blob (``download_blob(offset, length)``, sent as ``x-ms-range``);
        never the whole blob. None when the blob does not exist. A blob that shrank
        between the two calls (HTTP 416) is measured and read once more."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, not {max_bytes}")
        ref = make_ref(ref.container, ref.blob)
        with _faults(f"tail of {ref}"):
            blob = self._service.get_blob_client(ref.container, ref.blob)
            for attempt in (1, 2):
                try:
                    size = int(blob.get_blob_properties().size or 0)
                    if size == 0 or max_bytes == 0:
                        return b""
                    offset = max(0, size - max_bytes)
                    return bytes(blob.download_blob(offset=offset,
                                                    length=size - offset).readall())
                except ResourceNotFoundError:
                    return None
                except HttpResponseError as exc:
                    if exc.status_code != 416 or attempt == 2:
                        raise
        return None  # pragma: no cover - the loop returns or raises

    def exists(self, ref: BlobRef) -> bool:
        """True when the blob exists."""
        ref = make_ref(ref.container, ref.blob)
        with _faults(f"lookup of {ref}"):
            return bool(self._service.get_blob_client(ref.container, ref.blob).exists())

    def list(self, container: str, prefix: str = "") -> list[BlobRef]:
        """The blobs in ``container`` whose names start with ``prefix``, sorted by name."""
        container, prefix = check_container(container), check_prefix(prefix)
        with _faults(f"listing of {container}"):
            client = self._service.get_container_client(container)
            try:
                names = [b.name for b in client.list_blobs(name_starts_with=prefix or None)]
            except ResourceNotFoundError:
                return []
        return [BlobRef(container=container, blob=name) for name in sorted(names)]

    def ensure_container(self, container: str) -> None:
        """Create a container if it is missing."""
        container = check_container(container)
        with _faults(f"creation of container {container}"), suppress(ResourceExistsError):
            self._service.create_container(container)

    @property
    def _protocol(self) -> str | None:
        return "https" if self.endpoint.scheme == "https" else None

    def _window(self, lifetime: timedelta | None) -> tuple[datetime, datetime]:
        """From ``CLOCK_SKEW`` ago to ``lifetime`` from now (``max_lifetime`` when None);
        a lifetime over ``max_lifetime`` is a bug of the caller's (the worker caps it)."""
        life = self.max_lifetime if lifetime is None else lifetime
        if not timedelta(0) < life <= self.max_lifetime:
            raise ValueError(f"a SAS lifetime of {life} is outside 0..{self.max_lifetime}")
        now = self._clock()
        return now - CLOCK_SKEW, now + life

    def _signer(self, expiry: datetime) -> dict[str, Any]:
        if self._account_key:
            return {"account_key": self._account_key}
        return {"user_delegation_key": self._delegation_key(expiry)}

    def _delegation_key(self, needed_until: datetime) -> UserDelegationKey:
        """The cached user delegation key, fetched again when it would lapse first."""
        with self._lock:
            if self._delegation is not None and self._delegation[1] >= needed_until:
                return self._delegation[0]
            now = self._clock()
            longest = max(MIN_DELEGATION, self.max_lifetime + timedelta(hours=1))
            expiry = now + min(MAX_DELEGATION, longest)  # >= needed_until
            with _faults(f"user delegation key from {self.endpoint.display}"):
                if self._credential is not None:
                    # Fail fast: the SDK retries a credential error with backoff.
                    self._credential.get_token(STORAGE_SCOPE)
                key = self._service.get_user_delegation_key(now - CLOCK_SKEW, expiry)
            self._delegation = (key, expiry)
            log.info("delegation_key_fetched", account=self.account_name,
                     expiry=expiry.isoformat())
            return key


def sas_kind_of(config: BlobConfig) -> SasKind:
    """How task SAS are signed under ``config``: with the account key when one is set
    (``account_key``, or a connection string, which must then carry an AccountKey),
    else with a user delegation key through Entra ID."""
    return "account_key" if config.account_key or config.connection_string else "user_delegation"


def longest_sas(kind: SasKind) -> timedelta | None:
    """The longest lifetime a SAS signed this way may have: :data:`MAX_DELEGATION` for a
    user delegation SAS; None (no cap of the service's) for an account-key service SAS."""
    return MAX_DELEGATION if kind == "user_delegation" else None


def _client(
    config: BlobConfig, credential: TokenCredential | None, options: dict[str, Any]
) -> tuple[BlobServiceClient, str | None]:
    """The SDK client and the account key (None when signing with Entra ID)."""
    if config.connection_string is not None:
        try:
            service = BlobServiceClient.from_connection_string(
                config.connection_string.get_secret_value(), **options
            )
        except ValueError:
            raise SettingsError("blob.connection_string is malformed") from None
        key = getattr(service.credential, "account_key", None)
        if not key:
            raise SettingsError(
                "blob.connection_string has no AccountKey: fanout cannot sign task SAS "
                "with it; give an AccountKey, or an account_url for Entra ID"
            )
        return service, str(key)
    if not config.account_url:
        raise SettingsError("blob storage needs blob.account_url or blob.connection_string")
    endpoint = _endpoint(config.account_url, config.account_name)
    if config.account_key is not None:
        key = config.account_key.get_secret_value()
        shared = {"account_name": endpoint.account, "account_key": key}
        return BlobServiceClient(endpoint.url, credential=shared, **options), key
    token = credential or _default_credential(config.managed_identity_client_id)
    return BlobServiceClient(endpoint.url, credential=token, **options), None


def _default_credential(client_id: str | None) -> TokenCredential:
    """A managed identity with ``client_id``, else the default Entra ID chain."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if client_id:
        return ManagedIdentityCredential(client_id=client_id)
    return DefaultAzureCredential()


def _endpoint(url: str, account_name: str | None) -> AccountEndpoint:
    try:
        return AccountEndpoint.parse(url, account_name=account_name)
    except ValueError as exc:
        raise SettingsError(f"blob.account_url: {exc}") from None


def _accepted(primary: AccountEndpoint, config: BlobConfig) -> tuple[AccountEndpoint, ...]:
    """The primary endpoint, its ``.dfs.`` twin, and the configured aliases."""
    found = [primary]
    twin = primary.dfs_twin()
    if twin:
        found.append(twin)
    for alias in config.alias_urls:
        try:
            found.append(AccountEndpoint.parse(alias, account_name=primary.account))
        except ValueError as exc:
            raise SettingsError(f"blob.alias_urls: {exc}") from None
    return tuple(dict.fromkeys(found))


def _directory(prefix: str) -> str:
    """The directory part of a name prefix: ``a/b/`` and ``a/b/c-`` -> ``a/b``."""
    return prefix.rpartition("/")[0]


@contextmanager
def _faults(action: str) -> Iterator[None]:
    """Turn SDK errors into the worker's faults, with no URL, header or signature."""
    try:
        yield
    except ClientAuthenticationError as exc:
        code = _error_code(exc) or "AuthenticationFailed"
        raise ConfigFault(f"{action} refused: {_summary(exc)}", code=code) from None
    except _FAULTS as exc:
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
            raise ConfigFault(f"{action} failed: {_summary(exc)}",
                              code=_error_code(exc) or str(status)) from None
        raise SystemFault(f"{action} failed: {_summary(exc)}") from None


def _error_code(exc: Exception) -> str | None:
    """The service's error code (``AuthorizationPermissionMismatch``...), if any."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code)) if code else None


def _summary(exc: Exception) -> str:
    """Status and error code of an SDK error, or the first line of a credential error."""
    status = getattr(exc, "status_code", None)
    code = _error_code(exc)
    if status is not None or code is not None:
        return f"HTTP {status} {code or ''}".strip()
    text = str(exc).strip()
    return redact_text(text.splitlines()[0])[:300] if text else type(exc).__name__
