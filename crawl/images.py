"""Safe decoding of untrusted image bytes to 8-bit RGB, and the per-image analysis of the clean stage.

``decode_image(data, limits)`` either returns an ``(H, W, 3) uint8`` array or raises
``ImageRejected(reason)`` with a stable reason code:

- ``empty``, ``too_large`` (byte cap), ``unidentified`` / ``unsupported_format`` (SVG) /
  ``format_not_allowed`` judged from the magic bytes *before* Pillow sees the file, and Pillow is
  then restricted to the allow-list (``Image.open(..., formats=...)``), so no PSD/EPS/PDF plugin
  (and never Ghostscript) runs;
- ``too_many_pixels`` checked on the header before any pixel is decoded; Pillow's
  ``DecompressionBombWarning`` is promoted to an error, so the warning zone is refused too;
- ``too_many_frames`` for animations over the cap (the first frame is used otherwise);
- ``truncated`` / ``corrupt`` from the decoder (``LOAD_TRUNCATED_IMAGES`` is never touched);
- EXIF orientation applied; malformed EXIF is tolerated with the warning ``exif_unreadable``;
- CMYK, palette, 16-bit and alpha are converted correctly: alpha is composited on white and
  16-bit is scaled, not clipped (``convert("RGB")`` alone gets both wrong silently).

``analyze_file`` adds what the clean stage needs from one file in one decode: size, filter
statistics, the perceptual hash (imagehash's pHash) and the image resized for the packed array.
It runs in isolated worker processes (``crawl.isolate``), so a decoder crash costs one file.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from crawl.download import sniff
from crawl.settings import AnalyzeParams, DecodeLimits

SMALL = 16  # side of the colour thumbnail used to verify near-duplicate candidates


class ImageRejected(Exception):
    """The file is not a usable image; ``reason`` is the code recorded in ``dropped.jsonl``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Decoded:
    image: Image.Image  # mode RGB (smaller than width x height after a JPEG draft)
    format: str
    width: int  # full size, after EXIF rotation
    height: int
    warnings: list[str]

    @property
    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8."""
        return np.asarray(self.image, dtype=np.uint8)


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    if not data:
        raise ImageRejected("empty")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes")
    fmt, why = sniff(data[:512])
    if fmt is None:
        raise ImageRejected(why or "unidentified")
    if fmt not in limits.formats:
        raise ImageRejected("format_not_allowed", fmt)
    try:
        if fmt == "PNG":  # Pillow checks chunk CRCs only in verify(); a bad CRC means a damaged file
            with Image.open(io.BytesIO(data), formats=["PNG"]) as probe:
                probe.verify()
        return Image.open(io.BytesIO(data), formats=list(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # header Pillow cannot parse
        raise ImageRejected(_damage(e), str(e)) from None


def _damage(e: BaseException) -> str:
    """``truncated`` when the data simply stops early, else ``corrupt``."""
    text = str(e).lower()
    return "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> mode RGB; alpha composited on white, 16/32-bit scaled to 8 bits."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit files hold 0..65535 (also when Pillow reports mode "I"); 8-bit-range data stays
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode not in ("RGB", "RGBA"):
        im = im.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, ...
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im).convert("RGB")
    return im


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), draft: int | None = None) -> Decoded:  # noqa: B008
    """Decode untrusted bytes to RGB or raise ``ImageRejected``.

    ``draft``: the caller needs at least this many pixels on the shorter side, so JPEGs may be
    decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (much faster for large photos).
    """
    notes: list[str] = []
    rgb: Image.Image | None = None
    with warnings.catch_warnings(record=True) as caught:
        # Pillow's warnings are recorded, not printed: EXIF trouble becomes a note, palette
        # transparency is handled by _to_rgb, and the decompression-bomb warning is an error
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = _open(data, limits)
        try:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageRejected("corrupt", f"declared size {width}x{height}")
            if width * height > limits.max_pixels:
                raise ImageRejected("too_many_pixels", f"{width}x{height}")
            frames = getattr(im, "n_frames", 1)
            if frames > limits.max_frames:
                raise ImageRejected("too_many_frames", f"{frames} frames")
            fmt = im.format or "?"
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # malformed EXIF must not cost the image
                orientation = 1
                notes.append("exif_unreadable")
            if draft and fmt == "JPEG":
                im.draft(im.mode, (draft, draft))
            im.load()
            if orientation not in (1, None):
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:
                    notes.append("exif_unreadable")
            rgb = _to_rgb(im)
            rgb.load()
            if orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
                width, height = height, width
        except ImageRejected:
            raise
        except Image.DecompressionBombError as e:
            raise ImageRejected("too_many_pixels", str(e)) from None
        except (Image.DecompressionBombWarning, MemoryError) as e:
            raise ImageRejected("too_many_pixels", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, ZeroDivisionError, IndexError) as e:
            raise ImageRejected(_damage(e), f"{type(e).__name__}: {e}") from None
        finally:
            if rgb is not im:
                im.close()
    if any("exif" in str(w.message).lower() for w in caught) and "exif_unreadable" not in notes:
        notes.append("exif_unreadable")
    assert rgb is not None
    return Decoded(rgb, fmt, width, height, notes)


# --------------------------------------------------------------------------------------------
# analysis for the clean stage
# --------------------------------------------------------------------------------------------


def resize_square(img: Image.Image | np.ndarray, size: int, mode: str) -> np.ndarray:
    """Image -> (size, size, 3) uint8 keeping the aspect ratio (centre crop, or white padding)."""
    im = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    if mode == "crop":
        out = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    else:
        out = ImageOps.pad(im, (size, size), Image.Resampling.BICUBIC, color=(255, 255, 255), centering=(0.5, 0.5))
    return np.asarray(out, dtype=np.uint8)


STATS = 32  # statistics are measured on a 32x32 version, so thresholds do not depend on resolution


def analyze_file(path: str | Path, params: AnalyzeParams, sha256: str | None = None) -> dict[str, Any]:
    """Decode one stored object and measure it; rejected files come back with ``reason``.

    With ``sha256`` the bytes are checked against their content address first (a bit flipped on
    disk after the crawl is ``sha_mismatch``, not a silently different image). One decode feeds
    everything: the pHash (imagehash's, computed on exactly the grey 4N x 4N image it would make
    itself), the blank/low-information statistics, the packed-array image and the 16x16 thumbnail.
    """
    p = Path(path)
    if not p.is_file():
        return {"reason": "missing_file"}
    size = p.stat().st_size
    if size > params.limits.max_bytes:
        return {"reason": "too_large", "detail": f"{size} bytes"}
    data = p.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        return {"reason": "sha_mismatch"}
    side = max(params.image_size, params.hash_size * 4, STATS)
    try:
        dec = decode_image(data, params.limits, draft=side)
    except ImageRejected as e:
        return {"reason": e.reason, "detail": str(e)[:200]}
    img = dec.image
    factor = min(img.size) // (2 * side)
    if factor >= 2:  # a large PNG/WebP: box-reduce first, every product below is far smaller
        img = img.reduce(factor)
    hs = params.hash_size
    grey = img.convert("L").resize((hs * 4, hs * 4), Image.Resampling.LANCZOS)  # what imagehash.phash resizes to
    import imagehash  # only here: scoring or predicting with the student needs no pHash (nor the package)

    ph = imagehash.phash(grey, hash_size=hs)
    small_rgb = np.asarray(img.resize((STATS, STATS), Image.Resampling.BILINEAR), dtype=np.uint8).reshape(-1, 3)
    hist = np.bincount(np.asarray(grey.resize((STATS, STATS), Image.Resampling.BILINEAR)).ravel(), minlength=256)
    prob = hist[hist > 0] / hist.sum()
    return {
        "reason": None,
        "format": dec.format,
        "width": dec.width,  # full size, after EXIF rotation
        "height": dec.height,
        "warnings": dec.warnings,
        "std": round(float(small_rgb.std(axis=0).max()), 3),  # per channel: hue changes count
        "entropy": round(float(-(prob * np.log2(prob)).sum()), 3),  # of the grey histogram, bits
        "phash": str(ph),
        "pixels": resize_square(img, params.image_size, params.resize).tobytes(),
        "small": resize_square(img, SMALL, "crop").tobytes(),  # for duplicate verification
    }
