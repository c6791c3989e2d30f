"""robots.txt on loopback: Disallow, Crawl-delay, 4xx/5xx answers, one fetch per site, hostile files."""

from __future__ import annotations

import gzip
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from crawl.classes import parse_classes
from crawl.crawler import summary_table
from crawl.download import Fetcher, HttpLimits
from crawl.manifest import latest_records
from pipeline import crawl_stage
from pipeline.config import CrawlConfig, load_section

from conftest import HostileServer, crawl_urls, jpeg_bytes, respond, sequence

LIMITS = HttpLimits(
    per_host_concurrency=4,
    per_host_delay_s=0.0,
    retries=1,
    backoff_s=0.01,
    connect_timeout_s=1.0,
    read_timeout_s=1.0,
    deadline_s=5.0,
    robots=True,
    robots_timeout_s=2.0,
)
BAG = parse_classes("Bag")


def text(body: bytes) -> Any:
    return respond(200, body, {"Content-Type": "text/plain"})


def fetcher_for(*servers: HostileServer, **overrides: Any) -> Fetcher:
    """A fetcher that may reach only these loopback servers, as it would public hosts."""
    endpoints = tuple(s.base.split("//")[1] for s in servers)
    return Fetcher(HttpLimits(**{**LIMITS.__dict__, "allow_hosts": endpoints, **overrides}))


def serve_images(server: HostileServer, names: list[str], blue: int = 30) -> list[str]:
    """Distinct images at ``names`` (``blue`` sets them apart from another server's)."""
    for i, name in enumerate(names):
        server.routes[name] = respond(200, jpeg_bytes(colour=(10 * i, 200, blue)))
    return [server.url(n) for n in names]


def test_disallowed_urls_are_never_requested_and_are_a_counted_final_skip(
    hostile: HostileServer, tmp_path: Path
) -> None:
    hostile.routes["/robots.txt"] = text(
        b"User-agent: otherbot\nDisallow: /\n\n"  # a group for another crawler does not bind us
        b"User-agent: kd3\nDisallow: /private/\n\n"
        b"User-agent: *\nDisallow: /everyone-else/\n"
    )
    urls = serve_images(hostile, ["/a.jpg", "/private/b.jpg", "/private/c.jpg", "/everyone-else/d.jpg"])
    out = tmp_path / "c"
    (bag,) = crawl_urls(out, tmp_path, fetcher_for(hostile), {"Bag": urls})
    assert hostile.hits("/private/b.jpg") == [] and hostile.hits("/private/c.jpg") == []
    assert bag.downloaded == 2 and bag.requests == 2  # /a.jpg, and /everyone-else/ (not our group)
    assert bag.failed == {"robots_disallowed": 2}
    records = latest_records(out / "manifest.jsonl")
    rec = records[("Bag", urls[1])]
    assert (rec.status, rec.reason, rec.is_final) == ("failed", "robots_disallowed", True)
    assert "robots_disallowed 2" in summary_table([bag])
    again = crawl_urls(out, tmp_path, fetcher_for(hostile), {"Bag": urls})[0]
    assert (again.requests, again.skipped_failed) == (0, 2)  # final: a plain rerun leaves them alone


def test_crawl_delay_spaces_requests_to_that_host(hostile: HostileServer, tmp_path: Path) -> None:
    hostile.routes["/robots.txt"] = text(b"User-agent: *\nCrawl-delay: 1\n")
    urls = serve_images(hostile, ["/a.jpg", "/b.jpg", "/c.jpg"])
    (bag,) = crawl_urls(tmp_path / "c", tmp_path, fetcher_for(hostile), {"Bag": urls})  # per_host_delay_s is 0
    assert bag.downloaded == 3
    starts = sorted(e["time"] for e in hostile.log if e["path"].endswith(".jpg"))
    assert min(b - a for a, b in zip(starts, starts[1:], strict=False)) >= 0.95


