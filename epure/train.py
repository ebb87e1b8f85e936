"""Training MMVAE+: one loop, top to bottom.

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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from epure import distributed
from epure.checkpoint import (CheckpointError, LoadedModel, git_commit, numpy_rng_state, read_run_checkpoint,
                              save_checkpoint, set_aside_damaged, set_numpy_rng_state)
from epure.config import Config, TrainConfig, config_from_dict, save_config
from epure.data import DataBundle, load_data
from epure.io import atomic_write_json, atomic_write_text, claim_dir
from epure.model import MMVAEPlus, forward_objective
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


class ObjectiveStep(nn.Module):
    """The training objective as a module, so DistributedDataParallel can wrap it and sync gradients."""

    def __init__(self, model: MMVAEPlus, cfg: Config):
        super().__init__()
        self.model, self.objective, self.beta, self.k = model, cfg.model.objective, cfg.model.beta, cfg.model.K

    def forward(self, x: torch.Tensor, conditions: torch.Tensor, available: torch.Tensor,
                share: tuple[int, int] | None = None):
        return forward_objective(self.model, x, conditions, self.objective, self.beta, self.k, share=share,
                                 available=available)


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


def train(cfg: Config, *, resume: str | Path | None = None, data: DataBundle | None = None, tracker=None,
          images_fn=None, allow_data_change: bool = False) -> TrainResult:
    """Train (or resume) a model; returns where the run lives and how it ended.

    ``images_fn(loaded_model, data) -> {name: PIL.Image}`` makes the pictures logged every
    ``wandb.images_every_epochs`` epochs; ``tracker`` receives metrics, pictures and checkpoints.
    Under torchrun every process calls this; rank 0 alone writes files and talks to the tracker.
    A resumed run refuses data whose fingerprint differs from its checkpoint's unless ``allow_data_change``.
    """
    resume_state = None
    if resume is not None:
        run_dir = Path(resume)
        resume_path, resume_state = read_run_checkpoint(run_dir, prefer="last")
        if "optimizer" not in resume_state or "rng" not in resume_state:
            raise CheckpointError(f"{resume_path}: holds weights only (no optimiser and RNG state); it can be "
                                  "sampled from but not resumed")
        stored = config_from_dict(resume_state["config"])
        stored.train.epochs, stored.train.max_steps = cfg.train.epochs, cfg.train.max_steps
        stored.train.max_minutes, stored.train.device = cfg.train.max_minutes, cfg.train.device
        cfg = stored
    tc = cfg.train
    ctx, device_name = distributed.start(tc.device)
    device = select_device(device_name) if not device_name.startswith("cuda:") else torch.device(device_name)
    tracker = (tracker or NullTracker()) if ctx.is_main else NullTracker()
    torch.manual_seed(tc.seed)  # the same on every rank: identical initial weights and noise streams
    np.random.seed(tc.seed)
    if data is None:
        with interruptible_loading():
            data = load_data(cfg.data)
    data_changes = [] if resume_state is None else data_changes_on_resume(resume_path, resume_state, data,
                                                                          allow_data_change)
    normalizer = data.normalizer
    model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, amsgrad=tc.amsgrad)
    step_module: nn.Module = ObjectiveStep(model, cfg)
    if ctx.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)

    epoch, step, batch_in_epoch, best_val, start_progress = 0, 0, 0, math.inf, 0.0
    history: list[dict[str, Any]] = []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        epoch, step = resume_state["epoch"], resume_state["step"]
        batch_in_epoch = resume_state.get("batch_in_epoch", 0)
        best_val = resume_state.get("best_val_loss", math.inf)
        start_progress = resume_state.get("schedule_progress", 0.0)
        set_rng_state(resume_state["rng"])
        # rows written after the checkpoint (one that fell back to an older file) are redone
        history = [row for row in read_metrics_csv(run_dir / "metrics.csv") if int(row["step"]) <= step]
        if ctx.is_main:
            preflight(run_dir, model)
            set_aside_damaged(run_dir, resume_path)
        log.info("resuming %s from %s at epoch %d, step %d", run_dir, resume_path.name, epoch, step)
    elif ctx.is_main:
        preflight(Path(tc.output_dir), model)
        run_dir = new_run_dir(tc.output_dir)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "normalization.json", normalizer.to_dict())
        atomic_write_json(run_dir / "components.json", list(cfg.data.components))
    run_dir = Path(distributed.broadcast_object(ctx, str(run_dir) if ctx.is_main or resume else None))
    if ctx.is_main:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    tracker.start(run_dir, cfg)
    tracker.use_dataset(data, cfg.data)
    tracker.log_config({"data_availability": {name: getattr(data, name).availability()
                                              for name in ("train", "val", "test")}})

    train_x = torch.from_numpy(data.train.images).to(device)
    train_c = torch.from_numpy(normalizer.normalize(data.train.conditions)).to(device)
    train_a = torch.from_numpy(data.train.available).to(device)  # which components each design has
    val_rows = np.arange(ctx.rank, len(data.val), ctx.world_size)  # each rank validates its share
    val_x = torch.from_numpy(data.val.images[val_rows]).to(device)
    val_c = torch.from_numpy(normalizer.normalize(data.val.conditions[val_rows])).to(device)
    val_a = torch.from_numpy(data.val.available[val_rows]).to(device)
    n, batch = len(train_x), tc.batch_size
    global_batch = batch * ctx.world_size
    # one process keeps the last partial batch; several drop it, so every rank gets a full share
    steps_per_epoch = math.ceil(n / global_batch) if not ctx.enabled else n // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{n} training designs cannot fill one global batch of {global_batch} "
                            f"({ctx.world_size} processes x batch_size {batch})")
    planned_steps = tc.epochs * steps_per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * steps_per_epoch)

    def checkpoint_state(next_epoch: int, next_batch: int, val_loss: float | None) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg.to_dict(),
                "components": list(cfg.data.components), "normalizer": normalizer.to_dict(),
                "epoch": next_epoch, "batch_in_epoch": next_batch, "step": step, "val_loss": val_loss,
                "best_val_loss": best_val, "schedule_progress": progress_now, "rng": rng_state(),
                "data_fingerprint": data.fingerprint, "data_changes": data_changes, "git_commit": commit,
                "train_conditions": train_conditions}

    def save(name: str, state: dict[str, Any]) -> None:
        if not ctx.is_main:
            return
        path = run_dir / "checkpoints" / name
        try:
            save_checkpoint(path, state, keep_previous=name == "last.pt")
        except OSError as err:  # e.g. the disk filled up since preflight
            raise TrainingError(f"{path}: could not write the checkpoint ({err}); the checkpoints already there "
                                f"are intact: make room, then continue with epure train --resume {run_dir}") from err

    commit = git_commit()
    # the train split's raw condition rows (4 bytes per design and column): unconditional sampling draws from them
    train_conditions = torch.tensor(data.train.conditions, dtype=torch.float32)
    status, skipped, nonfinite_run, last_val, loss = "finished", 0, 0, math.nan, math.nan
    progress_now = start_progress
    start_time = last_ckpt_time = time.monotonic()
    window_start, window_samples = time.monotonic(), 0
    model.train()
    progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.1f}"), TextColumn("{task.fields[rate]:.0f} samples/s"),
                        TimeElapsedColumn(), transient=False, disable=not ctx.is_main)
    with StopFlag() as stop, progress:
        task = progress.add_task("train", total=max(planned_steps - step, 0),
                                 epoch=epoch + 1, loss=math.nan, rate=0.0)
        while epoch < tc.epochs and status == "finished":
            order = epoch_permutation(n, tc.seed, epoch).to(device)
            while batch_in_epoch < steps_per_epoch:
                first = batch_in_epoch * global_batch + ctx.rank * batch
                index = order[first: first + batch]
                x = train_x[index].float().div_(255)
                share = (ctx.rank * len(index), len(index) * ctx.world_size) if ctx.enabled else None
                out = step_module(x, train_c[index], train_a[index], share)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                # one reduction gives the total gradient norm, clipped to train.grad_clip when that is set
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf).item()
                minutes = (time.monotonic() - start_time) / 60
                # one small reduction per step keeps every rank's decisions (skip, stop) identical; a non-finite
                # loss or gradient norm on any rank makes its sum non-finite on all of them
                loss_sum, norm_sum, stop_votes, over_time, minutes_sum = distributed.sum_across(
                    ctx, [out.loss.item(), grad_norm, float(stop.signal_name is not None),
                          float(bool(tc.max_minutes) and minutes >= tc.max_minutes), minutes])
                loss, grad_norm = loss_sum / ctx.world_size, norm_sum / ctx.world_size
                progress_now = budget_progress(step, planned_steps, minutes_sum / ctx.world_size, tc.max_minutes,
                                               start_progress)  # the same on every rank
                batch_in_epoch += 1
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    # no optimiser step: a non-finite gradient would poison Adam's moments, then the weights
                    skipped += 1
                    nonfinite_run += 1
                    optimizer.zero_grad(set_to_none=True)
                    ids = data.train.ids[index.cpu().numpy()].tolist()
                    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
                    if nonfinite_run >= tc.max_nonfinite_steps:
                        diverged = not all(torch.isfinite(p).all() for p in model.parameters())
                        hint = "; the weights themselves are no longer finite: lower train.lr" if diverged else ""
                        raise TrainingError(f"{what} was {value} for {nonfinite_run} steps in a row (a non-finite "
                                            f"loss or gradient each); stopped at step {step + 1} (epoch {epoch + 1}); "
                                            f"example ids of that batch: {ids}{hint}")
                    if nonfinite_run == 1:
                        log.warning("step %d (epoch %d): %s is %s, batch skipped (training stops after %d in a row); "
                                    "example ids of that batch: %s", step + 1, epoch + 1, what, value,
                                    tc.max_nonfinite_steps, ids)
                    if stop_votes:  # a signal must not wait for a finite loss
                        status = "interrupted"
                        save("last.pt", checkpoint_state(epoch, batch_in_epoch, None))
                        break
                    continue
                nonfinite_run = 0
                lr = scheduled_lr(tc, progress_now)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                step += 1
                window_samples += global_batch
                rate = window_samples / max(time.monotonic() - window_start, 1e-9)
                progress.update(task, advance=1, loss=loss, epoch=epoch + 1, rate=rate)
                if step % max(1, cfg.wandb.log_every_steps) == 0:
                    tracker.log({"train/loss": loss, "train/bound": out.bound.item(), "train/grad_norm": grad_norm,
                                 **{f"train/{k}": v.item() for k, v in out.terms.items()},
                                 "train/lr": lr, "train/samples_per_sec": rate,
                                 "epoch": epoch + (batch_in_epoch / steps_per_epoch)}, step)
                    window_start, window_samples = time.monotonic(), 0
                if (tc.max_steps and step >= tc.max_steps) or over_time:
                    status = "budget"
                if stop_votes:
                    status = "interrupted"
                periodic = (tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0) or (
                    tc.checkpoint_every_minutes and time.monotonic() - last_ckpt_time >= 60 * tc.checkpoint_every_minutes)
                if status == "interrupted" or (periodic and batch_in_epoch < steps_per_epoch):
                    save("last.pt", checkpoint_state(epoch, batch_in_epoch, None))
                    last_ckpt_time = time.monotonic()
                if status != "finished":
                    break
            mid_epoch = batch_in_epoch < steps_per_epoch
            if mid_epoch and status == "interrupted":
                break  # last.pt already records where; resume continues from there
            if not mid_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            row: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": loss,
                                   "seconds": round(time.monotonic() - start_time, 2)}
            if epoch % tc.val_every == 0 or epoch == tc.epochs or status != "finished":
                total, count = distributed.sum_across(ctx, validation_sums(model, cfg, val_x, val_c, batch, val_a))
                last_val = total / max(count, 1)
                row["val_loss"] = last_val
                tracker.log({"val/loss": last_val, "epoch": epoch}, step)
            improved = math.isfinite(last_val) and last_val < best_val
            if improved:
                best_val = last_val
            state = checkpoint_state(epoch, batch_in_epoch, last_val)
            save("last.pt", state)
            last_ckpt_time = time.monotonic()
            aliases = ["latest", f"epoch-{epoch}"]
            if improved:
                save("best.pt", state)
                aliases.append("best")
            history.append(row)
            if ctx.is_main:
                write_metrics_csv(run_dir / "metrics.csv", history)
            tracker.log_checkpoint(run_dir / "checkpoints" / "last.pt", aliases,
                                   {"epoch": epoch, "step": step, "val_loss": last_val,
                                    "data_fingerprint": data.fingerprint, "git_commit": commit})
            if ctx.is_main and images_fn is not None and cfg.wandb.images_every_epochs and (
                    epoch % cfg.wandb.images_every_epochs == 0 or epoch == tc.epochs or status != "finished"):
                model.eval()
                tracker.log_images(images_fn(LoadedModel(model, cfg, normalizer, list(cfg.data.components), run_dir),
                                             data), step)
                model.train()
    if status == "interrupted":
        tracker.mark_preempting()
    tracker.summary({"best_val_loss": best_val, "last_val_loss": last_val, "skipped_steps": skipped,
                     "status": status, **({"data_changes": data_changes} if data_changes else {})})
    distributed.stop(ctx)
    return TrainResult(run_dir, status, epoch, step, best_val, last_val, skipped, stop.signal_name)
