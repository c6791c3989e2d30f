"""The downloader against a loopback server that misbehaves."""

from __future__ import annotations

import gzip
import hashlib
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from crawl.download import Fetcher, HttpLimits, sniff
from crawl.store import DiskFullError, ObjectStore

from conftest import HostileServer, free_port, jpeg_bytes, png_bytes, respond, sequence

FAST = HttpLimits(
    per_host_concurrency=4,
    per_host_delay_s=0.0,
    connect_timeout_s=1.0,
    read_timeout_s=0.5,
    deadline_s=5.0,
    max_bytes=200_000,
    max_redirects=5,
    retries=3,
    backoff_s=0.05,
    max_retry_after_s=3.0,
    allow_private=True,  # the loopback servers here stand in for the public web (tests/test_ssrf.py: the check)
    robots=False,  # the download mechanics alone (tests/test_robots.py: robots.txt)
)


@pytest.fixture()
def store(tmp_path: Path):
    with ObjectStore(tmp_path / "store") as s:
        yield s


def fetch(url: str, store: ObjectStore, **overrides: Any):
    limits = HttpLimits(**{**FAST.__dict__, **overrides})
    return Fetcher(limits).download(url, store)


def objects(store: ObjectStore) -> list[Path]:
    return sorted(p for p in store.objects_dir.rglob("*") if p.is_file())


def assert_nothing_written(store: ObjectStore) -> None:
    assert objects(store) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_ok_jpeg_is_stored_under_its_sha256(hostile: HostileServer, store: ObjectStore) -> None:
    body = jpeg_bytes((40, 30))
    hostile.routes["/a.jpg"] = respond(200, body)
    out = fetch(hostile.url("/a.jpg"), store)
    assert out.ok and out.reason is None
    sha = hashlib.sha256(body).hexdigest()
    assert out.sha256 == sha and out.path == store.path_for(sha, "jpg")
    assert out.path.read_bytes() == body
    assert (out.width, out.height, out.format, out.bytes) == (40, 30, "JPEG", len(body))
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("code", [404, 410])
def test_gone_is_final_and_not_retried(hostile: HostileServer, store: ObjectStore, code: int) -> None:
    hostile.routes["/x"] = respond(code, b"gone", {"Content-Type": "text/html"})
    out = fetch(hostile.url("/x"), store)
    assert (out.ok, out.reason) == (False, f"http_{code}")
    assert len(hostile.hits("/x")) == 1
    assert_nothing_written(store)


