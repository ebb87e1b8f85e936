"""Training MMVAE+: one loop, top to bottom.

    epure train --set model.beta=0.5 train.lr=3e-4 --max-steps 20

``train`` reads top to bottom: ``set_up`` (a new run, or a resumed one), then for every batch
``optimiser_step`` and at every epoch's end ``end_of_epoch`` (validation, checkpoints, pictures), then
``finish``. ``TrainState`` is exactly what a checkpoint holds; ``Session`` the rest of one process's run; one
``Status`` value says whether the loop goes on and, at the end, how it ended.

The whole train split sits in memory as uint8 (on the training device); each epoch draws a permutation
from (seed, epoch), so a run resumed from a checkpoint at any step sees the same batches and, with the RNG
state restored, the same noise as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from epure import distributed
from epure.acceleration import autocast, compile_networks, resolve_compile, resolve_precision
from epure.checkpoint import (CheckpointError, LoadedModel, git_commit, numpy_rng_state, read_checkpoint,
                              read_run_checkpoint, save_checkpoint, set_aside_damaged, set_numpy_rng_state)
from epure.config import Config, TrainConfig, config_from_dict, save_config
from epure.data import ConditionNormalizer, DataBundle, load_data
from epure.io import atomic_write_json, atomic_write_text, claim_dir
from epure.metrics import best_threshold, components_exclusive, components_whole
from epure.model import MMVAEPlus, forward_objective
from epure.model.backward import objective_backward
from epure.model.fitted_prior import FittedPrior, fit_prior
from epure.model.generation import self_reconstructions
from epure.model.objectives import draw_strata
from epure.tracking import NullTracker

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss kept being NaN); the message names the step and the batch."""


class LoadInterrupted(BaseException):
    """SIGINT or SIGTERM while the data loads: nothing was trained yet, so the run stops at once.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way mistakes it for bad data,
    and every ``except BaseException`` cleanup on the way (temporary files, half-built folders) runs.
    """

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | interrupted | budget
    epoch: int  # epochs completed
    step: int
    best_val_loss: float
    last_val_loss: float
    skipped_steps: int = 0
    signal_name: str | None = None


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but torch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("--device mps was asked for, but this machine has no Apple MPS device")
    return torch.device(name)


