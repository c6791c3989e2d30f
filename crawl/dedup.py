"""Near-duplicate search over perceptual hashes that stays fast at a million images.

Exact duplicates never reach this module: the crawl store is content-addressed, so identical
bytes are one object. Perceptual duplicates are found with **multi-index hashing** (Norouzi et
al., CVPR 2012): split each B-bit hash into m = B/16 chunks of 16 bits. If two hashes differ in at
most t bits, then by the pigeonhole principle some chunk differs in at most r = floor(t / m) bits.
So for every chunk we bucket the hashes by that chunk's value and compare each hash only with the
buckets within Hamming radius r of its own chunk (r = 1 for 64-bit hashes and t <= 7: 17 buckets).
Candidate pairs are generated, XORed and bit-counted in NumPy batches, never in a Python loop over
pairs, and each candidate pair is generated once per chunk (i < j within a bucket; one orientation
across buckets). Expected work for n uniform 64-bit hashes is about 17 * n^2 / 2^15 candidate
checks: ~5e8 at n = 1e6, i.e. seconds, against 5e11 for all pairs.

A hash match alone is a weak signal on small, similar-looking images (the demo's product shots of
one class share their pHash bits often), so ``thumb_distance`` then checks each candidate pair on
16x16 colour thumbnails: a re-upload (re-encoded, resized, slightly cropped) stays within a few
grey levels per pixel, two different photos do not. ``benchmarks/dedup_quality.py`` measures both
against the demo world's ground truth. ``find_clusters`` joins the pairs with union-find and picks
one survivor per cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import combinations

import numpy as np

BATCH = 1 << 22  # candidate pairs checked per NumPy batch (~100 MB of temporaries)


def hex_to_array(hex_hashes: Sequence[str]) -> np.ndarray:
    """imagehash hex strings (all the same length, a multiple of 16) -> (n, words) uint64."""
    if not hex_hashes:
        return np.zeros((0, 1), dtype=np.uint64)
    width = len(hex_hashes[0])
    if width % 16 or any(len(h) != width for h in hex_hashes):
        raise ValueError("hashes must all have the same number of bits, a multiple of 64")
    words = width // 16
    out = np.empty((len(hex_hashes), words), dtype=np.uint64)
    for w in range(words):
        out[:, w] = [int(h[16 * w : 16 * (w + 1)], 16) for h in hex_hashes]
    return out


def _flips(radius: int) -> list[int]:
    """All 16-bit masks with at most ``radius`` bits set (0 first)."""
    masks = [0]
    for k in range(1, radius + 1):
        for bits in combinations(range(16), k):
            masks.append(sum(1 << b for b in bits))
    return masks


def _expand(query: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Split the ranges [lo, hi) of sorted positions into batches of about ``BATCH`` candidates.

    Yields (queries, range sizes, positions): ``positions`` lists each query's range in turn.
    """
    sizes = hi - lo
    keep = sizes > 0
    query, lo, sizes = query[keep], lo[keep], sizes[keep]
    if not len(query):
        return
    ends = np.cumsum(sizes)
    start = 0
    while start < len(query):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + BATCH, side="right")), start + 1)
        q, lo_b, s = query[start:stop], lo[start:stop], sizes[start:stop]
        total = int(ends[stop - 1] - base)
        # positions lo..hi-1 of every query, concatenated: an arange shifted per range
        pos = np.arange(total, dtype=np.int64) + np.repeat(lo_b - (np.cumsum(s) - s), s)
        yield q, s, pos
        start = stop


