"""AzureBlobStorage against Azurite: real SDK, real HTTP, real SAS checks by the emulator."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import structlog
from azure.core.exceptions import ClientAuthenticationError
from azure.storage.blob import BlobServiceClient, ContainerClient
from pydantic import SecretStr

from handlers.base import BlobRef
from handlers.errors import ForeignStorage
from tests.fakes.azurite import ACCOUNT_KEY, Azurite, FakeEntraCredential
from tests.worker.storage.conftest import tls_context
from worker.config import BlobConfig
from worker.errors import ConfigFault, SettingsError
from worker.storage import azure as azure_module
from worker.storage.azure import AzureBlobStorage

Make = Callable[..., AzureBlobStorage]
NAMES = ["a.mp4", "2026/11/my clip.mp4", "été/名前.mp4", "100%?#.mp4", "my clip; rm -rf ~.mp4"]


def _http(method: str, url: str, azurite: Azurite, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One plain HTTP request (no SDK); returns status and body, errors included."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=tls_context(azurite)) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _put(url: str, azurite: Azurite, data: bytes) -> int:
    return _http("PUT", url, azurite, data, {"x-ms-blob-type": "BlockBlob"})[0]


def _with_path(container_url: str, blob: str) -> str:
    """``<container>/<blob>?<sas>`` from a container SAS URL, as Batch builds it."""
    base, _, query = container_url.partition("?")
    return f"{base}/{quote(blob)}?{query}"


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@pytest.mark.parametrize("name", NAMES)
def test_input_sas_url_downloads_the_blob(azurite: Azurite, make_azure: Make,
                                          new_container: Callable[[], str], name: str) -> None:
    """A blob uploaded with the SDK downloads through the generated SAS URL over plain HTTP."""
    container = new_container()
    sdk = BlobServiceClient.from_connection_string(azurite.connection_string)
    sdk.get_blob_client(container, name).upload_blob(name.encode())
    url = make_azure(azurite).input_url(BlobRef(container, name))
    assert _http("GET", url, azurite) == (200, name.encode())


def test_input_sas_is_read_only_and_scoped_to_one_blob(azurite: Azurite, make_azure: Make,
                                                       new_container: Callable[[], str]) -> None:
    """The input SAS cannot write its blob, read a sibling, or list the container."""
    container = new_container()
    storage = make_azure(azurite)
    storage.upload(BlobRef(container, "a.mp4"), b"a")
    storage.upload(BlobRef(container, "b.mp4"), b"b")
    url = storage.input_url(BlobRef(container, "a.mp4"))
    query = url.partition("?")[2]
    assert _put(url, azurite, b"overwritten") == 403
    assert _http("GET", url.replace("/a.mp4?", "/b.mp4?"), azurite)[0] == 403
    listing = f"{azurite.account_url}/{container}?restype=container&comp=list&{query}"
    assert _http("GET", listing, azurite)[0] == 403
    assert storage.download(BlobRef(container, "a.mp4")) == b"a"


def test_input_sas_window(azurite: Azurite, make_azure: Make) -> None:
    """The SAS is read-only on one blob, starts in the past and ends `lifetime` from now
    (`max_lifetime` when the caller names none)."""
    storage = make_azure(azurite, storage={"max_lifetime": timedelta(hours=3)})
    before = datetime.now(UTC).replace(microsecond=0)
    query = _query(storage.input_url(BlobRef("videos", "a.mp4"),
                                     lifetime=timedelta(seconds=1800)))
    default = _query(storage.input_url(BlobRef("videos", "a.mp4")))
    after = datetime.now(UTC)
    start = datetime.fromisoformat(query["st"].replace("Z", "+00:00"))
    expiry = datetime.fromisoformat(query["se"].replace("Z", "+00:00"))
    assert (query["sp"], query["sr"]) == ("r", "b")
    assert before - timedelta(minutes=6) <= start <= after - timedelta(minutes=4)
    assert before + timedelta(seconds=1800) <= expiry <= after + timedelta(seconds=1800)
    longest = datetime.fromisoformat(default["se"].replace("Z", "+00:00"))
    assert before + timedelta(hours=3) <= longest <= after + timedelta(hours=3)
    for wrong in (timedelta(hours=3, seconds=1), timedelta(0)):
        with pytest.raises(ValueError, match="SAS lifetime"):
            storage.output_container_url("videos", "", lifetime=wrong)


def test_expired_sas_is_refused_by_the_service(azurite: Azurite, new_container: Callable[[], str]
                                               ) -> None:
    """A SAS signed with a clock its lifetime+1h in the past is refused: expiry is real."""
    container = new_container()
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    storage = AzureBlobStorage(
        config=BlobConfig(account_url=azurite.account_url, account_key=SecretStr(ACCOUNT_KEY)),
        clock=lambda: past, max_lifetime=timedelta(hours=2),
    )
    storage.upload(BlobRef(container, "a.mp4"), b"a")
    assert _http("GET", storage.input_url(BlobRef(container, "a.mp4")), azurite)[0] == 403
    storage.close()


def test_output_sas_writes_but_cannot_read_list_or_delete(
    azurite: Azurite, make_azure: Make, new_container: Callable[[], str]
) -> None:
    """The output container SAS creates blobs; reading, listing and deleting are refused."""
    container = new_container()
    storage = make_azure(azurite)
    url = storage.output_container_url(container, "renders/job1/")
    assert _query(url)["sp"] == "cw" and _query(url)["sr"] == "c"
    blob_url = _with_path(url, "renders/job1/frame 0001.png")
    assert _put(blob_url, azurite, b"png") == 201
    assert storage.download(BlobRef(container, "renders/job1/frame 0001.png")) == b"png"
    assert _http("GET", blob_url, azurite)[0] == 403
    listing = f"{url.partition('?')[0]}?restype=container&comp=list&{url.partition('?')[2]}"
    assert _http("GET", listing, azurite)[0] == 403
    assert _http("DELETE", blob_url, azurite)[0] == 403


def test_output_sas_allows_block_uploads(azurite: Azurite, make_azure: Make,
                                         new_container: Callable[[], str]) -> None:
    """The SDK uploads a multi-block blob with the output SAS (Put Block + Put Block List)."""
    container = new_container()
    storage = make_azure(azurite)
    url = storage.output_container_url(container, "")
    data = bytes(range(256)) * 64
    with ContainerClient.from_container_url(url, max_single_put_size=1024,
                                            max_block_size=1024) as client:
        client.upload_blob("out/big.bin", data)
    assert storage.download(BlobRef(container, "out/big.bin")) == data


def test_parse_url_of_the_configured_account(azurite: Azurite, make_azure: Make) -> None:
    """Azurite's own blob URLs parse; another port, host or account is ForeignStorage."""
    storage = make_azure(azurite)
    port = urlsplit(azurite.url).port
    assert port is not None
    assert storage.parse_url(f"{azurite.account_url}/videos/my%20clip.mp4") == BlobRef(
        "videos", "my clip.mp4")
    signed = storage.input_url(BlobRef("videos", "a b.mp4"))
    assert storage.parse_url(signed.partition("?")[0]) == BlobRef("videos", "a b.mp4")
    for foreign in (f"http://127.0.0.1:{port + 1}/devstoreaccount1/videos/a",
                    f"http://localhost:{port}/devstoreaccount1/videos/a",
                    f"http://127.0.0.1:{port}/otheraccount/videos/a",
                    "https://devstoreaccount1.blob.core.windows.net/videos/a"):
        with pytest.raises(ForeignStorage):
            storage.parse_url(foreign)


