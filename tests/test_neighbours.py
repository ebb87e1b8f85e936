"""The nearest-training-design references on constructed designs whose neighbours are known."""

from __future__ import annotations

import numpy as np
import pytest

from epure.metrics import binarize, iou
from epure.neighbours import knn_completion, nearest_designs


def designs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 designs [n, 3, 16, 8] whose three components are bars at one random row each, no two
    alike in the first two, and their conditions (those two rows, so conditions and masks agree)."""
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(16 * 16)[:n]
    rows = np.stack([pairs // 16, pairs % 16, rng.integers(0, 16, n)], axis=1)
    images = np.zeros((n, 3, 16, 8), dtype=np.uint8)
    for m in range(3):
        images[np.arange(n), m, rows[:, m]] = 255
    return images, rows[:, :2].astype(np.float32)


def test_a_training_design_is_its_own_nearest_neighbour() -> None:
    images, conditions = designs(60)
    index = nearest_designs(images, conditions, images[:10], conditions[:10], [0, 1], k=1)
    np.testing.assert_array_equal(index[:, 0], np.arange(10))
    completed = knn_completion(images, conditions, images[:10], conditions[:10], [0, 1, 2], k=1)
    np.testing.assert_array_equal(completed, binarize(images[:10]))


def test_the_conditions_break_ties_between_equal_masks() -> None:
    images = np.zeros((2, 2, 8, 8), dtype=np.uint8)
    images[:, 0, 2] = 255  # the observed component is the same in both training designs
    images[1, 1, 6] = 255  # the other differs
    conditions = np.array([[10.0], [20.0]], dtype=np.float32)
    query = images[:1].copy()
    for wanted, c in [(0, 11.0), (1, 19.0)]:
        index = nearest_designs(images, conditions, query, np.array([[c]], np.float32), [0], k=1)
        assert index[0, 0] == wanted


def test_knn_completion_averages_and_thresholds_the_neighbours() -> None:
    # three training designs agree on the observed bar; two of three put the target bar on row 5, one on row 9
    images = np.zeros((3, 2, 16, 8), dtype=np.uint8)
    images[:, 0, 2] = 255
    images[:2, 1, 5] = 255
    images[2, 1, 9] = 255
    conditions = np.zeros((3, 1), dtype=np.float32)
    completed = knn_completion(images, conditions, images[:1], conditions[:1], [0], k=3)
    expected = np.zeros((16, 8), dtype=bool)
    expected[5] = True  # the majority; row 9 is in one neighbour of three
    np.testing.assert_array_equal(completed[0, 1], expected)
    assert iou(completed[0, 0], binarize(images[0, 0])) == 1.0


def test_nearest_designs_in_chunks_match_one_pass_and_check_k() -> None:
    images, conditions = designs(80, seed=1)
    queries, query_conditions = designs(30, seed=2)
    whole = nearest_designs(images, conditions, queries, query_conditions, [1], k=4)
    chunked = nearest_designs(images, conditions, queries, query_conditions, [1], k=4, chunk=7)
    np.testing.assert_array_equal(np.sort(whole, axis=1), np.sort(chunked, axis=1))
    with pytest.raises(ValueError, match="k="):
        nearest_designs(images, conditions, queries, query_conditions, [1], k=81)
