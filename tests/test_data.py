"""Dataset loading: every bad input names what is wrong and leaves no cache; good input loads and caches."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import epure.data.dataset as dataset_module
from epure.cli import app
from epure.config import ConfigError, DataConfig, config_from_dict
from epure.data import ConditionNormalizer, DatasetError, load_data, load_split
from epure.data.cache import cache_root
from epure.data.dimensions import measure_dimensions, union_of_components

from factories import tiny_config

COMPONENTS = ["group_nc", "group_km", "fpu"]


def cfg_for(components: list[str] | None = None, **kwargs) -> DataConfig:
    return DataConfig(components=list(components or DataConfig().components), **kwargs)


def cache_files() -> list[Path]:
    folder = cache_root() / "datasets"
    return sorted(folder.iterdir()) if folder.exists() else []


def assert_no_cache() -> None:
    assert cache_files() == [], f"a failed load left cache files behind: {cache_files()}"


def load_error(root: Path, split: str, cfg: DataConfig) -> str:
    """The DatasetError message of loading ``split``, after checking that nothing was cached."""
    with pytest.raises(DatasetError) as info:
        load_split(root, split, cfg)
    assert_no_cache()
    return str(info.value)


def png(root: Path, split: str, component: str, prefix: str) -> Path:
    return root / split / component / f"{prefix}_{component}.png"


def edit_csv(root: Path, edit) -> Path:
    csv = root / "dimensions.csv"
    table = pd.read_csv(csv, dtype={"matching": str, "width_px": object, "height_px": object})
    table = edit(table)
    table.to_csv(csv, index=False)
    return csv


@pytest.fixture
def restore_logging():
    """The CLI's callback installs a rich handler on the root logger; put the previous state back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_component_folder_in_one_split(tiny_dataset):
    root = tiny_dataset()
    folder = root / "test" / "fpu"
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    message = load_error(root, "test", cfg_for())
    assert str(folder) in message
    assert "missing component folder" in message
    assert "'fpu'" in message and "'test'" in message


def test_missing_images_counted_and_first_ten_listed(tiny_dataset):
    root = tiny_dataset(n=20, n_test=4)  # 16 train designs
    gone = [png(root, "train", "group_km", f"d{i:04d}") for i in range(12)]
    for path in gone:
        path.unlink()
    message = load_error(root, "train", cfg_for())
    assert str(root / "train" / "group_km") in message
    assert "12 image(s) missing" in message
    assert "split 'train'" in message
    listed = re.findall(r"d\d{4}_group_km\.png", message)
    assert len(listed) == 10
    assert listed == [p.name for p in gone[:10]]


def test_wrong_image_size(tiny_dataset):
    root = tiny_dataset()
    bad = png(root, "train", "bt", "d0003")
    Image.new("L", (32, 32)).save(bad)  # PIL size is (columns, rows)
    message = load_error(root, "train", cfg_for())
    assert str(bad) in message
    assert "32x32" in message and "expected 64x32" in message


def test_unreadable_png(tiny_dataset):
    root = tiny_dataset()
    bad = png(root, "test", "tpc", "d0009")
    bad.write_bytes(os.urandom(16) + b"this is not a png at all" * 10)
    message = load_error(root, "test", cfg_for())
    assert str(bad) in message
    assert "unreadable or truncated image" in message


def test_truncated_png(tiny_dataset):
    root = tiny_dataset()
    bad = png(root, "train", "group_nc", "d0001")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    message = load_error(root, "train", cfg_for())
    assert str(bad) in message
    assert "unreadable or truncated image" in message


def test_csv_without_required_column(tiny_dataset):
    root = tiny_dataset()
    csv = edit_csv(root, lambda t: t.drop(columns=["height_px"]))
    message = load_error(root, "train", cfg_for())
    assert str(csv) in message
    assert "missing required column(s) ['height_px']" in message
    assert "'width_px'" in message  # the columns that are there


def _set_cell(row: int, column: str, value):
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[row, column] = value
        return table
    return edit


def test_nan_condition(tiny_dataset):
    root = tiny_dataset()
    csv = edit_csv(root, _set_cell(3, "width_px", np.nan))  # written as an empty field
    message = load_error(root, "train", cfg_for())
    assert str(csv) in message
    assert "row 5" in message  # data row 3 is line 5 (header is line 1)
    assert "'d0003'" in message
    assert "'width_px'" in message and "not a finite number" in message


def test_non_numeric_condition(tiny_dataset):
    root = tiny_dataset()
    csv = edit_csv(root, _set_cell(6, "height_px", "tall"))
    message = load_error(root, "test", cfg_for())
    assert str(csv) in message
    assert "row 8" in message and "'d0006'" in message
    assert "'height_px'" in message and "'tall'" in message and "not a finite number" in message


def test_duplicate_ids(tiny_dataset):
    root = tiny_dataset()
    csv = edit_csv(root, _set_cell(4, "matching", "d0002"))
    message = load_error(root, "train", cfg_for())
    assert str(csv) in message
    assert "duplicate id" in message and "'matching'" in message and "'d0002'" in message


