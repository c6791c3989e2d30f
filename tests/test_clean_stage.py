"""The clean stage end to end: a real crawl of a tiny world in, packed array and reports out."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from crawl.classes import build_queries, parse_classes
from crawl.crawler import Crawler
from crawl.download import Fetcher, HttpLimits
from crawl.sources import SearchContext, make_source
from demo.mirror import MirrorServer
from pipeline import clean_stage
from pipeline.artifacts import ArtifactError
from pipeline.artifacts.crawl import CrawlStore
from pipeline.config import CleanConfig

from conftest import TINY_CLASSES, read_jsonl

LIMITS = HttpLimits(per_host_concurrency=4, per_host_delay_s=0.0, retries=1)


@pytest.fixture(scope="module")
def crawled(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world crawled once (3 classes x 12 results)."""
    out = tmp_path_factory.mktemp("crawl") / "crawl"
    with MirrorServer(tiny_world) as server:
        ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=server.base_url)
        classes = parse_classes("\n".join(TINY_CLASSES))
        Crawler(
            out,
            {"mirror": make_source("mirror", ctx)},
            lambda c: build_queries(c.name, ["{name}"]),
            ctx.fetcher,
            workers=4,
            per_class=100,
            progress=False,
        ).run(classes)
    CrawlStore.save_classes(out, classes)
    return out


def clean(crawl_dir: Path, out: Path, **kw: object) -> dict:  # type: ignore[type-arg]
    args = {"min_side": 16, "progress": False, "workers": 2, **kw}
    cfg = CleanConfig(crawl_dir=str(crawl_dir), out_dir=str(out), **args)  # type: ignore[arg-type]
    return clean_stage.run(cfg, image_size=24)


def test_outputs_account_for_every_object(crawled: Path, tiny_world: Path, tmp_path: Path) -> None:
    report = clean(crawled, tmp_path / "clean")
    out = tmp_path / "clean"
    kept, dropped = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "dropped.jsonl")
    manifest = [r for r in read_jsonl(crawled / "manifest.jsonl") if r["status"] == "ok"]
    assert len(kept) + len(dropped) == len({r["sha256"] for r in manifest}) == report["objects"]
    images = np.load(out / "images.npy", mmap_mode="r")
    assert images.shape == (len(kept), 24, 24, 3) and images.dtype == np.uint8
    assert [k["row"] for k in kept] == list(range(len(kept)))
    assert all(k["url"].startswith("http://127.0.0.1") and k["class_name"] in TINY_CLASSES for k in kept)
    # the world's truncated files were stored by the crawl and are dropped here
    truth = {t["sha256"]: t for t in read_jsonl(tiny_world / "truth.jsonl") if t["sha256"]}
    for d in dropped:
        if truth[d["sha256"]].get("broken") == "truncated":
            assert d["reason"] == "truncated"
    assert {k["sha256"] for k in kept}.isdisjoint({d["sha256"] for d in dropped})
    assert report["kept"] == len(kept) and sum(report["dropped_by_reason"].values()) == len(dropped)
    assert not (tmp_path / "clean.tmp").exists() and not list(out.glob("scratch*"))


def test_same_input_gives_the_same_bytes(crawled: Path, tmp_path: Path) -> None:
    clean(crawled, tmp_path / "a", workers=1)
    clean(crawled, tmp_path / "b", workers=2)
    for name in ("images.npy", "kept.jsonl", "dropped.jsonl", "clusters.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_near_duplicates_are_clustered_with_a_survivor(crawled: Path, tmp_path: Path) -> None:
    clean(crawled, tmp_path / "c", hamming=64, verify_mad=255.0)  # everything is a duplicate of everything
    kept = read_jsonl(tmp_path / "c" / "kept.jsonl")
    dups = [d for d in read_jsonl(tmp_path / "c" / "dropped.jsonl") if d["reason"] == "near_duplicate"]
    clusters = read_jsonl(tmp_path / "c" / "clusters.jsonl")
    assert len(kept) == 1 and len(clusters) == 1 and dups
    assert all(d["dup_of"] == kept[0]["sha256"] for d in dups)
    biggest = max([kept[0], *dups], key=lambda r: r["width"] * r["height"])
    assert biggest["width"] * biggest["height"] == kept[0]["width"] * kept[0]["height"]
    assert (tmp_path / "c" / "sheets" / "duplicates.png").is_file()


def test_bit_flip_after_the_crawl_is_caught(crawled: Path, tmp_path: Path) -> None:
    copy = tmp_path / "crawl"
    shutil.copytree(crawled, copy)
    rec = next(r for r in read_jsonl(copy / "manifest.jsonl") if r["status"] == "ok")
    p = copy / rec["path"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(p, 0o644)
    p.write_bytes(bytes(data))
    clean(copy, tmp_path / "clean")
    dropped = {d["sha256"]: d["reason"] for d in read_jsonl(tmp_path / "clean" / "dropped.jsonl")}
    assert dropped[rec["sha256"]] == "sha_mismatch"


def test_a_crashing_decoder_costs_one_file(crawled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = next(r for r in read_jsonl(crawled / "manifest.jsonl") if r["status"] == "ok")["sha256"]
    real = clean_stage.analyze_file

    def flaky(path: str, params: object, sha256: str | None = None) -> dict:  # type: ignore[type-arg]
        if sha256 == victim:
            os._exit(11)
        return real(path, params, sha256)  # type: ignore[arg-type]

    monkeypatch.setattr(clean_stage, "analyze_file", flaky)  # workers are forked: they inherit it
    report = clean(crawled, tmp_path / "clean")
    dropped = {d["sha256"]: d for d in read_jsonl(tmp_path / "clean" / "dropped.jsonl")}
    assert dropped[victim]["reason"] == "decoder_crash"
    assert report["workers_replaced"] >= 1 and report["kept"] > 20  # its chunk-mates were re-run alone


def test_an_object_found_by_two_classes_is_one_image(crawled: Path, tmp_path: Path) -> None:
    copy = tmp_path / "crawl"
    shutil.copytree(crawled, copy)
    lines = read_jsonl(copy / "manifest.jsonl")
    first = next(r for r in lines if r["status"] == "ok" and r["class_name"] == "T-shirt/top")
    twin = {**first, "class_name": "Bag", "class_index": 2, "url": first["url"] + "?again", "rank": 0}
    with open(copy / "manifest.jsonl", "a") as f:
        f.write(json.dumps(twin) + "\n")
    clean(copy, tmp_path / "clean")
    rows = [k for k in read_jsonl(tmp_path / "clean" / "kept.jsonl") if k["sha256"] == first["sha256"]]
    drops = [d for d in read_jsonl(tmp_path / "clean" / "dropped.jsonl") if d["sha256"] == first["sha256"]]
    assert len(rows) + len(drops) == 1
    if rows:
        assert rows[0]["classes"] == ["T-shirt/top", "Bag"] and rows[0]["class_name"] == "T-shirt/top"


def test_missing_crawl_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no crawl manifest"):
        clean(tmp_path / "nowhere", tmp_path / "clean")
