"""Start Azurite's blob service (the npm package) for a test, and stop it after.

Azurite is the real storage emulator Microsoft ships; ``make tools`` installs it
under ``.tools/``. :func:`run_azurite` starts ``azurite-blob`` on a free port of
127.0.0.1 with in-memory persistence, waits until it answers HTTP, yields an
:class:`Azurite` and terminates it. With ``tls`` it serves HTTPS with a
self-signed certificate made by :func:`make_tls_cert`; with ``oauth`` it accepts
bearer tokens (Azurite's ``--oauth basic`` checks a token's issuer, audience and
lifetime, not its signature), which is what ``get_user_delegation_key`` needs:
:class:`FakeEntraCredential` issues such tokens.

By hand::

    python -m tests.fakes.azurite            # prints the account URL and waits
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCOUNT = "devstoreaccount1"
#: Azurite's well-known development key (public, in Microsoft's docs).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_REPO = Path(__file__).resolve().parents[2]
_READY = "successfully listens on "


def azurite_binary() -> Path | None:
    """``$AZURITE_BLOB``, else ``.tools/node_modules/.bin/azurite-blob``, else PATH."""
    explicit = os.environ.get("AZURITE_BLOB")
    if explicit:
        return Path(explicit)
    local = _REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


@dataclass(frozen=True)
class Azurite:
    """A running Azurite blob service."""

    process: subprocess.Popen[bytes]
    url: str
    ca_file: Path | None = None

    @property
    def account_url(self) -> str:
        """``http(s)://127.0.0.1:<port>/devstoreaccount1`` (path-style)."""
        return f"{self.url}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        """A connection string with the well-known key."""
        scheme = self.url.partition(":")[0]
        return (
            f"DefaultEndpointsProtocol={scheme};AccountName={ACCOUNT};"
            f"AccountKey={ACCOUNT_KEY};BlobEndpoint={self.account_url};"
        )


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


@contextmanager
def run_azurite(
    workdir: Path, *, tls: bool = False, oauth: bool = False, startup_timeout: float = 60.0
) -> Iterator[Azurite]:
    """Run ``azurite-blob`` in ``workdir`` for the duration of the ``with`` block."""
    binary = azurite_binary()
    if binary is None:
        raise FileNotFoundError("azurite-blob not found: run `make tools` (needs Node.js and npm)")
    workdir.mkdir(parents=True, exist_ok=True)
    args = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
            "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"]
    ca_file = None
    if tls or oauth:
        ca_file, key_file = make_tls_cert(workdir)
        args += ["--cert", str(ca_file), "--key", str(key_file)]
    if oauth:
        args += ["--oauth", "basic"]
    log_path = workdir / "azurite.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                   start_new_session=True)
    try:
        url = _wait_ready(process, log_path, ca_file, startup_timeout)
        yield Azurite(process=process, url=url, ca_file=ca_file)
    finally:
        _stop(process)


def _wait_ready(process: subprocess.Popen[bytes], log_path: Path, ca_file: Path | None,
                timeout: float) -> str:
    """The service's base URL, once it printed it and answers an HTTP request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"azurite exited with {process.returncode}:\n{log_path.read_text()}")
        text = log_path.read_text(errors="replace")
        if _READY in text:
            url = text.split(_READY, 1)[1].split()[0].rstrip("/")
            if _answers(url, ca_file):
                return url
        time.sleep(0.05)
    raise TimeoutError(f"azurite did not answer within {timeout}s:\n{log_path.read_text()}")


def _answers(url: str, ca_file: Path | None) -> bool:
    """True when the service gives any HTTP answer (an unsigned request gets 4xx)."""
    import ssl

    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    try:
        with urllib.request.urlopen(f"{url}/{ACCOUNT}?comp=list", timeout=2, context=context):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate Azurite (and any child node process), then reap it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class FakeEntraCredential:
    """A ``TokenCredential`` standing in for Microsoft Entra ID against Azurite.

    It issues an unsigned JWT with the claims Azurite's ``--oauth basic`` checks
    (issuer, audience, lifetime) and an object and tenant id, which Azurite folds
    into the user delegation key it returns. ``scopes_seen`` records each request.
    """

    tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    object_id = "11111111-2222-3333-4444-555555555555"

    def __init__(self, *, audience: str = "https://storage.azure.com") -> None:
        self.audience = audience
        self.scopes_seen: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        """An ``AccessToken`` valid for an hour."""
        from azure.core.credentials import AccessToken

        self.scopes_seen.append(scopes)
        now = int(time.time())
        claims = {"aud": self.audience, "iss": f"https://sts.windows.net/{self.tenant}/",
                  "iat": now - 60, "nbf": now - 60, "exp": now + 3600,
                  "oid": self.object_id, "tid": self.tenant}
        token = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(claims)}.c2lnbmF0dXJl"
        return AccessToken(token, now + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        """The same token through the newer ``SupportsTokenInfo`` protocol."""
        from azure.core.credentials import AccessTokenInfo

        access = self.get_token(*scopes)
        return AccessTokenInfo(access.token, access.expires_on)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> FakeEntraCredential:
        return self

    def __exit__(self, *args: object) -> None:
        self.close()


def main() -> None:
    """Run Azurite until interrupted, printing how to reach it."""
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the finally stops Azurite
    with tempfile.TemporaryDirectory() as tmp, run_azurite(Path(tmp)) as azurite:
        print(azurite.account_url, flush=True)
        print(azurite.connection_string, flush=True)
        try:
            azurite.process.wait()
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()
