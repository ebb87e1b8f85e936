"""What loading may never do, and what it must notice: a crafted checkpoint never runs code (through
--checkpoint, --resume and a downloaded --artifact), old checkpoints still load, unknown checkpoint formats and
changed datasets are refused by name, and 0/1 masks are never read as empty.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from PIL import Image
from typer.testing import CliRunner

from epure.checkpoint import (FORMAT_VERSION, CheckpointError, CheckpointRefusedError, load_model, numpy_rng_state,
                              read_checkpoint, read_run_checkpoint, save_checkpoint, set_numpy_rng_state)
from epure.cli import app
from epure.config import DataConfig, save_config
from epure.data import DatasetError, load_data, load_split
from epure.data.cache import cache_root
from epure.data.dataset import _fingerprint, _component_dirs
from epure.tracking import NullTracker
from epure.train import train
from factories import TOY_COMPONENTS, synthetic_dataset, tiny_config

from conftest import write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WIDE = {"COLUMNS": "1000"}  # no line of the output wraps


class Plant:
    """Unpickling it runs a shell command that creates ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@dataclass
class Trained:
    data: Path
    run_dir: Path
    config: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    base = tmp_path_factory.mktemp("security")
    with pytest.MonkeyPatch.context() as patch:  # module scope runs before the per-test cache fixture
        patch.setenv("EPURE_CACHE_DIR", str(base / "cache"))
        data = synthetic_dataset(base / "data", n=40)
        cfg = tiny_config(data, base / "outputs", TOY_COMPONENTS, **{"train.max_steps": 2, "train.device": "cpu"})
        save_config(cfg, base / "config.yaml")
        run_dir = train(cfg).run_dir
    return Trained(data, run_dir, base / "config.yaml")


def format_1(state: dict) -> dict:
    """``state`` laid out as the epure before format_version wrote it: key ``format``, numpy's own RNG tuple."""
    old = {"format": 1, **{k: v for k, v in state.items() if k != "format_version"}}
    if "rng" in old:
        old["rng"] = {**old["rng"], "numpy": np.random.get_state()}
    return old


