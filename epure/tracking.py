"""Experiment tracking: every Weights & Biases call of epure lives in this module.

Training talks to a ``Tracker``; ``NullTracker`` is what runs when tracking is off, so the training loop
never checks whether W&B is there. ``WandbTracker`` wraps every W&B call: the first error is reported once
and the tracker goes quiet, so W&B trouble never costs a training run (local checkpoints are written by the
training loop regardless).

Models travel as W&B artifacts of type ``model``, one collection per run (``model-<run id>``), laid out like
a run directory (``checkpoints/last.pt``, ``config.yaml``, ``normalization.json``, ``components.json``), so
``epure.checkpoint.load_model`` reads a downloaded version as it reads a local run. ``resolve_artifact`` is
the one way in for ``sample`` and ``evaluate``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from epure.checkpoint import read_checkpoint, save_checkpoint
from epure.config import Config, TrainConfig, WandbConfig
from epure.data.cache import cache_root
from epure.io import atomic_write_json

log = logging.getLogger(__name__)

RUN_INFO = "wandb_run.json"  # in a run directory: which W&B run (and artifact collection) it is
ARTIFACT_INFO = "artifact.json"  # in a downloaded artifact folder: what it is; written last, marks it complete
RUN_FILES = ("config.yaml", "normalization.json", "components.json")
SAMPLING_KEYS = ("model", "config", "components", "normalizer", "epoch", "step", "val_loss", "data_fingerprint",
                 "git_commit", "train_conditions")
ARTIFACT_EVERY_MINUTES = 10.0
_PINNED_VERSION = re.compile(r"v\d+")


class ArtifactError(RuntimeError):
    """A model artifact that cannot be had; the message says what to do instead."""


class NullTracker:
    """Tracking switched off: every call does nothing."""

    enabled = False
    sync_hint: str | None = None

    def start(self, run_dir: Path, cfg: Config) -> None:
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
    do not upload a copy of the weights every epoch.
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
        self.run.define_metric("val/loss", summary="min")
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

    @_guarded
    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
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

        artifact = wandb.Artifact(self.artifact_name, type="model",
                                  metadata={**metadata, "run_dir": str(self.run_dir)})
        artifact.add_file(str(weights), name="checkpoints/last.pt")  # copied: the staging file is reused
        for name in RUN_FILES:
            artifact.add_file(str(self.run_dir / name), name=name)
        self.run.log_artifact(artifact, aliases=aliases)

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
        self.run.finish(exit_code=exit_code)


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


def resolve_mode(mode: str) -> str:
    """``off``, ``online`` or ``offline``. ``WANDB_MODE=disabled`` always turns tracking off; ``auto`` follows
    ``WANDB_MODE`` when set, else goes online only with a login (and says once that it runs offline)."""
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "off" or env_mode == "disabled":
        return "off"
    if mode != "auto":
        return mode
    if env_mode in ("online", "offline"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    if has_credentials():
        return "online"
    log.warning("not logged in to W&B (run `wandb login` once): this run is tracked offline; the command "
                "that uploads it later is printed at the end")
    return "offline"


def make_tracker(settings: WandbConfig) -> NullTracker | WandbTracker:
    """The tracker for a training run with these W&B settings."""
    mode = resolve_mode(settings.mode)
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
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={env_mode}"
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
    except (wandb.errors.Error, ValueError) as err:
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


def declare_artifact_use(folder: Path, job_type: str, config: dict[str, Any] | None = None) -> None:
    """Record, in a small W&B run of ``job_type``, that this job used the artifact (lineage in the UI).

    Lineage is a nicety: offline this is skipped with a note, and a W&B error only warns.
    """
    info = artifact_info(folder)
    reason = offline_reason()
    if reason is not None:
        log.info("not recording the use of %s in W&B: %s", info["qualified_name"], reason)
        return
    import wandb

    try:
        run = wandb.init(project=info["project"], entity=info["entity"], job_type=job_type, config=config,
                         dir=os.environ.get("WANDB_DIR") or str(cache_root()), settings=quiet_settings())
        run.use_artifact(info["qualified_name"])
        run.finish()
    except Exception as err:  # lineage must never fail the job that already did its work
        log.warning("could not record the use of %s in W&B (%s: %s)", info["qualified_name"],
                    type(err).__name__, err)


def training_run_info(model_path: Path) -> dict[str, Any]:
    """What is known of the W&B run that trained the model at ``model_path`` (a run's or an artifact's file).

    A run directory keeps ``wandb_run.json``; a downloaded artifact knows its run from its name
    (``model-<run id>``). Empty when the model was trained without tracking.
    """
    path = Path(model_path)
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (folder / RUN_INFO).is_file():
        return json.loads((folder / RUN_INFO).read_text())
    if (folder / ARTIFACT_INFO).is_file():
        info = artifact_info(folder)
        run_id = info["name"].removeprefix("model-")
        return {"id": run_id, "project": info["project"], "entity": info["entity"],
                "name": Path(info["metadata"].get("run_dir") or run_id).name, "artifact": info["qualified_name"]}
    return {}


def log_evaluation(metrics: dict[str, float], tables: dict[str, tuple[list[str], list[list[Any]]]],
                   images: dict[str, Any], *, mode: str, config: dict[str, Any], trained_by: dict[str, Any],
                   settings: WandbConfig) -> str | None:
    """Log an evaluation to a new W&B run of job type ``evaluate``; returns the ``wandb sync`` command offline.

    The run carries the training run's config (plus ``eval`` options) and sits in the training run's group,
    so evaluations line up with their training runs on the dashboard; ``metrics`` go to its summary under
    their stable names, ``tables`` (columns, rows) and ``images`` are logged once. Online, the run declares
    the model artifact it used (lineage) and the training run's own summary receives the same metrics, so the
    runs table shows them beside the training curves. W&B trouble only warns: the JSON is already written.
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
        if trained_by.get("artifact") and mode == "online":
            run.use_artifact(trained_by["artifact"])
        run.summary.update(_json_safe(metrics))
        logged = {key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in tables.items()}
        logged.update({key: wandb.Image(image) for key, image in images.items()})
        run.log(logged)
        sync_dir = run.settings.sync_dir
        run.finish()
    except Exception as err:
        log.warning("could not log the evaluation to W&B (%s: %s); it is in the JSON file", type(err).__name__, err)
        return None
    if mode == "online" and trained_by.get("id"):
        _update_training_summary(entity, project, trained_by["id"], metrics)
    return f"wandb sync {sync_dir}" if mode == "offline" else None


def _update_training_summary(entity: str | None, project: str, run_id: str, metrics: dict[str, float]) -> None:
    """Copy evaluation metrics into the training run's summary (online only; a failure only warns)."""
    import wandb

    path = "/".join(filter(None, (entity, project, run_id)))
    try:
        run = wandb.Api().run(path)
        run.summary.update(_json_safe(metrics))
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
    except (wandb.errors.Error, ValueError) as err:
        raise ArtifactError(f"cannot read the W&B run {path}: {err}") from err
    metrics = {k: v for k, v in summary.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    if not metrics:
        raise ArtifactError(f"the W&B run {path} has no eval/* metrics (run `epure evaluate` on its model first)")
    return run.name, metrics
