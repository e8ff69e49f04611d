"""One ``BatchClient`` and one way to call it: ``send_request`` with prepared JSON.

The SDK's pipeline is kept (shared-key or Entra ID auth, user agent, request ids,
logging with the Authorization header redacted), on a urllib3 transport of fanout's
(``transport.py``: the environment settled once, not per request), but its own retries
are turned off:
the submitter retries with bounded exponential backoff and jitter, and two retry
loops would multiply (azure-core's default is 10 retries per call, times the
submitter's 8). The probe and the metrics poller retry on their next interval.

Errors come back as :class:`ServiceError` (the service answered non-2xx) for the
backend to handle the codes it expects (``JobExists``, ``RequestBodyTooLarge``...);
:func:`classify` turns any other into fanout's fault hierarchy. Connection failures
and timeouts raise ``SystemFault`` directly.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential, TokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.policies import RetryPolicy
from azure.core.rest import HttpRequest

from worker.backends.azure.transport import PooledTransport
from worker.backends.azure.wire import API_VERSION, JSON_CONTENT_TYPE, error_parts
from worker.errors import BatchRejected, ConfigFault, FanoutError, SystemFault
from worker.logs import redact

#: Codes that mean the worker's configuration or rights are wrong, not the message.
CONFIG_CODES = frozenset({
    "AuthenticationFailed", "AuthenticationRequired", "AuthorizationFailure",
    "AuthorizationFailed", "InsufficientAccountPermissions", "AccountIsDisabled",
    "PoolNotFound", "PoolBeingDeleted", "ActiveJobAndScheduleQuotaReached",
})
#: Codes that pass by themselves: retry later.
TRANSIENT_CODES = frozenset({"ServerBusy", "InternalError", "OperationTimedOut",
                             "TooManyRequests", "RequestTimeout"})


class ServiceError(Exception):
    """Raised when the service answers with a non-2xx status; never leaves the backend."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Reply:
    """A 2xx answer: status and the JSON body (None when empty)."""

    status: int
    body: Any


def make_client(*, endpoint: str, credential: AzureNamedKeyCredential | TokenCredential,
                connections: int = 10, connect_timeout: float = 10.0,
                read_timeout: float = 60.0, **kwargs: Any) -> BatchClient:
    """A ``BatchClient`` with retries off, on a :class:`PooledTransport` of
    ``connections`` keep-alive connections and the given timeouts.

    Size ``connections`` to the submit concurrency (plus the poller's): with more
    requests in flight than connections, urllib3 logs "connection pool is full,
    discarding connection" and reconnects.
    """
    transport = PooledTransport(endpoint, connections=connections,
                                connect_timeout=connect_timeout, read_timeout=read_timeout)
    return BatchClient(endpoint, credential, api_version=API_VERSION, transport=transport,
                       retry_policy=RetryPolicy.no_retries(), **kwargs)


class Rest:
    """Calls one Batch account through a ``BatchClient``; safe across threads."""

    def __init__(self, client: BatchClient, *, options: Mapping[str, Any] | None = None) -> None:
        self.client = client
        self._options = dict(options or {})

    def call(self, method: str, path: str, *, params: Mapping[str, str | int] | None = None,
             body: bytes | None = None) -> Reply:
        """Send one request; raise ``ServiceError`` for a non-2xx answer and
        ``SystemFault``/``ConfigFault`` when there is no answer to read."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        query: dict[str, Any] = {"api-version": API_VERSION, **(params or {})}
        request = HttpRequest(method, path, params=query, headers=headers, content=body)
        try:
            # stream=True: azure-core's ContentDecodePolicy.on_response returns at once
            # for a streamed answer instead of parsing the JSON into the pipeline's
            # context, where nothing reads it; it is parsed once, here (the transport
            # has read the body whole either way)
            response = self.client.send_request(request, stream=True, **self._options)
            content = response.read()
        except HttpResponseError as exc:
            if exc.response is None:
                raise _no_answer(exc, f"{method} {path}") from None
            raise _service_error(exc.response) from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise _no_answer(exc, f"{method} {path}") from None
        if response.status_code >= 300:
            raise _service_error(response)
        return Reply(response.status_code, _json(content))

    def get_pages(self, path: str, params: Mapping[str, str | int], *,
                  max_items: int | None = None) -> list[dict[str, Any]]:
        """Every item of a list operation, following ``odata.nextLink``."""
        items: list[dict[str, Any]] = []
        reply = self.call("GET", path, params=params)
        while True:
            items.extend((reply.body or {}).get("value") or [])
            link = (reply.body or {}).get("odata.nextLink")
            if not link or (max_items is not None and len(items) >= max_items):
                return items
            # the link holds every query parameter, encoded: decode them so they are
            # encoded once again, not twice
            split = urlsplit(link)
            reply = self.call("GET", split.path, params=dict(parse_qsl(split.query)))

    def close(self) -> None:
        self.client.close()


def path(*segments: str) -> str:
    """``path("jobs", job_id)`` -> ``/jobs/<id, percent-encoded>``."""
    return "/" + "/".join(quote(s, safe="") for s in segments)


def classify(err: ServiceError, *, what: str) -> FanoutError | BatchRejected:
    """The fault an unexpected service error means for the message being submitted:
    retry later (``SystemFault``), fix the configuration (``ConfigFault``), or
    dead-letter the message (``BatchRejected``, with the service's code and message)."""
    text = f"{what}: {err.code}: {redact(err.message)}"
    if err.status in (408, 429) or err.status >= 500 or err.code in TRANSIENT_CODES:
        return SystemFault(text, retry_after=err.retry_after)
    if err.status in (401, 403) or err.code in CONFIG_CODES:
        return ConfigFault(text, code=err.code)
    return BatchRejected(f"{err.code}: {redact(err.message)}")


def account_name(endpoint: str) -> str:
    """The account name of ``https://<account>.<region>.batch.azure.com``."""
    host = urlsplit(endpoint).hostname or ""
    return host.split(".")[0]


def _service_error(response: Any) -> ServiceError:
    code, message = error_parts(_json(_content(response)))
    if code == "Unknown":
        code = f"HTTP{response.status_code}"
    return ServiceError(response.status_code, code, message,
                        _retry_after(response.headers.get("Retry-After")))


def _no_answer(exc: Exception, what: str) -> FanoutError:
    if isinstance(exc, ClientAuthenticationError):
        # the credential could not get a token: no request reached the service
        return ConfigFault(f"could not authenticate to Azure Batch: {redact(str(exc))}",
                           code="AuthenticationFailed")
    kind = ("timed out" if isinstance(exc, ServiceRequestTimeoutError
                                      | ServiceResponseTimeoutError) else "connection failed")
    return SystemFault(f"{what}: Azure Batch {kind} ({type(exc).__name__})")


def _content(response: Any) -> bytes:
    try:
        return bytes(response.content)
    except Exception:  # a streamed body that was not read: there is nothing to parse
        return b""


def _json(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
