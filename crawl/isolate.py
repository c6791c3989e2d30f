"""Worker processes in which a crash or a hang costs one item, never the stage.

``IsolatedPool(fn, workers, timeout_s).imap_unordered(tasks)`` runs ``fn(*args)`` for each
``(key, args)`` task, one task per worker at a time, and yields ``(key, status, value)`` with
status ``ok`` (``value`` = the result), ``error`` (``fn`` raised; ``value`` = the message),
``crash`` (the worker died: a segfault, ``os._exit``, the kernel's OOM killer) or ``timeout``
(the worker was killed after ``timeout_s``). A dead or killed worker is replaced at once.

Why not ``ProcessPoolExecutor``: one dying worker breaks the whole pool and every pending future
with it, and a hung task cannot be cancelled. Here each worker has its own pipe, so the parent
always knows which items a dead worker was holding. Workers get an address-space limit, so a
decompression bomb that slips past the header checks fails inside the worker.

Tasks travel in chunks of ``chunk_size`` (one pipe round trip per chunk, not per item). When a
chunk's worker crashes or hangs, its items are run again one per message, so the failure is
pinned on the one item that caused it and the others still succeed.

Workers die with their parent, even one killed with ``kill -9``: on Linux the kernel sends them
SIGKILL (``PR_SET_PDEATHSIG``; it fires when the thread that started the worker ends, so use a
pool from the thread that owns it); elsewhere a thread in the worker watches the parent's pid.
Each worker closes the pipe ends it inherited but does not use, so a worker waiting for work
reads end-of-file as soon as the parent is gone. Workers ignore SIGINT: Ctrl-C reaches the whole
process group, and the parent, not each worker, decides how the run stops.
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from multiprocessing.connection import Connection, wait
from typing import Any


def _current_vm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """Make sure this worker cannot outlive the parent (a ``kill -9`` of the parent included)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:  # the parent died before the signal was armed
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _worker_main(
    fn: Callable[..., Any],
    conn: Connection,
    memory_limit: int | None,
    parent_pid: int,
    inherited: list[Connection],
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the process group; the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited by fork
    if hasattr(signal, "pthread_sigmask"):  # blocked by _spawn across the fork
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _die_with_parent(parent_pid)
    for c in inherited:  # the parent's ends of this and the other workers' pipes
        c.close()
    faulthandler.disable()  # a crashing decoder is expected here: the parent reports it in one line
    if memory_limit:
        limit = _current_vm_bytes() + memory_limit  # on top of what the forked parent already maps
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        results = []
        for key, args in msg:
            try:
                out: tuple[str, Any] = ("ok", fn(*args))
            except MemoryError:
                out = ("error", "MemoryError: worker memory limit reached")
            except Exception as e:  # the item failed; the worker lives on
                out = ("error", f"{type(e).__name__}: {e}"[:2000])
            results.append((key, out))
        conn.send(results)


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    task: list[tuple[Any, Any]] | None = None  # the chunk in flight
    started: float = 0.0


class IsolatedPool:
    """See the module docstring. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        fn: Callable[..., Any],
        workers: int,
        timeout_s: float = 10.0,
        memory_limit_bytes: int | None = None,
        chunk_size: int = 1,
    ) -> None:
        self.fn = fn
        self.chunk_size = max(1, chunk_size)
        self.num_workers = max(1, workers)
        self.timeout_s = timeout_s
        self.memory_limit = memory_limit_bytes
        methods = mp.get_all_start_methods()
        self.ctx: Any = mp.get_context("fork" if "fork" in methods else "spawn")
        self.workers: list[_Worker] = []
        self.replaced = 0  # workers restarted after a crash or timeout

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        inherited = []  # a forked worker holds copies of every pipe end the parent has open
        if self.ctx.get_start_method() == "fork":
            inherited = [parent, *(w.conn for w in self.workers if not w.conn.closed)]
        args = (self.fn, child, self.memory_limit, os.getpid(), inherited)
        proc = self.ctx.Process(target=_worker_main, args=args, daemon=True)
        # until the worker has its own handlers, a Ctrl-C must not run the parent's in it
        masked = hasattr(signal, "pthread_sigmask")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if masked else set()
        try:
            proc.start()
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
        return _Worker(proc, parent)

    def _kill(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5)
        w.conn.close()

    def imap_unordered(
        self, tasks: Iterable[tuple[Any, tuple[Any, ...]]], idle: Callable[[], None] | None = None
    ) -> Iterator[tuple[Any, str, Any]]:
        """Results as they come; ``idle()`` is called before each wait for workers, at least once a second."""
        it = iter(tasks)
        singles: deque[tuple[Any, Any]] = deque()  # items of a failed chunk, re-run one at a time
        while len(self.workers) < self.num_workers:
            self.workers.append(self._spawn())

        def feed(w: _Worker) -> None:
            chunk = [singles.popleft()] if singles else list(islice(it, self.chunk_size))
            w.task = chunk or None
            if chunk:
                w.started = time.monotonic()
                w.conn.send(chunk)

        def failed(i: int, w: _Worker, status: str, why: str) -> Iterator[tuple[Any, str, Any]]:
            chunk = w.task or []
            self._replace(i, w)
            if len(chunk) == 1:
                yield chunk[0][0], status, why
            else:  # cannot tell which item did it: isolate each
                singles.extend(chunk)
            feed(self.workers[i])

        for w in self.workers:
            feed(w)
        while any(w.task is not None for w in self.workers):
            busy = [w for w in self.workers if w.task is not None]
            deadline = min(w.started + self.timeout_s * len(w.task or ()) for w in busy)
            timeout = max(0.0, deadline - time.monotonic())
            if idle is not None:
                idle()
                timeout = min(timeout, 1.0)
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=timeout)
            for i, w in enumerate(list(self.workers)):
                if w.task is None:
                    continue
                if w.conn in ready:
                    try:
                        results = w.conn.recv()
                    except (EOFError, OSError):
                        yield from failed(i, w, "crash", f"worker exited with code {w.proc.exitcode}")
                        continue
                    yield from ((key, status, value) for key, (status, value) in results)
                    feed(w)
                elif w.proc.sentinel in ready:
                    w.proc.join(1)
                    yield from failed(i, w, "crash", f"worker exited with code {w.proc.exitcode}")
                elif time.monotonic() - w.started > self.timeout_s * len(w.task):
                    yield from failed(i, w, "timeout", f"no result after {self.timeout_s:g} s")

    def _replace(self, i: int, w: _Worker) -> None:
        self._kill(w)
        self.workers[i] = self._spawn()
        self.replaced += 1

    def close(self, wait: bool = True) -> None:
        """Stop every worker: ask each to finish (``wait``), or kill them at once (an interrupt, an error)."""
        if wait:
            for w in self.workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            for w in self.workers:
                w.proc.join(2)
        for w in self.workers:
            self._kill(w)
        self.workers = []

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(wait=exc_type is None)


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
