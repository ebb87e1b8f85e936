"""Hyperparameter sweeps: W&B's sweep YAML, run by a W&B server or fully offline by W&B's own sweep engine.

    epure sweep sweeps/quick.yaml --data data/synth --offline

A sweep file is W&B's sweep schema (method, metric, parameters, early_terminate, ...), with dotted config keys
(``model.beta``) as parameter names, plus one section of epure's own, ``epure:`` (which base config, how many
validation designs to score, the offline engine's seed). W&B's schema allows no other top-level key, so that
section is taken out before the definition goes to ``wandb.sweep`` or to the engine.

Everything is checked in ``load_sweep``, before any trial trains: the method, the metric, every parameter name
(against the config's keys) and every value a parameter can take (against the config's types and checks).

A trial builds the config from its parameters, trains in-process, and scores the best checkpoint on (up to
``eval_limit`` designs of) the validation split with ``epure.evaluate``; the scores are logged as ``val/...``
to the trial's W&B run (history and summary). With a W&B server (``run_online``), ``wandb.agent`` picks the
parameters; offline (``run_offline``), ``sweeps.next_run`` does, and ``sweeps.stop_runs`` applies early
termination, each trial being an offline W&B run in the sweep's group that ``wandb sync`` uploads later.
A trial that fails is recorded as failed with its error, and the sweep goes on.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import logging
import math
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import jsonschema
import numpy as np
import yaml
from rich.table import Table

from epure.config import Config, ConfigError, dotted_keys, load_config
from epure.data import DataBundle, load_data
from epure.io import atomic_write_text, claim_dir
from epure.tracking import (NullTracker, WandbTracker, agent_params, create_sweep, make_tracker,
                            record_failed_run, resolve_mode, run_agent)
from epure.train import TrainingError, select_device, train

with warnings.catch_warnings():  # sweeps 0.3.0 still uses pydantic v1 names: deprecation warnings, harmless
    warnings.simplefilter("ignore")
    import sweeps
    from sweeps import RunState, SweepRun
    from sweeps.params import HyperParameter

log = logging.getLogger(__name__)

METHODS = ("grid", "random", "bayes")
# What every trial logs (scored on the validation split), so what a sweep may optimise.
METRICS = ("val/cross_iou", "val/self_iou", "val/cross_dice", "val/self_dice", "val/loss")
DEFAULT_METRIC = ("val/cross_iou", "maximize")  # ranks the trials when the file names no metric
EXTENSION = "epure"
DEFAULT_EVAL_LIMIT = 256
TRIALS_CSV = "trials.csv"
_ENGINE_STATES = {"finished": RunState.finished, "failed": RunState.failed, "stopped": RunState.killed,
                  "interrupted": RunState.killed, "running": RunState.running}


class SweepError(ValueError):
    """A sweep that cannot run as written; the message names the file and the key."""


@dataclass
class SweepSpec:
    """A validated sweep file: W&B's definition, and epure's settings for every trial."""

    path: Path
    name: str
    definition: dict[str, Any]  # W&B's sweep config, as sent to wandb.sweep and to the offline engine
    base: Config
    eval_limit: int = DEFAULT_EVAL_LIMIT
    seed: int = 0  # the offline engine's random draws (random and bayes), so an offline sweep repeats

    @property
    def method(self) -> str:
        return self.definition["method"]

    @property
    def metric(self) -> str:
        return self.definition.get("metric", {}).get("name", DEFAULT_METRIC[0])

    @property
    def goal(self) -> str:
        return self.definition.get("metric", {}).get("goal", DEFAULT_METRIC[1])

    @property
    def early_terminate(self) -> bool:
        return "early_terminate" in self.definition

    @property
    def searched(self) -> list[str]:
        """The parameters that vary (constants like ``train.max_steps: {value: 300}`` left out)."""
        return [k for k, v in self.definition["parameters"].items() if "value" not in v]


@dataclass
class Trial:
    """One trial: its parameters, how it ended, and its validation scores."""

    number: int
    params: dict[str, Any]
    status: str = "running"  # finished | failed | stopped (early termination) | interrupted
    metrics: dict[str, float] = field(default_factory=dict)  # the final scores (of the best checkpoint)
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch scores, with early termination
    run_dir: Path | None = None
    wandb_run: str | None = None
    sync_dir: str | None = None  # the offline W&B run's folder, for `wandb sync`
    error: str | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"trial-{self.number}"

    def value(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        return value if value is not None and math.isfinite(value) else None

    def to_sweep_run(self) -> SweepRun:
        """The trial as the offline engine sees a W&B run."""
        return SweepRun(name=self.name, state=_ENGINE_STATES[self.status],
                        config={k: {"value": v} for k, v in self.params.items()},
                        summary_metrics={k: v for k, v in self.metrics.items() if math.isfinite(v)},
                        history=list(self.history))


@dataclass
class SweepOutcome:
    """What a sweep (or this agent's share of it) did, and where it wrote it."""

    spec: SweepSpec
    label: str  # the W&B group of its runs and the name of its folder
    folder: Path
    trials: list[Trial]
    sweep_id: str | None = None

    @property
    def csv_path(self) -> Path:
        return self.folder / TRIALS_CSV

    @property
    def sync_command(self) -> str | None:
        dirs = [t.sync_dir for t in self.trials if t.sync_dir]
        return f"wandb sync {' '.join(dirs)}" if dirs else None


# --------------------------------------------------------------------------------------------- sweep files


def load_sweep(path: str | Path, config: str | Path | None = None,
               overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file; ``config`` (a YAML file or built-in name) replaces ``epure.config``, and
    ``overrides`` (dotted keys, as ``epure sweep --data/--set`` give them) apply to it for every trial."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping (method, metric, parameters, ...)")
    definition = dict(tree)
    extension = definition.pop(EXTENSION, None) or {}
    if not isinstance(extension, dict):
        raise SweepError(f"{path}: '{EXTENSION}' must be a mapping (config, eval_limit, seed)")
    unknown = sorted(set(extension) - {"config", "eval_limit", "seed"})
    if unknown:
        raise SweepError(f"{path}: unknown key '{EXTENSION}.{unknown[0]}'; '{EXTENSION}' takes config, eval_limit "
                         f"and seed")
    for key in ("eval_limit", "seed"):
        value = extension.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                  or (key == "eval_limit" and value == 0)):
            raise SweepError(f"{path}: '{EXTENSION}.{key}' must be a {'positive' if key == 'eval_limit' else 'non-negative'} "
                             f"integer, got {value!r}")

    method = definition.get("method")
    if method not in METHODS:
        raise SweepError(f"{path}: method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_metric(path, definition)
    parameters = definition.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: 'parameters' must map config keys (like model.beta) to W&B parameter specs")
    values = _check_parameters(path, parameters)
    for key in ("program", "command"):
        if key in definition:
            log.warning("%s: '%s' is ignored: epure sweep runs every trial in-process", path, key)
    violations = sweeps.schema_violations_from_proposed_config(definition)
    if violations:
        raise SweepError(f"{path}: not a valid W&B sweep: " + "; ".join(violations))
    if "early_terminate" in definition:
        try:
            sweeps.stop_runs(definition, [])
        except ValueError as err:
            raise SweepError(f"{path}: early_terminate: {err}") from err

    base = _base_config(path, config if config is not None else _beside(path, extension.get("config")),
                        overrides or {}, parameters)
    _check_values(path, values, base)
    return SweepSpec(path, str(definition.get("name") or path.stem), definition, base,
                     extension.get("eval_limit") or DEFAULT_EVAL_LIMIT, extension.get("seed") or 0)


def _base_config(path: Path, source: str | Path | None, overrides: dict[str, Any], parameters: dict) -> Config:
    """The trials' shared config: ``source`` with ``overrides``, none of which the sweep searches."""
    searched = sorted(set(overrides) & set(parameters))
    if searched:
        raise SweepError(f"{path}: {searched[0]} is searched by the sweep: set it in the sweep file's parameters, "
                         "not on the command line")
    try:
        return load_config(source).updated(overrides)
    except ConfigError as err:
        raise SweepError(f"{path}: base config: {err}") from err


def _beside(sweep_file: Path, source: str | Path | None) -> str | Path | None:
    """A relative config path is looked up beside the sweep file first, then from the working directory."""
    if source is None or Path(source).is_absolute():
        return source
    candidate = sweep_file.parent / source
    return candidate if candidate.is_file() else source


def _check_metric(path: Path, definition: dict[str, Any]) -> None:
    metric = definition.get("metric")
    if metric is None:
        if definition["method"] == "bayes" or "early_terminate" in definition:
            raise SweepError(f"{path}: method {definition['method']} and early_terminate need a metric, e.g. "
                             f"metric: {{name: val/cross_iou, goal: maximize}}")
        return
    if not isinstance(metric, dict) or metric.get("name") not in METRICS:
        name = metric.get("name") if isinstance(metric, dict) else metric
        raise SweepError(f"{path}: metric.name must be one of {', '.join(METRICS)} (what every trial logs), "
                         f"got {name!r}")
    if metric.get("goal") not in ("maximize", "minimize"):
        raise SweepError(f"{path}: metric.goal must be maximize or minimize, got {metric.get('goal')!r} "
                         f"(W&B would minimize {metric['name']} when it is left out)")


def _check_parameters(path: Path, parameters: dict[str, Any]) -> dict[str, list[Any]]:
    """Every name is a config key and every spec a W&B parameter; returns the values each can take."""
    valid = dotted_keys()
    candidates: dict[str, list[Any]] = {}
    for key, spec in parameters.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SweepError(f"{path}: unknown parameter '{key}'{hint}; parameters are config keys: "
                             f"{', '.join(valid)}")
        if not isinstance(spec, dict) or "parameters" in spec:
            raise SweepError(f"{path}: parameter '{key}' must be a W&B parameter spec (value, values, min/max, "
                             f"distribution), got {spec!r}")
        try:
            candidates[key] = _possible_values(key, spec)
        except (jsonschema.ValidationError, ValueError) as err:
            raise SweepError(f"{path}: parameter '{key}' is not a valid W&B parameter spec: {spec!r} "
                             f"({str(err).splitlines()[0]})") from err
    return candidates


def _check_values(path: Path, candidates: dict[str, list[Any]], base: Config) -> None:
    """Each value a parameter can take makes a valid config, with the first value of every other parameter
    (so the checks that tie keys together, like latent_dim_u = w + z, see a complete config)."""
    first = {key: values[0] for key, values in candidates.items()}
    for key, values in candidates.items():
        for value in values:
            try:
                trial_config(base, {**first, key: value})
            except ConfigError as err:
                hint = (" (leave model.latent_dim_u out of the sweep: it follows as latent_dim_w + latent_dim_z)"
                        if "latent_dim_u" in str(err) and "model.latent_dim_u" in candidates else "")
                raise SweepError(f"{path}: parameter '{key}' = {value!r}: {err}{hint}") from err


def _possible_values(key: str, spec: dict[str, Any]) -> list[Any]:
    """Every value of a categorical parameter, or the two ends of a distribution (where they are finite)."""
    param = HyperParameter(key, spec)
    if param.type in (param.CATEGORICAL, param.CATEGORICAL_PROB):
        return [plain(v) for v in param.config["values"]]
    if param.type == param.CONSTANT:
        return [plain(param.config["value"])]
    ends = [plain(param.ppf(x)) for x in (0.0, 1.0)]
    return [v for v in ends if not (isinstance(v, float) and not math.isfinite(v))] or [plain(param.ppf(0.5))]


def plain(value: Any) -> Any:
    """numpy scalars (what the engine proposes) as Python values, which the config's type checks accept."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters; ``model.latent_dim_u`` follows the sweep's w and z."""
    overrides = dict(params)
    touched = {"model.latent_dim_w", "model.latent_dim_z"} & set(params)
    if touched and "model.latent_dim_u" not in params:
        w = params.get("model.latent_dim_w", base.model.latent_dim_w)
        z = params.get("model.latent_dim_z", base.model.latent_dim_z)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (w, z)):  # else the type check reports it
            overrides["model.latent_dim_u"] = w + z
    return base.updated(overrides)


