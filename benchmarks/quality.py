"""What the quality benchmarks share (``toy_benchmark.py``, ``synth_benchmark.py``): the command line, training
for a budget, the evaluation, the k-NN completion reference, the diversity rows and the table.

Imported by the two scripts as a sibling module (``python benchmarks/X.py`` puts this folder first on the path).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from epure.checkpoint import load_model
from epure.config import Config, load_config, parse_overrides
from epure.data import DataBundle, Split, load_data, load_split, resolve_root
from epure.evaluate import EvaluationOptions, evaluate, training_split
from epure.metrics import binarize, iou
from epure.neighbours import knn_completion
from epure.train import train

log = logging.getLogger(__name__)
KNN_REFERENCE = 16  # neighbours averaged by the training-free completion reference
DEFAULT_MINUTES = 40.0


@dataclass
class Row:
    """One table row: our value, the goal (None: none set), and reference columns by name."""

    name: str
    value: float | None
    goal: float | None = None
    lower_is_better: bool = False
    references: dict[str, float | None] = field(default_factory=dict)
    digits: int = 3

    def met(self) -> bool | None:
        if self.goal is None or self.value is None or not np.isfinite(self.value):
            return None
        return self.value <= self.goal if self.lower_is_better else self.value >= self.goal


def arguments(doc: str, config: str, output_dir: str, eval_limit: int) -> argparse.ArgumentParser:
    """The options both benchmarks take."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config, help=f"builtin config name or YAML file (default: {config})")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"training budget, wall clock (default {DEFAULT_MINUTES:g}; with --max-steps or "
                             "--set train.max_steps=N and no --minutes: no time limit)")
    parser.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps (0: no limit)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--run", type=Path, help="evaluate this finished run instead of training")
    parser.add_argument("--eval-limit", type=int, default=eval_limit)
    parser.add_argument("--sample-latents", action="store_true",
                        help="complete from posterior samples instead of posterior means (the default)")
    parser.add_argument("--cross-prior", choices=["prior", "aux", "both"], default="both",
                        help="completion rule(s) to score the trained model with: unobserved private latents "
                             "from p(w) or r(w) (default: both, one column each)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="score masks thresholded here (default: the model's calibrated decision threshold)")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--out", type=Path, default=Path(output_dir) / "results.json")
    return parser


def budget_config(args: argparse.Namespace, fixed: dict | None = None) -> Config:
    """The config to train: ``--config``, then ``fixed`` (the benchmark's data), then ``--set``; a budget of
    ``--minutes`` and/or steps, the cosine schedule (if configured) decaying over it; no W&B."""
    overrides = {**(fixed or {}), **parse_overrides(args.set)}
    steps = args.max_steps or int(overrides.pop("train.max_steps", 0) or 0)
    minutes = args.minutes if args.minutes is not None else (0.0 if steps else DEFAULT_MINUTES)
    return load_config(args.config).updated({
        "train.epochs": 100_000, "train.output_dir": args.output_dir, "wandb.mode": "off", **overrides,
        "train.max_minutes": minutes, "train.max_steps": steps})


@dataclass
class Outcome:
    run_dir: Path
    steps: int | None
    minutes: float | None
    metrics: dict[str, dict[str, float]]  # completion rule (prior | aux) -> the evaluation's flat metrics
    test: Split  # the evaluated test designs
    train: Split  # the benchmark data's whole train split, for the 16-NN reference
    threshold: float  # where the scored masks were thresholded (the model's calibrated one unless --threshold)


def rules(choice: str) -> list[str]:
    """``--cross-prior`` -> the completion rules to score (``both``: the paper's p(w) first, then r(w))."""
    return ["prior", "aux"] if choice == "both" else [choice]


def train_and_evaluate(cfg: Config, data: DataBundle, run: Path | None, eval_limit: int,
                       use_mean: bool, cross_priors: list[str], threshold: float | None = None) -> Outcome:
    """Train ``cfg`` (unless ``run`` names a finished run), then evaluate its last checkpoint on the first
    ``eval_limit`` test designs, diversity included (memorisation against the run's own training designs), once
    per completion rule in ``cross_priors`` (only completions differ between them)."""
    data_cfg = cfg.data
    steps = minutes = None
    if run is None:
        start = time.perf_counter()
        result = train(cfg, data=data)
        run, steps, minutes = result.run_dir, result.step, (time.perf_counter() - start) / 60
    loaded = load_model(run, prefer="last")
    steps = steps if steps is not None else loaded.meta.get("step")
    if loaded.meta.get("data_fingerprint") not in (None, data.fingerprint):
        log.warning("%s was trained on other data than this benchmark's (fingerprint %s, not %s): its "
                    "memorisation is measured against its own training designs, which may hold test designs "
                    "of this benchmark (built-in sets of one seed share their first designs)", run,
                    loaded.meta.get("data_fingerprint"), data.fingerprint)
    test = data.test.subset(np.arange(min(eval_limit, len(data.test))))
    designs = training_split(loaded)
    options = EvaluationOptions(bootstrap=0, use_mean=use_mean, threshold=threshold)
    metrics = {rule: evaluate(loaded, test, dataclasses.replace(options, cross_prior=rule), designs).flat()
               for rule in cross_priors}
    train_split = load_split(resolve_root(data_cfg), "train", data_cfg)
    return Outcome(Path(run), steps, minutes, metrics, test, train_split,
                   loaded.threshold if threshold is None else threshold)


def knn_reference(train_split: Split, test: Split, k: int = KNN_REFERENCE) -> np.ndarray:
    """Mean IoU [M observed, M target] of the k-NN completion (``epure.neighbours.knn_completion``)."""
    m = len(test.components)
    truth = binarize(test.images)
    matrix = np.zeros((m, m))
    for o in range(m):
        made = knn_completion(train_split.images, train_split.conditions, test.images, test.conditions, [o], k)
        matrix[o] = iou(made, truth).mean(axis=0)
    return matrix


def diversity_rows(metrics: dict[str, float], factor: float | None = None) -> list[Row]:
    """Diversity and coverage rows, each with its real-vs-real value; ``factor``: goals of precision, recall,
    density and coverage as that share of the real-vs-real value, and memorisation no higher than the real's."""
    def real(name: str) -> float | None:
        return metrics.get(f"eval/real/{name}")

    rows = []
    for name in ("precision", "recall", "density", "coverage"):
        ceiling = real(name)
        goal = factor * ceiling if factor is not None and ceiling is not None else None
        rows.append(Row(f"unconditional: {name} (k = 5)", metrics.get(f"eval/diversity/{name}"), goal,
                        references={"real vs real": ceiling}))
    rows += [
        Row("unconditional: mean pairwise IoU", metrics.get("eval/diversity/pairwise_iou"),
            references={"real vs real": real("pairwise_iou")}),
        Row("unconditional: nearest training design IoU", metrics.get("eval/diversity/nearest_train_iou"),
            references={"real vs real": real("nearest_train_iou")}),
        Row("unconditional: memorised share (IoU >= 0.95)", metrics.get("eval/diversity/memorised"),
            real("memorised") if factor is not None else None, lower_is_better=True,
            references={"real vs real": real("memorised")}),
        Row("completions: mean pairwise IoU of 8 draws", metrics.get("eval/diversity/completion_iou"),
            references={"real vs real": real("completion_iou")}),
    ]
    return rows


RULE_LABELS = {"prior": "epure, w from p(w)", "aux": "epure, w from r(w)"}


def render(tables: dict[str, list[Row]], columns: list[str], title: str, first: str) -> Table:
    """A rich table: metric, one epure column per completion rule (``tables``: rule -> rows; green when the
    goal is met, red when not), goal, then the reference ``columns`` (goals and references of the first rule's
    rows: they do not depend on the rule)."""
    table = Table(title=title)
    for column in (first, *[RULE_LABELS[r] for r in tables], "goal", *columns):
        table.add_column(column, justify="left" if column == first else "right")

    def cell(value: float | None, digits: int) -> str:
        return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    def ours(row: Row) -> str:
        colour = {True: "green", False: "red", None: "default"}[row.met()]
        return f"[{colour}]{cell(row.value, row.digits)}[/]"

    for row, *others in zip(*tables.values()):
        table.add_row(row.name, *[ours(r) for r in (row, *others)], cell(row.goal, row.digits),
                      *[cell(row.references.get(c), row.digits) for c in columns])
    return table


def title(cfg_name: str, outcome: Outcome, use_mean: bool) -> str:
    """Budget, steps, machine and load, so that a table says how it was measured."""
    budget = f"{outcome.minutes:.1f} min, " if outcome.minutes is not None else ""
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    latents = "posterior means" if use_mean else "posterior samples"
    return (f"{cfg_name}: {budget}{outcome.steps} steps, {gpu}{len(os.sched_getaffinity(0))} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}; completions from {latents}; masks above "
            f"{outcome.threshold:g}; run {outcome.run_dir}")
