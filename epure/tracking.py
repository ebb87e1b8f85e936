"""Experiment tracking: every Weights & Biases call of epure lives in this module.

    epure train --wandb offline --max-steps 20   # a W&B run saved offline; wandb sync uploads it

Training talks to a ``Tracker``; ``NullTracker`` is what runs when tracking is off, so the training loop
never checks whether W&B is there. ``WandbTracker`` wraps every W&B call: the first error is reported once
and the tracker goes quiet, so W&B trouble never costs a training run (local checkpoints are written by the
training loop regardless).

Models travel as W&B artifacts of type ``model``, one collection per run (``model-<run id>``), laid out like
a run directory (``checkpoints/last.pt``, ``config.yaml``, ``normalization.json``, ``components.json``), so
``epure.checkpoint.load_model`` reads a downloaded version as it reads a local run. ``resolve_artifact`` is
the one way in for ``sample`` and ``evaluate``, for run artifacts and Registry collections alike.

Lineage: a training run uses a ``dataset`` artifact (by reference: fingerprint, file counts, the CSV's hash)
and logs ``model`` artifacts; sampling and evaluation runs use the model. Lineage and reads are niceties
that may fail (a warning), never a result: metrics, tables and pictures are logged first. Calls a command
cannot do without (creating a sweep, linking to the Registry, saving a report) raise ``TrackingError``,
which names the server and the call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from epure.checkpoint import read_checkpoint, save_checkpoint
from epure.config import REGISTRY_COLLECTION, Config, ConfigError, DataConfig, TrainConfig, WandbConfig
from epure.data.cache import cache_root
from epure.io import atomic_write_json

if TYPE_CHECKING:
    from epure.data import DataBundle

log = logging.getLogger(__name__)

RUN_INFO = "wandb_run.json"  # in a run directory: which W&B run (and artifact collection) it is
ARTIFACT_INFO = "artifact.json"  # in a downloaded artifact folder: what it is; written last, marks it complete
RUN_FILES = ("config.yaml", "normalization.json", "components.json")
SAMPLING_KEYS = ("model", "config", "components", "normalizer", "epoch", "step", "val_loss", "data_fingerprint",
                 "git_commit", "train_conditions", "fitted_prior", "exclusive_components",
                 "decision_threshold", "whole_components")
ARTIFACT_EVERY_MINUTES = 10.0
CONFIRM_SECONDS = 300  # how long finish() waits for the server to confirm the model versions, all together
REGISTRY_PREFIX = "wandb-registry-"
MODEL_REGISTRY = f"{REGISTRY_PREFIX}model"
_PINNED_VERSION = re.compile(r"v\d+")


class ArtifactError(RuntimeError):
    """A model artifact that cannot be had; the message says what to do instead."""


class TrackingError(RuntimeError):
    """A W&B call a command cannot do without failed; the message names the server and the call."""


def server_url() -> str:
    """The W&B server this process talks to (``WANDB_BASE_URL``, the login's host, or W&B's cloud)."""
    from wandb.sdk import wandb_setup

    return os.environ.get("WANDB_BASE_URL") or wandb_setup.singleton().settings.base_url


def server_call(call: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with any failure turned into a ``TrackingError`` naming the server and ``call``.

    The SDK raises many types (CommError, its service's WandbApiFailedError, ValueError, ...), so all are caught.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        raise TrackingError(f"the W&B server {server_url()} failed {call}: {type(err).__name__}: {err}") from err


def summary_goal(key: str) -> str | None:
    """The run summary a dashboard wants for a ``val/*`` or ``eval/*`` key: the best value over the run.

    ``min`` for losses, errors and distances (``*_mae``, the Wasserstein ``w_*``), ``max`` for IoU and Dice
    and for the diversity precision, recall and coverage; None (W&B's default, the last value) for shares,
    spreads and overlaps among designs (pairwise IoU is best when it matches the real designs', not at an end),
    and for the real-vs-real references.
    """
    if not key.startswith(("val/", "eval/")) or "_std/" in key or key.startswith("eval/real/"):
        return None  # real-vs-real values are the data's own, not the model's to improve
    leaf = key.split("/", 1)[1]
    if leaf.startswith("diversity/"):  # coverage of the real designs: higher is better; overlaps: match the data
        return "max" if leaf.split("/")[1] in ("precision", "recall", "coverage") else None
    if "loss" in leaf or leaf.endswith("_mae") or leaf.startswith("uncond/w_"):
        return "min"
    if "iou" in leaf or "dice" in leaf:
        return "max"
    return None


def define_summaries(run: Any, keys: Any, defined: set[str]) -> None:
    """``define_metric`` once per new key with a goal (W&B globs only match suffixes, so keys are named one
    by one: ``val/*`` would give IoU a min)."""
    for key in keys:
        if key not in defined:
            defined.add(key)
            goal = summary_goal(key)
            if goal is not None:
                run.define_metric(key, summary=goal)


class NullTracker:
    """Tracking switched off: every call does nothing."""

    enabled = False
    sync_hint: str | None = None

    def start(self, run_dir: Path, cfg: Config) -> None:
        pass

    def use_dataset(self, data: "DataBundle", cfg: DataConfig) -> None:
        pass

    def log_config(self, values: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Any], step: int) -> None:
        pass

    def log_checkpoint(self, checkpoint: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def mark_preempting(self) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _guarded(method):
    """W&B trouble never stops training: the first error is reported once, then the tracker does nothing."""

    @functools.wraps(method)
    def wrapper(self: "WandbTracker", *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as err:  # wandb raises many types (CommError, UsageError, OSError, ValueError, ...)
            self.failed = True
            log.warning("W&B %s failed (%s: %s); training goes on without W&B tracking; local checkpoints "
                        "are unaffected", method.__name__.strip("_"), type(err).__name__, err)

    return wrapper


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf are not JSON: W&B metadata gets None instead (e.g. an epoch without validation)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def _measured(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without NaN/inf: a value that could not be measured (k-NN recall on 6 designs) is left out of
    the history rather than charted as a number (W&B turns a null into a 0 summary; servers may refuse NaN)."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


def quiet_settings() -> Any:
    """No console capture and no code upload: epure logs what matters itself."""
    import wandb

    return wandb.Settings(console="off", save_code=False, silent=True)


class WandbTracker:
    """One W&B run for one training run: config, metrics, image grids and model artifacts.

    The run starts in ``start`` (called by ``train`` once the run directory exists), so it carries the
    resolved config, is named after the run directory, and a resumed run continues the same W&B run.
    A model version is logged at most every ``artifact_every_minutes`` (a new best included); what was held
    back meanwhile (the newest best and the latest) is logged by ``finish``, so long runs with short epochs
    do not upload a copy of the weights every epoch. Online, ``finish`` then waits for the server to confirm
    each version (a warning names any it did not store, and the local checkpoint that holds it) and, with
    ``wandb.register``, links the best version to that Registry collection.
    """

    enabled = True

    def __init__(self, settings: WandbConfig, mode: str, artifact_every_minutes: float = ARTIFACT_EVERY_MINUTES):
        self.settings, self.mode = settings, mode
        self.artifact_every_s = 60 * artifact_every_minutes
        self.run: Any = None
        self.run_dir: Path | None = None
        self.failed = False
        self.sync_hint: str | None = None
        self._staging: Path | None = None  # where this run's weights-only copies wait to be logged
        self._last_upload: float | None = None
        self._pending: dict[str, tuple[Path, list[str], dict[str, Any]]] = {}  # "best" / "latest" held back
        self._logged: list[tuple[Any, list[str]]] = []  # (artifact, aliases) of every model version logged
        self._defined: set[str] = set()  # keys given their summary by define_metric

    @_guarded
    def start(self, run_dir: Path, cfg: Config) -> None:
        import wandb

        self.run_dir = Path(run_dir)
        info_path = self.run_dir / RUN_INFO
        previous = json.loads(info_path.read_text()) if info_path.is_file() else {}
        resume_id = previous.get("id") if previous.get("project") == self.settings.project else None
        s = self.settings
        self.run = wandb.init(
            project=s.project, entity=s.entity, name=s.name or self.run_dir.name, tags=s.tags or None,
            group=s.group, notes=s.notes, config=cfg.to_dict(), job_type="train", mode=self.mode,
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir.parent), id=resume_id,
            resume="allow" if resume_id else None, settings=quiet_settings())
        self._staging = Path(tempfile.mkdtemp(prefix="epure-wandb-"))
        if self.mode == "online":
            log.info("W&B run: %s", self.run.url)
        else:
            log.info("W&B run %s is tracked offline in %s", self.run.id, self.run.settings.sync_dir)
        atomic_write_json(info_path, {"id": self.run.id, "project": self.run.project, "entity": self.run.entity,
                                      "name": self.run.name, "mode": self.mode, "artifact": self.artifact_name,
                                      "sync_dir": self.run.settings.sync_dir,
                                      "url": self.run.url if self.mode == "online" else None})

    @property
    def artifact_name(self) -> str:
        return f"model-{self.run.id}"

    def use_dataset(self, data: "DataBundle", cfg: DataConfig) -> None:
        """Declare the training data as this run's input (lineage); a failure only warns."""
        if self.run is None or self.failed or self.settings.log_dataset == "off":
            return
        try:
            use_new_artifact(self.run, dataset_artifact(data, cfg, self._staging,
                                                        upload=self.settings.log_dataset == "upload"))
        except Exception as err:  # lineage never costs the run: metrics, pictures and models go on
            log.warning("W&B could not record that this run uses the dataset %s (%s: %s); training goes on",
                        dataset_name(data.root), type(err).__name__, err)

    @_guarded
    def log_config(self, values: dict[str, Any]) -> None:
        """Add facts found while starting (e.g. the data's availability) to the run's config."""
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    @_guarded
    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            metrics = _measured(metrics)
            define_summaries(self.run, metrics, self._defined)
            self.run.log(metrics, step=step)

    @_guarded
    def log_images(self, images: dict[str, Any], step: int) -> None:
        import wandb

        if self.run is not None:
            self.run.log({name: wandb.Image(image) for name, image in images.items()}, step=step)

    @_guarded
    def log_checkpoint(self, checkpoint: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        """Log this epoch's model now, or hold it back until the next upload is due (see the class)."""
        if self.run is None:
            return
        slot = "best" if "best" in aliases else "latest"
        weights = self._staging / f"{slot}.pt"
        state = read_checkpoint(checkpoint)  # weights only: optimiser and RNG state are for --resume
        save_checkpoint(weights, {k: state[k] for k in SAMPLING_KEYS if k in state})
        if slot == "best":
            self._pending.pop("latest", None)  # this state is the latest too
        self._pending[slot] = (weights, list(aliases), _json_safe(metadata))
        now = time.monotonic()
        if self._last_upload is None or now - self._last_upload >= self.artifact_every_s:
            self._flush()
            self._last_upload = now

    def _flush(self) -> None:
        """Log held-back versions oldest first (a held-back best is older than a held-back latest): W&B
        gives ``latest`` to the version logged last."""
        for slot in ("best", "latest"):
            if slot in self._pending:
                self._log_model(*self._pending.pop(slot))

    def _log_model(self, weights: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        import wandb

        artifact = wandb.Artifact(self.artifact_name, type="model", metadata={
            **metadata, "run_dir": str(self.run_dir), "run_id": self.run.id, "project": self.run.project,
            "entity": self.run.entity})
        artifact.add_file(str(weights), name="checkpoints/last.pt")  # copied: the staging file is reused
        for name in RUN_FILES:
            artifact.add_file(str(self.run_dir / name), name=name)
        self._logged.append((self.run.log_artifact(artifact, aliases=aliases), list(aliases)))

    def _confirm_models(self) -> None:
        """Online: wait until the server confirms each logged version; warn about any it did not store."""
        deadline = time.monotonic() + CONFIRM_SECONDS
        for artifact, aliases in self._logged:
            try:
                artifact.wait(timeout=max(1, round(deadline - time.monotonic())))
                if artifact.state != "COMMITTED":
                    raise RuntimeError(f"its state is {artifact.state}")
            except Exception as err:
                local = self.run_dir / "checkpoints" / ("best.pt" if "best" in aliases else "last.pt")
                log.warning("W&B did not confirm that it stored the model artifact %s (aliases %s): %s: %s; "
                            "the model is safe in %s (epure sample --checkpoint %s)", self.artifact_name,
                            ", ".join(aliases), type(err).__name__, err, local, self.run_dir)

    def _register(self) -> None:
        """Link the best model version to the Registry collection ``wandb.register``; a failure only warns."""
        name = self.settings.register
        best = next((a for a, aliases in reversed(self._logged) if "best" in aliases), None)
        if best is None:
            log.warning("no best model to link to the W&B Registry collection %s (no finite validation loss)", name)
            return
        try:
            self.run.link_artifact(best, registry_path(name))
            log.info("linked %s:best to the W&B Registry collection %s", self.artifact_name, registry_path(name))
        except Exception as err:
            log.warning("could not link %s:best to the W&B Registry collection %s (%s: %s); link it later with: "
                        "epure register %s %s", self.artifact_name, registry_path(name), type(err).__name__, err,
                        self.run_dir, name)

    @_guarded
    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(_json_safe(values))

    @_guarded
    def mark_preempting(self) -> None:
        if self.run is not None:
            self.run.mark_preempting()

    def finish(self, exit_code: int = 0) -> None:
        """Log held-back models, close the run and, offline, leave the ``wandb sync`` command in ``sync_hint``."""
        if self.run is not None:
            if self.failed:  # already reported; still close the run so it does not linger as "running"
                with contextlib.suppress(Exception):
                    self.run.finish(exit_code=exit_code)
            else:
                self._finish_run(exit_code)
            if self.mode == "offline":
                self.sync_hint = f"wandb sync {self.run.settings.sync_dir}"
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    @_guarded
    def _finish_run(self, exit_code: int) -> None:
        self._flush()
        if self.mode == "online":
            self._confirm_models()
            if self.settings.register:
                self._register()
        self.run.finish(exit_code=exit_code)


def dataset_name(root: str | Path) -> str:
    """The dataset artifact's collection: ``dataset-<folder name>``, in the characters W&B allows."""
    return f"dataset-{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(root).resolve().name)}"


def dataset_artifact(data: "DataBundle", cfg: DataConfig, staging: Path, upload: bool = False) -> Any:
    """The training data as a ``dataset`` artifact, by reference: its description, not its images.

    The description (``dataset.json``, also the metadata) holds the fingerprint that checkpoints carry, the
    folder, the designs per split, the image files per split and component, and the CSV's SHA-256; the
    artifact refers to the CSV where it is (a reference to the image folder would list every PNG in the
    manifest). A changed dataset changes the description, so W&B makes a new version of the folder's
    collection. ``upload`` adds the decoded images (the cache's .npz files).
    """
    import wandb

    from epure.data.dataset import cache_path

    root = Path(data.root).resolve()
    csv_path = Path(cfg.csv) if Path(cfg.csv).is_absolute() else root / cfg.csv
    files = {split: {c: sum(1 for e in os.scandir(root / split / c) if e.is_file()) for c in cfg.components}
             for split in ("train", "test") if (root / split).is_dir()}
    description = {"fingerprint": data.fingerprint, "root": str(root), "csv": str(csv_path),
                   "csv_sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
                   "designs": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                   "files": files, "components": list(cfg.components),
                   "condition_columns": list(cfg.condition_columns), "image_size": list(cfg.image_size)}
    artifact = wandb.Artifact(dataset_name(root), type="dataset", description=f"epure dataset {root}",
                              metadata=description)
    atomic_write_json(staging / "dataset.json", description)
    artifact.add_file(str(staging / "dataset.json"), name="dataset.json")
    artifact.add_reference(csv_path.as_uri(), name=csv_path.name)  # the images: their root and counts above
    if upload:
        for split, fingerprint in (("train", data.train.fingerprint), ("test", data.test.fingerprint)):
            cached = cache_path(split, fingerprint)
            if cached.is_file():
                artifact.add_file(str(cached), name=f"decoded/{split}.npz")
            else:
                log.warning("wandb.log_dataset is upload, but the decoded %s split is not cached (%s); its "
                            "images are referenced, not uploaded", split, cached)
    return artifact


def use_new_artifact(run: Any, artifact: Any) -> None:
    """Declare a new artifact as an input of ``run`` (lineage), online or offline.

    Online this is ``run.use_artifact``. Offline the SDK refuses ``use_artifact``, yet what it does online for
    a new artifact is to log it marked ``use_after_commit``; that record, written to the offline run file,
    is what ``wandb sync`` sends later. It is the SDK's private ``_log_artifact``: if a future wandb drops it,
    this raises and the caller warns.
    """
    if run.offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def registry_path(name: str) -> str:
    """``NAME`` -> ``wandb-registry-model/NAME``; a full ``wandb-registry-R/NAME`` stays as it is."""
    return name if name.startswith(REGISTRY_PREFIX) else f"{MODEL_REGISTRY}/{name}"


def has_credentials() -> bool:
    """A W&B API key is configured (environment, netrc or settings): checked locally, without the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    host = wandb_setup.singleton().settings.base_url
    try:
        return wbauth.authenticate_session(host=host, source="epure", prompt=False, update_session=False) is not None
    except wandb.errors.AuthenticationError:  # a malformed key counts as none: `wandb login` fixes both
        return False


WANDB_ENV_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")  # what W&B accepts in WANDB_MODE


def env_mode() -> str:
    """``WANDB_MODE`` ('' when unset). W&B refuses any other value than its own, even an empty one, with a
    traceback from inside ``wandb.init``; here that is a ConfigError naming the variable, before anything runs."""
    value = os.environ.get("WANDB_MODE")
    if value is None:
        return ""
    if value not in WANDB_ENV_MODES:
        raise ConfigError(f"the environment variable WANDB_MODE is {value!r}, which W&B does not accept: set it to "
                          f"one of {', '.join(WANDB_ENV_MODES)}, or unset it (`unset WANDB_MODE`)")
    return value


def resolve_mode(mode: str) -> str:
    """``off``, ``online`` or ``offline``. ``WANDB_MODE=disabled`` always turns tracking off; ``auto`` follows
    ``WANDB_MODE`` when set, else goes online only with a login (and says once that it runs offline)."""
    if mode == "off":
        return "off"
    env_mode_now = env_mode()
    if env_mode_now == "disabled":
        return "off"
    if mode != "auto":
        return mode
    if env_mode_now in ("online", "offline"):
        return env_mode_now
    if env_mode_now == "dryrun":
        return "offline"
    if has_credentials():
        return "online"
    log.warning("not logged in to W&B (run `wandb login` once): this run is tracked offline; the command "
                "that uploads it later is printed at the end")
    return "offline"


def make_tracker(settings: WandbConfig) -> NullTracker | WandbTracker:
    """The tracker for a training run with these W&B settings.

    ``wandb.register`` needs the Registry, so W&B online: otherwise this is an error, before any training.
    """
    mode = resolve_mode(settings.mode)
    if settings.register and mode != "online":
        reason = offline_reason() or f"W&B mode is {mode}"
        raise ConfigError(f"--register {settings.register} (wandb.register) links the model in the W&B Registry, "
                          f"which needs W&B online, but {reason}. Train online (`wandb login`), or link the model "
                          f"afterwards with: epure register RUN_DIR {settings.register}")
    return NullTracker() if mode == "off" else WandbTracker(settings, mode)


def artifact_cache_dir(entity: str, project: str, name: str, version: str) -> Path:
    return cache_root() / "artifacts" / entity / project / name / version


def parse_artifact_spec(spec: str, project: str | None = None,
                        entity: str | None = None) -> tuple[str | None, str, str, str]:
    """``[[ENTITY/]PROJECT/]NAME[:ALIAS]`` -> (entity, project, name, alias).

    What the spec leaves out comes from the arguments, then ``WANDB_ENTITY``/``WANDB_PROJECT``, then the
    default project (the entity may stay None: W&B then uses the logged-in user's default entity).
    """
    path, _, alias = spec.partition(":")
    parts = path.split("/")
    if len(parts) > 3 or not all(parts) or (":" in alias) or not path:
        raise ArtifactError(f"--artifact {spec!r}: expected ENTITY/PROJECT/NAME:ALIAS or NAME:ALIAS "
                            f"(e.g. model-1a2b3c4d:best)")
    name = parts[-1]
    project = parts[-2] if len(parts) >= 2 else project or os.environ.get("WANDB_PROJECT") or WandbConfig().project
    entity = parts[0] if len(parts) == 3 else entity or os.environ.get("WANDB_ENTITY")
    return entity, project, name, alias or "latest"


def offline_reason() -> str | None:
    """Why W&B cannot be reached from here (offline mode, no login), or None when it can."""
    env_mode_now = env_mode()
    if env_mode_now in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={env_mode_now}"
    if not has_credentials():
        return "there is no W&B login (no API key)"
    return None


def find_local_run(artifact_name: str, output_dir: str | Path = TrainConfig().output_dir) -> Path | None:
    """The run directory under ``OUTPUT/mmvaeplus/`` whose W&B run logged ``artifact_name``, if any."""
    for info_path in sorted(Path(output_dir).glob(f"mmvaeplus/*/{RUN_INFO}")):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        if artifact_name in (info.get("artifact"), info.get("id"), info.get("name")):
            return info_path.parent
    return None