# --------------------------------------------------------------------------------------------- running


def run_sweep(spec: SweepSpec, count: int | None = None, mode: str = "auto", project: str | None = None,
              entity: str | None = None, sweep_id: str | None = None) -> SweepOutcome:
    """Run ``count`` trials: with W&B online, as an agent of a new sweep (or of ``sweep_id``); else offline."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError("epure sweep runs one agent per process; to use several GPUs start one agent per GPU "
                         "with --sweep-id (see docs/sweeps.md), not torchrun")
    if count is not None and count <= 0:
        raise SweepError(f"--count must be positive, got {count}")
    if mode not in ("auto", "online", "offline", "off"):
        raise SweepError(f"--wandb must be auto, online, offline or off, got {mode!r}")
    resolved = resolve_mode(mode)
    if resolved == "online":
        return run_online(spec, count, project, entity, sweep_id)
    if sweep_id is not None:
        raise SweepError(f"--sweep-id needs W&B online, but W&B mode is {resolved} "
                         f"(log in with `wandb login`, and leave out --wandb offline / WANDB_MODE=offline)")
    return run_offline(spec, count, resolved, project, entity)


def run_offline(spec: SweepSpec, count: int | None, mode: str = "offline", project: str | None = None,
                entity: str | None = None) -> SweepOutcome:
    """Choose every trial with W&B's open-source engine, here; each trial is an offline W&B run (or none)."""
    cap = spec.definition.get("run_cap")
    limits = [n for n in (count, cap) if n]
    if not limits and spec.method != "grid":
        raise SweepError(f"{spec.path}: a {spec.method} sweep never ends by itself: give --count N (or run_cap)")
    limit = min(limits) if limits else None
    runner = _TrialRunner(spec, mode, f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}", project, entity)
    log.info("offline sweep %s (%s search) in %s", runner.label, spec.method, runner.folder)
    runs: list[SweepRun] = []
    number = 0
    while limit is None or number < limit:
        number += 1
        proposal = _propose(spec, runs, number)
        if proposal is None:
            log.info("the grid is complete after %d trials", number - 1)
            break
        trial = runner.run_trial(number, {k: plain(v["value"]) for k, v in proposal.config.items()}, runs)
        runs.append(trial.to_sweep_run())
        if trial.status == "interrupted":
            log.warning("sweep interrupted; the trials so far are in %s", runner.csv_path)
            break
    return runner.outcome()


