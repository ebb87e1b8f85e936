"""Pictures a person would rather look at than read: component grids and colour composites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
