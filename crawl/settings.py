"""Settings of the crawl and clean code, with their defaults and ranges (no heavy imports).

Each field is declared once, with ``knob``; ``pipeline.config`` builds the ``crawl`` and ``clean``
sections of params from these, so a default is never written twice, and a stage that only reads
its params does not import the downloader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd3util import knob


@dataclass(frozen=True)
class HttpLimits:
    """Limits for every request; ``crawl.http`` in params. The defaults are polite for the real web."""

    per_host_concurrency: int = knob(2, 1, 64)  # simultaneous requests to one host
    per_host_delay_s: float = knob(1.0, 0, 60)  # minimum spacing between request starts to one host
    connect_timeout_s: float = knob(5.0, 0.01, 120, lo_open=True)
    read_timeout_s: float = knob(10.0, 0.01, 300, lo_open=True)
    deadline_s: float = knob(30.0, 0.01, 3600, lo_open=True)  # total time for one URL, retries included
    max_bytes: int = knob(20_000_000, 1, 1_000_000_000)  # byte cap per image, header and stream
    max_redirects: int = knob(5, 0, 20)
    retries: int = knob(3, 1, 10)  # attempts per URL in one run
    backoff_s: float = knob(1.0, 0, 60)  # base of the exponential backoff (full jitter)
    max_retry_after_s: float = knob(60.0, 0, 3600)  # Retry-After is honoured up to this
    user_agent: str = "kd3/0.1 (+https://github.com/kd3-project/kd3)"
    pool_size: int = knob(8, 1, 1024)  # pooled connections (the crawl stage: at least crawl.http.workers)
    allow_private: bool = False  # fetch from loopback, link-local and private addresses (your own intranet server)
    allow_hosts: tuple[str, ...] = ()  # "host:port" endpoints allowed even when non-public ("[::1]:8080")
    robots: bool = True  # honour robots.txt for image downloads (crawl.robots)
    robots_timeout_s: float = knob(10.0, 0.01, 300, lo_open=True)  # total time to fetch one robots.txt
    host_failures: int = knob(5, 0, 1000)  # consecutive unanswered requests that skip a host for the run; 0 = off


ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP"]
ALLOWED: tuple[ImageFormat, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class DecodeLimits:
    """Caps applied before and during decoding (``clean`` keys of the same names)."""

    formats: tuple[ImageFormat, ...] = ALLOWED
    max_bytes: int = knob(20_000_000, 1, 1_000_000_000)  # per file, checked before decoding
    max_pixels: int = knob(40_000_000, 1, 500_000_000)  # per image, on the header (below Pillow's 89 MP warning)
    max_frames: int = knob(100, 1, 100_000)  # animations with more frames are dropped


@dataclass(frozen=True)
class AnalyzeParams:
    """What the clean stage computes from each file (``clean`` keys of the same names)."""

    limits: DecodeLimits = field(default_factory=DecodeLimits)
    hash_size: int = knob(8, 8, 32)  # pHash side: 8 -> 64-bit hashes
    image_size: int = knob(48, 8, 1024)  # side of the packed array, pixels
    resize: Literal["crop", "pad"] = "crop"  # shorter side to image_size + centre crop, or fit + white pad


@dataclass(frozen=True)
class FilterParams:
    """The clean stage's keep/drop thresholds (``clean`` keys of the same names)."""

    min_side: int = knob(24, 1, 10_000)  # shorter side below this: too_small
    max_aspect: float = knob(3.0, 1, 1000)  # long/short side above this: bad_aspect
    min_std: float = knob(3.0, 0, 128)  # largest per-channel std below this: blank
    min_entropy: float = knob(1.5, 0, 8)  # grey-histogram entropy (bits) below this: low_information
