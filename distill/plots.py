"""A small PNG bar chart drawn with Pillow, for stage outputs a user opens directly.

The report page draws its plots with matplotlib.
"""

from __future__ import annotations

from pathlib import Path

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