def _propose(spec: SweepSpec, runs: list[SweepRun], number: int) -> SweepRun | None:
    """The engine's next trial, or None once a grid is done.

    The engine draws from Python's and numpy's global generators: they are seeded for each trial (and put back
    afterwards), so an offline sweep proposes the same trials every time.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(spec.seed * 1_000_003 + number)
    np.random.seed((spec.seed * 1_000_003 + number) % 2**32)
    try:
        return sweeps.next_run(spec.definition, runs)
    except ValueError as err:
        raise SweepError(f"{spec.path}: the sweep engine cannot propose a trial: {err}") from err
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def run_online(spec: SweepSpec, count: int | None, project: str | None = None, entity: str | None = None,
               sweep_id: str | None = None) -> SweepOutcome:
    """Create the sweep on the W&B server (or join ``sweep_id``) and run an agent in this process.

    Every machine or GPU that runs ``epure sweep FILE --sweep-id ID`` adds one agent to the same sweep.
    A server that cannot create or serve the sweep raises ``TrackingError`` (it names the server and the call).
    """
    project = project or spec.base.wandb.project
    entity = entity or spec.base.wandb.entity
    if sweep_id is None:
        sweep_id = create_sweep(spec.definition, project, entity)
        log.info("more agents join this sweep with: epure sweep %s --sweep-id %s --project %s%s", spec.path,
                 sweep_id, project, f" --entity {entity}" if entity else "")
    runner = _TrialRunner(spec, "online", f"{spec.name}-{sweep_id.split('/')[-1]}", project, entity)
    numbers = itertools.count(1)
    run_agent(sweep_id, lambda: runner.run_trial(next(numbers), agent_params(), []), count, project, entity)
    return runner.outcome(sweep_id)


class _StopTrial(Exception):
    """Raised out of training when the offline engine's early termination stops the trial."""


