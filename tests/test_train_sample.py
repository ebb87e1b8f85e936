"""Training, checkpoints, resume and the sample command, on the built-in synthetic data."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from epure.checkpoint import load_model
from epure.cli import app
from epure.data import load_data, load_split
from epure.evaluate import EvaluationOptions, evaluate
from epure.model import MMVAEPlus
from epure.metrics import best_threshold, design_masks
from epure.model.networks import MOMENTS
from epure.model.generation import self_reconstructions
from epure.sample import (NEAREST_ROWS, SamplingError, component_indices, complete, draw_conditions,
                          fixed_conditions, generate, write_unconditional)
from epure.checkpoint import LoadedModel
from epure.config import ConfigError, save_config
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
    data = load_data(cfg.data)
    torch.manual_seed(0)
    untrained = LoadedModel(MMVAEPlus(cfg.model, COMPONENTS, cfg.data.image_size).eval(), cfg, data.normalizer,
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


def test_training_calibrates_the_threshold_that_masks_use(dataset, tmp_path) -> None:
    """With model.calibrate_threshold, each validation picks the threshold at which the model reconstructs the
    validation designs best; the checkpoint keeps it, evaluate scores with it unless told otherwise, and sample
    --binary draws with it."""
    cfg = tiny_config(dataset, tmp_path / "out", COMPONENTS, **{"train.epochs": 2, "model.foreground_weight": 4.0,
                                                                "model.calibrate_threshold": True})
    result = train(cfg)
    loaded = load_model(result.run_dir, prefer="last")
    data = load_data(cfg.data)
    with torch.no_grad():
        probs = self_reconstructions(loaded.model, torch.from_numpy(data.val.images).float() / 255,
                                     torch.from_numpy(data.normalizer.normalize(data.val.conditions))).numpy()
    assert loaded.threshold == best_threshold(probs, data.val.images > 127) != 0.5
    history = (result.run_dir / "metrics.csv").read_text().splitlines()
    assert history[0].split(",")[-1] == "threshold" and float(history[-1].split(",")[-1]) == loaded.threshold

    split = data.test.subset(np.arange(12))
    options = EvaluationOptions(bootstrap=0, draws=0)
    calibrated = evaluate(loaded, split, options)
    assert calibrated.info["options"]["threshold"] == loaded.threshold
    at_half = evaluate(loaded, split, dataclasses.replace(options, threshold=0.5))
    assert at_half.info["options"]["threshold"] == 0.5
    assert not np.array_equal(calibrated.iou, at_half.iou)

    ids, raw = ["a", "b", "c", "d"], data.test.conditions[:4]
    write_unconditional(loaded, tmp_path / "samples", raw, ids, binary=True, batch_size=4, seed=0)
    folder = tmp_path / "samples" / "unconditional"
    assert json.loads((folder / "sample.json").read_text())["threshold"] == loaded.threshold
    (drawn,) = generate(loaded, raw, batch_size=4, seed=0)
    written = np.stack([np.stack([np.asarray(Image.open(folder / c / f"{i}_{c}.png")) for c in COMPONENTS])
                        for i in ids]) > 127
    np.testing.assert_array_equal(written, design_masks(drawn, loaded.exclusive_components, loaded.threshold))
    # off by default (the toy set's one-pixel tails break above 0.5): masks stay at 0.5 and nothing is logged
    plain = train(tiny_config(dataset, tmp_path / "plain", COMPONENTS, **{"train.max_steps": 2}))
    assert load_model(plain.run_dir).threshold == 0.5
    assert "threshold" not in (plain.run_dir / "metrics.csv").read_text().splitlines()[0]


def test_training_standardises_the_encoders_shape_moments_and_keeps_them(dataset, tmp_path) -> None:
    """With model.encoder_moments, each encoder's moments are standardised by its training masks before the
    first step (mean 0, spread 1 over them), and the checkpoint
    carries the standardisation: the loaded model encodes as the trained one did."""
    cfg = tiny_config(dataset, tmp_path / "out", COMPONENTS, **{"train.max_steps": 2, "model.encoder_moments": True})
    result = train(cfg)
    loaded = load_model(result.run_dir, prefer="last")
    train_images = torch.from_numpy(load_data(cfg.data).train.images).float() / 255
    for m, encoder in enumerate(loaded.model.encoders):
        standardised = encoder.standardised_moments(train_images[:, m: m + 1])
        torch.testing.assert_close(standardised.mean(0), torch.zeros(MOMENTS), atol=1e-4, rtol=0)
        torch.testing.assert_close(standardised.std(0), torch.ones(MOMENTS), atol=1e-4, rtol=0)
    x, c = train_images[:3], torch.zeros(3, 2)
    assert all(e.w_tower.head.in_features == loaded.model.encoders[0].w_tower.head.in_features for e in
               loaded.model.encoders)
    with torch.no_grad():
        moved = [e.moment_loc.clone() for e in loaded.model.encoders]
        before = loaded.model.encode(x, loaded.model.cond(c)).w_loc
        for encoder in loaded.model.encoders:
            encoder.moment_loc.zero_()
        assert not torch.allclose(loaded.model.encode(x, loaded.model.cond(c)).w_loc, before)  # the moments count
    assert all(bool(loc.abs().sum() > 0) for loc in moved)


class Recorder(NullTracker):
    """Keeps every metric that training logs."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, metrics, step: int) -> None:
        self.logged.append(dict(metrics))


