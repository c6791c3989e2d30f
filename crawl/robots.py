"""robots.txt: fetched once per site and run, interpreted by the standard library's parser.

A site is a scheme, host and port (``https://example.com:443``). ``RobotsCache.rules(url)`` fetches
``/robots.txt`` for the URL's site the first time any thread asks (the others wait for that one
fetch) and keeps the verdict for the rest of the run. The fetch itself goes through the
downloader's limits (``crawl.download.Fetcher.fetch_robots``): address checks on every hop,
redirects, a short deadline, and at most ``ROBOTS_MAX_BYTES`` read.

How a fetch is read follows RFC 9309 (section 2.3.1):

- 2xx: the rules apply (``Disallow``, ``Allow`` and ``Crawl-delay`` for our user agent, as
  ``urllib.robotparser`` matches them: the first group naming our agent, else ``*``; within it the
  first matching line; ``Crawl-delay`` in whole seconds);
- redirects are followed; a chain longer than the cap, or to a non-http(s) scheme, means no file
  (everything allowed);
- 4xx, 401 and 403 included: the file is "unavailable" and everything is allowed. (Some crawlers
  read 401/403 as "disallow all"; the RFC says 4xx means allowed, and kd3 follows the RFC. A site
  that forbids you its robots.txt usually forbids the images too, and those 403s are counted.)
- 429, 5xx, and no answer at all (timeout, refused connection, TLS failure, an internal address):
  the file is "unreachable" and everything is disallowed for this run, but not for good: those
  URLs are left for the next run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

log = logging.getLogger(__name__)

ROBOTS_MAX_BYTES = 512_000  # RFC 9309 2.5: parse at least 500 KiB; anything past the cap is ignored

DISALLOWED = "robots_disallowed"  # final: the site asks us not to fetch this URL
UNREACHABLE = "robots_unavailable"  # not final: the site's robots.txt could not be read this run


@dataclass(frozen=True)
class RobotsFetch:
    """What fetching one robots.txt gave: the final HTTP ``status`` and body, or no answer (``error``)."""

    status: int | None
    body: bytes = b""
    error: str | None = None  # reason code when no usable answer came (``timeout``, ``loopback_address``)
    site_refused: bool = False  # the site's own address is refused (so is every URL on it)


@dataclass(frozen=True)
class RobotsRules:
    """One site's robots.txt verdict for this run."""

    parser: RobotFileParser | None  # None: no rules (allow all) or unreachable (disallow all)
    unreachable: bool = False
    why: str = ""  # for the log: "http_404", "timeout", "parsed"

    def verdict(self, url: str, user_agent: str) -> str | None:
        """None when ``url`` may be fetched, else the reason code refusing it."""
        if self.unreachable:
            return UNREACHABLE
        if self.parser is None or self.parser.can_fetch(user_agent, url):
            return None
        return DISALLOWED

    def crawl_delay(self, user_agent: str) -> float | None:
        """The site's ``Crawl-delay`` for ``user_agent`` in seconds, if it sets one."""
        if self.parser is None:
            return None
        delay = self.parser.crawl_delay(user_agent)
        return float(delay) if delay is not None else None


def site_of(url: str) -> str:
    """``scheme://host:port`` of ``url`` (default ports spelled out), the key robots.txt is cached by."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{parts.port or (443 if scheme == 'https' else 80)}"


def interpret(fetch: RobotsFetch) -> RobotsRules:
    """The verdict for one fetch, by the rules in the module docstring."""
    if fetch.status is None:
        if fetch.site_refused:  # no opinion: each URL's own request is refused with the address code
            return RobotsRules(None, why=fetch.error or "refused")
        if fetch.error in ("too_many_redirects", "redirect_blocked"):
            return RobotsRules(None, why=fetch.error)  # RFC 9309 2.3.1.2: no file found
        return RobotsRules(None, unreachable=True, why=fetch.error or "no answer")
    if 200 <= fetch.status < 300:
        parser = RobotFileParser()
        parser.parse(fetch.body[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace").splitlines())
        return RobotsRules(parser, why="parsed")
    if fetch.status == 429 or fetch.status >= 500:
        return RobotsRules(None, unreachable=True, why=f"http_{fetch.status}")
    return RobotsRules(None, why=f"http_{fetch.status}")  # 4xx: unavailable, everything allowed


class RobotsCache:
    """One ``RobotsRules`` per site for the life of the cache (one crawl run), fetched once."""

    def __init__(self, fetch: Callable[[str], RobotsFetch]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._site_locks: dict[str, threading.Lock] = {}
        self._rules: dict[str, RobotsRules] = {}

    def rules(self, url: str) -> RobotsRules:
        """The rules for ``url``'s site, fetching its robots.txt if no thread has yet."""
        site = site_of(url)
        with self._lock:
            site_lock = self._site_locks.setdefault(site, threading.Lock())
        with site_lock:  # a second thread for the same site waits for the first one's fetch
            rules = self._rules.get(site)
            if rules is None:
                rules = interpret(self._fetch(f"{site}/robots.txt"))
                if rules.unreachable:
                    log.warning("%s/robots.txt unreachable (%s): its URLs are left for the next run", site, rules.why)
                self._rules[site] = rules
            return rules
