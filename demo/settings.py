"""The demo world's settings (``world.mix`` and ``world.render`` in params), with no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass

from kd3util import knob


@dataclass(frozen=True)
class RenderParams:
    """How a 28x28 grey Fashion-MNIST item becomes a web-style photo (``world.render`` in params)."""

    min_size: int = knob(32, 8, 1024)  # shorter output side, pixels
    max_size: int = knob(160, 8, 2048)  # longer output side, pixels
    nonsquare_prob: float = knob(0.35, 0, 1)  # share of images with aspect ratio != 1
    max_aspect: float = knob(1.6, 1, 4)  # largest width/height (or height/width) ratio
    tint_prob: float = knob(0.4, 0, 1)  # share of objects given a colour
    light_bg_prob: float = knob(0.05, 0, 1)  # light product-shot background
    dark_bg_prob: float = knob(0.85, 0, 1)  # dark studio backdrop; the rest get a mid-level colour
    bg_min_level: int = knob(1, 0, 255)  # darkest background channel level (0 = allow pure black)
    dark_bg_max: int = knob(4, 0, 255)  # brightest channel level of a dark backdrop
    object_scale: tuple[float, float] = knob((0.55, 1.0))  # object size relative to the canvas
    max_shift: float = knob(0.15, 0, 0.5)  # position jitter, fraction of the canvas
    max_rotation_deg: float = knob(10.0, 0, 180)
    blur_prob: float = knob(0.15, 0, 1)
    max_blur: float = knob(1.5, 0, 10)  # Gaussian radius at 28 px scale
    noise_std: float = knob(2.0, 0, 64)  # additive Gaussian noise, grey levels (std drawn up to this)
    formats: dict[str, float] = knob({"JPEG": 0.6, "PNG": 0.25, "WEBP": 0.15})  # encoding weights
    jpeg_quality: tuple[int, int] = knob((45, 95))


@dataclass(frozen=True)
class WorldMix:
    """Fractions of each class's result list (``world.mix``); they must sum to 1."""

    correct: float = knob(0.72, 0, 1)  # photos of the queried class
    wrong: float = knob(0.10, 0, 1)  # photos of another class (search noise)
    junk: float = knob(0.10, 0, 1)  # off-topic shapes, text, textures
    near_dup: float = knob(0.05, 0, 1)  # re-uploads of an earlier result (resized, re-encoded, cropped)
    broken: float = knob(0.03, 0, 1)  # 404s, HTML served as an image, truncated files
