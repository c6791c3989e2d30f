"""HTTP fetching with hard limits: the downloader behind every engine.

``Fetcher.download(url, store)`` streams one image into the content-addressed store and returns a
``FetchOutcome`` with a reason code on failure; ``Fetcher.get_page(url)`` fetches a search page into
memory under the same rules. What it guarantees:

- connect/read timeouts per socket operation and a total deadline per URL (retries included);
- a byte cap checked against ``Content-Length`` before reading and against the decoded stream while
  reading (a gzip bomb stops at the cap: urllib3 decodes with ``max_length``);
- bounded retries with exponential backoff and full jitter for 5xx, 429 (honouring ``Retry-After``
  up to a cap), timeouts, resets and short bodies; 403 is not retried within a run; 404/410 are final;
- redirects followed by hand: at most ``max_redirects`` hops, http(s) only;
- no request reaches an internal address, on any hop including the first (a search result must
  not reach internal services): every connection resolves the host name itself, refuses if any
  address it resolves to is loopback, link-local, private, unspecified, multicast, reserved or
  otherwise not public (IPv4-mapped, 6to4 and Teredo IPv6 forms are judged by their IPv4 address;
  numeric spellings such as ``2130706433`` or ``0x7f.1`` are judged after resolution), and then
  connects to exactly the addresses it checked, so a name cannot resolve to a public address for
  the check and an internal one for the connection. The reason code names the kind of address
  (``loopback_address``, ``private_address``, ...). ``HttpLimits.allow_private`` turns the check
  off; ``HttpLimits.allow_hosts`` and ``Fetcher.allow_endpoint`` allow single ``host:port``
  endpoints (the mirror engine allows its own address this way, and only that);
- content sniffing: the bytes decide what a file is, never the ``Content-Type`` header;
- at most ``per_host_concurrency`` requests in flight per host and ``per_host_delay_s`` between
  request starts to one host, or the host's robots.txt ``Crawl-delay`` where that is longer;
- robots.txt honoured for image downloads (not for search pages), fetched once per site under
  the same limits (``crawl.robots``): a disallowed URL fails with ``robots_disallowed``, and while
  a site's robots.txt cannot be read its URLs fail with ``robots_unavailable``;
- a host circuit breaker: after ``host_failures`` consecutive attempts to one host that got no
  answer (timeouts, connection errors), the host's remaining URLs fail at once with
  ``host_unresponsive`` instead of each costing a deadline;
- nothing is written under a final name until the whole body has arrived and been hashed.

Used by ``crawl.crawler`` and the engines in ``crawl.sources``.
"""

from __future__ import annotations

import builtins
import hashlib
import ipaddress
import logging
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions
import urllib3.util.connection
from PIL import Image

from crawl.robots import ROBOTS_MAX_BYTES, RobotsCache, RobotsFetch
from crawl.settings import HttpLimits
from crawl.store import DiskFullError, ObjectStore

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
SNIFF_BYTES = 512  # enough for magic numbers and an XML prolog before <svg


@dataclass
class FetchOutcome:
    """What happened to one URL. ``reason`` is a stable code (``http_404``, ``timeout``, ...)."""

    url: str
    ok: bool
    reason: str | None = None
    sha256: str | None = None
    path: Path | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    final_url: str | None = None
    attempts: int = 0
    requests: int = 0  # HTTP requests sent (0: refused before any, e.g. by robots.txt or an open breaker)
    body: builtins.bytes | None = None  # only for get_page (the field above shadows the builtin)


class Interrupted(Exception):
    """The fetch was abandoned because the crawl is stopping."""


