"""Blob references: validate names, parse blob URLs, and redact URLs for logs.

A message names a blob in one of two forms:

- ``{"container": "videos", "blob": "2026/11/a.mp4"}``: the blob name is taken
  literally (``my%20clip.mp4`` names a blob with a percent sign in it);
- a blob URL of a configured account, e.g.
  ``https://stmedia01.blob.core.windows.net/videos/2026/11/a.mp4``: the path is
  percent-decoded once (``my%20clip.mp4`` names ``my clip.mp4``).

Both end as a :class:`handlers.base.BlobRef` whose names passed the checks below.
A bad name is :class:`InvalidParams`; a URL whose scheme, host, port, user info or
account is not one of the configured accounts is :class:`ForeignStorage`. A URL
carrying a query (a SAS token, say) or a fragment is refused too, as
:class:`InvalidParams`: a message must not smuggle credentials, and the worker signs
its own URLs. Descriptions name the host but never echo a query string.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from handlers.base import BlobRef
from handlers.errors import ForeignStorage, InvalidParams

__all__ = [
    "AccountEndpoint",
    "blob_path",
    "check_blob_name",
    "check_container",
    "check_prefix",
    "make_ref",
    "parse_blob_url",
    "parse_ref",
    "redact_text",
    "redact_url",
    "split_url",
]

MAX_BLOB_NAME = 1024
#: Containers Azure creates itself; everything else follows the naming rule.
SYSTEM_CONTAINERS = frozenset({"$root", "$web", "$logs"})
_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHOW = 80


def _show(name: str) -> str:
    """A printable, bounded rendering of a (possibly hostile) name."""
    text = repr(name)
    return text if len(text) <= _SHOW else text[: _SHOW - 4] + "...'"


def check_container(name: object) -> str:
    """Return ``name`` if it is a valid container name, else raise ``InvalidParams``.

    Azure's rule: 3-63 lowercase letters, digits and single hyphens, starting and
    ending with a letter or digit; or one of ``$root``, ``$web``, ``$logs``.
    """
    if not isinstance(name, str):
        raise InvalidParams(f"container must be a string, not {type(name).__name__}")
    if name in SYSTEM_CONTAINERS or _CONTAINER.match(name):
        return name
    raise InvalidParams(
        f"container {_show(name)} is not 3-63 lowercase letters, digits and single "
        "hyphens starting and ending with a letter or digit"
    )


def _bad_char(name: str) -> str | None:
    """Describe the first character a blob name may not hold, or None."""
    if "\\" in name:
        return "contains a backslash"
    for char in name:
        category = unicodedata.category(char)
        if category == "Cc":
            return f"contains the control character U+{ord(char):04X}"
        if category == "Cs":
            return f"contains the lone surrogate U+{ord(char):04X}"
        if char in "\ufffe\uffff":
            return f"contains the non-character U+{ord(char):04X}"
    return None


def _bad_segments(name: str) -> str | None:
    """Describe a path-segment trick in a blob name (``..``, ``a//b``, ``/a``), or None."""
    if name.startswith("/"):
        return "starts with '/'"
    if name.endswith("/"):
        return "ends with '/'"
    for segment in name.split("/"):
        if segment == "":
            return "has an empty path segment ('//')"
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
    if name.endswith("."):
        return "ends with '.' (Azure drops trailing dots, so it names another blob)"
    return None


def check_blob_name(name: object, *, what: str = "blob name") -> str:
    """Return ``name`` if it is a safe blob name, else raise ``InvalidParams``.

    1-1024 characters; spaces, unicode and ``%`` are fine. Refused: ``.`` and ``..``
    segments, empty segments, a leading or trailing ``/``, a trailing ``.``,
    backslashes, control characters and lone surrogates.
    """
    if not isinstance(name, str):
        raise InvalidParams(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidParams(f"{what} is empty")
    if len(name) > MAX_BLOB_NAME:
        raise InvalidParams(f"{what} {_show(name)} is {len(name)} characters, over 1024")
    problem = _bad_char(name) or _bad_segments(name)
    if problem:
        raise InvalidParams(f"{what} {_show(name)} {problem}")
    return name


def check_prefix(prefix: object) -> str:
    """Return an output ``prefix`` (``""``, ``"renders/"`` or ``"out/frame-"``) if safe.

    A prefix is the start of blob names: empty, or a blob name that may end in ``/``.
    """
    if not isinstance(prefix, str):
        raise InvalidParams(f"prefix must be a string, not {type(prefix).__name__}")
    if prefix:
        check_blob_name(prefix[:-1] if prefix.endswith("/") else prefix, what="prefix")
    return prefix


def make_ref(container: object, blob: object) -> BlobRef:
    """A checked :class:`BlobRef`; raise ``InvalidParams`` naming the bad part."""
    return BlobRef(container=check_container(container), blob=check_blob_name(blob))


def parse_ref(value: object, *, parse_url: Callable[[str], BlobRef]) -> BlobRef:
    """Parse a message's blob reference: a ``{"container", "blob"}`` object or a URL.

    ``parse_url`` is the storage's own URL parser (``Storage.parse_url``), which
    knows the configured accounts.
    """
    if isinstance(value, BlobRef):
        return make_ref(value.container, value.blob)
    if isinstance(value, str):
        return parse_url(value)
    if isinstance(value, Mapping):
        keys = set(value)
        if keys != {"container", "blob"}:
            extra = sorted(str(k) for k in keys - {"container", "blob"})
            missing = sorted({"container", "blob"} - keys)
            detail = f"unknown keys {extra}" if extra else f"missing {missing}"
            raise InvalidParams(f"blob reference must have exactly container and blob: {detail}")
        return make_ref(value["container"], value["blob"])
    raise InvalidParams(
        f"blob reference must be a URL or {{container, blob}}, not {type(value).__name__}"
    )


def redact_url(url: str) -> str:
    """``url`` without its query string, fragment and user info: safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s'\"<>]*")
_SECRET_PAIR = re.compile(
    r"(?i)\b(sig|signature|accountkey|sharedaccesssignature|sharedaccesskey)=[^&;\s'\"<>]*"
)


def redact_text(text: str) -> str:
    """Free text (an SDK error, say) with URL query strings and ``sig=``/``AccountKey=``
    values removed: safe to log or put in a description."""
    return _SECRET_PAIR.sub(r"\1=<redacted>", _URL_QUERY.sub(r"\1", text))


def blob_path(ref: BlobRef) -> str:
    """The percent-encoded ``/<container>/<blob>`` path of a blob, as the SDK quotes it."""
    return f"/{quote(ref.container, safe='$')}/{quote(ref.blob, safe='/~')}"


def split_url(url: object) -> SplitResult:
    """Split a blob URL; refuse non-strings, queries, fragments and bad ``%`` escapes.

    Scheme and host are left to the caller (they decide ``ForeignStorage``).
    """
    if not isinstance(url, str):
        raise InvalidParams(f"blob URL must be a string, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise InvalidParams(f"blob URL {_show(redact_url(url))} is not a valid URL") from None
    before_fragment, fragment, _ = url.partition("#")
    if "?" in before_fragment:
        raise InvalidParams(
            f"blob URL {redact_url(url)} carries a query string (a SAS token?): send the "
            "bare blob URL; the worker signs its own"
        )
    if fragment:
        raise InvalidParams(f"blob URL {redact_url(url)} has a fragment; encode '#' as %23")
    if _BAD_PERCENT.search(parts.path):
        raise InvalidParams(f"blob URL {redact_url(url)} has a malformed %-escape")
    return parts


def decode_path(parts: SplitResult) -> str:
    """The URL's path, percent-decoded once as UTF-8; raise ``InvalidParams`` if it is not."""
    try:
        return unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidParams(
            f"blob URL {redact_url(urlunsplit(parts))} has %-escapes that are not UTF-8"
        ) from None


def ref_from_path(path: str, *, url: str) -> BlobRef:
    """``<container>/<blob>`` (decoded, no leading slash) as a checked reference."""
    container, sep, blob = path.partition("/")
    if not sep or not blob:
        raise InvalidParams(f"blob URL {redact_url(url)} names no blob (need /<container>/<blob>)")
    return make_ref(container, blob)


@dataclass(frozen=True, slots=True)
class AccountEndpoint:
    """One way to reach the configured storage account over HTTP(S).

    ``path_prefix`` is ``""`` for host-style URLs (``https://acct.blob.core.windows.net``)
    and ``"/<account>"`` for path-style ones (Azurite: ``http://127.0.0.1:10000/devstoreaccount1``).
    """

    scheme: str
    host: str
    port: int
    path_prefix: str
    account: str

    @classmethod
    def parse(cls, url: str, *, account_name: str | None = None) -> AccountEndpoint:
        """Parse a configured account URL; raise ``ValueError`` naming what is wrong."""
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"account URL {redact_url(url)!r} is not http(s)://host[:port]/...")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"account URL {redact_url(url)!r} must not carry a query or user info")
        host = parts.hostname.lower()
        port = parts.port or _DEFAULT_PORTS[scheme]
        segments = [s for s in parts.path.split("/") if s]
        label, _, rest = host.partition(".")
        if len(segments) > 1:
            raise ValueError(f"account URL {redact_url(url)!r} has more than an account in it")
        if segments:
            return cls(scheme, host, port, "/" + segments[0], account_name or segments[0])
        if rest.startswith(("blob.", "dfs.")):
            return cls(scheme, host, port, "", account_name or label)
        if account_name:
            return cls(scheme, host, port, "", account_name)
        raise ValueError(
            f"cannot tell the account name from {redact_url(url)!r}: set blob.account_name"
        )

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        default = _DEFAULT_PORTS[self.scheme] == self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = host if default else f"{host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path_prefix}"

    @property
    def display(self) -> str:
        """Host, port and account path, for descriptions."""
        return self.url.partition("://")[2]

    def dfs_twin(self) -> AccountEndpoint | None:
        """The Data Lake (``.dfs.``) endpoint of a host-style ``.blob.`` account, if any."""
        label, _, rest = self.host.partition(".")
        if self.path_prefix or not rest.startswith("blob."):
            return None
        host = f"{label}.dfs.{rest[len('blob.'):]}"
        return AccountEndpoint(self.scheme, host, self.port, "", self.account)

    def blob_url(self, ref: BlobRef) -> str:
        """The unsigned URL of one blob at this endpoint."""
        return self.url + blob_path(ref)

    def container_url(self, container: str) -> str:
        """The unsigned URL of a container at this endpoint."""
        return f"{self.url}/{quote(container, safe='$')}"

    def owns(self, parts: SplitResult) -> bool:
        """True when scheme, host and port are this endpoint's (the path is checked apart)."""
        scheme = parts.scheme.lower()
        return (
            scheme == self.scheme
            and (parts.hostname or "") == self.host
            and (parts.port or _DEFAULT_PORTS.get(scheme)) == self.port
        )