def new_run_dir(output_dir: str | Path) -> Path:
    """``OUTPUT/mmvaeplus/YYYY-MM-DD_HH-MM-SS``, claimed atomically (``_1``, ``_2``... for runs in the same second)."""
    return claim_dir(Path(output_dir) / "mmvaeplus" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


@contextlib.contextmanager
def interruptible_loading():
    """While the data loads, the first SIGINT/SIGTERM raises ``LoadInterrupted`` (later ones are ignored, so the
    cleanup it triggers is not cut short); the loaders' temporaries are removed on the way out."""
    raised = False

    def handle(signum: int, frame: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise LoadInterrupted(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def data_changes_on_resume(path: Path, state: dict[str, Any], data: DataBundle, allow: bool) -> list[dict[str, Any]]:
    """The run's record of dataset changes, refusing a resume on data other than the checkpoint's unless allowed."""
    changes = list(state.get("data_changes") or [])
    stored = state.get("data_fingerprint")
    if stored is None or stored == data.fingerprint:
        return changes
    message = (f"{path}: the dataset changed since this run was trained: the checkpoint's data fingerprint is "
               f"{stored}, the data at {data.root} now gives {data.fingerprint} (a file was added, removed, "
               "modified or touched, the folder moved, or a data setting changed)")
    if not allow:
        raise TrainingError(f"{message}. Resume on the original data, or pass --allow-data-change to go on with "
                            "this data (the change is recorded in the run)")
    log.warning("%s; going on because of --allow-data-change: recorded in the checkpoints (data_changes) and in "
                "the W&B summary", message)
    return changes + [{"step": int(state["step"]), "previous": stored, "current": data.fingerprint}]


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping", self.signal_name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    set_numpy_rng_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def budget_progress(step: int, planned_steps: int, minutes: float, max_minutes: float, start_progress: float) -> float:
    """How much of the budget is spent (0 to 1): the larger of the step and the time fractions.

    It never falls below what a resumed run had reached (``start_progress``), and a resumed run's new time
    budget covers what its schedule had left.
    """
    spent = max(step / planned_steps, start_progress)
    if max_minutes:
        spent = max(spent, start_progress + (1.0 - start_progress) * minutes / max_minutes)
    return min(spent, 1.0)


def scheduled_lr(tc: TrainConfig, progress: float) -> float:
    """Learning rate at a point of the budget (0: start, 1: end).

    A cosine decay ends training at a small step size, which settles the weights the budget leaves us with.
    """
    if tc.lr_schedule == "constant":
        return tc.lr
    floor = tc.lr * tc.lr_final_fraction
    return floor + 0.5 * (tc.lr - floor) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@torch.no_grad()
def validation_sums(model: MMVAEPlus, cfg: Config, images: torch.Tensor, conditions: torch.Tensor,
                    batch_size: int, available: torch.Tensor | None = None) -> list[float]:
    """[sum of the objective, number of designs] over (this rank's share of) the validation split.

    The noise is fixed, so epochs compare, and drawn on a forked RNG, so training's stream is untouched.
    """
    model.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(12345)
        for start in range(0, len(images), batch_size):
            x = images[start: start + batch_size].float().div_(255)
            c = conditions[start: start + batch_size]
            a = None if available is None else available[start: start + batch_size]
            out = forward_objective(model, x, c, "elbo", cfg.model.beta, 1, available=a)
            total += out.loss.item() * len(x)
            count += len(x)
    model.train()
    return [total, float(count)]


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """Adam (amsgrad per the config), fused: one kernel for all parameters instead of one per tensor (a step of
    the default config's Adam 41 -> 15 ms on the CPU, a one-off measurement in docs/performance.md)."""
    return torch.optim.Adam(model.parameters(), lr=tc.lr, amsgrad=tc.amsgrad, fused=True)


def preflight(output_dir: Path, model: MMVAEPlus) -> None:
    """Fail before training, not after an hour, when checkpoints could not be written."""
    probe = output_dir / f".epure-write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"{output_dir}: output directory is not writable ({err})") from err
    # float32 weights + two Adam moments + the amsgrad maximum, in last, previous, best and a temporary copy
    needed = 4 * 4 * 4 * sum(p.numel() for p in model.parameters()) + 16 * 2**20
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise TrainingError(f"{output_dir}: only {free / 2**20:.0f} MiB free, checkpoints need about "
                            f"{needed / 2**20:.0f} MiB")


class Status(str, Enum):
    """Where a run stands: the one value that steers the loop; the last three are how it ended."""

    RUNNING = "running"
    FINISHED = "finished"  # every epoch trained
    BUDGET = "budget"  # train.max_steps or train.max_minutes reached
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: stopped after a checkpoint that --resume continues from


@dataclass
class TrainState:
    """Exactly what a checkpoint holds: a resumed run continues from this and nothing else."""

    model: MMVAEPlus
    optimizer: torch.optim.Optimizer
    config: Config
    normalizer: ConditionNormalizer
    data_fingerprint: str
    train_conditions: torch.Tensor  # the train split's raw condition rows: unconditional sampling draws from them
    git_commit: str | None
    data_changes: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch done
    step: int = 0  # optimiser steps taken
    val_loss: float | None = None  # the last validation's loss at an epoch's end; None mid-epoch
    best_val_loss: float = math.inf
    schedule_progress: float = 0.0  # share of the budget spent: the learning-rate schedule's clock
    fitted_prior: FittedPrior | None = None  # fitted to these weights (pictures, the run's end); None once they change
    exclusive_components: bool = False  # no training pixel belongs to two components (metrics.design_masks)
    decision_threshold: float = 0.5  # where these weights' probabilities become masks (calibrate_threshold)
    whole_components: list[str] = field(default_factory=list)  # one piece in every training design (best_of)

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint's contents; the RNG state is the one of this moment."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": self.config.to_dict(), "components": list(self.config.data.components),
                "normalizer": self.normalizer.to_dict(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "step": self.step, "val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                "schedule_progress": self.schedule_progress, "rng": rng_state(),
                "data_fingerprint": self.data_fingerprint, "data_changes": self.data_changes,
                "git_commit": self.git_commit, "train_conditions": self.train_conditions,
                "fitted_prior": self.fitted_prior.to_state() if self.fitted_prior is not None else None,
                "exclusive_components": self.exclusive_components, "decision_threshold": self.decision_threshold,
                "whole_components": self.whole_components}

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimiser, counters, and the RNG where it was."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        self.batch_in_epoch = checkpoint.get("batch_in_epoch", 0)
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
        self.schedule_progress = checkpoint.get("schedule_progress", 0.0)
        fitted = checkpoint.get("fitted_prior")
        self.fitted_prior = FittedPrior.from_state(fitted) if fitted is not None else None
        self.decision_threshold = checkpoint.get("decision_threshold", 0.5)
        set_rng_state(checkpoint["rng"])


@dataclass
class Session:
    """One process's training around its TrainState: what a checkpoint does not hold (the process group, the
    data on the device, the tracker, the progress bar, clocks, the rows of metrics.csv)."""

    state: TrainState
    ctx: distributed.Distributed
    run_dir: Path
    data: DataBundle
    tracker: Any
    train_x: torch.Tensor  # uint8 images [N, M, H, W]
    train_c: torch.Tensor  # normalised conditions [N, C]
    train_a: torch.Tensor  # bool [N, M]: which components each design has
    val_x: torch.Tensor
    val_c: torch.Tensor
    val_a: torch.Tensor
    steps_per_epoch: int
    planned_steps: int
    history: list[dict[str, Any]]
    start_progress: float  # the budget a resumed run had spent
    stop: StopFlag = field(default_factory=StopFlag)
    status: Status = Status.RUNNING
    precision: str = "fp32"  # of the training steps' networks (train.precision resolved on this device)
    progress: Progress | None = None
    skipped: int = 0  # non-finite steps skipped in all
    nonfinite_run: int = 0  # ... in a row, up to now
    loss: float = math.nan
    last_val: float = math.nan
    start_time: float = field(default_factory=time.monotonic)
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    window_start: float = field(default_factory=time.monotonic)  # of the samples/s figure
    window_samples: int = 0

    @property
    def cfg(self) -> Config:
        return self.state.config

    def save(self, name: str) -> None:
        """Write the state to checkpoints/NAME (rank 0 only); a full disk is a TrainingError that loses nothing."""
        if self.ctx.is_main:
            path = self.run_dir / "checkpoints" / name
            try:
                save_checkpoint(path, self.state.checkpoint(), keep_previous=name == "last.pt")
            except OSError as err:  # e.g. the disk filled up since preflight
                raise TrainingError(f"{path}: could not write the checkpoint ({err}); the checkpoints already "
                                    f"there are intact: make room, then continue with epure train --resume "
                                    f"{self.run_dir}") from err
        if name == "last.pt":
            self.last_checkpoint_time = time.monotonic()


def train(cfg: Config, *, resume: str | Path | None = None, data: DataBundle | None = None, tracker=None,
          images_fn=None, allow_data_change: bool = False) -> TrainResult:
    """Train (or resume) a model; returns where the run lives and how it ended.

    ``images_fn(loaded_model, data) -> {name: PIL.Image}`` makes the pictures logged every
    ``wandb.images_every_epochs`` epochs; ``tracker`` receives metrics, pictures and checkpoints.
    Under torchrun every process calls this; rank 0 alone writes files and talks to the tracker.
    A resumed run refuses data whose fingerprint differs from its checkpoint's unless ``allow_data_change``.
    """
    session = set_up(cfg, resume, data, tracker, allow_data_change)
    state, tc = session.state, session.cfg.train
    with session.stop, session.progress:
        while state.epoch < tc.epochs and session.status is Status.RUNNING:
            order = epoch_permutation(len(session.train_x), tc.seed, state.epoch).to(session.train_x.device)
            while state.batch_in_epoch < session.steps_per_epoch and session.status is Status.RUNNING:
                optimiser_step(session, order)
            if state.batch_in_epoch < session.steps_per_epoch and session.status is Status.INTERRUPTED:
                break  # last.pt already records where; resume continues from there
            end_of_epoch(session, images_fn)
    return finish(session)


# ------------------------------------------------------------------------------------ set up or resume


def set_up(cfg: Config, resume: str | Path | None, data: DataBundle | None, tracker,
           allow_data_change: bool) -> Session:
    """A new run (its directory and config written), or a resumed one (its checkpoint restored), on this
    process's device, with the data on it."""
    resume_path, checkpoint = None, None
    if resume is not None:
        resume_path, checkpoint = read_run_checkpoint(Path(resume), prefer="last")
        cfg = resumed_config(resume_path, checkpoint, cfg)
    tc = cfg.train
    ctx, device_name = distributed.start(tc.device)
    device = select_device(device_name) if not device_name.startswith("cuda:") else torch.device(device_name)
    tracker = (tracker or NullTracker()) if ctx.is_main else NullTracker()
    torch.manual_seed(tc.seed)  # the same on every rank: identical initial weights and noise streams
    np.random.seed(tc.seed)
    if data is None:
        with interruptible_loading():
            data = load_data(cfg.data)
    data_changes = [] if checkpoint is None else data_changes_on_resume(resume_path, checkpoint, data,
                                                                        allow_data_change)
    precision = resolve_precision(tc.precision, device)
    model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size).to(device)
    if checkpoint is None:
        model.standardise_moments(torch.from_numpy(data.train.images),
                                  torch.from_numpy(data.train.available))
    if resolve_compile(tc.compile, device):
        compile_networks([*model.encoders, *model.decoders])  # narrow encoders run grouped, uncompiled
    state = TrainState(model, make_optimizer(model, tc), cfg,
                       data.normalizer, data.fingerprint, torch.tensor(data.train.conditions, dtype=torch.float32),
                       git_commit(), data_changes, exclusive_components=components_exclusive(data.train.images),
                       whole_components=[name for name, whole in zip(cfg.data.components,
                                                                     components_whole(data.train.images)) if whole])
    run_dir, history = open_run_dir(ctx, state, resume, resume_path, checkpoint)
    tracker.start(run_dir, cfg)
    tracker.use_dataset(data, cfg.data)
    tracker.log_config({"data_availability": {name: getattr(data, name).availability()
                                              for name in ("train", "val", "test")}})
    session = session_on_device(state, ctx, device, run_dir, data, tracker, history)
    session.precision = precision
    return session


def resumed_config(path: Path, checkpoint: dict[str, Any], cfg: Config) -> Config:
    """The run's own config, with this call's budget, device, precision and compilation."""
    if "optimizer" not in checkpoint or "rng" not in checkpoint:
        raise CheckpointError(f"{path}: holds weights only (no optimiser and RNG state); it can be "
                              "sampled from but not resumed")
    stored = config_from_dict(checkpoint["config"])
    stored.train.epochs, stored.train.max_steps = cfg.train.epochs, cfg.train.max_steps
    stored.train.max_minutes, stored.train.device = cfg.train.max_minutes, cfg.train.device
    stored.train.precision, stored.train.compile = cfg.train.precision, cfg.train.compile  # how, not what
    return stored


def open_run_dir(ctx: distributed.Distributed, state: TrainState, resume: str | Path | None,
                 resume_path: Path | None, checkpoint: dict[str, Any] | None) -> tuple[Path, list[dict[str, Any]]]:
    """The run directory (rank 0 creates a new one) and the metrics.csv rows so far; restores a checkpoint."""
    cfg, history, run_dir = state.config, [], None
    if checkpoint is not None:
        run_dir = Path(resume)
        state.restore(checkpoint)
        # rows written after the checkpoint (one that fell back to an older file) are redone
        history = [row for row in read_metrics_csv(run_dir / "metrics.csv") if int(row["step"]) <= state.step]
        if ctx.is_main:
            preflight(run_dir, state.model)
            set_aside_damaged(run_dir, resume_path)
        log.info("resuming %s from %s at epoch %d, step %d", run_dir, resume_path.name, state.epoch, state.step)
    elif ctx.is_main:
        preflight(Path(cfg.train.output_dir), state.model)
        run_dir = new_run_dir(cfg.train.output_dir)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "normalization.json", state.normalizer.to_dict())
        atomic_write_json(run_dir / "components.json", list(cfg.data.components))
    run_dir = Path(distributed.broadcast_object(ctx, str(run_dir) if run_dir is not None else None))
    if ctx.is_main:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    return run_dir, history


def session_on_device(state: TrainState, ctx: distributed.Distributed, device: torch.device, run_dir: Path,
                      data: DataBundle, tracker, history: list[dict[str, Any]]) -> Session:
    """The data on the device (each rank validates its share) and the step budget."""
    tc, normalizer = state.config.train, state.normalizer
    train_x = torch.from_numpy(data.train.images).to(device)
    train_c = torch.from_numpy(normalizer.normalize(data.train.conditions)).to(device)
    train_a = torch.from_numpy(data.train.available).to(device)  # which components each design has
    val_rows = np.arange(ctx.rank, len(data.val), ctx.world_size)
    val_x = torch.from_numpy(data.val.images[val_rows]).to(device)
    val_c = torch.from_numpy(normalizer.normalize(data.val.conditions[val_rows])).to(device)
    val_a = torch.from_numpy(data.val.available[val_rows]).to(device)
    n, global_batch = len(train_x), tc.batch_size * ctx.world_size
    # one process keeps the last partial batch; several drop it, so every rank gets a full share
    steps_per_epoch = math.ceil(n / global_batch) if not ctx.enabled else n // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{n} training designs cannot fill one global batch of {global_batch} "
                            f"({ctx.world_size} processes x batch_size {tc.batch_size})")
    planned = tc.epochs * steps_per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * steps_per_epoch)
    session = Session(state, ctx, run_dir, data, tracker, train_x, train_c, train_a, val_x, val_c, val_a,
                      steps_per_epoch, planned, history, start_progress=state.schedule_progress)
    session.progress = progress_bar(ctx.is_main)
    session.progress.add_task("train", total=max(planned - state.step, 0), epoch=state.epoch + 1, loss=math.nan,
                              rate=0.0)
    state.model.train()
    return session


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.1f}"), TextColumn("{task.fields[rate]:.0f} samples/s"),
                    TimeElapsedColumn(), transient=False, disable=not enabled)


