"""The `epure` command line: a thin layer over library functions that the tests call too.

    epure --help
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from PIL import Image
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typer.core import TyperGroup

from epure.allocator import keep_freed_memory
from epure.config import ConfigError, DataConfig, load_config, parse_overrides
from epure.data import DatasetError
from epure.numerics import flush_denormals_to_zero

console = Console(stderr=True)

# Options that take several values after one flag (`--components group_nc bt`), as the users' argparse tools do.
MULTI_VALUE_OPTIONS = {"--components", "--tags", "--set"}


def expand_multi_value_options(args: list[str]) -> list[str]:
    """Rewrite ``--components a b`` into ``--components a --components b`` so Click can parse it."""
    out: list[str] = []
    current: str | None = None
    for token in args:
        if token.startswith("-"):
            current = token if token in MULTI_VALUE_OPTIONS else None
            out.append(token)
        elif current == "--set" and out[-1] != current and "=" not in token:  # KEY=VALUEs end (at a sweep file)
            current = None
            out.append(token)
        elif current is not None and out and out[-1] != current:
            out += [current, token]
        else:
            out.append(token)
    return out


class EpureGroup(TyperGroup):
    """Typer group that accepts several values after one multi-value flag."""

    def main(self, args=None, *rest, **kwargs):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        return super().main(expand_multi_value_options(args), *rest, **kwargs)


app = typer.Typer(cls=EpureGroup, no_args_is_help=True, add_completion=False,
                  help="MMVAE+ for tire cross-section design: data, train, sample, evaluate, sweep, "
                       "compare, register, report.")
data_app = typer.Typer(no_args_is_help=True, help="Create, validate and look at datasets.")
app.add_typer(data_app, name="data")


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    flush_denormals_to_zero()  # before torch's first parallel operation creates the threads that inherit it
    keep_freed_memory()  # feature maps reuse freed memory instead of faulting fresh pages in (epure/allocator.py)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


# ------------------------------------------------------------------ exit codes: errors and signals, in one place

USER_ERROR_EXIT = 2  # a mistake the message names and the user can fix: no traceback
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


def fail(message: str) -> None:
    """Print a clear error and exit 2: no traceback for mistakes a user can fix."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(USER_ERROR_EXIT)


def signal_exit_code(signal_name: str | None) -> int:
    """The exit code of a run stopped by SIGINT (Ctrl-C) or SIGTERM."""
    return SIGNAL_EXIT_CODES.get(signal_name or "SIGTERM", 143)


def user_error_types() -> tuple[type[Exception], ...]:
    """The library's errors whose messages name their cause and what to change (imported when one is raised:
    the commands import their modules lazily, to start fast)."""
    from epure.checkpoint import CheckpointError
    from epure.evaluate import EvaluationError
    from epure.sample import SamplingError
    from epure.sweep import SweepError
    from epure.tracking import ArtifactError, TrackingError
    from epure.train import TrainingError

    return (ConfigError, DatasetError, CheckpointError, TrainingError, SamplingError, EvaluationError, SweepError,
            ArtifactError, TrackingError)


@contextlib.contextmanager
def reported_errors():
    """Inside: a user error (``user_error_types``) becomes its message and exit 2; anything else (a bug) keeps
    its traceback."""
    try:
        yield
    except Exception as err:
        if isinstance(err, typer.Exit) or not isinstance(err, user_error_types()):
            raise
        fail(str(err))


def _data_config(config: Optional[Path], components: Optional[list[str]], missing: Optional[str] = None) -> DataConfig:
    cfg = load_config(config).data if config else DataConfig()
    if components:
        cfg.components = list(components)
    if missing is not None:
        if missing not in ("error", "allow"):
            raise ConfigError(f"--missing must be error or allow, got {missing!r}")
        cfg.missing = missing
    return cfg


ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file or built-in name.")]
ComponentsOption = Annotated[Optional[list[str]], typer.Option(
    "--components", help="Component names; several may follow one flag: --components group_nc group_km fpu.")]
SampleComponentsOption = Annotated[Optional[list[str]], typer.Option(
    "--components", help="Observed components (several may follow one flag), or 'available': complete each design "
                         "from the components it has.")]