def test_urls_that_cannot_start_before_their_deadline_do_not_delay_later_ones(
    hostile: HostileServer, tmp_path: Path
) -> None:
    hostile.routes["/robots.txt"] = text(b"User-agent: *\nCrawl-delay: 1\n")
    bag = serve_images(hostile, [f"/b{i}.jpg" for i in range(4)])
    trouser = serve_images(hostile, [f"/t{i}.jpg" for i in range(4)], blue=150)
    # four at once, one start a second, 1.5 s each: two start in time, two time out waiting
    first, second = crawl_urls(
        tmp_path / "c", tmp_path, fetcher_for(hostile, deadline_s=1.5), {"Bag": bag, "Trouser": trouser}
    )
    assert first.downloaded == 2 and first.failed == {"timeout": 2}
    assert second.downloaded >= 1  # the waits that timed out reserved no start times


@pytest.mark.parametrize("status", [404, 410, 401, 403])
def test_a_4xx_robots_txt_allows_everything(hostile: HostileServer, tmp_path: Path, status: int) -> None:
    # RFC 9309 2.3.1.3: 4xx means "unavailable", so nothing is disallowed (401 and 403 included)
    hostile.routes["/robots.txt"] = respond(status, b"no", {"Content-Type": "text/html"})
    urls = serve_images(hostile, ["/a.jpg", "/b.jpg"])
    (bag,) = crawl_urls(tmp_path / "c", tmp_path, fetcher_for(hostile), {"Bag": urls})
    assert bag.downloaded == 2 and not bag.failed and not bag.deferred
    assert len(hostile.hits("/robots.txt")) == 1


def hang(sock: socket.socket, req: dict[str, Any]) -> None:
    time.sleep(1.5)  # past robots_timeout_s below


@pytest.mark.parametrize("answer", ["503", "429", "timeout"])
def test_an_unreachable_robots_txt_defers_the_site_to_the_next_run(
    hostile: HostileServer, tmp_path: Path, answer: str
) -> None:
    broken = hang if answer == "timeout" else respond(int(answer), b"busy", {"Content-Type": "text/plain"})
    hostile.routes["/robots.txt"] = sequence(broken, text(b"User-agent: *\nDisallow:\n"))
    urls = serve_images(hostile, ["/a.jpg", "/b.jpg", "/c.jpg"])
    out = tmp_path / "c"
    (bag,) = crawl_urls(out, tmp_path, fetcher_for(hostile, robots_timeout_s=0.5), {"Bag": urls})
    assert [e for e in hostile.log if e["path"].endswith(".jpg")] == []
    assert bag.deferred == {"robots_unavailable": 3} and bag.requests == 0
    assert not (out / "manifest.jsonl").read_text()  # not a final outcome: nothing recorded
    assert "deferred to the next run: 3 URLs robots_unavailable (Bag)" in summary_table([bag])
    (later,) = crawl_urls(out, tmp_path, fetcher_for(hostile), {"Bag": urls})  # the next run
    assert later.downloaded == 3 and not later.deferred
    assert len(hostile.hits("/robots.txt")) == 2


def test_robots_txt_is_fetched_once_per_site_and_run(hostile: HostileServer, tmp_path: Path) -> None:
    other = HostileServer()
    try:
        hostile.routes["/robots.txt"] = text(b"User-agent: *\nDisallow: /x/\n")
        other.routes["/robots.txt"] = text(b"User-agent: *\nDisallow:\n")
        mine = serve_images(hostile, [f"/{i}.jpg" for i in range(8)])
        theirs = serve_images(other, [f"/{i}.jpg" for i in range(4)], blue=150)
        reports = crawl_urls(
            tmp_path / "c",
            tmp_path,
            fetcher_for(hostile, other),
            {"Bag": mine[:4] + theirs, "Trouser": mine[4:]},  # two classes, two sites, 4 workers at once
        )
        assert sum(r.downloaded for r in reports) == 12
        assert len(hostile.hits("/robots.txt")) == 1 and len(other.hits("/robots.txt")) == 1
    finally:
        other.shutdown()
        other.server_close()


def endless(sock: socket.socket, req: dict[str, Any]) -> None:
    sock.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"22\r\nUser-agent: *\nDisallow: /private/\n\r\n"
    )
    line = b"# " + b"x" * 8188 + b"\n"
    for _ in range(100_000):  # 800 MB if nobody stopped reading
        sock.sendall(b"%x\r\n" % len(line) + line + b"\r\n")


