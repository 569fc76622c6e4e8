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


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               hlines: dict[str, float] | None = None, size: tuple[int, int] = (720, 440)) -> Image.Image:
    """A plain line chart (no plotting library needed): series name -> [(x, y)], dashed reference lines."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    names = [*series, *(f"- - {n}" for n in hlines or {})]
    left, top, bottom = 60, 34, 44
    right = min(w // 2, 44 + max(int(d.textlength(n)) for n in names))  # the legend's longest name fits
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts] + list((hlines or {}).values())
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * max(y1 - y0, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / max(x1 - x0, 1e-9) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.line([left - 4, py(yv), left, py(yv)], fill=(0, 0, 0))
        d.text((4, py(yv) - 6), f"{yv:.3f}", fill=(0, 0, 0))
    for xv in sorted(set(xs)):
        d.line([px(xv), h - bottom, px(xv), h - bottom + 4], fill=(0, 0, 0))
        d.text((px(xv) - 10, h - bottom + 6), f"{xv:g}", fill=(0, 0, 0))
    d.text((left, 4), title, fill=(0, 0, 0))
    d.text(((left + w - right) // 2 - 20, h - 18), xlabel, fill=(0, 0, 0))
    d.text((4, 20), ylabel, fill=(0, 0, 0))
    pal = palette()
    legend_y = top
    for i, (name, pts) in enumerate(series.items()):
        colour = tuple(int(c * 0.8) for c in pal[i * 3 + 1])
        pts = sorted(pts)
        d.line([(px(x), py(y)) for x, y in pts], fill=colour, width=3)
        for x, y in pts:
            d.ellipse([px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4], fill=colour)
        d.line([w - right + 10, legend_y + 6, w - right + 30, legend_y + 6], fill=colour, width=3)
        d.text((w - right + 34, legend_y), name, fill=(0, 0, 0))
        legend_y += 18
    for name, yv in (hlines or {}).items():
        for xa in range(left, w - right, 12):
            d.line([xa, py(yv), min(xa + 6, w - right), py(yv)], fill=(120, 120, 120), width=2)
        d.text((left + 6, py(yv) - 13), name, fill=(90, 90, 90))  # on the line too: the legend's are alike
        d.text((w - right + 10, legend_y), f"- - {name}", fill=(90, 90, 90))
        legend_y += 18
    return img