MissingOption = Annotated[Optional[str], typer.Option(
    "--missing", help="error | allow designs that lack some components' PNGs (default: the config's data.missing).")]


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to create (must not exist or be empty).")],
    n: Annotated[int, typer.Option("--n", help="Number of designs.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same dataset.")] = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of designs in the test split.")] = 0.2,
    missing: Annotated[float, typer.Option(
        "--missing", help="Drop each component's PNG with this probability, keeping one random component per design.")] = 0.0,
) -> None:
    """Write the built-in synthetic 5-component tire dataset in the users' folder format."""
    from epure.data.synth import write_synthetic_dataset

    if n < 2:
        fail(f"--n must be at least 2, got {n}")
    if not 0.0 <= missing <= 1.0:
        fail(f"--missing must be a probability in [0, 1], got {missing}")
    try:
        with console.status(f"generating {n} synthetic designs"):
            root = write_synthetic_dataset(out, n=n, seed=seed, test_fraction=test_fraction, missing=missing)
    except FileExistsError as err:
        fail(str(err))
    check = f"epure data check {root}" + (" --missing allow" if missing else "")
    console.print(f"wrote {n} designs to [bold]{root}[/] (check it with: {check})")


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset folder (ROOT/{train,test}/{component}/..., dimensions.csv).")],
    config: ConfigOption = None,
    components: ComponentsOption = None,
    missing: MissingOption = None,
) -> None:
    """Validate a dataset exactly as training loads it and print a summary."""
    from epure.data.check import check_dataset

    with reported_errors():
        cfg = _data_config(config, components, missing)
        summaries = check_dataset(root, cfg)
    out = Console()
    counts = Table(title=f"{root}", show_lines=False)
    counts.add_column("split")
    counts.add_column("designs", justify="right")
    for column in cfg.condition_columns:
        counts.add_column(f"{column} min / mean / max", justify="right")
    for s in summaries:
        counts.add_row(s.split, str(s.count), *[f"{lo:.0f} / {mean:.1f} / {hi:.0f}"
                                                for lo, mean, hi in s.condition_ranges.values()])
    out.print(counts)
    coverage = Table(title="component coverage (share of pixels occupied; share of images non-empty)")
    coverage.add_column("component")
    for s in summaries:
        coverage.add_column(f"{s.split} pixels", justify="right")
        coverage.add_column(f"{s.split} non-empty", justify="right")
    for component in cfg.components:
        coverage.add_row(component, *[v for s in summaries for v in
                                      (f"{s.coverage[component]:.3f}", f"{s.nonempty[component]:.1%}")])
    out.print(coverage)
    availability = Table(title="availability (designs with each component's image; share of the split)")
    availability.add_column("component")
    for s in summaries:
        availability.add_column(s.split, justify="right")
    for component in cfg.components:
        availability.add_row(component, *[f"{s.available[component]} ({s.available[component] / s.count:.1%})"
                                          for s in summaries])
    availability.add_row("complete designs", *[f"{s.complete} ({s.complete / s.count:.1%})" for s in summaries])
    out.print(availability)
    out.print("[green]dataset OK[/]")


@data_app.command("show")
def data_show(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("dataset_grid.png"),
    count: Annotated[int, typer.Option("--count", help="Number of designs (one row each).")] = 8,
    config: ConfigOption = None,
    components: ComponentsOption = None,
    missing: MissingOption = None,
) -> None:
    """Write a grid PNG of random train designs: one row per design, components then a colour composite."""
    from epure.data.check import example_designs
    from epure.viz import design_grid, save_png

    with reported_errors():
        designs, ids = example_designs(root, _data_config(config, components, missing), count)
    save_png(design_grid(designs), out)
    console.print(f"wrote {out} ({len(ids)} designs: {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''})")


SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Set config keys, the dotted keys of config files and sweeps (values as in "
                                       "YAML); several may follow one flag: --set model.beta=0.5 train.lr=3e-4.")]


def _training_config(config: Optional[Path], options: dict, assignments: Optional[list[str]]) -> "Config":
    """The config file (or preset), then ``--set`` assignments, then the named options; validated once."""
    from epure.config import Config  # noqa: F401  (type only)

    cfg = load_config(config)
    options = {key: value for key, value in options.items() if value is not None}
    overrides = parse_overrides(assignments or [])
    for key in overrides.keys() & options.keys():
        raise ConfigError(f"{key} is given twice, by --set and by its own option: give it once")
    return cfg.updated({**overrides, **options})


