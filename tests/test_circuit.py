"""A host that never answers, and a class that takes too long: both leave work for the next run."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crawl.crawler import summary_table
from crawl.download import Fetcher, HttpLimits
from crawl.manifest import latest_records
from pipeline import crawl_stage
from pipeline.config import CrawlConfig, load_section

from conftest import HostileServer, _RawHandler, crawl_urls, free_port, jpeg_bytes, png_bytes, respond

LIMITS = HttpLimits(
    per_host_concurrency=1,  # one request at a time per host: exactly host_failures of them time out
    per_host_delay_s=0.0,
    retries=1,
    backoff_s=0.01,
    connect_timeout_s=0.3,
    read_timeout_s=0.3,
    deadline_s=2.0,
    allow_private=True,  # the loopback servers stand in for public hosts
    host_failures=3,
    robots=False,  # the breaker alone (tests/test_robots.py: robots.txt)
)


class HostileAt(HostileServer):
    """A ``HostileServer`` on a given port: the host that comes back for the next run."""

    def __init__(self, port: int) -> None:
        self.routes = {}
        self.log = []
        self.lock = threading.Lock()
        socketserver.ThreadingTCPServer.__init__(self, ("127.0.0.1", port), _RawHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class DeadHost:
    """A host that never answers, and can come back for the next run with ``revive()``.

    ``black_hole``: a server that accepts each request and never says a word; ``closed_port``:
    nothing listens, every connection is refused.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.release = threading.Event()
        self.server: HostileServer | None = None
        if kind == "black_hole":
            self.server = HostileServer()
            self.port = self.server.server_address[1]
            for i in range(10):
                self.server.routes[f"/{i}.jpg"] = lambda sock, req: self.release.wait(10)
        else:
            self.port = free_port()
        self.urls = [f"http://127.0.0.1:{self.port}/{i}.jpg" for i in range(10)]

    def revive(self) -> HostileServer:
        self.release.set()
        if self.server is None:
            self.server = HostileAt(self.port)
        for i in range(10):
            self.server.routes[f"/{i}.jpg"] = respond(200, jpeg_bytes(colour=(0, 10 * i, 200)))
        return self.server

    def close(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(params=["black_hole", "closed_port"])
def dead(request: pytest.FixtureRequest) -> Iterator[DeadHost]:
    host = DeadHost(request.param)
    yield host
    host.close()


def test_a_dead_host_trips_the_breaker_and_the_next_run_gets_its_urls(
    dead: DeadHost, hostile: HostileServer, tmp_path: Path
) -> None:
    alive = []
    for i in range(3):  # another host in the same run is not affected
        hostile.routes[f"/{i}.jpg"] = respond(200, jpeg_bytes(colour=(200, 10 * i, 0)))
        alive.append(hostile.url(f"/{i}.jpg"))
    out = tmp_path / "c"
    t0 = time.monotonic()
    (bag,) = crawl_urls(out, tmp_path, Fetcher(LIMITS), {"Bag": dead.urls + alive})
    assert time.monotonic() - t0 < 3  # 10 dead URLs cost 3 timeouts, not 10
    assert bag.downloaded == 3
    assert bag.failed == {"timeout" if dead.kind == "black_hole" else "connection_error": 3}
    assert bag.deferred == {"host_unresponsive": 7} and bag.requests == 6
    records = latest_records(out / "manifest.jsonl")
    assert len(records) == 6  # the 7 skipped URLs are not outcomes: nothing is recorded for them
    assert not any(r.is_final for r in records.values() if r.status != "ok")
    assert "deferred to the next run: 7 URLs host_unresponsive (Bag)" in summary_table([bag])

    back = dead.revive()  # the host answers again by the next run
    (again,) = crawl_urls(out, tmp_path, Fetcher(LIMITS), {"Bag": dead.urls + alive})
    assert again.downloaded == 13 and not again.deferred and not again.failed
    assert all(len(back.hits(f"/{i}.jpg")) >= 1 for i in range(10)) and len(hostile.hits("/0.jpg")) == 1


def test_class_budget_leaves_the_rest_of_a_class_for_the_next_run(
    hostile: HostileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def slow(sock: socket.socket, req: dict[str, Any]) -> None:
        time.sleep(0.2)
        respond(200, png_bytes(seed=int(req["path"][2:-4])), {"Content-Type": "image/png"})(sock, req)

    lines = []
    for cls, first in (("Bag", 0), ("Trouser", 100)):
        for i in range(first, first + 8):
            hostile.routes[f"/i{i}.jpg"] = slow
            lines.append(f"{cls}\t{hostile.url(f'/i{i}.jpg')}\n")
    (tmp_path / "urls.tsv").write_text("".join(lines))
    (tmp_path / "classes.txt").write_text("Bag\nTrouser\n")
    out = tmp_path / "c"

    def run(budget: str) -> dict[str, Any]:
        params = tmp_path / "params.yaml"
        params.write_text(
            f"crawl:\n  classes: {tmp_path / 'classes.txt'}\n  out_dir: {out}\n  engines: [urls]\n"
            f"  urls_file: {tmp_path / 'urls.tsv'}\n  min_per_class: 0\n  progress: false\n"
            f"  class_budget_s: {budget}\n"
            "  http: {allow_private: true, workers: 1, per_host_delay_s: 0.0, retries: 1, host_failures: 3}\n"
        )
        crawl_stage.run(load_section(params, "crawl", CrawlConfig))
        return json.loads((out / "report.json").read_text())

    first = run("0.5")
    for c in first["classes"]:  # each class gets its own budget
        assert 1 <= c["downloaded"] < 8
        assert c["deferred"] == {"class_budget": 8 - c["downloaded"]} and c["failed"] == {}
    assert "URLs class_budget (Bag, Trouser)" in capsys.readouterr().err
    second = run("null")
    assert [c["downloaded"] for c in second["classes"]] == [8, 8]
    assert all(c["deferred"] == {} for c in second["classes"])
    assert all(len(hostile.hits(f"/i{i}.jpg")) == 1 for i in [*range(8), *range(100, 108)])  # none twice