def resolve_artifact(spec: str, project: str | None = None, entity: str | None = None,
                     output_dir: str | Path = TrainConfig().output_dir) -> Path:
    """The local folder of a model artifact, downloaded once into the cache; ``load_model(folder)`` reads it.

    A pinned version (``...:v3`` with a known entity) already in the cache needs no network; an alias asks
    W&B which version it points to now and downloads only a version not cached yet. Offline or without a
    login this is an error that points to ``--checkpoint`` (and to the local run, when ``output_dir`` has it).
    """
    entity, project, name, alias = parse_artifact_spec(spec, project, entity)
    if entity and _PINNED_VERSION.fullmatch(alias):
        cached = artifact_cache_dir(entity, project, name, alias)
        if (cached / ARTIFACT_INFO).is_file():
            return cached
    reason = offline_reason()
    if reason is not None:
        local = find_local_run(name, output_dir)
        where = f"; this model's local run is {local} (epure sample --checkpoint {local})" if local else ""
        raise ArtifactError(f"--artifact {spec} needs W&B online, but {reason}. Log in with `wandb login`, "
                            f"or sample from a local run directory with --checkpoint RUN_DIR{where}")
    import wandb

    path = "/".join(filter(None, (entity, project, f"{name}:{alias}")))
    try:
        artifact = wandb.Api().artifact(path, type="model")
    except Exception as err:  # the SDK raises many types (CommError, WandbApiFailedError, ValueError, ...)
        raise ArtifactError(f"cannot get the W&B model artifact {path}: {err}") from err
    folder = artifact_cache_dir(artifact.entity, artifact.project, name, artifact.version)
    if not (folder / ARTIFACT_INFO).is_file():
        _download(artifact, folder, name)
    return folder