@app.command("train")
def train_command(
    config: ConfigOption = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Number of epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch_size", "--batch-size", help="Batch size.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset folder (or builtin:synthetic, builtin:toy).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | mps.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Run directory to continue.")] = None,
    allow_data_change: Annotated[bool, typer.Option(
        "--allow-data-change", help="With --resume: go on although the dataset's fingerprint changed (recorded).")] = False,
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", help="Stop after this many minutes.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimiser steps.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Where run directories go.")] = None,
    project: Annotated[Optional[str], typer.Option("--project", help="W&B project.")] = None,
    entity: Annotated[Optional[str], typer.Option("--entity", help="W&B entity (user or team).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="W&B run name (default: the run directory's).")] = None,
    tags: Annotated[Optional[list[str]], typer.Option("--tags", help="W&B tags; several may follow one flag.")] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="W&B run group.")] = None,
    notes: Annotated[Optional[str], typer.Option("--notes", help="W&B run notes.")] = None,
    wandb_mode: Annotated[Optional[str], typer.Option(
        "--wandb", help="auto (online when logged in, else offline) | online | offline | off.")] = None,
    devices: Annotated[int, typer.Option(
        "--devices", help="Train on N local processes (torchrun; gradients averaged over them).")] = 1,
    register: Annotated[Optional[str], typer.Option(
        "--register", help="Link the best model to this W&B Registry collection at the end (W&B online).")] = None,
    assignments: SetOption = None,
) -> None:
    """Train MMVAE+ (with no arguments: the small preset on the built-in synthetic data).

    Exit codes: 0 finished (or stopped by --max-steps/--max-minutes), 2 an error that names its cause,
    130 stopped by SIGINT (Ctrl-C) and 143 by SIGTERM, after a checkpoint that --resume continues from
    (or, while the data loads, before anything was trained).
    """
    if devices > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(devices)
    from epure.tracking import make_tracker

    if allow_data_change and resume is None:
        fail("--allow-data-change only applies with --resume RUN_DIR")
    if resume is not None and config is None and (resume / "config.yaml").is_file():
        config = resume / "config.yaml"  # options not given keep the run's values, not the small preset's
    with reported_errors():
        cfg = _training_config(config, {
            "train.epochs": epochs, "train.batch_size": batch_size, "data.root": data, "train.device": device,
            "train.seed": seed, "train.max_minutes": max_minutes, "train.max_steps": max_steps,
            "train.output_dir": str(output_dir) if output_dir else None, "wandb.project": project,
            "wandb.entity": entity, "wandb.name": name, "wandb.tags": tags, "wandb.group": group,
            "wandb.notes": notes, "wandb.mode": wandb_mode, "wandb.register": register}, assignments)
        if resume is not None and register is None:  # a resumed run registers only when asked again
            cfg = cfg.updated({"wandb.register": None})
        tracker = make_tracker(cfg.wandb)
    result = _run_training(cfg, resume, tracker, allow_data_change)
    if os.environ.get("RANK", "0") == "0":
        _report_training(result)


def _run_training(cfg: "Config", resume: Optional[Path], tracker, allow_data_change: bool):
    """``epure.train.train`` with the W&B run closed whatever happens (marked failed when training failed), and
    the exit code of a signal while the data loads or of a second Ctrl-C."""
    from epure.sample import progress_images
    from epure.train import LoadInterrupted, train

    exit_code = 1
    try:
        with reported_errors():
            result = train(cfg, resume=resume, tracker=tracker, images_fn=_images_fn(progress_images),
                           allow_data_change=allow_data_change)
        exit_code = 0 if result.status != "interrupted" else signal_exit_code(result.signal_name)
        return result
    except LoadInterrupted as stop:  # nothing to save: no step was taken, no run directory made or changed
        exit_code = signal_exit_code(stop.signal_name)
        console.print(f"[bold red]{stop.signal_name} received while loading the data:[/] stopped; nothing was "
                      "trained yet" + (f" and {resume} is unchanged" if resume else " and no run directory was made"),
                      soft_wrap=True)
        raise typer.Exit(exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last checkpoint written is what --resume uses
        exit_code = signal_exit_code("SIGINT")
        tracker.mark_preempting()
        console.print("[bold red]interrupted twice:[/] stopped without a new checkpoint; continue from the "
                      "last one with epure train --resume RUN_DIR")
        raise typer.Exit(exit_code)
    finally:
        tracker.finish(exit_code)
        if tracker.sync_hint:
            console.print(f"W&B run saved offline; upload it when online with: {tracker.sync_hint}", soft_wrap=True)


def _relaunch_with_torchrun(devices: int) -> None:
    """Run this same `epure train` command under torchrun on ``devices`` processes, and exit with its code."""
    from epure.distributed import launch_command

    argv, skip = [], False
    for token in sys.argv[1:]:
        if skip:
            skip = False
        elif token == "--devices":
            skip = True
        elif not token.startswith("--devices="):
            argv.append(token)
    command = launch_command(devices, argv)
    console.print(f"launching {devices} processes: {' '.join(command)}", soft_wrap=True)
    raise typer.Exit(subprocess.run(command).returncode)


def _images_fn(progress_images):
    def make(loaded, data):
        return progress_images(loaded, data.val.images[:8], data.val.conditions[:8])
    return make


def _report_training(result) -> None:
    table = Table(title="training")
    for column in ("run directory", "status", "epochs", "steps", "best val loss", "last val loss"):
        table.add_column(column, overflow="fold")  # a narrow terminal wraps the run directory, never cuts it
    table.add_row(str(result.run_dir), result.status, str(result.epoch), str(result.step),
                  f"{result.best_val_loss:.2f}", f"{result.last_val_loss:.2f}")
    Console().print(table)
    console.print(f"sample from it: epure sample --checkpoint {result.run_dir}")
    if result.status == "interrupted":
        console.print(f"continue it: epure train --resume {result.run_dir}")
        raise typer.Exit(signal_exit_code(result.signal_name))


# ---------------------------------------------------------------- which model: one option group, one resolver

MODEL_PANEL = "Which model"
CheckpointOption = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Run directory or checkpoint file.", rich_help_panel=MODEL_PANEL)]
ArtifactOption = Annotated[Optional[str], typer.Option(
    "--artifact", help="W&B model artifact ENTITY/PROJECT/NAME:ALIAS or NAME:ALIAS (model-1a2b3c4d:best).",
    rich_help_panel=MODEL_PANEL)]
ArtifactProjectOption = Annotated[Optional[str], typer.Option(
    "--project", help="W&B project of a NAME:ALIAS artifact.", rich_help_panel=MODEL_PANEL)]
ArtifactEntityOption = Annotated[Optional[str], typer.Option(
    "--entity", help="W&B entity of a NAME:ALIAS artifact.", rich_help_panel=MODEL_PANEL)]
LatentSamplerOption = Annotated[Optional[str], typer.Option(
    "--latent-sampler", help="prior | fitted: unconditional latents from the priors p(z) p(w) or from the density "
                             "fitted to the training designs' latents (default: the model's model.latent_sampler).")]
CandidatesOption = Annotated[Optional[int], typer.Option(
    "--candidates", help="Each unconditional design the best of N draws: in one piece first (every component "
                         "whole in the training designs too), then nearest the requested width and height "
                         "(default: the model's model.sample_candidates; 1: every draw as it comes).")]


def chosen_model(checkpoint: Optional[Path], artifact: Optional[str], project: Optional[str],
                 entity: Optional[str], device: str) -> tuple["LoadedModel", "str | Path"]:
    """The model the "which model" options name, loaded on ``device``, and its source (the checkpoint, or the
    artifact's full name); raises the library's errors, which ``reported_errors`` reports."""
    from epure import tracking
    from epure.checkpoint import LoadedModel, load_model  # noqa: F401  (LoadedModel: type only)
    from epure.train import select_device

    if (checkpoint is None) == (artifact is None):
        fail("give either --checkpoint RUN_DIR_OR_FILE or --artifact ENTITY/PROJECT/NAME:ALIAS")
    source = tracking.resolve_artifact(artifact, project, entity) if artifact else checkpoint
    return load_model(source, select_device(device)), source


@app.command("sample")
def sample_command(
    checkpoint: CheckpointOption = None,
    artifact: ArtifactOption = None,
    project: ArtifactProjectOption = None,
    entity: ArtifactEntityOption = None,
    mode: Annotated[str, typer.Option("--mode", help="unconditional | inpainting.")] = "unconditional",
    num_samples: Annotated[int, typer.Option("--num_samples", "--num-samples", help="Unconditional samples.")] = 16,
    condition: Annotated[Optional[list[str]], typer.Option(
        "--condition", help="NAME=VALUE: hold a condition column at VALUE for every sample (repeatable); the other "
                            "columns come from the training rows nearest to it.")] = None,
    width: Annotated[Optional[float], typer.Option("--width", help="Short for --condition width_px=VALUE.")] = None,
    height: Annotated[Optional[float], typer.Option("--height", help="Short for --condition height_px=VALUE.")] = None,
    conditions: Annotated[Optional[Path], typer.Option("--conditions", help="CSV: one sample per row, named by its id.")] = None,
    components: SampleComponentsOption = None,
    joint: Annotated[bool, typer.Option("--joint", help="Condition on the named components together.")] = False,
    joint_rule: Annotated[str, typer.Option("--joint-rule", help="mixture | product of the observed posteriors.")] = "mixture",
    mean: Annotated[bool, typer.Option("--mean", help="Use posterior means instead of samples (inpainting).")] = False,
    cross_prior: Annotated[Optional[str], typer.Option(
        "--cross-prior", help="prior | aux: unobserved components' private latents from p(w) or r(w) "
                              "(inpainting; default: the model's model.cross_prior).")] = None,
    latent_sampler: LatentSamplerOption = None,
    candidates: CandidatesOption = None,
    binary: Annotated[bool, typer.Option("--binary", help="Threshold masks at the model's calibrated threshold "
                                                          "(0.5 in models trained before it).")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset to complete (default: the training one).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Complete only the first N test examples.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Output folder (default: a new samples/mmvaeplus/<run>/<timestamp> for every run).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite",
        help="Empty --out's folder of this mode (unconditional, each observed set, or available) first.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Generation batch size.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps.")] = "cpu",
    wandb_mode: Annotated[Optional[str], typer.Option(
        "--wandb", help="auto | online | offline | off (default: log when the model came from W&B or was "
                        "trained with it).")] = None,
) -> None:
    """Generate designs from a trained model: unconditional, or completed from observed components.

    Each folder ends with samples.csv and sample.json (README: Sampling output); --conditions samples.csv redoes it."""
    options = _sample_options(locals())  # every option, for sample.json; first, while locals() holds only them
    from epure import sample as sampling

    with reported_errors():
        loaded, source = chosen_model(checkpoint, artifact, project, entity, device)
        run_name, model = _sample_provenance(loaded, source, artifact)
        destination = sampling.Destination(out, Path("samples") / "mmvaeplus" / run_name, overwrite)
        record = {"model": model, "options": options}
        if mode == "unconditional":
            report = _write_unconditional(loaded, destination, num_samples, condition, width, height, conditions,
                                          latent_sampler, candidates, binary, batch_size, seed, record)
        elif mode == "inpainting":
            report = _write_inpainting(loaded, destination, components, data, limit, joint, joint_rule, mean,
                                       binary, batch_size, seed, cross_prior, record)
        else:
            fail(f"--mode must be unconditional or inpainting, got {mode!r}")
    console.print(f"wrote {report.count} designs under [bold]{report.out_dir}[/] "
                  f"(with {', '.join(str(f / sampling.MANIFEST) for f in report.records)})", soft_wrap=True)
    _log_samples(loaded, report, record, run_name, wandb_mode)


def _sample_options(given: dict) -> dict:
    """``epure sample``'s options, checked, as sample.json records them (paths as text; "which model" is recorded
    apart)."""
    from epure.model.generation import CROSS_PRIORS, LATENT_SAMPLERS

    if given["cross_prior"] not in (None, *CROSS_PRIORS):
        fail(f"--cross-prior must be one of {', '.join(CROSS_PRIORS)}, got {given['cross_prior']!r}")
    if given["latent_sampler"] not in (None, *LATENT_SAMPLERS):
        fail(f"--latent-sampler must be one of {', '.join(LATENT_SAMPLERS)}, got {given['latent_sampler']!r}")
    if given["candidates"] is not None and given["candidates"] < 1:
        fail(f"--candidates must be at least 1 (1: every draw as it comes), got {given['candidates']}")
    if given["wandb_mode"] not in (None, "auto", "online", "offline", "off"):
        fail(f"--wandb must be auto, online, offline or off, got {given['wandb_mode']!r}")
    options = {("wandb" if k == "wandb_mode" else k): (str(v) if isinstance(v, Path) else v) for k, v in given.items()
               if k not in ("checkpoint", "artifact", "project", "entity")}
    return {**options, "condition": options["condition"] or []}


def _sample_provenance(loaded, source, artifact: Optional[str]) -> tuple[str, dict]:
    """(the output folder's run name, the model as sample.json records it); a model from an artifact is named
    after its training run and version, as --checkpoint RUN_DIR names it after the run."""
    from epure import tracking

    model = {"checkpoint": str(Path(loaded.path).resolve()), "artifact": None, "artifact_version": None}
    if not artifact:
        return loaded.run_name, model
    info = tracking.artifact_info(source)
    model.update(artifact=info["qualified_name"], artifact_version=info["version"])
    return f"{Path(info['metadata'].get('run_dir') or info['name']).name}-{info['version']}", model


def _log_samples(loaded, report, record: dict, run_name: str, wandb_mode: Optional[str]) -> None:
    """With W&B on (default: when the model came from W&B or was trained with it), a ``sample`` run logs each
    folder's samples.csv as a table and the folders as a ``samples`` artifact."""
    from epure import sample as sampling
    from epure import tracking

    trained_by = tracking.training_run_info(loaded.path)
    tracking_mode = tracking.resolve_mode(wandb_mode or ("auto" if trained_by else "off"))
    if tracking_mode == "off":
        return
    tables = {f"samples/{folder.name}": sampling.record_table(loaded, folder) for folder in report.records}
    sync_hint = tracking.log_samples(report.records, tables, mode=tracking_mode, config={**record, "run": run_name},
                                     trained_by=trained_by, settings=loaded.config.wandb,
                                     artifact_name=f"samples-{run_name}")
    if sync_hint:
        console.print(f"W&B sampling run saved offline; upload it when online with: {sync_hint}", soft_wrap=True)


def _write_unconditional(loaded, destination, num_samples: int, condition: Optional[list[str]],
                         width: Optional[float], height: Optional[float], conditions: Optional[Path],
                         latent_sampler: Optional[str], candidates: Optional[int], binary: bool, batch_size: int,
                         seed: int, record: dict):
    """``epure sample`` (unconditional): the requested conditions (drawn, held or read from a CSV), then designs."""
    from epure import sample as sampling

    fixed = sampling.fixed_conditions(condition or [], {"width": ("width_px", width), "height": ("height_px", height)})
    raw, ids = sampling.unconditional_requests(loaded, num_samples, fixed, conditions, seed)
    return sampling.write_unconditional(loaded, destination, raw, ids, binary, batch_size, seed, record=record,
                                        sampler=latent_sampler, candidates=candidates)


def _write_inpainting(loaded, destination, components: Optional[list[str]], data: Optional[str],
                      limit: Optional[int], joint: bool, joint_rule: str, mean: bool, binary: bool, batch_size: int,
                      seed: int, cross_prior: Optional[str], record: dict):
    """``epure sample --mode inpainting``: from each named component (or all of them together with --joint),
    or from each design's own components (``--components available``)."""
    from epure import sample as sampling

    if not components:
        fail(f"--mode inpainting needs --components (any of: {', '.join(loaded.components)}, or "
             f"{sampling.AVAILABLE})")
    split = sampling.completion_split(loaded, data, limit)
    if list(components) == [sampling.AVAILABLE]:
        return sampling.write_available_completions(
            loaded, destination, split.images, split.conditions, list(split.ids), split.available, binary,
            joint_rule, mean, batch_size, seed, cross_prior=cross_prior, record=record)
    sets = [list(components)] if joint else [[c] for c in components]
    return sampling.write_completions(loaded, destination, split.images, split.conditions, list(split.ids), sets,
                                      binary, joint_rule, mean, batch_size, seed, cross_prior=cross_prior,
                                      available=split.available, record=record)


@app.command("evaluate")
def evaluate_command(
    checkpoint: CheckpointOption = None,
    artifact: ArtifactOption = None,
    project: ArtifactProjectOption = None,
    entity: ArtifactEntityOption = None,
    wandb_mode: Annotated[Optional[str], typer.Option(
        "--wandb", help="auto | online | offline | off (default: log when the model was trained with W&B).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset to evaluate on (default: the training one's test split).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate only the first N test examples.")] = None,
    subsets: Annotated[bool, typer.Option("--subsets", help="Also condition on every subset of >= 2 components.")] = False,
    joint_rule: Annotated[str, typer.Option("--joint-rule", help="mixture | product, for --subsets.")] = "mixture",
    mean: Annotated[bool, typer.Option("--mean", help="Posterior means instead of samples when completing.")] = False,
    cross_prior: Annotated[Optional[str], typer.Option(
        "--cross-prior", help="prior | aux: score completions with unobserved private latents from p(w) or r(w) "
                              "(default: the model's model.cross_prior).")] = None,
    latent_sampler: LatentSamplerOption = None,
    candidates: CandidatesOption = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Score masks thresholded here (default: the model's calibrated threshold, "
                            "0.5 in models trained before it).")] = None,
    ood: Annotated[bool, typer.Option("--ood", help="Also dimension fidelity just outside the training range.")] = False,
    ood_margin: Annotated[int, typer.Option("--ood-margin", help="How many px beyond the training range, for --ood.")] = 6,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for standard deviations (0: none).")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Generation batch size.")] = 200,
    draws: Annotated[int, typer.Option(
        "--draws", help="Completions per design for the completion diversity (0: not measured).")] = 8,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON file (default <run_dir>/eval/metrics.json).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps.")] = "auto",
) -> None:
    """Evaluate a trained model on a test split: completion IoU/Dice, generated distributions, dimensions,
    diversity and coverage (each beside the real designs' own values)."""
    from epure import evaluate as evaluation
    from epure import tracking
    from epure.sample import completion_split

    options = evaluation.EvaluationOptions(limit=limit, seed=seed, bootstrap=bootstrap, subsets=subsets,
                                           joint=joint_rule, use_mean=mean, cross_prior=cross_prior,
                                           latent_sampler=latent_sampler, candidates=candidates, ood=ood,
                                           ood_margin=ood_margin,
                                           batch_size=batch_size, draws=draws, threshold=threshold)
    with reported_errors():
        options.check()
        loaded, source = chosen_model(checkpoint, artifact, project, entity, device)
        split = completion_split(loaded, data, limit)
        result = evaluation.evaluate(loaded, split, options, train=evaluation.training_split(loaded))
        result.info["data"] = str(data or loaded.config.data.root)
        written = evaluation.write_evaluation(result, loaded, split, out or evaluation.default_output(loaded))
    evaluation.render_tables(result, Console())
    console.print(f"wrote {' and '.join(str(p) for p in written)}")
    trained_by = tracking.training_run_info(loaded.path)
    mode = wandb_mode or ("auto" if trained_by else "off")
    settings = loaded.config.wandb
    config = {**loaded.config.to_dict(), "eval": {**result.info["options"], "data": result.info["data"],
                                                   "checkpoint": str(loaded.path), "trained_by": trained_by.get("id")}}
    images = {f"{evaluation.PREFIX}/{path.stem.rsplit('_', 1)[-1]}": Image.open(path) for path in written[1:]}
    sync_hint = tracking.log_evaluation(result.flat(), evaluation.tracking_tables(result), images, mode=mode,
                                        config=config, trained_by=trained_by, settings=settings)
    if sync_hint:
        console.print(f"W&B evaluation run saved offline; upload it when online with: {sync_hint}", soft_wrap=True)


