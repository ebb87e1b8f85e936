"""Training, checkpoints, resume and the sample command, on the built-in synthetic data."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from epure.checkpoint import load_model
from epure.cli import app
from epure.data import load_data, load_split
from epure.model import build_model
from epure.sample import SamplingError, component_indices, complete
from epure.checkpoint import LoadedModel
from epure.config import ConfigError
from epure.tracking import NullTracker
from epure.train import budget_progress, scheduled_lr, train

from factories import synthetic_dataset, tiny_config

COMPONENTS = ["group_nc", "group_km", "bt"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", n=240)


def completion_iou(loaded: LoadedModel, split, observed: int) -> float:
    """Mean IoU of the non-observed components generated from one observed component (posterior means)."""
    (probs,) = complete(loaded, split.images, split.conditions, [observed], use_mean=True, batch_size=len(split))
    truth = split.images > 127
    pred = probs > 0.5
    targets = [m for m in range(len(loaded.components)) if m != observed]
    inter = (pred & truth)[:, targets].sum((2, 3))
    union = (pred | truth)[:, targets].sum((2, 3))
    return float((inter / np.maximum(union, 1)).mean())


def test_brief_training_completes_missing_components(dataset, tmp_path) -> None:
    cfg = tiny_config(dataset, tmp_path / "out", COMPONENTS, **{"train.epochs": 8, "model.beta": 1.0})
    data = load_data(cfg.data, seed=0)
    torch.manual_seed(0)
    untrained = LoadedModel(build_model(cfg.model, COMPONENTS, cfg.data.image_size).eval(), cfg, data.normalizer,
                            COMPONENTS, tmp_path)
    result = train(cfg, data=data)
    assert result.status == "finished" and result.epoch == 8
    trained = load_model(result.run_dir)
    before, after = completion_iou(untrained, data.test, 0), completion_iou(trained, data.test, 0)
    assert before < 0.1 and after > 0.3, (before, after)
    history = (result.run_dir / "metrics.csv").read_text().splitlines()
    assert len(history) == 9  # header + one row per epoch
    assert {"config.yaml", "normalization.json", "components.json"} <= {p.name for p in result.run_dir.iterdir()}


def test_checkpoint_round_trip_reproduces_outputs(dataset, tmp_path) -> None:
    cfg = tiny_config(dataset, tmp_path / "out", COMPONENTS, **{"train.max_steps": 3})
    result = train(cfg)
    loaded_a, loaded_b = load_model(result.run_dir), load_model(result.run_dir / "checkpoints" / "last.pt")
    split = load_split(dataset, "test", cfg.data).subset(np.arange(4))
    for loaded in (loaded_a, loaded_b):
        assert loaded.normalizer.to_dict() == load_data(cfg.data).normalizer.to_dict()
    out_a = next(complete(loaded_a, split.images, split.conditions, [1], seed=3))
    out_b = next(complete(loaded_b, split.images, split.conditions, [1], seed=3))
    np.testing.assert_array_equal(out_a, out_b)


def assert_same_weights(run_a, run_b) -> None:
    a = torch.load(run_a / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(run_b / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_equals_uninterrupted_training(dataset, tmp_path) -> None:
    """Stopping after 5 steps (mid-epoch) and resuming gives the parameters of one 2-epoch run."""
    whole = train(tiny_config(dataset, tmp_path / "a", COMPONENTS, **{"train.epochs": 2}))
    first = train(tiny_config(dataset, tmp_path / "b", COMPONENTS, **{"train.epochs": 2, "train.max_steps": 5}))
    assert first.status == "budget" and first.step == 5
    resumed = train(tiny_config(dataset, tmp_path / "b", COMPONENTS, **{"train.epochs": 2}), resume=first.run_dir)
    assert resumed.step == whole.step and resumed.epoch == 2
    assert_same_weights(whole.run_dir, resumed.run_dir)


class InterruptAtStep(NullTracker):
    """Sends this process SIGTERM when a given step is logged, as a scheduler preempting the job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, metrics, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_cosine_schedule_resumes_where_it_stopped(dataset, tmp_path) -> None:
    """A preempted cosine run, resumed, ends with the weights of the uninterrupted one: the schedule is not
    restarted (a ``max_steps`` stop would not do here: it is a budget, so it shortens the schedule)."""
    settings = {"train.epochs": 2, "train.lr_schedule": "cosine", "wandb.log_every_steps": 1}
    whole = train(tiny_config(dataset, tmp_path / "a", COMPONENTS, **settings))
    first = train(tiny_config(dataset, tmp_path / "b", COMPONENTS, **settings), tracker=InterruptAtStep(5))
    assert first.status == "interrupted" and first.step == 6  # the signal is answered after the next step
    resumed = train(tiny_config(dataset, tmp_path / "b", COMPONENTS, **settings), resume=first.run_dir)
    assert resumed.step == whole.step and resumed.epoch == 2
    assert_same_weights(whole.run_dir, resumed.run_dir)