def test_forbidden_is_not_retried_in_this_run(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/x"] = respond(403, b"no", {"Content-Type": "text/html"})
    out = fetch(hostile.url("/x"), store)
    assert out.reason == "http_403" and len(hostile.hits("/x")) == 1


def test_429_waits_for_retry_after_then_succeeds(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/x"] = sequence(respond(429, b"", {"Retry-After": "2"}), respond(200, jpeg_bytes()))
    out = fetch(hostile.url("/x"), store)
    hits = hostile.hits("/x")
    assert out.ok and len(hits) == 2
    assert hits[1]["time"] - hits[0]["time"] >= 1.9


def test_retry_after_is_capped(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/x"] = sequence(respond(429, b"", {"Retry-After": "3600"}), respond(200, jpeg_bytes()))
    t0 = time.monotonic()
    out = fetch(hostile.url("/x"), store, max_retry_after_s=0.3)
    assert out.ok and time.monotonic() - t0 < 3


def test_503_twice_then_ok_with_backoff(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/x"] = sequence(respond(503), respond(503), respond(200, jpeg_bytes()))
    out = fetch(hostile.url("/x"), store)
    assert out.ok and out.attempts == 3 and len(hostile.hits("/x")) == 3


def test_500_forever_gives_up_after_the_retry_budget(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/x"] = respond(500)
    out = fetch(hostile.url("/x"), store, retries=4)
    assert out.reason == "http_5xx" and len(hostile.hits("/x")) == 4
    assert_nothing_written(store)


def test_no_headers_times_out(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/x"] = lambda sock, req: time.sleep(3)
    t0 = time.monotonic()
    out = fetch(hostile.url("/x"), store, retries=1)
    assert out.reason == "timeout" and time.monotonic() - t0 < 2.5


def test_slow_drip_hits_the_deadline_and_writes_nothing(hostile: HostileServer, store: ObjectStore) -> None:
    def drip(sock: socket.socket, req: dict[str, Any]) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n\xff\xd8\xff")
        for _ in range(40):
            sock.sendall(b"x")
            time.sleep(0.1)  # well inside the read timeout each time

    hostile.routes["/x"] = drip
    t0 = time.monotonic()
    out = fetch(hostile.url("/x"), store, deadline_s=1.5)
    assert out.reason == "timeout"
    assert time.monotonic() - t0 < 2.5
    assert_nothing_written(store)


def test_huge_content_length_is_refused_before_reading(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/x"] = respond(200, jpeg_bytes(), length=10_000_000_000)
    out = fetch(hostile.url("/x"), store)
    assert out.reason == "too_large" and len(hostile.hits("/x")) == 1
    assert_nothing_written(store)


def test_endless_chunked_body_stops_at_the_byte_cap(hostile: HostileServer, store: ObjectStore) -> None:
    def endless(sock: socket.socket, req: dict[str, Any]) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"\xff" * 8192
        for _ in range(10_000):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")

    hostile.routes["/x"] = endless
    out = fetch(hostile.url("/x"), store)
    assert out.reason == "too_large"
    assert_nothing_written(store)


def test_short_body_is_truncated_and_not_saved(hostile: HostileServer, store: ObjectStore) -> None:
    body = jpeg_bytes((64, 64))
    hostile.routes["/x"] = respond(200, body[:200], length=len(body))
    out = fetch(hostile.url("/x"), store)
    assert out.reason == "truncated_body"
    assert_nothing_written(store)


def test_gzip_bomb_stops_at_the_decoded_cap(hostile: HostileServer, store: ObjectStore) -> None:
    bomb = gzip.compress(b"\0" * 50_000_000, compresslevel=9)  # ~50 KB on the wire
    hostile.routes["/x"] = respond(200, bomb, {"Content-Encoding": "gzip"})
    out = fetch(hostile.url("/x"), store)
    assert out.reason == "too_large"
    assert_nothing_written(store)


def test_gzip_encoded_image_is_decoded(hostile: HostileServer, store: ObjectStore) -> None:
    body = jpeg_bytes()
    hostile.routes["/x"] = respond(200, zlib.compress(body), {"Content-Encoding": "deflate"})
    out = fetch(hostile.url("/x"), store)
    assert out.ok and out.path is not None and out.path.read_bytes() == body


def test_redirect_loop_and_long_chain_stop_at_the_cap(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/loop"] = respond(302, b"", {"Location": "/loop"})
    for i in range(20):
        hostile.routes[f"/c{i}"] = respond(301, b"", {"Location": f"/c{i + 1}"})
    hostile.routes["/c20"] = respond(200, jpeg_bytes())
    assert fetch(hostile.url("/loop"), store, retries=1).reason == "too_many_redirects"
    assert len(hostile.hits("/loop")) == 6  # the first request + 5 redirects
    assert fetch(hostile.url("/c0"), store).reason == "too_many_redirects"


def test_short_redirect_chain_is_followed(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/a"] = respond(302, b"", {"Location": "/b"})
    hostile.routes["/b"] = respond(200, jpeg_bytes())
    out = fetch(hostile.url("/a"), store)
    assert out.ok and out.final_url == hostile.url("/b")


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "internal"])
def test_redirect_to_other_schemes_or_internal_services_is_blocked(
    hostile: HostileServer, store: ObjectStore, target: str
) -> None:
    internal = HostileServer()  # another loopback port standing in for an internal service
    internal.routes["/secret"] = respond(200, jpeg_bytes())
    try:
        location = internal.url("/secret") if target == "internal" else target
        hostile.routes["/r"] = respond(302, b"", {"Location": location})
        # only the hostile server's own endpoint is allowed, as the mirror engine allows its own
        out = fetch(hostile.url("/r"), store, allow_private=False, allow_hosts=(hostile.base.split("//")[1],))
        assert out.reason == ("loopback_address" if target == "internal" else "redirect_blocked")
        assert len(hostile.hits("/r")) == 1 and internal.hits("/secret") == []
    finally:
        internal.shutdown()
        internal.server_close()


def test_bytes_decide_not_the_content_type(hostile: HostileServer, store: ObjectStore) -> None:
    hostile.routes["/real.jpg"] = respond(200, jpeg_bytes(), {"Content-Type": "text/html"})
    hostile.routes["/fake.jpg"] = respond(200, b"<html><body>captcha</body></html>", {"Content-Type": "image/jpeg"})
    assert fetch(hostile.url("/real.jpg"), store).ok
    fake = fetch(hostile.url("/fake.jpg"), store)
    assert (fake.ok, fake.reason) == (False, "unidentified")
    assert len(objects(store)) == 1


def test_reset_mid_body_is_retried_and_partial_never_saved(hostile: HostileServer, store: ObjectStore) -> None:
    body = png_bytes((64, 64))

    def reset(sock: socket.socket, req: dict[str, Any]) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body[: len(body) // 2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST

    hostile.routes["/x"] = sequence(reset, respond(200, body, {"Content-Type": "image/png"}))
    out = fetch(hostile.url("/x"), store)
    assert out.ok and len(hostile.hits("/x")) == 2
    assert out.path is not None and out.path.read_bytes() == body
    assert len(objects(store)) == 1


def test_connection_refused_is_bounded(store: ObjectStore) -> None:
    t0 = time.monotonic()
    out = fetch(f"http://127.0.0.1:{free_port()}/x.jpg", store)
    assert out.reason == "connection_error" and out.attempts == 3
    assert time.monotonic() - t0 < 3


def test_per_host_concurrency_and_spacing(hostile: HostileServer, tmp_path: Path) -> None:
    active = {"now": 0, "max": 0}

    def slow(sock: socket.socket, req: dict[str, Any]) -> None:
        with hostile.lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        time.sleep(0.3)
        with hostile.lock:
            active["now"] -= 1
        respond(200, jpeg_bytes(colour=(int(req["path"][2:]), 0, 0)))(sock, req)

    for i in range(8):
        hostile.routes[f"/i{i}"] = slow
    limits = HttpLimits(**{**FAST.__dict__, "per_host_concurrency": 2, "per_host_delay_s": 0.1})
    fetcher = Fetcher(limits)
    from concurrent.futures import ThreadPoolExecutor

    with ObjectStore(tmp_path / "s") as store, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: fetcher.download(hostile.url(f"/i{i}"), store), range(8)))
    assert all(r.ok for r in results)
    assert active["max"] <= 2
    starts = sorted(e["time"] for e in hostile.log)
    assert min(b - a for a, b in zip(starts, starts[1:], strict=False)) >= 0.09


def test_disk_full_raises_and_leaves_no_partial_object(
    hostile: HostileServer, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    hostile.routes["/x"] = respond(200, jpeg_bytes())
    real_new_temp = store.new_temp

    class FullFile:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

    monkeypatch.setattr(store, "new_temp", lambda: (lambda p, f: (p, FullFile(f)))(*real_new_temp()))
    with pytest.raises(DiskFullError, match="disk full at"):
        fetch(hostile.url("/x"), store)
    assert_nothing_written(store)


def test_disk_full_on_dev_full(hostile: HostileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    hostile.routes["/x"] = respond(200, png_bytes((200, 200)))
    with ObjectStore(tmp_path / "s") as store:
        tmp = store.tmp_dir / "full.part"
        monkeypatch.setattr(store, "new_temp", lambda: (tmp, open("/dev/full", "wb", buffering=0)))  # noqa: SIM115
        with pytest.raises(DiskFullError):
            fetch(hostile.url("/x"), store)
        assert objects(store) == []


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0rest", ("JPEG", None)),
        (b"\x89PNG\r\n\x1a\nrest", ("PNG", None)),
        (b"GIF89a....", ("GIF", None)),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", ("WEBP", None)),
        (b"", (None, "empty")),
        (b"<!DOCTYPE html><html>", (None, "unidentified")),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">', (None, "unsupported_format")),
        (b"%PDF-1.7", (None, "format_not_allowed")),
        (b"II*\x00\x08\x00", (None, "format_not_allowed")),
        (b"8BPS\x00\x01", (None, "format_not_allowed")),
    ],
)
def test_sniff_judges_by_magic_bytes(head: bytes, expected: tuple[str | None, str | None]) -> None:
    assert sniff(head) == expected


def test_identical_bytes_from_two_urls_are_stored_once(hostile: HostileServer, store: ObjectStore) -> None:
    body = jpeg_bytes()
    hostile.routes["/a.jpg"] = respond(200, body)
    hostile.routes["/b.jpg"] = respond(200, body)
    a, b = fetch(hostile.url("/a.jpg"), store), fetch(hostile.url("/b.jpg"), store)
    assert a.path == b.path and len(objects(store)) == 1