def test_empty_split(tiny_dataset):
    root = tiny_dataset()
    csv = edit_csv(root, lambda t: t.assign(train=True))
    message = load_error(root, "test", cfg_for())
    assert str(csv) in message
    assert "split 'test' is empty" in message
    assert "no row with train = False" in message


def test_component_not_on_disk(tiny_dataset):
    root = tiny_dataset(components=COMPONENTS)
    message = load_error(root, "train", cfg_for([*COMPONENTS, "bead"]))
    assert "'bead'" in message and "not on disk" in message
    assert "components found: ['fpu', 'group_km', 'group_nc']" in message


# ----------------------------------------------------------------------------------------- good input



def test_l_rgb_rgba_load_to_the_same_grayscale(tiny_dataset):
    cfg = cfg_for(COMPONENTS)
    roots = {mode: tiny_dataset(components=COMPONENTS, mode=mode, name=mode) for mode in ("L", "RGB", "RGBA")}
    for mode, root in roots.items():
        with Image.open(png(root, "train", "fpu", "d0000")) as image:
            assert image.mode == mode
    loaded = {mode: load_split(root, "train", cfg) for mode, root in roots.items()}
    reference = loaded["L"].images
    assert reference.dtype == np.uint8 and reference.shape == (8, 3, 64, 32)
    assert set(np.unique(reference).tolist()) == {0, 255}
    for mode in ("RGB", "RGBA"):
        assert loaded[mode].images.dtype == np.uint8
        np.testing.assert_array_equal(loaded[mode].images, reference, err_msg=mode)
        np.testing.assert_array_equal(loaded[mode].conditions, loaded["L"].conditions)


def test_second_load_comes_from_cache_and_a_changed_png_invalidates_it(tiny_dataset, monkeypatch):
    root = tiny_dataset()
    cfg = cfg_for()
    first = load_split(root, "train", cfg)
    assert len(first) == 8 and first.images.shape == (8, 5, 64, 32)
    assert len(cache_files()) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a PNG although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(dataset_module, "_decode", no_decoding)
        second = load_split(root, "train", cfg)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.conditions, first.conditions)
    assert list(second.ids) == list(first.ids)
    assert second.fingerprint == first.fingerprint

    # New content (a full block) and a new mtime for one file: the cache must not be used.
    changed = png(root, "train", "bt", "d0002")
    Image.new("L", (32, 64), color=255).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    with monkeypatch.context() as patch:
        patch.setattr(dataset_module, "_decode", no_decoding)
        with pytest.raises(AssertionError, match="decoded a PNG"):
            load_split(root, "train", cfg)
    third = load_split(root, "train", cfg)
    assert third.fingerprint != first.fingerprint
    index = list(third.ids).index("d0002")
    assert (third.images[index, cfg.components.index("bt")] == 255).all()
    assert not (first.images[index, cfg.components.index("bt")] == 255).all()
    others = np.ones(len(third), dtype=bool)
    others[index] = False
    np.testing.assert_array_equal(third.images[others], first.images[others])


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_unreadable_cache_file_is_decoded_again(tiny_dataset, damage):
    root = tiny_dataset()
    first = load_split(root, "train", cfg_for())
    (cache,) = cache_files()
    data = cache.read_bytes()
    cache.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not an npz"}[damage])
    again = load_split(root, "train", cfg_for())
    np.testing.assert_array_equal(again.images, first.images)
    assert cache_files() == [cache] and cache.read_bytes() == data  # rewritten whole


def test_use_cache_false_writes_nothing(tiny_dataset):
    root = tiny_dataset()
    split = load_split(root, "test", cfg_for(), use_cache=False)
    assert len(split) == 2
    assert_no_cache()


def test_condition_normalizer_fit_normalize_round_trip(tiny_dataset):
    root = tiny_dataset(n=40)
    train = load_split(root, "train", cfg_for())
    normalizer = ConditionNormalizer.fit(train)
    z = normalizer.normalize(train.conditions)
    assert z.dtype == np.float32 and z.shape == train.conditions.shape
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-5)
    assert normalizer.columns == ["width_px", "height_px"]
    np.testing.assert_array_equal(normalizer.low, train.conditions.min(axis=0))
    np.testing.assert_array_equal(normalizer.high, train.conditions.max(axis=0))
    again = ConditionNormalizer.from_dict(json.loads(json.dumps(normalizer.to_dict())))
    assert again == normalizer
    np.testing.assert_array_equal(again.normalize(train.conditions), z)


def test_load_data_holds_out_val_fraction_of_train(tiny_dataset):
    root = tiny_dataset(n=50, n_test=10)  # 40 train designs
    cfg = cfg_for(root=str(root), val_fraction=0.25)
    bundle = load_data(cfg)
    assert bundle.root == root
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 10)
    train_ids, val_ids = set(bundle.train.ids), set(bundle.val.ids)
    assert not train_ids & val_ids
    assert train_ids | val_ids == {f"d{i:04d}" for i in range(40)}
    assert set(bundle.test.ids) == {f"d{i:04d}" for i in range(40, 50)}
    # The normaliser is fitted on the train part only, and the hold-out is fixed by data.val_seed alone.
    assert bundle.normalizer == ConditionNormalizer.fit(bundle.train)
    assert list(load_data(cfg).val.ids) == list(bundle.val.ids)
    other = cfg_for(root=str(root), val_fraction=0.25, val_seed=1)
    assert list(load_data(other).val.ids) != list(bundle.val.ids)