def parse_blob_url(url: object, endpoints: Sequence[AccountEndpoint]) -> BlobRef:
    """Parse a blob URL of one of ``endpoints`` into a checked reference.

    ``ForeignStorage`` for another scheme, host, port or account, or for user info in
    the URL; ``InvalidParams`` for a query, a fragment or a bad name.
    """
    parts = split_url(url)
    shown = redact_url(str(url))
    host = parts.hostname or ""
    accepted = ", ".join(e.display for e in endpoints) or "none"
    owners = [e for e in endpoints if e.owns(parts)]
    if not owners:
        where = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
        raise ForeignStorage(
            f"blob URL host {_show(where)} is not a configured storage account "
            f"(accepted: {accepted})"
        )
    if "@" in parts.netloc:
        raise ForeignStorage(f"blob URL for host {host} carries user info; send a bare blob URL")
    path = decode_path(parts)
    for endpoint in owners:
        if not endpoint.path_prefix:
            return ref_from_path(path[1:], url=shown)
        if path.rstrip("/") == endpoint.path_prefix:
            return ref_from_path("", url=shown)
        if path.startswith(endpoint.path_prefix + "/"):
            return ref_from_path(path[len(endpoint.path_prefix) + 1 :], url=shown)
    account = path.lstrip("/").partition("/")[0]
    raise ForeignStorage(
        f"blob URL {_show(shown)} names account {_show(account)} on host {host}, which is "
        f"not a configured storage account (accepted: {accepted})"
    )
