"""Pictures for people: masks overlaid on slices, tiled into one PNG (contact sheets, demo panels)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def palette() -> np.ndarray:
    """256 well-separated colours (golden-ratio hues); id 0 (background) is black."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(1, 256):
        h = (i * 0.618034) % 1.0
        rgb = np.clip(np.abs((h * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
        pal[i] = (55 + 200 * rgb).astype(np.uint8)
    return pal


def overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """uint8 (H,W) slice + label map -> RGB with every labelled pixel tinted by its id's colour."""
    gray = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    if mask is None:
        return gray.astype(np.uint8)
    pal = palette()
    m = np.asarray(mask).astype(np.int64) % 256
    return np.where(m[..., None] > 0, 0.45 * gray + 0.55 * pal[m].astype(np.float32), gray).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], titles: list[list[str]] | None = None, tile: int = 256) -> Image.Image:
    """Tiles (RGB or gray arrays) in rows, each resized to tile x tile, with an optional title on each."""
    n_cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (n_cols * tile, len(rows) * tile), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for y, row in enumerate(rows):
        for x, arr in enumerate(row):
            pic = Image.fromarray(arr).convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
            sheet.paste(pic, (x * tile, y * tile))
            if titles is not None and titles[y][x]:
                draw.text((x * tile + 4, y * tile + 4), titles[y][x], fill=(255, 255, 0))
    return sheet