def _download(artifact: Any, folder: Path, name: str) -> None:
    """Download into a sibling folder and rename it into place: the cache never holds half a model."""
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log.info("downloading %s into %s", artifact.qualified_name, folder)
    try:
        artifact.download(root=str(partial), skip_cache=True)
        if not list((partial / "checkpoints").glob("*.pt")):
            raise ArtifactError(f"{artifact.qualified_name} is not an epure model artifact (no checkpoints/*.pt)")
        atomic_write_json(partial / ARTIFACT_INFO, {
            "qualified_name": artifact.qualified_name, "entity": artifact.entity, "project": artifact.project,
            "name": name, "version": artifact.version, "digest": artifact.digest, "metadata": artifact.metadata})
    except BaseException:  # a failed or interrupted download leaves nothing in the cache
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        partial.rename(folder)
    except OSError:  # another process finished the same download first
        if not (folder / ARTIFACT_INFO).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)


def artifact_info(folder: Path) -> dict[str, Any]:
    """What ``resolve_artifact`` recorded about a downloaded folder (qualified name, version, metadata)."""
    return json.loads((Path(folder) / ARTIFACT_INFO).read_text())


def training_run_info(model_path: Path) -> dict[str, Any]:
    """What is known of the W&B run that trained the model at ``model_path`` (a run's or an artifact's file).

    A run directory keeps ``wandb_run.json``; its ``artifact`` becomes the version of that checkpoint
    (``model-<run id>:best`` for best.pt, else ``:latest``). A downloaded artifact knows its run from its
    metadata (older versions: from the name ``model-<run id>``). Empty when trained without tracking.
    """
    path = Path(model_path)
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (folder / RUN_INFO).is_file():
        info = json.loads((folder / RUN_INFO).read_text())
        if info.get("artifact"):
            info["artifact"] = f"{info['artifact']}:{'best' if path.name == 'best.pt' else 'latest'}"
        return info
    if (folder / ARTIFACT_INFO).is_file():
        info = artifact_info(folder)
        meta = info["metadata"]
        run_id = meta.get("run_id") or info["name"].removeprefix("model-")
        return {"id": run_id, "project": meta.get("project") or info["project"],
                "entity": meta.get("entity") or info["entity"], "name": Path(meta.get("run_dir") or run_id).name,
                "artifact": info["qualified_name"]}
    return {}