class _Fail(Exception):
    """A failed attempt: ``reason`` code, whether another attempt may help, and a wait hint.

    ``unanswered``: the request got no response at all (timeout, connection error); these count
    toward the host circuit breaker. ``refused``: the host's address is not allowed.
    """

    def __init__(
        self,
        reason: str,
        retry: bool = False,
        wait: float | None = None,
        unanswered: bool = False,
        refused: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason, self.retry, self.wait = reason, retry, wait
        self.unanswered, self.refused = unanswered, refused


# --------------------------------------------------------------------------------------------
# content sniffing
# --------------------------------------------------------------------------------------------

ALLOWED_FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}


def sniff(head: bytes) -> tuple[str | None, str | None]:
    """(format, None) for an allowed image, else (None, reason) judged from the first bytes."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG", None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", None
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF", None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", None
    if head[:2] == b"BM" and len(head) >= 26:
        return "BMP", None
    if not head:
        return None, "empty"
    other_images = (b"II*\x00", b"MM\x00*", b"8BPS", b"%!PS", b"%PDF", b"SIMPLE  =", b"DDS ", b"\x00\x00\x01\x00")
    if head.startswith(other_images) or head[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return None, "format_not_allowed"
    text = head.lstrip()[:256].lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in head.lower()):
        return None, "unsupported_format"
    return None, "unidentified"


def probe_size(path: Path) -> tuple[int | None, int | None]:
    """Width and height from the header only (no pixel decoding); None when unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.size
    except Exception:  # any header problem is the clean stage's to judge
        return None, None


# --------------------------------------------------------------------------------------------
# per-host politeness
# --------------------------------------------------------------------------------------------


class HostGate:
    """At most ``concurrency`` requests in flight per host, request starts ``delay_s`` apart.

    ``slow_down`` raises one host's spacing (a robots.txt ``Crawl-delay``); it never lowers it.
    """

    def __init__(self, concurrency: int, delay_s: float) -> None:
        self.concurrency, self.delay_s = concurrency, delay_s
        self._lock = threading.Lock()
        self._slots: dict[str, threading.Semaphore] = {}
        self._next_start: dict[str, float] = {}
        self._delay: dict[str, float] = {}

    def slow_down(self, host: str, delay_s: float) -> None:
        with self._lock:
            if delay_s > self._delay.get(host, self.delay_s):
                self._delay[host] = delay_s

    def acquire(self, host: str, deadline: float, stop: threading.Event) -> None:
        with self._lock:
            sem = self._slots.setdefault(host, threading.Semaphore(self.concurrency))
        while not sem.acquire(timeout=0.1):
            if stop.is_set():
                raise Interrupted()
            if time.monotonic() > deadline:
                raise _Fail("timeout")
        # reserve the next start time for this host, then sleep until it comes; a start past the
        # deadline reserves nothing, or a burst of such URLs would push the host's next start ever later
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start.get(host, now))
            if start > deadline:
                sem.release()
                raise _Fail("timeout")
            self._next_start[host] = start + self._delay.get(host, self.delay_s)
        wait = start - time.monotonic()
        if wait > 0:
            if stop.wait(wait):
                sem.release()
                raise Interrupted()

    def release(self, host: str) -> None:
        self._slots[host].release()


