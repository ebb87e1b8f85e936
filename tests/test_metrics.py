"""Metric functions on hand-made masks and samples whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from epure.metrics import (best_threshold, binarize, bootstrap_std, centre_of_mass, components_exclusive,
                           components_whole,
                           design_masks, dice, holes, iou, piece_counts, wasserstein)


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


# ------------------------------------------------------------------------------ diversity and coverage

from epure.metrics import (component_descriptors, design_iou_matrix, knn_radii, manifold_scores,  # noqa: E402
                           mean_pairwise_iou, mean_pairwise_iou_within, nearest_iou, standardise)


def blobs(n: int, seed: int) -> np.ndarray:
    """``n`` two-component designs [n, 2, 16, 16]: a rectangle of random place and size in each component."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 2, 16, 16), dtype=bool)
    for i in range(n):
        for m in range(2):
            r, c = rng.integers(0, 10, 2)
            masks[i, m, r: r + rng.integers(2, 7), c: c + rng.integers(2, 7)] = True
    return masks


def test_component_descriptors_of_known_shapes() -> None:
    masks = np.zeros((1, 2, 8, 8), dtype=bool)
    masks[0, 0] = rectangle(2, 4, 1, 7)  # rows 2-3, columns 1-6: area 12, perimeter 2 * (2 + 6) = 16
    features = component_descriptors(masks)
    assert features.shape == (1, 16)
    np.testing.assert_allclose(features[0, :8], [12, 2.5, 3.5, 2, 3, 1, 6, 2 * 12 / 16])
    np.testing.assert_allclose(features[0, 8:], [0, -1, -1, -1, -1, -1, -1, 0])  # empty: nowhere
    line = np.zeros((1, 1, 8, 8), dtype=bool)
    line[0, 0, 3, :] = True  # a one-pixel line across the grid is about one pixel thick
    assert component_descriptors(line)[0, 7] == pytest.approx(2 * 8 / 18)


def test_standardise_uses_the_reference_statistics() -> None:
    reference = np.array([[0.0, 5.0], [2.0, 5.0]])
    ref, other = standardise(reference, np.array([[4.0, 6.0]]))
    np.testing.assert_allclose(ref, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(other, [[3, 1]])  # a constant reference column keeps unit scale


def test_knn_radii_exclude_the_point_itself() -> None:
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(knn_radii(points, 1), [1, 1, 2, 4])
    np.testing.assert_allclose(knn_radii(points, 2), [3, 2, 3, 6])
    with pytest.raises(ValueError, match="k-NN"):
        knn_radii(points, 4)


def test_identical_sets_have_full_precision_recall_and_coverage() -> None:
    real = np.random.default_rng(0).normal(size=(300, 4))
    scores = manifold_scores(real, real.copy(), k=5)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert scores["density"] >= 1.0  # each point at least in its own ball


def test_two_samples_of_one_distribution_score_near_one() -> None:
    rng = np.random.default_rng(1)
    scores = manifold_scores(rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3)), k=5)
    for name in ("precision", "recall", "coverage"):
        assert 0.9 < scores[name] <= 1.0, (name, scores)
    assert 0.85 < scores["density"] < 1.15  # its expectation is 1 for identical distributions


def test_one_repeated_design_has_no_recall() -> None:
    real = np.random.default_rng(2).normal(size=(500, 4))
    scores = manifold_scores(real, np.repeat(real[:1], 500, axis=0), k=5)
    assert scores["precision"] == 1.0  # the one design is a real one
    assert scores["recall"] <= 1 / 500  # only that design itself lies in a ball of radius 0
    assert scores["coverage"] < 0.05


