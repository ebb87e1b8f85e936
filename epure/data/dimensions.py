"""Width and height of a half cross-section, measured as the dataset defines them.

    epure evaluate --checkpoint outputs/mmvaeplus/<run>   # measures generated sections this way

The masks are the left half (columns 0..W-1) of a mirror-symmetric section. With the union of all
components as the section:

- ``width_px``  = ``min(2 * W, 2 * (W - leftmost occupied column) + 1)``, the width of the mirrored section;
- ``height_px`` = ``last occupied row - first occupied row + 2``.

An empty section measures 0 x 0. These are the public toy set's own definitions (``../shared/README.md``),
so generated sections are measured exactly like the training data.
"""

from __future__ import annotations

import numpy as np


def measure_dimensions(sections: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(width_px, height_px) of each section in ``sections`` [N, H, W] (union masks, any numeric dtype).

    Values above ``threshold`` (on a [0, 1] scale, or on [0, 255] for uint8) count as occupied.
    """
    sections = np.asarray(sections)
    if sections.ndim != 3:
        raise ValueError(f"measure_dimensions expects [N, H, W] sections, got shape {sections.shape}")
    cut = threshold * 255 if sections.dtype == np.uint8 else threshold
    occupied = sections > cut
    n, height, width = occupied.shape
    cols = occupied.any(axis=1)  # [N, W]
    rows = occupied.any(axis=2)  # [N, H]
    nonempty = cols.any(axis=1)
    leftmost = np.argmax(cols, axis=1)
    first_row = np.argmax(rows, axis=1)
    last_row = height - 1 - np.argmax(rows[:, ::-1], axis=1)
    width_px = np.minimum(2 * width, 2 * (width - leftmost) + 1)
    height_px = last_row - first_row + 2
    return np.where(nonempty, width_px, 0), np.where(nonempty, height_px, 0)


def union_of_components(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean union over the component axis of ``masks`` [N, M, H, W]."""
    masks = np.asarray(masks)
    cut = threshold * 255 if masks.dtype == np.uint8 else threshold
    return (masks > cut).any(axis=1)


def achievable_dimensions(image_size: list[int] | tuple[int, int]) -> dict[str, np.ndarray]:
    """Every width and height a section in this image size can measure, found by measuring one-pixel shapes."""
    rows, cols = image_size
    by_column = np.zeros((cols, rows, cols), dtype=bool)
    by_column[np.arange(cols), 0, np.arange(cols)] = True
    by_rows = np.zeros((rows, rows, cols), dtype=bool)
    by_rows[:, 0, 0] = True
    by_rows[np.arange(rows), np.arange(rows), 0] = True
    widths, _ = measure_dimensions(by_column)
    _, heights = measure_dimensions(by_rows)
    return {"width_px": np.unique(widths), "height_px": np.unique(heights)}