class _EpochScores:
    """A trial's tracker that also scores each epoch's checkpoint: early termination (hyperband) judges a run
    by the history of the sweep metric, which training itself does not log."""

    def __init__(self, inner: NullTracker | WandbTracker, on_epoch: Callable[[Path, dict[str, Any]], None]):
        self.inner, self.on_epoch = inner, on_epoch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def log_checkpoint(self, checkpoint: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        self.inner.log_checkpoint(checkpoint, aliases, metadata)
        self.on_epoch(checkpoint, metadata)


class _TrialRunner:
    """Runs trials of one sweep in this process, keeps their results and rewrites the CSV after each."""

    def __init__(self, spec: SweepSpec, mode: str, label: str, project: str | None, entity: str | None):
        self.spec, self.mode, self.label = spec, mode, label
        # claimed atomically: a second agent of the same sweep on this machine gets <label>_1, not the same CSV
        self.folder = claim_dir(Path(spec.base.train.output_dir) / "sweeps" / label)
        self.fixed: dict[str, Any] = {"train.output_dir": str(self.folder), "wandb.mode": mode,
                                      "wandb.group": label, "wandb.tags": [*spec.base.wandb.tags, "sweep"],
                                      "wandb.register": None}  # a sweep's best is registered afterwards
        self.fixed.update({k: v for k, v in {"wandb.project": project, "wandb.entity": entity}.items() if v})
        self.trials: list[Trial] = []
        self._data_key: str | None = None
        self._data: DataBundle | None = None

    @property
    def csv_path(self) -> Path:
        return self.folder / TRIALS_CSV

    def outcome(self, sweep_id: str | None = None) -> SweepOutcome:
        return SweepOutcome(self.spec, self.label, self.folder, self.trials, sweep_id)

    def run_trial(self, number: int, params: dict[str, Any], previous: list[SweepRun]) -> Trial:
        """Train and score one trial; whatever goes wrong is recorded on the trial, never raised."""
        trial = Trial(number, params)
        self.trials.append(trial)
        log.info("trial %d: %s", number, ", ".join(f"{k}={v}" for k, v in params.items()))
        begin = time.monotonic()
        tracker: NullTracker | WandbTracker | None = None
        try:
            cfg = trial_config(self.spec.base, params).updated(self.fixed)
            data = self._load_data(cfg)
            tracker = make_tracker(cfg.wandb)
            watched: Any = tracker
            if self.spec.early_terminate:
                watched = _EpochScores(tracker, lambda ckpt, meta: self._epoch(trial, cfg, data, tracker, previous,
                                                                               ckpt, meta))
            result = train(cfg, data=data, tracker=watched)
            trial.run_dir = result.run_dir
            if result.status == "interrupted":
                trial.status = "interrupted"
            else:
                trial.metrics = {**self._score(result.run_dir, cfg, data), "val/loss": result.best_val_loss}
                value = trial.metrics.get(self.spec.metric, math.nan)
                if not math.isfinite(value):
                    raise TrainingError(f"{self.spec.metric} is {value}")
                if not self.spec.early_terminate:  # else the per-epoch scores are the history
                    tracker.log(trial.metrics, result.step)
                trial.status = "finished"
        except _StopTrial:
            trial.status = "stopped"
        except Exception as err:  # any failure of one trial is recorded on it, and the sweep goes on
            if type(err) is Exception and getattr(threading.current_thread(), "_terminated", False):
                trial.status = "stopped"  # wandb.agent stops an in-process run by raising Exception in its thread
            else:
                trial.status, trial.error = "failed", f"{type(err).__name__}: {err}"
                log.warning("trial %d failed: %s", number, trial.error)
        trial.seconds = round(time.monotonic() - begin, 1)
        if trial.run_dir is None and tracker is not None and getattr(tracker, "run_dir", None) is not None:
            trial.run_dir = tracker.run_dir
        self._close(trial, tracker)
        self._write_csv()
        shown = trial.value(self.spec.metric)
        log.info("trial %d %s%s in %.0f s", number, trial.status,
                 f": {self.spec.metric} {shown:.4f}" if shown is not None else "", trial.seconds)
        return trial

    def _load_data(self, cfg: Config) -> DataBundle:
        """The data is loaded once and kept while trials use the same data settings (data.val_seed included)."""
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key != self._data_key or self._data is None:
            self._data, self._data_key = load_data(cfg.data), key
        return self._data

    def _score(self, source: Path, cfg: Config, data: DataBundle) -> dict[str, float]:
        """``epure.evaluate``'s metrics on the validation split (its first ``eval_limit`` designs), as ``val/...``."""
        from epure.checkpoint import load_model
        from epure.evaluate import PREFIX, EvaluationOptions, evaluate

        loaded = load_model(source, select_device(cfg.train.device))
        # no completion diversity: its 8 draws per design would cost more than the rest of the scoring
        options = EvaluationOptions(limit=self.spec.eval_limit, seed=cfg.train.seed, bootstrap=0, draws=0)
        flat = evaluate(loaded, data.val, options).flat()
        return {f"val/{k.removeprefix(PREFIX + '/')}": v for k, v in flat.items()}

    def _epoch(self, trial: Trial, cfg: Config, data: DataBundle, tracker: NullTracker | WandbTracker,
               previous: list[SweepRun], checkpoint: Path, metadata: dict[str, Any]) -> None:
        """Score this epoch, log it, and (offline) ask the engine whether early termination stops the trial."""
        scores = {**self._score(checkpoint, cfg, data), "val/loss": metadata.get("val_loss", math.nan)}
        trial.history.append(scores)
        trial.metrics = scores
        tracker.log(scores, metadata["step"])
        if self.mode != "online":
            running = trial.to_sweep_run()  # state "running": the only runs hyperband stops
            if any(run.name == trial.name for run in sweeps.stop_runs(self.spec.definition, [*previous, running])):
                log.info("trial %d stopped by early termination after %d epochs", trial.number, len(trial.history))
                raise _StopTrial

    def _close(self, trial: Trial, tracker: NullTracker | WandbTracker | None) -> None:
        """Finish the trial's W&B run with its scores and outcome (failed runs with exit code 1)."""
        outcome = {**trial.metrics, "sweep/trial": trial.number, "sweep/status": trial.status,
                   "sweep/error": trial.error}
        exit_code = 1 if trial.status == "failed" else 0
        if isinstance(tracker, WandbTracker) and tracker.run is not None:
            tracker.summary(outcome)
            tracker.finish(exit_code)
            trial.wandb_run, run = tracker.run.id, tracker.run
        elif self.mode != "off":  # it failed before training started its run: record it anyway
            run = self._failure_run(trial, outcome)
            trial.wandb_run = run.id if run is not None else None
        else:
            return
        if self.mode == "offline" and run is not None:
            trial.sync_dir = run.settings.sync_dir

    def _failure_run(self, trial: Trial, outcome: dict[str, Any]) -> Any:
        """A W&B run for a trial that failed before training (e.g. a parameter combination the config rejects):
        the sweep shows it as failed instead of waiting for it."""
        settings = self.spec.base.updated({k: v for k, v in self.fixed.items() if k.startswith("wandb.")}).wandb
        folder = Path(os.environ.get("WANDB_DIR") or self.folder / "mmvaeplus")  # where training puts its runs
        try:
            return record_failed_run(settings, self.mode, folder, trial.params, outcome)
        except Exception as err:  # W&B trouble must not stop the sweep
            log.warning("could not record failed trial %d in W&B (%s: %s)", trial.number, type(err).__name__, err)
            return None

    def _write_csv(self) -> None:
        write_trials_csv(self.csv_path, self.spec, self.trials)


# --------------------------------------------------------------------------------------------- reporting


def ranked(spec: SweepSpec, trials: list[Trial]) -> list[Trial]:
    """Best first by the sweep metric; trials without a score (failed, interrupted) last, in trial order."""
    sign = -1.0 if spec.goal == "maximize" else 1.0
    scored = sorted((t for t in trials if t.value(spec.metric) is not None),
                    key=lambda t: (sign * t.value(spec.metric), t.number))
    return scored + [t for t in trials if t.value(spec.metric) is None]


def _metric_columns(spec: SweepSpec) -> list[str]:
    return [spec.metric] + [m for m in METRICS if m != spec.metric]


def write_trials_csv(path: Path, spec: SweepSpec, trials: list[Trial]) -> None:
    """One row per trial, best first: scores, every parameter, run folder, W&B run id and error."""
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    columns = ["rank", "trial", "status", *_metric_columns(spec), *params, "seconds", "run_dir", "wandb_run",
               "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for rank, t in enumerate(ranked(spec, trials), start=1):
        writer.writerow({"rank": rank, "trial": t.number, "status": t.status,
                         **{m: "" if t.value(m) is None else t.value(m) for m in _metric_columns(spec)},
                         **t.params, "seconds": t.seconds, "run_dir": t.run_dir or "",
                         "wandb_run": t.wandb_run or "", "error": t.error or ""})
    atomic_write_text(path, buffer.getvalue())


def trials_table(outcome: SweepOutcome) -> Table:
    """The trials best first, with the parameters the sweep varies."""
    spec = outcome.spec
    searched = spec.searched or list(spec.definition["parameters"])
    table = Table(title=f"sweep {outcome.label}: {len(outcome.trials)} trials by {spec.metric} ({spec.goal})")
    for column in ("#", "trial", "status", spec.metric, *searched, "run", "error"):
        table.add_column(column, justify="right" if column in ("#", "trial", spec.metric) else "left")
    for rank, t in enumerate(ranked(spec, outcome.trials), start=1):
        value = t.value(spec.metric)
        error = t.error if t.error is None or len(t.error) <= 60 else t.error[:57] + "..."
        table.add_row(str(rank), str(t.number), t.status, "" if value is None else f"{value:.4f}",
                      *[_short(t.params.get(k)) for k in searched], t.wandb_run or (t.run_dir.name if t.run_dir else ""),
                      error or "")
    return table


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
