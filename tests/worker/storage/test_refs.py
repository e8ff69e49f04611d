"""Blob reference parsing: names, blob URLs of configured accounts, and redaction."""

from __future__ import annotations

import pytest

from handlers.base import BlobRef
from handlers.errors import ForeignStorage, InvalidParams
from worker.storage.refs import (
    AccountEndpoint,
    check_blob_name,
    check_container,
    check_prefix,
    make_ref,
    parse_blob_url,
    parse_ref,
    redact_text,
    redact_url,
)

PROD = AccountEndpoint.parse("https://stmedia01.blob.core.windows.net")
AZURITE = AccountEndpoint.parse("http://127.0.0.1:10000/devstoreaccount1")
ENDPOINTS = (PROD, PROD.dfs_twin() or PROD, AZURITE)
SIG = "sig=c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"


@pytest.mark.parametrize("name", ["abc", "videos", "a-b-c", "0day", "a" * 63, "$root", "$web"])
def test_valid_container_names_pass(name: str) -> None:
    """Container names within Azure's rule come back unchanged."""
    assert check_container(name) == name


@pytest.mark.parametrize("name", ["ab", "a" * 64, "Videos", "a--b", "-ab", "ab-", "a_b",
                                  "a.b", "$other", "", "vidéo"])
def test_invalid_container_names_are_refused(name: str) -> None:
    """Names breaking Azure's container rule are InvalidParams naming the rule."""
    with pytest.raises(InvalidParams, match="lowercase letters, digits and single hyphens"):
        check_container(name)


@pytest.mark.parametrize("name", ["a.mp4", "2026/11/a.mp4", "my clip.mp4", "été/名前.mp4",
                                  "100%.mp4", "a%20b", "x?y#z", "my clip; rm -rf ~.mp4",
                                  ".hidden", "a/..b/c", "a" * 1024])
def test_valid_blob_names_pass(name: str) -> None:
    """Spaces, unicode, percent signs and shell metacharacters are fine in a name."""
    assert check_blob_name(name) == name


@pytest.mark.parametrize(("name", "problem"), [
    ("", "is empty"),
    ("a" * 1025, "over 1024"),
    ("../etc/passwd", "'..' path segment"),
    ("a/../b", "'..' path segment"),
    ("a/./b", "'.' path segment"),
    ("..", "'..' path segment"),
    ("a//b", "empty path segment"),
    ("/abs", "starts with '/'"),
    ("dir/", "ends with '/'"),
    ("a\\b", "backslash"),
    ("a\x00b", "control character U+0000"),
    ("a\nb", "control character U+000A"),
    ("a\x7fb", "control character U+007F"),
    ("a\ud800b", "lone surrogate"),
    ("name.", "ends with '.'"),
])
def test_unsafe_blob_names_are_refused(name: str, problem: str) -> None:
    """Each unsafe name is InvalidParams with a description saying what is wrong."""
    with pytest.raises(InvalidParams) as caught:
        check_blob_name(name)
    assert problem in caught.value.description
    assert caught.value.reason == "InvalidParams"


def test_refusal_descriptions_are_bounded() -> None:
    """A huge hostile name is shown shortened, not echoed whole."""
    with pytest.raises(InvalidParams) as caught:
        check_blob_name("x" * 5000)
    assert len(caught.value.description) < 200


@pytest.mark.parametrize("prefix", ["", "renders/", "renders/job1/frame-", "out-"])
def test_prefixes_may_end_with_a_slash(prefix: str) -> None:
    """An output prefix is empty or the start of a blob name, with or without '/'."""
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/renders", "a//", "../x/", "a/../"])
def test_unsafe_prefixes_are_refused(prefix: str) -> None:
    """Prefixes get the same path checks as blob names."""
    with pytest.raises(InvalidParams, match="prefix"):
        check_prefix(prefix)


def test_object_references_are_taken_literally() -> None:
    """``{"container", "blob"}`` keeps the blob name as written, percent signs and all."""
    ref = parse_ref({"container": "videos", "blob": "my%20clip.mp4"}, parse_url=_no_urls)
    assert ref == BlobRef("videos", "my%20clip.mp4")


@pytest.mark.parametrize(("value", "fragment"), [
    ({"container": "videos"}, "missing ['blob']"),
    ({"container": "videos", "blob": "a", "account": "other"}, "unknown keys ['account']"),
    ({"container": "videos", "blob": 7}, "blob name must be a string"),
    (["videos", "a.mp4"], "not list"),
    (None, "not NoneType"),
])
def test_malformed_references_are_invalid_params(value: object, fragment: str) -> None:
    """Anything but the two forms is InvalidParams saying what was wrong."""
    with pytest.raises(InvalidParams) as caught:
        parse_ref(value, parse_url=_no_urls)
    assert fragment in caught.value.description