# ------------------------------------------------------------------------------------ one optimiser step


def optimiser_step(session: Session, order: torch.Tensor) -> None:
    """One batch: forward, backward, the decisions every rank takes together (skip, stop, budget), the step."""
    state, ctx, tc = session.state, session.ctx, session.cfg.train
    batch = tc.batch_size
    first = state.batch_in_epoch * batch * ctx.world_size + ctx.rank * batch
    index = order[first: first + batch]
    share = (ctx.rank * len(index), len(index) * ctx.world_size) if ctx.enabled else None
    state.optimizer.zero_grad(set_to_none=True)
    mc = session.cfg.model
    available = session.train_a[index]
    with autocast(session.train_x.device, session.precision):
        out = objective_backward(state.model, session.train_x[index].float().div_(255), session.train_c[index],
                                 mc.objective, mc.beta, mc.K, share=share, available=available,
                                 strata=draw_strata(available, mc.strata_per_design, share))
    distributed.average_gradients(ctx, state.model.parameters())
    # one reduction gives the total gradient norm, clipped to train.grad_clip when that is set
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip or math.inf).item()
    minutes = (time.monotonic() - session.start_time) / 60
    # one small reduction per step keeps every rank's decisions (skip, stop) identical; a non-finite loss or
    # gradient norm on any rank makes its sum non-finite on all of them
    loss_sum, norm_sum, stop_votes, over_time, minutes_sum = distributed.sum_across(
        ctx, [out.loss.item(), grad_norm, float(session.stop.signal_name is not None),
              float(bool(tc.max_minutes) and minutes >= tc.max_minutes), minutes])
    session.loss, grad_norm = loss_sum / ctx.world_size, norm_sum / ctx.world_size
    state.schedule_progress = budget_progress(state.step, session.planned_steps, minutes_sum / ctx.world_size,
                                              tc.max_minutes, session.start_progress)  # the same on every rank
    state.batch_in_epoch += 1
    state.val_loss, state.fitted_prior = None, None  # both described the weights before this step
    if not (math.isfinite(session.loss) and math.isfinite(grad_norm)):
        skip_nonfinite(session, index, grad_norm)
        if stop_votes:  # a signal must not wait for a finite loss
            session.status = Status.INTERRUPTED
            session.save("last.pt")
        return
    session.nonfinite_run = 0
    lr = scheduled_lr(tc, state.schedule_progress)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.step()
    state.step += 1
    log_step(session, out, grad_norm, lr)
    if (tc.max_steps and state.step >= tc.max_steps) or over_time:
        session.status = Status.BUDGET
    if stop_votes:
        session.status = Status.INTERRUPTED
    periodic = (tc.checkpoint_every_steps and state.step % tc.checkpoint_every_steps == 0) or (
        tc.checkpoint_every_minutes and time.monotonic() - session.last_checkpoint_time >= 60 * tc.checkpoint_every_minutes)
    if session.status is Status.INTERRUPTED or (periodic and state.batch_in_epoch < session.steps_per_epoch):
        session.save("last.pt")


