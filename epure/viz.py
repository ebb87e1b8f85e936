"""Pictures a person would rather look at than read: component grids and colour composites.

    epure data show data/synth --out grid.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from epure.io import atomic_write

# One distinct colour per component, in config order (carcass, crown, bead, flank, tread cap, ...).
PALETTE = np.array([
    [230, 57, 70], [69, 123, 157], [244, 162, 97], [42, 157, 143], [131, 56, 236],
    [255, 209, 102], [6, 214, 160], [239, 71, 111], [17, 138, 178], [140, 140, 140],
], dtype=np.float32)


def to_float(masks: np.ndarray) -> np.ndarray:
    """uint8 0..255 or float 0..1 masks as float32 in [0, 1]."""
    masks = np.asarray(masks)
    return masks.astype(np.float32) / 255.0 if masks.dtype == np.uint8 else masks.astype(np.float32)


def composite(masks: np.ndarray, mirror: bool = True) -> np.ndarray:
    """RGB uint8 picture of one design's components [M, H, W] overlaid in colour, on white.

    With ``mirror`` the half section is reflected into the whole tire section the engineers draw.
    """
    masks = to_float(masks)
    m = masks.shape[0]
    colours = PALETTE[np.arange(m) % len(PALETTE)]
    weight = masks.sum(0, keepdims=True)
    mixed = np.einsum("mhw,mc->hwc", masks, colours) / np.maximum(weight[0][..., None], 1.0)
    alpha = np.clip(weight[0], 0.0, 1.0)[..., None]
    rgb = (alpha * mixed + (1 - alpha) * 255.0).astype(np.uint8)
    if mirror:
        rgb = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
    return rgb


def grid(tiles: list[list[np.ndarray]], scale: int = 3, pad: int = 2) -> Image.Image:
    """Lay out rows of tiles (grayscale [H, W] floats/uint8 or RGB [H, W, 3] uint8) on a light grey sheet."""
    rows = [[_as_rgb(t) for t in row] for row in tiles]
    height = max(t.shape[0] for row in rows for t in row)
    widths = [max((row[c].shape[1] for row in rows if c < len(row)), default=0) for c in range(max(map(len, rows)))]
    sheet = np.full((len(rows) * (height + pad) + pad, sum(widths) + pad * (len(widths) + 1), 3), 200, np.uint8)
    for r, row in enumerate(rows):
        x = pad
        for c, tile in enumerate(row):
            y = pad + r * (height + pad)
            sheet[y: y + tile.shape[0], x: x + tile.shape[1]] = tile
            x += widths[c] + pad
    image = Image.fromarray(sheet)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def _as_rgb(tile: np.ndarray) -> np.ndarray:
    tile = np.asarray(tile)
    if tile.ndim == 3:
        return tile.astype(np.uint8)
    gray = (np.clip(to_float(tile), 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def design_grid(designs: np.ndarray, scale: int = 3) -> Image.Image:
    """One row per design [N, M, H, W]: each component, then the colour composite."""
    return grid([[*d, composite(d)] for d in designs], scale=scale)


def save_png(image: Image.Image | np.ndarray, path: Path) -> None:
    """Write a PNG atomically (a reader never sees half a picture)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def bar_chart(groups: list[str], series: list[tuple[str, list[float | None]]], title: str,
              width: int = 900, height: int = 380) -> Image.Image:
    """Grouped vertical bars on a 0..1 axis: one group per metric, one bar (and legend entry) per series.

    A missing value (None or NaN) leaves a gap marked "n/a", so a run without that metric is not read as 0.
    """
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, 16, 40 + 18 * len(series), 44
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.text((left, 8), title, fill="black", font=_font(16))
    for i, (label, _) in enumerate(series):  # legend under the title
        y = 32 + 18 * i
        draw.rectangle([left, y + 2, left + 12, y + 14], fill=tuple(int(c) for c in PALETTE[i % len(PALETTE)]))
        draw.text((left + 18, y), label, fill="black", font=_font(13))
    for tick in np.linspace(0.0, 1.0, 5):
        y = top + plot_h * (1 - tick)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((8, y - 7), f"{tick:.2f}", fill=(90, 90, 90), font=_font(12))
    slot = plot_w / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for g, name in enumerate(groups):
        x0 = left + g * slot + slot * 0.1
        for s, (_, values) in enumerate(series):
            value = values[g]
            x = x0 + s * bar
            if value is None or not np.isfinite(value):
                draw.text((x + 2, top + plot_h - 16), "n/a", fill=(150, 150, 150), font=_font(11))
                continue
            y = top + plot_h * (1 - min(max(value, 0.0), 1.0))
            draw.rectangle([x, y, x + bar - 3, top + plot_h], fill=tuple(int(c) for c in PALETTE[s % len(PALETTE)]))
            draw.text((x, y - 14), f"{value:.2f}", fill="black", font=_font(11))
        draw.text((left + (g + 0.5) * slot, top + plot_h + 8), name, fill="black", font=_font(13), anchor="ma")
    draw.line([left, top + plot_h, width - right, top + plot_h], fill="black")
    return image


def side_by_side(pictures: list[Image.Image | None], titles: list[str], height: int = 560,
                 pad: int = 12) -> Image.Image:
    """Pictures scaled to one height, in a row, each under its title; None is a blank panel saying so."""
    scaled = []
    for picture in pictures:
        if picture is None:
            blank = Image.new("RGB", (height // 2, height), (240, 240, 240))
            ImageDraw.Draw(blank).text((10, height // 2), "no sample grid", fill=(120, 120, 120), font=_font(13))
            scaled.append(blank)
        else:
            scaled.append(picture.convert("RGB").resize(
                (max(1, round(picture.width * height / picture.height)), height), Image.LANCZOS))
    sheet = Image.new("RGB", (sum(p.width for p in scaled) + pad * (len(scaled) + 1), height + 30 + pad), "white")
    draw, x = ImageDraw.Draw(sheet), pad
    for picture, title in zip(scaled, titles):
        draw.text((x, 6), title, fill="black", font=_font(14))
        sheet.paste(picture, (x, 30))
        x += picture.width + pad
    return sheet


def stack(pictures: list[Image.Image]) -> Image.Image:
    """Pictures one above the other on white, left-aligned."""
    sheet = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for picture in pictures:
        sheet.paste(picture, (0, y))
        y += picture.height
    return sheet