def test_cli_trains_dreg_with_k4_beta_2_5_and_the_auxiliary_completion_rule(dataset, tmp_path, monkeypatch) -> None:
    cfg = tiny_config(dataset, tmp_path / "out", COMPONENTS, **{
        "model.cross_prior": "aux", "model.objective": "dreg", "model.K": 4, "model.beta": 2.5,
        "wandb.log_every_steps": 1})
    config = tmp_path / "dreg.yaml"
    save_config(cfg, config)
    recorder = Recorder()
    monkeypatch.setattr("epure.tracking.make_tracker", lambda settings: recorder)
    res = CliRunner().invoke(app, ["train", "--config", str(config), "--max-steps", "4"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    steps = [row for row in recorder.logged if "train/loss" in row]
    assert len(steps) == 4
    for row in steps:
        assert all(np.isfinite(row[key]) for key in ("train/loss", "train/bound", "train/grad_norm"))
        assert row["train/loss"] == pytest.approx(-row["train/bound"])  # DReG's loss reports the bound's value
    (run_dir,) = (tmp_path / "out" / "mmvaeplus").iterdir()
    loaded = load_model(run_dir)
    assert (loaded.config.model.objective, loaded.config.model.K, loaded.config.model.cross_prior) == ("dreg", 4, "aux")


def test_grad_clip_bounds_the_norm_each_step_applies(dataset, tmp_path, monkeypatch) -> None:
    applied = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        applied.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    recorder = Recorder()
    cfg = tiny_config(dataset, tmp_path / "out", COMPONENTS, **{"train.max_steps": 3, "train.grad_clip": 0.5,
                                                                "wandb.log_every_steps": 1})
    train(cfg, tracker=recorder)
    logged = [row["train/grad_norm"] for row in recorder.logged if "train/grad_norm" in row]
    assert len(applied) == len(logged) == 3
    assert all(norm > 0.5 for norm in logged)  # the norm before clipping is what is logged
    assert applied == pytest.approx([0.5] * 3, rel=1e-4)
    with pytest.raises(ConfigError, match="train.grad_clip"):
        cfg.updated({"train.grad_clip": -1.0})


@pytest.fixture(scope="module")
def sampler(dataset, tmp_path_factory):
    """A model trained for 2 steps, and the train split's condition rows it was trained with."""
    cfg = tiny_config(dataset, tmp_path_factory.mktemp("sampler"), COMPONENTS, **{"train.max_steps": 2})
    run = train(cfg)
    return load_model(run.run_dir), load_data(cfg.data).train.conditions


def test_unconditional_requests_are_training_rows(sampler) -> None:
    loaded, rows = sampler
    np.testing.assert_array_equal(loaded.train_conditions, rows)  # stored in the checkpoint, as a tensor
    state = torch.load(loaded.path, weights_only=False)
    assert isinstance(state["train_conditions"], torch.Tensor)
    drawn = draw_conditions(loaded, 200, {}, seed=3)
    assert {tuple(r) for r in drawn} <= {tuple(r) for r in rows}  # each request is a training pair
    assert len({tuple(r) for r in drawn}) > 20
    np.testing.assert_array_equal(drawn, draw_conditions(loaded, 200, {}, seed=3))
    assert not np.array_equal(drawn, draw_conditions(loaded, 200, {}, seed=4))


def test_a_fixed_condition_draws_the_others_from_the_nearest_training_rows(sampler) -> None:
    loaded, rows = sampler
    width = float(np.median(rows[:, 0])) + 0.25  # between training widths: the nearest rows decide
    drawn = draw_conditions(loaded, 300, {"width_px": width}, seed=0)
    assert (drawn[:, 0] == np.float32(width)).all()
    distance = np.abs(rows[:, 0] - width) / loaded.normalizer.std[0]
    nearest = np.sort(distance)[NEAREST_ROWS - 1]
    assert set(drawn[:, 1]) <= set(rows[distance <= nearest, 1])  # heights that go with such widths
    assert set(drawn[:, 1]) == set(rows[distance <= nearest, 1])  # every one of them, in 300 draws
    both = draw_conditions(loaded, 5, {"height_px": 40.0, "width_px": 50.0}, seed=0)
    np.testing.assert_array_equal(both, np.tile(np.float32([50.0, 40.0]), (5, 1)))


def test_condition_options_name_the_model_columns(sampler, tmp_path) -> None:
    loaded, _ = sampler
    assert fixed_conditions(["height_px=41"], {"width": ("width_px", 57.0), "height": ("height_px", None)}) == {
        "height_px": 41.0, "width_px": 57.0}
    for bad, message in [(["width_px"], "expected NAME=VALUE"), (["width_px=wide"], "expected NAME=VALUE"),
                         (["width_px=nan"], "expected NAME=VALUE"), (["width_px=3", "width_px=4"], "given twice")]:
        with pytest.raises(SamplingError, match=message):
            fixed_conditions(bad, {})
    with pytest.raises(SamplingError, match="given twice"):
        fixed_conditions(["width_px=3"], {"width": ("width_px", 5.0)})
    with pytest.raises(SamplingError, match=r"unknown condition\(s\) \['depth_px'\]; this model's condition "
                                            r"columns are: width_px, height_px"):
        draw_conditions(loaded, 3, {"depth_px": 1.0}, seed=0)
    runner = CliRunner()
    res = runner.invoke(app, ["sample", "--checkpoint", str(loaded.path), "--condition", "depth_px=4",
                              "--out", str(tmp_path / "none")], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "width_px, height_px" in res.output
    assert not (tmp_path / "none").exists()
    res = runner.invoke(app, ["sample", "--checkpoint", str(loaded.path), "--num-samples", "3", "--binary",
                              "--condition", "height_px=44", "--width", "51", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "s" / "unconditional" / "composites").glob("*.png"))) == 3
    res = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "--condition" in res.output and "--cross-prior" in res.output


def test_checkpoints_without_training_rows_still_sample(sampler, tmp_path, caplog) -> None:
    loaded, _ = sampler
    state = torch.load(loaded.path, weights_only=False)
    del state["train_conditions"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    older = load_model(old)
    assert older.train_conditions is None
    with caplog.at_level(logging.WARNING, logger="epure.sample"):
        drawn = draw_conditions(older, 50, {"width_px": 50.0}, seed=0)
    assert any("holds no training conditions" in r.getMessage() and "old.pt" in r.getMessage()
               for r in caplog.records)
    norm = older.normalizer
    assert (drawn[:, 0] == 50).all() and (drawn[:, 1] >= norm.low[1]).all() and (drawn[:, 1] <= norm.high[1]).all()
