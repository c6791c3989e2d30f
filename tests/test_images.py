"""Safe decoding against hostile and broken image files (docs/reliability.md), on generated files."""

from __future__ import annotations

import io
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from crawl.images import AnalyzeParams, DecodeLimits, ImageRejected, analyze_file, decode_image, resize_square


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring any size, with a tiny IDAT: a few bytes, huge claims."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rejected(data: bytes, limits: DecodeLimits = DecodeLimits()) -> str:  # noqa: B008
    with pytest.raises(ImageRejected) as e:
        decode_image(data, limits)
    return e.value.reason


def test_zero_bytes() -> None:
    assert rejected(b"") == "empty"


def test_random_bytes() -> None:
    assert rejected(np.random.default_rng(0).bytes(5000)) == "unidentified"


def test_html_error_page() -> None:
    assert rejected(b"<!DOCTYPE html><html><body>404</body></html>") == "unidentified"


def test_svg() -> None:
    assert rejected(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>') == "unsupported_format"
    assert rejected(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>') == "unsupported_format"


def test_truncated_jpeg_and_the_global_flag_untouched() -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    assert rejected(data[: len(data) // 2]) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_with_bad_crc() -> None:
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 200, 30)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # flip bits inside the IDAT payload: its CRC no longer matches
    assert rejected(bytes(data)) == "corrupt"


def test_png_bomb_is_refused_from_the_header() -> None:
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 200
    t0 = time.perf_counter()
    assert rejected(bomb) == "too_many_pixels"
    assert time.perf_counter() - t0 < 1.0  # nothing was decoded


def test_pillow_warning_zone_is_an_error_too() -> None:
    # over Pillow's MAX_IMAGE_PIXELS (warning) but under 2x (error): our caller raised its own cap
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)
    assert rejected(png_header_only(side, side), DecodeLimits(max_pixels=10**9)) == "too_many_pixels"
    # and between our cap and Pillow's limits
    assert rejected(png_header_only(8000, 6000)) == "too_many_pixels"


def test_zero_width_header() -> None:
    assert rejected(png_header_only(0, 10)) == "corrupt"


@pytest.mark.parametrize(
    "head",
    [
        b"8BPS\x00\x01" + b"\0" * 40,  # PSD
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",  # PDF
        b"SIMPLE  =                    T" + b" " * 50,  # FITS
        b"II*\x00\x08\x00\x00\x00" + b"\0" * 40,  # TIFF
        b"DDS |\x00\x00\x00" + b"\0" * 120,  # DDS
    ],
)
def test_other_formats_are_refused_without_running_any_plugin(head: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*a: object, **k: object) -> None:
        raise AssertionError("a subprocess (Ghostscript?) was started")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert rejected(head) == "format_not_allowed"


def test_tiff_bytes_pillow_could_open_are_still_refused() -> None:
    assert rejected(encode(Image.new("RGB", (8, 8)), "TIFF")) == "format_not_allowed"


def test_cmyk_jpeg_becomes_the_right_rgb() -> None:
    rgb = Image.new("RGB", (32, 32), (200, 60, 40))
    data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    out = decode_image(data).rgb
    assert out.shape == (32, 32, 3)
    assert np.abs(out.reshape(-1, 3).mean(0) - [200, 60, 40]).max() < 12


def test_palette_png_with_transparency_is_on_white(recwarn: pytest.WarningsRecorder) -> None:
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 5, 10))  # left half red, right half index 0 = transparent
    data = encode(im, "PNG", transparency=0)
    out = decode_image(data).rgb
    assert tuple(out[5, 2]) == (255, 0, 0) and tuple(out[5, 8]) == (255, 255, 255)
    assert len(recwarn) == 0


def test_transparent_rgba_background_is_white_not_black() -> None:
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (3, 3, 7, 7))
    out = decode_image(encode(im, "PNG")).rgb
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[5, 5]) == (0, 0, 255)


def test_16_bit_greyscale_keeps_its_levels() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    out = decode_image(data).rgb
    assert len(np.unique(out[..., 0])) >= 200
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255


