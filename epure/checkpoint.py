"""Run directories and checkpoints: everything sampling needs travels inside one file.

A run directory ``outputs/mmvaeplus/<timestamp>/`` holds ``config.yaml`` (resolved), ``normalization.json``,
``components.json``, ``metrics.csv`` and ``checkpoints/{last,previous,best}.pt``. A checkpoint holds the model
weights, the resolved config, the normaliser and component names (so it samples on its own), and the optimiser
and RNG state that ``--resume`` needs. Files are written atomically, and each new ``last.pt`` first moves the
one before it to ``previous.pt``, so a damaged ``last.pt`` never costs more than one checkpoint interval: a
checkpoint that does not load is reported with its path and the newest good one is used instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from epure.config import Config, config_from_dict
from epure.data.dataset import ConditionNormalizer
from epure.io import atomic_write
from epure.model import MMVAEPlus, build_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("last.pt", "previous.pt", "best.pt")


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be used; the message names the file."""


def save_checkpoint(path: Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """torch.save to a temporary sibling, fsync, rename: a crash leaves the previous file intact.

    With ``keep_previous`` the file being replaced is first renamed to ``previous.pt`` beside it, so one
    older good checkpoint survives a ``last.pt`` damaged later (bad disk, a copy cut short).
    """
    path = Path(path)
    state = {"format": FORMAT_VERSION, **state}
    if keep_previous and path.is_file():
        os.replace(path, path.with_name("previous.pt"))
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict, with a clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for damaged files (RuntimeError, EOFError, pickle errors)
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an epure checkpoint (no model weights and config inside)")
    return state


def candidates(run_dir: Path, prefer: str = "best") -> list[Path]:
    """Checkpoint files of a run: the preferred one first, then the others newest first (the fallbacks)."""
    folder = Path(run_dir) / "checkpoints"
    first = folder / f"{prefer}.pt"
    others = [folder / n for n in CHECKPOINT_NAMES if n != first.name and (folder / n).is_file()]
    return [p for p in [first] if p.is_file()] + sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)


def read_run_checkpoint(run_dir: Path, prefer: str = "best") -> tuple[Path, dict[str, Any]]:
    """The first loadable checkpoint of a run; damaged ones are reported and skipped."""
    found = candidates(run_dir, prefer)
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoints found in {Path(run_dir) / 'checkpoints'}")
    errors = []
    for path in found:
        try:
            state = read_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; trying the next newest checkpoint", err)
            errors.append(str(err))
            continue
        if errors:
            log.warning("using %s instead (epoch %s, step %s)", path, state.get("epoch"), state.get("step"))
        return path, state
    raise CheckpointError(f"{run_dir}: no loadable checkpoint: " + "; ".join(errors))


def set_aside_damaged(run_dir: Path, used: Path, prefer: str = "last") -> None:
    """Before resuming from ``used``: rename the checkpoints tried before it and drop half-written temporaries.

    A damaged ``last.pt`` would otherwise be rotated onto the good ``previous.pt`` by the next save; it is
    kept as ``last.pt.corrupt`` for inspection. Temporaries are what a kill during a save leaves behind.
    """
    for path in candidates(run_dir, prefer):
        if path == Path(used):
            break
        kept = path.replace(path.with_name(path.name + ".corrupt"))
        log.warning("kept the damaged %s as %s", path.name, kept)
    for partial in (Path(run_dir) / "checkpoints").glob(".*.tmp"):
        partial.unlink(missing_ok=True)


@dataclass
class LoadedModel:
    """A model ready to sample, with what it was trained with."""

    model: MMVAEPlus
    config: Config
    normalizer: ConditionNormalizer
    components: list[str]
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        """The run directory's name for a run checkpoint, else the file's stem."""
        return self.path.parent.parent.name if self.path.parent.name == "checkpoints" else self.path.stem


def load_model(source: str | Path, device: str | torch.device = "cpu", prefer: str = "best") -> LoadedModel:
    """A model from a checkpoint file or a run directory (its best checkpoint, else the last)."""
    source = Path(source)
    if source.is_dir():
        path, state = read_run_checkpoint(source, prefer)
    else:
        path, state = source, read_checkpoint(source)
    try:
        config = config_from_dict(state["config"])
    except ValueError as err:
        raise CheckpointError(f"{path}: the config stored in the checkpoint is invalid: {err}") from err
    components = list(state["components"])
    model = build_model(config.model, components, config.data.image_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored config: {err}") from err
    model.to(device).eval()
    meta = {k: state.get(k) for k in ("epoch", "step", "val_loss", "data_fingerprint", "git_commit")}
    return LoadedModel(model, config, ConditionNormalizer.from_dict(state["normalizer"]), components, path, meta)


def git_commit() -> str | None:
    """The commit of the code that trained a model, when it runs from a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