def plant(source: Path, target: Path, marker: Path) -> Path:
    """A real checkpoint (format 1, numpy arrays and all) with a payload that creates ``marker`` when unpickled."""
    state = format_1(torch.load(source, weights_only=True))
    state["extra"] = Plant(marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def test_planted_payload_really_runs_when_loaded_unsafely(trained: Trained, tmp_path: Path) -> None:
    """The other tests' crafted file is a real threat: the unsafe loader runs it."""
    marker = tmp_path / "ran"
    path = plant(trained.run_dir / "checkpoints" / "last.pt", tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_crafted_checkpoint_never_runs_through_checkpoint_option(trained: Trained, tmp_path: Path,
                                                                 command: str) -> None:
    marker = tmp_path / "ran"
    evil = plant(trained.run_dir / "checkpoints" / "last.pt", tmp_path / "evil.pt", marker)
    result = CliRunner().invoke(app, [command, "--checkpoint", str(evil), "--out", str(tmp_path / "out"),
                                      "--device", "cpu"], env=WIDE)
    assert result.exit_code == 2, result.output
    assert f"{evil}: refused to load" in result.output and "posix.system" in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_crafted_checkpoint_in_a_run_is_refused_without_falling_back(trained: Trained, tmp_path: Path) -> None:
    run_dir = shutil.copytree(trained.run_dir, tmp_path / "run")
    marker = tmp_path / "ran"
    evil = plant(trained.run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt", marker)
    with pytest.raises(CheckpointRefusedError, match="refused to load"):
        read_run_checkpoint(run_dir, prefer="last")  # previous.pt loads, but a tampered file is not skipped
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--wandb", "off"], env=WIDE)
    assert result.exit_code == 2 and f"{evil}: refused to load" in result.output, result.output
    assert not marker.exists() and evil.is_file() and not (run_dir / "checkpoints" / "last.pt.corrupt").exists()


class ServedArtifact:
    """What ``wandb.Api().artifact`` returns: its ``download`` copies the folder it serves, as W&B lays it out."""

    entity, project, version, digest, metadata = "team", "epure", "v0", "d1g35t", {}

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, f"{name}:v0"

    @property
    def qualified_name(self) -> str:
        return f"{self.entity}/{self.project}/{self.name}"

    def download(self, root: str, skip_cache: bool | None = None) -> str:
        shutil.copytree(self.folder, root, dirs_exist_ok=True)
        return root


class ServingApi:
    def __init__(self, artifact: ServedArtifact):
        self.served = artifact

    def artifact(self, path: str, type: str | None = None) -> ServedArtifact:
        return self.served


def no_network(*args, **kwargs):
    raise wandb.errors.CommError("tests never reach W&B")


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_crafted_artifact_never_runs(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     command: str) -> None:
    marker = tmp_path / "ran"
    served = tmp_path / "served"
    for name in ("config.yaml", "normalization.json", "components.json"):
        served.mkdir(exist_ok=True)
        shutil.copy(trained.run_dir / name, served / name)
    plant(trained.run_dir / "checkpoints" / "best.pt", served / "checkpoints" / "last.pt", marker)
    api = ServingApi(ServedArtifact(served, "model-evil"))
    monkeypatch.setattr(wandb, "Api", lambda: api)
    monkeypatch.setattr(wandb, "init", no_network)  # W&B is "online" here: nothing may reach the cloud
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    result = CliRunner().invoke(app, [command, "--artifact", "team/epure/model-evil:best", "--out",
                                      str(tmp_path / "out"), "--device", "cpu"], env=WIDE)
    downloaded = cache_root() / "artifacts" / "team" / "epure" / "model-evil" / "v0" / "checkpoints" / "last.pt"
    assert result.exit_code == 2, result.output
    assert f"{downloaded}: refused to load" in result.output
    assert downloaded.is_file() and not marker.exists() and not (tmp_path / "out").exists()


def test_format_1_checkpoints_still_load_resume_and_are_upgraded(trained: Trained, tmp_path: Path) -> None:
    run_dir = shutil.copytree(trained.run_dir, tmp_path / "run")
    for name in ("last.pt", "best.pt", "previous.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            torch.save(format_1(torch.load(path, weights_only=True)), path)
    with pytest.raises(Exception, match="Unsupported global"):  # what the allow-list is for
        torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["format_version"] == FORMAT_VERSION and "format" not in state
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    assert load_model(run_dir).meta["step"] == 2

    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--epochs", "3", "--max-steps", "3",
                                      "--wandb", "off"],
                                env=WIDE)
    assert result.exit_code == 0, result.output
    upgraded = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # no allow-list needed now
    assert upgraded["format_version"] == FORMAT_VERSION and upgraded["step"] == 3


def test_numpy_rng_state_round_trips_through_plain_values() -> None:
    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in the state
    saved = numpy_rng_state()
    expected = np.random.random(5)
    np.random.seed(0)
    set_numpy_rng_state(saved)
    np.testing.assert_array_equal(np.random.random(5), expected)


def test_unknown_or_newer_format_version_is_refused_naming_both(trained: Trained, tmp_path: Path) -> None:
    state = torch.load(trained.run_dir / "checkpoints" / "last.pt", weights_only=True)
    for version, why in ((FORMAT_VERSION + 7, "written by a newer epure"), ("x", "not written by epure")):
        path = tmp_path / f"v{version}.pt"
        torch.save({**state, "format_version": version}, path)
        with pytest.raises(CheckpointRefusedError) as error:
            read_checkpoint(path)
        assert (f"{path}: checkpoint format_version {version!r}, but this epure reads format_version 1 to "
                f"{FORMAT_VERSION}") in str(error.value) and why in str(error.value)
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(tmp_path / f"v{FORMAT_VERSION + 7}.pt"),
                                      "--out", str(tmp_path / "out")], env=WIDE)
    assert result.exit_code == 2 and f"format_version {FORMAT_VERSION + 7}" in result.output


def test_saving_anything_the_safe_loader_would_refuse_fails_at_once(tmp_path: Path) -> None:
    for bad, kind in ((np.float64(1.0), "numpy.float64"), (np.zeros(2), "numpy.ndarray"), (Path("x"), "PosixPath")):
        with pytest.raises(TypeError, match=rf"checkpoint\.extra\.inner\[1\] is a .*{kind}"):
            save_checkpoint(tmp_path / "c.pt", {"model": {}, "config": {}, "extra": {"inner": [1, bad]}})
    assert not list(tmp_path.iterdir())


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.values: dict = {}

    def summary(self, values: dict) -> None:
        self.values.update(values)


