"""Near-duplicate detection against the demo world's ground truth.

Two clean-stage images are truly the same photo when the world built them from the same
Fashion-MNIST item (``raw_index`` in ``data/world/truth.jsonl``): a re-upload and its original.
Among the images that reached the duplicate search (passed every filter), this prints the pair
precision and recall of the clusters the clean stage found, and of the search at other Hamming
thresholds on the same hashes, so the default can be checked. There is no outside baseline: the
first row (the clean stage as configured) is the reference the other rows are read against.

Needs the demo's world, crawl and clean outputs (``make demo``). Run from the repository root:

    .venv/bin/python benchmarks/dedup_quality.py --thresholds 6,10 --mads 6,12   # seconds on 2 cores

The table goes to ``benchmarks/results/dedup_quality.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import default_out, report, require  # noqa: E402

from crawl.dedup import find_clusters, hex_to_array, near_pairs, thumb_distance  # noqa: E402
from crawl.images import SMALL, AnalyzeParams, analyze_file  # noqa: E402


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pair_set(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for g in groups for p in combinations(g, 2)}  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", type=Path, default=Path("data/clean"))
    ap.add_argument("--world", type=Path, default=Path("data/world"))
    ap.add_argument("--crawl", type=Path, default=Path("data/crawl"))
    ap.add_argument("--thresholds", default="4,6,8,10,12")
    ap.add_argument("--mads", default="8,12,16", help="thumbnail verification thresholds to try")
    ap.add_argument("--out", type=Path, default=default_out(__file__))
    args = ap.parse_args()
    require(args.world / "truth.jsonl", "the demo world's ground truth")
    for name in ("kept.jsonl", "dropped.jsonl", "clusters.jsonl"):
        require(args.clean / name, "the clean stage's output")
    require(args.crawl / "objects", "the demo's crawl store")

    raw_of = {t["sha256"]: t["raw_index"] for t in read(args.world / "truth.jsonl") if t["sha256"]}
    kept = read(args.clean / "kept.jsonl")
    dups = [d for d in read(args.clean / "dropped.jsonl") if d["reason"] == "near_duplicate"]
    searched = kept + dups  # every image that passed the filters
    by_raw: dict[int, list[str]] = defaultdict(list)
    for o in searched:
        if raw_of.get(o["sha256"]) is not None:
            by_raw[raw_of[o["sha256"]]].append(o["sha256"])
    truth = pair_set([g for g in by_raw.values() if len(g) > 1])

    found = [[c["survivor"]] + [m["sha256"] for m in c["members"]] for c in read(args.clean / "clusters.jsonl")]
    hashes = hex_to_array([o["phash"] for o in searched])
    rank = list(range(len(searched)))
    # the 16x16 verification thumbnails are not among the stage outputs: recompute them
    params = AnalyzeParams()
    small = np.stack(
        [
            np.frombuffer(analyze_file(args.crawl / o["path"], params)["small"], dtype=np.uint8).reshape(
                SMALL, SMALL, 3
            )
            for o in searched
        ]
    )
    rows = [("clean stage output", pair_set(found))]
    for t in (int(x) for x in args.thresholds.split(",")):
        pairs = near_pairs(hashes, t)
        mads = thumb_distance(pairs, small)
        for mad in [None, *(float(x) for x in args.mads.split(","))]:
            sel = pairs if mad is None else pairs[mads <= mad]
            clusters = find_clusters(len(searched), sel, rank)
            name = f"pHash <= {t}" + ("" if mad is None else f", thumbnails <= {mad:g}")
            rows.append((name, pair_set([[searched[i]["sha256"] for i in g] for g in clusters])))

    lines = [
        f"{len(searched)} images searched, {len(truth)} true near-duplicate pairs (same source item):",
        "",
        "| clusters from | predicted pairs | precision | recall |",
        "|---|---:|---:|---:|",
    ]
    for name, pred in rows:
        hit = len(pred & truth)
        precision = hit / len(pred) if pred else float("nan")
        recall = hit / len(truth) if truth else float("nan")
        lines.append(f"| {name} | {len(pred)} | {precision:.3f} | {recall:.3f} |")
    report(args.out, "Near-duplicate quality on the demo world", "\n".join(lines), "cpu")


if __name__ == "__main__":
    main()