def log_evaluation(metrics: dict[str, float], tables: dict[str, tuple[list[str], list[list[Any]]]],
                   images: dict[str, Any], *, mode: str, config: dict[str, Any], trained_by: dict[str, Any],
                   settings: WandbConfig) -> str | None:
    """Log an evaluation to a new W&B run of job type ``evaluate``; returns the ``wandb sync`` command offline.

    The run carries the training run's config (plus ``eval`` options) and sits in the training run's group,
    so evaluations line up with their training runs on the dashboard; ``metrics`` (with their min/max
    summaries), ``tables`` (columns, rows) and ``images`` are logged in one step. Only then, online, does the
    run declare the model artifact it used (lineage, which may fail with a warning), and the training run's
    own summary receives the same metrics, so the runs table shows them beside the training curves.
    W&B trouble only warns: the JSON is already written.
    """
    mode = resolve_mode(mode)
    if mode == "off":
        return None
    import wandb

    project = trained_by.get("project") or settings.project
    entity = trained_by.get("entity") or settings.entity
    name = trained_by.get("name")
    try:
        run = wandb.init(project=project, entity=entity, job_type="evaluate", mode=mode,
                         name=f"eval-{name}" if name else None, group=settings.group or name,
                         tags=settings.tags or None, config=config,
                         dir=os.environ.get("WANDB_DIR") or str(cache_root()), settings=quiet_settings())
        measured = _measured(metrics)
        define_summaries(run, measured, set())
        logged: dict[str, Any] = dict(measured)
        logged.update({key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in tables.items()})
        logged.update({key: wandb.Image(image) for key, image in images.items()})
        run.log(logged)
    except Exception as err:
        log.warning("could not log the evaluation to W&B (%s: %s); it is in the JSON file", type(err).__name__, err)
        return None
    if trained_by.get("artifact") and mode == "online":
        try:
            run.use_artifact(trained_by["artifact"])
        except Exception as err:  # the results are logged already: lineage only warns
            log.warning("W&B could not record that this evaluation used the model %s (%s: %s); its metrics, "
                        "tables and pictures are logged", trained_by["artifact"], type(err).__name__, err)
    sync_dir = run.settings.sync_dir
    try:
        run.finish()
    except Exception as err:
        log.warning("could not finish the W&B evaluation run (%s: %s)", type(err).__name__, err)
    if mode == "online" and trained_by.get("id"):
        _update_training_summary(entity, project, trained_by["id"], metrics)
    return f"wandb sync {sync_dir}" if mode == "offline" else None