def test_animations_first_frame_and_frame_cap() -> None:
    frames = [Image.new("RGB", (12, 12), c) for c in ((250, 0, 0), (0, 0, 250))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(decode_image(gif).rgb[0, 0]) == (250, 0, 0) or decode_image(gif).rgb[0, 0, 0] > 200
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(webp).rgb[0, 0, 0] > 200
    many = [Image.new("RGB", (4, 4), (255 * (i % 2),) * 3) for i in range(5000)]
    big = encode(many[0], "GIF", save_all=True, append_images=many[1:])
    t0 = time.perf_counter()
    assert rejected(big) == "too_many_frames"
    assert time.perf_counter() - t0 < 10


def exif_jpeg(orientation_payload: bytes) -> bytes:
    """A JPEG whose APP1 segment carries ``orientation_payload`` as its EXIF block."""
    im = Image.new("RGB", (40, 20), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left edge
    data = encode(im, "JPEG", quality=95)
    app1 = b"\xff\xe1" + struct.pack(">H", len(orientation_payload) + 2) + orientation_payload
    return data[:2] + app1 + data[2:]


def tiff_orientation(value: int) -> bytes:
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, value, 0) + struct.pack(">I", 0)
    return b"Exif\0\0" + b"MM\x00*" + struct.pack(">I", 8) + ifd


def test_exif_orientation_6_is_applied() -> None:
    dec = decode_image(exif_jpeg(tiff_orientation(6)))
    assert dec.rgb.shape == (40, 20, 3) and (dec.width, dec.height) == (20, 40)
    assert dec.rgb[2, 10, 1] < 80 and dec.rgb[-3, 10, 1] > 200  # the red strip is now at the top
    assert dec.warnings == []


def test_malformed_exif_is_tolerated_unrotated() -> None:
    broken = b"Exif\0\0Exif\0\0" + b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 30) + b"\x01\x12\x00\x05"
    dec = decode_image(exif_jpeg(broken))
    assert dec.rgb.shape == (20, 40, 3) and dec.warnings == ["exif_unreadable"]
    zero_rational = b"Exif\0\0MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    zero_rational += struct.pack(">HHII", 0x011A, 5, 1, 26) + struct.pack(">I", 0) + struct.pack(">II", 0, 0)
    assert decode_image(exif_jpeg(zero_rational)).rgb.shape == (20, 40, 3)


def test_exif_unreadable_is_flagged_when_pillow_cannot_parse_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Image.Image) -> None:
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(Image.Image, "getexif", boom)
    dec = decode_image(exif_jpeg(tiff_orientation(6)))
    assert dec.warnings == ["exif_unreadable"] and dec.rgb.shape == (20, 40, 3)


def test_byte_cap_is_checked_before_decoding() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    assert rejected(data, DecodeLimits(max_bytes=len(data) - 1)) == "too_large"


def test_jpeg_draft_keeps_full_size_metadata() -> None:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)), "JPEG")
    dec = decode_image(data, draft=48)
    assert (dec.width, dec.height) == (800, 600) and min(dec.rgb.shape[:2]) >= 48
    assert dec.rgb.shape[0] < 600  # decoded at a reduced scale


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_resize_keeps_the_aspect_ratio(mode: str) -> None:
    img = np.zeros((20, 60, 3), dtype=np.uint8)  # black, wide
    out = resize_square(img, 10, mode)
    assert out.shape == (10, 10, 3)
    if mode == "crop":
        assert out.max() == 0
    else:
        assert tuple(out[0, 5]) == (255, 255, 255) and out[5, 5].max() == 0


def test_analyze_file_reports_what_the_clean_stage_needs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "x.png"
    p.write_bytes(encode(Image.new("RGB", (30, 20), (0, 128, 255)), "PNG"))
    out = analyze_file(p, AnalyzeParams(image_size=16))
    assert out["reason"] is None and (out["width"], out["height"], out["format"]) == (30, 20, "PNG")
    assert len(out["pixels"]) == 16 * 16 * 3 and len(out["phash"]) == 16
    assert out["std"] == 0.0 and out["entropy"] == 0.0
    (tmp_path / "bad.jpg").write_bytes(b"<html>")
    assert analyze_file(tmp_path / "bad.jpg", AnalyzeParams())["reason"] == "unidentified"