def skip_nonfinite(session: Session, index: torch.Tensor, grad_norm: float) -> None:
    """No optimiser step on a non-finite loss or gradient (it would poison Adam's moments, then the weights);
    too many in a row stop training with the batch's example ids."""
    state, tc, loss = session.state, session.cfg.train, session.loss
    session.skipped += 1
    session.nonfinite_run += 1
    state.optimizer.zero_grad(set_to_none=True)
    ids = session.data.train.ids[index.cpu().numpy()].tolist()
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    if session.nonfinite_run >= tc.max_nonfinite_steps:
        diverged = not all(torch.isfinite(p).all() for p in state.model.parameters())
        hint = "; the weights themselves are no longer finite: lower train.lr" if diverged else ""
        raise TrainingError(f"{what} was {value} for {session.nonfinite_run} steps in a row (a non-finite loss or "
                            f"gradient each); stopped at step {state.step + 1} (epoch {state.epoch + 1}); example "
                            f"ids of that batch: {ids}{hint}")
    if session.nonfinite_run == 1:
        log.warning("step %d (epoch %d): %s is %s, batch skipped (training stops after %d in a row); example ids "
                    "of that batch: %s", state.step + 1, state.epoch + 1, what, value, tc.max_nonfinite_steps, ids)


def log_step(session: Session, out, grad_norm: float, lr: float) -> None:
    """The progress bar every step; the tracker every wandb.log_every_steps steps."""
    state, cfg = session.state, session.cfg
    session.window_samples += cfg.train.batch_size * session.ctx.world_size
    rate = session.window_samples / max(time.monotonic() - session.window_start, 1e-9)
    session.progress.update(session.progress.task_ids[0], advance=1, loss=session.loss, epoch=state.epoch + 1,
                            rate=rate)
    if state.step % max(1, cfg.wandb.log_every_steps) == 0:
        session.tracker.log({"train/loss": session.loss, "train/bound": out.bound.item(), "train/grad_norm": grad_norm,
                             **{f"train/{k}": v.item() for k, v in out.terms.items()},
                             "train/lr": lr, "train/samples_per_sec": rate,
                             "epoch": state.epoch + (state.batch_in_epoch / session.steps_per_epoch)}, state.step)
        session.window_start, session.window_samples = time.monotonic(), 0


