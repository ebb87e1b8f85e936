"""Metric functions on masks and samples: pure numpy (and scipy), vectorised over a leading batch axis.

    >>> import numpy as np
    >>> from epure.metrics import iou
    >>> iou(np.eye(4, dtype=bool)[None], np.ones((1, 4, 4), dtype=bool))  # 4 of 16 pixels
    array([0.25])

Masks are arrays ``[..., H, W]``; every function works on many designs at once so that evaluating thousands
of designs costs a few array passes, not a Python loop per design. Definitions are in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage, spatial, stats

# 4-connectivity inside each image of a stack [N, H, W], never across images.
_STACKED_CROSS = np.zeros((3, 3, 3), dtype=bool)
_STACKED_CROSS[1] = ndimage.generate_binary_structure(2, 1)
# the thresholds training chooses among for its decision threshold (best_threshold)
THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(11))


def binarize(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean masks: above ``threshold`` on [0, 1] floats, or above ``threshold * 255`` for uint8 pixels.

    The same rule as ``measure_dimensions``, so a mask means the same thing to every metric.
    """
    masks = np.asarray(masks)
    return masks > (threshold * 255 if masks.dtype == np.uint8 else threshold)


def best_threshold(probabilities: np.ndarray, truth: np.ndarray, present: np.ndarray | None = None,
                   candidates: tuple[float, ...] = THRESHOLDS) -> float:
    """The threshold of ``candidates`` at which probabilities [N, M, H, W] best match the true masks (mean IoU
    over the (design, component) pairs that are ``present`` [N, M], default all); a tie goes to the candidate
    nearest 0.5.

    A decoder trained with occupied pixels weighted w times (``model.foreground_weight``) is calibrated to
    w-fold odds, so 0.5 draws its shapes thicker than the data's (a true probability of 1 / (1 + w));
    training picks the threshold on its validation designs' reconstructions (docs/metrics.md).
    """
    truth = np.asarray(truth, dtype=bool)
    present = np.ones(truth.shape[:2], dtype=bool) if present is None else np.asarray(present, dtype=bool)
    if not present.any():
        return 0.5
    scores = [float(iou(probabilities > t, truth)[present].mean()) for t in candidates]
    best = max(scores)
    return min((t for t, score in zip(candidates, scores) if score == best), key=lambda t: abs(t - 0.5))


def components_exclusive(images: np.ndarray) -> bool:
    """Whether no pixel of any design belongs to two components (uint8 or bool designs [N, M, H, W]); read
    in chunks of designs, so a large split is never copied whole."""
    return all(int(binarize(images[start: start + 4096]).sum(axis=1, dtype=np.int16).max(initial=0)) <= 1
               for start in range(0, len(images), 4096))


def components_whole(images: np.ndarray) -> np.ndarray:
    """Per component, whether it is one piece (or absent) in every design (uint8 or bool [N, M, H, W]) -> bool
    [M]: a component that is never in pieces in the training designs should not be in pieces in a generated
    one (``epure.sample.best_of``), while one that real designs split (some flanks) may be. Read in chunks."""
    images = np.asarray(images)
    whole = np.ones(images.shape[1], dtype=bool)
    for start in range(0, len(images), 4096):
        chunk = binarize(images[start: start + 4096])
        n, m = chunk.shape[:2]
        whole &= (piece_counts(chunk.reshape(n * m, *chunk.shape[2:])).reshape(n, m) <= 1).all(axis=0)
    return whole


