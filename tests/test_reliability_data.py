"""Property-based checks: whatever damaged bytes or rows the loader meets, it answers with DatasetError."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from epure.config import DataConfig
from epure.data import DatasetError, load_split
from epure.data.dataset import read_table

from conftest import write_tiny_dataset

COMPONENTS = ["a", "b"]
CFG = DataConfig(components=COMPONENTS)


def valid_png() -> bytes:
    buffer = io.BytesIO()
    mask = np.zeros((64, 32), np.uint8)
    mask[10:40, 5:25] = 255
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = valid_png()


@st.composite
def damaged_png(draw) -> bytes:
    data = bytearray(PNG)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "garbage"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[i:])
    return draw(st.binary(max_size=256))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("pristine") / "data", n=6, components=COMPONENTS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=damaged_png())
def test_damaged_png_gives_our_error(pristine: Path, tmp_path: Path, payload: bytes) -> None:
    root = tmp_path / "data"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(pristine, root)
    victim = next((root / "train" / "b").glob("*.png"))
    victim.write_bytes(payload)
    try:
        split = load_split(root, "train", CFG, use_cache=False)
    except DatasetError as err:
        assert victim.name in str(err)
    else:  # the damage left a valid PNG of the right size: it must load as such
        assert split.images.shape[1:] == (2, 64, 32)


cells = st.one_of(st.text(max_size=8), st.integers(-5, 200).map(str), st.floats(allow_nan=True).map(str),
                  st.sampled_from(["", "nan", "inf", "True", "False", "1e3", "x,y", '"', "\n"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(cells, cells, cells, cells), min_size=0, max_size=6),
       header=st.sampled_from(["matching,width_px,height_px,train", "matching,width_px,train,height_px",
                               "matching,width_px,height_px", "id,width_px,height_px,train", ""]))
def test_damaged_csv_rows_give_our_error(tmp_path: Path, rows, header: str) -> None:
    lines = [header] + [",".join(r) for r in rows]
    (tmp_path / "dimensions.csv").write_text("\n".join(lines) + "\n")
    try:
        table = read_table(tmp_path, CFG)
    except DatasetError as err:
        assert "dimensions.csv" in str(err)
    else:
        assert table["width_px"].notna().all() and table["matching"].is_unique
        assert set(table["train"].unique()) <= {True, False}