# ------------------------------------------------------------------------------------ end of epoch, finish


def end_of_epoch(session: Session, images_fn) -> None:
    """Validation (every train.val_every epochs, the last one, and when stopping), checkpoints, metrics.csv,
    the tracker's checkpoint artifact and pictures. A run stopped by its budget mid-epoch comes here too."""
    state, tc, ctx = session.state, session.cfg.train, session.ctx
    if state.batch_in_epoch >= session.steps_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    stopping = session.status is not Status.RUNNING
    row: dict[str, Any] = {"epoch": state.epoch, "step": state.step, "train_loss": session.loss,
                           "seconds": round(time.monotonic() - session.start_time, 2)}
    if state.epoch % tc.val_every == 0 or state.epoch == tc.epochs or stopping:
        total, count = distributed.sum_across(ctx, validation_sums(state.model, session.cfg, session.val_x,
                                                                   session.val_c, tc.batch_size, session.val_a))
        session.last_val = row["val_loss"] = total / max(count, 1)
        logged = {"val/loss": session.last_val, "epoch": state.epoch}
        if ctx.is_main and session.cfg.model.calibrate_threshold:
            state.decision_threshold = row["threshold"] = logged["val/threshold"] = calibrate_threshold(session)
        session.tracker.log(logged, state.step)
    improved = math.isfinite(session.last_val) and session.last_val < state.best_val_loss
    if improved:
        state.best_val_loss = session.last_val
    state.val_loss = session.last_val
    finishing = stopping or state.epoch == tc.epochs
    every = session.cfg.wandb.images_every_epochs
    pictures = ctx.is_main and images_fn is not None and every and (state.epoch % every == 0 or finishing)
    if ctx.is_main and (finishing or (pictures and session.cfg.model.latent_sampler == "fitted")):
        state.fitted_prior = fit_session_prior(session, state.model)
    session.save("last.pt")
    if improved:
        session.save("best.pt")
    if ctx.is_main and finishing and not improved:  # an improved best.pt was just saved with this fit
        refitted = fit_best_checkpoint(session)
        if refitted is not None:  # W&B's best version was logged without the fit: log it again, fitted
            session.tracker.log_checkpoint(session.run_dir / "checkpoints" / "best.pt",
                                           ["best", f"epoch-{refitted['epoch']}"], refitted)
    session.history.append(row)
    if ctx.is_main:
        write_metrics_csv(session.run_dir / "metrics.csv", session.history)
    session.tracker.log_checkpoint(session.run_dir / "checkpoints" / "last.pt",
                                   ["latest", f"epoch-{state.epoch}", *(["best"] if improved else [])],
                                   {"epoch": state.epoch, "step": state.step, "val_loss": session.last_val,
                                    "data_fingerprint": state.data_fingerprint, "git_commit": state.git_commit})
    if pictures:
        state.model.eval()
        loaded = LoadedModel(state.model, session.cfg, state.normalizer, list(session.cfg.data.components),
                             session.run_dir, fitted_prior=state.fitted_prior,
                             exclusive_components=state.exclusive_components, threshold=state.decision_threshold,
                             whole_components=state.whole_components)
        session.tracker.log_images(images_fn(loaded, session.data), state.step)
        state.model.train()