def test_half_the_modes_halve_recall_and_coverage_not_precision() -> None:
    rng = np.random.default_rng(3)
    modes = np.where(rng.random(2000) < 0.5, -20.0, 20.0)[:, None]
    real = rng.normal(size=(2000, 2)) + modes
    fake = rng.normal(size=(1000, 2)) + 20.0  # only one of the two modes
    scores = manifold_scores(real, fake, k=5)
    assert scores["precision"] > 0.95
    assert 0.4 < scores["recall"] < 0.6 and 0.4 < scores["coverage"] < 0.6
    shifted = manifold_scores(real, fake + 100.0, k=5)  # nowhere near the data
    assert shifted == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_design_iou_matrix_treats_components_apart() -> None:
    a = np.zeros((1, 2, 8, 8), dtype=bool)
    a[0, 0] = rectangle(0, 4, 0, 4)  # 16 px in component 0
    b = np.zeros((3, 2, 8, 8), dtype=bool)
    b[0, 0] = rectangle(2, 6, 2, 6)  # overlaps 4 px: 4 / 28
    b[1, 1] = rectangle(0, 4, 0, 4)  # the same pixels, but in the other component: no match
    matrix = design_iou_matrix(a, b)  # b[2] is empty
    np.testing.assert_allclose(matrix, [[4 / 28, 0.0, 0.0]])
    assert design_iou_matrix(b[2:], b[2:])[0, 0] == 1.0  # two empty designs
    designs = blobs(30, 4)
    expected = iou(designs.reshape(30, 1, 2 * 16, 16)[:, None], designs.reshape(1, 30, 2 * 16, 16)).squeeze()
    np.testing.assert_allclose(design_iou_matrix(designs, designs), expected.reshape(30, 30))


def test_a_copy_of_the_training_set_is_all_memorised() -> None:
    train, other = blobs(200, 5), blobs(50, 6)
    np.testing.assert_array_equal(nearest_iou(train[::-1].copy(), train, chunk=7), 1.0)
    near = nearest_iou(other, train)
    assert near.shape == (50,) and (near < 1).any() and (near > 0).all()
    manual = np.array([max(design_iou_matrix(d[None], train)[0]) for d in other])
    np.testing.assert_allclose(near, manual)


def test_mean_pairwise_iou_of_copies_and_of_disjoint_designs() -> None:
    one = blobs(1, 7)
    assert mean_pairwise_iou(np.repeat(one, 10, axis=0)) == 1.0
    apart = np.zeros((3, 1, 4, 4), dtype=bool)
    apart[0, 0, 0, 0] = apart[1, 0, 1, 1] = apart[2, 0, 2, 2] = True
    assert mean_pairwise_iou(apart) == 0.0
    apart[2, 0, 0, 0] = True  # designs 0 and 2 now share a pixel: IoU 1/2, the other pairs 0
    assert mean_pairwise_iou(apart) == pytest.approx((0.5 + 0 + 0) / 3)
    assert np.isnan(mean_pairwise_iou(apart[:1]))


def test_mean_pairwise_iou_within_groups() -> None:
    designs = blobs(12, 8)
    groups = designs.reshape(3, 4, 2, 16, 16)
    expected = np.mean([mean_pairwise_iou(g) for g in groups])
    assert mean_pairwise_iou_within(groups) == pytest.approx(expected)
    assert mean_pairwise_iou_within(np.repeat(designs[:, None], 5, axis=1)) == 1.0  # every draw the same
    assert np.isnan(mean_pairwise_iou_within(groups[:, :1]))