def test_cosine_schedule_decays_over_the_budget(dataset, tmp_path) -> None:
    cfg = tiny_config(dataset, tmp_path / "out", COMPONENTS, **{"train.lr_schedule": "cosine", "train.max_steps": 6})
    lr, floor = cfg.train.lr, cfg.train.lr * cfg.train.lr_final_fraction
    assert scheduled_lr(cfg.train, 0.0) == pytest.approx(lr) and scheduled_lr(cfg.train, 1.0) == pytest.approx(floor)
    assert scheduled_lr(cfg.train, 0.5) == pytest.approx((lr + floor) / 2)
    rates = [scheduled_lr(cfg.train, p) for p in np.linspace(0, 1, 11)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert scheduled_lr(cfg.updated({"train.lr_schedule": "constant"}).train, 0.9) == lr
    # the 6th (last) update of a 6-step budget is taken at 5/6 of the schedule
    result = train(cfg)
    state = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(scheduled_lr(cfg.train, 5 / 6))
    assert state["schedule_progress"] == pytest.approx(5 / 6)
    # time budgets: the larger fraction counts; a resumed run spends its new minutes on what was left
    assert budget_progress(10, 100, 20.0, 40.0, 0.0) == pytest.approx(0.5)
    assert budget_progress(80, 100, 20.0, 40.0, 0.0) == pytest.approx(0.8)
    assert budget_progress(0, 100, 0.0, 40.0, 0.6) == pytest.approx(0.6)
    assert budget_progress(0, 100, 20.0, 40.0, 0.6) == pytest.approx(0.8)
    assert budget_progress(100, 100, 90.0, 40.0, 0.0) == 1.0
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        cfg.updated({"train.lr_schedule": "linear"})
    with pytest.raises(ConfigError, match="train.lr_final_fraction"):
        cfg.updated({"train.lr_final_fraction": 1.5})


def test_sample_layout_and_errors(dataset, tmp_path) -> None:
    result = train(tiny_config(dataset, tmp_path / "out", COMPONENTS, **{"train.max_steps": 2}))
    runner = CliRunner()
    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--checkpoint", str(result.run_dir), "--mode", "unconditional",
                              "--num_samples", "5", "--out", str(out), "--binary"])
    assert res.exit_code == 0, res.output
    for component in COMPONENTS:
        files = sorted((out / "unconditional" / component).glob("*.png"))
        assert len(files) == 5 and files[0].name == f"sample_00000_{component}.png"
    assert len(list((out / "unconditional" / "composites").glob("*.png"))) == 5
    assert (out / "unconditional" / "grid.png").is_file()

    # several values after one flag, as the users type it
    res = runner.invoke(app, ["sample", "--checkpoint", str(result.run_dir), "--mode", "inpainting",
                              "--components", "group_nc", "bt", "--out", str(out), "--limit", "3"])
    assert res.exit_code == 0, res.output
    test_ids = load_split(dataset, "test", tiny_config(dataset, tmp_path, COMPONENTS).data).ids[:3]
    for observed in ("group_nc", "bt"):
        for target in COMPONENTS:
            names = sorted(p.name for p in (out / observed / target).glob("*.png"))
            assert names == sorted(f"{i}_{target}.png" for i in test_ids)
    res = runner.invoke(app, ["sample", "--checkpoint", str(result.run_dir), "--mode", "inpainting", "--joint",
                              "--components", "group_nc", "bt", "--out", str(out), "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert len(list((out / "group_nc+bt" / "group_km").glob("*.png"))) == 2

    res = runner.invoke(app, ["sample", "--checkpoint", str(result.run_dir), "--mode", "inpainting",
                              "--components", "tpc"], env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert "unknown component(s) ['tpc']" in res.output and "group_nc, group_km, bt" in res.output
    with pytest.raises(SamplingError, match="group_nc, group_km, bt"):
        component_indices(["carcass"], COMPONENTS)
    res = runner.invoke(app, ["sample", "--checkpoint", str(result.run_dir), "--num_samples", "0"])
    assert res.exit_code == 2 and "must be positive" in res.output