def test_alias_urls_are_accepted(azurite: Azurite, make_azure: Make) -> None:
    """An alias URL of the same account (here localhost) is accepted when configured."""
    port = urlsplit(azurite.url).port
    alias = f"http://localhost:{port}/devstoreaccount1"
    storage = make_azure(azurite, alias_urls=[alias])
    assert storage.parse_url(f"{alias}/videos/a.mp4") == BlobRef("videos", "a.mp4")


def test_host_style_account_accepts_its_dfs_twin() -> None:
    """A .blob. account also accepts its Data Lake .dfs. URLs (Gen2 events carry them)."""
    storage = AzureBlobStorage(config=BlobConfig(
        account_url="https://stmedia01.blob.core.windows.net", account_key=SecretStr(ACCOUNT_KEY)))
    ref = storage.parse_url("https://stmedia01.dfs.core.windows.net/lake/raw/a.csv")
    assert ref == BlobRef("lake", "raw/a.csv")
    assert storage.input_url(ref).startswith("https://stmedia01.blob.core.windows.net/lake/raw/")
    assert _query(storage.input_url(ref))["spr"] == "https"
    storage.close()


def test_upload_download_list_exists(azurite: Azurite, make_azure: Make,
                                     new_container: Callable[[], str]) -> None:
    """The tooling helpers round-trip through the service."""
    container = new_container()
    storage = make_azure(azurite)
    for name in ["b/2", "a/1", "b/1"]:
        storage.upload(BlobRef(container, name), name.encode())
    assert [r.blob for r in storage.list(container, "b/")] == ["b/1", "b/2"]
    assert storage.exists(BlobRef(container, "a/1"))
    assert not storage.exists(BlobRef(container, "a/2"))
    assert storage.list(f"missing{uuid.uuid4().hex[:8]}") == []
    with pytest.raises(FileNotFoundError, match="a/2"):
        storage.download(BlobRef(container, "a/2"))


