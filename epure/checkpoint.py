"""Run directories and checkpoints: everything sampling needs travels inside one file.

    epure sample --checkpoint outputs/mmvaeplus/<run>   # loads the run's checkpoints/best.pt

A run directory ``outputs/mmvaeplus/<timestamp>/`` holds ``config.yaml`` (resolved), ``normalization.json``,
``components.json``, ``metrics.csv`` and ``checkpoints/{last,previous,best}.pt``. A checkpoint holds the model
weights, the resolved config, the normaliser and component names (so it samples on its own), and the optimiser
and RNG state that ``--resume`` needs. Files are written atomically, and each new ``last.pt`` first moves the
one before it to ``previous.pt``, so a damaged ``last.pt`` never costs more than one checkpoint interval: a
checkpoint that does not load is reported with its path and the newest good one is used instead.

Nothing a checkpoint holds can run code when it is loaded: files are read with ``torch.load(weights_only=True)``
(PyTorch's restricted unpickler: tensors, plain Python values and the types allowed below, nothing else), and
``save_checkpoint`` refuses to write anything else. A file whose pickle asks for anything more (a crafted
``.pt`` whose ``__reduce__`` calls ``os.system``, say) is refused with an error that names it; it is never
unpickled. ``format_version`` says how a checkpoint is laid out:

- 1 (key ``format``): numpy's RNG state as numpy's own tuple (a ``uint32`` array inside). Still read: the
  four numpy globals that array needs are allowed while loading, in a ``torch.serialization.safe_globals``
  scope (never process-wide). They only rebuild a plain ``ndarray`` from its shape, dtype and bytes; an
  object array would need a list of objects, and those objects face the same restricted unpickler.
- 2 (key ``format_version``): only tensors and plain Python values; numpy's RNG state as a dict of plain
  values and a tensor. Format-1 checkpoints are upgraded in memory as they are read and written as format 2
  the next time the run saves.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
try:
    from numpy.core.multiarray import _reconstruct
except ImportError:  # a numpy without the numpy.core alias (GPU images carry numpy 2)
    from numpy._core.multiarray import _reconstruct

from epure.config import Config, config_from_dict
from epure.data.dataset import ConditionNormalizer
from epure.io import atomic_write
from epure.model import MMVAEPlus
from epure.model.fitted_prior import FittedPrior

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # see the module docstring for what each version holds
CHECKPOINT_NAMES = ("last.pt", "previous.pt", "best.pt")
FORMAT_1_GLOBALS = [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]  # numpy's legacy RNG state
_PLAIN_TYPES = (str, int, float, bool, type(None))  # exact types: numpy scalars subclass float but pickle as numpy
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's restricted unpickler names what it refused


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be used; the message names the file."""


class CheckpointRefusedError(CheckpointError):
    """A checkpoint that loads but must not be used: unsafe, or of a format this epure does not read.

    Unlike a damaged file, a run directory does not fall back to an older checkpoint past it: a file that was
    tampered with, or written by a newer epure, is something its user must hear about.
    """


def save_checkpoint(path: Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """torch.save to a temporary sibling, fsync, rename: a crash leaves the previous file intact.

    With ``keep_previous`` the file being replaced is first renamed to ``previous.pt`` beside it, so one
    older good checkpoint survives a ``last.pt`` damaged later (bad disk, a copy cut short).
    """
    path = Path(path)
    kept = {k: v for k, v in state.items() if k not in ("format", "format_version")}
    state = {"format_version": FORMAT_VERSION, **kept}
    _check_plain(state, "checkpoint")
    if keep_previous and path.is_file():
        os.replace(path, path.with_name("previous.pt"))
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _check_plain(value: Any, where: str) -> None:
    """Only what ``torch.load(weights_only=True)`` reads without an allow-list: fail at save time, not load."""
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; checkpoint keys are str or int")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, torch.Tensor) and type(value) not in _PLAIN_TYPES:
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}: checkpoints hold only "
                        "tensors and plain Python values, so that torch.load(weights_only=True) reads them")


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as plain values and a tensor (format 2), not numpy's tuple with an array."""
    return _plain_numpy_state(np.random.get_state())


