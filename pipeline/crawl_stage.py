"""Stage ``crawl``: class list + ``crawl:`` params -> content-addressed images and a manifest.

Builds the engines, the fetcher and (for the ``mirror`` engine) the in-process mirror server from
the config, runs ``crawl.crawler.Crawler`` and writes ``report.json`` and ``classes.json`` beside
the manifest. SIGTERM is turned into an interrupt so in-flight downloads are discarded cleanly and
the process exits 143 (SIGINT: 130), never 0, so DVC does not record a half-finished crawl.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from crawl.classes import build_queries, read_classes, read_synonyms, select_shard
from crawl.crawler import ClassReport, Crawler, CrawlError, peak_rss_mb, summary_table
from crawl.download import Fetcher, HttpLimits
from crawl.sources import SearchContext, make_source
from demo.mirror import MirrorServer
from kd3util import pick, sigterm_as_interrupt, write_json
from pipeline.artifacts.crawl import CrawlStore
from pipeline.config import CrawlConfig, parse_shard

log = logging.getLogger(__name__)


def http_limits(cfg: CrawlConfig) -> HttpLimits:
    """``crawl.http`` as the downloader's limits: at least one pooled connection per thread."""
    return pick(HttpLimits, cfg.http, pool_size=max(cfg.http.workers, 4), robots=cfg.robots)


def run(cfg: CrawlConfig, retry_failed: bool = False) -> list[ClassReport]:
    """Run the crawl; raises ``CrawlError`` (after writing the report) when classes come back short.

    ``retry_failed``: request again the URLs an earlier run gave up on (``kd3 crawl --retry-failed``).
    """
    classes = read_classes(cfg.classes)
    synonyms = read_synonyms(cfg.synonyms, classes) if cfg.synonyms else {}
    shard_i, shard_n = parse_shard(cfg.shard)
    mine = select_shard(classes, shard_i, shard_n)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: output folder is not writable")

    signals = ExitStack()
    signals.enter_context(sigterm_as_interrupt())  # SIGTERM: in-flight downloads discarded, exit 143
    started = time.time()
    fetcher = Fetcher(http_limits(cfg))
    reports: list[ClassReport] = []
    error: CrawlError | None = None
    try:
        with ExitStack() as stack:
            ctx = SearchContext(
                fetcher=fetcher,
                bing_base_url=cfg.bing_base_url,
                urls_file=cfg.urls_file,
                greedy_domains=list(cfg.greedy_domains),
                greedy_max_pages=cfg.greedy_max_pages,
                flickr_api_key=os.environ.get(cfg.flickr_api_key_env),
                classes=classes,  # the whole list (every shard): the urls engine rejects names not in it
            )
            if "mirror" in cfg.engines:
                m = cfg.mirror
                server = stack.enter_context(MirrorServer(m.world_dir, m.host, m.port))
                ctx.mirror_base_url = server.base_url
                log.info("mirror serving %s at %s", m.world_dir, server.base_url)
            sources = {name: make_source(name, ctx) for name in cfg.engines}
            crawler = Crawler(
                out,
                sources,
                lambda c: build_queries(c.name, cfg.queries, synonyms.get(c.name, [])),
                fetcher,
                workers=cfg.http.workers,
                per_class=cfg.per_class,
                oversample=cfg.oversample,
                min_per_class=cfg.min_per_class,
                progress=cfg.progress,
                retry_failed=retry_failed,
                class_budget_s=cfg.class_budget_s,
            )
            # the store's lock first: a second crawl on this folder is refused before it writes anything
            stack.enter_context(crawler.lock())
            CrawlStore.save_classes(out, classes)
            try:
                reports = crawler.run(mine)
            except CrawlError as e:
                error = e
                reports = e.reports
            report = {
                "shard": cfg.shard,
                "engines": list(cfg.engines),
                "per_class": cfg.per_class,
                "seconds": round(time.time() - started, 2),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "classes": [r.as_dict() for r in reports],
                "downloaded": sum(r.downloaded for r in reports),
                "manifest_bad_lines": len(crawler.bad_lines),
                "problems": str(error).splitlines() if error else [],
            }
            write_json(out / "report.json", report)  # still under the lock
    finally:
        signals.close()
    if reports:
        print(summary_table(reports), file=sys.stderr)
    print(
        f"crawl: {report['downloaded']} images for {len(reports)} classes in {report['seconds']} s, "
        f"peak RSS {report['peak_rss_mb']} MiB -> {out}",
        file=sys.stderr,
    )
    if error:
        raise error
    return reports