def calibrate_threshold(session: Session) -> float:
    """The threshold at which the model's reconstructions of (this rank's share of) the validation designs best
    match them (metrics.best_threshold), for every mask it makes later; 0.5 without validation designs."""
    model, batch = session.state.model, session.cfg.train.batch_size
    if len(session.val_x) == 0:
        return 0.5
    model.eval()
    with torch.inference_mode():
        probs = torch.cat([self_reconstructions(model, session.val_x[start: start + batch].float().div(255),
                                                session.val_c[start: start + batch]).float()
                           for start in range(0, len(session.val_x), batch)]).cpu().numpy()
    model.train()
    return best_threshold(probs, session.val_x.cpu().numpy() > 127, session.val_a.cpu().numpy())


def fit_session_prior(session: Session, model: MMVAEPlus) -> FittedPrior | None:
    """The density unconditional designs may draw their latents from (model.latent_sampler: fitted), fitted to
    ``model``'s latents of the training designs."""
    m = session.cfg.model
    return fit_prior(model, session.train_x, session.train_c, m.fitted_prior_components, session.cfg.train.seed,
                     session.train_a.all(dim=1), m.fitted_prior_z, m.fitted_prior_kept_variance)


def fit_best_checkpoint(session: Session) -> dict[str, Any] | None:
    """Give best.pt its fitted prior when it was saved at an epoch that skipped the fit; returns the fitted
    checkpoint's metadata for the tracker (None when nothing was fitted).

    A fit encodes every training design and runs EM (about 10 s for the small preset, a third of one of its
    epochs), so training fits only where something uses the fit: epochs that draw pictures and the run's end.
    best.pt saved at an earlier epoch is fitted here, its weights loaded into the model for the time of it.
    """
    path = session.run_dir / "checkpoints" / "best.pt"
    if not path.is_file():
        return None
    saved = read_checkpoint(path)
    if saved.get("fitted_prior") is not None:
        return None
    model = session.state.model
    current = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(saved["model"])
    try:
        fitted = fit_session_prior(session, model)
    finally:
        model.load_state_dict(current)
    if fitted is None:
        return None
    saved["fitted_prior"] = fitted.to_state()
    save_checkpoint(path, saved)
    return {"epoch": saved["epoch"], "step": saved["step"], "val_loss": saved["val_loss"],
            "data_fingerprint": saved["data_fingerprint"], "git_commit": saved["git_commit"]}


def finish(session: Session) -> TrainResult:
    """The run's summary for the tracker, and how it ended."""
    if session.status is Status.RUNNING:
        session.status = Status.FINISHED
    state, status = session.state, session.status.value
    if session.status is Status.INTERRUPTED:
        session.tracker.mark_preempting()
    session.tracker.summary({"best_val_loss": state.best_val_loss, "last_val_loss": session.last_val,
                             "skipped_steps": session.skipped, "status": status,
                             **({"data_changes": state.data_changes} if state.data_changes else {})})
    distributed.stop(session.ctx)
    return TrainResult(session.run_dir, status, state.epoch, state.step, state.best_val_loss, session.last_val,
                       session.skipped, session.stop.signal_name)