def _plain_numpy_state(state: tuple) -> dict[str, Any]:
    kind, key, pos, has_gauss, gauss = state
    return {"bit_generator": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["bit_generator"], state["key"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["gauss"]))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict safely, with a clear error for a missing, truncated, unsafe or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(FORMAT_1_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise CheckpointRefusedError(
                f"{path}: refused to load: its pickle asks for {refused[1]}, which no epure checkpoint holds and "
                "which could run code on this machine; it was not unpickled. Use checkpoints written by epure, "
                "from a source you trust") from err
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupt (UnpicklingError: {err})") from err
    except Exception as err:  # torch raises many types for damaged files (RuntimeError, EOFError, pickle errors)
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an epure checkpoint (no model weights and config inside)")
    return _upgraded(path, state)


def _upgraded(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the current format; an unknown or newer ``format_version`` is an error naming both."""
    version = state.get("format_version", state.get("format"))
    if version == FORMAT_VERSION:
        return state
    if version != 1:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise CheckpointRefusedError(
            f"{path}: checkpoint format_version {version!r}, but this epure reads format_version 1 to "
            f"{FORMAT_VERSION}" + ("; it was written by a newer epure: upgrade epure to use it" if newer else
                                   "; it was not written by epure, or is damaged"))
    state = {k: v for k, v in state.items() if k != "format"}
    rng = state.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        state["rng"] = {**rng, "numpy": _plain_numpy_state(rng["numpy"])}
    state["format_version"] = FORMAT_VERSION
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
        except CheckpointRefusedError:
            raise
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
    train_conditions: np.ndarray | None = None  # the train split's raw condition rows [N, C]; None in older files
    fitted_prior: FittedPrior | None = None  # the latent density fitted to these weights; None: not in the file
    exclusive_components: bool = False  # one component per pixel in every training design (metrics.design_masks)
    threshold: float = 0.5  # where its probabilities become masks, calibrated in training (older files: 0.5)
    whole_components: list[str] = field(default_factory=list)  # one piece in every training design (older files: none)

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
    model = MMVAEPlus(config.model, components, config.data.image_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored config: {err}") from err
    model.to(device).eval()
    meta = {k: state.get(k) for k in ("epoch", "step", "val_loss", "data_fingerprint", "git_commit", "data_changes")}
    rows = state.get("train_conditions")
    rows = None if rows is None else torch.as_tensor(rows, dtype=torch.float32).numpy()
    return LoadedModel(model, config, ConditionNormalizer.from_dict(state["normalizer"]), components, path, meta, rows,
                       stored_fitted_prior(path, state, config, components),
                       bool(state.get("exclusive_components", False)),
                       float(state.get("decision_threshold", 0.5)), stored_whole_components(path, state, components))


def stored_whole_components(path: Path, state: dict[str, Any], components: list[str]) -> list[str]:
    """The checkpoint's components that no training design had in pieces (older files: none), checked."""
    whole = state.get("whole_components", [])
    if not isinstance(whole, list) or any(name not in components for name in whole):
        raise CheckpointError(f"{path}: its whole_components {whole!r} are not a list of its components "
                              f"{components}")
    return list(whole)


def stored_fitted_prior(path: Path, state: dict[str, Any], config: Config, components: list[str]) -> FittedPrior | None:
    """The checkpoint's fitted prior (None: it has none), checked against the model's latent size."""
    fitted = state.get("fitted_prior")
    try:
        fitted = None if fitted is None else FittedPrior.from_state(fitted)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its fitted_prior is damaged ({type(err).__name__}: {err})") from err
    m, dz, dw = len(components), config.model.latent_dim_z, config.model.latent_dim_w
    latent_dim = (dz + dw) * m if fitted is not None and fitted.own_z else dz + m * dw
    if fitted is not None and fitted.output_dim != latent_dim:
        rule = ("components x (latent_dim_z + latent_dim_w)" if fitted.own_z
                else "latent_dim_z + components x latent_dim_w")
        raise CheckpointError(f"{path}: its fitted_prior covers {fitted.output_dim} latent dimensions, the model has "
                              f"{latent_dim} ({rule})")
    return fitted


def git_commit() -> str | None:
    """The commit of the code that trained a model, when it runs from a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
