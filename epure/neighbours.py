"""References that need no training, built from the training designs nearest to a partly observed design.

    epure evaluate --checkpoint outputs/mmvaeplus/<run>   # the k-NN baseline and references

- ``nearest_designs``: the k training designs nearest to each query in its observed components and its
  conditions;
- ``knn_completion``: the k-NN completion baseline, the average of those neighbours' masks, thresholded;
- the spread of real designs that look alike in one component (``epure.evaluate`` uses the neighbours' own
  unobserved components as the real counterpart of the diversity of a model's completions).

The distance adds two parts, each divided by its mean over random pairs of training designs so that they
weigh alike: the Hamming distance between the observed masks (pixels that differ, over the observed
components) and the squared difference of the standardised conditions. Definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

import numpy as np

from epure.metrics import binarize


def _flat(images: np.ndarray, observed: list[int]) -> np.ndarray:
    """Observed components of uint8 or bool designs [N, M, H, W] as float32 0/1 rows [N, P]."""
    return binarize(images[:, observed]).reshape(len(images), -1).astype(np.float32)


def nearest_designs(train_images: np.ndarray, train_conditions: np.ndarray, query_images: np.ndarray,
                    query_conditions: np.ndarray, observed: list[int], k: int, chunk: int = 512) -> np.ndarray:
    """Indices [N, k] of the ``k`` training designs nearest to each query in the ``observed`` components
    and the conditions (raw; standardised here with the training designs' statistics)."""
    if not 0 < k <= len(train_images):
        raise ValueError(f"need 0 < k <= {len(train_images)} training designs, got k={k}")
    train = _flat(train_images, observed)
    occupancy = train.mean(axis=0, dtype=np.float64)
    mean_hamming = max(float(2 * (occupancy * (1 - occupancy)).sum()), 1e-9)  # over random pairs
    train_sizes = train.sum(axis=1, dtype=np.float64)
    cond_mean = train_conditions.mean(axis=0)
    cond_std = np.where(train_conditions.std(axis=0) > 1e-9, train_conditions.std(axis=0), 1.0)
    train_c = (train_conditions - cond_mean) / cond_std
    cond_scale = 2.0 * max(train_conditions.shape[1], 1)  # mean squared distance of standardised columns
    out = np.empty((len(query_images), k), dtype=np.int64)
    for start in range(0, len(query_images), chunk):
        query = _flat(query_images[start: start + chunk], observed)
        hamming = query.sum(axis=1, dtype=np.float64)[:, None] + train_sizes[None, :] - 2.0 * (query @ train.T)
        query_c = (query_conditions[start: start + chunk] - cond_mean) / cond_std
        cond = ((query_c[:, None, :] - train_c[None, :, :]) ** 2).sum(axis=-1)
        distance = hamming / mean_hamming + cond / cond_scale
        out[start: start + len(query)] = np.argpartition(distance, k - 1, axis=1)[:, :k]
    return out


def knn_completion(train_images: np.ndarray, train_conditions: np.ndarray, query_images: np.ndarray,
                   query_conditions: np.ndarray, observed: list[int], k: int = 16, chunk: int = 256) -> np.ndarray:
    """Every component of each query design from its ``k`` nearest training designs: the share of them in
    which a pixel is occupied, above 0.5 -> bool [N, M, H, W]."""
    index = nearest_designs(train_images, train_conditions, query_images, query_conditions, observed, k)
    train = binarize(train_images)
    if len(index) == 0:
        return np.zeros((0, *train.shape[1:]), dtype=bool)
    return np.concatenate([np.count_nonzero(train[index[i: i + chunk]], axis=1) * 2 > k
                           for i in range(0, len(index), chunk)])