def test_string_references_go_to_the_storage_parser() -> None:
    """A string reference is parsed by the storage's own URL parser."""
    seen: list[str] = []

    def parse(url: str) -> BlobRef:
        seen.append(url)
        return BlobRef("videos", "a.mp4")

    assert parse_ref("https://x/videos/a.mp4", parse_url=parse) == BlobRef("videos", "a.mp4")
    assert seen == ["https://x/videos/a.mp4"]


@pytest.mark.parametrize(("url", "ref"), [
    ("https://stmedia01.blob.core.windows.net/videos/2026/11/a.mp4", ("videos", "2026/11/a.mp4")),
    ("HTTPS://STMEDIA01.Blob.Core.Windows.Net/videos/a.mp4", ("videos", "a.mp4")),
    ("https://stmedia01.blob.core.windows.net:443/videos/a.mp4", ("videos", "a.mp4")),
    ("https://stmedia01.dfs.core.windows.net/lake/raw/a.csv", ("lake", "raw/a.csv")),
    ("https://stmedia01.blob.core.windows.net/videos/my%20clip.mp4", ("videos", "my clip.mp4")),
    ("https://stmedia01.blob.core.windows.net/videos/my%2520clip.mp4", ("videos", "my%20clip.mp4")),
    ("https://stmedia01.blob.core.windows.net/videos/%C3%A9t%C3%A9.mp4", ("videos", "été.mp4")),
    ("https://stmedia01.blob.core.windows.net/videos/what%3F%23.mp4", ("videos", "what?#.mp4")),
    ("https://stmedia01.blob.core.windows.net/videos/raw space.mp4", ("videos", "raw space.mp4")),
    ("http://127.0.0.1:10000/devstoreaccount1/videos/a.mp4", ("videos", "a.mp4")),
])
def test_urls_of_configured_accounts_parse(url: str, ref: tuple[str, str]) -> None:
    """Host-style, Data Lake and path-style URLs decode once into a reference."""
    assert parse_blob_url(url, ENDPOINTS) == BlobRef(*ref)


@pytest.mark.parametrize(("url", "named"), [
    ("https://evil.blob.core.windows.net/videos/a.mp4", "evil.blob.core.windows.net"),
    ("https://stmedia01.blob.core.windows.net.evil.com/videos/a.mp4", "windows.net.evil.com"),
    ("https://stmedia01.blob.core.windows.net@evil.com/videos/a.mp4", "evil.com"),
    ("http://stmedia01.blob.core.windows.net/videos/a.mp4", "http://stmedia01"),
    ("https://stmedia01.blob.core.windows.net:8443/videos/a.mp4", ":8443"),
    ("ftp://stmedia01.blob.core.windows.net/videos/a.mp4", "ftp://"),
    ("file:///etc/passwd", "file://"),
    ("http://127.0.0.1:10001/devstoreaccount1/videos/a.mp4", "127.0.0.1:10001"),
    ("http://127.0.0.1:10000/otheraccount/videos/a.mp4", "'otheraccount'"),
    ("https://evil@stmedia01.blob.core.windows.net/videos/a.mp4", "user info"),
])
def test_urls_elsewhere_are_foreign_storage(url: str, named: str) -> None:
    """Other accounts, hosts, schemes, ports and user info are ForeignStorage naming them."""
    with pytest.raises(ForeignStorage) as caught:
        parse_blob_url(url, ENDPOINTS)
    assert named in caught.value.description
    assert caught.value.reason == "ForeignStorage"


def test_foreign_storage_lists_the_accepted_accounts() -> None:
    """The description says which accounts would have been accepted."""
    with pytest.raises(ForeignStorage) as caught:
        parse_blob_url("https://other.example/c/b", (PROD,))
    assert "stmedia01.blob.core.windows.net" in caught.value.description


@pytest.mark.parametrize("url", [
    f"https://stmedia01.blob.core.windows.net/videos/a.mp4?sv=2024-11-04&{SIG}",
    f"https://evil.example/videos/a.mp4?{SIG}",
    f"https://stmedia01.blob.core.windows.net/videos/a.mp4#{SIG}",
])
def test_urls_with_a_query_or_fragment_are_refused_without_echo(url: str) -> None:
    """A SAS in a message is refused and never repeated in the description."""
    with pytest.raises(InvalidParams) as caught:
        parse_blob_url(url, ENDPOINTS)
    assert "c2VjcmV0" not in str(caught.value)
    assert "sig=" not in caught.value.description and "sv=" not in caught.value.description