def test_design_masks_close_the_gaps_between_exclusive_components() -> None:
    """Where two components meet each decoder may hedge: both under 0.5 on the boundary pixel, their sum over
    it. Exclusive components get that pixel (the likelier one that reaches it); overlapping ones do not."""
    p = np.zeros((1, 2, 3, 4))
    p[0, 0, 1, 0] = 0.9  # component 0: one pixel at (1, 0)
    p[0, 1, 1, 2:] = 0.9  # component 1: (1, 2) and (1, 3)
    p[0, :, 1, 1] = [0.30, 0.35]  # the boundary pixel between them: 0.65 in all, neither alone
    p[0, 0, 2, 3] = 0.4  # far from component 0's own pixels and alone under 0.5: stays empty
    p[0, 1, 2, 3] = 0.2  # sums to 0.6 there, but reaches component 1 (above it), so it goes to 1
    plain = design_masks(p, exclusive=False)
    np.testing.assert_array_equal(plain, p > 0.5)
    assert piece_counts(plain.any(1)).tolist() == [2]
    joined = design_masks(p, exclusive=True)
    assert piece_counts(joined.any(1)).tolist() == [1]
    assert joined[0, 1, 1, 1] and not joined[0, 0, 1, 1]  # the likelier component, 0.35 > 0.30
    assert joined[0, 1, 2, 3] and not joined[0, 0, 2, 3]  # 0 is likelier there but does not reach the pixel
    assert (joined & ~plain).sum() == 2 and piece_counts(joined[0]).tolist() == [1, 1]
    # a higher (calibrated) threshold thins each component, but the gap still closes where the sum passes 0.5
    raised = design_masks(p, exclusive=True, threshold=0.7)
    np.testing.assert_array_equal(raised, joined)
    assert not design_masks(p * 0.7, exclusive=True, threshold=0.6)[0, :, 1, 1].any()  # 0.455 in all: stays a gap
    lonely = np.zeros((1, 2, 3, 3))
    lonely[0, :, 1, 1] = 0.3  # summing past 0.5 with no claimed component beside it: nothing to join
    assert not design_masks(lonely, exclusive=True).any()


def test_holes_are_the_empty_pixels_cut_off_from_the_border() -> None:
    ring = np.zeros((3, 6, 6), dtype=bool)
    ring[0, 1:5, 1:5] = True
    ring[0, 2:4, 2:4] = False  # a 2x2 hole
    ring[1] = ring[0]
    ring[1, 2, 1] = False  # the hole opens to the left: still enclosed, (2, 0) is not empty...
    ring[1, 2, 0] = False  # ... it is: the border reaches the hole through (2, 1)
    ring[2, 0:3, 0:3] = True
    ring[2, 1, 1] = False  # a hole in a corner square
    ring[2, 4, 4] = True  # a separate design part: no hole between them (the background joins the border)
    found = holes(ring)
    assert found[0].sum() == 4 and found[0, 2:4, 2:4].all()
    assert not found[1].any()
    assert found[2].sum() == 1 and found[2, 1, 1]
    diagonal = np.zeros((1, 4, 4), dtype=bool)
    diagonal[0, 0:3, 0:3] = True
    diagonal[0, 1, 1] = False
    diagonal[0, 0, 0] = False  # (1, 1) touches the empty corner only diagonally: 4-connected, still a hole
    assert holes(diagonal)[0].sum() == 1
    # one call on a stack agrees with scipy's per-image hole filling
    rng = np.random.default_rng(0)
    masks = rng.random((50, 12, 8)) < 0.6
    expected = np.stack([ndimage.binary_fill_holes(m) & ~m for m in masks])
    np.testing.assert_array_equal(holes(masks), expected)


