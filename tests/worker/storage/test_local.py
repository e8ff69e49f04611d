"""LocalStorage: the ``<root>/<container>/<blob>`` layout, file URLs and containment."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

from handlers.base import BlobRef
from handlers.errors import ForeignStorage, InvalidParams
from worker.storage.local import LocalStorage, file_url, file_url_path, safe_join

NAMES = ["plain.mp4", "2026/11/a.mp4", "my clip.mp4", "été/名前 ünï.mp4", "100%.mp4",
         "a%20b.mp4", "what?#.mp4", "my clip; rm -rf ~.mp4", "+&=@!'()[],.mp4"]


def test_blobs_are_laid_out_as_container_and_name(local_storage: LocalStorage) -> None:
    """upload writes <root>/<container>/<blob>, with '/' making directories."""
    local_storage.upload(BlobRef("videos", "2026/11/a.mp4"), b"frames")
    assert (local_storage.root / "videos" / "2026" / "11" / "a.mp4").read_bytes() == b"frames"


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip_through_input_url(local_storage: LocalStorage, name: str) -> None:
    """input_url names the blob's file exactly, readable as a file URL, and parses back."""
    ref = BlobRef("videos", name)
    local_storage.upload(ref, name.encode())
    url = local_storage.input_url(ref)
    assert url.startswith("file:///") and " " not in url and "?" not in url and "#" not in url
    assert file_url_path(url) == local_storage.root.resolve() / "videos" / name
    with urllib.request.urlopen(url) as response:
        assert response.read() == name.encode()
    assert local_storage.parse_url(url) == ref


def test_output_container_url_is_the_container_directory(local_storage: LocalStorage) -> None:
    """The output destination is the container's directory; the path is joined under it."""
    url = local_storage.output_container_url("renders", "shot 1/frames/")
    directory = file_url_path(url)
    assert directory == local_storage.root.resolve() / "renders"
    target = safe_join(directory, "shot 1/frames/0001.png")
    assert target == directory / "shot 1" / "frames" / "0001.png"


def test_output_prefix_is_checked(local_storage: LocalStorage) -> None:
    """A traversal prefix is refused before any URL is handed out."""
    with pytest.raises(InvalidParams, match="prefix"):
        local_storage.output_container_url("renders", "../../etc/")


@pytest.mark.parametrize("name", ["../outside", "a/../../outside", "/etc/passwd", "a\\..\\b"])
def test_traversal_names_are_refused(local_storage: LocalStorage, name: str) -> None:
    """No operation accepts a name with path tricks; nothing is written outside root."""
    ref = BlobRef("videos", name)
    for operation in (local_storage.input_url, local_storage.download, local_storage.exists):
        with pytest.raises(InvalidParams):
            operation(ref)
    with pytest.raises(InvalidParams):
        local_storage.upload(ref, b"x")
    assert not (local_storage.root.parent / "outside").exists()


def test_symlink_escaping_the_container_is_refused(local_storage: LocalStorage,
                                                    tmp_path: Path) -> None:
    """A symlink inside a container that points outside root cannot be read or written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    container = local_storage.root / "videos"
    container.mkdir(parents=True)
    (container / "link").symlink_to(outside)
    escape = BlobRef("videos", "link/secret.txt")
    with pytest.raises(ForeignStorage, match="resolves outside"):
        local_storage.download(escape)
    with pytest.raises(ForeignStorage):
        local_storage.upload(BlobRef("videos", "link/new.txt"), b"x")
    with pytest.raises(ForeignStorage):
        local_storage.input_url(escape)
    assert not (outside / "new.txt").exists()
    assert local_storage.list("videos") == []


def test_symlinked_container_is_refused(local_storage: LocalStorage, tmp_path: Path) -> None:
    """A container directory that is itself a symlink elsewhere is refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    local_storage.root.mkdir(parents=True)
    (local_storage.root / "videos").symlink_to(elsewhere)
    with pytest.raises(ForeignStorage, match="symlink"):
        local_storage.upload(BlobRef("videos", "a.mp4"), b"x")
    assert list(elsewhere.iterdir()) == []


def test_symlink_within_the_container_is_followed(local_storage: LocalStorage) -> None:
    """A symlink that stays inside its container is an ordinary alias."""
    local_storage.upload(BlobRef("videos", "real/a.mp4"), b"data")
    (local_storage.root / "videos" / "alias").symlink_to(local_storage.root / "videos" / "real")
    assert local_storage.download(BlobRef("videos", "alias/a.mp4")) == b"data"


def test_parse_url_refuses_other_places(local_storage: LocalStorage, tmp_path: Path) -> None:
    """Only file URLs under the root are accepted; others are ForeignStorage."""
    elsewhere = file_url(tmp_path / "other" / "videos" / "a.mp4")
    with pytest.raises(ForeignStorage, match="outside the local blob root"):
        local_storage.parse_url(elsewhere)
    with pytest.raises(ForeignStorage, match="https://example.com"):
        local_storage.parse_url("https://example.com/videos/a.mp4")
    inside = local_storage.input_url(BlobRef("videos", "a.mp4"))
    with pytest.raises(ForeignStorage, match="file://otherhost"):
        local_storage.parse_url(inside.replace("file://", "file://otherhost"))