class HostBreaker:
    """Gives up on a host for the run after ``limit`` consecutive attempts it did not answer.

    Any answer (a status line, a whole body) resets the count while the breaker is closed; once
    open it stays open, so the host's remaining URLs cost nothing until the next run.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._fails: dict[str, int] = {}

    def is_open(self, host: str) -> bool:
        with self._lock:
            return self.limit > 0 and self._fails.get(host, 0) >= self.limit

    def unanswered(self, host: str) -> None:
        with self._lock:
            self._fails[host] = self._fails.get(host, 0) + 1
            tripped = self._fails[host] == self.limit
        if tripped:
            log.warning(
                "%s: %d attempts in a row got no answer; its other URLs wait for the next run", host, self.limit
            )

    def answered(self, host: str) -> None:
        with self._lock:
            if self.limit <= 0 or self._fails.get(host, 0) < self.limit:
                self._fails[host] = 0


# --------------------------------------------------------------------------------------------
# the fetcher
# --------------------------------------------------------------------------------------------


def _host_key(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The reason code refusing ``ip`` (``loopback_address``, ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d: its verdict is the verdict
            return address_problem(ip.ipv4_mapped)
        # 6to4 and Teredo carry an IPv4 address too: refuse if that one is internal
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and address_problem(embedded) is not None:
            return address_problem(embedded)
    checks = (
        (ip.is_unspecified, "unspecified_address"),
        (ip.is_loopback, "loopback_address"),
        (ip.is_link_local, "link_local_address"),
        (ip.is_multicast, "multicast_address"),
        (ip.is_reserved, "reserved_address"),  # before private: Python counts 240.0.0.0/4 as both
        (ip.is_private, "private_address"),
        (not ip.is_global, "non_public_address"),  # e.g. 100.64.0.0/10 (carrier-grade NAT)
    )
    return next((reason for bad, reason in checks if bad), None)


def _ip(sockaddr_host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(sockaddr_host.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")


class AddressRefused(Exception):
    """A connection would reach a non-public address that is not allowed (``reason``: the code)."""

    def __init__(self, reason: str, host: str, ip: str) -> None:
        super().__init__(f"{host} resolves to {ip} ({reason})")
        self.reason = reason


def _split_endpoint(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); anything else is a ValueError naming it."""
    parts = urlsplit(value if "//" in value else f"//{value}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(f"allowed endpoint {value!r}: expected host:port (IPv6: [addr]:port)")
    return parts.hostname, port


def _norm_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


class AddressGuard:
    """Resolves a host, refuses non-public addresses that are not allowed, returns what to connect to.

    Allowed endpoints are matched by the host name (or IP literal) and port as the URL spells
    them, so allowing the mirror at ``127.0.0.1:47611`` allows no other port, and no other name.
    Nothing is resolved when an endpoint is allowed (a default engine URL costs no DNS lookup).
    """

    def __init__(self, allow_private: bool, allow_hosts: tuple[str, ...] = ()) -> None:
        self.allow_private = allow_private
        self._lock = threading.Lock()
        self._allowed: set[tuple[str, int]] = set()
        for entry in allow_hosts:
            self.allow(*_split_endpoint(entry))

    def allow(self, host: str, port: int) -> None:
        """Allow the endpoint ``host:port`` whatever it resolves to."""
        with self._lock:
            self._allowed.add((_norm_host(host), int(port)))

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """``getaddrinfo`` results for ``host:port``, or ``AddressRefused`` if any address is refused.

        Every address must pass: a name with one public and one internal address is refused, since
        which one a connection would use is not ours to choose.
        """
        name = _norm_host(host)
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        if self.allow_private or (name, port) in self._allowed:
            return infos
        for info in infos:
            ip = _ip(str(info[4][0]))
            problem = address_problem(ip)
            if problem is not None:
                raise AddressRefused(problem, host, str(ip))
        return infos


class _GuardedConnection(urllib3.connection.HTTPConnection):
    """An urllib3 connection that resolves through an ``AddressGuard`` and connects to what it checked."""

    guard: AddressGuard  # set on the per-fetcher subclass

    def _new_conn(self) -> socket.socket:
        try:
            infos = self.guard.resolve(self._dns_host, self.port)
        except socket.gaierror as e:
            raise urllib3.exceptions.NewConnectionError(self, f"Failed to resolve {self.host}: {e}") from e
        error: Exception | None = None
        for *_, sockaddr in infos:  # an IP literal each: connecting resolves nothing more
            try:
                return urllib3.util.connection.create_connection(
                    (sockaddr[0], self.port),
                    self.timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except TimeoutError as e:
                error = urllib3.exceptions.ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
                )
                error.__cause__ = e
            except OSError as e:
                error = urllib3.exceptions.NewConnectionError(self, f"Failed to establish a new connection: {e}")
                error.__cause__ = e
        raise error or urllib3.exceptions.NewConnectionError(self, f"{self.host}: no address")


class _GuardedHTTPSConnection(_GuardedConnection, urllib3.connection.HTTPSConnection):
    pass


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose pools make ``_GuardedConnection`` s bound to one fetcher's guard."""

    def __init__(self, guard: AddressGuard, **kwargs: Any) -> None:
        http_conn = type("GuardedHTTPConnection", (_GuardedConnection,), {"guard": guard})
        https_conn = type("GuardedHTTPSConnection", (_GuardedHTTPSConnection,), {"guard": guard})
        self._pools = {
            "http": type("GuardedHTTPPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools


class Fetcher:
    """Thread-safe HTTP client applying ``HttpLimits``; one ``requests.Session`` per thread."""

    def __init__(self, limits: HttpLimits, stop: threading.Event | None = None) -> None:
        self.limits = limits
        self.stop = stop or threading.Event()
        self.gate = HostGate(limits.per_host_concurrency, limits.per_host_delay_s)
        self.guard = AddressGuard(limits.allow_private, limits.allow_hosts)
        self.breaker = HostBreaker(limits.host_failures)
        self.robots = RobotsCache(self.fetch_robots) if limits.robots else None
        self._local = threading.local()

    def allow_endpoint(self, url: str) -> None:
        """Allow requests to the scheme-host-port of ``url`` even if its address is not public.

        For an endpoint the operator configured (the mirror, a local search engine); search results
        pointing elsewhere on the same network stay refused.
        """
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"allow_endpoint: {url!r} has no host")
        self.guard.allow(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = _GuardedAdapter(self.guard, pool_maxsize=self.limits.pool_size, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = self.limits.user_agent
            s.trust_env = False  # no proxies or netrc from the environment
            self._local.session = s
        return s

    # -- public -----------------------------------------------------------------------------
    def download(self, url: str, store: ObjectStore) -> FetchOutcome:
        """Fetch ``url`` into ``store``; never raises for network or content problems."""
        return self._with_retries(url, store)

    def get_page(self, url: str, max_bytes: int = 5_000_000) -> FetchOutcome:
        """Fetch a search page into memory (``outcome.body``) under the same limits (robots.txt is
        not consulted: engines' result pages are the engines' business)."""
        return self._with_retries(url, None, max_bytes)

    def fetch_robots(self, url: str) -> RobotsFetch:
        """GET a robots.txt: redirects followed, ``robots_timeout_s`` in all, the first
        ``ROBOTS_MAX_BYTES`` kept; any failure to get an answer becomes ``RobotsFetch.error``."""
        deadline = time.monotonic() + self.limits.robots_timeout_s
        current = url
        for hop in range(self.limits.max_redirects + 1):
            if urlsplit(current).scheme.lower() not in ("http", "https"):
                return RobotsFetch(None, error="redirect_blocked")
            host = _host_key(current)
            try:
                if self.breaker.is_open(host):
                    return RobotsFetch(None, error="host_unresponsive")
                self.gate.acquire(host, deadline, self.stop)
            except _Fail as f:
                return RobotsFetch(None, error=f.reason)
            try:
                resp = self._send(host, current, deadline)
                try:
                    if resp.is_redirect:
                        current = urljoin(current, resp.headers.get("Location", ""))
                        continue
                    if not 200 <= resp.status_code < 300:
                        return RobotsFetch(resp.status_code)
                    return RobotsFetch(resp.status_code, self._read_prefix(resp, deadline, ROBOTS_MAX_BYTES))
                finally:
                    resp.close()
            except _Fail as f:
                return RobotsFetch(None, error=f.reason, site_refused=f.refused and hop == 0)
            finally:
                self.gate.release(host)
        return RobotsFetch(None, error="too_many_redirects")

    def _read_prefix(self, resp: requests.Response, deadline: float, limit: int) -> bytes:
        """Up to ``limit`` decoded bytes of the body; the rest is never read."""
        chunks: list[bytes] = []
        total = 0
        while total < limit:
            if self.stop.is_set():
                raise Interrupted()
            if time.monotonic() > deadline:
                raise _Fail("timeout")
            try:
                chunk = resp.raw.read1(min(CHUNK, limit - total), decode_content=True)
            except urllib3.exceptions.ReadTimeoutError:
                raise _Fail("timeout") from None
            except (urllib3.exceptions.ProtocolError, OSError):
                raise _Fail("connection_error") from None
            except urllib3.exceptions.DecodeError:
                raise _Fail("bad_encoding") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)[:limit]

    def _may_request(self, url: str, store: ObjectStore | None) -> None:
        """Raise ``_Fail`` when ``url`` must not be requested now: its host's breaker is open, or
        (for an image) its site's robots.txt disallows it or could not be read."""
        host = _host_key(url)
        if self.breaker.is_open(host):
            raise _Fail("host_unresponsive")
        if self.robots is None or store is None:
            return
        rules = self.robots.rules(url)
        delay = rules.crawl_delay(self.limits.user_agent)
        if delay is not None:
            self.gate.slow_down(host, delay)
        reason = rules.verdict(url, self.limits.user_agent)
        if reason is not None:
            raise _Fail(reason)

    def _send(self, host: str, url: str, deadline: float) -> requests.Response:
        """``_request``, telling the host's breaker whether a response came."""
        try:
            resp = self._request(url, deadline)
        except _Fail as f:
            if f.unanswered:
                self.breaker.unanswered(host)
            raise
        self.breaker.answered(host)
        return resp

    # -- retries ----------------------------------------------------------------------------
    def _with_retries(self, url: str, store: ObjectStore | None, max_bytes: int | None = None) -> FetchOutcome:
        lim = self.limits
        deadline = time.monotonic() + lim.deadline_s
        outcome = FetchOutcome(url=url, ok=False)
        for attempt in range(lim.retries):
            outcome.attempts = attempt + 1
            try:
                return self._attempt(url, store, deadline, outcome, max_bytes or lim.max_bytes)
            except _Fail as f:
                outcome.reason = f.reason
                if not f.retry or attempt + 1 == lim.retries:
                    return outcome
                wait = f.wait if f.wait is not None else random.uniform(0, lim.backoff_s * 2**attempt)
                if time.monotonic() + wait > deadline:
                    return outcome
                if self.stop.wait(wait):
                    outcome.reason = "interrupted"
                    return outcome
            except Interrupted:
                outcome.reason = "interrupted"
                return outcome
        return outcome

    # -- one attempt (following redirects) --------------------------------------------------
    def _attempt(
        self, url: str, store: ObjectStore | None, deadline: float, out: FetchOutcome, max_bytes: int
    ) -> FetchOutcome:
        lim = self.limits
        current = url
        for hop in range(lim.max_redirects + 1):
            scheme = urlsplit(current).scheme.lower()
            if scheme not in ("http", "https"):
                raise _Fail("redirect_blocked" if hop else "bad_url")
            # every hop's address is checked when its connection is made (AddressGuard), and its
            # breaker and robots.txt before that (the first hop's on every retry)
            self._may_request(current, store)
            host = _host_key(current)
            self.gate.acquire(host, deadline, self.stop)
            try:
                if self.breaker.is_open(host):  # it may have opened while this request queued
                    raise _Fail("host_unresponsive")
                out.requests += 1
                resp = self._send(host, current, deadline)
                try:
                    if resp.is_redirect:
                        location = resp.headers.get("Location", "")
                        current = urljoin(current, location)
                        continue
                    self._check_status(resp)
                    out.final_url = current if current != url else None
                    return self._read_body(resp, store, deadline, out, max_bytes)
                finally:
                    resp.close()
            finally:
                self.gate.release(host)
        raise _Fail("too_many_redirects")

    def _request(self, url: str, deadline: float) -> requests.Response:
        lim = self.limits
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Fail("timeout")
        timeout = (min(lim.connect_timeout_s, remaining), min(lim.read_timeout_s, remaining))
        try:
            return self.session().get(url, stream=True, allow_redirects=False, timeout=timeout)
        except AddressRefused as e:
            raise _Fail(e.reason, refused=True) from None
        except requests.exceptions.SSLError:
            raise _Fail("tls_error") from None
        except requests.exceptions.Timeout:
            raise _Fail("timeout", retry=True, unanswered=True) from None
        except requests.exceptions.InvalidURL:
            raise _Fail("bad_url") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError):
            raise _Fail("connection_error", retry=True, unanswered=True) from None
        except requests.exceptions.RequestException:
            raise _Fail("bad_url") from None

    def _check_status(self, resp: requests.Response) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        if code in (404, 410):
            raise _Fail(f"http_{code}")
        if code == 403:
            raise _Fail("http_403")
        if code == 429:
            raise _Fail("http_429", retry=True, wait=self._retry_after(resp))
        if code >= 500:
            raise _Fail("http_5xx", retry=True, wait=self._retry_after(resp))
        raise _Fail(f"http_{code}" if 300 <= code < 500 else "http_other")

    def _retry_after(self, resp: requests.Response) -> float | None:
        value = resp.headers.get("Retry-After")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
        return max(0.0, min(seconds, self.limits.max_retry_after_s))

    # -- body -------------------------------------------------------------------------------
    def _read_body(
        self, resp: requests.Response, store: ObjectStore | None, deadline: float, out: FetchOutcome, max_bytes: int
    ) -> FetchOutcome:
        declared = resp.headers.get("Content-Length")
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if declared is not None and not encoded:
            try:
                if int(declared) > max_bytes:
                    raise _Fail("too_large")
            except ValueError:
                pass
        digest = hashlib.sha256()
        head = b""
        total = 0
        if store is None:
            chunks: list[bytes] = []
        else:
            tmp_path, fh = store.new_temp()
        try:
            raw = resp.raw
            while True:
                if self.stop.is_set():
                    raise Interrupted()
                if time.monotonic() > deadline:
                    raise _Fail("timeout")
                try:
                    # read1 returns after one socket read, so a 1-byte/s drip still meets the deadline
                    chunk = raw.read1(CHUNK, decode_content=True)
                except urllib3.exceptions.ReadTimeoutError:
                    raise _Fail("timeout", retry=True) from None
                except urllib3.exceptions.ProtocolError as e:
                    short = "IncompleteRead" in repr(e)
                    raise _Fail("truncated_body" if short else "connection_error", retry=True) from None
                except urllib3.exceptions.DecodeError:
                    raise _Fail("bad_encoding") from None
                except OSError:
                    raise _Fail("connection_error", retry=True) from None
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise _Fail("too_large")
                if len(head) < SNIFF_BYTES:
                    head += chunk[: SNIFF_BYTES - len(head)]
                digest.update(chunk)
                if store is None:
                    chunks.append(chunk)
                else:
                    try:
                        fh.write(chunk)
                    except OSError as e:
                        raise DiskFullError(e.errno, f"disk full at {tmp_path}") from e
            if store is None:
                out.ok, out.reason, out.body, out.bytes = True, None, b"".join(chunks), total
                return out
            fmt, why = sniff(head)
            if fmt is None:
                raise _Fail(why or "unidentified")
            sha = digest.hexdigest()
            final = store.commit(tmp_path, fh, sha, ALLOWED_FORMATS[fmt])
            width, height = probe_size(final)
            out.ok, out.reason, out.sha256, out.path = True, None, sha, final
            out.bytes, out.width, out.height, out.format = total, width, height, fmt
            return out
        except BaseException:
            if store is not None:
                store.discard(tmp_path, fh)
            raise
