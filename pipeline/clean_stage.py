"""Stage ``clean``: the crawl store -> the one dataset every later stage reads.

1. Objects: the manifest's ``ok`` records grouped by SHA-256 (identical bytes are one object,
   however many URLs and classes found them), in a fixed order: by the class index, rank and URL
   of each object's first sighting, so the same crawl always gives the same array.
2. Analysis in isolated worker processes on every core (``crawl.isolate``): the bytes are checked
   against their hash, decoded safely, measured, pHashed and resized for the array in one pass.
   A crash or hang costs that file (``decoder_crash`` / ``decoder_timeout``).
3. Filters (``crawl.filters``), then near-duplicate clusters (``crawl.dedup``): the survivor of a
   cluster is the largest image, then the earliest.
4. Outputs, written to ``<out_dir>.tmp`` and renamed into place at the end:
   ``images.npy`` (N, S, S, 3) uint8, memory-mappable; ``kept.jsonl`` (line i describes row i:
   sha256, class, query, URL, ...); ``dropped.jsonl`` (reason per object); ``clusters.jsonl``;
   ``report.json``; ``sheets/*.png`` contact sheets of the drops by reason and of the largest
   duplicate clusters.

The stage is not resumable; it is cheap to re-run (the report gives images/s), and an interrupted
run leaves the previous outputs untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from crawl.dedup import find_clusters, hex_to_array, near_pairs, thumb_distance
from crawl.filters import FilterParams, apply_filters
from crawl.images import SMALL, AnalyzeParams, DecodeLimits, analyze_file
from crawl.isolate import IsolatedPool, default_workers
from crawl.manifest import latest_records
from crawl.sheets import contact_sheet, grid
from kd3util import format_table
from pipeline.artifacts.clean import CleanSet
from pipeline.artifacts.crawl import CrawlStore
from pipeline.config import CleanConfig

log = logging.getLogger(__name__)

DECODABLE_DROPS = ("too_small", "bad_aspect", "blank", "low_information", "near_duplicate")


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
        o["i"] = i  # position: row of the scratch array, and the "earliest" tie-break
    return objects


def run(cfg: CleanConfig, image_size: int) -> dict[str, Any]:
    """Clean the crawl into ``cfg.out_dir``; ``image_size``: the packed side (``config.resolve_image_size``)."""
    crawl_dir, out = Path(cfg.crawl_dir), Path(cfg.out_dir)
    store = CrawlStore.load(crawl_dir)
    objects = collect_objects(store)
    if not objects:
        raise ValueError(f"{crawl_dir}: the crawl has no downloaded images")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = image_size
    params = AnalyzeParams(
        limits=DecodeLimits(tuple(cfg.formats), cfg.max_bytes, cfg.max_pixels, cfg.max_frames),
        hash_size=cfg.hash_size,
        image_size=size,
        resize=cfg.resize,
    )
    workers = cfg.workers or default_workers()
    started = time.time()

    # 1-2. analyse every object in isolated workers; pixels go straight to a scratch memmap
    scratch = np.lib.format.open_memmap(
        tmp / "scratch.npy", mode="w+", dtype=np.uint8, shape=(len(objects), size, size, 3)
    )
    small = np.lib.format.open_memmap(
        tmp / "small.npy", mode="w+", dtype=np.uint8, shape=(len(objects), SMALL, SMALL, 3)
    )
    tasks = ((i, (str(crawl_dir / o["path"]), params, o["sha256"])) for i, o in enumerate(objects))
    bar = tqdm(
        total=len(objects),
        desc="clean",
        unit="img",
        disable=not cfg.progress,
        file=sys.stderr,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    with IsolatedPool(analyze_file, workers, cfg.decode_timeout_s, cfg.worker_memory_mb << 20, chunk_size=16) as pool:
        for i, status, value in pool.imap_unordered(tasks):
            if status == "ok":
                pixels, thumb = value.pop("pixels", None), value.pop("small", None)
                if pixels is not None:
                    scratch[i] = np.frombuffer(pixels, dtype=np.uint8).reshape(size, size, 3)
                    small[i] = np.frombuffer(thumb, dtype=np.uint8).reshape(SMALL, SMALL, 3)
                objects[i].update(value)
            else:
                reason = {"crash": "decoder_crash", "timeout": "decoder_timeout"}.get(status, "decoder_error")
                objects[i].update(reason=reason, detail=str(value)[:200])
                log.warning("clean: %s %s (%s)", reason, objects[i]["path"], value)
            bar.update(1)
        replaced = pool.replaced
    bar.close()
    analysed_s = time.time() - started

    # 3. filters, then near-duplicates among the survivors
    fp = FilterParams(cfg.min_side, cfg.max_aspect, cfg.min_std, cfg.min_entropy)
    passed, dropped = apply_filters(objects, fp)
    hashes = hex_to_array([o["phash"] for o in passed])
    valid = np.array([o["std"] >= cfg.uniform_std for o in passed], dtype=bool)
    t0 = time.time()
    pairs = near_pairs(hashes, cfg.hamming, valid)
    search_s = time.time() - t0
    candidates = len(pairs)
    if cfg.verify_mad is not None:  # confirm each candidate on the colour thumbnails
        rows = np.array([o["i"] for o in passed], dtype=np.int64)
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

    # 4. outputs
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(kept), size, size, 3))
    for row, o in enumerate(kept):
        images[row] = scratch[o["i"]]
    images.flush()
    del images
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
    with open(tmp / "dropped.jsonl", "w", encoding="utf-8") as f:
        for o in dropped:
            f.write(json.dumps({k: o.get(k) for k in drop_keys if o.get(k) is not None}, ensure_ascii=False) + "\n")
    with open(tmp / "clusters.jsonl", "w", encoding="utf-8") as f:
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

    _sheets(tmp / "sheets", dropped, clusters, passed, scratch, cfg.sheet_max)
    report = _report(objects, kept, dropped, clusters, workers, replaced, analysed_s, search_s, time.time() - started)
    report["near_duplicate_candidates"] = candidates
    report["near_duplicate_pairs_verified"] = len(pairs)
    CleanSet.save_index(tmp, kept, report, store.classes)
    del scratch, small
    (tmp / "scratch.npy").unlink()
    (tmp / "small.npy").unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(_table(report), file=sys.stderr)
    return report


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
            by_reason[o["reason"]].append((scratch[o["i"]], o["class_name"]))
    for reason, items in by_reason.items():
        contact_sheet(grid(items), folder / f"dropped_{reason}.png", title=f"dropped: {reason}", outline_first=False)
    rows = []
    for members in sorted(clusters, key=len, reverse=True)[: max(1, limit // 8)]:
        rows.append([(scratch[passed[m]["i"]], passed[m]["class_name"]) for m in members[:12]])
    if rows:
        contact_sheet(rows, folder / "duplicates.png", title="largest near-duplicate clusters (survivor outlined)")


def _report(
    objects: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    dropped: list[dict[str, Any]],
    clusters: list[list[int]],
    workers: int,
    replaced: int,
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
        "analysis_seconds": round(analysed_s, 2),
        "images_per_second": round(len(objects) / max(analysed_s, 1e-9), 1),
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
    tail = (
        f"clean: kept {r['kept']} of {r['objects']} images, {r['near_duplicate_clusters']} duplicate clusters; "
        f"analysis {r['images_per_second']} images/s on {r['workers']} workers, "
        f"near-duplicate search {r['dedup_search_seconds']} s"
    )
    return format_table(rows, rules=(1, -1)) + "\n" + tail