def test_design_masks_fill_the_holes_of_exclusive_designs() -> None:
    """A pixel enclosed by the design is occupied whatever its probabilities (a section is solid): it goes to
    the likeliest component reaching it, holes fill from the rim inwards and no component gains a piece."""
    p = np.zeros((2, 3, 5, 6))
    p[:, 0, :, :2] = 0.9  # component 0: the left two columns
    p[:, 1, :, 4:] = 0.9  # component 1: the right two
    p[:, 2, 0, 2:4] = 0.9  # component 2: a bridge on top ...
    p[:, 2, 4, 2:4] = 0.9  # ... and at the bottom: the middle 3x2 is a hole
    p[0, 0, 1:4, 2] = 0.2  # 0 is likelier on the left column of the hole, 1 on the right
    p[0, 1, 1:4, 2] = 0.1
    p[0, 1, 1:4, 3] = 0.2
    p[0, 0, 1:4, 3] = 0.1
    p[1, 2, 1:4, 2:4] = 0.05  # design 1: component 2 is the likeliest in the whole hole, but reaches its middle late
    masks = design_masks(p, exclusive=True)
    assert not holes(masks.any(1)).any()
    np.testing.assert_array_equal(masks[0, 0, 1:4, 2], True)
    np.testing.assert_array_equal(masks[0, 1, 1:4, 3], True)
    assert masks[0].sum() == 30 and masks[0].sum(0).max() == 1
    # every pixel of this hole is on its rim: rows 1 and 3 go to the bridges' component 2, the middle row to
    # the components that reach it in the same pass (2 reaches it only once rows 1 and 3 are its own)
    assert masks[1, 2, 1, 2:4].all() and masks[1, 2, 3, 2:4].all()
    assert masks[1, 0, 2, 2] and masks[1, 1, 2, 3] and not masks[1, 2, 2, 2:4].any()
    drawn = piece_counts((p > 0.5).reshape(-1, 5, 6))  # component 2's two bridges are two pieces to start with
    assert drawn.tolist() == [1, 1, 2] * 2 and (piece_counts(masks.reshape(-1, 5, 6)) <= drawn).all()
    np.testing.assert_array_equal(design_masks(p, exclusive=False), p > 0.5)  # overlapping parts: left as drawn
    open_notch = p.copy()
    open_notch[:, 2, 0, 2:4] = 0.0  # the top bridge gone: the middle is a notch open to the border, not a hole
    assert not design_masks(open_notch, exclusive=True)[:, :, 0:4, 2:4].any()


def test_components_exclusive() -> None:
    designs = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    designs[0, 0, :2] = 255
    designs[0, 1, 2:] = 255
    designs[1, 2] = 255
    assert components_exclusive(designs)
    designs[1, 0, 0, 0] = 255  # one pixel in two components
    assert not components_exclusive(designs)


def test_components_whole_marks_the_components_never_in_pieces() -> None:
    designs = np.zeros((3, 3, 8, 8), dtype=np.uint8)
    designs[:, 0, 2:5, 2:5] = 255  # one piece in every design
    designs[0, 1, 0, :] = designs[0, 1, 4, :] = 255  # two pieces in design 0 only
    designs[1, 1, 0, :] = 255
    # component 2 is absent from every design: nothing in pieces
    np.testing.assert_array_equal(components_whole(designs), [True, False, True])
    np.testing.assert_array_equal(components_whole(designs[1:]), [True, True, True])
    np.testing.assert_array_equal(components_whole(designs.astype(bool)), [True, False, True])


def test_best_threshold_is_where_probabilities_match_the_masks() -> None:
    """Pixels at 0.1, 0.58, 0.64 and 0.9, the true masks those at 0.64 and above: only 0.60 of the candidates
    keeps the 0.64 pixels and drops the 0.58 ones."""
    probs = np.tile(np.array([0.1, 0.58, 0.64, 0.9]), (2, 2, 4, 1))  # [N=2, M=2, H=4, W=4]
    truth = probs >= 0.64
    assert best_threshold(probs, truth) == 0.6
    # a tie (0.45, 0.50 and 0.55 all separate 0.4 from 0.6) goes to the candidate nearest 0.5
    probs = np.tile(np.array([0.4, 0.6]), (1, 1, 2, 1))
    assert best_threshold(probs, probs > 0.5) == 0.5
    # only the (design, component) pairs present are scored: an all-0.58 design whose first component is
    # full and whose second is empty wants a threshold below 0.58 for the first, above it for the second
    probs = np.full((1, 2, 2, 2), 0.58)
    truth = np.zeros_like(probs, dtype=bool)
    truth[0, 0] = True
    assert best_threshold(probs, truth, present=np.array([[True, False]])) == 0.5
    assert best_threshold(probs, truth, present=np.array([[False, True]])) == 0.6