def test_validation_split_ignores_the_training_seed(tiny_dataset, tmp_path, monkeypatch):
    """Runs (and sweep trials) with different train.seed validate on the same designs: data.val_seed picks them."""
    import epure.train

    root = tiny_dataset(n=30, n_test=5, components=["group_nc", "group_km", "fpu"])
    held_out = []

    def recording_load_data(cfg):
        bundle = load_data(cfg)
        held_out.append(sorted(bundle.val.ids))
        return bundle

    monkeypatch.setattr(epure.train, "load_data", recording_load_data)
    for seed in (0, 7):
        cfg = tiny_config(root, tmp_path / f"out{seed}", **{"train.seed": seed, "train.max_steps": 1})
        assert cfg.data.val_seed == 0
        epure.train.train(cfg)
    assert len(held_out) == 2 and held_out[0] == held_out[1]


@pytest.mark.parametrize("fraction,designs", [(0.01, 40), (0.99, 40), (0.02, 20)])
def test_a_validation_fraction_that_leaves_a_split_empty_is_an_error(tiny_dataset, fraction, designs):
    root = tiny_dataset(n=designs + 5, n_test=5)
    with pytest.raises(DatasetError, match=rf"data.val_fraction {fraction} of the {designs} training designs"):
        load_data(cfg_for(root=str(root), val_fraction=fraction))
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \(0, 1\)"):
        config_from_dict({"data": {"val_fraction": 0.0}})


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(monkeypatch, restore_logging):
    monkeypatch.setenv("COLUMNS", "4000")  # rich would wrap long paths at 80 columns
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_data_check_ok_with_several_components_after_one_flag(tiny_dataset, cli):
    root = tiny_dataset(n=15, components=COMPONENTS)
    result = cli("data", "check", root, "--components", *COMPONENTS)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(re.match(r"\W*train\W+12\W", line) for line in lines), result.stdout
    assert any(re.match(r"\W*test\W+3\W", line) for line in lines), result.stdout
    for component in COMPONENTS:
        assert component in result.stdout
    assert "bt" not in result.stdout.split()
    assert "dataset OK" in result.stdout


def test_cli_data_check_broken_dataset_exits_2_with_the_message(tiny_dataset, cli):
    root = tiny_dataset(components=COMPONENTS)
    bad = png(root, "train", "fpu", "d0002")
    bad.write_bytes(b"garbage")
    result = cli("data", "check", root, "--components", *COMPONENTS)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "error:" in output
    assert str(bad) in output and "unreadable or truncated image" in output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, DatasetError)
    assert_no_cache()


def test_cli_data_show_writes_a_png(tiny_dataset, cli, tmp_path):
    root = tiny_dataset(n=10, components=COMPONENTS)
    out = tmp_path / "grid.png"
    result = cli("data", "show", root, "--components", *COMPONENTS, "--count", 3, "--out", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size[0] > 32 and image.size[1] > 64


# ------------------------------------------------------------------------------------- public toy set


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The public toy set, unpacked and decoded once per session into a session cache (or skip)."""
    from epure.data.sources import toy_archive, toy_root

    if toy_archive() is None:
        pytest.skip("public toy set not found (../shared/data/toy_epure.tar.gz or $EPURE_TOY_ARCHIVE); "
                    "a user's clone has no ../shared")
    cache = tmp_path_factory.mktemp("toy-cache")
    with pytest.MonkeyPatch.context() as patch:  # undone before the per-test cache of later tests is set
        patch.setenv("EPURE_CACHE_DIR", str(cache))
        root = toy_root()
        assert cache in root.parents  # unpacked into the cache, never into ../shared
        cfg = cfg_for(COMPONENTS)
        splits = {name: load_split(root, name, cfg) for name in ("train", "test")}
    table = pd.read_csv(root / "dimensions.csv", dtype={"matching": str})
    return root, splits, table


@pytest.mark.slow
def test_toy_set_loads_with_its_dimensions(toy):
    root, splits, table = toy
    assert (len(splits["train"]), len(splits["test"])) == (16_000, 4_000)
    by_id = table.set_index("matching")
    for name, split in splits.items():
        assert split.components == COMPONENTS
        assert split.images.shape == (len(split), 3, 64, 32) and split.images.dtype == np.uint8
        assert set(np.unique(split.images).tolist()) <= {0, 255}
        rows = by_id.loc[split.ids]
        assert rows["train"].eq(name == "train").all()
        np.testing.assert_array_equal(split.conditions, rows[["width_px", "height_px"]].to_numpy(np.float32))
        width, height = measure_dimensions(union_of_components(split.images))
        np.testing.assert_array_equal(width, rows["width_px"].to_numpy(), err_msg=f"{name} width_px")
        np.testing.assert_array_equal(height, rows["height_px"].to_numpy(), err_msg=f"{name} height_px")
