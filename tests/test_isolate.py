"""Isolated workers: a crash, a hang or a memory blow-up costs one item."""

from __future__ import annotations

import os
import time

import pytest

from crawl.isolate import IsolatedPool


def job(x: int) -> int:
    if x == 3:
        os._exit(7)  # a segfaulting decoder
    if x == 5:
        time.sleep(60)  # a hung decoder
    if x == 7:
        raise ValueError("bad item")
    if x == 9:
        os.abort()
    if x == 11:
        bytearray(1 << 33)  # 8 GiB: over the worker's memory limit
    return x * x


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_crash_hang_error_and_oom_each_cost_one_item(chunk_size: int) -> None:
    t0 = time.monotonic()
    with IsolatedPool(job, workers=2, timeout_s=1.0, memory_limit_bytes=512 << 20, chunk_size=chunk_size) as pool:
        results = {k: (status, value) for k, status, value in pool.imap_unordered((i, (i,)) for i in range(14))}
        replaced = pool.replaced
    assert time.monotonic() - t0 < 30
    assert results[3][0] == "crash" and "code 7" in results[3][1]
    assert results[5][0] == "timeout"
    assert results[7] == ("error", "ValueError: bad item")
    assert results[9][0] == "crash"
    assert results[11][0] == "error" and "MemoryError" in results[11][1]
    ok = {k: v for k, (s, v) in results.items() if s == "ok"}
    assert ok == {i: i * i for i in range(14) if i not in (3, 5, 7, 9, 11)}
    assert replaced == (3 if chunk_size == 1 else 6)  # two crashes and a hang (each twice when chunked)


def test_empty_input_and_reuse() -> None:
    with IsolatedPool(job, workers=2) as pool:
        assert list(pool.imap_unordered([])) == []
        assert sorted(v for _, _, v in pool.imap_unordered((i, (i,)) for i in (1, 2))) == [1, 4]
