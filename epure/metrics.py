"""Metric functions on masks and samples: pure numpy (and scipy), vectorised over a leading batch axis.

Masks are arrays ``[..., H, W]``; every function works on many designs at once so that evaluating thousands
of designs costs a few array passes, not a Python loop per design. Definitions are in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage, stats

# 4-connectivity inside each image of a stack [N, H, W], never across images.
_STACKED_CROSS = np.zeros((3, 3, 3), dtype=bool)
_STACKED_CROSS[1] = ndimage.generate_binary_structure(2, 1)


def binarize(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean masks: above ``threshold`` on [0, 1] floats, or above ``threshold * 255`` for uint8 pixels.

    The same rule as ``measure_dimensions``, so a mask means the same thing to every metric.
    """
    masks = np.asarray(masks)
    return masks > (threshold * 255 if masks.dtype == np.uint8 else threshold)


def iou(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> np.ndarray:
    """Intersection over union of boolean masks ``[..., H, W]`` -> ``[...]``.

    ``empty`` is the value when both masks are empty: 1 when comparing a mask with its target (both
    correctly empty), 0 when measuring how much two components overlap (nothing overlaps).
    """
    inter = np.logical_and(a, b).sum(axis=(-2, -1))
    union = np.logical_or(a, b).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), empty)


def dice(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> np.ndarray:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of boolean masks ``[..., H, W]``; ``empty`` as in :func:`iou`."""
    inter = np.logical_and(a, b).sum(axis=(-2, -1))
    total = a.sum(axis=(-2, -1)) + b.sum(axis=(-2, -1))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), empty)


def piece_counts(masks: np.ndarray) -> np.ndarray:
    """Number of 4-connected pieces of each boolean mask in ``[N, H, W]`` -> int ``[N]`` (0 for empty).

    One ``ndimage.label`` call labels the whole stack with a structure that never links two images. Labels are
    numbered in scan order, so image i owns the labels between the running maximum before it and its own.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"piece_counts expects [N, H, W] masks, got shape {masks.shape}")
    if len(masks) == 0:
        return np.zeros(0, dtype=np.int64)
    labels, _ = ndimage.label(masks, structure=_STACKED_CROSS)
    highest = np.maximum.accumulate(labels.reshape(len(masks), -1).max(axis=1).astype(np.int64))
    return np.diff(highest, prepend=0)


def centre_of_mass(masks: np.ndarray) -> np.ndarray:
    """(row, column) centre of mass of each boolean mask ``[..., H, W]`` in pixel indices -> ``[..., 2]``.

    Row 0 is the top row, as in ``scipy.ndimage.center_of_mass``; an empty mask has no centre (NaN).
    """
    masks = np.asarray(masks, dtype=bool)
    area = masks.sum(axis=(-2, -1)).astype(np.float64)
    rows = masks.sum(axis=-1) @ np.arange(masks.shape[-2], dtype=np.float64)
    cols = masks.sum(axis=-2) @ np.arange(masks.shape[-1], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([rows / area, cols / area], axis=-1)


def wasserstein(u: np.ndarray, v: np.ndarray) -> float:
    """1-D Wasserstein (earth mover's) distance between two samples; NaNs (undefined values) are dropped.

    NaN when either sample has no defined value, so a missing quantity is never reported as a perfect match.
    """
    u, v = np.asarray(u, dtype=np.float64).ravel(), np.asarray(v, dtype=np.float64).ravel()
    u, v = u[np.isfinite(u)], v[np.isfinite(v)]
    if len(u) == 0 or len(v) == 0:
        return float("nan")
    return float(stats.wasserstein_distance(u, v))


def bootstrap_std(statistic: Callable[[np.ndarray], float], n: int, n_boot: int = 200, seed: int = 0) -> float:
    """Standard deviation of ``statistic(index)`` over ``n_boot`` resamples of ``n`` examples with replacement.

    ``statistic`` takes an index array into the examples, so paired quantities (a generated design and the real
    one with the same conditions) are resampled together. NaN with fewer than two resamples or examples.
    """
    if n_boot < 2 or n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if len(values) >= 2 else float("nan")
