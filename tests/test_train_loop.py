"""The training loop's shape: a TrainState that is exactly what a checkpoint holds, one status value, and no
function in the package over 60 lines (the loop reads top to bottom as short named steps)."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import epure
from epure.checkpoint import read_run_checkpoint
from epure.data import load_data
from epure.train import Status, TrainState, train

from conftest import write_tiny_dataset
from factories import tiny_config

COMPONENTS = ["c0", "c1", "c2"]
LONGEST_FUNCTION = 60


@pytest.fixture
def trained(tmp_path: Path):
    root = write_tiny_dataset(tmp_path / "data", n=24, components=COMPONENTS, seed=2)
    cfg = tiny_config(root, tmp_path / "out", COMPONENTS, **{"train.epochs": 2, "train.batch_size": 8})
    return cfg, load_data(cfg.data)


def test_a_checkpoint_holds_exactly_the_train_state(trained) -> None:
    cfg, data = trained
    result = train(cfg, data=data)
    _, checkpoint = read_run_checkpoint(result.run_dir, prefer="last")
    fields = {field.name for field in dataclasses.fields(TrainState)}
    # the state's fields, plus what is derived when writing: the component names (of its config), the RNG of
    # that moment and the file format
    assert set(checkpoint) == fields | {"components", "rng", "format_version"}
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["batch_in_epoch"]) == (2, result.step, 0)
    assert checkpoint["val_loss"] == pytest.approx(result.last_val_loss)
    assert checkpoint["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert checkpoint["schedule_progress"] == pytest.approx(5 / 6)  # measured before the last of 6 steps
    # restoring the checkpoint into a fresh state gives the same state back
    from epure.model import MMVAEPlus

    model = MMVAEPlus(cfg.model, COMPONENTS, cfg.data.image_size)
    state = TrainState(model, torch.optim.Adam(model.parameters()), cfg, data.normalizer, data.fingerprint,
                       checkpoint["train_conditions"], checkpoint["git_commit"])
    state.restore(checkpoint)
    again = state.checkpoint()
    for key in ("epoch", "step", "batch_in_epoch", "best_val_loss", "schedule_progress"):
        assert again[key] == checkpoint[key], key
    for key, value in checkpoint["model"].items():
        torch.testing.assert_close(again["model"][key], value, rtol=0, atol=0)
    torch.testing.assert_close(again["rng"]["torch"], checkpoint["rng"]["torch"], rtol=0, atol=0)


@pytest.mark.parametrize("overrides, status, steps", [
    ({}, Status.FINISHED, 6),  # 24 designs (22 train) in batches of 8: 3 steps per epoch, 2 epochs
    ({"train.max_steps": 4}, Status.BUDGET, 4),  # stops mid-epoch
])
def test_one_status_value_says_how_a_run_ended(trained, overrides: dict, status: Status, steps: int) -> None:
    cfg, data = trained
    result = train(cfg.updated(overrides), data=data)
    assert result.status == status.value and result.step == steps
    assert math.isfinite(result.last_val_loss)  # a run stopped by its budget mid-epoch validates too


def function_lengths() -> dict[str, int]:
    package = Path(epure.__file__).parent
    lengths = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"epure/{path.relative_to(package).as_posix()}:{node.name}"
                lengths[name] = max(lengths.get(name, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_no_function_is_over_sixty_lines() -> None:
    lengths = function_lengths()
    assert lengths["epure/train.py:train"] <= 30  # the loop itself: named steps only
    over = {name: n for name, n in lengths.items() if n > LONGEST_FUNCTION}
    assert not over, f"functions over {LONGEST_FUNCTION} lines: {over}"
