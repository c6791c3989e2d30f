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
from crawl.mirror import MirrorServer
from crawl.sources import SearchContext, make_source

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
            Crawler(out, {"mirror": make_source("mirror", ctx)}, lambda c: build_queries(c.name, ["{name}"]),
                    ctx.fetcher, workers=4, progress=False).run(CLASSES)  # fmt: skip

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
