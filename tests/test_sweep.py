"""`epure sweep` offline: W&B's own engine chooses the trials, each trial trains a tiny model and is an offline
W&B run in the sweep's group; failures are recorded and the sweep goes on; bad sweep files stop before training.

Nothing reaches the W&B cloud: runs are read back from their offline .wandb files with ``wandb_records``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from epure import sweep as sweeping
from epure.cli import app
from epure.config import save_config
from epure.sweep import SweepError, load_sweep, run_offline, trial_config, trials_table
from factories import synthetic_dataset, tiny_config
from wandb_records import OfflineRun, find_run_files

pytestmark = pytest.mark.usefixtures("one_torch_thread", "wandb_sandbox")


@pytest.fixture
def base_config(tmp_path: Path) -> Path:
    """A tiny model on 60 synthetic designs, as a config file beside the sweep files."""
    cfg = tiny_config(synthetic_dataset(tmp_path / "data", n=60), tmp_path / "outputs")
    save_config(cfg, tmp_path / "tiny.yaml")
    return tmp_path / "tiny.yaml"


def write_sweep(folder: Path, **definition) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    return path


def test_offline_sweep_trains_the_engine_trials_ranks_them_and_survives_a_failing_trial(
        tmp_path: Path, base_config: Path, wandb_sandbox: Path, monkeypatch: pytest.MonkeyPatch):
    # a Normal likelihood with scale 0 makes the loss NaN at once: those trials fail, the others train
    path = write_sweep(tmp_path, name="tiny", method="random",
                       metric={"name": "val/cross_iou", "goal": "maximize"},
                       parameters={"model.beta": {"distribution": "uniform", "min": 0.5, "max": 3.0},
                                   "model.latent_dim_w": {"values": [2, 4]},
                                   "model.likelihood_scale": {"values": [0.0, 0.75]},
                                   "model.likelihood": {"value": "normal"},
                                   "train.max_nonfinite_steps": {"value": 1},
                                   "train.max_steps": {"value": 3}},
                       epure={"config": "tiny.yaml", "eval_limit": 8, "seed": 3})
    proposals: list[dict] = []
    trained: list = []
    engine_next_run, real_train = sweeping.sweeps.next_run, sweeping.train

    def spy_next_run(definition, runs, *args, **kwargs):
        proposal = engine_next_run(definition, runs, *args, **kwargs)
        proposals.append({k: sweeping.plain(v["value"]) for k, v in proposal.config.items()})
        return proposal

    def spy_train(cfg, **kwargs):
        trained.append(cfg)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(sweeping.sweeps, "next_run", spy_next_run)
    monkeypatch.setattr(sweeping, "train", spy_train)
    spec = load_sweep(path)
    outcome = run_offline(spec, count=3)

    trials = outcome.trials
    assert [t.params for t in trials] == proposals and len(trials) == 3
    assert {t.params["model.likelihood_scale"] for t in trials} == {0.0, 0.75}, "seed 3 draws both"
    for trial, cfg in zip(trials, trained):  # the config each trial trained is the engine's proposal
        assert cfg.to_dict() == trial_config(spec.base, trial.params).updated(
            {"train.output_dir": str(outcome.folder), "wandb.mode": "offline", "wandb.group": outcome.label,
             "wandb.tags": ["sweep"]}).to_dict()
        assert cfg.model.latent_dim_u == trial.params["model.latent_dim_w"] + cfg.model.latent_dim_z
        if trial.params["model.likelihood_scale"] == 0.0:
            assert trial.status == "failed" and "TrainingError: loss was nan" in trial.error
            assert trial.value("val/cross_iou") is None
        else:
            assert trial.status == "finished" and trial.error is None
            assert 0.0 <= trial.value("val/cross_iou") <= 1.0 and math.isfinite(trial.metrics["val/loss"])

    # the CSV and the table: best first, failed trials last
    with open(outcome.csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["trial"]) for r in rows] == [t.number for t in sweeping.ranked(spec, trials)]
    scores = [float(r["val/cross_iou"]) for r in rows if r["status"] == "finished"]
    assert scores == sorted(scores, reverse=True)
    assert [r["status"] for r in rows] == sorted((r["status"] for r in rows), key=lambda s: s != "finished")
    assert all("loss was nan" in r["error"] for r in rows if r["status"] == "failed")
    table = trials_table(outcome)
    assert list(table.columns[1].cells) == [r["trial"] for r in rows]

    # every trial is an offline W&B run in the sweep's group, with its scores or its error
    runs = {OfflineRun(f).run.run_id: OfflineRun(f) for f in find_run_files(wandb_sandbox)}
    assert sorted(runs) == sorted(t.wandb_run for t in trials)
    assert outcome.sync_command.split()[2:] == [t.sync_dir for t in trials]
    for trial in trials:
        run = runs[trial.wandb_run]
        assert run.run.group == outcome.label and run.summary["sweep/status"] == trial.status
        assert run.config["model"]["beta"] == pytest.approx(trial.params["model.beta"])
        if trial.status == "failed":
            assert run.exit_code == 1 and "loss was nan" in run.summary["sweep/error"]
        else:
            assert run.exit_code == 0
            assert run.summary["val/cross_iou"] == pytest.approx(trial.value("val/cross_iou"))


@pytest.mark.parametrize("definition, message", [
    ({"method": "grid", "parameters": {"model.betta": {"values": [1.0, 2.0]}}},
     "unknown parameter 'model.betta' (did you mean 'model.beta'?); parameters are config keys: data.root"),
    ({"method": "hyperopt", "parameters": {"model.beta": {"values": [1.0]}}},
     "method must be one of grid, random, bayes, got 'hyperopt'"),
    ({"method": "grid", "parameters": {"model.nf": {"values": [8, "wide"]}}},
     "parameter 'model.nf' = 'wide': config key 'model.nf' must be an integer"),
    ({"method": "random", "parameters": {"model.beta": {"min": -1.0, "max": 2.0}}},
     "parameter 'model.beta' = -1.0: model.beta must be >= 0"),
    ({"method": "bayes", "parameters": {"model.beta": {"min": 0.5, "max": 2.0}}},
     "method bayes and early_terminate need a metric"),
    ({"method": "grid", "metric": {"name": "val/iou", "goal": "maximize"}, "parameters": {"model.beta": {"value": 1.0}}},
     "metric.name must be one of val/cross_iou"),
])
def test_an_invalid_sweep_file_is_an_error_naming_it_before_any_training(
        tmp_path: Path, base_config: Path, monkeypatch: pytest.MonkeyPatch, definition: dict, message: str):
    monkeypatch.setattr(sweeping, "train", lambda *a, **k: pytest.fail("a trial trained"))
    path = write_sweep(tmp_path, **definition, epure={"config": "tiny.yaml"})
    with pytest.raises(SweepError) as caught:
        load_sweep(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    result = CliRunner().invoke(app, ["sweep", str(path), "--count", "1", "--offline"])
    assert result.exit_code == 2 and "error:" in result.output and "a trial trained" not in result.output


def test_latent_u_follows_the_swept_w_and_z(base_config: Path, tmp_path: Path):
    spec = load_sweep(write_sweep(tmp_path, method="grid", parameters={"model.latent_dim_z": {"values": [3, 6]}},
                                  epure={"config": "tiny.yaml"}))
    cfg = trial_config(spec.base, {"model.latent_dim_z": 6})
    assert (cfg.model.latent_dim_w, cfg.model.latent_dim_z, cfg.model.latent_dim_u) == (4, 6, 10)
    with pytest.raises(SweepError, match="leave model.latent_dim_u out of the sweep"):
        load_sweep(write_sweep(tmp_path, method="grid", epure={"config": "tiny.yaml"}, parameters={
            "model.latent_dim_z": {"values": [3, 6]}, "model.latent_dim_u": {"value": 7}}))


def test_offline_early_termination_scores_every_epoch_and_stops_what_the_engine_says(
        tmp_path: Path, base_config: Path, wandb_sandbox: Path, monkeypatch: pytest.MonkeyPatch):
    path = write_sweep(tmp_path, name="hb", method="grid", metric={"name": "val/cross_iou", "goal": "maximize"},
                       early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2},
                       parameters={"model.beta": {"values": [1.0, 2.0, 3.0]}, "train.epochs": {"value": 2}},
                       epure={"config": "tiny.yaml", "eval_limit": 4})
    asked: list[tuple[str, int]] = []
    engine_stop_runs = sweeping.sweeps.stop_runs

    def stop_trial_2(definition, runs):  # the engine is asked after every epoch; trial 2 is stopped after its first
        engine_stop_runs(definition, runs)
        running = [r for r in runs if r.state == "running"]
        asked.append((running[0].name, len(running[0].history)))
        return running if running[0].name == "trial-2" else []

    spec = load_sweep(path)
    monkeypatch.setattr(sweeping.sweeps, "stop_runs", stop_trial_2)
    outcome = run_offline(spec, count=None)
    assert asked == [("trial-1", 1), ("trial-1", 2), ("trial-2", 1), ("trial-3", 1), ("trial-3", 2)]
    assert [(t.status, len(t.history)) for t in outcome.trials] == [("finished", 2), ("stopped", 1), ("finished", 2)]
    runs = {OfflineRun(f).run.run_id: OfflineRun(f) for f in find_run_files(wandb_sandbox)}
    for trial in outcome.trials:
        logged = [row["val/cross_iou"] for row in runs[trial.wandb_run].history if "val/cross_iou" in row]
        assert logged == pytest.approx([scores["val/cross_iou"] for scores in trial.history])