def design_masks(probabilities: np.ndarray, exclusive: bool, threshold: float = 0.5) -> np.ndarray:
    """Boolean masks of whole designs from their components' probabilities [N, M, H, W].

    Each component is thresholded on its own. With ``exclusive`` components (one material per pixel, as in
    every design the model was trained on), two more kinds of pixel that no component claims are occupied:

    - where two components meet, each decoder hedges on which of them a boundary pixel belongs to, and
      thresholding each alone leaves a gap there (a bead that touches its carcass at a corner only): a pixel
      whose components' probabilities sum past one half (or past ``threshold`` if lower) is occupied. The gap's
      one half holds when a calibrated threshold is higher: at 0.65 it left 3.6% of a 40-minute model's unions
      in pieces, at one half 1.1% (docs/metrics.md);
    - a pixel enclosed by the design (a hole of its union, ``holes``) is occupied whatever its probabilities:
      a section is solid, and where three components meet each decoder leaves the corner pixel to the others
      (a one-pixel seam inside the crown; 57% of a 2,400-step ``small`` model's unconditional designs had one,
      against 2.7% of the synthetic training designs and none of the toy set's). Holes fill from their rim inwards.

    Such a pixel goes to the likeliest component that already reaches it (4-adjacent), so no component gains a
    piece; a gap pixel that no claimed component reaches stays empty.
    """
    probabilities = np.asarray(probabilities)
    own = probabilities > threshold
    if not exclusive:
        return own
    gap = ~own.any(axis=1, keepdims=True) & (probabilities.sum(axis=1, keepdims=True) > min(threshold, 0.5))
    masks = own | _claimed_by_neighbour(own, gap, probabilities)
    unclaimed = holes(masks.any(axis=1))[:, None]
    rows = np.flatnonzero(unclaimed.any(axis=(1, 2, 3)))  # only the designs with holes
    filled, unclaimed, probabilities = masks[rows], unclaimed[rows], probabilities[rows]
    while unclaimed.any():
        claimed = _claimed_by_neighbour(filled, unclaimed, probabilities)
        if not claimed.any():  # cannot happen for a hole (its rim is occupied), but never loop forever
            break
        filled |= claimed
        unclaimed &= ~claimed.any(axis=1, keepdims=True)
    masks[rows] = filled
    return masks


def _claimed_by_neighbour(masks: np.ndarray, free: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The pixels of ``free`` [N, 1, H, W] that some component of ``masks`` [N, M, H, W] reaches (4-adjacent),
    each given to the likeliest of those components -> bool [N, M, H, W]."""
    padded = np.pad(masks, [(0, 0), (0, 0), (1, 1), (1, 1)])
    reaches = padded[..., :-2, 1:-1] | padded[..., 2:, 1:-1] | padded[..., 1:-1, :-2] | padded[..., 1:-1, 2:]
    candidates = np.where(free & reaches, probabilities, -1.0)
    likeliest = candidates.argmax(axis=1)[:, None] == np.arange(probabilities.shape[1])[None, :, None, None]
    return likeliest & (candidates.max(axis=1, keepdims=True) >= 0.0)


def holes(masks: np.ndarray) -> np.ndarray:
    """The empty pixels of each boolean mask [N, H, W] that no 4-connected path of empty pixels joins to the
    image's border -> bool [N, H, W] (``ndimage.binary_fill_holes``, one call for the whole stack)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"holes expects [N, H, W] masks, got shape {masks.shape}")
    labels, _ = ndimage.label(~masks, structure=_STACKED_CROSS)
    outside = np.unique(np.concatenate([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], axis=None))
    return (labels > 0) & ~np.isin(labels, outside[outside > 0])


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


# ------------------------------------------------------------------------------ diversity and coverage

DESCRIPTORS = ("area", "com_y", "com_x", "top", "bottom", "left", "right", "thickness")


def component_descriptors(masks: np.ndarray) -> np.ndarray:
    """Eight numbers per component of each design: bool ``[N, M, H, W]`` -> float ``[N, M * 8]``.

    Per component, in ``DESCRIPTORS`` order: area (px), centre of mass (row, column), first and last occupied
    row, leftmost and rightmost occupied column, and mean thickness, 2 x area / perimeter (a band of
    thickness t and length L >> t has area L t and perimeter about 2 L; a one-pixel line scores about 1).
    An empty component has area and thickness 0 and sits at row and column -1, outside the grid: nowhere.
    """
    masks = np.asarray(masks, dtype=bool)
    n, m, h, w = masks.shape
    area = masks.sum(axis=(-2, -1)).astype(np.float64)
    com = centre_of_mass(masks)
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)  # [N, M, H], [N, M, W]
    top = rows.argmax(axis=-1).astype(np.float64)
    bottom = (h - 1 - rows[..., ::-1].argmax(axis=-1)).astype(np.float64)
    left = cols.argmax(axis=-1).astype(np.float64)
    right = (w - 1 - cols[..., ::-1].argmax(axis=-1)).astype(np.float64)
    padded = np.pad(masks, [(0, 0), (0, 0), (1, 1), (1, 1)])
    perimeter = (np.diff(padded, axis=-2) != 0).sum(axis=(-2, -1)) + (np.diff(padded, axis=-1) != 0).sum(axis=(-2, -1))
    thickness = 2.0 * area / np.maximum(perimeter, 1)
    empty = area == 0
    positions = [np.where(empty, -1.0, v) for v in (com[..., 0], com[..., 1], top, bottom, left, right)]
    features = np.stack([area, *positions, thickness], axis=-1)  # [N, M, 8]
    return features.reshape(n, m * len(DESCRIPTORS))


