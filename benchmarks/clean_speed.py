"""Clean-stage speed against imagededup: hashing throughput and near-duplicate search time.

1. Hashing: the same folder of images through imagededup's ``PHash.encode_images`` and through
   our per-image analysis (``crawl.images.analyze_file`` in ``crawl.isolate`` workers: safe decode,
   SHA check, statistics, pHash, two resizes), both on every core. Two folders: the demo crawl's
   images (small, 32-160 px) and the same images re-saved as web-size JPEGs (640 px).
2. Search: n = 1e4, 1e5, 1e6 64-bit hashes (real pHashes of the demo images plus random hashes
   with planted near-duplicates) through imagededup's ``find_duplicates`` (its default
   ``brute_force_cython``) and our multi-index search (``crawl.dedup.near_pairs``), same
   threshold; imagededup is skipped where its measured O(n^2) scaling predicts more than 10
   minutes. Where both ran, the pair sets are compared (recall of each against the other).

Needs the demo's crawl store (``data/crawl``; ``data/clean`` adds its real pHashes to the search),
so run ``make demo`` first, and imagededup for the comparison column (``pip install -e '.[bench]'``;
without it only our side runs). Only imagededup's hashing module is used, which downloads nothing
(its CNN module fetches MobileNet weights only when a ``CNN`` is built). Run from the repository root:

    .venv/bin/python benchmarks/clean_speed.py      # about a minute on 2 cores
    .venv/bin/python benchmarks/clean_speed.py --images 300 --sizes 10000 --out benchmarks/out/clean_speed.md

The table goes to ``benchmarks/results/clean_speed.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import default_out, report, require  # noqa: E402

from crawl.dedup import hex_to_array, near_pairs  # noqa: E402
from crawl.images import AnalyzeParams, analyze_file  # noqa: E402
from crawl.isolate import IsolatedPool, default_workers  # noqa: E402

LIMIT_S = 600.0
INSTALL = "pip install -e '.[bench]'"


def ours_hash(files: list[Path]) -> tuple[float, dict[str, str]]:
    params = AnalyzeParams()
    t0 = time.perf_counter()
    out = {}
    with IsolatedPool(analyze_file, default_workers(), 30.0, chunk_size=16) as pool:
        for key, status, value in pool.imap_unordered((f.name, (str(f), params)) for f in files):
            if status == "ok" and value.get("phash"):
                out[key] = value["phash"]
    return time.perf_counter() - t0, out


def imagededup_hash(folder: Path) -> tuple[float, dict[str, str]]:
    from imagededup.methods.hashing import PHash

    hasher = PHash(verbose=False)
    t0 = time.perf_counter()
    enc = hasher.encode_images(image_dir=str(folder), num_enc_workers=default_workers())
    return time.perf_counter() - t0, {k: v for k, v in enc.items() if v}


def web_size_copy(files: list[Path], folder: Path, side: int = 640) -> list[Path]:
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                scale = side / max(im.size)
                big = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
        except Exception:
            continue
        p = folder / (f.stem + ".jpg")
        big.save(p, "JPEG", quality=90)
        out.append(p)
    return out


def hashing_table(crawl_dir: Path, limit: int, compare: bool) -> list[str]:
    src = sorted(p for p in (crawl_dir / "objects").rglob("*") if p.is_file())[:limit]
    lines = ["| images | n | imagededup PHash img/s | ours img/s | ratio |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="kd3-hash-") as tmp:
        small_dir, web_dir = Path(tmp) / "small", Path(tmp) / "web"
        small_dir.mkdir()
        web_dir.mkdir()
        small = []
        for f in src:  # imagededup wants one flat folder
            shutil.copy(f, small_dir / f.name)
            small.append(small_dir / f.name)
        web = web_size_copy(small, web_dir)
        for name, folder, files in (
            ("demo crawl (32-160 px)", small_dir, small),
            ("web-size JPEG (640 px)", web_dir, web),
        ):
            t_ours, enc_ours = ours_hash(files)
            r_ours = len(enc_ours) / t_ours
            if not compare:
                lines.append(f"| {name} | {len(files)} | skipped | {r_ours:.0f} | – |")
                continue
            t_idd, enc_idd = imagededup_hash(folder)
            r_idd = len(enc_idd) / t_idd
            lines.append(f"| {name} | {len(files)} | {r_idd:.0f} | {r_ours:.0f} | {r_ours / r_idd:.2f}x |")
    return lines


def make_hashes(n: int, real: list[str], rng: np.random.Generator, threshold: int) -> np.ndarray:
    """Real pHashes first, then random ones; 5% of the random ones are near copies of another."""
    h = np.empty((n, 1), dtype=np.uint64)
    k = min(len(real), n)
    h[:k] = hex_to_array(real[:k])
    h[k:, 0] = rng.integers(0, 2**63, size=n - k, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    for _ in range((n - k) // 20):
        i, j = rng.integers(0, n, size=2)
        x = int(h[i, 0])
        for b in rng.choice(64, size=int(rng.integers(0, threshold + 1)), replace=False):
            x ^= 1 << int(b)
        h[j, 0] = np.uint64(x)
    return h


def imagededup_pairs(hashes: np.ndarray, threshold: int) -> tuple[float, set[tuple[int, int]]]:
    from imagededup.methods.hashing import PHash

    enc = {str(i): f"{int(v):016x}" for i, v in enumerate(hashes[:, 0])}
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # it warns that its default worker count does not apply to given hashes
        warnings.filterwarnings("ignore", "Parameter num_enc_workers has no effect", RuntimeWarning)
        found = PHash(verbose=False).find_duplicates(encoding_map=enc, max_distance_threshold=threshold)
    elapsed = time.perf_counter() - t0
    pairs = {(min(int(a), int(b)), max(int(a), int(b))) for a, dups in found.items() for b in dups}
    return elapsed, pairs


def search_table(real: list[str], sizes: list[int], threshold: int, compare: bool) -> list[str]:
    rng = np.random.default_rng(0)
    lines = [
        "| hashes | imagededup find_duplicates s | ours near_pairs s | speed-up | pairs (ours) | agreement |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    last: tuple[int, float] | None = None
    for n in sizes:
        h = make_hashes(n, real, rng, threshold)
        t0 = time.perf_counter()
        ours = near_pairs(h, threshold)
        t_ours = time.perf_counter() - t0
        ours_set = {(int(a), int(b)) for a, b, _ in ours.tolist()}
        predicted = None if last is None else last[1] * (n / last[0]) ** 2
        if not compare:
            lines.append(f"| {n:,} | skipped | {t_ours:.2f} | – | {len(ours_set)} | – |")
            continue
        if predicted is not None and predicted > LIMIT_S:
            lines.append(
                f"| {n:,} | skipped (predicted {predicted / 60:.0f} min) | {t_ours:.2f} | – | {len(ours_set)} | – |"
            )
            continue
        t_idd, idd_set = imagededup_pairs(h, threshold)
        last = (n, t_idd)
        both = len(ours_set & idd_set)
        agree = f"{both / max(1, len(idd_set)):.3f} / {both / max(1, len(ours_set)):.3f}"
        lines.append(f"| {n:,} | {t_idd:.2f} | {t_ours:.2f} | {t_idd / t_ours:.0f}x | {len(ours_set)} | {agree} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crawl", type=Path, default=Path("data/crawl"))
    ap.add_argument("--clean", type=Path, default=Path("data/clean"), help="its real pHashes seed the search")
    ap.add_argument("--images", type=int, default=3000, help="images for the hashing comparison")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--threshold", type=int, default=6)
    ap.add_argument("--out", type=Path, default=default_out(__file__))
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # imagededup logs every call
    require(args.crawl / "objects", "the demo's crawl store")
    compare = importlib.util.find_spec("imagededup") is not None
    if not compare:
        print(f"imagededup is not installed: its column is skipped (install it with `{INSTALL}`)", file=sys.stderr)
    kept = args.clean / "kept.jsonl"
    real = [json.loads(x)["phash"] for x in kept.read_text().splitlines()] if kept.is_file() else []
    body = [
        f"Workers: {default_workers()}." + ("" if compare else f" imagededup not installed (`{INSTALL}`)."),
        "",
        "Hashing throughput (decode + pHash), same files, every core:",
        "",
        *hashing_table(args.crawl, args.images, compare),
        "",
        f"Near-duplicate search, Hamming distance <= {args.threshold} ({len(real)} real pHashes + random):",
        "",
        *search_table(real, [int(s) for s in args.sizes.split(",")], args.threshold, compare),
        "",
        "agreement: share of imagededup's pairs that ours found / share of ours that imagededup found",
    ]
    report(args.out, "Clean speed: kd3 against imagededup", "\n".join(body), "cpu")


if __name__ == "__main__":
    main()
