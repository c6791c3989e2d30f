"""Content-addressed image store: ``objects/<sha[:2]>/<sha256>.<ext>``, written atomically.

Every object is streamed to ``tmp/<random>.part`` and renamed into place only once complete and
fsynced, so a kill at any moment never leaves a torn file under a final name; leftover ``.part``
files are swept when the store is opened. Identical bytes from any number of URLs are stored once.
A lock file stops two crawls from writing one store at the same time (released by the OS on kill -9).
The lock is taken before anything else is created or written, so a refused second crawl leaves the
folder exactly as the first one has it; opening a store that this object already holds just nests.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from pathlib import Path
from typing import IO


class StoreLockedError(RuntimeError):
    """Another process holds the store's lock."""


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing an object."""


class ObjectStore:
    """An image store rooted at ``root`` (``objects/``, ``tmp/``, ``.lock``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self._lock_fd: int | None = None
        self._depth = 0  # nested open() calls on this object (the lock is held once)

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> ObjectStore:
        """Take the lock (fail fast if held), then create folders and sweep stale temp files."""
        if self._lock_fd is not None:
            self._depth += 1
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLockedError(f"{self.root}: another crawl is using this store (pid {holder})") from None
        self._lock_fd = fd
        self._depth = 1
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.objects_dir.mkdir(exist_ok=True)
            self.tmp_dir.mkdir(exist_ok=True)
        except BaseException:
            self.close()
            raise
        for stale in self.tmp_dir.glob("*.part"):
            stale.unlink(missing_ok=True)
        return self

    def close(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        self._depth = 0
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ObjectStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- objects --------------------------------------------------------------------------
    def path_for(self, sha256: str, ext: str) -> Path:
        return self.objects_dir / sha256[:2] / f"{sha256}.{ext}"

    def new_temp(self) -> tuple[Path, IO[bytes]]:
        """A fresh temp file open for writing (the caller commits or discards it)."""
        path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        return path, open(path, "wb")  # noqa: SIM115 (closed by commit/discard)

    def commit(self, tmp_path: Path, fh: IO[bytes], sha256: str, ext: str) -> Path:
        """fsync and rename the temp file to its content address; drop it if the object exists."""
        final = self.path_for(sha256, ext)
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            if final.exists():
                tmp_path.unlink(missing_ok=True)
                return final
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp_path, final)
        except OSError as e:
            self.discard(tmp_path, fh)
            raise _as_disk_full(e, final) from e
        return final

    @staticmethod
    def discard(tmp_path: Path, fh: IO[bytes]) -> None:
        try:
            fh.close()
        except OSError:
            pass
        tmp_path.unlink(missing_ok=True)


def _as_disk_full(e: OSError, where: Path) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(e.errno, f"disk full at {where}")
    return e
