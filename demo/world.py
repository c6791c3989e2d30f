"""The offline demo web: Fashion-MNIST items rendered as web photos, with search noise and junk.

``build_world`` turns raw 28x28 grey items (Fashion-MNIST train[30000:60000] in the demo, never
seen by the teacher) into a folder the mirror serves:

- ``files/``: the image files, named by a random-looking id (JPEG, PNG or WebP);
- ``index.json``: for each class its ranked result list, and for each entry how the mirror serves
  it (file, content type, or a broken behaviour: 404, HTML served as an image, truncated file);
- ``truth.jsonl``: the ground truth, read only by evaluation and reports: each entry's true class
  (or ``junk``), the raw item it came from and, for re-uploads, the entry it duplicates.

Every random choice comes from a generator seeded by ``(seed, class, rank)``, so the same knobs
give the same bytes. The world is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import string
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from demo.settings import RenderParams, WorldMix

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
HTML_ERROR_PAGE = b"<!DOCTYPE html><html><head><title>Not found</title></head><body><h1>Sorry</h1></body></html>\n"


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _canvas_size(rng: np.random.Generator, p: RenderParams) -> tuple[int, int]:
    long_side = int(rng.integers(p.min_size, p.max_size + 1))
    if rng.random() < p.nonsquare_prob:
        short = max(p.min_size, round(long_side / rng.uniform(1.05, p.max_aspect)))
        return (long_side, short) if rng.random() < 0.5 else (short, long_side)
    return long_side, long_side


def _background(rng: np.random.Generator, p: RenderParams) -> np.ndarray:
    u = rng.random()
    if u < p.light_bg_prob:  # product shot: white to light grey, slightly tinted
        return rng.integers(max(p.bg_min_level, 205), 256, size=3)
    if u < p.light_bg_prob + p.dark_bg_prob:  # dark studio backdrop: navy, charcoal, maroon ...
        return rng.integers(p.bg_min_level, max(p.bg_min_level, p.dark_bg_max) + 1, size=3)
    return rng.integers(p.bg_min_level, 231, size=3)  # coloured backdrop, never pure black


def _encode(img: Image.Image, rng: np.random.Generator, p: RenderParams) -> tuple[bytes, str]:
    names = sorted(p.formats)
    weights = np.array([p.formats[n] for n in names], dtype=float)
    fmt = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    buf = io.BytesIO()
    quality = int(rng.integers(p.jpeg_quality[0], p.jpeg_quality[1] + 1))
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality)
    else:
        img.save(buf, "PNG", optimize=False)
    return buf.getvalue(), fmt


def _finish(canvas: Image.Image, rng: np.random.Generator, p: RenderParams, scale: float) -> Image.Image:
    """Blur and sensor noise, shared by photos and junk."""
    if p.max_blur > 0 and rng.random() < p.blur_prob:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, p.max_blur)) * scale))
    arr: np.ndarray = np.asarray(canvas, dtype=np.float32)
    if p.noise_std > 0:
        arr = arr + rng.normal(0, rng.uniform(0, p.noise_std), size=arr.shape)  # float64 from here
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_item(item: np.ndarray, rng: np.random.Generator, p: RenderParams) -> Image.Image:
    """A 28x28 grey item (bright object on black) as a web photo on a background."""
    width, height = _canvas_size(rng, p)
    bg = _background(rng, p)
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in bg))
    # object colour: a random tint, or a grey that contrasts with the background
    if rng.random() < p.tint_prob:
        colour = rng.integers(0, 256, size=3).astype(np.float32)
    else:
        grey = rng.uniform(20, 90) if bg.mean() > 128 else rng.uniform(170, 250)
        colour = np.full(3, grey, dtype=np.float32)
    shade = item.astype(np.float32) / 255.0  # (28, 28) texture of the item
    rgb = colour[None, None, :] * (0.45 + 0.55 * shade[..., None])
    alpha = np.clip(shade * 3.0, 0, 1) * 255
    obj = Image.fromarray(np.dstack([rgb, alpha]).clip(0, 255).astype(np.uint8), "RGBA")
    side = max(4, round(min(width, height) * rng.uniform(*p.object_scale)))
    obj = obj.resize((side, side), Image.Resampling.BILINEAR)
    if p.max_rotation_deg > 0:
        obj = obj.rotate(
            float(rng.uniform(-p.max_rotation_deg, p.max_rotation_deg)), Image.Resampling.BILINEAR, expand=True
        )
    cx = width / 2 + rng.uniform(-p.max_shift, p.max_shift) * width
    cy = height / 2 + rng.uniform(-p.max_shift, p.max_shift) * height
    canvas.paste(obj, (round(cx - obj.width / 2), round(cy - obj.height / 2)), obj)
    return _finish(canvas, rng, p, side / 28)


def render_junk(rng: np.random.Generator, p: RenderParams) -> Image.Image:
    """Off-topic results: shapes, text or textures."""
    width, height = _canvas_size(rng, p)
    kind = rng.choice(["shapes", "text", "texture"])
    if kind == "texture":
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        period = rng.uniform(3, 20)
        angle = rng.uniform(0, np.pi)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        if rng.random() < 0.5:  # checker-like interference
            wave = wave * np.sin((xx * np.sin(angle) - yy * np.cos(angle)) * 2 * np.pi / period)
        c1, c2 = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        t = (wave[..., None] + 1) / 2
        arr = c1 * t + c2 * (1 - t)
        canvas = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    else:
        canvas = Image.new("RGB", (width, height), tuple(int(c) for c in _background(rng, p)))
        draw = ImageDraw.Draw(canvas)
        if kind == "shapes":
            for _ in range(int(rng.integers(1, 6))):
                x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
                y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
                fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
                if rng.random() < 0.5:
                    draw.ellipse((x0, y0, x1 + 2, y1 + 2), fill=fill)
                else:
                    draw.rectangle((x0, y0, x1 + 2, y1 + 2), fill=fill)
        else:
            font = ImageFont.load_default(size=max(8, int(min(width, height) * rng.uniform(0.12, 0.3))))
            letters = string.ascii_letters + string.digits
            for row in range(int(rng.integers(1, 4))):
                text = "".join(rng.choice(list(letters), size=int(rng.integers(3, 9))))
                y = int(height * (0.15 + 0.3 * row))
                fill = tuple(int(c) for c in rng.integers(0, 256, 3))
                draw.text((int(width * rng.uniform(0, 0.3)), y), text, fill=fill, font=font)
    return _finish(canvas, rng, p, max(width, height) / 64)


def reupload(data: bytes, rng: np.random.Generator, p: RenderParams) -> Image.Image:
    """A near-duplicate: a small crop, a resize and (by the caller) a new encoding."""
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    dx, dy = int(w * rng.uniform(0, 0.06)), int(h * rng.uniform(0, 0.06))
    img = img.crop((dx, dy, w - int(w * rng.uniform(0, 0.06)), h - int(h * rng.uniform(0, 0.06))))
    factor = rng.uniform(0.7, 1.4)
    return img.resize((max(8, round(img.width * factor)), max(8, round(img.height * factor))), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------
# the world
# --------------------------------------------------------------------------------------------


def _counts(n: int, mix: WorldMix) -> dict[str, int]:
    """Entries of each kind in one result list of length ``n`` (largest remainder rounding)."""
    fracs = {
        "correct": mix.correct,
        "wrong": mix.wrong,
        "junk": mix.junk,
        "near_dup": mix.near_dup,
        "broken": mix.broken,
    }
    raw = {k: v * n for k, v in fracs.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: n - sum(out.values())]:
        out[k] += 1
    return out


def build_world(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    out_dir: str | Path,
    *,
    seed: int = 0,
    results_per_class: int = 400,
    mix: WorldMix = WorldMix(),  # noqa: B008 (frozen)
    render: RenderParams = RenderParams(),  # noqa: B008 (frozen)
    broken_kinds: tuple[str, ...] = ("http_404", "html_as_image", "truncated"),
    raw_offset: int = 0,
) -> dict[str, Any]:
    """Render the world into ``out_dir`` (replaced atomically); returns a summary dict.

    ``raw_offset`` is added to the item indices recorded in the truth file (the demo passes 30000,
    so ``raw_index`` is the Fashion-MNIST train index).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "files").mkdir(parents=True)
    num_classes = len(class_names)
    if labels.max(initial=0) >= num_classes:
        raise ValueError(f"labels go up to {int(labels.max())} but only {num_classes} class names were given")

    # raw items by label, shuffled once; each raw item is used at most once in the world
    root = np.random.default_rng(seed)
    pools = {k: list(root.permutation(np.flatnonzero(labels == k))) for k in range(num_classes)}

    results: dict[str, list[str]] = {}
    entries: dict[str, dict[str, Any]] = {}
    truth_lines: list[dict[str, Any]] = []
    kinds_total: dict[str, int] = {}

    def add(entry_id: str, data: bytes | None, serve: str, fmt: str | None, truth: dict[str, Any]) -> None:
        ext = EXTENSIONS.get(fmt or "", "jpg")
        path = f"img/{entry_id}.{ext}"
        entries[entry_id] = {"path": path, "serve": serve, "content_type": CONTENT_TYPES.get(fmt or "", "image/jpeg")}
        sha = None
        if data is not None:
            (tmp / "files" / f"{entry_id}.{ext}").write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
        truth_lines.append({"id": entry_id, "path": path, "sha256": sha, "serve": serve, **truth})
        kinds_total[truth["kind"]] = kinds_total.get(truth["kind"], 0) + 1

    for k, name in enumerate(class_names):
        counts = _counts(results_per_class, mix)
        plan = [kind for kind, n in counts.items() for _ in range(n)]
        order = np.random.default_rng([seed, k, 1]).permutation(len(plan))
        plan = [plan[i] for i in order]
        listing: list[str] = []
        rendered: list[tuple[str, bytes]] = []  # (id, bytes) of photos in this list, for re-uploads
        for rank, kind in enumerate(plan):
            rng = np.random.default_rng([seed, k, 2, rank])
            entry_id = hashlib.sha1(f"{seed}/{k}/{rank}".encode()).hexdigest()[:16]
            if kind == "near_dup" and not rendered:
                kind = "correct"  # nothing to re-upload yet at the top of the list
            if kind in ("correct", "wrong"):
                label = k if kind == "correct" else int(rng.choice([j for j in range(num_classes) if j != k] or [k]))
                if not pools[label]:
                    raise ValueError(f"not enough raw images of class {class_names[label]!r} for the world")
                raw = int(pools[label].pop())
                data, fmt = _encode(render_item(images[raw], rng, render), rng, render)
                rendered.append((entry_id, data))
                serve = "file" if rng.random() > 0.05 else "octet"  # some servers send a generic type
                add(
                    entry_id,
                    data,
                    serve,
                    fmt,
                    {"kind": kind, "truth": class_names[label], "raw_index": raw + raw_offset},
                )
            elif kind == "junk":
                data, fmt = _encode(render_junk(rng, render), rng, render)
                add(entry_id, data, "file", fmt, {"kind": "junk", "truth": "junk", "raw_index": None})
            elif kind == "near_dup":
                src_id, src_data = rendered[int(rng.integers(len(rendered)))]
                src_truth = next(t for t in reversed(truth_lines) if t["id"] == src_id)
                data, fmt = _encode(reupload(src_data, rng, render), rng, render)
                add(
                    entry_id,
                    data,
                    "file",
                    fmt,
                    {
                        "kind": "near_dup",
                        "truth": src_truth["truth"],
                        "raw_index": src_truth["raw_index"],
                        "dup_of": src_id,
                    },
                )
            else:  # broken
                how = str(rng.choice(list(broken_kinds)))
                if how == "http_404":
                    add(entry_id, None, "http_404", "JPEG", {"kind": "broken", "truth": None, "raw_index": None})
                elif how == "html_as_image":
                    add(entry_id, HTML_ERROR_PAGE, "file", "JPEG", {"kind": "broken", "truth": None, "raw_index": None})
                else:  # a real photo cut in half: the crawl stores it, the clean stage must drop it
                    label = k
                    raw = int(pools[label].pop())
                    img = render_item(images[raw], rng, render)
                    buf = io.BytesIO()
                    img.save(buf, "JPEG", quality=90)
                    data = buf.getvalue()[: len(buf.getvalue()) // 2]
                    add(
                        entry_id, data, "file", "JPEG", {"kind": "broken", "truth": None, "raw_index": raw + raw_offset}
                    )
                truth_lines[-1]["broken"] = how
            listing.append(entry_id)
        results[name] = listing

    index = {"version": 1, "seed": seed, "classes": class_names, "results": results, "entries": entries}
    (tmp / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=0))
    with open(tmp / "truth.jsonl", "w", encoding="utf-8") as f:
        for t in truth_lines:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    summary = {"classes": num_classes, "entries": len(entries), "by_kind": dict(sorted(kinds_total.items()))}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary
