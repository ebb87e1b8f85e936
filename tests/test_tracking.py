"""W&B tracking with the real wandb SDK, offline: what a training run records, model artifacts, --artifact.

Runs are read back from their .wandb transaction logs with ``wandb_records``. Nothing here reaches the W&B
cloud: the only test double is ``wandb.Api`` in the download test, whose ``artifact(...).download`` copies
the files the offline run really logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
import yaml
from PIL import Image
from typer.testing import CliRunner

from epure.checkpoint import load_model, save_checkpoint
from epure.cli import app
from epure.config import Config, ConfigError, WandbConfig, config_from_dict, save_config
from epure.data.cache import cache_root
from epure.data.synth import write_synthetic_dataset
from epure.sample import progress_images, unconditional_requests, write_unconditional
from epure.tracking import (ArtifactError, NullTracker, WandbTracker, artifact_info, make_tracker,
                            parse_artifact_spec, resolve_artifact)
from epure import train as train_module
from epure.train import TrainResult, train
from factories import sandbox_wandb
from wandb_records import OfflineRun, find_run_file

pytestmark = pytest.mark.usefixtures("one_torch_thread", "wandb_sandbox")
RUN_FILES = ["checkpoints/last.pt", "components.json", "config.yaml", "normalization.json"]


def tiny_tree(data_root: Path, output_dir: Path, images_every_epochs: int = 1, max_steps: int = 0) -> dict:
    """One epoch of 4 steps (or ``max_steps``) of a very small model on 40 synthetic designs."""
    return {"data": {"root": str(data_root)},
            "model": {"nf": 4, "nf_max": 8, "latent_dim_w": 2, "latent_dim_z": 2, "latent_dim_u": 4},
            "train": {"batch_size": 8, "epochs": 1, "max_steps": max_steps, "output_dir": str(output_dir),
                      "device": "cpu"},
            "wandb": {"images_every_epochs": images_every_epochs, "log_every_steps": 1}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "d", n=40, seed=0)


def images_fn(loaded, data):
    return progress_images(loaded, data.val.images[:4], data.val.conditions[:4])


@dataclass
class Trained:
    result: TrainResult
    tracker: WandbTracker
    run: OfflineRun
    wandb_data_dir: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Trained:
    """One tiny epoch through the library, tracked offline: the run the record tests read."""
    base = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("EPURE_CACHE_DIR", str(base / "epure-cache"))
        wandb_dir = sandbox_wandb(monkeypatch, base)
        cfg = config_from_dict(tiny_tree(dataset, base / "outputs"))
        tracker = WandbTracker(cfg.wandb, "offline")
        result = train(cfg, tracker=tracker, images_fn=images_fn)
        tracker.finish(0)
        wandb.teardown()
    return Trained(result, tracker, OfflineRun(find_run_file(wandb_dir)), base / "data")


def test_training_run_records_config_losses_images_and_model(trained: Trained) -> None:
    run, result = trained.run, trained.result
    info = json.loads((result.run_dir / "wandb_run.json").read_text())
    assert run.run.run_id == info["id"] and run.run.display_name == result.run_dir.name
    assert run.run.project == "epure" and run.run.job_type == "train"
    assert run.config["model"]["nf"] == 4 and run.config["data"]["root"].endswith("/d")
    assert run.config["wandb"]["images_every_epochs"] == 1

    steps = [row for row in run.history if "train/loss" in row]
    assert len(steps) == result.step == 4
    assert all(math.isfinite(row["train/loss"]) for row in steps)
    assert {"train/recon/group_nc", "train/recon/tpc", "train/kl_z", "train/kl_w", "train/lr",
            "train/samples_per_sec"} <= set(steps[0])
    assert [row["val/loss"] for row in run.history if "val/loss" in row] == [pytest.approx(result.last_val_loss)]
    assert set(run.images) == {"samples/unconditional", "samples/cross_matrix", "samples/composites"}

    (model,) = [a for a in run.artifacts if a.type == "model"]
    assert model.name == info["artifact"] == f"model-{info['id']}"
    assert {"latest", "best", "epoch-1"} <= set(model.aliases)
    assert sorted(model.manifest_paths) == RUN_FILES
    stored = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert model.metadata["epoch"] == 1 and model.metadata["val_loss"] == pytest.approx(result.last_val_loss)
    assert model.metadata["data_fingerprint"] == stored["data_fingerprint"]
    assert "git_commit" in model.metadata and model.metadata["run_dir"] == str(result.run_dir)
    sizes = {entry.path: entry.size for entry in model.record.manifest.contents}
    assert sizes["checkpoints/last.pt"] < (result.run_dir / "checkpoints" / "last.pt").stat().st_size  # no optimiser

    assert run.summary["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert run.summary["status"] == "finished"
    assert run.exit_code == 0 and not run.preempting
    assert trained.tracker.sync_hint == f"wandb sync {run.path.parent}"


class FakeArtifact:
    """What ``wandb.Api().artifact`` returns; ``download`` copies a folder laid out as W&B downloads one."""

    def __init__(self, source: Path, collection: str):
        self.source, self.entity, self.project, self.version = source, "team", "epure", "v0"
        self.name, self.digest, self.metadata = f"{collection}:v0", "d1g35t", {"epoch": 1}
        self.downloads = 0

    @property
    def qualified_name(self) -> str:
        return f"{self.entity}/{self.project}/{self.name}"

    def download(self, root: str, skip_cache: bool | None = None) -> str:
        self.downloads += 1
        shutil.copytree(self.source, root, dirs_exist_ok=True)
        return root


class FakeApi:
    def __init__(self, artifact: FakeArtifact):
        self.served, self.requests = artifact, []

    def artifact(self, path: str, type: str | None = None) -> FakeArtifact:
        self.requests.append((path, type))
        return self.served


def as_downloaded(trained: Trained, folder: Path) -> tuple[Path, str]:
    """The model artifact's files, from the staging copies the offline run logged, under their artifact paths."""
    (model,) = [a for a in trained.run.artifacts if a.type == "model"]
    for entry in model.record.manifest.contents:
        (folder / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(entry.local_path, folder / entry.path)
    return folder, model.name


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))]


def test_artifact_downloads_once_and_samples_like_the_run(trained: Trained, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source, collection = as_downloaded(trained, tmp_path / "served")
    fake = FakeArtifact(source, collection)
    api = FakeApi(fake)
    monkeypatch.setattr(wandb, "Api", lambda: api)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)

    folder = resolve_artifact(f"{collection}:best", entity="team")
    assert folder == cache_root() / "artifacts" / "team" / "epure" / collection / "v0"
    assert api.requests == [(f"team/epure/{collection}:best", "model")] and fake.downloads == 1
    assert artifact_info(folder)["qualified_name"] == f"team/epure/{collection}:v0"

    from_artifact, from_run = load_model(folder), load_model(trained.result.run_dir)
    assert from_artifact.meta["epoch"] == 1
    # what sampling reads besides the weights travels too: the fitted prior and the whole-design decision
    assert from_artifact.exclusive_components is from_run.exclusive_components is True
    torch.testing.assert_close(from_artifact.fitted_prior.means, from_run.fitted_prior.means)
    for loaded, out in ((from_artifact, tmp_path / "a"), (from_run, tmp_path / "b")):
        raw, ids = unconditional_requests(loaded, 3, {}, None, seed=0)
        write_unconditional(loaded, out, raw, ids, seed=0)
    samples = pixels(tmp_path / "a")
    assert len(samples) == 3 * 6 + 1  # 5 components and a composite per sample, one grid
    for a, b in zip(samples, pixels(tmp_path / "b"), strict=True):
        np.testing.assert_array_equal(a, b)

    assert resolve_artifact(f"team/epure/{collection}:best") == folder
    assert len(api.requests) == 2 and fake.downloads == 1  # the alias is asked again; the files are not

    monkeypatch.setenv("WANDB_MODE", "offline")  # a pinned version in the cache needs no W&B at all
    assert resolve_artifact(f"team/epure/{collection}:v0") == folder and len(api.requests) == 2
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["sample", "--artifact", f"team/epure/{collection}:v0", "--num-samples", "2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(list((out / "unconditional" / "composites").glob("*.png"))) == 2 and fake.downloads == 1
    record = json.loads((out / "unconditional" / "sample.json").read_text())  # the folder names its model
    assert record["model"] == {"checkpoint": str(from_artifact.path), "artifact": f"team/epure/{collection}:v0",
                               "artifact_version": "v0"}
    assert record["data_fingerprint"] == from_artifact.meta["data_fingerprint"]
    # a model from W&B is sampled with W&B (offline here): the samples artifact names the model it came from
    wandb.teardown()
    (logged,) = [a for a in OfflineRun(find_run_file(os.environ["WANDB_DIR"])).artifacts if a.type == "samples"]
    assert logged.metadata["model_artifact"] == f"team/epure/{collection}:v0"
    assert logged.metadata["model"]["artifact_version"] == "v0"


@pytest.mark.parametrize("wandb_mode,reason", [("offline", "WANDB_MODE=offline"), (None, "no W&B login")])
def test_artifact_without_wandb_points_to_checkpoint_and_local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   wandb_mode: str | None, reason: str) -> None:
    if wandb_mode is None:
        monkeypatch.delenv("WANDB_MODE")
    run_dir = tmp_path / "outputs" / "mmvaeplus" / "2026-01-02_03-04-05"
    run_dir.mkdir(parents=True)
    (run_dir / "wandb_run.json").write_text(json.dumps({"id": "ab12cd34", "artifact": "model-ab12cd34"}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sample", "--artifact", "model-ab12cd34:best"])
    flat = "".join(result.output.split())
    assert result.exit_code == 2
    assert "--checkpoint" in flat and "".join(reason.split()) in flat
    assert "epuresample--checkpointoutputs/mmvaeplus/2026-01-02_03-04-05" in flat


@pytest.mark.parametrize("spec,expected", [
    ("model-x:best", ("ent", "proj", "model-x", "best")),
    ("model-x", ("ent", "proj", "model-x", "latest")),
    ("p2/model-x:v3", ("ent", "p2", "model-x", "v3")),
    ("e2/p2/model-x:epoch-4", ("e2", "p2", "model-x", "epoch-4")),
])
def test_parse_artifact_spec(spec: str, expected: tuple) -> None:
    assert parse_artifact_spec(spec, project="proj", entity="ent") == expected


def test_parse_artifact_spec_rejects_malformed_and_uses_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("a/b/c/d:x", "/model:x", "model:x:y", ":best"):
        with pytest.raises(ArtifactError, match="ENTITY/PROJECT/NAME:ALIAS"):
            parse_artifact_spec(bad)
    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_ENTITY", "envent")
    assert parse_artifact_spec("m:best") == ("envent", "envproj", "m", "best")


def test_cli_train_without_login_tracks_offline_with_options(dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             wandb_sandbox: Path) -> None:
    monkeypatch.delenv("WANDB_MODE")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(dataset, tmp_path / "outputs", images_every_epochs=0)))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--project", "tires", "--name", "first",
                                      "--tags", "a", "b", "--group", "g", "--notes", "hello"])
    assert result.exit_code == 0, result.output
    assert "".join(result.output.split()).count("notloggedintoW&B") == 1
    run = OfflineRun(find_run_file(wandb_sandbox))
    assert f"wandb sync {run.path.parent}" in result.output
    assert (run.run.project, run.run.display_name, run.run.tags, run.run.group, run.run.notes) == (
        "tires", "first", ["a", "b"], "g", "hello")
    assert run.config["wandb"]["tags"] == ["a", "b"] and run.config["wandb"]["mode"] == "auto"
    assert [a.metadata["epoch"] for a in run.artifacts if a.type == "model"] == [1]
    assert run.exit_code == 0


def test_cli_train_wandb_off_writes_no_wandb_files(dataset: Path, tmp_path: Path, wandb_sandbox: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(dataset, tmp_path / "outputs", images_every_epochs=0, max_steps=1)))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--wandb", "off"])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "outputs" / "mmvaeplus").iterdir()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert not any(wandb_sandbox.iterdir()) and not (run_dir / "wandb_run.json").exists()
    assert not list(tmp_path.rglob("*.wandb")) and "wandb sync" not in result.output


def test_tracking_mode_choice(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert isinstance(make_tracker(WandbConfig(mode="online")), NullTracker)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert make_tracker(WandbConfig(mode="auto")).mode == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert make_tracker(WandbConfig(mode="auto")).mode == "online"
    assert not caplog.records  # only a missing login is worth a warning


@pytest.mark.parametrize("value", ["", "Offline", "off"])
def test_a_wandb_mode_that_wandb_refuses_is_a_clear_error(value: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """W&B itself fails inside wandb.init with a validation traceback on these; epure names the variable first."""
    monkeypatch.setenv("WANDB_MODE", value)
    with pytest.raises(ConfigError, match=f"WANDB_MODE is {value!r}, which W&B does not accept"):
        make_tracker(WandbConfig(mode="auto"))
    assert isinstance(make_tracker(WandbConfig(mode="off")), NullTracker)  # tracking off never reads it
    res = CliRunner().invoke(app, ["train", "--max-steps", "1", "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 2 and "unset WANDB_MODE" in " ".join(res.output.split())  # however the console wraps
    assert not (tmp_path / "out").exists()  # refused before any run directory or data


def test_wandb_errors_never_stop_training(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture, wandb_sandbox: Path) -> None:
    def outage(self, *args, **kwargs):
        raise wandb.errors.CommError("simulated W&B outage")

    monkeypatch.setattr(wandb.Run, "log", outage)
    cfg = config_from_dict(tiny_tree(dataset, tmp_path / "outputs", images_every_epochs=0, max_steps=2))
    tracker = WandbTracker(cfg.wandb, "offline")
    with caplog.at_level(logging.WARNING, logger="epure.tracking"):
        result = train(cfg, tracker=tracker)
        tracker.finish(0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "epure.tracking"]
    assert len(warnings) == 1 and "simulated W&B outage" in warnings[0]
    assert result.status == "budget" and result.step == 2  # two steps: the second log call is skipped quietly
    assert {p.name for p in (result.run_dir / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    run = OfflineRun(find_run_file(wandb_sandbox))
    # the dataset was declared before the outage; quiet after the first error (no model), yet the run is closed
    assert [a.type for a in run.artifacts] == ["dataset"] and run.finished


def test_model_versions_are_rate_limited_and_held_back_ones_logged_at_finish(tmp_path: Path,
                                                                             wandb_sandbox: Path) -> None:
    cfg = Config()
    run_dir = tmp_path / "outputs" / "mmvaeplus" / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "normalization.json").write_text("{}")
    (run_dir / "components.json").write_text("[]")
    tracker = WandbTracker(cfg.wandb, "offline", artifact_every_minutes=60)
    tracker.start(run_dir, cfg)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    for epoch, best, val_loss in [(1, True, 3.0), (2, True, 2.0), (3, False, 2.5), (4, False, math.nan)]:
        save_checkpoint(checkpoint, {"model": {"w": torch.full((2,), float(epoch))}, "config": cfg.to_dict(),
                                     "components": [], "normalizer": {}, "epoch": epoch,
                                     "optimizer": {"state": torch.zeros(4096)}})
        tracker.log_checkpoint(checkpoint, ["latest", f"epoch-{epoch}"] + ["best"] * best,
                               {"epoch": epoch, "val_loss": val_loss})
    tracker.mark_preempting()
    tracker.finish(143)
    run = OfflineRun(find_run_file(wandb_sandbox))
    logged = [(a.metadata["epoch"], sorted(a.aliases)) for a in run.artifacts]
    assert logged == [(1, ["best", "epoch-1", "latest"]), (2, ["best", "epoch-2", "latest"]),
                      (4, ["epoch-4", "latest"])]  # epoch 3 was superseded before it was due
    entry = next(e for e in run.artifacts[1].record.manifest.contents if e.path == "checkpoints/last.pt")
    weights = torch.load(entry.local_path, weights_only=True)
    assert weights["model"]["w"].tolist() == [2.0, 2.0] and "optimizer" not in weights
    assert run.artifacts[2].metadata["val_loss"] is None  # NaN is not JSON
    assert run.preempting and run.exit_code == 143
    assert json.loads((run_dir / "wandb_run.json").read_text())["id"] == run.run.run_id


def test_a_best_version_logged_before_its_fit_is_logged_again_fitted(dataset: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      wandb_sandbox: Path) -> None:
    """Epoch 1 is the best and draws no pictures, so training does not fit the prior there and W&B's best
    version has none; at the end best.pt is fitted, and W&B gets that fitted state as the new best."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    losses = iter([5.0, 9.0, 7.0])  # validation losses by epoch: the first one stays the best
    monkeypatch.setattr(train_module, "validation_sums", lambda *args, **kwargs: [next(losses), 1.0])
    tree = tiny_tree(dataset, tmp_path / "outputs", images_every_epochs=2)
    tree["model"]["latent_sampler"] = "fitted"
    tree["train"]["epochs"] = 3
    cfg = config_from_dict(tree)
    tracker = WandbTracker(cfg.wandb, "offline", artifact_every_minutes=0)
    result = train(cfg, tracker=tracker, images_fn=images_fn)
    tracker.finish(0)
    run = OfflineRun(find_run_file(wandb_sandbox))
    logged = [(a.metadata["epoch"], sorted(a.aliases)) for a in run.artifacts if a.type == "model"]
    assert logged == [(1, ["best", "epoch-1", "latest"]), (2, ["epoch-2", "latest"]),
                      (1, ["best", "epoch-1", "latest"]), (3, ["epoch-3", "latest"])]  # W&B adds latest

    def weights(version: int) -> dict:
        artifact = [a for a in run.artifacts if a.type == "model"][version]
        entry = next(e for e in artifact.record.manifest.contents if e.path == "checkpoints/last.pt")
        return torch.load(entry.local_path, weights_only=True)

    first, refitted = weights(0), weights(2)
    assert first["fitted_prior"] is None and refitted["fitted_prior"] is not None
    best = torch.load(result.run_dir / "checkpoints" / "best.pt", weights_only=True)
    torch.testing.assert_close(refitted["fitted_prior"]["means"], best["fitted_prior"]["means"])
    for name, tensor in first["model"].items():
        torch.testing.assert_close(refitted["model"][name], tensor)
