"""An azure-core ``HttpTransport`` on urllib3 directly, for the ``BatchClient``.

azure-core's ``RequestsTransport`` goes through a ``requests.Session`` for every call,
and the session re-reads the environment each time: proxy variables (twice), netrc,
CA-bundle variables, then merges settings and prepares a second request object.
At 16 add-collection requests in flight that was about 30% of the submitter's client
CPU (docs/performance.md). This transport settles all of that once, when the
backend is built, and sends each request with one ``urlopen`` on a keep-alive pool.

What stays as it was with requests:

* the pipeline: the ``BatchClient``'s own policies still sign (shared key, through
  the SDK's ``BatchSharedKeyAuthPolicy``) or add the Entra ID bearer token, set the
  user agent and request ids, log with secrets redacted and trace;
* TLS: certificates are verified against the same CA bundle requests uses
  (``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` when set, else certifi's), with the
  host name checked;
* proxies: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` and ``NO_PROXY`` as requests
  reads them (``requests.utils.get_environ_proxies``), but read once at start-up;
* no retries and no redirects below the pipeline (urllib3 ``retries=False``): the
  pipeline and, above it, the submitter own those;
* the errors azure-core's ``RequestsTransport.send`` raises for the same failures
  (azure-core 1.41, ``azure/core/pipeline/transport/_requests_basic.py``)
  (``ServiceRequestError`` when nothing was sent, ``ServiceResponseError`` when the
  answer did not come, their ``...TimeoutError`` subclasses on timeouts), so
  ``rest.py`` classifies them as before.

New: the connect and read timeouts given to ``make_client`` apply. A ``RequestsTransport``
built outside the ``BatchClient`` kept its own defaults (300 s each) and the client's
``connection_timeout``/``read_timeout`` never reached it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

import urllib3
from azure.core.exceptions import (
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest, HttpResponse
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies, select_proxy
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

#: Headers requests sent by default, kept so the service sees the same request.
DEFAULT_HEADERS = {"Accept-Encoding": "gzip, deflate", "Connection": "keep-alive"}


class PooledTransport(HttpTransport):  # type: ignore[type-arg]
    """Sends azure-core ``HttpRequest``s over urllib3 keep-alive connections.

    ``connections`` is how many connections each host's pool keeps: the most requests
    in flight at once (the submit concurrency plus the poller's), so no connection is
    discarded as "pool is full" and opened again."""

    def __init__(self, endpoint: str, *, connections: int = 10,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.proxy = select_proxy(endpoint, get_environ_proxies(endpoint))
        self._manager = _manager(self.proxy, connections)

    def send(self, request: HttpRequest, **kwargs: Any) -> HttpResponse:
        """One request, its answer read whole (``stream`` or not: Batch answers are
        small JSON documents, and reading them here returns the connection at once)."""
        timeout = urllib3.Timeout(
            connect=kwargs.get("connection_timeout") or self.connect_timeout,
            read=kwargs.get("read_timeout") or self.read_timeout)
        headers = dict(request.headers)
        for name, value in DEFAULT_HEADERS.items():
            if name not in request.headers:  # case-insensitive
                headers[name] = value
        try:
            raw = self._manager.urlopen(
                request.method, request.url, body=_body(request), headers=headers,
                retries=False, redirect=False, timeout=timeout, preload_content=True)
        except HTTPError as exc:
            raise _azure_error(exc) from exc
        return Response(request, raw)

    def open(self) -> None:
        """Connections open on first use."""

    def close(self) -> None:
        self._manager.clear()

    def __enter__(self) -> PooledTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Response(HttpResponse):
    """A whole answer: status, headers and the body already read."""

    def __init__(self, request: HttpRequest, raw: urllib3.BaseHTTPResponse) -> None:
        self._request = request
        self._status = raw.status
        self._reason = raw.reason or ""
        self._headers: MutableMapping[str, str] = raw.headers
        self._content = raw.data
        self._encoding: str | None = None

    @property
    def request(self) -> HttpRequest:
        return self._request

    @property
    def status_code(self) -> int:
        return self._status

    @property
    def headers(self) -> MutableMapping[str, str]:
        return self._headers

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def content_type(self) -> str | None:
        return self._headers.get("Content-Type")

    @property
    def is_closed(self) -> bool:
        return True

    @property
    def is_stream_consumed(self) -> bool:
        return True

    @property
    def encoding(self) -> str | None:
        return self._encoding

    @encoding.setter
    def encoding(self, value: str | None) -> None:
        self._encoding = value

    @property
    def url(self) -> str:
        return str(self._request.url)

    @property
    def content(self) -> bytes:
        return self._content

    def text(self, encoding: str | None = None) -> str:
        return self._content.decode(encoding or self._encoding or "utf-8-sig")

    def json(self) -> Any:
        return json.loads(self.text()) if self._content else None

    def raise_for_status(self) -> None:
        if self._status >= 400:
            from azure.core.exceptions import HttpResponseError

            raise HttpResponseError(response=self)

    def read(self) -> bytes:
        return self._content

    def iter_raw(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._content

    def iter_bytes(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._content

    def close(self) -> None:
        """Nothing to close: the connection went back to its pool when the body was read."""

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()


def _manager(proxy: str | None, connections: int) -> urllib3.PoolManager:
    """A pool manager (or a proxy manager, through ``proxy``) verifying certificates
    against the CA bundle requests would use."""
    pool_kw: dict[str, Any] = {"maxsize": connections, "block": False,
                               "cert_reqs": "CERT_REQUIRED", **_ca_bundle()}
    if proxy is None:
        return urllib3.PoolManager(num_pools=4, **pool_kw)
    split = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    headers = {}
    if split.username:  # as requests does: credentials in the proxy URL are basic auth
        headers = urllib3.make_headers(
            proxy_basic_auth=f"{unquote(split.username)}:{unquote(split.password or '')}")
    return urllib3.ProxyManager(split.geturl(), num_pools=4, proxy_headers=headers,
                                **pool_kw)


def _ca_bundle() -> dict[str, str]:
    """``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` (a file or a directory of
    certificates) when set, as requests reads them, else certifi's bundle."""
    path = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not path:
        return {"ca_certs": DEFAULT_CA_BUNDLE_PATH}
    return {"ca_cert_dir": path} if os.path.isdir(path) else {"ca_certs": path}


def _body(request: HttpRequest) -> bytes | str | None:
    content = request.content
    if content is None or isinstance(content, bytes | str):
        return content
    raise TypeError(f"the Batch transport sends bytes or str bodies, not "
                    f"{type(content).__name__}")


def _azure_error(exc: HTTPError) -> Exception:
    """The azure-core error ``RequestsTransport`` raises for the same failure."""
    if isinstance(exc, NewConnectionError | SSLError | ProxyError):
        return ServiceRequestError(exc, error=exc)
    if isinstance(exc, ConnectTimeoutError):
        return ServiceRequestTimeoutError(exc, error=exc)
    if isinstance(exc, ReadTimeoutError):
        return ServiceResponseTimeoutError(exc, error=exc)
    # ProtocolError (the connection closed or reset before a whole answer came) and
    # anything else: the request may have been received
    return ServiceResponseError(exc, error=exc)