@app.command("compare")
def compare_command(
    sources: Annotated[list[str], typer.Argument(
        help="Evaluation JSON files, run directories (their eval/metrics.json) or W&B runs ENTITY/PROJECT/RUN_ID.")],
    show_all: Annotated[bool, typer.Option("--all", help="Also every observed -> generated matrix entry.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Also write one PNG: bars of the headline scores, then the sample grids side by side.")] = None,
) -> None:
    """One table of several evaluations, side by side (and with --out, one picture of them)."""
    from epure import evaluate as evaluation
    from epure import tracking
    from epure.viz import save_png

    entries, grids = [], []
    with reported_errors():
        for source in sources:
            is_wandb_run = not Path(source).exists() and source.count("/") == 2 and not source.endswith(".json")
            entries.append(tracking.fetch_run_metrics(source) if is_wandb_run else evaluation.load_evaluation(source))
            path = None if is_wandb_run else evaluation.evaluation_path(source)
            grids.append(path.with_name(f"{path.stem}_samples.png") if path else None)
    Console().print(evaluation.comparison_table(entries, show_all))
    if out is not None:
        save_png(evaluation.comparison_picture(entries, grids), out)
        console.print(f"wrote {out}")


@app.command("register")
def register_command(
    source: Annotated[str, typer.Argument(
        help="Run directory (its best model) or W&B model artifact ENTITY/PROJECT/NAME:ALIAS.")],
    name: Annotated[str, typer.Argument(help="W&B Registry collection (in the model registry, or wandb-registry-R/NAME).")],
    alias: Annotated[Optional[list[str]], typer.Option(
        "--alias", help="Alias of the linked version in the collection, e.g. production (repeatable).")] = None,
) -> None:
    """Link a trained model to a W&B Registry collection (W&B online); sample it with
    epure sample --artifact wandb-registry-model/NAME:ALIAS."""
    from epure import tracking

    with reported_errors():
        target = tracking.register_model(source, name, list(alias or []))
    shown = f"{target}:{alias[0]}" if alias else f"{target}:latest"
    console.print(f"linked {source} to the W&B Registry: {target}; sample it with: epure sample --artifact {shown}",
                  soft_wrap=True)


