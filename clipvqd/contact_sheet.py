"""Contact sheets: prompts written beside (above) the images made from them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipvqd.data import make_grid


def contact_sheet(rows: list[tuple[str, np.ndarray | object]], per_row: int = 16, label_width: int = 260) -> Image.Image:
    """One band per prompt: the prompt's text on the left, its images tiled on the right.

    ``rows``: (label, images) pairs; images are float (N, 3, h, w) in [-1, 1] or uint8 (N, h, w, 3).
    """
    font = ImageFont.load_default()
    bands = []
    for label, images in rows:
        grid = make_grid(images, nrow=per_row)
        band = Image.new("RGB", (label_width + grid.shape[1], grid.shape[0]), "white")
        band.paste(Image.fromarray(grid), (label_width, 0))
        draw = ImageDraw.Draw(band)
        draw.multiline_text((6, 6), _wrap(label, 38), fill="black", font=font, spacing=3)
        bands.append(band)
    width = max(b.width for b in bands)
    sheet = Image.new("RGB", (width, sum(b.height for b in bands)), "white")
    top = 0
    for band in bands:
        sheet.paste(band, (0, top))
        top += band.height
    return sheet


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
