"""Stage ``clean``: the crawl store -> the one dataset every later stage reads.

1. Objects: the manifest's ``ok`` records grouped by SHA-256 (identical bytes are one object,
   however many URLs and classes found them), in a fixed order: by the class index, rank and URL
   of each object's first sighting, so the same crawl always gives the same array.
2. Analysis in isolated worker processes on every core (``crawl.isolate``): the bytes are checked
   against their hash, decoded safely, measured, pHashed and resized for the array in one pass.
   A crash or hang costs that file (``decoder_crash`` / ``decoder_timeout``).
3. Filters (``crawl.filters``), then near-duplicate clusters (``crawl.dedup``): the survivor of a
   cluster is the largest image, then the earliest.
4. Outputs, written to ``<out_dir>.tmp`` with ordinary file writes and renamed into place at the
   end: ``images.npy`` (N, S, S, 3) uint8, memory-mappable; ``kept.jsonl`` (line i describes row
   i: sha256, class, query, URL, ...); ``dropped.jsonl`` (reason per object); ``clusters.jsonl``;
   ``report.json``; ``sheets/*.png`` contact sheets of the drops by reason and of the largest
   duplicate clusters.

Resume: every analysed file is appended to ``<out_dir>.tmp/analysed/`` (``AnalysisCache``), keyed
by its SHA-256 and valid only for the same analysis settings. Ctrl-C, SIGTERM, a full disk or a
kill leave that folder and nothing else; the next run reads it and decodes only the rest. The
previous outputs stay untouched until the final rename. Nothing is written through a memory map
(a full disk under a map is SIGBUS, not an error): a failed write is an ``OutputError`` naming
the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import PIL
from tqdm import tqdm

from crawl.dedup import find_clusters, hex_to_array, near_pairs, thumb_distance
from crawl.filters import apply_filters
from crawl.images import SMALL, analyze_file
from crawl.isolate import IsolatedPool, default_workers
from crawl.manifest import latest_records
from crawl.settings import AnalyzeParams, DecodeLimits, FilterParams
from crawl.sheets import contact_sheet, grid
from kd3util import format_table, pick, write_json
from pipeline.artifacts.clean import CleanSet
from pipeline.artifacts.crawl import CrawlStore
from pipeline.config import CleanConfig

log = logging.getLogger(__name__)

DECODABLE_DROPS = ("too_small", "bad_aspect", "blank", "low_information", "near_duplicate")
CACHE_VERSION = 1  # bump when analyze_file's record changes, so old checkpoints are not reused
NOT_CACHED = ("missing_file", "sha_mismatch")  # these depend on the store, not on the bytes


class OutputError(OSError):
    """Writing an output (or the resume checkpoint) failed: a full disk, a file size limit."""

    def __str__(self) -> str:
        return str(self.strerror)


class CleanInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during clean; the analysed files are kept for the rerun (the CLI exits 128 + signum)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _writing(what: Path | str) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``what`` into an ``OutputError`` that names it."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(e.errno, f"{e.filename or what}: {e.strerror or e}") from e


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):  # one interrupt is enough: the clean-up must not be cut short
        signal.signal(s, signal.SIG_IGN)
    raise CleanInterrupted(signum)


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise ``CleanInterrupted`` (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (delivered, and raised, right after it)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class AnalysisCache:
    """What ``analyze_file`` said about each file, kept across interrupted runs.

    ``records.jsonl``: one line per analysed file (its SHA-256, the record and the slot of its
    pixels); ``pixels.bin``: per slot the packed image and the 16x16 thumbnail, raw. Pixels are
    written before the line that points at them, and both are fsynced in batches, so a kill
    leaves at worst a torn last line (cut at the next open) or pixels no line points at.
    ``params.json`` holds the fingerprint of the settings that shape a record; any other
    fingerprint discards the folder.
    """

    def __init__(self, folder: Path, params: AnalyzeParams) -> None:
        self.folder = folder
        self.size = params.image_size
        self.pixel_bytes = self.size * self.size * 3
        self.slot_bytes = self.pixel_bytes + SMALL * SMALL * 3
        key = {"version": CACHE_VERSION, "pillow": PIL.__version__, "params": dataclasses.asdict(params)}
        fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()
        meta = folder / "params.json"
        try:
            fresh = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint") != fingerprint
        except (OSError, ValueError, AttributeError):
            fresh = True
        with _writing(folder):
            if fresh:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                write_json(meta, {"fingerprint": fingerprint, **key})
            self._pixels = os.open(folder / "pixels.bin", os.O_RDWR | os.O_CREAT, 0o644)
            self.records = self._load(folder / "records.jsonl", os.fstat(self._pixels).st_size // self.slot_bytes)
            self._lines = os.open(folder / "records.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        slots = [r["slot"] for r in self.records.values() if r["slot"] is not None]
        self.slots = max(slots) + 1 if slots else 0  # the next free slot
        self.durable = len(self.records)  # records on disk, for the rerun
        self._pending: list[bytes] = []
        self._flushed = time.monotonic()

    def _load(self, path: Path, slots: int) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        if not path.exists():
            return records
        with open(path, "rb+") as f:
            good = 0
            for line in f:
                try:
                    rec = json.loads(line)
                    if not line.endswith(b"\n") or (rec["slot"] is not None and rec["slot"] >= slots):
                        raise ValueError("torn")
                except (ValueError, KeyError, TypeError):
                    break
                records[rec["sha256"]] = rec
                good += len(line)
            f.truncate(good)  # a line torn by a kill, and anything after it
        return records

    def reserve(self, count: int) -> None:
        """Allocate the disk space of ``count`` more slots now: a full disk fails here, before any decoding."""
        if not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(self._pixels, 0, (self.slots + count) * self.slot_bytes)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot reserve: write as we go
                raise OutputError(e.errno, f"{self.folder / 'pixels.bin'}: {e.strerror}") from e

    def get(self, sha256: str) -> dict[str, Any] | None:
        """The cached record of ``sha256`` (``value``, ``slot``), or None."""
        return self.records.get(sha256)

    def add(self, sha256: str, value: dict[str, Any], pixels: bytes | None, small: bytes | None) -> int | None:
        """Keep one analysed file; returns the slot of its pixels (None when it has none)."""
        slot = None
        if pixels is not None and small is not None:
            slot = self.slots
            with _writing(self.folder / "pixels.bin"):
                os.pwrite(self._pixels, pixels + small, slot * self.slot_bytes)
            self.slots += 1
        if value.get("reason") not in NOT_CACHED:
            rec = {"sha256": sha256, "slot": slot, "value": value}
            self.records[sha256] = rec
            self._pending.append((json.dumps(rec, ensure_ascii=False) + "\n").encode())
            if len(self._pending) >= 256:
                self.flush()
        return slot

    def flush_due(self) -> None:
        """``flush`` when the last one is a second old: called while the workers are busy."""
        if self._pending and time.monotonic() - self._flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        """Make the records added so far durable (pixels first, then the lines that point at them)."""
        self._flushed = time.monotonic()
        if not self._pending:
            return
        with _writing(self.folder / "pixels.bin"):
            os.fdatasync(self._pixels)
        data, self._pending = b"".join(self._pending), []
        with _writing(self.folder / "records.jsonl"):
            written = os.write(self._lines, data)
            if written < len(data):  # a short write: the disk is full (the torn tail is cut at the next open)
                os.write(self._lines, data[written:])
            os.fdatasync(self._lines)
        self.durable += data.count(b"\n")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, S, S, 3) packed images and (slots, 16, 16, 3) thumbnails, read from disk as needed."""
        self.flush()
        if self.slots == 0:
            raw = np.zeros((0, self.slot_bytes), dtype=np.uint8)
        else:
            raw = np.memmap(self.folder / "pixels.bin", dtype=np.uint8, mode="r", shape=(self.slots, self.slot_bytes))
        pixels = raw[:, : self.pixel_bytes].reshape(-1, self.size, self.size, 3)
        return pixels, raw[:, self.pixel_bytes :].reshape(-1, SMALL, SMALL, 3)

    def close(self) -> None:
        for fd in (self._pixels, self._lines):
            with contextlib.suppress(OSError):
                os.close(fd)


