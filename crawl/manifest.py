"""The crawl manifest: one JSON line per (class, URL) outcome, appended as work completes.

A rerun reads it back to resume: the last line for a (class, URL) pair wins, and a pair whose
status is final (``ok`` or a terminal failure) is never requested again.

Writing: each line goes out whole in one ``os.write`` on an ``O_APPEND`` descriptor (looping only
on a short write), so no buffer holds half a line. If the append fails (disk full, quota, file
size limit, I/O error) the file is truncated back to its size before the line and the error names
the file, so the manifest still ends at a complete line and the crawl stops with a clear message.

Reading works on bytes: a kill can cut the last line anywhere, even inside a multi-byte UTF-8
character, so nothing is decoded before lines are split. ``repair_tail`` (run by the writer, and by
the crawler before it reads) cuts such a torn tail; readers ignore it without touching the file. A
bad line anywhere else (not UTF-8, not JSON, not a record) is skipped with a warning naming the
file and line number, and counted, instead of failing every later crawl and clean.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from crawl.store import DiskFullError

log = logging.getLogger(__name__)

MAX_WARNINGS = 10  # per read of one file; the rest are only counted

# Failures worth another try in a later run; every other failure reason is terminal.
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


def _complete_json(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _tail_start(f: Any, size: int, block: int = 64 * 1024) -> int:
    """Offset just past the last newline of the open binary file (0 if none), read backwards."""
    pos = size
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        i = f.read(step).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


def repair_tail(path: Path) -> int:
    """Make ``path`` end at a complete line; return the number of bytes cut.

    Works on bytes only, so a tail cut inside a multi-byte character is handled like any other. A
    last line that lacks only its newline but is a whole JSON object is kept (the newline is
    added); anything else after the last newline is cut.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start = _tail_start(f, size)
        if start == size:
            return 0
        f.seek(start)
        tail = f.read()
        if _complete_json(tail):
            f.write(b"\n")
            return 0
        f.truncate(start)
    log.warning("%s: cut a torn last line (%d bytes) left by an interrupted write", path, size - start)
    return size - start


def _numbered(path: Path, bad: list[int] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each good line; bad line numbers go to ``bad`` with a warning."""
    path = Path(path)
    if not path.exists():
        return
    found: list[int] = [] if bad is None else bad
    before = len(found)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            torn = not raw.endswith(b"\n")
            if not raw.strip():
                continue
            why = None
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    why = "not a JSON object"
            except UnicodeDecodeError as e:
                why = f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
            except json.JSONDecodeError as e:
                why = f"not valid JSON ({e.msg})"
            if why is None:
                yield lineno, obj
            elif torn:  # the last line, cut by a kill: expected, and repaired by the next writer
                log.debug("%s: line %d: torn last line ignored", path, lineno)
            else:
                _bad_line(path, lineno, why, found, before)
    if len(found) - before > MAX_WARNINGS:
        log.warning("%s: %d bad lines skipped in all", path, len(found) - before)


def _bad_line(path: Path, lineno: int, why: str, found: list[int], before: int) -> None:
    found.append(lineno)
    if len(found) - before <= MAX_WARNINGS:
        log.warning("%s: line %d: %s; line skipped", path, lineno, why)


def iter_jsonl(path: Path, bad: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, skipping blank lines and a torn last line.

    Any other unreadable line is skipped with a warning; its number is appended to ``bad``.
    """
    for _, obj in _numbered(path, bad):
        yield obj


def latest_records(path: Path, bad: list[int] | None = None) -> dict[tuple[str, str], ImageRecord]:
    """The last record for each (class name, url) pair (names survive a reordered class file).

    Unreadable lines, and JSON objects that are not records, are skipped and listed in ``bad``.
    """
    out: dict[tuple[str, str], ImageRecord] = {}
    found: list[int] = [] if bad is None else bad
    before = len(found)
    for lineno, d in _numbered(path, found):
        try:
            rec = ImageRecord.from_dict(d)
        except TypeError as e:  # a required field is missing
            _bad_line(Path(path), lineno, f"not a manifest record ({e})", found, before)
            continue
        if not isinstance(rec.class_name, str) or not isinstance(rec.url, str):
            _bad_line(Path(path), lineno, "not a manifest record (class_name and url must be strings)", found, before)
            continue
        out[(rec.class_name, rec.url)] = rec
    return out


class JsonlWriter:
    """Append-only JSONL writer: each line whole in one ``os.write``, torn tail repaired on open.

    A failed append is undone (the file is cut back to its previous size) and raised as
    ``DiskFullError`` for a full disk or quota, otherwise as ``OSError``, naming the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, obj: dict[str, Any] | ImageRecord) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: writer is closed")
        d = asdict(obj) if isinstance(obj, ImageRecord) else obj
        data = memoryview((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
        size = os.fstat(self._fd).st_size
        try:
            while data:
                n = os.write(self._fd, data)
                if n <= 0:  # not expected from a regular file, but never loop forever
                    raise OSError(errno.EIO, "write returned 0")
                data = data[n:]
        except OSError as e:
            raise self._undo(size, e) from e

    def _undo(self, size: int, e: OSError) -> OSError:
        """Cut the file back to ``size`` and describe the failed append (naming the file)."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, size)
            state = "cut back to its last complete line"
        except OSError:
            state = "its last line may be torn (it is cut when the file is next opened)"
        what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or "write failed")
        msg = f"{what} while appending to {self.path}; {state}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(e.errno, msg)
        return OSError(e.errno, msg)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
