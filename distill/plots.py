"""Small PNG plots drawn with Pillow (no plotting library needed): bar charts and confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def bar_chart(values: list[float], labels: list[str], path: str | Path, title: str, width: int = 640) -> None:
    font = ImageFont.load_default(size=11)
    height, left, bottom, top = 320, 50, 40, 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black", font=font)
    peak = max(values) if values and max(values) > 0 else 1.0
    slot = (width - left - 10) / max(1, len(values))
    for i, (v, lab) in enumerate(zip(values, labels, strict=True)):
        h = (height - top - bottom) * v / peak
        x0 = left + i * slot + 1
        d.rectangle((x0, height - bottom - h, x0 + slot - 2, height - bottom), fill=(70, 110, 180))
        if len(values) <= 25 or i % max(1, len(values) // 10) == 0:
            d.text((x0, height - bottom + 4), lab, fill="black", font=font)
    d.text((4, top), f"{peak:g}", fill="black", font=font)
    d.line((left, height - bottom, width - 10, height - bottom), fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def confusion_image(cm: np.ndarray, names: list[str], path: str | Path, title: str) -> None:
    """Rows: true class, columns: predicted; cells shaded by row-normalised share, with counts."""
    font = ImageFont.load_default(size=10)
    k, cell, left, top = len(names), 34, 110, 40
    img = Image.new("RGB", (left + k * cell + 10, top + k * cell + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 6), title, fill="black", font=font)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        d.text((4, top + i * cell + 12), names[i][:16], fill="black", font=font)
        d.text((left + i * cell + 2, top - 14), str(i), fill="black", font=font)
        for j in range(k):
            shade = int(255 * (1 - share[i, j]))
            fill = (shade, shade, 255) if i == j else (255, shade, shade)
            x, y = left + j * cell, top + i * cell
            d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(200, 200, 200))
            d.text((x + 3, y + 11), str(int(cm[i, j])), fill="black", font=font)
    d.text((left, top + k * cell + 8), "columns: predicted class index", fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def message_image(path: str | Path, title: str, message: str) -> None:
    """A small PNG that says why there is no plot (DVC expects every declared plot file to exist)."""
    font = ImageFont.load_default(size=12)
    img = Image.new("RGB", (480, 80), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 10), title, fill="black", font=font)
    d.text((8, 40), message, fill=(120, 60, 0), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
