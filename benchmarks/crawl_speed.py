"""Crawl throughput: our downloader against icrawler's, same URLs, same threads, same server.

Serves a world over loopback with added latency per image (a stand-in for real servers' round
trips), then downloads the same URL list with

- ours: ``crawl.crawler.Crawler`` with the ``urls`` engine (manifest, content-addressed store,
  per-host limits off, as in the demo);
- icrawler 0.6.10: ``UrlListCrawler`` with the same number of downloader threads;

and prints downloads/s for each and the ratio. Needs the demo world (``data/world``: ``make demo``,
or ``kd3 world`` alone, which needs Debian's ``dataset-fashion-mnist``); nothing leaves the
machine. Run from the repository root:

    .venv/bin/python benchmarks/crawl_speed.py --repeats 3      # about a minute on 2 cores
    .venv/bin/python benchmarks/crawl_speed.py --latency 0.05 --threads 16

The table goes to ``benchmarks/results/crawl_speed.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import default_out, report, require  # noqa: E402

from crawl.classes import parse_classes  # noqa: E402
from crawl.crawler import Crawler  # noqa: E402
from crawl.download import Fetcher, HttpLimits  # noqa: E402
from crawl.sources import SearchContext, make_source  # noqa: E402
from demo.mirror import MirrorServer  # noqa: E402


def image_urls(world: Path, base: str, limit: int) -> list[str]:
    index = json.loads((world / "index.json").read_text())
    entries = [e for e in index["entries"].values() if e["serve"] != "http_404"]
    return [f"{base}/{e['path']}" for e in entries[:limit]]


def run_ours(urls: list[str], threads: int, work: Path) -> tuple[float, int]:
    tsv = work / "urls.tsv"
    tsv.write_text("".join(f"bench\t{u}\n" for u in urls))
    # the loopback mirror is a private address, refused unless allowed
    fetcher = Fetcher(
        HttpLimits(per_host_concurrency=threads, per_host_delay_s=0.0, pool_size=threads, allow_private=True)
    )
    ctx = SearchContext(fetcher, urls_file=str(tsv))
    crawler = Crawler(
        work / "ours",
        {"urls": make_source("urls", ctx)},
        lambda c: [c.name],
        fetcher,
        workers=threads,
        per_class=len(urls),
        oversample=1.0,
        progress=False,
    )
    t0 = time.perf_counter()
    reports = crawler.run(parse_classes("bench"))
    return time.perf_counter() - t0, reports[0].downloaded


def run_icrawler(urls: list[str], threads: int, work: Path) -> tuple[float, int]:
    from icrawler.builtin import UrlListCrawler

    lst = work / "urls.txt"
    lst.write_text("".join(f"{u}\n" for u in urls))
    out = work / "icrawler"
    crawler = UrlListCrawler(downloader_threads=threads, storage={"root_dir": str(out)}, log_level=logging.ERROR)
    t0 = time.perf_counter()
    crawler.crawl(str(lst))
    elapsed = time.perf_counter() - t0
    return elapsed, sum(1 for p in out.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=Path("data/world"))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.02, help="added seconds per image response")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=default_out(__file__))
    args = ap.parse_args()
    require(args.world / "index.json", "the demo world", "run `make demo` (or `kd3 world`) first")

    rows = []
    with MirrorServer(args.world, delay_s=args.latency) as server:
        urls = image_urls(args.world, server.base_url, args.images)
        for name, fn in (("kd3 (ours)", run_ours), ("icrawler 0.6.10", run_icrawler)):
            best, got = float("inf"), 0
            for _ in range(args.repeats):
                work = Path(tempfile.mkdtemp(prefix="kd3-bench-"))
                try:
                    seconds, got = fn(urls, args.threads, work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                best = min(best, seconds)
            rows.append((name, got, best, got / best))

    latency_ms = args.latency * 1000
    lines = [
        f"{len(urls)} URLs from the loopback mirror, {args.threads} threads, {latency_ms:.0f} ms added latency "
        f"per image, best of {args.repeats}:",
        "",
        "| downloader | images stored | seconds | images/s | vs icrawler |",
        "|---|---:|---:|---:|---:|",
    ]
    base = rows[1][3]
    for name, got, seconds, rate in rows:
        ratio = f"{rate / base:.2f}x" if base else "–"
        lines.append(f"| {name} | {got} | {seconds:.2f} | {rate:.1f} | {ratio} |")
    report(args.out, "Crawl speed: kd3 against icrawler", "\n".join(lines), "cpu")


if __name__ == "__main__":
    main()