@pytest.mark.parametrize("kind", ["endless", "gzip_bomb"])
def test_a_huge_robots_txt_is_read_up_to_the_cap(hostile: HostileServer, tmp_path: Path, kind: str) -> None:
    if kind == "endless":
        hostile.routes["/robots.txt"] = endless
    else:
        bomb = gzip.compress(b"User-agent: *\nDisallow: /private/\n" + b"#" * 50_000_000, compresslevel=9)
        hostile.routes["/robots.txt"] = respond(200, bomb, {"Content-Type": "text/plain", "Content-Encoding": "gzip"})
    urls = serve_images(hostile, ["/a.jpg", "/private/b.jpg"])
    t0 = time.monotonic()
    (bag,) = crawl_urls(tmp_path / "c", tmp_path, fetcher_for(hostile, robots_timeout_s=4.0), {"Bag": urls})
    assert time.monotonic() - t0 < 3.5  # the byte cap stopped the read, not the timeout
    assert bag.downloaded == 1 and bag.failed == {"robots_disallowed": 1}


def test_robots_txt_redirected_to_an_internal_address_is_not_followed(hostile: HostileServer, tmp_path: Path) -> None:
    internal = HostileServer()  # another loopback port standing in for an internal service
    try:
        internal.routes["/robots.txt"] = text(b"User-agent: *\nDisallow:\n")
        hostile.routes["/robots.txt"] = respond(302, b"", {"Location": internal.url("/robots.txt")})
        urls = serve_images(hostile, ["/a.jpg"])
        (bag,) = crawl_urls(tmp_path / "c", tmp_path, fetcher_for(hostile), {"Bag": urls})
        assert internal.log == []
        assert bag.deferred == {"robots_unavailable": 1} and hostile.hits("/a.jpg") == []
    finally:
        internal.shutdown()
        internal.server_close()


def test_robots_txt_redirect_on_the_same_site_is_followed(hostile: HostileServer, tmp_path: Path) -> None:
    hostile.routes["/robots.txt"] = respond(301, b"", {"Location": "/real-robots.txt"})
    hostile.routes["/real-robots.txt"] = text(b"User-agent: *\nDisallow: /private/\n")
    urls = serve_images(hostile, ["/a.jpg", "/private/b.jpg"])
    (bag,) = crawl_urls(tmp_path / "c", tmp_path, fetcher_for(hostile), {"Bag": urls})
    assert bag.downloaded == 1 and bag.failed == {"robots_disallowed": 1}


@pytest.mark.parametrize("robots", [None, False])
def test_crawl_robots_false_fetches_everything(hostile: HostileServer, tmp_path: Path, robots: bool | None) -> None:
    hostile.routes["/robots.txt"] = text(b"User-agent: *\nDisallow: /\n")
    urls = serve_images(hostile, ["/a.jpg", "/b.jpg"])
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("".join(f"Bag\t{u}\n" for u in urls))
    (tmp_path / "classes.txt").write_text("Bag\n")
    out = tmp_path / "c"
    params = tmp_path / "params.yaml"
    params.write_text(
        f"crawl:\n  classes: {tmp_path / 'classes.txt'}\n  out_dir: {out}\n  engines: [urls]\n  urls_file: {tsv}\n"
        "  min_per_class: 0\n  progress: false\n"
        + ("" if robots is None else f"  robots: {str(robots).lower()}\n")
        + "  http: {allow_private: true, per_host_delay_s: 0.0, retries: 1}\n"
    )
    crawl_stage.run(load_section(params, "crawl", CrawlConfig))
    report = json.loads((out / "report.json").read_text())["classes"][0]
    if robots is None:  # the default honours robots.txt
        assert report["downloaded"] == 0 and report["failed"] == {"robots_disallowed": 2}
        assert len(hostile.hits("/robots.txt")) == 1
    else:
        assert report["downloaded"] == 2 and report["failed"] == {}
        assert hostile.hits("/robots.txt") == []