@pytest.mark.parametrize(("url", "problem"), [
    ("https://stmedia01.blob.core.windows.net/videos/a/%2E%2E/b", "'..' path segment"),
    ("https://stmedia01.blob.core.windows.net/videos/../secrets/k", "'..' path segment"),
    ("https://stmedia01.blob.core.windows.net/videos/a//b", "empty path segment"),
    ("https://stmedia01.blob.core.windows.net/videos/a%5Cb", "backslash"),
    ("https://stmedia01.blob.core.windows.net/videos/a%00b", "control character"),
    ("https://stmedia01.blob.core.windows.net/videos/a%zzb", "malformed %-escape"),
    ("https://stmedia01.blob.core.windows.net/videos/a%FFb", "not UTF-8"),
    ("https://stmedia01.blob.core.windows.net/videos", "names no blob"),
    ("https://stmedia01.blob.core.windows.net/videos/", "names no blob"),
    ("https://stmedia01.blob.core.windows.net", "names no blob"),
    ("http://127.0.0.1:10000/devstoreaccount1", "names no blob"),
    ("https://stmedia01.blob.core.windows.net/Videos/a", "container 'Videos'"),
    ("https://stmedia01.blob.core.windows.net:99999/videos/a", "not a valid URL"),
])
def test_bad_names_in_urls_are_invalid_params(url: str, problem: str) -> None:
    """Traversal and malformed names in a URL of our own account are InvalidParams."""
    with pytest.raises(InvalidParams) as caught:
        parse_blob_url(url, ENDPOINTS)
    assert problem in caught.value.description


def test_make_ref_checks_both_parts() -> None:
    """make_ref validates the container and the blob name."""
    assert make_ref("videos", "a b.mp4") == BlobRef("videos", "a b.mp4")
    with pytest.raises(InvalidParams, match="container"):
        make_ref("V", "a")


def test_account_endpoints_parse_both_styles() -> None:
    """Host-style URLs take the account from the host, path-style from the path."""
    assert (PROD.account, PROD.path_prefix, PROD.port) == ("stmedia01", "", 443)
    assert (AZURITE.account, AZURITE.path_prefix, AZURITE.url) == (
        "devstoreaccount1", "/devstoreaccount1", "http://127.0.0.1:10000/devstoreaccount1")
    twin = PROD.dfs_twin()
    assert twin is not None and twin.host == "stmedia01.dfs.core.windows.net"
    assert AZURITE.dfs_twin() is None
    custom = AccountEndpoint.parse("https://media.example.com", account_name="stmedia01")
    assert custom.account == "stmedia01"


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://x.blob.core.windows.net", "http(s)"),
    ("https://media.example.com", "account_name"),
    ("https://a.blob.core.windows.net/?sv=1", "query"),
    ("http://127.0.0.1:10000/acct/extra", "more than an account"),
])
def test_bad_account_urls_are_config_errors(url: str, problem: str) -> None:
    """A configured account URL that cannot work is a ValueError naming the problem."""
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        AccountEndpoint.parse(url)


def test_blob_urls_are_percent_encoded_like_the_sdk() -> None:
    """Unsigned blob URLs quote spaces, '%', '?', '#' and unicode, keeping '/'."""
    url = PROD.blob_url(BlobRef("videos", "a dir/100%?#é.mp4"))
    assert url == "https://stmedia01.blob.core.windows.net/videos/a%20dir/100%25%3F%23%C3%A9.mp4"
    assert parse_blob_url(url, ENDPOINTS) == BlobRef("videos", "a dir/100%?#é.mp4")


def test_redact_url_strips_query_fragment_and_user_info() -> None:
    """redact_url keeps scheme, host and path only."""
    url = f"https://user:pw@acct.blob.core.windows.net/c/b%20x?sv=1&{SIG}#frag"
    assert redact_url(url) == "https://acct.blob.core.windows.net/c/b%20x"


def test_redact_text_strips_signatures_from_free_text() -> None:
    """URL queries, sig= values and AccountKey= values are removed from messages."""
    text = (f"GET https://a.blob.core.windows.net/c/b?sv=1&{SIG} failed; "
            "AccountKey=abc123==;EndpointSuffix=core.windows.net; " + SIG)
    redacted = redact_text(text)
    assert "c2VjcmV0" not in redacted and "abc123" not in redacted
    assert "https://a.blob.core.windows.net/c/b failed" in redacted


def _no_urls(url: str) -> BlobRef:
    raise AssertionError(f"unexpected URL parse of {url}")
