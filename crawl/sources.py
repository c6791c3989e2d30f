"""Image search engines behind one protocol and a registry.

A source turns ``(class, query, max_num)`` into a ranked list of candidate image URLs; downloading,
storage and provenance are not its business (``crawl.download`` and ``crawl.crawler`` do those).
Engines are registered with ``@register_source("name")``, so adding one is a one-place change.

icrawler (pinned 0.6.10) supplies the feeders and parsers of the real engines; we fetch the pages
ourselves (``Fetcher.get_page``: timeouts, byte caps, retries) and hand them to icrawler's parsers.
Two deliberate differences from icrawler: queries are URL-encoded (its Bing and Baidu feeders
paste the raw keyword into the URL), and our Bing parser keeps every image link a result page
gives, not only those ending in ``.jpg``. The ``mirror`` engine is the Bing engine pointed at the
offline mirror, so the demo and the tests run the same parsing code a real crawl runs.
"""

from __future__ import annotations

import abc
import hashlib
import html
import json
import logging
import queue
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, quote_plus, urlsplit

from bs4 import BeautifulSoup
from icrawler.builtin.baidu import BaiduFeeder, BaiduParser
from icrawler.builtin.flickr import FlickrFeeder, FlickrParser
from icrawler.builtin.google import GoogleFeeder, GoogleParser
from icrawler.builtin.greedy import GreedyParser
from icrawler.utils import Signal

from crawl.classes import ClassName, normalise
from crawl.download import Fetcher

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """An engine cannot run (missing key or file, page that cannot be fetched)."""


@dataclass
class SearchContext:
    """What engines may use: the shared fetcher and engine-specific settings."""

    fetcher: Fetcher
    bing_base_url: str = "https://www.bing.com"
    mirror_base_url: str | None = None  # set once the mirror is listening
    urls_file: str | None = None
    classes: list[ClassName] | None = None  # the whole class list (all shards): lets ``urls`` reject unknown names
    greedy_domains: list[str] = field(default_factory=list)
    greedy_max_pages: int = 50
    flickr_api_key: str | None = None


class ImageSource(Protocol):
    """A search engine: ranked candidate URLs for one query of one class.

    An engine may also have a ``cache_key`` string attribute: the crawler keys its saved
    searches (``searches.jsonl``) by it too, so a search saved under another key is run again.
    The ``urls`` engine sets it to the sha256 of its file, so an edited file is read again. A
    ``nothing_found`` string attribute says why a class got 0 URLs (default: the parser found none).
    """

    name: str

    def search(self, cls: ClassName, query: str, max_num: int) -> list[str]: ...


SOURCES: dict[str, Callable[[SearchContext], ImageSource]] = {}


def register_source(name: str) -> Callable[[Any], Any]:
    """Class decorator adding an engine to ``SOURCES`` under ``name``."""

    def deco(cls: Any) -> Any:
        cls.name = name
        SOURCES[name] = cls
        return cls

    return deco