@app.command("report")
def report_command(
    project: Annotated[str, typer.Option("--project", help="W&B project of the runs.")],
    runs: Annotated[Optional[list[str]], typer.Argument(help="W&B run ids to show (instead of --group or --sweep).")] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="Show the runs of this W&B group.")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Show the trials of this W&B sweep id.")] = None,
    sweep_file: Annotated[Optional[Path], typer.Option(
        "--sweep-file", help="Sweep file whose parameters the parallel-coordinates panel shows (default for "
                             "--sweep: read from W&B).")] = None,
    entity: Annotated[Optional[str], typer.Option("--entity", help="W&B entity (default: yours).")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Report title.")] = None,
) -> None:
    """Build a W&B report (loss curves, score bars, sample grids, sweep parameters) and print its URL."""
    from epure import sweep as sweeping
    from epure import tracking

    with reported_errors():
        owner = tracking.report_entity(entity)
        parameters, metric = None, None
        if sweep_file is not None:
            spec = sweeping.load_sweep(sweep_file)
            parameters, metric = spec.searched or list(spec.definition["parameters"]), spec.metric
        elif sweep:
            parameters, metric = tracking.sweep_parameters(project, owner, sweep)
        report = tracking.build_report(project, owner, group=group, sweep=sweep, runs=runs, parameters=parameters,
                                       metric=metric, title=title)
        url = tracking.save_report(report)
    console.print(f"W&B report: {url}", soft_wrap=True)


