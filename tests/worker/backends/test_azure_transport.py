"""Tests for the ``BatchClient``'s urllib3 transport (worker/backends/azure/transport.py):
timeouts, TLS verification, proxies from the environment, error mapping, and that
the request the service receives is the one requests sent."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import (
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.rest import HttpRequest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from handlers.base import JobSpec, TaskSpec
from tests.fakes.batch_peer import BatchPeer, FaultPlan
from worker.backends.azure import AzureBatchBackend
from worker.backends.azure.transport import PooledTransport, _azure_error
from worker.errors import SystemFault


def backend_on(peer: BatchPeer, **kwargs: object) -> AzureBatchBackend:
    return AzureBatchBackend(endpoint=peer.url, credential=AzureNamedKeyCredential(
        peer.account, peer.key), default_pool="fanout", **kwargs)  # type: ignore[arg-type]


def test_the_read_timeout_applies_and_is_a_system_fault(peer: BatchPeer) -> None:
    """An answer slower than the read timeout is ``SystemFault`` "timed out" (the
    timeouts given to the backend reach the transport)."""
    backend = backend_on(peer, read_timeout=0.2)
    try:
        backend.create_job(JobSpec(tasks=iter([]), task_count=0, id="job-1"))
        peer.set_faults(FaultPlan(latency=1.0))
        with pytest.raises(SystemFault, match="timed out"):
            backend.add_tasks("job-1", [TaskSpec(id="t", command_line="true")])
        # the peer still answers the request after the client gave up: wait for that,
        # so it does not answer a stopped peer
        deadline = time.monotonic() + 30
        while not peer.requests["add_task_collection", "ok"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        backend.close()


def test_a_refused_connection_is_a_system_fault() -> None:
    """Nothing listening: ``SystemFault`` "connection failed", not a crash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request
    backend = AzureBatchBackend(endpoint=f"http://127.0.0.1:{port}",
                                credential=AzureNamedKeyCredential("a", "a2V5"))
    try:
        with pytest.raises(SystemFault, match="connection failed"):
            backend.probe()
    finally:
        backend.close()


def test_the_service_receives_the_headers_requests_sent(
        peer: BatchPeer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user agent and client request id of the SDK's policies, and requests'
    default Accept-Encoding and Connection, reach the service; the body is signed."""
    seen: list[dict[str, str]] = []
    original = BatchPeer._dispatch

    def spy(self: BatchPeer, operation: str, args: object, params: object, body: bytes,
            headers: dict[str, str] | None = None) -> object:
        seen.append({k.lower(): v for k, v in (headers or {}).items()})
        return original(self, operation, args, params, body, headers)  # type: ignore[arg-type]

    monkeypatch.setattr(BatchPeer, "_dispatch", spy)
    backend = backend_on(peer)
    try:
        backend.create_job(JobSpec(tasks=iter([]), task_count=0, id="job-1"))
        assert backend.add_tasks("job-1", [TaskSpec(id="t", command_line="true")]).added == 1
    finally:
        backend.close()
    headers = seen[-1]
    assert headers["user-agent"].startswith("azsdk-python-batch/")
    assert headers["client-request-id"]
    assert headers["accept-encoding"] == "gzip, deflate"
    assert headers["connection"] == "keep-alive"
    assert headers["authorization"].startswith(f"SharedKey {peer.account}:")


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An https server with a self-signed certificate for 127.0.0.1 that answers every
    GET with an empty list; yields its URL and the certificate's PEM file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            data = json.dumps({"value": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert_file
    server.shutdown()
    server.server_close()


def test_an_untrusted_certificate_is_refused(tls_server: tuple[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Certificates are verified: a self-signed one is a ``SystemFault``, no request
    goes through."""
    url, _ = tls_server
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    backend = AzureBatchBackend(endpoint=url, credential=AzureNamedKeyCredential("a", "a2V5"))
    try:
        with pytest.raises(SystemFault, match="connection failed"):
            backend.probe()
    finally:
        backend.close()


def test_the_ca_bundle_variable_is_trusted_as_requests_trusts_it(
        tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """``REQUESTS_CA_BUNDLE`` names the CA bundle, as it did with requests: the server's
    certificate is then trusted and the request answered."""
    url, cert = tls_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    backend = AzureBatchBackend(endpoint=url, credential=AzureNamedKeyCredential("a", "a2V5"))
    try:
        backend.probe()  # GET /nodecounts answered: no fault
    finally:
        backend.close()


# -- proxies and errors ----------------------------------------------------------------------


def test_proxies_come_from_the_environment_with_no_proxy_honoured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``HTTPS_PROXY`` is used (its credentials as basic auth) unless ``NO_PROXY``
    names the host, as requests reads them."""
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.example:3128")
    proxied = PooledTransport("https://acct.westeurope.batch.azure.com")
    assert proxied.proxy == "http://user:p%40ss@proxy.example:3128"
    manager = proxied._manager
    assert isinstance(manager, urllib3.ProxyManager)
    assert manager.proxy_headers == urllib3.make_headers(proxy_basic_auth="user:p@ss")
    monkeypatch.setenv("NO_PROXY", ".batch.azure.com")
    direct = PooledTransport("https://acct.westeurope.batch.azure.com")
    assert direct.proxy is None and not isinstance(direct._manager, urllib3.ProxyManager)


@pytest.mark.parametrize(("error", "expected"), [
    (urllib3.exceptions.NewConnectionError(None, "refused"), ServiceRequestError),  # type: ignore[arg-type]
    (urllib3.exceptions.SSLError("bad certificate"), ServiceRequestError),
    (urllib3.exceptions.ConnectTimeoutError("connect"), ServiceRequestTimeoutError),
    (urllib3.exceptions.ReadTimeoutError(None, "/", "read"), ServiceResponseTimeoutError),  # type: ignore[arg-type]
    (urllib3.exceptions.ProtocolError("reset"), ServiceResponseError),
])
def test_urllib3_errors_map_as_requests_transport_maps_them(
        error: urllib3.exceptions.HTTPError, expected: type[Exception]) -> None:
    """The azure-core error for each failure is the one ``RequestsTransport`` raises, so
    ``rest.py`` tells "not sent" from "no answer" as before."""
    mapped = _azure_error(error)
    assert type(mapped) is expected


def test_a_non_bytes_body_is_refused() -> None:
    """Only bytes and str bodies are sent: anything else is a programming error."""
    transport = PooledTransport("http://127.0.0.1:9")
    request = HttpRequest("POST", "http://127.0.0.1:9/upload", files={"f": b"x"})
    with pytest.raises(TypeError, match="bytes or str"):
        transport.send(request)