def make_source(name: str, ctx: SearchContext) -> ImageSource:
    if name not in SOURCES:
        raise SourceError(f"unknown engine {name!r} (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[name](ctx)


@dataclass
class Page:
    """The slice of ``requests.Response`` icrawler's parsers read."""

    content: bytes
    url: str


def _unique_http(urls: Iterable[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for u in urls:
        u = u.strip()
        if urlsplit(u).scheme in ("http", "https") and u not in seen:
            seen.add(u)
            out.append(u)
    return out


class PagedSource(abc.ABC):
    """Shared loop: fetch result pages until ``max_num`` URLs or a page adds nothing new."""

    name = "paged"
    page_step = 35

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    def page_url(self, query: str, offset: int) -> str:
        """The URL of the result page starting at ``offset``."""

    @abc.abstractmethod
    def parse(self, page: Page) -> list[str]:
        """Image URLs on one result page, in rank order."""

    def fetch(self, url: str) -> Page:
        out = self.ctx.fetcher.get_page(url)
        if not out.ok or out.body is None:
            raise SourceError(f"engine {self.name}: result page {url} failed ({out.reason})")
        return Page(out.body, out.final_url or url)

    def search(self, cls: ClassName, query: str, max_num: int) -> list[str]:
        found: list[str] = []
        offset = 0
        while len(found) < max_num:
            page = self.fetch(self.page_url(query, offset))
            new = [u for u in _unique_http(self.parse(page)) if u not in found]
            if not new:
                break
            found.extend(new)
            offset += self.page_step
        return found[:max_num]


# --------------------------------------------------------------------------------------------
# Bing (and the mirror, which serves Bing's page format)
# --------------------------------------------------------------------------------------------


def parse_bing_page(content: bytes) -> list[str]:
    """Every ``murl`` of a Bing async results page, whatever the file extension.

    Each result is ``<div class="imgpt"><a class="iusc" m='{"murl": "...", ...}'>``; icrawler's
    ``BingParser`` matches ``murl":"(.*?)\\.jpg`` and so loses PNG/WebP/GIF and extension-less links.
    """
    soup = BeautifulSoup(content.decode("utf-8", "ignore"), "lxml")
    urls = []
    for div in soup.find_all("div", class_="imgpt"):
        a = div.find("a", attrs={"m": True})
        if a is None:
            continue
        try:
            meta = json.loads(html.unescape(str(a["m"])))
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("murl"), str):
            urls.append(meta["murl"])
    return urls


@register_source("bing")
class BingSource(PagedSource):
    """Bing's async image results at ``SearchContext.bing_base_url``.

    The configured base URL's own ``host:port`` is allowed by the fetcher even if it is not a
    public address (an operator's choice, e.g. a local stand-in for Bing); result URLs that point
    anywhere else on an internal network stay refused.
    """

    page_step = 35  # the async endpoint returns up to 35 results per page

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        ctx.fetcher.allow_endpoint(self.base_url())

    def base_url(self) -> str:
        return self.ctx.bing_base_url.rstrip("/")

    def page_url(self, query: str, offset: int) -> str:
        return f"{self.base_url()}/images/async?q={quote_plus(query)}&first={offset}&count={self.page_step}&mmasync=1"

    def parse(self, page: Page) -> list[str]:
        return parse_bing_page(page.content)


@register_source("mirror")
class MirrorSource(BingSource):
    """Bing's engine pointed at the offline mirror (``SearchContext.mirror_base_url``).

    The mirror listens on loopback: its own ``host:port`` (and only that) is allowed by the
    fetcher, for its result pages and for the images it serves.
    """

    def __init__(self, ctx: SearchContext) -> None:
        if not ctx.mirror_base_url:
            raise SourceError("engine mirror: the mirror is not running (no mirror_base_url)")
        super().__init__(ctx)

    def base_url(self) -> str:
        return str(self.ctx.mirror_base_url).rstrip("/")


# --------------------------------------------------------------------------------------------
# icrawler-backed engines: Baidu, Google, Flickr, greedy
# --------------------------------------------------------------------------------------------


def _feeder_urls(feeder_cls: Any, **kwargs: Any) -> list[str]:
    """Run an icrawler feeder synchronously and collect the page URLs it would enqueue."""
    signal = Signal()
    signal.set(reach_max_num=False)
    feeder = feeder_cls(1, signal=signal, session=None)
    feeder.out_queue = queue.Queue()  # unbounded: icrawler's own queue blocks when full
    feeder.feed(**kwargs)
    urls = []
    while not feeder.out_queue.empty():
        urls.append(feeder.out_queue.get_nowait())
    return urls


def _parser(parser_cls: Any, ctx: SearchContext) -> Any:
    return parser_cls(1, signal=None, session=ctx.fetcher.session())


@register_source("baidu")
class BaiduSource(PagedSource):
    page_step = 30

    def page_url(self, query: str, offset: int) -> str:
        return _feeder_urls(BaiduFeeder, keyword=quote(query), offset=offset, max_num=1)[0]

    def parse(self, page: Page) -> list[str]:
        return [d["file_url"] for d in _parser(BaiduParser, self.ctx).parse(page) or []]


@register_source("google")
class GoogleSource(PagedSource):
    page_step = 100

    def page_url(self, query: str, offset: int) -> str:
        return _feeder_urls(GoogleFeeder, keyword=query, offset=offset, max_num=1)[0]

    def parse(self, page: Page) -> list[str]:
        # icrawler's Google parser has been broken on and off (returns None): 0 URLs is reported
        # by the crawler as a failure for the class, never as success.
        try:
            return [d["file_url"] for d in _parser(GoogleParser, self.ctx).parse(page) or []]
        except TypeError:
            return []


@register_source("flickr")
class FlickrSource(PagedSource):
    page_step = 100

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        if not ctx.flickr_api_key:
            raise SourceError("engine flickr: no API key (set the variable named by crawl.flickr_api_key_env)")

    def page_url(self, query: str, offset: int) -> str:
        pages = _feeder_urls(FlickrFeeder, apikey=self.ctx.flickr_api_key, text=query, per_page=self.page_step)
        return pages[min(offset // self.page_step, len(pages) - 1)]  # Flickr serves 4000 results at most

    def parse(self, page: Page) -> list[str]:
        parser = _parser(FlickrParser, self.ctx)
        prefs = ["large", "medium 800", "medium 640", "medium", "small 320"]
        return [d["file_url"] for d in parser.parse(page, apikey=self.ctx.flickr_api_key, size_preference=prefs) or []]


@register_source("greedy")
class GreedySource:
    """icrawler's greedy site crawler: breadth-first over pages of the given sites.

    Each entry of ``greedy_domains`` is a start URL; ``{query}`` in it is replaced by the
    URL-encoded query (a site's own search page), otherwise every class starts from the same
    pages. Links are followed only within the start URL's host, ``greedy_max_pages`` pages at most.
    """

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    def search(self, cls: ClassName, query: str, max_num: int) -> list[str]:
        starts = [d.replace("{query}", quote_plus(query)) for d in self.ctx.greedy_domains]
        domains = [urlsplit(s).netloc for s in starts]
        parser = _parser(GreedyParser, self.ctx)
        todo, seen_pages, images = list(starts), set(starts), list[str]()
        pages = 0
        while todo and pages < self.ctx.greedy_max_pages and len(images) < max_num:
            url = todo.pop(0)
            out = self.ctx.fetcher.get_page(url)
            pages += 1
            if not out.ok or out.body is None:
                continue
            for item in parser.parse(Page(out.body, out.final_url or url), domains) or []:
                if isinstance(item, dict):
                    images.append(item["file_url"])
                elif isinstance(item, str) and item not in seen_pages:
                    seen_pages.add(item)
                    todo.append(item)
        return _unique_http(images)[:max_num]


# --------------------------------------------------------------------------------------------
# A user's own URL list
# --------------------------------------------------------------------------------------------


@register_source("urls")
class UrlListSource:
    """A TSV of ``class name<TAB>url`` lines: for users who already have URL lists.

    The query is ignored; a class's URLs come back in file order. Names are matched after
    normalisation (case, whitespace, NFKC), like the class file itself. Blank lines and lines
    starting with ``#`` are ignored; the file is read as UTF-8 (a BOM is allowed).

    Mistakes that would otherwise lose URLs silently are errors (``SourceError`` naming the file
    and line), because a crawl of the wrong list is worse than no crawl:

    - a line without exactly one tab (a raw tab cannot be part of a URL: write it as ``%09``),
      or with an empty class name or URL;
    - bytes that are not UTF-8;
    - a class name that is not in the class list (when ``SearchContext.classes`` is given; the
      synonyms file is checked the same way);
    - a file with no URL lines at all (it would only show up as 0 candidates for every class).

    URLs that cannot be fetched (not ``http``/``https``, e.g. ``ftp://`` or a bare ``www.``
    name) and repeats of a URL within a class are skipped and counted in ``skipped`` (reason ->
    lines), with a warning naming the first lines, since the rest of the list is still usable.
    """

    def __init__(self, ctx: SearchContext) -> None:
        if not ctx.urls_file:
            raise SourceError("engine urls: crawl.urls_file is not set")
        path = Path(ctx.urls_file)
        if not path.is_file():
            raise SourceError(f"engine urls: {path}: file not found")
        data = path.read_bytes()
        # saved searches are keyed by the content, so an edited file is read again on a rerun
        self.cache_key = "sha256:" + hashlib.sha256(data).hexdigest()
        self.nothing_found = f"no line of {path} names this class"
        self.by_class: dict[str, list[str]] = {}
        self.skipped: Counter[str] = Counter()
        known = {normalise(c.name) for c in ctx.classes} if ctx.classes is not None else None
        skipped_at: dict[str, list[int]] = {}
        seen: set[tuple[str, str]] = set()
        lines = 0

        def fail(lineno: int, why: str) -> SourceError:
            return SourceError(f"engine urls: {path}: line {lineno}: {why}")

        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as e:
                raise fail(lineno, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                tabs = f"{len(parts) - 1} tabs" if len(parts) > 2 else "no tab"
                raise fail(lineno, f"expected 'class<TAB>url', found {tabs} (a tab inside a URL must be written %09)")
            name, url = parts[0].strip(), parts[1].strip()
            if not name or not url:
                raise fail(lineno, f"expected 'class<TAB>url', the {'class name' if not name else 'URL'} is empty")
            key = normalise(name)
            if known is not None and key not in known:
                raise fail(lineno, f"class {name!r} is not in the class list")
            lines += 1
            reason = None
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                reason = "not_http"
            elif (key, url) in seen:
                reason = "duplicate"
            if reason is not None:
                self.skipped[reason] += 1
                skipped_at.setdefault(reason, []).append(lineno)
                continue
            seen.add((key, url))
            self.by_class.setdefault(key, []).append(url)
        if not lines:
            raise SourceError(f"engine urls: {path}: no 'class<TAB>url' lines (empty, or only comments)")
        for reason, at in skipped_at.items():
            first = ", ".join(map(str, at[:5])) + (", ..." if len(at) > 5 else "")
            log.warning("engine urls: %s: %d lines skipped (%s): line %s", path, len(at), reason, first)
        if not self.by_class:
            raise SourceError(f"engine urls: {path}: no http(s) URL on any line")

    def search(self, cls: ClassName, query: str, max_num: int) -> list[str]:
        return self.by_class.get(normalise(cls.name), [])[:max_num]