def test_resume_refuses_a_changed_dataset_unless_allowed_and_records_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic_dataset(tmp_path / "data", n=40)
    cfg = tiny_config(data, tmp_path / "outputs", TOY_COMPONENTS, **{"train.max_steps": 2, "train.device": "cpu"})
    run_dir = train(cfg).run_dir
    before = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["data_fingerprint"]
    png = next((data / "train" / "fpu").iterdir())
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))  # the same pixels, touched
    now = load_data(cfg.data).fingerprint
    assert now != before

    resume = ["train", "--resume", str(run_dir), "--epochs", "3", "--max-steps", "3", "--wandb", "off"]
    result = CliRunner().invoke(app, resume, env=WIDE)
    assert result.exit_code == 2, result.output
    assert "the dataset changed since this run was trained" in result.output
    assert before in result.output and now in result.output and "--allow-data-change" in result.output
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # untouched

    recorder = Recorder()
    monkeypatch.setattr("epure.tracking.make_tracker", lambda settings: recorder)
    result = CliRunner().invoke(app, [*resume, "--allow-data-change"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "going on because of --allow-data-change" in result.output
    change = {"step": 2, "previous": before, "current": now}
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["data_fingerprint"] == now and state["data_changes"] == [change]
    assert recorder.values["data_changes"] == [change] and load_model(run_dir).meta["data_changes"] == [change]

    result = CliRunner().invoke(app, ["train", "--allow-data-change", "--wandb", "off"], env=WIDE)
    assert result.exit_code == 2 and "only applies with --resume" in result.output


# ------------------------------------------------------------------------------------------- 0/1 masks

CFG = DataConfig(components=["a", "b"])


def rewrite(root: Path, component: str, convert) -> list[Path]:
    """Rewrite every PNG of ``component`` (both splits) through ``convert(uint8 array, path) -> array``."""
    paths = sorted(root.glob(f"*/{component}/*.png"))
    for path in paths:
        Image.fromarray(convert(np.asarray(Image.open(path)), path)).save(path)
    return paths


def test_01_masks_are_scaled_with_one_line_per_component(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = load_split(write_tiny_dataset(tmp_path / "ref", n=12, components=["a", "b"]), "train", CFG,
                           use_cache=False)
    root = write_tiny_dataset(tmp_path / "data", n=12, components=["a", "b"])
    black = root / "train" / "b" / "d0000_b.png"
    rewrite(root, "b", lambda x, path: np.zeros_like(x) if path == black else x // 255)  # plus one all-black
    expected = reference.images.copy()
    expected[0, 1] = 0
    for attempt in ("decoded", "cached"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="epure.data.dataset"):
            split = load_split(root, "train", CFG)
        np.testing.assert_array_equal(split.images, expected, err_msg=attempt)
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [f"{root}/train/b: every mask's pixels are 0 or 1: read as 0/1 masks and scaled to 0/255"]

    result = CliRunner().invoke(app, ["data", "check", str(root), "--components", "a", "b"], env=WIDE)
    assert result.exit_code == 0 and "dataset OK" in result.output
    assert f"{root}/test/b: every mask's pixels are 0 or 1" in result.output


def test_all_black_images_count_as_neither_kind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_tiny_dataset(tmp_path / "data", n=12, components=["a", "b"])
    original = load_split(root, "train", CFG, use_cache=False).images
    rewrite(root, "b", lambda x, path: np.zeros_like(x) if path.name < "d0004" else x)
    with caplog.at_level(logging.INFO, logger="epure.data.dataset"):
        images = load_split(root, "train", CFG, use_cache=False).images
    assert not caplog.records  # 0/255 masks and black ones: nothing to scale, nothing mixed
    np.testing.assert_array_equal(images[4:], original[4:])
    assert images[:4, 1].max() == 0


def test_a_component_mixing_01_and_0255_masks_is_an_error_naming_both_kinds(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", n=12, components=["a", "b"])
    rewrite(root, "b", lambda x, path: x // 255 if path.name in ("d0001_b.png", "d0005_b.png") else x)
    with pytest.raises(DatasetError) as error:
        load_split(root, "train", CFG)
    result = CliRunner().invoke(app, ["data", "check", str(root), "--components", "a", "b"], env=WIDE)
    assert result.exit_code == 2
    for message in (str(error.value), result.output):
        assert f"{root}/train/b: component 'b' mixes 0/1 masks (2 images" in message
        assert "['d0001_b.png', 'd0005_b.png']" in message and "d0000_b.png" in message
    assert not (cache_root() / "datasets").exists() or not list((cache_root() / "datasets").iterdir())


def test_a_cache_written_before_01_scaling_is_never_used(tmp_path: Path) -> None:
    """The cache of the epure that read 0/1 masks as they are (its name had no version) cannot hide them."""
    root = write_tiny_dataset(tmp_path / "data", n=12, components=["a", "b"])
    rewrite(root, "b", lambda x, path: x // 255)
    raw = load_split(root, "train", CFG, use_cache=False).images.copy()
    raw[:, 1] //= 255  # what the old loader cached: the 0/1 values as they are
    key = _fingerprint(root, "train", CFG, _component_dirs(root, "train", CFG), root / CFG.csv)
    stale = cache_root() / "datasets" / f"train-{key}.npz"
    stale.parent.mkdir(parents=True)
    np.savez(stale, images=raw)
    assert load_split(root, "train", CFG).images[:, 1].max() == 255