@pytest.mark.parametrize("suffix", ["videos/../../x", "videos/%2E%2E/%2E%2E/x", "videos/a//b",
                                    "videos", "Videos/a"])
def test_parse_url_refuses_bad_names_under_root(local_storage: LocalStorage, suffix: str) -> None:
    """Traversal and malformed names in a root URL are InvalidParams."""
    with pytest.raises(InvalidParams):
        local_storage.parse_url(f"{local_storage.account_url}/{suffix}")


def test_parse_url_accepts_localhost_and_the_unresolved_root(tmp_path: Path) -> None:
    """file://localhost/... and the root as configured (through a symlink) both parse."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    storage = LocalStorage(root=tmp_path / "via")
    expected = BlobRef("videos", "a b.mp4")
    assert storage.parse_url(f"file://localhost{real}/videos/a%20b.mp4") == expected
    assert storage.parse_url(f"file://{tmp_path}/via/videos/a%20b.mp4") == expected


def test_list_and_exists(local_storage: LocalStorage) -> None:
    """list filters by prefix and sorts by name; exists tells files from nothing."""
    for name in ["b/2.mp4", "a/1.mp4", "b/1.mp4", "c.txt"]:
        local_storage.upload(BlobRef("videos", name), b"x")
    assert [r.blob for r in local_storage.list("videos")] == ["a/1.mp4", "b/1.mp4", "b/2.mp4",
                                                             "c.txt"]
    assert [r.blob for r in local_storage.list("videos", "b/")] == ["b/1.mp4", "b/2.mp4"]
    assert local_storage.list("empty") == []
    assert local_storage.exists(BlobRef("videos", "c.txt"))
    assert not local_storage.exists(BlobRef("videos", "b"))


def test_download_of_a_missing_blob_is_file_not_found(local_storage: LocalStorage) -> None:
    """A missing blob raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="videos/nope.mp4"):
        local_storage.download(BlobRef("videos", "nope.mp4"))


def test_upload_replaces_atomically_and_leaves_no_temp_files(local_storage: LocalStorage) -> None:
    """An overwrite leaves the new content and no staging leftovers in any container."""
    ref = BlobRef("videos", "a.mp4")
    local_storage.upload(ref, b"old")
    local_storage.upload(ref, b"new")
    assert local_storage.download(ref) == b"new"
    assert os.listdir(local_storage.root / ".staging") == []
    assert local_storage.list("videos") == [ref]


def test_safe_join_refuses_escapes(tmp_path: Path) -> None:
    """safe_join (for writing outputs) refuses traversal names and escaping symlinks."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(InvalidParams):
        safe_join(tmp_path / "out", "../x")
    with pytest.raises(ForeignStorage):
        safe_join(tmp_path / "out", "link/x")


def test_file_url_path_refuses_non_local_urls() -> None:
    """file_url_path takes only local file URLs."""
    with pytest.raises(ValueError, match="not a local file URL"):
        file_url_path("https://example.com/a")
    with pytest.raises(ValueError):
        file_url_path("file://server/share/a")


def test_read_tail_reads_the_end_only(local_storage: LocalStorage) -> None:
    """read_tail returns the last bytes, all of a smaller blob, b"" for 0, None if absent."""
    ref = BlobRef("logs", "job/t1/stderr.txt")
    local_storage.upload(ref, b"0123456789")
    assert local_storage.read_tail(ref, 4) == b"6789"
    assert local_storage.read_tail(ref, 100) == b"0123456789"
    assert local_storage.read_tail(ref, 0) == b""
    assert local_storage.read_tail(BlobRef("logs", "job/t2/stderr.txt"), 4) is None
    assert local_storage.read_tail(BlobRef("nocontainer", "x.txt"), 4) is None
    with pytest.raises(ValueError, match="max_bytes"):
        local_storage.read_tail(ref, -1)


def test_read_tail_never_reads_the_whole_file(local_storage: LocalStorage,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only max_bytes are read from the file, after a seek near its end."""
    ref = BlobRef("logs", "big.txt")
    local_storage.upload(ref, b"x" * 100_000 + b"tail")
    reads: list[int] = []
    real_open = Path.open

    def spy_open(self: Path, *args: object, **kwargs: object) -> object:
        handle = real_open(self, *args, **kwargs)  # type: ignore[call-overload]
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            reads.append(size)
            return bytes(real_read(size))

        handle.read = read
        return handle

    monkeypatch.setattr(Path, "open", spy_open)
    assert local_storage.read_tail(ref, 4) == b"tail"
    assert reads == [4]


def test_read_tail_stays_inside_the_root(local_storage: LocalStorage) -> None:
    """A traversal name is refused, as for every other operation."""
    with pytest.raises((InvalidParams, ForeignStorage)):
        local_storage.read_tail(BlobRef("logs", "../../etc/passwd"), 10)