def _update_training_summary(entity: str | None, project: str, run_id: str, metrics: dict[str, float]) -> None:
    """Copy evaluation metrics into the training run's summary (online only; a failure only warns)."""
    import wandb

    path = "/".join(filter(None, (entity, project, run_id)))
    try:
        run = wandb.Api().run(path)
        run.summary.update(_measured(metrics))
    except Exception as err:
        log.warning("could not add the evaluation to the training run %s (%s: %s)", path, type(err).__name__, err)


def fetch_run_metrics(path: str) -> tuple[str, dict[str, float | None]]:
    """(run name, ``eval/*`` summary values) of the W&B run ``ENTITY/PROJECT/RUN_ID``; needs W&B online."""
    reason = offline_reason()
    if reason is not None:
        raise ArtifactError(f"{path}: not a local file, and reading a W&B run needs W&B online, but {reason}")
    import wandb

    try:
        run = wandb.Api().run(path)
        summary = dict(run.summary)
    except Exception as err:  # the SDK raises many types (CommError, WandbApiFailedError, ValueError, ...)
        raise ArtifactError(f"cannot read the W&B run {path}: {err}") from err
    metrics = {k: v for k, v in ((k, summary_value(v)) for k, v in summary.items())
               if k.startswith("eval/") and isinstance(v, (int, float))}
    if not metrics:
        raise ArtifactError(f"the W&B run {path} has no eval/* metrics (run `epure evaluate` on its model first)")
    return run.name, metrics


