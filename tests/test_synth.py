"""The built-in synthetic dataset: deterministic, well-formed tire sections, shared structure, the users' format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from epure.config import EPURE_COMPONENTS
from epure.data.dimensions import measure_dimensions, union_of_components
from epure.data.synth import (COMPONENTS, PRIVATE_PARAMETERS, SHARED_PARAMETERS, generate_sections,
                              write_synthetic_dataset)


@pytest.fixture(scope="module")
def sections() -> tuple[np.ndarray, pd.DataFrame]:
    return generate_sections(300, seed=0)


def _first_last(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last occupied index of ``mask`` [H, W] along rows (axis=1) or columns (axis=0)."""
    idx = np.flatnonzero(mask.any(axis=axis))
    return int(idx[0]), int(idx[-1])


def test_components_are_the_default_list() -> None:
    assert list(COMPONENTS) == EPURE_COMPONENTS


def test_shapes_dtypes_values(sections: tuple[np.ndarray, pd.DataFrame]) -> None:
    masks, params = sections
    assert masks.shape == (300, 5, 64, 32)
    assert masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) == {0, 255}
    assert len(params) == 300
    expected = set(SHARED_PARAMETERS) | {c for cols in PRIVATE_PARAMETERS.values() for c in cols}
    assert set(params.columns) == expected
    assert set(PRIVATE_PARAMETERS) == set(COMPONENTS)


def test_deterministic_per_seed() -> None:
    a_masks, a_params = generate_sections(40, seed=3)
    b_masks, b_params = generate_sections(40, seed=3)
    np.testing.assert_array_equal(a_masks, b_masks)
    pd.testing.assert_frame_equal(a_params, b_params)
    c_masks, _ = generate_sections(40, seed=4)
    assert not np.array_equal(a_masks, c_masks)
    # a smaller request is a prefix of a larger one
    np.testing.assert_array_equal(generate_sections(10, seed=3)[0], a_masks[:10])
    assert generate_sections(0, seed=3)[0].shape == (0, 5, 64, 32)


def test_every_component_and_the_union_is_one_piece(sections: tuple[np.ndarray, pd.DataFrame]) -> None:
    masks, _ = sections
    occupied = masks > 0
    for i in range(len(masks)):
        for c, name in enumerate(COMPONENTS):
            _, pieces = ndimage.label(occupied[i, c])
            assert pieces == 1, f"design {i}: {name} has {pieces} pieces"
        _, pieces = ndimage.label(occupied[i].any(axis=0))
        assert pieces == 1, f"design {i}: the union has {pieces} pieces"
    assert occupied.sum(axis=1).max() == 1, "components overlap"


def test_sections_keep_a_margin_and_vary_in_size(sections: tuple[np.ndarray, pd.DataFrame]) -> None:
    masks, _ = sections
    union = union_of_components(masks)
    assert not union[:, 0, :].any() and not union[:, -1, :].any() and not union[:, :, 0].any()
    width, height = measure_dimensions(union)
    assert width.min() >= 38 and width.max() <= 63
    assert width.min() <= 44 and width.max() >= 58
    assert height.min() >= 38 and height.max() <= 62
    assert height.min() <= 44 and height.max() >= 56
    # the tread, belt and carcass start at the symmetry axis
    for c in (COMPONENTS.index("tpc"), COMPONENTS.index("group_km"), COMPONENTS.index("group_nc")):
        assert (masks[:, c, :, -1] > 0).any(axis=1).all()


def test_components_share_structure(sections: tuple[np.ndarray, pd.DataFrame]) -> None:
    masks, _ = sections
    occupied = masks > 0
    nc, bt, tpc = (COMPONENTS.index(name) for name in ("group_nc", "bt", "tpc"))
    nc_bottom = [_first_last(m, axis=1)[1] for m in occupied[:, nc]]
    bt_bottom = [_first_last(m, axis=1)[1] for m in occupied[:, bt]]
    assert np.corrcoef(nc_bottom, bt_bottom)[0, 1] > 0.9
    nc_left = [_first_last(m, axis=0)[0] for m in occupied[:, nc]]
    tpc_left = [_first_last(m, axis=0)[0] for m in occupied[:, tpc]]
    assert np.corrcoef(nc_left, tpc_left)[0, 1] > 0.5
    # while each component keeps something of its own: the bead's size says little about the carcass's
    areas = occupied.sum(axis=(2, 3))
    assert abs(np.corrcoef(areas[:, bt], areas[:, nc])[0, 1]) < 0.5


def _reload(root: Path, table: pd.DataFrame) -> np.ndarray:
    images = np.zeros((len(table), len(COMPONENTS), 64, 32), dtype=np.uint8)
    for i, (prefix, train) in enumerate(zip(table["matching"], table["train"])):
        for c, component in enumerate(COMPONENTS):
            path = root / ("train" if train else "test") / component / f"{prefix}_{component}.png"
            with Image.open(path) as image:
                assert image.mode == "L"
                images[i, c] = np.asarray(image)
    return images


def test_written_dataset_matches_the_users_format(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", n=40, seed=1)
    assert root == tmp_path / "synth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"], "temporary folder left behind"
    table = pd.read_csv(root / "dimensions.csv", dtype={"matching": str})
    assert list(table.columns) == ["matching", "width_px", "height_px", "train"]
    assert table["train"].dtype == bool
    assert list(table["matching"]) == [f"synth_{i:05d}" for i in range(40)]
    for split in ("train", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(COMPONENTS)
        assert len(list((root / split).rglob("*.png"))) == 5 * int((table["train"] == (split == "train")).sum())
    images = _reload(root, table)
    assert set(np.unique(images).tolist()) == {0, 255}
    np.testing.assert_array_equal(images, generate_sections(40, seed=1)[0])
    width, height = measure_dimensions(union_of_components(images))
    np.testing.assert_array_equal(table["width_px"].to_numpy(), width)
    np.testing.assert_array_equal(table["height_px"].to_numpy(), height)
    assert (~table["train"]).sum() == 8


def test_split_fraction_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", n=50, seed=2, test_fraction=0.3)
    b = write_synthetic_dataset(tmp_path / "b", n=50, seed=2, test_fraction=0.3)
    ta, tb = (pd.read_csv(root / "dimensions.csv") for root in (a, b))
    assert (~ta["train"]).sum() == 15
    pd.testing.assert_frame_equal(ta, tb)
    assert 0 < ta["train"].iloc[:25].sum() < 25, "the test designs are spread, not the last ones"


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        write_synthetic_dataset(out, n=4, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_synthetic_dataset(empty, n=4, seed=0) / "dimensions.csv").is_file()
