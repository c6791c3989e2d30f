"""The crawl loop: classes -> queries -> engines -> candidate URLs -> downloads, resumable.

``Crawler.run(classes)`` is what ``kd3 crawl`` calls. For each class it gathers candidates from
every engine and query template (interleaved by rank, duplicates dropped), then downloads them on a
thread pool until the class has ``per_class`` images or runs out of candidates. Images are counted
as distinct objects (sha256) per class, toward ``per_class`` and ``min_per_class`` alike: 3,000 URLs
serving the same bytes are one image (and 2,999 ``duplicates``). Everything it learns
is appended to files in ``out_dir`` as it happens:

- ``searches.jsonl``: the URL list each (class, engine, query) search returned, so a rerun does
  not query the engines again (keyed by the engine's ``cache_key`` too where it has one: the
  ``urls`` engine's is the sha256 of its file, so an edited file is read again);
- ``manifest.jsonl``: one line per (class, URL) outcome (``crawl.manifest.ImageRecord``);
- ``objects/``: the images, content-addressed (``crawl.store``).

A rerun reads both files back and requests only URLs that have not reached a final state (the
report counts the others as ``skipped_ok`` / ``skipped_failed``); with ``retry_failed`` it also
requests again URLs whose last outcome was a final failure (a 404 that may have come back, a page
that now serves an image). A URL already fetched for another class is recorded for this class
too, without a second request.

Some outcomes say nothing about the URL itself, only that it could not be tried now; they are not
written to the manifest, so the next run requests the URL again, and the report counts them under
``deferred``: ``host_unresponsive`` (the host's circuit breaker opened after consecutive requests
got no answer), ``robots_unavailable`` (the site's robots.txt could not be read this run) and
``class_budget`` (the class used up ``class_budget_s``). A URL the site's robots.txt disallows is
a final failure, ``robots_disallowed``.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from crawl.classes import ClassName
from crawl.download import Fetcher, FetchOutcome
from crawl.manifest import ImageRecord, JsonlWriter, iter_jsonl, latest_records, repair_tail
from crawl.sources import ImageSource, SourceError
from crawl.store import ObjectStore

log = logging.getLogger(__name__)


class CrawlError(RuntimeError):
    """The crawl finished but did not get what it needed (the message lists every problem)."""

    def __init__(self, message: str, reports: list[ClassReport] | None = None) -> None:
        super().__init__(message)
        self.reports = reports or []


# outcomes that leave the URL for the next run (see the module docstring), beside "interrupted"
DEFERRED_REASONS = frozenset({"host_unresponsive", "robots_unavailable", "class_budget"})

SearchKey = tuple[str, str, str, int, str]  # class name, engine, query, max_num, engine cache key


@dataclass
class Candidate:
    url: str
    engine: str
    query: str
    rank: int


@dataclass
class ClassReport:
    """Per-class outcome, accumulated over this and earlier runs (latest record per URL)."""

    name: str
    index: int
    candidates: dict[str, int] = field(default_factory=dict)  # engine -> unique URLs found
    downloaded: int = 0  # distinct images (sha256) stored for this class (all runs)
    new: int = 0  # of which first stored for this class in this run
    duplicates: int = 0  # ok URLs whose bytes this class already had (all runs; not counted above)
    requests: int = 0  # image URLs requested over the network in this run
    searches: int = 0  # engine searches run in this run (a rerun reuses searches.jsonl)
    skipped_ok: int = 0  # candidates not requested: an earlier run downloaded them
    skipped_failed: int = 0  # ... an earlier run recorded a final failure (see retry_failed)
    failed: Counter[str] = field(default_factory=Counter)  # reason -> URLs
    deferred: Counter[str] = field(default_factory=Counter)  # reason -> URLs left for the next run

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "candidates": self.candidates,
            "downloaded": self.downloaded,
            "new": self.new,
            "duplicates": self.duplicates,
            "requests": self.requests,
            "searches": self.searches,
            "skipped_ok": self.skipped_ok,
            "skipped_failed": self.skipped_failed,
            "failed": dict(sorted(self.failed.items())),
            "deferred": dict(sorted(self.deferred.items())),
        }


def interleave(lists: list[list[Candidate]]) -> list[Candidate]:
    """Round-robin by rank across result lists, keeping the first sighting of each URL."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for i in range(max((len(x) for x in lists), default=0)):
        for lst in lists:
            if i < len(lst) and lst[i].url not in seen:
                seen.add(lst[i].url)
                out.append(lst[i])
    return out