def standardise(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every feature matrix scaled by the reference's per-column mean and standard deviation.

    A column that is constant in the reference keeps unit scale, so a difference there still counts.
    """
    mean = reference.mean(axis=0)
    std = reference.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    return [(x - mean) / std for x in (reference, *others)]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return spatial.distance.cdist(np.asarray(a, np.float64), np.asarray(b, np.float64))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point of the same set (the point itself excluded)."""
    if not 0 < k < len(features):
        raise ValueError(f"k-NN radii need 0 < k < the number of points, got k={k} for {len(features)} points")
    d = _distances(features, features)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def manifold_scores(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision and recall of k-NN manifolds (Kynkaanniemi et al. 2019) and density and coverage
    (Naeem et al. 2020) of feature rows ``fake`` [F, D] against ``real`` [R, D].

    The manifold of a set is the union of balls around its points, each as wide as the point's distance to
    its k-th nearest neighbour in the set. precision: share of fake points inside the real manifold;
    recall: share of real points inside the fake manifold; density: real balls that hold a fake point,
    counted with multiplicity, per fake point and per k (about 1 when fake and real are alike, above 1 where
    fakes crowd where real points are dense); coverage: share of real points whose own ball holds a fake one.
    """
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    d = _distances(fake, real)  # [F, R]
    inside_real = d <= real_radii[None, :]
    return {"precision": float(inside_real.any(axis=1).mean()),
            "recall": float((d <= fake_radii[:, None]).any(axis=0).mean()),
            "density": float(inside_real.sum() / (k * len(fake))),
            "coverage": float((d.min(axis=0) <= real_radii).mean())}


def design_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every design of ``a`` with every design of ``b``, both bool [N, M, H, W] -> [len(a), len(b)].

    The design is one mask over all its components (a pixel of the carcass only matches a carcass pixel):
    intersections and unions are summed over the components. Two empty designs have IoU 1. Computed as a
    matrix product on the pixels that are occupied in at least one design, which is where the time goes.
    """
    a = np.asarray(a, dtype=bool).reshape(len(a), -1)
    b = np.asarray(b, dtype=bool).reshape(len(b), -1)
    used = a.any(axis=0) | b.any(axis=0)
    fa, fb = a[:, used].astype(np.float32), b[:, used].astype(np.float32)
    inter = (fa @ fb.T).astype(np.float64)  # exact: counts stay far below float32's 2**24
    union = fa.sum(1, dtype=np.float64)[:, None] + fb.sum(1, dtype=np.float64)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def nearest_iou(queries: np.ndarray, references: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For each design of ``queries``, its largest design IoU with any design of ``references`` -> [N]."""
    if len(references) == 0:
        raise ValueError("nearest_iou needs at least one reference design")
    return np.concatenate([design_iou_matrix(queries[i: i + chunk], references).max(axis=1)
                           for i in range(0, len(queries), chunk)]) if len(queries) else np.zeros(0)


def mean_pairwise_iou(designs: np.ndarray) -> float:
    """Mean design IoU over every pair of distinct designs of bool [N, M, H, W]; 1 would be N copies of one."""
    n = len(designs)
    if n < 2:
        return float("nan")
    matrix = design_iou_matrix(designs, designs)
    return float(matrix[np.triu_indices(n, k=1)].mean())


def mean_pairwise_iou_within(groups: np.ndarray) -> float:
    """Mean over groups of the mean design IoU among each group's members: bool [G, S, M, H, W], S >= 2.

    The diversity of several completions of one design: 1 when every completion is the same.
    """
    groups = np.asarray(groups, dtype=bool)
    g, s = groups.shape[:2]
    if s < 2 or g == 0:
        return float("nan")
    flat = groups.reshape(g, s, -1).astype(np.float32)
    inter = (flat @ flat.transpose(0, 2, 1)).astype(np.float64)
    sizes = np.diagonal(inter, axis1=1, axis2=2)
    union = sizes[:, :, None] + sizes[:, None, :] - inter
    pair_iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    upper = np.triu_indices(s, k=1)
    return float(pair_iou[:, upper[0], upper[1]].mean())