def collect_objects(store: CrawlStore) -> list[dict[str, Any]]:
    """One entry per stored object, with every (class, URL) that found it, in canonical order."""
    by_sha: dict[str, list[Any]] = defaultdict(list)
    for rec in latest_records(store.manifest).values():
        if rec.status == "ok" and rec.sha256 and rec.path:
            by_sha[rec.sha256].append(rec)
    objects = []
    for sha, recs in by_sha.items():
        recs.sort(key=lambda r: (r.class_index, r.rank, r.url))
        first = recs[0]
        classes = sorted({(r.class_index, r.class_name) for r in recs})
        objects.append(
            {
                "sha256": sha,
                "path": first.path,
                "class_name": first.class_name,
                "class_index": first.class_index,
                "query": first.query,
                "engine": first.engine,
                "rank": first.rank,
                "url": first.url,
                "classes": [name for _, name in classes],
                "num_urls": len(recs),
            }
        )
    objects.sort(key=lambda o: (o["class_index"], o["rank"], o["url"]))
    for i, o in enumerate(objects):
        o["i"] = i  # position: the "earliest" tie-break
    return objects


def run(cfg: CleanConfig, image_size: int) -> dict[str, Any]:
    """Clean the crawl into ``cfg.out_dir``; ``image_size``: the packed side (``config.resolve_image_size``)."""
    crawl_dir, out = Path(cfg.crawl_dir), Path(cfg.out_dir)
    store = CrawlStore.load(crawl_dir)
    objects = collect_objects(store)
    if not objects:
        raise ValueError(f"{crawl_dir}: the crawl has no downloaded images")
    tmp = out.with_name(out.name + ".tmp")
    size = image_size
    params = pick(AnalyzeParams, cfg, limits=pick(DecodeLimits, cfg), image_size=size)
    workers = cfg.workers or default_workers()
    with _interrupts_raise():
        for leftover in tmp.iterdir() if tmp.is_dir() else ():  # an earlier run's partial outputs
            if leftover.name != "analysed":
                _remove(leftover)
        cache = AnalysisCache(tmp / "analysed", params)
        try:
            report = _clean(cfg, store, objects, params, workers, cache, tmp)
        except BaseException as e:
            with contextlib.suppress(OSError):  # the disk may be full
                cache.flush()
            cache.close()
            kept = f"{cache.durable} analysed images are kept in {cache.folder} for the rerun"
            for leftover in tmp.iterdir():
                if leftover.name != "analysed":
                    _remove(leftover)
            if isinstance(e, CleanInterrupted):
                name = signal.Signals(e.signum).name
                raise CleanInterrupted(e.signum, f"{name}; {out} is unchanged; {kept}") from None
            if isinstance(e, OSError):
                raise OutputError(e.errno, f"{e}; {out} is unchanged; {kept}") from e
            raise
        cache.close()
        with _signals_held():  # the checkpoint goes and the outputs arrive in one step
            _remove(cache.folder)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    print(_table(report), file=sys.stderr)
    return report


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean(
    cfg: CleanConfig,
    store: CrawlStore,
    objects: list[dict[str, Any]],
    params: AnalyzeParams,
    workers: int,
    cache: AnalysisCache,
    tmp: Path,
) -> dict[str, Any]:
    """Steps 1-4 into ``tmp``; the caller renames it into place."""
    crawl_dir = Path(cfg.crawl_dir)
    started = time.time()

    # 1-2. analyse every object not in the checkpoint, in isolated workers
    todo, resumed = [], 0
    for o in objects:
        rec = cache.get(o["sha256"])
        if rec is None:
            todo.append(o)
        else:
            o.update(rec["value"], slot=rec["slot"])
            resumed += 1
    cache.reserve(len(todo))
    tasks = ((o["i"], (str(crawl_dir / o["path"]), params, o["sha256"])) for o in todo)
    bar = tqdm(
        total=len(objects),
        initial=resumed,
        desc="clean",
        unit="img",
        disable=not cfg.progress,
        file=sys.stderr,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    with IsolatedPool(analyze_file, workers, cfg.decode_timeout_s, cfg.worker_memory_mb << 20, chunk_size=16) as pool:
        for i, status, value in pool.imap_unordered(tasks, idle=cache.flush_due):
            if status == "ok":
                pixels, thumb = value.pop("pixels", None), value.pop("small", None)
                objects[i].update(value, slot=cache.add(objects[i]["sha256"], value, pixels, thumb))
            else:  # a crash or a timeout may not happen again: not kept in the checkpoint
                reason = {"crash": "decoder_crash", "timeout": "decoder_timeout"}.get(status, "decoder_error")
                objects[i].update(reason=reason, detail=str(value)[:200])
                log.warning("clean: %s %s (%s)", reason, objects[i]["path"], value)
            bar.update(1)
        replaced = pool.replaced
    bar.close()
    scratch, small = cache.arrays()
    analysed_s = time.time() - started

    # 3. filters, then near-duplicates among the survivors
    fp = pick(FilterParams, cfg)
    passed, dropped = apply_filters(objects, fp)
    hashes = hex_to_array([o["phash"] for o in passed])
    valid = np.array([o["std"] >= cfg.uniform_std for o in passed], dtype=bool)
    t0 = time.time()
    pairs = near_pairs(hashes, cfg.hamming, valid)
    search_s = time.time() - t0
    candidates = len(pairs)
    if cfg.verify_mad is not None:  # confirm each candidate on the colour thumbnails
        rows = np.array([o["slot"] for o in passed], dtype=np.int64)
        pairs = pairs[thumb_distance(pairs, small, rows) <= cfg.verify_mad]
    rank = [(-(o["width"] * o["height"]), o["i"]) for o in passed]  # largest survives, then earliest
    clusters = find_clusters(len(passed), pairs, rank)
    distance = {(int(a), int(b)): int(d) for a, b, d in pairs.tolist()}
    losers: dict[int, tuple[int, int | None]] = {}
    for members in clusters:
        for m in members[1:]:
            d = distance.get((min(m, members[0]), max(m, members[0])))
            losers[m] = (members[0], d)
    kept = []
    for n, o in enumerate(passed):
        if n in losers:
            survivor, d = losers[n]
            dropped.append({**o, "reason": "near_duplicate", "dup_of": passed[survivor]["sha256"], "distance": d})
        else:
            kept.append(o)

    # 4. outputs, with plain writes: a full disk is an error naming the file
    _write_images(tmp / "images.npy", scratch, [o["slot"] for o in kept])
    dropped.sort(key=lambda o: o["i"])
    drop_keys = (
        "sha256",
        "path",
        "class_name",
        "url",
        "reason",
        "detail",
        "dup_of",
        "distance",
        "width",
        "height",
        "phash",
    )
    with _writing(tmp / "dropped.jsonl"), open(tmp / "dropped.jsonl", "w", encoding="utf-8") as f:
        for o in dropped:
            f.write(json.dumps({k: o.get(k) for k in drop_keys if o.get(k) is not None}, ensure_ascii=False) + "\n")
    with _writing(tmp / "clusters.jsonl"), open(tmp / "clusters.jsonl", "w", encoding="utf-8") as f:
        for members in sorted(clusters, key=lambda g: (-len(g), rank[g[0]])):
            f.write(
                json.dumps(
                    {
                        "survivor": passed[members[0]]["sha256"],
                        "members": [{"sha256": passed[m]["sha256"], "distance": losers[m][1]} for m in members[1:]],
                    }
                )
                + "\n"
            )

    with _writing(tmp / "sheets"):
        _sheets(tmp / "sheets", dropped, clusters, passed, scratch, cfg.sheet_max)
    total_s = time.time() - started
    report = _report(objects, kept, dropped, clusters, workers, replaced, resumed, analysed_s, search_s, total_s)
    report["near_duplicate_candidates"] = candidates
    report["near_duplicate_pairs_verified"] = len(pairs)
    with _writing(f"{tmp}/kept.jsonl or report.json"):
        CleanSet.save_index(tmp, kept, report, store.classes)
    return report


def _write_images(path: Path, scratch: np.ndarray, slots: list[int]) -> None:
    """``images.npy`` from the checkpoint's rows, written in blocks (no memory map: see the module docstring)."""
    size = scratch.shape[1]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    with _writing(path), open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(slots), size, size, 3)})
        for start in range(0, len(slots), 1024):
            f.write(np.ascontiguousarray(scratch[slots[start : start + 1024]]).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _sheets(
    folder: Path,
    dropped: list[dict[str, Any]],
    clusters: list[list[int]],
    passed: list[dict[str, Any]],
    scratch: np.ndarray,
    limit: int,
) -> None:
    if limit <= 0:
        return
    by_reason: dict[str, list[tuple[np.ndarray, str]]] = defaultdict(list)
    for o in dropped:
        if o["reason"] in DECODABLE_DROPS and len(by_reason[o["reason"]]) < limit:
            by_reason[o["reason"]].append((scratch[o["slot"]], o["class_name"]))
    for reason, items in by_reason.items():
        contact_sheet(grid(items), folder / f"dropped_{reason}.png", title=f"dropped: {reason}", outline_first=False)
    rows = []
    for members in sorted(clusters, key=len, reverse=True)[: max(1, limit // 8)]:
        rows.append([(scratch[passed[m]["slot"]], passed[m]["class_name"]) for m in members[:12]])
    if rows:
        contact_sheet(rows, folder / "duplicates.png", title="largest near-duplicate clusters (survivor outlined)")


def _report(
    objects: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    dropped: list[dict[str, Any]],
    clusters: list[list[int]],
    workers: int,
    replaced: int,
    resumed: int,
    analysed_s: float,
    search_s: float,
    total_s: float,
) -> dict[str, Any]:
    classes: dict[str, dict[str, Any]] = {}
    for o in objects:
        c = classes.setdefault(
            o["class_name"], {"index": o["class_index"], "objects": 0, "kept": 0, "dropped": Counter()}
        )
        c["objects"] += 1
    for o in kept:
        classes[o["class_name"]]["kept"] += 1
    for o in dropped:
        classes[o["class_name"]]["dropped"][o["reason"]] += 1
    reasons = Counter(o["reason"] for o in dropped)
    warnings = Counter(w for o in objects for w in o.get("warnings") or [])
    return {
        "objects": len(objects),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": dict(reasons.most_common()),
        "warnings": dict(warnings),
        "near_duplicate_clusters": len(clusters),
        "classes": [
            {"name": name, **{k: (dict(v.most_common()) if isinstance(v, Counter) else v) for k, v in c.items()}}
            for name, c in sorted(classes.items(), key=lambda kv: kv[1]["index"])
        ],
        "workers": workers,
        "workers_replaced": replaced,
        "resumed": resumed,  # objects whose analysis an interrupted run had already done
        "analysis_seconds": round(analysed_s, 2),
        "images_per_second": round((len(objects) - resumed) / max(analysed_s, 1e-9), 1),
        "dedup_search_seconds": round(search_s, 3),
        "seconds": round(total_s, 2),
    }


def _table(report: dict[str, Any]) -> str:
    reasons = list(report["dropped_by_reason"])
    rows: list[list[Any]] = [["class", "objects", "kept", *reasons]]
    for c in report["classes"]:
        rows.append([c["name"][:30], c["objects"], c["kept"], *(c["dropped"].get(r, 0) for r in reasons)])
    rows.append(["TOTAL", report["objects"], report["kept"], *(report["dropped_by_reason"][r] for r in reasons)])
    r = report
    resumed = f" ({r['resumed']} resumed from an interrupted run)" if r["resumed"] else ""
    tail = (
        f"clean: kept {r['kept']} of {r['objects']} images, {r['near_duplicate_clusters']} duplicate clusters; "
        f"analysis {r['images_per_second']} images/s on {r['workers']} workers{resumed}, "
        f"near-duplicate search {r['dedup_search_seconds']} s"
    )
    return format_table(rows, rules=(1, -1)) + "\n" + tail