class Crawler:
    """Runs the crawl over one output folder; see the module docstring."""

    def __init__(
        self,
        out_dir: str | Path,
        sources: dict[str, ImageSource],
        queries_for: Callable[[ClassName], list[str]],
        fetcher: Fetcher,
        *,
        workers: int = 8,
        per_class: int = 100,
        oversample: float = 1.5,
        min_per_class: int = 1,
        retry_failed: bool = False,
        class_budget_s: float | None = None,
        progress: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.sources = sources
        self.queries_for = queries_for
        self.fetcher = fetcher
        self.workers = workers
        self.per_class = per_class
        self.oversample = oversample
        self.min_per_class = min_per_class
        self.retry_failed = retry_failed  # request again URLs whose last outcome is a final failure
        self.class_budget_s = class_budget_s  # seconds of downloading per class and run; None = no limit
        self.progress = progress
        self.store = ObjectStore(self.out_dir)
        self.manifest_path = self.out_dir / "manifest.jsonl"
        self.searches_path = self.out_dir / "searches.jsonl"
        self.bad_lines: list[int] = []  # manifest lines skipped as unreadable by the last run()

    # ------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[Crawler]:
        """Hold the output folder's lock around ``run()`` and whatever the caller writes beside it.

        ``run()`` takes the lock itself; a caller that writes its own files into ``out_dir``
        (``classes.json``, ``report.json``) takes it first with ``with crawler.lock():``, so a
        second crawl on the same folder is refused (``StoreLockedError``) before it overwrites
        anything. ``run()`` inside the block reuses the lock.
        """
        with self.store:
            yield self

    def run(self, classes: list[ClassName]) -> list[ClassReport]:
        """Crawl every class; raise ``CrawlError`` listing classes that came back short."""
        with self.store:  # first: nothing in out_dir is touched before the lock is held
            # repair before reading: a tail torn inside a multi-byte character must not stop the read
            repair_tail(self.manifest_path)
            repair_tail(self.searches_path)
            self.bad_lines = []
            latest = latest_records(self.manifest_path, self.bad_lines)
            # URL -> a final outcome from any class, reused instead of a second request
            known: dict[str, ImageRecord] = {r.url: r for r in latest.values() if self._done(r)}
            searches = self._read_searches()
            problems: list[str] = []
            reports: list[ClassReport] = []
            with (
                JsonlWriter(self.manifest_path) as manifest,
                JsonlWriter(self.searches_path) as search_log,
                ThreadPoolExecutor(self.workers, thread_name_prefix="kd3-dl") as pool,
            ):
                for cls in classes:
                    report = ClassReport(cls.name, cls.index)
                    candidates = self._candidates(cls, searches, search_log, report, problems)
                    self._download(cls, candidates, latest, known, manifest, pool, report)
                    reports.append(report)
                    if report.downloaded < self.min_per_class:
                        later = sum(report.deferred.values())
                        problems.append(
                            f"class {cls.name!r}: {report.downloaded} distinct images downloaded, "
                            f"fewer than min_per_class={self.min_per_class}"
                            + (f" ({later} URLs left for the next run: {_reasons(report.deferred)})" if later else "")
                        )
        if problems:
            raise CrawlError("\n".join(problems), reports)
        return reports

    def _done(self, r: ImageRecord) -> bool:
        """Whether an earlier outcome stands (is not requested again in this run)."""
        return r.is_final and (r.status == "ok" or not self.retry_failed)

    def _read_searches(self) -> dict[SearchKey, list[str]]:
        out: dict[SearchKey, list[str]] = {}
        for d in iter_jsonl(self.searches_path):
            try:
                key = (d["class_name"], d["engine"], d["query"], d["max_num"], d.get("cache_key", ""))
                urls = d["urls"]
            except KeyError:
                continue  # not a search line: the search simply runs again
            if isinstance(urls, list):
                out[key] = urls
        return out

    # ------------------------------------------------------------------------------------------
    def _candidates(
        self,
        cls: ClassName,
        searches: dict[SearchKey, list[str]],
        search_log: JsonlWriter,
        report: ClassReport,
        problems: list[str],
    ) -> list[Candidate]:
        queries = self.queries_for(cls)
        max_num = math.ceil(self.per_class * self.oversample)  # per engine and query; overlap is deduped
        lists: list[list[Candidate]] = []
        for engine, source in self.sources.items():
            engine_urls: set[str] = set()
            cache_key = str(getattr(source, "cache_key", "") or "")
            for query in queries:
                key = (cls.name, engine, query, max_num, cache_key)
                urls = searches.get(key)
                if urls is None:
                    report.searches += 1
                    try:
                        urls = source.search(cls, query, max_num)
                    except SourceError as e:
                        problems.append(f"class {cls.name!r}, engine {engine}: {e}")
                        continue
                    searches[key] = urls
                    line = {"class_name": cls.name, "engine": engine, "query": query, "max_num": max_num}
                    if cache_key:
                        line["cache_key"] = cache_key
                    search_log.write({**line, "urls": urls, "time": time.time()})
                lists.append([Candidate(u, engine, query, rank) for rank, u in enumerate(urls)])
                engine_urls.update(urls)
            report.candidates[engine] = len(engine_urls)
            if not engine_urls:
                why = getattr(source, "nothing_found", None) or "parser returned nothing"
                problems.append(f"class {cls.name!r}: 0 candidate URLs from engine {engine} ({why})")
        return interleave(lists)

    # ------------------------------------------------------------------------------------------
    def _download(
        self,
        cls: ClassName,
        candidates: list[Candidate],
        latest: dict[tuple[str, str], ImageRecord],
        known: dict[str, ImageRecord],
        manifest: JsonlWriter,
        pool: ThreadPoolExecutor,
        report: ClassReport,
    ) -> None:
        mine = {url: r for (name, url), r in latest.items() if name == cls.name}
        # per_class and min_per_class count distinct objects: a URL repeating bytes adds nothing
        objects = {r.sha256 or r.url for r in mine.values() if r.status == "ok"}
        report.downloaded = len(objects)
        report.duplicates = sum(r.status == "ok" for r in mine.values()) - len(objects)
        for r in mine.values():
            if r.status != "ok":
                report.failed[r.reason or "unknown"] += 1
        todo = []
        for c in candidates:
            prior = mine.get(c.url)
            if prior is None or not self._done(prior):
                todo.append(c)
            elif prior.status == "ok":
                report.skipped_ok += 1
            else:
                report.skipped_failed += 1
        bar = tqdm(
            total=self.per_class,
            initial=min(report.downloaded, self.per_class),
            desc=cls.name[:28].ljust(28),
            unit="img",
            disable=not self.progress,
            file=sys.stderr,
            leave=True,
            mininterval=0.1 if sys.stderr.isatty() else 10.0,  # logs (DVC, CI) get a line now and then
        )
        inflight: dict[Future[FetchOutcome], Candidate] = {}
        it = iter(todo)
        started = time.monotonic()
        budget = self.class_budget_s

        def over_budget() -> bool:
            return budget is not None and time.monotonic() - started > budget

        def record(c: Candidate, **fields: Any) -> None:
            old = mine.get(c.url)
            if old is not None and old.status != "ok":
                report.failed[old.reason or "unknown"] -= 1
            rec = ImageRecord(cls.name, cls.index, c.query, c.engine, c.rank, c.url, time=time.time(), **fields)
            manifest.write(rec)
            mine[c.url] = rec
            if rec.status == "ok":
                if (rec.sha256 or rec.url) in objects:
                    report.duplicates += 1
                else:
                    objects.add(rec.sha256 or rec.url)
                    report.downloaded += 1
                    report.new += 1
                    bar.update(1)
            else:
                report.failed[rec.reason or "unknown"] += 1
            if rec.is_final:
                known.setdefault(c.url, rec)

        try:
            while True:
                # keep the pool busy, but never with more work than the class still needs
                while len(inflight) < self.workers and report.downloaded + len(inflight) < self.per_class:
                    if over_budget():
                        break
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    prior = known.get(nxt.url)
                    if prior is not None:  # fetched already for another class: no second request
                        record(nxt, **_outcome_fields(prior))
                        continue
                    inflight[pool.submit(self.fetcher.download, nxt.url, self.store)] = nxt
                if not inflight:
                    break
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    c = inflight.pop(fut)
                    out = fut.result()  # DiskFullError propagates: the crawl cannot go on
                    if out.requests:  # robots.txt or the host's breaker may refuse a URL before any request
                        report.requests += 1
                    if out.reason == "interrupted":
                        continue  # not an outcome: the URL stays pending for the next run
                    if out.reason in DEFERRED_REASONS:
                        report.deferred[out.reason] += 1
                        continue
                    record(c, **self._fields(out))
            if report.downloaded < self.per_class and over_budget():
                left = sum(1 for _ in it)
                if left:
                    report.deferred["class_budget"] += left
                    log.warning(
                        "class %r: class_budget_s=%s used up; %d URLs left for the next run", cls.name, budget, left
                    )
        except (KeyboardInterrupt, OSError):  # DiskFullError, or the manifest append failing
            self.fetcher.stop.set()
            writable = True
            for fut, c in list(inflight.items()):
                try:
                    out = fut.result()
                except OSError:
                    continue
                if writable and out.reason != "interrupted" and out.reason not in DEFERRED_REASONS:
                    try:
                        record(c, **self._fields(out))
                    except OSError:
                        writable = False  # the first error is the one raised; the rest is redone next run
            raise
        finally:
            bar.close()
        report.failed = +report.failed  # drop reasons whose count went back to zero

    def _fields(self, out: FetchOutcome) -> dict[str, Any]:
        path = str(out.path.relative_to(self.out_dir)) if out.path is not None else None
        return {
            "status": "ok" if out.ok else "failed",
            "reason": out.reason,
            "sha256": out.sha256,
            "path": path,
            "bytes": out.bytes,
            "width": out.width,
            "height": out.height,
            "format": out.format,
            "final_url": out.final_url,
        }


def _outcome_fields(r: ImageRecord) -> dict[str, Any]:
    keys = ("status", "reason", "sha256", "path", "bytes", "width", "height", "format", "final_url")
    return {k: getattr(r, k) for k in keys}


def _reasons(counts: Counter[str], n: int = 3) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.most_common(n))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary_table(reports: list[ClassReport]) -> str:
    """A fixed-width table: one row per class and a total row.

    ``downloaded`` counts distinct images, ``duplicates`` the URLs that served bytes the class
    already had. ``skipped ok`` / ``skipped failed`` count candidates not requested because an
    earlier run finished them (so a rerun that requests nothing says why). ``deferred`` counts
    URLs left for the next run (unresponsive host, unreadable robots.txt, class budget used up);
    a line under the table names the reasons and the classes.
    """
    head = (
        "class",
        "found",
        "downloaded",
        "new",
        "duplicates",
        "requests",
        "skipped ok",
        "skipped failed",
        "failed",
        "deferred",
        "top failure reasons",
    )

    def counts(rs: list[ClassReport]) -> tuple[str, ...]:
        keys = ("downloaded", "new", "duplicates", "requests", "skipped_ok", "skipped_failed")
        found = sum(sum(r.candidates.values()) for r in rs)
        failed = sum(sum(r.failed.values()) for r in rs)
        deferred = sum(sum(r.deferred.values()) for r in rs)
        return (str(found), *(str(sum(getattr(r, k) for r in rs)) for k in keys), str(failed), str(deferred))

    rows: list[tuple[str, ...]] = [head]
    total_failed: Counter[str] = Counter()
    total_deferred: Counter[str] = Counter()
    for r in reports:
        total_failed.update(r.failed)
        total_deferred.update(r.deferred)
        rows.append((r.name[:30], *counts([r]), _reasons(r.failed)))
    rows.append(("TOTAL", *counts(reports), _reasons(total_failed, 4)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    for reason, count in sorted(total_deferred.items()):
        names = [r.name for r in reports if r.deferred[reason]]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        lines.append(f"deferred to the next run: {count} URLs {reason} ({shown})")
    return "\n".join(lines)
