"""Search results must not reach internal services: every hop's addresses are checked (loopback only)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from crawl.classes import parse_classes
from crawl.crawler import Crawler
from crawl.download import Fetcher, HttpLimits, address_problem
from crawl.manifest import latest_records
from crawl.sources import SearchContext, SourceError, make_source
from crawl.store import ObjectStore
from demo.mirror import MirrorServer

from conftest import HostileServer, jpeg_bytes, respond

LIMITS = HttpLimits(per_host_concurrency=4, per_host_delay_s=0.0, retries=1, read_timeout_s=2.0, deadline_s=5.0)


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback_address"),
        ("127.255.0.9", "loopback_address"),
        ("::1", "loopback_address"),
        ("::ffff:127.0.0.1", "loopback_address"),  # IPv4-mapped
        ("2002:7f00:1::", "loopback_address"),  # 6to4 of 127.0.0.1
        ("169.254.169.254", "link_local_address"),  # cloud metadata
        ("fe80::1", "link_local_address"),
        ("10.1.2.3", "private_address"),
        ("172.16.0.1", "private_address"),
        ("192.168.1.1", "private_address"),
        ("::ffff:192.168.1.1", "private_address"),
        ("fd00::1", "private_address"),
        ("0.0.0.0", "unspecified_address"),
        ("::", "unspecified_address"),
        ("224.0.0.1", "multicast_address"),
        ("ff02::1", "multicast_address"),
        ("240.0.0.1", "reserved_address"),
        ("100.64.0.1", "non_public_address"),  # carrier-grade NAT: neither private nor global
        ("93.184.216.34", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
        ("::ffff:93.184.216.34", None),
    ],
)
def test_address_classes(ip: str, reason: str | None) -> None:
    assert address_problem(ipaddress.ip_address(ip)) == reason


@pytest.fixture()
def store(tmp_path: Path):
    with ObjectStore(tmp_path / "store") as s:
        yield s


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"])
def test_first_hop_to_an_internal_address_is_refused_in_any_spelling(
    hostile: HostileServer, store: ObjectStore, host: str
) -> None:
    hostile.routes["/x.jpg"] = respond(200, jpeg_bytes())
    url = f"http://{host}:{hostile.server_address[1]}/x.jpg"
    out = Fetcher(LIMITS).download(url, store)
    assert (out.ok, out.reason, out.attempts) == (False, "loopback_address", 1)
    assert hostile.hits("/x.jpg") == []
    # the same URL is fetched when private addresses are allowed: the refusal was the check's
    assert Fetcher(HttpLimits(**{**LIMITS.__dict__, "allow_private": True})).download(url, store).ok


def test_a_name_with_any_internal_address_is_refused(
    hostile: HostileServer, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def fake(host: str, port: object, *args: object, **kw: object) -> list:  # type: ignore[type-arg]
        if host == "images.example":  # one public address and one internal: which is used is not ours to say
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
            ]
        return real(host, port, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    out = Fetcher(LIMITS).download("http://images.example/a.jpg", store)
    assert out.reason == "private_address"


def test_allowed_endpoint_is_that_host_and_port_only(hostile: HostileServer, store: ObjectStore) -> None:
    other = HostileServer()
    try:
        for server in (hostile, other):
            server.routes["/x.jpg"] = respond(200, jpeg_bytes())
        limits = HttpLimits(**{**LIMITS.__dict__, "allow_hosts": (hostile.base.split("//")[1],)})
        fetcher = Fetcher(limits)
        assert fetcher.download(hostile.url("/x.jpg"), store).ok
        assert fetcher.download(other.url("/x.jpg"), store).reason == "loopback_address"
        port = hostile.server_address[1]
        assert fetcher.download(f"http://localhost:{port}/x.jpg", store).reason == "loopback_address"  # by name
        hostile.routes["/r"] = respond(302, b"", {"Location": other.url("/x.jpg")})
        assert fetcher.download(hostile.url("/r"), store).reason == "loopback_address"
        assert other.hits("/x.jpg") == []
    finally:
        other.shutdown()
        other.server_close()
    with pytest.raises(ValueError, match="expected host:port"):
        Fetcher(HttpLimits(allow_hosts=("127.0.0.1",)))


def test_mirror_engine_reaches_its_own_address_and_nothing_else(
    mirror: MirrorServer, hostile: HostileServer, tmp_path: Path
) -> None:
    hostile.routes["/secret.jpg"] = respond(200, jpeg_bytes())
    tsv = tmp_path / "urls.tsv"
    tsv.write_text(f"Bag\t{hostile.url('/secret.jpg')}\n")  # a result pointing at an internal service
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url, urls_file=str(tsv))
    sources = {e: make_source(e, ctx) for e in ("mirror", "urls")}
    reports = Crawler(tmp_path / "c", sources, lambda c: [c.name], ctx.fetcher, progress=False).run(
        parse_classes("Bag")
    )
    assert reports[0].downloaded > 0  # the mirror's pages and images
    assert hostile.hits("/secret.jpg") == []
    rec = latest_records(tmp_path / "c" / "manifest.jsonl")[("Bag", hostile.url("/secret.jpg"))]
    assert (rec.status, rec.reason, rec.is_final) == ("failed", "loopback_address", True)
    assert reports[0].failed["loopback_address"] == 1


def test_a_search_page_on_an_internal_address_fails_the_engine(hostile: HostileServer) -> None:
    hostile.routes["/search?q=bag"] = respond(200, b"<html></html>", {"Content-Type": "text/html"})
    ctx = SearchContext(Fetcher(LIMITS), greedy_domains=[f"{hostile.base}/search?q={{query}}"])
    assert make_source("greedy", ctx).search(parse_classes("Bag")[0], "bag", 10) == []
    assert hostile.log == []
    page = Fetcher(LIMITS).get_page(hostile.url("/search?q=bag"))
    assert page.reason == "loopback_address"
    with pytest.raises(SourceError, match=r"failed \(loopback_address\)"):
        make_source("baidu", ctx).fetch(hostile.url("/search?q=bag"))  # type: ignore[attr-defined]
