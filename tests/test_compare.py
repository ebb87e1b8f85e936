"""`epure compare --out`: one picture of several evaluations, bars of their headline scores and their sample grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from epure.cli import app
from epure.viz import PALETTE, bar_chart

COLOURS = [tuple(int(c) for c in PALETTE[i]) for i in range(2)]


def pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    return (np.asarray(image.convert("RGB")) == colour).all(axis=2)


def test_bars_are_as_high_as_their_values_and_a_missing_value_is_no_bar() -> None:
    chart = bar_chart(["a", "b"], [("r1", [0.5, None]), ("r2", [1.0, 0.25])], "t", width=600, height=400)
    first, second = (pixels_of(chart, c) for c in COLOURS)
    half = chart.width // 2  # group a on the left, b on the right
    heights = {"r1 a": first[:, :half].any(axis=1).sum(), "r2 a": second[:, :half].any(axis=1).sum(),
               "r1 b": first[:, half:].any(axis=1).sum(), "r2 b": second[:, half:].any(axis=1).sum()}
    legend = 12  # the legend's colour box, in the left half, is as tall in every column count
    assert abs((heights["r2 a"] - legend) / (heights["r1 a"] - legend) - 2.0) < 0.05
    assert heights["r1 b"] == 0 and abs((heights["r2 a"] - legend) / heights["r2 b"] - 4.0) < 0.1


def test_compare_out_writes_one_picture_of_bars_and_sample_grids(tmp_path: Path) -> None:
    grid_colour = (10, 200, 30)
    for name, score in (("a", 0.8), ("b", 0.4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"run": f"run-{name}", "metrics": {
            "eval/cross_iou": score, "eval/self_iou": score, "eval/cross_dice": score, "eval/self_dice": score,
            "eval/uncond/union_one_piece": score, "eval/uncond/all_one_piece": score}}))
    Image.new("RGB", (300, 600), grid_colour).save(tmp_path / "a" / "metrics_samples.png")  # b has no grid
    out = tmp_path / "compare.png"
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "a" / "metrics.json"),
                                      str(tmp_path / "b" / "metrics.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "eval/cross_iou" in result.output and f"wrote {out}" in "".join(result.output.split("\n"))
    picture = Image.open(out)
    assert picture.width >= 900
    bars_a, bars_b, grid = (pixels_of(picture, c) for c in (*COLOURS, grid_colour))
    assert bars_a.any() and bars_b.any()
    rows_a, rows_b = bars_a.any(axis=1).sum(), bars_b.any(axis=1).sum()
    assert rows_a > rows_b  # run a scores twice as high
    grid_rows = np.flatnonzero(grid.any(axis=1))
    assert grid_rows.min() > np.flatnonzero(bars_a.any(axis=1)).max()  # the grids come below the chart
    assert grid.sum() > 0.9 * 560 * 280  # the grid, scaled to the panel height
