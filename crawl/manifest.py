"""The crawl manifest: one JSON line per (class, URL) outcome, appended as work completes.

A rerun reads it back to resume: the last line for a (class, URL) pair wins, and a pair whose
status is final (``ok`` or a terminal failure) is never requested again. Lines are written with a
single ``write`` and flushed; a line torn by a kill is cut off when the manifest is reopened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# Failures worth another try in a later run; every other failure reason is terminal (H1, H2).
TRANSIENT_REASONS = frozenset(
    {"timeout", "http_5xx", "http_429", "http_403", "connection_error", "truncated_body", "interrupted"}
)


@dataclass
class ImageRecord:
    """One URL's outcome for one class (the manifest line)."""

    class_name: str
    class_index: int
    query: str
    engine: str
    rank: int  # position in the engine's result list for that query (0-based)
    url: str
    status: str  # "ok" or "failed"
    reason: str | None = None  # failure reason code, None when ok
    sha256: str | None = None
    path: str | None = None  # object path relative to the crawl folder
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    final_url: str | None = None  # after redirects
    time: float = 0.0  # unix time of the outcome

    @property
    def is_final(self) -> bool:
        return self.status == "ok" or self.reason not in TRANSIENT_REASONS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) left by a kill mid-write."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, skipping blank or unparsable lines."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def latest_records(path: Path) -> dict[tuple[str, str], ImageRecord]:
    """The last record for each (class name, url) pair (names survive a reordered class file)."""
    out: dict[tuple[str, str], ImageRecord] = {}
    for d in iter_jsonl(path):
        rec = ImageRecord.from_dict(d)
        out[(rec.class_name, rec.url)] = rec
    return out


class JsonlWriter:
    """Append-only JSONL writer: one ``write`` + flush per line, torn tail repaired on open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, obj: dict[str, Any] | ImageRecord) -> None:
        d = asdict(obj) if isinstance(obj, ImageRecord) else obj
        self._f.write(json.dumps(d, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