def test_connection_string_signs_with_its_key(azurite: Azurite,
                                              new_container: Callable[[], str]) -> None:
    """A connection string with an AccountKey configures the account and signs SAS."""
    container = new_container()
    config = BlobConfig(connection_string=SecretStr(azurite.connection_string))
    storage = AzureBlobStorage(config=config)
    assert storage.sas_kind == "account_key"
    storage.upload(BlobRef(container, "a"), b"via connection string")
    assert _http("GET", storage.input_url(BlobRef(container, "a")), azurite)[1] == (
        b"via connection string")
    storage.close()


@pytest.mark.parametrize(("config", "problem"), [
    ({}, "account_url or blob.connection_string"),
    ({"connection_string": "BlobEndpoint=https://a.blob.core.windows.net;"
                           "SharedAccessSignature=sv=1&sig=c2VjcmV0"}, "no AccountKey"),
    ({"connection_string": "garbage"}, "malformed"),
    ({"account_url": "https://media.example.com", "account_key": ACCOUNT_KEY}, "account_name"),
    ({"account_url": "https://a.blob.core.windows.net", "account_key": ACCOUNT_KEY,
      "alias_urls": ["ftp://x"]}, "alias_urls"),
])
def test_unusable_configuration_is_a_settings_error(config: dict[str, Any], problem: str) -> None:
    """Configurations that cannot sign task SAS fail at start-up, without echoing secrets."""
    with pytest.raises(SettingsError) as caught:
        AzureBlobStorage(config=BlobConfig(**config), credential=FakeEntraCredential())
    assert problem in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)


def test_user_delegation_sas_cannot_outlive_its_key() -> None:
    """With Entra ID signing, a longest lifetime over 7 days less 10 minutes is refused
    at start-up (a user delegation key lives at most 7 days); an account key has no cap."""
    url = "https://a.blob.core.windows.net"
    with pytest.raises(SettingsError, match="longer than a user delegation SAS may live"):
        AzureBlobStorage(config=BlobConfig(account_url=url), credential=FakeEntraCredential(),
                         max_lifetime=timedelta(days=7))
    AzureBlobStorage(config=BlobConfig(account_url=url), credential=FakeEntraCredential(),
                     max_lifetime=timedelta(days=7) - timedelta(minutes=10)).close()
    AzureBlobStorage(config=BlobConfig(account_url=url, account_key=SecretStr(ACCOUNT_KEY)),
                     max_lifetime=timedelta(days=400)).close()


