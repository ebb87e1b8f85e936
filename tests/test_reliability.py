"""Faults tried for real: signals and kill -9 during `epure train`, damaged checkpoints, NaN losses, a full or
read-only disk, bad config keys and bad sampling requests.

The interrupted runs are subprocesses of ``python -m epure train``; every run, interrupted or not, is
compared with one uninterrupted reference run of ``STEPS`` steps through the library.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from epure.checkpoint import CheckpointError, load_model, read_run_checkpoint
from epure.cli import app
from epure.config import Config, ConfigError, load_config, save_config
from epure.data import load_data
from epure.data.synth import write_synthetic_dataset
from epure.sample import SamplingError, unconditional_requests, write_unconditional
from epure.tracking import NullTracker
from epure.train import TrainingError, epoch_permutation, train
from factories import TOY_COMPONENTS, tiny_config
from wandb_records import OfflineRun, find_run_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 12  # two epochs of 6 steps; checkpoints every 2 steps
WAIT_S = 180  # for a subprocess to reach a checkpoint on a busy machine


@dataclass
class Reference:
    data_root: Path
    cfg: Config  # 50 epochs: only --max-steps and signals end these runs
    run_dir: Path  # the uninterrupted run of STEPS steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    base = tmp_path_factory.mktemp("reference")
    root = write_synthetic_dataset(base / "data", n=60, seed=0)
    cfg = tiny_config(root, base / "outputs", TOY_COMPONENTS, **{
        "train.epochs": 50, "train.batch_size": 8, "train.checkpoint_every_steps": 2, "train.device": "cpu"})
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("EPURE_CACHE_DIR", str(base / "cache"))
        result = train(cfg.updated({"train.max_steps": STEPS}))
    assert result.step == STEPS and result.epoch == 2
    return Reference(root, cfg, result.run_dir)


def weights(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["model"]


def assert_same_weights(run_dir: Path, reference: Reference) -> None:
    expected, actual = weights(reference.run_dir), weights(run_dir)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def write_config(reference: Reference, folder: Path, **overrides) -> Path:
    path = folder / "config.yaml"
    save_config(reference.cfg.updated({"train.output_dir": str(folder / "outputs"), **overrides}), path)
    return path


def start_training(config: Path, log_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    with open(log_path, "w") as log_file:
        return subprocess.Popen([sys.executable, "-m", "epure", "train", "--config", str(config), *args],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)


def wait_for_checkpoints(process: subprocess.Popen, outputs: Path, names: tuple[str, ...], log_path: Path) -> Path:
    """Poll until the run has written all ``names`` in its checkpoints folder; return the run directory."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for folder in outputs.glob("mmvaeplus/*/checkpoints"):
            if all((folder / name).is_file() for name in names):
                return folder.parent
        if process.poll() is not None:
            pytest.fail(f"training exited early ({process.returncode}):\n{log_path.read_text()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no {names} after {WAIT_S} s:\n{log_path.read_text()}")


def resume(run_dir: Path, steps: int = STEPS) -> str:
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--max-steps", str(steps), "--wandb", "off"],
                                env={"COLUMNS": "400"})  # wide enough that no log line wraps
    assert result.exit_code == 0, result.output
    return result.output


def test_sigterm_checkpoints_marks_wandb_preempted_and_resume_equals_uninterrupted(
        reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    log_path = tmp_path / "train.log"
    process = start_training(write_config(reference, tmp_path), log_path, "--wandb", "offline")
    run_dir = wait_for_checkpoints(process, tmp_path / "outputs", ("last.pt",), log_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_S) == 143, log_path.read_text()
    log_text = log_path.read_text()
    assert "SIGTERM received" in log_text and f"epure train --resume {run_dir}" in log_text.replace("\n", "")

    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 2 <= state["step"] < STEPS  # the step under way finished and was checkpointed
    run = OfflineRun(find_run_file(tmp_path / "WANDB_DIR"))
    assert run.preempting and run.exit_code == 143
    assert run.summary["status"] == "interrupted"

    output = resume(run_dir)
    assert f"from last.pt at epoch {state['epoch']}, step {state['step']}" in output
    assert_same_weights(run_dir, reference)


def test_sigkill_resume_continues_from_the_last_checkpoint(reference: Reference, tmp_path: Path) -> None:
    log_path = tmp_path / "train.log"
    process = start_training(write_config(reference, tmp_path), log_path)
    # both files exist only once the checkpoints of steps 2 and 4 are written: last.pt holds step 4 or later
    run_dir = wait_for_checkpoints(process, tmp_path / "outputs", ("last.pt", "previous.pt"), log_path)
    process.kill()
    assert process.wait(WAIT_S) == -signal.SIGKILL

    used, state = read_run_checkpoint(run_dir, prefer="last")
    assert used.name == "last.pt" and 4 <= state["step"] < STEPS
    output = resume(run_dir)
    assert f"at epoch {state['epoch']}, step {state['step']}" in output  # lost only the steps after it
    assert_same_weights(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # a save cut short leaves nothing behind


def test_sigint_finishes_the_step_and_exits_130(reference: Reference, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    class InterruptAtStep3(NullTracker):
        """Presses Ctrl-C from inside step 3, as a user would mid-step."""

        exit_code: int | None = None
        preempted = False

        def log(self, metrics: dict, step: int) -> None:
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)

        def mark_preempting(self) -> None:
            self.preempted = True

        def finish(self, exit_code: int = 0) -> None:
            self.exit_code = exit_code

    tracker = InterruptAtStep3()
    monkeypatch.setattr("epure.tracking.make_tracker", lambda settings: tracker)
    config = write_config(reference, tmp_path, **{"wandb.log_every_steps": 1})
    result = CliRunner().invoke(app, ["train", "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 130, result.output
    assert tracker.preempted and tracker.exit_code == 130
    (run_dir,) = (tmp_path / "outputs" / "mmvaeplus").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert "SIGINT received" in result.output and "epure train --resume" in result.output


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00" * 64 + data[64:])


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(reference: Reference, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    first = train(reference.cfg.updated({"train.output_dir": str(tmp_path), "train.max_steps": 5}))
    folder = first.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "previous.pt"]
    damage(folder / "last.pt", "truncate")  # steps 5 (last, best) and 4 (previous)
    damage(folder / "best.pt", "overwrite")
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint is truncated or corrupt"):
        load_model(folder / "last.pt")
    with caplog.at_level(logging.INFO):
        train(reference.cfg.updated({"train.max_steps": STEPS}), resume=first.run_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert any("last.pt: checkpoint is truncated or corrupt" in m for m in messages), messages
    assert any("best.pt: checkpoint is truncated or corrupt" in m for m in messages), messages
    assert any("previous.pt instead (epoch 0, step 4)" in m for m in messages), messages
    assert any("from previous.pt at epoch 0, step 4" in m for m in messages), messages
    assert_same_weights(first.run_dir, reference)
    names = {p.name for p in folder.iterdir()}
    assert {"last.pt.corrupt", "best.pt.corrupt"} <= names  # kept for inspection, never rotated over good ones
    rows = (first.run_dir / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["6", "12"]  # the step-5 row of the lost state is redone

    for name in ("last.pt", "previous.pt", "best.pt"):
        damage(folder / name, "truncate")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        load_model(first.run_dir)
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(folder / "best.pt")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "truncated or corrupt" in result.output


def test_nan_losses_are_skipped_then_stop_naming_step_and_ids(reference: Reference, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cfg = reference.cfg.updated({"train.output_dir": str(tmp_path), "train.epochs": 1,
                                 "train.max_nonfinite_steps": 3})
    data = load_data(cfg.data)
    poisoned = data.train.ids[5]
    data.train.conditions[5] = math.nan  # one design: its batch is skipped, the rest trains
    with caplog.at_level(logging.WARNING, logger="epure.train"):
        result = train(cfg, data=data)
    assert result.status == "finished" and result.skipped_steps == 1 and result.step == 5
    assert any("batch skipped" in r.getMessage() and poisoned in r.getMessage() for r in caplog.records)

    data.train.conditions[:] = math.nan  # every batch: training stops at the third in a row
    with pytest.raises(TrainingError) as error:
        train(cfg, data=data)
    third_batch = epoch_permutation(len(data.train), cfg.train.seed, 0)[16:24].numpy()
    message = str(error.value)
    assert "3 steps in a row" in message and "stopped at step 1 (epoch 1)" in message
    assert str(data.train.ids[third_batch].tolist()) in message


def poison_gradients(monkeypatch: pytest.MonkeyPatch, calls: set[int] | None) -> None:
    """From now on, the training step's ``calls`` (counted from 1; None: every one) keep a finite loss but leave a
    NaN in one parameter's gradient, as a NaN reaching the backward pass would."""
    import epure.train

    real = epure.train.objective_backward
    count = 0

    def objective(model, *args, **kwargs):
        nonlocal count
        out = real(model, *args, **kwargs)
        count += 1
        if calls is None or count in calls:
            next(model.parameters()).grad.view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(epure.train, "objective_backward", objective)


def all_finite(tree) -> bool:
    """Every tensor in a (nested) state dict is finite."""
    if isinstance(tree, torch.Tensor):
        return bool(torch.isfinite(tree).all()) if tree.is_floating_point() else True
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    return True


def test_nan_gradients_are_skipped_and_never_reach_the_weights(reference: Reference, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A finite loss with a NaN gradient would step AMSGrad into NaN moments, then NaN weights, and the next
    periodic save would rotate the last good last.pt out of previous.pt. Skipped instead, like a NaN loss."""
    cfg = reference.cfg.updated({"train.output_dir": str(tmp_path), "train.max_steps": 6,
                                 "train.checkpoint_every_steps": 1, "train.max_nonfinite_steps": 3})
    poison_gradients(monkeypatch, {3, 4})  # two batches in a row, mid-run
    with caplog.at_level(logging.WARNING, logger="epure.train"):
        result = train(cfg)
    assert result.status == "budget" and result.step == 6 and result.skipped_steps == 2
    (warning,) = [r.getMessage() for r in caplog.records if "batch skipped" in r.getMessage()]
    ids = load_data(cfg.data).train.ids
    third_batch = epoch_permutation(len(ids), cfg.train.seed, 0)[16:24].numpy()
    assert warning.startswith("step 3 (epoch 1): gradient norm is nan, batch skipped")
    assert str(ids[third_batch].tolist()) in warning
    for name in ("last.pt", "previous.pt"):  # both written after the poisoned steps
        state = torch.load(result.run_dir / "checkpoints" / name, weights_only=False)
        assert state["step"] >= 5 and state["optimizer"]["state"], name
        assert all_finite(state["model"]) and all_finite(state["optimizer"]["state"]), name
    assert all(torch.isfinite(p).all() for p in load_model(result.run_dir).model.parameters())

    poison_gradients(monkeypatch, None)  # every batch: stops at the streak limit, naming the step and the ids
    with pytest.raises(TrainingError, match=r"gradient norm was nan for 3 steps in a row"):
        train(cfg.updated({"train.output_dir": str(tmp_path / "again")}))


def test_unwritable_output_or_full_disk_fail_before_training(reference: Reference, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TrainingError, match="output directory is not writable"):
        train(reference.cfg.updated({"train.output_dir": str(tmp_path / "file" / "outputs")}))

    def nearly_full(path: Path) -> shutil._ntuple_diskusage:
        return shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20)

    monkeypatch.setattr("epure.train.shutil.disk_usage", nearly_full)
    with pytest.raises(TrainingError, match=r"only 1 MiB free, checkpoints need about \d+ MiB"):
        train(reference.cfg.updated({"train.output_dir": str(tmp_path / "outputs")}))
    assert not (tmp_path / "outputs" / "mmvaeplus").exists()  # no half-made run directory


def test_config_mistakes_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batch_sise' \(did you mean 'train.batch_size'"):
        load_config(path)
    path.write_text("train:\n  epochs: many\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "'train.epochs' must be an integer" in result.output


def test_sampling_requests_outside_the_training_range(reference: Reference, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    loaded = load_model(reference.run_dir)
    norm = loaded.normalizer
    with caplog.at_level(logging.WARNING, logger="epure.sample"):
        raw, ids = unconditional_requests(loaded, 3, {"width_px": norm.high[0] + 40}, conditions_csv=None, seed=0)
    (warning,) = [r.getMessage() for r in caplog.records]  # wider than any 64x32 section measures
    assert f"width_px={norm.high[0] + 40:g} cannot be measured on a 64x32 section" in warning
    assert warning.endswith("the nearest: 64")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="epure.sample"):
        write_unconditional(loaded, tmp_path / "samples", raw, ids)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"3 of 3 requested width_px values ({norm.high[0] + 40:g} to {norm.high[0] + 40:g})" in warning
    assert f"training range [{norm.low[0]:g}, {norm.high[0]:g}]" in warning

    runner = CliRunner()
    for bad in ("0", "-5"):
        result = runner.invoke(app, ["sample", "--checkpoint", str(reference.run_dir), "--num_samples", bad,
                                     "--out", str(tmp_path / "none")], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and f"--num_samples must be positive, got {bad}" in result.output
    result = runner.invoke(app, ["sample", "--checkpoint", str(reference.run_dir), "--batch-size", "0",
                                 "--out", str(tmp_path / "none")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--batch-size must be positive" in result.output
    empty = tmp_path / "conditions.csv"
    empty.write_text("matching,width_px,height_px\n")
    result = runner.invoke(app, ["sample", "--checkpoint", str(reference.run_dir), "--conditions", str(empty),
                                 "--out", str(tmp_path / "none")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "conditions.csv: no rows" in result.output
    with pytest.raises(SamplingError, match="nothing to sample"):
        write_unconditional(loaded, tmp_path / "none", np.zeros((0, 2), np.float32), [])
    assert not (tmp_path / "none").exists()


def test_atomic_write_keeps_the_old_file_on_failure_and_uses_the_umask(tmp_path: Path) -> None:
    from epure.io import atomic_write, atomic_write_text

    target = tmp_path / "result.json"
    old_mask = os.umask(0o022)
    try:
        atomic_write_text(target, "first")
        assert target.stat().st_mode & 0o777 == 0o644  # readable by colleagues, like any file open() makes

        def crash(tmp: Path) -> None:
            tmp.write_text("half")
            raise RuntimeError("disk gone")

        with pytest.raises(RuntimeError, match="disk gone"):
            atomic_write(target, crash)
    finally:
        os.umask(old_mask)
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary left behind
