"""The manifest file itself: torn tails, bad lines, and appends that fail part-way."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest

from crawl.classes import build_queries, parse_classes
from crawl.crawler import Crawler
from crawl.download import Fetcher, HttpLimits
from crawl.manifest import ImageRecord, JsonlWriter, iter_jsonl, latest_records, repair_tail
from crawl.sources import SearchContext, make_source
from demo.mirror import MirrorServer

from conftest import TINY_CLASSES

LIMITS = HttpLimits(per_host_concurrency=4, per_host_delay_s=0.0, retries=2, backoff_s=0.01, read_timeout_s=2.0)
CLASSES = parse_classes("\n".join(TINY_CLASSES))


def rec(url: str, query: str = "bag", status: str = "ok") -> ImageRecord:
    return ImageRecord("Bag", 2, query, "mirror", 0, url, status, None if status == "ok" else "http_404")


def line(r: ImageRecord) -> bytes:
    return (json.dumps(asdict(r), ensure_ascii=False) + "\n").encode()


def test_tail_torn_inside_a_multibyte_character_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    whole = line(rec("http://x/1.jpg")) + line(rec("http://x/2.jpg", query="sac à main"))
    cut = whole.index("à".encode()) + 1  # inside the two-byte character
    path.write_bytes(whole[:cut])
    assert list(latest_records(path)) == [("Bag", "http://x/1.jpg")]  # readers skip it, untouched
    assert path.read_bytes() == whole[:cut]
    assert repair_tail(path) == cut - len(line(rec("http://x/1.jpg")))
    assert path.read_bytes() == line(rec("http://x/1.jpg"))


def test_last_line_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    whole = line(rec("http://x/1.jpg")) + line(rec("http://x/2.jpg"))
    path.write_bytes(whole[:-1])
    assert repair_tail(path) == 0
    assert path.read_bytes() == whole


def test_bad_lines_anywhere_else_are_skipped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(
        line(rec("http://x/1.jpg"))
        + b"\xff\xfe not utf-8\n"
        + b'{"class_name": "Bag", "url": "http://x/half\n'
        + b"[1, 2]\n"
        + b'{"class_name": "Bag"}\n'  # JSON, but not a record
        + b"\n"
        + line(rec("http://x/2.jpg"))
    )
    bad: list[int] = []
    with caplog.at_level(logging.WARNING, logger="crawl.manifest"):
        records = latest_records(path, bad)
    assert sorted(url for _, url in records) == ["http://x/1.jpg", "http://x/2.jpg"]
    assert bad == [2, 3, 4, 5]
    assert f"{path}: line 2: not valid UTF-8 (byte 0xff at column 1); line skipped" in caplog.text
    assert f"{path}: line 3: not valid JSON" in caplog.text
    assert len(list(iter_jsonl(path))) == 3  # the record-shaped check is latest_records' own


def test_crawl_resumes_after_a_tail_torn_inside_a_multibyte_character(tiny_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    with MirrorServer(tiny_world) as server:
        ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=server.base_url)

        def crawl() -> None:
            Crawler(
                out,
                {"mirror": make_source("mirror", ctx)},
                lambda c: build_queries(c.name, ["{name}"]),
                ctx.fetcher,
                workers=4,
                progress=False,
            ).run(CLASSES)

        crawl()
        manifest = out / "manifest.jsonl"
        good = manifest.read_bytes()
        torn = line(rec(f"{server.base_url}/nowhere.jpg", query="sac à main"))
        manifest.write_bytes(good + torn[: torn.index("à".encode()) + 1])
        n = len(server.requests)
        crawl()  # used to fail with UnicodeDecodeError before the tail was repaired
        assert server.requests[n:] == []
        assert manifest.read_bytes() == good


def test_writer_repairs_a_torn_tail_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(line(rec("http://x/1.jpg")) + '{"query": "é'.encode()[:-1])
    with JsonlWriter(path) as w:
        w.write(rec("http://x/2.jpg"))
    assert [r["url"] for r in iter_jsonl(path)] == ["http://x/1.jpg", "http://x/2.jpg"]


# --------------------------------------------------------------------------------------------
# appends that fail part-way: a full disk, a file size limit
# --------------------------------------------------------------------------------------------


def short_write_then(monkeypatch: pytest.MonkeyPatch, fd: int, err: int) -> None:
    """The next ``os.write`` on ``fd`` writes half its bytes; the one after fails with ``err``.

    This is how a filling disk behaves (a short write, then ENOSPC), which a test cannot make
    portably with a real file system.
    """
    import os

    real = os.write
    calls = {"n": 0}

    def fake(f: int, data: bytes) -> int:
        if f != fd:
            return real(f, data)
        calls["n"] += 1
        if calls["n"] == 1:
            return real(f, bytes(data[: len(data) // 2]))
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "write", fake)


def test_disk_full_mid_line_names_the_file_and_leaves_no_torn_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from crawl.store import DiskFullError

    path = tmp_path / "manifest.jsonl"
    with JsonlWriter(path) as w:
        w.write(rec("http://x/1.jpg"))
        before = path.read_bytes()
        short_write_then(monkeypatch, w._fd, errno.ENOSPC)  # type: ignore[arg-type]
        with pytest.raises(DiskFullError, match=f"disk full while appending to {path}; cut back") as e:
            w.write(rec("http://x/2.jpg", query="sac à main"))
        assert e.value.errno == errno.ENOSPC
        assert path.read_bytes() == before
        monkeypatch.undo()  # space is back: the same writer goes on
        w.write(rec("http://x/3.jpg"))
    assert [r["url"] for r in iter_jsonl(path)] == ["http://x/1.jpg", "http://x/3.jpg"]


def test_file_size_limit_mid_line_is_a_real_short_write(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel itself cut a write short, then refuse (EFBIG)."""
    import subprocess
    import sys

    path = tmp_path / "manifest.jsonl"
    first = line(rec("http://x/1.jpg"))
    path.write_bytes(first)
    code = f"""
import resource, signal
from crawl.manifest import ImageRecord, JsonlWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(first) + 40}, resource.RLIM_INFINITY))
w = JsonlWriter({str(path)!r})
try:
    w.write(ImageRecord("Bag", 2, "bag", "mirror", 0, "http://x/" + "2" * 200, "ok"))
except OSError as e:
    print(e)
"""
    from conftest import REPO

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"while appending to {path}; cut back to its last complete line" in out.stdout
    assert path.read_bytes() == first


def test_crawl_stops_with_the_manifest_path_when_the_disk_fills(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from crawl.store import DiskFullError

    out = tmp_path / "c"
    manifest = out / "manifest.jsonl"
    real = os.write
    written = {"lines": 0}

    def fill_after_five(fd: int, data: bytes) -> int:
        if os.path.realpath(f"/proc/self/fd/{fd}") != str(manifest.resolve()):
            return real(fd, data)
        if written["lines"] >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        written["lines"] += 1
        return real(fd, data)

    with MirrorServer(tiny_world) as server:

        def crawl() -> None:
            ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=server.base_url)  # a stopped fetcher stays stopped
            Crawler(
                out,
                {"mirror": make_source("mirror", ctx)},
                lambda c: build_queries(c.name, ["{name}"]),
                ctx.fetcher,
                workers=4,
                progress=False,
            ).run(CLASSES)

        monkeypatch.setattr(os, "write", fill_after_five)
        with pytest.raises(DiskFullError, match=f"appending to {manifest}"):
            crawl()
        monkeypatch.undo()
        data = manifest.read_bytes()
        assert data.endswith(b"\n") and len(data.splitlines()) == 5
        crawl()  # space is back: the rerun finishes the crawl
    assert len(latest_records(manifest)) == 36
