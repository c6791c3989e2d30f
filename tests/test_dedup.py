"""Near-duplicate search: exactness against brute force, and real near-duplicates."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from crawl.dedup import brute_force_pairs, find_clusters, hex_to_array, near_pairs, thumb_distance
from crawl.filters import FilterParams, apply_filters
from crawl.images import SMALL, AnalyzeParams, analyze_file


def planted(n: int, words: int, seed: int = 0) -> np.ndarray:
    """Random hashes plus copies with 0..12 bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=(n, words), dtype=np.int64).astype(np.uint64) * np.uint64(2)
    h |= rng.integers(0, 2, size=(n, words)).astype(np.uint64)
    for _ in range(n // 5):
        i, j = rng.integers(n, size=2)
        h[j] = h[i]
        for b in rng.choice(64 * words, size=int(rng.integers(0, 13)), replace=False):
            h[j, b // 64] ^= np.uint64(1) << np.uint64(b % 64)
    return h


@pytest.mark.parametrize("words", [1, 4])
@pytest.mark.parametrize("threshold", [0, 3, 6, 7, 10])
def test_multi_index_search_finds_exactly_the_brute_force_pairs(words: int, threshold: int) -> None:
    h = planted(1500, words)
    assert np.array_equal(near_pairs(h, threshold), brute_force_pairs(h, threshold))


def test_excluded_hashes_never_match() -> None:
    h = np.zeros((4, 1), dtype=np.uint64)  # identical: all would match
    valid = np.array([True, False, True, False])
    assert near_pairs(h, 3, valid).tolist() == [[0, 2, 0]]


def test_hex_round_trip_and_width_check() -> None:
    hexes = [str(imagehash.hex_to_hash("8f" * 8)), "0" * 16]
    arr = hex_to_array(hexes)
    assert arr.shape == (2, 1) and int(arr[0, 0]) == int("8f" * 8, 16)
    with pytest.raises(ValueError):
        hex_to_array(["0" * 16, "0" * 32])


def test_clusters_pick_the_largest_then_the_earliest() -> None:
    pairs = np.array([[0, 1, 2], [1, 2, 3], [4, 5, 0]])
    rank = [(-100, 0), (-400, 1), (-400, 2), (0, 3), (-10, 4), (-10, 5)]
    assert find_clusters(6, pairs, rank) == [[1, 2, 0], [4, 5]]  # by size, ties by order


def photo(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A 'photo': smooth colour blobs, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    img = np.zeros((*xx.shape, 3))
    for _ in range(5):
        cx, cy, r = rng.uniform(0, 1, 3)
        img += rng.uniform(0, 255, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.1 * r))[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def save(img: Image.Image, path, fmt: str = "PNG", **kw) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())


def analyse_all(tmp_path, images: dict[str, tuple[Image.Image, str, dict]]) -> list[dict]:  # type: ignore[type-arg,no-untyped-def]
    out = []
    for name, (img, fmt, kw) in images.items():
        p = tmp_path / name
        save(img, p, fmt, **kw)
        out.append({"name": name, **analyze_file(p, AnalyzeParams())})
    return out


def clusters_of(recs: list[dict], threshold: int = 6, mad: float = 12.0) -> list[set[str]]:  # type: ignore[type-arg]
    kept, _ = apply_filters(recs, FilterParams(min_side=8))
    hashes = hex_to_array([r["phash"] for r in kept])
    small = np.stack([np.frombuffer(r["small"], np.uint8).reshape(SMALL, SMALL, 3) for r in kept])
    pairs = near_pairs(hashes, threshold)
    pairs = pairs[thumb_distance(pairs, small) <= mad]
    rank = [(-(r["width"] * r["height"]), i) for i, r in enumerate(kept)]
    return [{kept[i]["name"] for i in c} for c in find_clusters(len(kept), pairs, rank)]


def test_resized_reencoded_and_cropped_copies_collapse(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = photo(1)
    rgba = base.convert("RGBA")
    on_white = Image.new("RGBA", base.size, (255, 255, 255, 255))
    images = {
        "orig.png": (base, "PNG", {}),
        "half.png": (base.resize((60, 45)), "PNG", {}),
        "q70.jpg": (base, "JPEG", {"quality": 70}),
        "crop.png": (base.crop((3, 2, 117, 88)), "PNG", {}),
        "alpha.png": (rgba, "PNG", {}),
        "white.png": (Image.alpha_composite(on_white, rgba).convert("RGB"), "PNG", {}),
        "other1.png": (photo(2), "PNG", {}),
        "other2.png": (photo(3), "PNG", {}),
    }
    recs = analyse_all(tmp_path, images)
    clusters = clusters_of(recs)
    assert len(clusters) == 1
    assert clusters[0] == {"orig.png", "half.png", "q70.jpg", "crop.png", "alpha.png", "white.png"}


def test_distinct_photos_do_not_merge(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recs = analyse_all(tmp_path, {f"p{i}.png": (photo(10 + i), "PNG", {}) for i in range(30)})
    assert clusters_of(recs) == []


def test_solid_colours_are_blank_and_never_matched(tmp_path) -> None:  # type: ignore[no-untyped-def]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (255, 255, 255)]
    recs = analyse_all(
        tmp_path, {f"c{i}.png": (Image.new("RGB", (64, 64), c), "PNG", {}) for i, c in enumerate(colours)}
    )
    kept, dropped = apply_filters(recs, FilterParams())
    assert kept == [] and {d["reason"] for d in dropped} == {"blank"}
    hashes = hex_to_array([r["phash"] for r in recs])
    valid = np.array([r["std"] >= 2.0 for r in recs])
    assert len(near_pairs(hashes, 6)) > 0  # their hashes do collide by construction ...
    assert len(near_pairs(hashes, 6, valid)) == 0  # ... which is why they are excluded


@pytest.mark.parametrize(
    ("size", "reason"), [((1, 1), "too_small"), ((10000, 2), "too_small"), ((300, 40), "bad_aspect"), ((64, 64), None)]
)
def test_size_and_aspect_filters(size: tuple[int, int], reason: str | None) -> None:
    rec = {"reason": None, "width": size[0], "height": size[1], "std": 50.0, "entropy": 6.0}
    kept, dropped = apply_filters([rec], FilterParams(min_side=24, max_aspect=3.0))
    assert (dropped[0]["reason"] if dropped else None) == reason


def test_decode_reason_passes_through_filters() -> None:
    kept, dropped = apply_filters([{"reason": "truncated"}], FilterParams())
    assert kept == [] and dropped[0]["reason"] == "truncated"