def test_hierarchical_namespace_scopes_output_sas_to_the_directory() -> None:
    """On a Gen2 account the output SAS is a directory SAS (sr=d) for the prefix's folder.

    Azurite has no hierarchical namespace, so this checks the SAS's fields only.
    """
    storage = AzureBlobStorage(config=BlobConfig(
        account_url="https://stlake.blob.core.windows.net", account_key=SecretStr(ACCOUNT_KEY),
        hierarchical_namespace=True))
    scoped = _query(storage.output_container_url("renders", "shot 1/job1/frame-"))
    assert (scoped["sr"], scoped["sdd"], scoped["sp"]) == ("d", "2", "cw")
    assert _query(storage.output_container_url("renders", "job1/"))["sdd"] == "1"
    assert _query(storage.output_container_url("renders", "frame-"))["sr"] == "c"
    url = storage.output_container_url("renders", "job1/")
    assert url.startswith("https://stlake.blob.core.windows.net/renders?")
    storage.close()


def test_user_delegation_sas_works_end_to_end(
    azurite_oauth: Azurite, make_azure: Make
) -> None:
    """With Entra ID (a fake token issuer), a user delegation SAS reads and writes for real."""
    admin = make_azure(azurite_oauth)
    container = f"c{uuid.uuid4().hex[:20]}"
    admin.ensure_container(container)
    admin.upload(BlobRef(container, "in put.mp4"), b"input")
    storage = make_azure(azurite_oauth, key=False)
    assert storage.sas_kind == "user_delegation"
    url = storage.input_url(BlobRef(container, "in put.mp4"))
    assert {"skoid", "sktid", "ske"} <= set(_query(url))
    assert _http("GET", url, azurite_oauth) == (200, b"input")
    assert _put(url, azurite_oauth, b"x") == 403
    tampered = url.replace("sig=", "sig=AA")
    assert _http("GET", tampered, azurite_oauth)[0] == 403
    out = storage.output_container_url(container, "out/")
    assert _put(_with_path(out, "out/result.mp4"), azurite_oauth, b"result") == 201
    assert _http("GET", _with_path(out, "out/result.mp4"), azurite_oauth)[0] == 403
    assert admin.download(BlobRef(container, "out/result.mp4")) == b"result"