@app.command("sweep")
def sweep_command(
    file: Annotated[Path, typer.Argument(help="Sweep file: W&B sweep YAML whose parameters are config keys (sweeps/).")],
    count: Annotated[Optional[int], typer.Option(
        "--count", help="Trials to run (this agent's share when online; offline grids default to the whole grid).")] = None,
    config: ConfigOption = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Dataset folder every trial trains on (or builtin:synthetic, builtin:toy).")] = None,
    assignments: SetOption = None,
    project: Annotated[Optional[str], typer.Option("--project", help="W&B project (default: the config's).")] = None,
    entity: Annotated[Optional[str], typer.Option("--entity", help="W&B entity (user or team).")] = None,
    sweep_id: Annotated[Optional[str], typer.Option(
        "--sweep-id", help="Join this existing W&B sweep as one more agent (one per machine or GPU).")] = None,
    wandb_mode: Annotated[str, typer.Option(
        "--wandb", help="auto (online when logged in, else offline) | online | offline | off.")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Same as --wandb offline.")] = False,
) -> None:
    """Search hyperparameters: as a W&B sweep agent, or offline with W&B's sweep engine; then rank the trials."""
    from epure import sweep as sweeping
    from epure.tracking import TrackingError

    with reported_errors():
        overrides = {**parse_overrides(assignments or []), **({"data.root": data} if data else {})}
        spec = sweeping.load_sweep(file, config, overrides)
        try:
            outcome = sweeping.run_sweep(spec, count, "offline" if offline else wandb_mode, project, entity, sweep_id)
        except TrackingError as err:
            raise TrackingError(f"{err}. Without a W&B sweep server, W&B's engine runs the same search here: "
                                f"epure sweep {file} --offline") from err
    Console().print(sweeping.trials_table(outcome))
    console.print(f"trials, best first: {outcome.csv_path}", soft_wrap=True)
    if outcome.sync_command:
        console.print(f"W&B runs saved offline; upload them when online with: {outcome.sync_command}", soft_wrap=True)
