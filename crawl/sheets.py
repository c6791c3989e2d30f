"""Contact sheets: grids of small images with captions, saved as PNG for a person to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION = 12  # pixels of caption under each tile


def contact_sheet(
    rows: list[list[tuple[np.ndarray, str]]],
    path: str | Path,
    tile: int = 64,
    title: str | None = None,
    outline_first: bool = True,
) -> None:
    """Save ``rows`` of (image (H, W, 3) uint8, caption) as one PNG; optionally outline each row's first tile."""
    cols = max((len(r) for r in rows), default=1)
    head = 16 if title else 0
    font = ImageFont.load_default(size=10)
    width = max(cols * (tile + 4) + 4, int(font.getlength(title)) + 8 if title else 0)
    sheet = Image.new("RGB", (width, head + len(rows) * (tile + CAPTION + 6) + 4), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, (img, caption) in enumerate(row):
            x, y = 4 + c * (tile + 4), head + 4 + r * (tile + CAPTION + 6)
            thumb = Image.fromarray(img).resize((tile, tile), Image.Resampling.BILINEAR)
            sheet.paste(thumb, (x, y))
            if outline_first and c == 0 and len(row) > 1:
                draw.rectangle((x - 2, y - 2, x + tile + 1, y + tile + 1), outline=(0, 160, 0), width=2)
            draw.text((x, y + tile + 1), caption[:12], fill=(40, 40, 40), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def grid(items: list[tuple[np.ndarray, str]], cols: int = 12) -> list[list[tuple[np.ndarray, str]]]:
    """Lay a flat list out in rows of ``cols``."""
    return [items[i : i + cols] for i in range(0, len(items), cols)]
