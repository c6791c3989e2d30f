"""The crawl loop end to end on loopback: targets, resume, dedup, failures, kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crawl.classes import build_queries, parse_classes
from crawl.crawler import Crawler, CrawlError, summary_table
from crawl.download import Fetcher, HttpLimits
from crawl.manifest import latest_records
from crawl.sources import SearchContext, make_source
from crawl.store import ObjectStore, StoreLockedError
from demo.mirror import MirrorServer

from conftest import REPO, TINY_CLASSES, HostileServer, jpeg_bytes, make_world, read_jsonl, respond, sequence

LIMITS = HttpLimits(per_host_concurrency=4, per_host_delay_s=0.0, retries=2, backoff_s=0.01, read_timeout_s=2.0)
CLASSES = parse_classes("\n".join(TINY_CLASSES))


def open_to(server: HostileServer) -> Fetcher:
    """A fetcher allowed to reach ``server`` on loopback (the mirror engine allows its own address itself)."""
    return Fetcher(HttpLimits(**{**LIMITS.__dict__, "allow_hosts": (server.base.split("//")[1],)}))


def crawler(out: Path, ctx: SearchContext, engines: tuple[str, ...] = ("mirror",), **kw: object) -> Crawler:
    sources = {e: make_source(e, ctx) for e in engines}
    args = {"workers": 4, "per_class": 100, "min_per_class": 1, "progress": False, **kw}
    return Crawler(out, sources, lambda c: build_queries(c.name, ["{name}", "{name} photo"]), ctx.fetcher, **args)  # type: ignore[arg-type]


def image_requests(server: MirrorServer, since: int = 0) -> list[str]:
    return [r["path"] for r in server.requests[since:] if r["path"].startswith("/img/")]


def truth(world: Path) -> dict[str, dict]:
    return {t["path"]: t for t in read_jsonl(world / "truth.jsonl")}


def test_crawl_downloads_every_usable_result_and_records_provenance(mirror: MirrorServer, tmp_path: Path) -> None:
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
    reports = crawler(tmp_path / "c", ctx).run(CLASSES)
    t = truth(mirror.world_dir)
    records = latest_records(tmp_path / "c" / "manifest.jsonl")
    assert len(records) == 36  # 12 results x 3 classes, each requested once
    for (cls, url), rec in records.items():
        entry = t[url.split("/", 3)[3]]
        if entry["serve"] == "http_404":
            assert (rec.status, rec.reason) == ("failed", "http_404")
        elif entry.get("broken") == "html_as_image":
            assert (rec.status, rec.reason) == ("failed", "unidentified")
        else:  # photos, junk, re-uploads, and truncated files (the clean stage judges those)
            assert rec.status == "ok" and rec.sha256 == entry["sha256"]
            data = (tmp_path / "c" / rec.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == rec.sha256
            assert rec.engine == "mirror" and rec.query in (cls, f"{cls} photo") and rec.rank >= 0
    assert sum(r.downloaded for r in reports) == sum(r.status == "ok" for r in records.values())
    assert [r.name for r in reports] == TINY_CLASSES
    assert all(r.candidates == {"mirror": 12} for r in reports)


def test_rerun_requests_nothing_and_changes_nothing(mirror: MirrorServer, tmp_path: Path) -> None:
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
    crawler(tmp_path / "c", ctx).run(CLASSES)
    before = (tmp_path / "c" / "manifest.jsonl").read_bytes()
    n = len(mirror.requests)
    reports = crawler(tmp_path / "c", ctx).run(CLASSES)
    assert mirror.requests[n:] == []  # neither search pages nor images
    assert (tmp_path / "c" / "manifest.jsonl").read_bytes() == before
    assert all(r.new == 0 and r.requests == 0 and r.searches == 0 for r in reports)


def test_per_class_target_stops_early_and_a_larger_target_resumes(mirror: MirrorServer, tmp_path: Path) -> None:
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
    reports = crawler(tmp_path / "c", ctx, per_class=4).run(CLASSES)
    assert [r.downloaded for r in reports] == [4, 4, 4]
    first = set(image_requests(mirror))
    assert len(first) < 36
    n = len(mirror.requests)
    reports = crawler(tmp_path / "c", ctx, per_class=100).run(CLASSES)
    again = image_requests(mirror, n)
    assert not set(again) & first  # nothing requested twice
    assert len(first) + len(again) == 36


def test_identical_bytes_and_shared_urls_are_fetched_and_stored_once(hostile: HostileServer, tmp_path: Path) -> None:
    body = jpeg_bytes()
    for name in ("a", "b", "c"):
        hostile.routes[f"/{name}.jpg"] = respond(200, body)
    tsv = tmp_path / "urls.tsv"
    tsv.write_text(
        f"T-shirt/top\t{hostile.url('/a.jpg')}\nT-shirt/top\t{hostile.url('/b.jpg')}\n"
        f"Trouser\t{hostile.url('/a.jpg')}\nBag\t{hostile.url('/c.jpg')}\n"
    )
    ctx = SearchContext(open_to(hostile), urls_file=str(tsv))
    crawler(tmp_path / "c", ctx, engines=("urls",)).run(CLASSES)
    records = read_jsonl(tmp_path / "c" / "manifest.jsonl")
    assert len(records) == 4 and len({r["sha256"] for r in records}) == 1
    assert len({r["path"] for r in records}) == 1  # one object, every URL points to it
    assert len(list((tmp_path / "c" / "objects").rglob("*.jpg"))) == 1
    assert len(hostile.hits("/a.jpg")) == 1  # the URL shared by two classes is requested once


def test_urls_serving_the_same_bytes_count_as_one_image(hostile: HostileServer, tmp_path: Path) -> None:
    same = jpeg_bytes()
    lines = []
    for i in range(6):
        hostile.routes[f"/same{i}.jpg"] = respond(200, same)
        lines.append(f"Bag\t{hostile.url(f'/same{i}.jpg')}\n")
    for i in range(2):
        hostile.routes[f"/other{i}.jpg"] = respond(200, jpeg_bytes(colour=(0, 90 * i, 200)))
        lines.append(f"Bag\t{hostile.url(f'/other{i}.jpg')}\n")
    hostile.routes["/also-same.jpg"] = respond(200, same)
    lines.append(f"Trouser\t{hostile.url('/also-same.jpg')}\n")
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("".join(lines))
    ctx = SearchContext(open_to(hostile), urls_file=str(tsv))
    reports = crawler(tmp_path / "c", ctx, engines=("urls",), per_class=3, oversample=3).run(
        parse_classes("Bag\nTrouser")
    )
    bag, trouser = reports
    assert (bag.downloaded, bag.new, bag.duplicates, bag.requests) == (3, 3, 5, 8)  # kept going past the copies
    assert (trouser.downloaded, trouser.duplicates) == (1, 0)  # another class's copy is this class's image
    assert bag.as_dict()["duplicates"] == 5
    with pytest.raises(CrawlError, match="class 'Bag': 3 distinct images downloaded, fewer than min_per_class=4"):
        crawler(tmp_path / "c", ctx, engines=("urls",), per_class=3, oversample=3, min_per_class=4).run(
            parse_classes("Bag")
        )


def test_class_with_zero_candidates_is_an_error_naming_class_and_engine(hostile: HostileServer, tmp_path: Path) -> None:
    tsv = tmp_path / "urls.tsv"
    hostile.routes["/a.jpg"] = respond(200, jpeg_bytes())
    tsv.write_text(f"T-shirt/top\t{hostile.url('/a.jpg')}\n")
    ctx = SearchContext(open_to(hostile), urls_file=str(tsv))
    with pytest.raises(CrawlError) as e:
        crawler(tmp_path / "c", ctx, engines=("urls",)).run(CLASSES)
    msg = str(e.value)
    assert f"class 'Trouser': 0 candidate URLs from engine urls (no line of {tsv} names this class)" in msg
    assert "class 'Bag': 0 candidate URLs from engine urls" in msg
    assert "T-shirt/top" not in msg
    assert [r.downloaded for r in e.value.reports] == [1, 0, 0]


def test_captcha_page_fails_the_class_not_the_crawl_silently(hostile: HostileServer, tmp_path: Path) -> None:
    hostile.routes["/images/async?q=Bag&first=0&count=35&mmasync=1"] = respond(
        200, b"<html><form>captcha</form></html>", {"Content-Type": "text/html"}
    )
    ctx = SearchContext(Fetcher(LIMITS), bing_base_url=hostile.base)
    c = Crawler(tmp_path / "c", {"bing": make_source("bing", ctx)}, lambda c: [c.name], ctx.fetcher, progress=False)
    with pytest.raises(CrawlError, match="class 'Bag': 0 candidate URLs from engine bing"):
        c.run(parse_classes("Bag"))


def test_too_few_images_is_an_error(mirror: MirrorServer, tmp_path: Path) -> None:
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
    with pytest.raises(CrawlError, match="class 'Bag': 1[0-2] distinct images downloaded, fewer than min_per_class=20"):
        crawler(tmp_path / "c", ctx, min_per_class=20).run(CLASSES)


def test_second_crawl_on_the_same_store_fails_fast(tmp_path: Path) -> None:
    with ObjectStore(tmp_path / "c"):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            ObjectStore(tmp_path / "c").open()
    ObjectStore(tmp_path / "c").open().close()  # released on exit


def test_second_crawl_is_refused_before_it_writes_anything(mirror: MirrorServer, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "c"
    out.mkdir()
    holder = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # another process's crawl, still starting
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
        with pytest.raises(StoreLockedError, match="another crawl is using this store"):
            crawler(out, ctx).run(CLASSES)
        assert [p.name for p in out.iterdir()] == [".lock"]  # no objects/, tmp/, manifest or searches
        assert mirror.requests == []
    finally:
        os.close(holder)


def test_files_written_beside_the_crawl_are_written_under_its_lock(mirror: MirrorServer, tmp_path: Path) -> None:
    out = tmp_path / "c"
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
    first = crawler(out, ctx)
    with first.lock():
        (out / "classes.json").write_text("first")  # what the crawl stage writes before run()
        second = crawler(out, ctx)
        with pytest.raises(StoreLockedError), second.lock():
            (out / "classes.json").write_text("second")  # never reached
        assert (out / "classes.json").read_text() == "first"
        assert sum(r.downloaded for r in first.run(CLASSES)) > 0  # run() reuses the lock it is inside
        with pytest.raises(StoreLockedError):
            second.run(CLASSES)
    ObjectStore(out).open().close()  # released when the outer block ends, not when run() returns


def test_torn_manifest_line_and_stale_temp_files_are_repaired(mirror: MirrorServer, tmp_path: Path) -> None:
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
    crawler(tmp_path / "c", ctx).run(CLASSES)
    manifest = tmp_path / "c" / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # a kill mid-line
    (tmp_path / "c" / "tmp" / "dead.part").write_bytes(b"\xff\xd8half")
    n = len(mirror.requests)
    crawler(tmp_path / "c", ctx).run(CLASSES)
    assert len(image_requests(mirror, n)) == 1  # only the URL whose line was torn
    assert not list((tmp_path / "c" / "tmp").iterdir())
    assert all(json.loads(line) for line in manifest.read_text().splitlines())


def test_edited_urls_file_is_read_again_and_the_report_says_what_was_skipped(
    hostile: HostileServer, tmp_path: Path
) -> None:
    hostile.routes["/a.jpg"] = respond(200, jpeg_bytes(colour=(1, 2, 3)))
    hostile.routes["/b.jpg"] = respond(200, jpeg_bytes(colour=(200, 2, 3)))
    hostile.routes["/gone.jpg"] = respond(404, b"", {"Content-Type": "text/html"})
    tsv = tmp_path / "urls.tsv"
    tsv.write_text(f"Bag\t{hostile.url('/a.jpg')}\nBag\t{hostile.url('/gone.jpg')}\n")
    bag = parse_classes("Bag")
    ctx = SearchContext(open_to(hostile), urls_file=str(tsv))
    first = crawler(tmp_path / "c", ctx, engines=("urls",)).run(bag)[0]
    assert (first.requests, first.downloaded, first.skipped_ok, first.skipped_failed) == (2, 1, 0, 0)
    with tsv.open("a") as f:
        f.write(f"Bag\t{hostile.url('/b.jpg')}\n")  # the user adds a URL and reruns
    ctx = SearchContext(open_to(hostile), urls_file=str(tsv))
    second = crawler(tmp_path / "c", ctx, engines=("urls",)).run(bag)[0]
    assert len(hostile.hits("/b.jpg")) == 1 and len(hostile.hits("/a.jpg")) == 1
    assert (second.requests, second.new, second.downloaded) == (1, 1, 2)
    assert (second.skipped_ok, second.skipped_failed) == (1, 1)
    assert second.as_dict()["skipped_ok"] == 1 and second.as_dict()["skipped_failed"] == 1
    table = summary_table([second]).splitlines()
    assert table[0].split()[6:9] == ["skipped", "ok", "skipped"]
    assert table[-1].split()[:9] == ["TOTAL", "3", "2", "1", "0", "1", "1", "1", "1"]


def test_retry_failed_requests_final_failures_again(hostile: HostileServer, tmp_path: Path) -> None:
    body = jpeg_bytes()
    hostile.routes["/back.jpg"] = sequence(respond(404, b"", {"Content-Type": "text/html"}), respond(200, body))
    hostile.routes["/ok.jpg"] = respond(200, jpeg_bytes(colour=(0, 200, 0)))
    tsv = tmp_path / "urls.tsv"
    tsv.write_text(
        f"Bag\t{hostile.url('/back.jpg')}\nBag\t{hostile.url('/ok.jpg')}\nTrouser\t{hostile.url('/back.jpg')}\n"
    )
    two = parse_classes("Trouser\nBag")
    ctx = SearchContext(open_to(hostile), urls_file=str(tsv))
    with pytest.raises(CrawlError, match="class 'Trouser': 0 distinct images downloaded"):
        crawler(tmp_path / "c", ctx, engines=("urls",)).run(two)
    assert len(hostile.hits("/back.jpg")) == 1  # a 404 is final, and shared across classes
    with pytest.raises(CrawlError):
        crawler(tmp_path / "c", ctx, engines=("urls",)).run(two)  # a plain rerun leaves it alone
    assert len(hostile.hits("/back.jpg")) == 1
    reports = crawler(tmp_path / "c", ctx, engines=("urls",), retry_failed=True).run(two)
    assert len(hostile.hits("/back.jpg")) == 2 and len(hostile.hits("/ok.jpg")) == 1  # once for both classes
    assert [(r.name, r.requests, r.downloaded, r.skipped_ok, r.skipped_failed) for r in reports] == [
        ("Trouser", 1, 1, 0, 0),
        ("Bag", 0, 2, 1, 0),
    ]
    assert all(not r.failed for r in reports)


# --------------------------------------------------------------------------------------------
# real processes: kill -9, SIGTERM, SIGINT
# --------------------------------------------------------------------------------------------


def write_params(tmp_path: Path, base_url: str, out: Path) -> Path:
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(TINY_CLASSES) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"crawl:\n  classes: {classes}\n  out_dir: {out}\n  engines: [bing]\n  bing_base_url: {base_url}\n"
        "  per_class: 100\n  min_per_class: 1\n  progress: false\n"
        "  http: {workers: 4, per_host_concurrency: 4, per_host_delay_s: 0.0, retries: 2, backoff_s: 0.01}\n"
    )
    return params


def start_crawl(params: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "crawl", "--params", str(params)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_images(server: MirrorServer, since: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    t0 = time.monotonic()
    while not image_requests(server, since) and proc.poll() is None:
        assert time.monotonic() - t0 < timeout, "crawl never started downloading"
        time.sleep(0.02)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def object_set(out: Path) -> set[str]:
    return {p.name for p in (out / "objects").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("slow") / "world", results_per_class=30, seed=3)


@pytest.mark.slow
def test_kill9_at_random_instants_then_resume(slow_world: Path, tmp_path: Path) -> None:
    with MirrorServer(slow_world, delay_s=0.1) as server:
        clean_out = tmp_path / "clean"
        clean_params = write_params(tmp_path, server.base_url, clean_out)
        clean = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "crawl", "--params", str(clean_params)],
            cwd=REPO,
            capture_output=True,
        )
        assert clean.returncode == 0, clean.stderr.decode()
        out = tmp_path / "killed"
        params = write_params(tmp_path, server.base_url, out)
        rng = random.Random(1234)
        final: set[str] = set()
        for _ in range(3):
            since = len(server.requests)
            proc = start_crawl(params)
            wait_for_images(server, since, proc)
            time.sleep(rng.uniform(0.0, 0.5))
            kill9(proc)
            # R: this run requested no URL that had reached a final state before it started
            again = {p.lstrip("/") for p in image_requests(server, since)}
            assert again and not again & final
            # N: every object the manifest calls ok is whole
            records = latest_records(out / "manifest.jsonl")
            for rec in records.values():
                if rec.status == "ok":
                    assert hashlib.sha256((out / rec.path).read_bytes()).hexdigest() == rec.sha256
            final = {url.split("/", 3)[3] for (_, url), r in records.items() if r.is_final}
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "crawl", "--params", str(params)], cwd=REPO, capture_output=True
        )
        assert done.returncode == 0, done.stderr.decode()
        assert object_set(out) == object_set(clean_out)
        assert not list((out / "tmp").iterdir())
        report = json.loads((out / "report.json").read_text())
        clean_report = json.loads((clean_out / "report.json").read_text())
        assert report["downloaded"] == clean_report["downloaded"]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_exit_nonzero_and_keep_completed_work(slow_world: Path, tmp_path: Path, sig: int, code: int) -> None:
    with MirrorServer(slow_world, delay_s=0.3) as server:  # slow: a loaded machine still signals mid-crawl
        out = tmp_path / "c"
        proc = start_crawl(write_params(tmp_path, server.base_url, out))
        wait_for_images(server, 0, proc)
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err.decode()
        assert b"rerun to resume" in err
        records = latest_records(out / "manifest.jsonl")
        ok = [r for r in records.values() if r.status == "ok"]
        assert ok and len(ok) < 90
        for rec in ok:
            assert hashlib.sha256((out / rec.path).read_bytes()).hexdigest() == rec.sha256
        assert not list((out / "tmp").iterdir())
        assert all(r.reason != "interrupted" for r in records.values())