def test_delegation_key_is_cached_until_it_would_lapse(
    azurite_oauth: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One key serves many SAS; it is fetched again only when a SAS would outlive it."""
    now = [datetime.now(UTC).replace(microsecond=0)]
    storage = AzureBlobStorage(
        config=BlobConfig(account_url=azurite_oauth.account_url),
        credential=FakeEntraCredential(), clock=lambda: now[0], max_lifetime=timedelta(hours=1),
        client_options={"connection_verify": str(azurite_oauth.ca_file)},
    )
    fetched: list[tuple[datetime, datetime]] = []
    real = storage.service.get_user_delegation_key

    def spy(start: datetime, expiry: datetime, **kwargs: Any) -> Any:
        fetched.append((start, expiry))
        return real(start, expiry, **kwargs)

    monkeypatch.setattr(storage.service, "get_user_delegation_key", spy)
    for index in range(20):
        storage.input_url(BlobRef("videos", f"{index}.mp4"))
        storage.output_container_url("renders", "")
    assert len(fetched) == 1
    key_expiry = fetched[0][1]
    assert key_expiry - now[0] >= timedelta(days=1)
    now[0] = key_expiry - timedelta(minutes=30)  # a 1 h SAS would now outlive the key
    query = _query(storage.input_url(BlobRef("videos", "late.mp4")))
    assert len(fetched) == 2
    assert datetime.fromisoformat(query["ske"].replace("Z", "+00:00")) >= (
        now[0] + timedelta(hours=1))
    storage.close()


def test_refused_delegation_key_is_a_config_fault(azurite_oauth: Azurite, make_azure: Make
                                                  ) -> None:
    """A token the service refuses makes SAS issue a ConfigFault, naming no secret."""

    class NoIdentity(FakeEntraCredential):
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise ClientAuthenticationError("no managed identity endpoint is available")

        get_token_info = get_token

    for credential in (FakeEntraCredential(audience="https://evil.example"), NoIdentity()):
        storage = make_azure(azurite_oauth, key=False, credential=credential)
        with pytest.raises(ConfigFault) as caught:
            storage.input_url(BlobRef("videos", "a.mp4"))
        assert "user delegation key" in caught.value.description
        assert caught.value.code == "AuthenticationFailed"
        assert "eyJ" not in caught.value.description  # no JWT


def test_signatures_never_reach_the_logs(azurite: Azurite, make_azure: Make) -> None:
    """Issuing SAS logs the redacted URL only."""
    storage = make_azure(azurite)
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:  # at debug, whatever level an earlier test (a CLI run) configured
        with structlog.testing.capture_logs() as logs:
            url = storage.input_url(BlobRef("videos", "a.mp4"))
            storage.output_container_url("videos", "out/")
    finally:
        structlog.configure(**saved)
    assert logs, "SAS issue is logged"
    signature = _query(url)["sig"]
    text = repr(logs)
    assert signature not in text and "sig=" not in text
    assert f"{azurite.account_url}/videos/a.mp4" in text


def test_service_faults_name_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """An SDK error with a SAS URL in its text is summarised without the signature."""
    with pytest.raises(ConfigFault) as caught, azure_module._faults("download of c/b"):
        raise ClientAuthenticationError(
            "Server failed https://a.blob.core.windows.net/c/b?sv=1&sig=c2VjcmV0 AccountKey=k2")
    assert "c2VjcmV0" not in str(caught.value) and "k2" not in str(caught.value)
    assert caught.value.description.startswith("download of c/b refused")


@pytest.mark.docker
def test_against_the_official_azurite_image(tmp_path: Any) -> None:
    """The same SAS round trip against mcr.microsoft.com/azure-storage/azurite (Docker)."""
    docker = pytest.importorskip("docker")
    try:
        docker.from_env().ping()
    except Exception as exc:  # any failure to reach an engine means: no Docker here
        pytest.skip(f"no Docker engine answers ({type(exc).__name__}); testcontainers needs one")
    from testcontainers.community.azurite import AzuriteContainer

    image = AzuriteContainer("mcr.microsoft.com/azure-storage/azurite:3.37.0",
                             account_name="devstoreaccount1", account_key=ACCOUNT_KEY
                             ).with_command(
        "azurite-blob --blobHost 0.0.0.0 --blobPort 10000 --inMemoryPersistence "
        "--skipApiVersionCheck --loose")
    with image as container:
        endpoint = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(10000)}"
        storage = AzureBlobStorage(config=BlobConfig(
            account_url=f"{endpoint}/devstoreaccount1", account_key=SecretStr(ACCOUNT_KEY)))
        storage.ensure_container("videos")
        storage.upload(BlobRef("videos", "a b.mp4"), b"docker")
        url = storage.input_url(BlobRef("videos", "a b.mp4"))
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == b"docker"
        assert storage.parse_url(url.partition("?")[0]) == BlobRef("videos", "a b.mp4")
        storage.close()


def test_read_tail_is_a_range_read(azurite: Azurite, make_azure: Make,
                                   new_container: Callable[[], str]) -> None:
    """read_tail gets the blob's size, then downloads only the last bytes with a range
    header; a smaller blob whole, b"" for 0 bytes, None for a missing blob or container."""
    ranges: list[str | None] = []

    def record(request: Any) -> None:
        if request.http_request.method == "GET":
            ranges.append(request.http_request.headers.get("x-ms-range"))

    storage = AzureBlobStorage(
        config=BlobConfig(account_url=azurite.account_url, account_key=SecretStr(ACCOUNT_KEY)),
        client_options={"raw_request_hook": record})
    container = new_container()
    ref = BlobRef(container, "job-1/t1/stderr.txt")
    data = b"".join(b"line %05d\n" % i for i in range(5000))  # 55,000 bytes
    storage.upload(ref, data)
    try:
        assert storage.read_tail(ref, 4096) == data[-4096:]
    finally:
        storage.close()
    assert ranges == [f"bytes={len(data) - 4096}-{len(data) - 1}"]
    storage = make_azure(azurite)
    assert storage.read_tail(ref, 10**6) == data
    assert storage.read_tail(ref, 0) == b""
    assert storage.read_tail(BlobRef(container, "job-1/t2/stderr.txt"), 10) is None
    assert storage.read_tail(BlobRef(f"c{uuid.uuid4().hex[:20]}", "x.txt"), 10) is None
    empty = BlobRef(container, "empty.txt")
    storage.upload(empty, b"")
    assert storage.read_tail(empty, 10) == b""
