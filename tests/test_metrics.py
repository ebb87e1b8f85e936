"""Metric functions on hand-made masks and samples whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from epure.metrics import binarize, bootstrap_std, centre_of_mass, dice, iou, piece_counts, wasserstein


def rectangle(r0: int, r1: int, c0: int, c1: int, shape: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Boolean mask with rows r0..r1-1 and columns c0..c1-1 set."""
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def test_iou_and_dice_of_two_overlapping_rectangles() -> None:
    a, b = rectangle(0, 4, 0, 4), rectangle(2, 6, 2, 6)  # 16 px each, 2x2 = 4 px shared, union 28
    assert iou(a, b) == pytest.approx(4 / 28)
    assert dice(a, b) == pytest.approx(2 * 4 / 32)
    assert iou(a, a) == 1.0 and dice(a, a) == 1.0
    assert iou(a, rectangle(5, 8, 5, 8)) == 0.0 and dice(a, rectangle(5, 8, 5, 8)) == 0.0


def test_empty_masks_follow_the_empty_rule() -> None:
    empty, full = np.zeros((8, 8), bool), rectangle(0, 2, 0, 2)
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0  # both correctly empty
    assert iou(empty, empty, empty=0.0) == 0.0 and dice(empty, empty, empty=0.0) == 0.0  # nothing overlaps
    assert iou(empty, full) == 0.0 and dice(full, empty) == 0.0


def test_iou_is_vectorised_over_leading_axes() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 3, 8, 8)) > 0.5, rng.random((5, 3, 8, 8)) > 0.5
    batched = iou(a, b)
    assert batched.shape == (5, 3)
    for i in range(5):
        for m in range(3):
            expected = (a[i, m] & b[i, m]).sum() / (a[i, m] | b[i, m]).sum()
            assert batched[i, m] == pytest.approx(expected)


def test_binarize_uses_half_scale_for_uint8_and_floats() -> None:
    np.testing.assert_array_equal(binarize(np.array([0, 127, 128, 255], np.uint8)), [False, False, True, True])
    np.testing.assert_array_equal(binarize(np.array([0.0, 0.5, 0.51, 1.0])), [False, False, True, True])


def test_piece_counts_of_known_shapes() -> None:
    diagonal = np.zeros((4, 4), bool)
    diagonal[0, 0] = diagonal[1, 1] = True  # touch only at a corner: two pieces under 4-connectivity
    ell = rectangle(0, 3, 0, 1, (4, 4)) | rectangle(2, 3, 0, 3, (4, 4))
    two_bars = rectangle(0, 1, 0, 4, (4, 4)) | rectangle(2, 3, 0, 4, (4, 4))
    empty = np.zeros((4, 4), bool)
    counts = piece_counts(np.stack([diagonal, ell, empty, two_bars, two_bars]))
    np.testing.assert_array_equal(counts, [2, 1, 0, 2, 2])  # identical neighbours in the stack are not joined


def test_piece_counts_match_labelling_each_image_alone() -> None:
    masks = np.random.default_rng(1).random((200, 16, 12)) > 0.55
    expected = [ndimage.label(m)[1] for m in masks]
    np.testing.assert_array_equal(piece_counts(masks), expected)
    assert piece_counts(np.zeros((0, 4, 4), bool)).shape == (0,)


def test_centre_of_mass_of_known_shapes_and_empty() -> None:
    pixel = np.zeros((8, 8), bool)
    pixel[3, 5] = True
    com = centre_of_mass(np.stack([pixel, rectangle(2, 5, 0, 2), np.zeros((8, 8), bool)]))
    np.testing.assert_allclose(com[:2], [[3.0, 5.0], [3.0, 0.5]])
    assert np.isnan(com[2]).all()
    masks = np.random.default_rng(2).random((4, 2, 8, 6)) > 0.5
    for i in range(4):
        for m in range(2):
            np.testing.assert_allclose(centre_of_mass(masks)[i, m], ndimage.center_of_mass(masks[i, m]))


def test_wasserstein_of_shifted_and_identical_samples() -> None:
    sample = np.random.default_rng(3).normal(size=500)
    assert wasserstein(sample, sample + 2.5) == pytest.approx(2.5)
    assert wasserstein(sample, sample[::-1]) == 0.0
    assert wasserstein([0.0, np.nan, 1.0], [0.0, 1.0]) == 0.0  # undefined values are dropped
    assert np.isnan(wasserstein([np.nan], [1.0]))


def test_bootstrap_std_of_a_mean_is_its_standard_error() -> None:
    sample = np.random.default_rng(4).normal(scale=2.0, size=400)
    std = bootstrap_std(lambda idx: sample[idx].mean(), len(sample), n_boot=400, seed=0)
    assert std == pytest.approx(2.0 / np.sqrt(400), rel=0.15)
    assert bootstrap_std(lambda idx: sample[idx].mean(), len(sample), n_boot=50, seed=7) == \
        bootstrap_std(lambda idx: sample[idx].mean(), len(sample), n_boot=50, seed=7)
    assert bootstrap_std(lambda idx: 1.0, 10, n_boot=50) == 0.0
    assert np.isnan(bootstrap_std(lambda idx: 1.0, 10, n_boot=1))