def summary_value(value: Any) -> Any:
    """A summary entry as one number: a ``define_metric`` summary ``{"max": v}`` (or min) gives ``v``."""
    keys = list(value.keys()) if hasattr(value, "keys") else []  # a dict, or the public API's SummarySubDict
    return value[keys[0]] if len(keys) == 1 and keys[0] in ("min", "max") else value


# --------------------------------------------------------------------------------------------- sweeps


@contextlib.contextmanager
def _sweep_environment() -> Iterator[None]:
    """The SDK's sweep calls export WANDB_PROJECT, WANDB_ENTITY, WANDB_SWEEP_ID, ... into this process's
    environment; put it back afterwards, so later calls here (an artifact lookup, the next command of a
    notebook or test) do not inherit them. WANDB_SERVICE (the SDK's own service process) is left alone."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("WANDB_") and k != "WANDB_SERVICE"]:
            if key not in saved:
                del os.environ[key]
        os.environ.update({k: v for k, v in saved.items() if k != "WANDB_SERVICE"})


def create_sweep(definition: dict[str, Any], project: str, entity: str | None) -> str:
    """Create a W&B sweep on the server; returns its id."""
    import wandb

    with _sweep_environment():
        return server_call("wandb.sweep (creating the sweep)", wandb.sweep, definition, project=project,
                           entity=entity)


def run_agent(sweep_id: str, trial: Callable[[], Any], count: int | None, project: str,
              entity: str | None) -> None:
    """Be one agent of the W&B sweep ``sweep_id``: ``trial()`` runs each trial the server hands out."""
    import wandb

    with _sweep_environment():
        server_call(f"wandb.agent (asking sweep {sweep_id} for trials)", wandb.agent, sweep_id, function=trial,
                    count=count, project=project, entity=entity)


def agent_params() -> dict[str, Any]:
    """The parameters W&B's agent chose for the run it starts now.

    The agent writes them to a file (``WANDB_SWEEP_PARAM_PATH``) that ``wandb.init`` reads; epure reads it
    first, because the whole config must be known before training starts its W&B run.
    """
    import wandb
    import yaml

    path = os.environ.get(wandb.env.SWEEP_PARAM_PATH)
    if not path or not Path(path).is_file():
        raise TrackingError("no sweep parameters from the W&B agent ($WANDB_SWEEP_PARAM_PATH is not set or missing)")
    tree = yaml.safe_load(Path(path).read_text()) or {}
    return {k: v["value"] for k, v in tree.items() if k != "wandb_version"}


def record_failed_run(settings: WandbConfig, mode: str, folder: Path, config: dict[str, Any],
                      summary: dict[str, Any]) -> Any:
    """A finished, failed (exit code 1) W&B run with this config and summary: a sweep trial that failed before
    training started its run is recorded this way, so the sweep shows it as failed instead of waiting for it."""
    import wandb

    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=settings.project, entity=settings.entity, group=settings.group,
                     tags=settings.tags or None, job_type="train", mode=mode, config=config, dir=str(folder),
                     settings=quiet_settings())
    run.summary.update(summary)
    run.finish(exit_code=1)
    return run


# --------------------------------------------------------------------------------------------- registry


def register_model(source: str | Path, collection: str, aliases: list[str] | None = None) -> str:
    """Link a model version to a W&B Registry collection; returns the collection's path. Online only.

    ``source`` is a run directory (its ``best`` version) or an artifact ``[[ENTITY/]PROJECT/]NAME:ALIAS``.
    """
    if not REGISTRY_COLLECTION.fullmatch(collection):
        raise TrackingError(f"{collection!r} is not a W&B Registry collection name (letters, digits, '-', '_', '.', "
                            f"or wandb-registry-REGISTRY/NAME)")
    folder, hint = Path(source), ""
    if folder.is_dir():
        if not (folder / RUN_INFO).is_file():
            raise TrackingError(f"{folder}: no {RUN_INFO}, so this run was trained without W&B and logged no model "
                                f"artifact to register; train it with W&B (not --wandb off)")
        info = json.loads((folder / RUN_INFO).read_text())
        source = "/".join(filter(None, (info.get("entity"), info.get("project"), f"{info['artifact']}:best")))
        if info.get("mode") == "offline":
            hint = f"; the run was tracked offline: upload it first with `wandb sync {info.get('sync_dir')}`"
    entity, project, name, alias = parse_artifact_spec(str(source))
    reason = offline_reason()
    if reason is not None:
        raise TrackingError(f"the W&B Registry needs W&B online, but {reason}: log in with `wandb login` (or set "
                            f"WANDB_API_KEY) and run epure register again")
    import wandb

    path = "/".join(filter(None, (entity, project, f"{name}:{alias}")))
    artifact = server_call(f"wandb.Api().artifact({path!r}) (finding the model to register{hint})",
                           lambda: wandb.Api().artifact(path, type="model"))
    target = registry_path(collection)
    server_call(f"Artifact.link({target!r}) (linking {path})", artifact.link, target, aliases=aliases or None)
    return target


# --------------------------------------------------------------------------------------------- reports

HEADLINE = ("cross_iou", "self_iou", "cross_dice", "self_dice")
PICTURE_KEYS = ("samples/unconditional", "samples/cross_matrix", "samples/composites", "eval/completions",
                "eval/samples")


def build_report(project: str, entity: str, *, group: str | None = None, sweep: str | None = None,
                 runs: list[str] | None = None, parameters: list[str] | None = None, metric: str | None = None,
                 title: str | None = None) -> Any:
    """A W&B report (``wandb_workspaces``) of one group, one sweep or a list of run ids, not saved yet.

    Loss curves, bars of the headline scores across runs (``eval/*`` of evaluation runs; a sweep's trials
    score ``val/*``), the sample grids as media panels and, given the swept ``parameters``, a parallel
    coordinates panel of them against ``metric``. Building it needs no server; ``save_report`` does.
    """
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    if sum(bool(x) for x in (group, sweep, runs)) != 1:
        raise TrackingError("a report shows one selection: give exactly one of --group, --sweep or run ids")
    if group:
        selection, chosen = f"the runs of group {group}", expr.Metric("Group") == group
    elif sweep:
        selection, chosen = f"the trials of sweep {sweep}", expr.Metric("Sweep") == sweep
    else:
        selection, chosen = f"the runs {', '.join(runs)}", expr.Metric("ID").isin(list(runs))
    filters = expr.And(chosen)
    scored = "val" if sweep or parameters else "eval"

    def grid(*panels: Any) -> Any:
        return wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project, name=selection, filters=filters)],
                            panels=list(panels))

    def bar_metric(key: str) -> Any:  # an evaluation run's IoU/Dice summary is {"max": v} (define_metric)
        goal = summary_goal(key)
        return wr.SummaryMetric(f"{key}.{goal}" if scored == "eval" and goal else key)

    blocks = [
        wr.P(f"{selection} of {entity}/{project}, as epure logs them: training losses, the headline scores "
             f"({scored}/*), and the sample grids."),
        wr.H2("Training"),
        grid(wr.LinePlot(title="training loss", x="Step", y=["train/loss"]),
             wr.LinePlot(title="validation loss", x="Step", y=["val/loss"]),
             wr.LinePlot(title="loss terms", x="Step", y=["train/kl_z", "train/kl_w", "train/recon_self",
                                                           "train/recon_cross"])),
        wr.H2("Scores"),
        grid(wr.BarPlot(title=f"{scored}: IoU and Dice (higher is better)",
                        metrics=[bar_metric(f"{scored}/{name}") for name in HEADLINE])),
        wr.H2("Samples"),
        grid(wr.MediaBrowser(title="sample grids", media_keys=list(PICTURE_KEYS), num_columns=2)),
    ]
    if parameters:
        columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(p)) for p in parameters]
        columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(metric or f"{scored}/cross_iou")))
        blocks += [wr.H2("Sweep"), grid(wr.ParallelCoordinatesPlot(title="parameters and score", columns=columns))]
    return wr.Report(project=project, entity=entity, title=title or f"epure: {selection}",
                     description=f"epure report of {selection}", blocks=blocks)


def sweep_parameters(project: str, entity: str, sweep: str) -> tuple[list[str], str | None]:
    """(the parameters a W&B sweep varies, its metric), read from the server."""
    import wandb

    path = f"{entity}/{project}/{sweep}"
    config = server_call(f"wandb.Api().sweep({path!r}) (reading the sweep's parameters)",
                         lambda: wandb.Api().sweep(path).config)
    varied = [k for k, v in config.get("parameters", {}).items() if "value" not in v]
    return varied, config.get("metric", {}).get("name")


def report_entity(entity: str | None) -> str:
    """The entity a report belongs to: the given one, ``WANDB_ENTITY``, else the login's default entity."""
    reason = offline_reason()
    if reason is not None:
        raise TrackingError(f"a W&B report lives on the W&B server, which needs W&B online, but {reason}: log in "
                            f"with `wandb login` (or set WANDB_API_KEY) and run epure report again")
    if entity or os.environ.get("WANDB_ENTITY"):
        return entity or os.environ["WANDB_ENTITY"]
    import wandb

    return server_call("wandb.Api().default_entity (finding your entity)", lambda: wandb.Api().default_entity)


def save_report(report: Any) -> str:
    """Save the report on the W&B server; returns its URL."""
    server_call("Report.save (saving the report)", report.save)
    return report.url


# ------------------------------------------------------------------------------------------------- sampling runs


def log_samples(folders: list[Path], tables: dict[str, tuple[list[str], list[list[Any]]]], *, mode: str,
                config: dict[str, Any], trained_by: dict[str, Any], settings: WandbConfig,
                artifact_name: str) -> str | None:
    """Log a sampling run (job type ``sample``): each ``tables`` entry (samples.csv's columns and rows, the last
    column a composite picture or None) as a W&B Table with images, and the output ``folders`` this run wrote
    (``unconditional``, ``<observed>``: not the other folders an ``--out`` may hold) as an artifact of type
    ``samples`` (one collection per model, ``artifact_name``, a version per run). Then, online, the run uses
    the model artifact, so lineage reads model -> samples (a failure there only warns: the samples are logged);
    offline W&B cannot use artifacts, so the samples artifact's metadata names the model artifact instead.
    Returns the ``wandb sync`` command offline; W&B trouble only warns: the files are written.
    """
    mode = resolve_mode(mode)
    if mode == "off":
        return None
    import wandb

    name, model, run = trained_by.get("name"), trained_by.get("artifact"), None
    try:
        run = wandb.init(project=trained_by.get("project") or settings.project,
                         entity=trained_by.get("entity") or settings.entity, job_type="sample", mode=mode,
                         name=f"sample-{name}" if name else None, group=settings.group or name,
                         tags=settings.tags or None, config=config,
                         dir=os.environ.get("WANDB_DIR") or str(cache_root()), settings=quiet_settings())
        run.log({key: wandb.Table(columns=columns, data=[[*row[:-1], None if row[-1] is None else wandb.Image(row[-1])]
                                                         for row in rows])
                 for key, (columns, rows) in tables.items()})
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", artifact_name), type="samples",
                                  metadata=_json_safe({**config, "model_artifact": model}))
        for folder in folders:
            artifact.add_dir(str(folder), name=Path(folder).name)
        run.log_artifact(artifact)
    except Exception as err:
        log.warning("could not log the samples to W&B (%s: %s); they are in %s", type(err).__name__, err,
                    ", ".join(map(str, folders)))
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # already warned: the W&B record is incomplete, the files are not
                pass
        return None
    if model and mode == "online":
        try:
            run.use_artifact(model)
        except Exception as err:
            log.warning("W&B could not record that these samples came from the model %s (%s: %s); the samples "
                        "are logged", model, type(err).__name__, err)
    sync_dir = run.settings.sync_dir
    try:
        run.finish()
    except Exception as err:
        log.warning("could not finish the W&B sampling run (%s: %s)", type(err).__name__, err)
    return f"wandb sync {sync_dir}" if mode == "offline" else None