def near_pairs(hashes: np.ndarray, threshold: int, valid: np.ndarray | None = None) -> np.ndarray:
    """All pairs (i, j, distance), i < j, whose Hamming distance is at most ``threshold``.

    ``hashes`` is (n, words) uint64; ``valid`` (n,) bool excludes hashes from matching (for
    example near-uniform images, whose hashes collide by construction). Returns (k, 3) int64.
    """
    n, words = hashes.shape
    idx_all = np.arange(n, dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
    if len(idx_all) < 2:
        return np.zeros((0, 3), dtype=np.int64)
    h = np.ascontiguousarray(hashes[idx_all])
    chunks = h.view(np.uint16).reshape(len(h), words * 4)  # (n, m) 16-bit chunks
    m = chunks.shape[1]
    flips = _flips(threshold // m)
    flat = h[:, 0] if words == 1 else h  # 1-D is much faster to gather and count
    found: list[np.ndarray] = []
    for c in range(m):
        vals = chunks[:, c].astype(np.int64)
        order = np.argsort(vals, kind="stable")  # within a bucket, indices stay increasing
        by_chunk = flat[order]  # hashes in bucket order: each range is a contiguous slice
        bounds = np.zeros(65537, dtype=np.int64)
        bounds[1:] = np.cumsum(np.bincount(vals, minlength=65536))
        where = np.empty(len(vals), dtype=np.int64)
        where[order] = np.arange(len(vals))
        for f in flips:
            if f == 0:  # same bucket: partners after me in sorted order
                query = np.arange(len(vals), dtype=np.int64)
                lo, hi = where + 1, bounds[vals + 1]
            else:  # a bucket at distance popcount(f): one orientation per pair
                partner = vals ^ f
                query = np.flatnonzero(vals < partner)
                lo, hi = bounds[partner[query]], bounds[partner[query] + 1]
            for q, sizes, pos in _expand(query, lo, hi):
                x = np.repeat(flat[q], sizes, axis=0) ^ by_chunk[pos]
                dist = np.bitwise_count(x) if words == 1 else np.bitwise_count(x).sum(axis=1)
                hit = np.flatnonzero(dist <= threshold)
                if len(hit):
                    owner = np.searchsorted(np.cumsum(sizes), hit, side="right")  # which query each hit is
                    a, b = q[owner], order[pos[hit]]
                    found.append(np.stack([np.minimum(a, b), np.maximum(a, b), dist[hit].astype(np.int64)], axis=1))
    if not found:
        return np.zeros((0, 3), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)  # a pair close in several chunks is found once each
    pairs[:, 0] = idx_all[pairs[:, 0]]
    pairs[:, 1] = idx_all[pairs[:, 1]]
    return pairs


def thumb_distance(pairs: np.ndarray, thumbs: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Mean absolute difference (grey levels) between the thumbnails of each pair.

    ``thumbs`` is (N, s, s, 3) uint8, any array indexable by row (a memmap: only the rows of the
    pairs are read); pair members index it through ``rows`` when given.
    """
    mads = np.empty(len(pairs))
    for s in range(0, len(pairs), 65536):
        a, b = pairs[s : s + 65536, 0], pairs[s : s + 65536, 1]
        if rows is not None:
            a, b = rows[a], rows[b]
        diff = np.asarray(thumbs[a], dtype=np.int16) - np.asarray(thumbs[b], dtype=np.int16)
        mads[s : s + 65536] = np.abs(diff).reshape(len(a), -1).mean(axis=1)
    return mads


def brute_force_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Reference: every pair checked (O(n^2)); for tests and small inputs."""
    n = len(hashes)
    out = []
    for i in range(n - 1):
        d = np.bitwise_count(hashes[i + 1 :] ^ hashes[i]).sum(axis=1)
        for j in np.flatnonzero(d <= threshold):
            out.append((i, i + 1 + j, int(d[j])))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def find_clusters(n: int, pairs: np.ndarray, rank: Sequence[tuple]) -> list[list[int]]:
    """Union-find over ``pairs``; clusters of 2+ members, each sorted with its survivor first.

    ``rank[i]`` orders members: the smallest rank survives (callers pass ``(-area, order)`` so the
    largest image wins, then the earliest).
    """
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in {int(x) for x in pairs[:, :2].ravel()}:
        groups.setdefault(root(i), []).append(i)
    clusters = [sorted(g, key=lambda i: rank[i]) for g in groups.values() if len(g) > 1]
    return sorted(clusters, key=lambda g: rank[g[0]])
