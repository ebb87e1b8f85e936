"""Evaluating a trained model on a test split: how well it completes, generates and follows the dimensions.

    epure evaluate --checkpoint outputs/mmvaeplus/<run> --limit 200

Three families of metrics (defined in ``docs/metrics.md``), all under stable flat names (``eval/...``) so that
runs compare and log the same way:

- component-conditioned generation: IoU and Dice of every component generated from each observed one (or set);
- unconditional generation with the test conditions: distances between generated and real distributions
  of overlaps, centres of mass and piece counts, with bootstrap standard deviations;
- dimension fidelity: width and height of the generated section against the requested ones;
- diversity and coverage: k-NN precision, recall, density and coverage of the unconditional designs, how alike
  they are, how close to the training designs, and how varied several completions of one design are, each
  beside the same measured on a second real sample (the ceiling a perfect model would reach).

On incomplete data (designs that lack some components) a completion is scored only against targets that
exist, from observed components the design has, and ``scored`` counts the designs behind each entry; the
distribution and dimension metrics use the complete designs.

Generation runs in batches without autograd, and every metric is one vectorised pass over a batch, so the
time goes into the model's forward passes: M encoder and M^2 + M decoder passes per test example.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from epure.checkpoint import LoadedModel
from epure.data import ConditionNormalizer, DatasetError, Split, load_split, resolve_root
from epure.data.dimensions import achievable_dimensions, measure_dimensions
from epure.io import atomic_write_json
from epure.metrics import (binarize, bootstrap_std, centre_of_mass, component_descriptors, design_masks, dice, holes,
                           iou, manifold_scores, mean_pairwise_iou, mean_pairwise_iou_within, nearest_iou, piece_counts,
                           standardise, wasserstein)
from epure.model.generation import CROSS_PRIORS, JOINT_RULES, LATENT_SAMPLERS
from epure.neighbours import nearest_designs
from epure.sample import complete, cross_matrix_image, generate, latent_sampler, sample_candidates
from epure.viz import composite, grid, save_png

log = logging.getLogger(__name__)

JSON_FORMAT = 1
PREFIX = "eval"
# Condition columns that measure_dimensions measures, in its output order, with their short metric names.
DIMENSIONS = {"width_px": "width", "height_px": "height"}
RATES = ("union_one_piece", "all_one_piece", "union_solid")  # shares of designs; every other metric is a distance
KNN = 5  # k of the k-NN manifolds, as Kynkaanniemi et al. (2019) and Naeem et al. (2020) recommend
MEMORISED_IOU = 0.95  # a design this close to a training design counts as a copy of it


class EvaluationError(ValueError):
    """An evaluation that cannot run or be read; the message says what to change."""


@dataclass
class EvaluationOptions:
    """What to evaluate and on how much data."""

    limit: int | None = None  # the first N examples of the split; None: all
    seed: int = 0
    bootstrap: int = 200  # resamples for the standard deviations; 0 turns them off
    subsets: bool = False  # also condition on every observed subset of size >= 2
    joint: str = "mixture"  # how a subset's posteriors combine (mixture | product)
    use_mean: bool = False  # posterior means instead of samples when completing
    cross_prior: str | None = None  # unobserved private latents from p(w) (prior) or r(w) (aux); None: the model's
    latent_sampler: str | None = None  # unconditional latents from the priors (prior) or the fitted prior (fitted)
    candidates: int | None = None  # each unconditional design the best of this many draws; None: the model's
    threshold: float | None = None  # probabilities above it are occupied; None: the model's calibrated threshold
    ood: bool = False  # also measure dimension fidelity just outside the training range
    ood_margin: int = 6  # how many px beyond the training range the out-of-range requests go
    batch_size: int = 200  # larger batches measured no faster on CPU: their big buffers cost page faults
    draws: int = 8  # completions per design for the completion diversity (0: not measured)
    diversity_designs: int = 100  # the first N designs get ``draws`` completions from each observed component

    def check(self) -> None:
        """Reject settings that would fail late or silently mean nothing."""
        if self.limit is not None and self.limit <= 0:
            raise EvaluationError(f"--limit must be positive, got {self.limit}")
        if self.bootstrap < 0:
            raise EvaluationError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.joint not in JOINT_RULES:
            raise EvaluationError(f"--joint-rule must be one of {', '.join(JOINT_RULES)}, got {self.joint!r}")
        if self.cross_prior not in (None, *CROSS_PRIORS):
            raise EvaluationError(f"--cross-prior must be one of {', '.join(CROSS_PRIORS)}, got {self.cross_prior!r}")
        if self.latent_sampler not in (None, *LATENT_SAMPLERS):
            raise EvaluationError(f"--latent-sampler must be one of {', '.join(LATENT_SAMPLERS)}, "
                                  f"got {self.latent_sampler!r}")
        if self.candidates is not None and self.candidates < 1:
            raise EvaluationError(f"--candidates must be at least 1 (1: every draw as it comes), got {self.candidates}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise EvaluationError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.ood_margin <= 0:
            raise EvaluationError(f"--ood-margin must be positive, got {self.ood_margin}")
        if self.batch_size <= 0:
            raise EvaluationError(f"--batch-size must be positive, got {self.batch_size}")
        if self.draws < 0 or self.draws == 1:
            raise EvaluationError(f"--draws must be 0 (off) or at least 2 completions to compare, got {self.draws}")
        if self.diversity_designs <= 0:
            raise EvaluationError(f"diversity_designs must be positive, got {self.diversity_designs}")


@dataclass
class EvaluationResult:
    """Every number of one evaluation; ``flat()`` names them, ``to_json()`` stores them."""

    components: list[str]
    observed: list[str]  # matrix rows: single components first, then subsets joined by "+"
    iou: np.ndarray  # [len(observed), M] mean IoU, rows observed, columns generated
    dice: np.ndarray  # same shape, mean Dice
    uncond: dict[str, float]  # generated vs real, e.g. "w_com_y/fpu", "union_one_piece"
    uncond_std: dict[str, float]  # bootstrap standard deviations of ``uncond``
    real: dict[str, float]  # the real data's piece rates and dimension errors, for reference
    dims: dict[str, float]  # e.g. "width_mae" on the test conditions
    dims_ood: dict[str, float] = field(default_factory=dict)  # the same, just outside the training range
    diversity: dict[str, float] = field(default_factory=dict)  # precision, recall, ...; real vs real in ``real``
    info: dict[str, Any] = field(default_factory=dict)  # run, data, options, timings
    scored: np.ndarray | None = None  # [len(observed), M] designs scored per entry (all, on complete data)

    def headline(self) -> dict[str, float]:
        """Cross (observed != generated) and self (reconstruction) means over single observed components
        (over the entries that scored at least one design)."""
        m = len(self.components)
        off = ~np.eye(m, dtype=bool)
        singles_iou, singles_dice = self.iou[:m], self.dice[:m]
        return {"cross_iou": _mean(singles_iou[off]), "self_iou": _mean(np.diag(singles_iou)),
                "cross_dice": _mean(singles_dice[off]), "self_dice": _mean(np.diag(singles_dice))}

    def flat(self) -> dict[str, float]:
        """All metrics under their stable names, ready for a tracker."""
        out = {f"{PREFIX}/{k}": v for k, v in self.headline().items()}
        for r, label in enumerate(self.observed):
            for t, target in enumerate(self.components):
                out[f"{PREFIX}/cross_iou/{label}->{target}"] = float(self.iou[r, t])
                out[f"{PREFIX}/dice/{label}->{target}"] = float(self.dice[r, t])
                if self.scored is not None:
                    out[f"{PREFIX}/scored/{label}->{target}"] = float(self.scored[r, t])
        for group, values in [("uncond", self.uncond), ("uncond_std", self.uncond_std), ("real", self.real),
                              ("dims", self.dims), ("dims_ood", self.dims_ood), ("diversity", self.diversity)]:
            out.update({f"{PREFIX}/{group}/{k}": float(v) for k, v in values.items()})
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN, an undefined metric, becomes null)."""
        return {"format": JSON_FORMAT, "run": self.info.get("run"), "components": self.components,
                "observed": self.observed, "iou": _nan_to_none(self.iou.tolist()),
                "dice": _nan_to_none(self.dice.tolist()),
                "scored": None if self.scored is None else self.scored.tolist(),
                "metrics": _nan_to_none(self.flat()), "info": self.info}


def _mean(values: np.ndarray) -> float:
    """Mean of the defined values; NaN when none is."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --------------------------------------------------------------------------------------------- evaluation


def evaluate(loaded: LoadedModel, split: Split, options: EvaluationOptions | None = None,
             train: Split | None = None) -> EvaluationResult:
    """Evaluate ``loaded`` on ``split`` (whose components must be the model's).

    ``train``: the model's training designs, for the memorisation shares and the real spread of completions
    (left out when None).
    """
    options = options or EvaluationOptions()
    options.check()
    options = dataclasses.replace(options, latent_sampler=latent_sampler(loaded, options.latent_sampler),
                                  candidates=sample_candidates(loaded, options.candidates),
                                  threshold=mask_threshold(loaded, options))
    if list(split.components) != list(loaded.components):
        raise EvaluationError(f"the data's components {split.components} are not the model's {loaded.components}")
    if options.limit:
        split = split.subset(np.arange(min(options.limit, len(split))))
    if train is not None and not train.complete.all():  # novelty is measured against whole training designs
        train = train.subset(np.flatnonzero(train.complete))
    begin = clock = time.perf_counter()
    fast = _inference_copy(loaded)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        observed_sets = observed_subsets(len(loaded.components), options.subsets)
        iou_matrix, dice_matrix, scored = conditioned_scores(fast, split, observed_sets, options)
        timings["conditioned"] = time.perf_counter() - clock
        log.info("component-conditioned generation: %d observed set(s) x %d examples in %.1f s",
                 len(observed_sets), len(split), timings["conditioned"])

        whole = split.complete
        if not whole.all():
            log.info("%d of %d designs lack some component(s): completions are scored on the targets that exist "
                     "(counts in 'scored'); distribution and dimension metrics use the %d complete designs",
                     int((~whole).sum()), len(split), int(whole.sum()))
        uncond, uncond_std, real, dims, diversity = whole_design_scores(fast, split.subset(np.flatnonzero(whole)),
                                                                        train, options, timings)
        dims_ood, ood_values = ood_scores(fast, split, options, timings) if options.ood else ({}, {})
    timings["total"] = time.perf_counter() - begin
    info = {"run": loaded.run_name, "checkpoint": str(loaded.path), "step": loaded.meta.get("step"),
            "epoch": loaded.meta.get("epoch"), "examples": len(whole), "complete_examples": int(whole.sum()),
            "data_fingerprint": split.fingerprint, "train_designs": len(train) if train is not None else None,
            "options": dataclasses.asdict(options), "ood_values": ood_values,
            "cross_prior": options.cross_prior or loaded.config.model.cross_prior,
            "latent_sampler": options.latent_sampler, "candidates": options.candidates,
            "exclusive_components": loaded.exclusive_components, "whole_components": loaded.whole_components,
            "seconds": {k: round(v, 3) for k, v in timings.items()}}
    labels = ["+".join(loaded.components[i] for i in s) for s in observed_sets]
    return EvaluationResult(list(loaded.components), labels, iou_matrix, dice_matrix, uncond, uncond_std, real,
                            dims, dims_ood, diversity, info, scored)


def whole_design_scores(fast: LoadedModel, truth: Split, train: Split | None, options: EvaluationOptions,
                        timings: dict[str, float]) -> tuple[dict, dict, dict, dict, dict]:
    """Unconditional generation against the complete designs ``truth``: distribution, dimension and diversity
    scores (uncond, uncond_std, real, dims, diversity); all empty when no design is complete."""
    if not len(truth):
        log.warning("no design of the data has every component: no generated design is compared with a real "
                    "one (distribution and dimension metrics left out)")
        return {}, {}, {}, {}, {}
    clock = time.perf_counter()
    generated = _generate(fast, truth.conditions, options)
    timings["unconditional"] = time.perf_counter() - clock
    clock = time.perf_counter()
    uncond, uncond_std, real = distribution_scores(generated, binarize(truth.images), fast.components,
                                                   options.bootstrap, options.seed)
    dims = dimension_errors(generated, truth.conditions, truth.condition_columns)
    real.update(dimension_errors(binarize(truth.images), truth.conditions, truth.condition_columns))
    timings["distribution_metrics"] = time.perf_counter() - clock
    log.info("unconditional generation %.1f s, its metrics %.1f s", timings["unconditional"],
             timings["distribution_metrics"])
    clock = time.perf_counter()  # diversity, like the distribution metrics, on the complete designs
    train_masks = binarize(train.images) if train is not None else None
    diversity, real_diversity = diversity_scores(generated, binarize(truth.images), train_masks, options.seed)
    spread, real_spread = completion_diversity(fast, truth, train, options)
    diversity.update(spread)
    real.update(real_diversity)
    real.update(real_spread)
    timings["diversity"] = time.perf_counter() - clock
    log.info("diversity metrics %.1f s", timings["diversity"])
    return uncond, uncond_std, real, dims, diversity


def ood_scores(fast: LoadedModel, split: Split, options: EvaluationOptions,
               timings: dict[str, float]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Dimension errors of designs requested just outside the training range, and the values requested."""
    clock = time.perf_counter()
    dims_ood: dict[str, float] = {}
    ood_values: dict[str, list[float]] = {}
    requests = ood_conditions(fast.normalizer, split.conditions, fast.config.data.image_size, options.ood_margin)
    for column, raw in requests.items():
        ood_values[column] = sorted(set(raw[:, split.condition_columns.index(column)].tolist()))
        errors = dimension_errors(_generate(fast, raw, options), raw, split.condition_columns)
        dims_ood[f"{DIMENSIONS[column]}_mae"] = errors[f"{DIMENSIONS[column]}_mae"]
    timings["ood"] = time.perf_counter() - clock
    return dims_ood, ood_values


def _inference_copy(loaded: LoadedModel) -> LoadedModel:
    """A copy of the model for inference; on the CPU in channels-last layout, where oneDNN convolutions
    run about 1.4x faster (measured on the toy decoder), without touching the caller's model."""
    device = next(loaded.model.parameters()).device
    if device.type != "cpu":
        return loaded
    model = copy.deepcopy(loaded.model).to(memory_format=torch.channels_last).eval()
    return dataclasses.replace(loaded, model=model)


def observed_subsets(m: int, subsets: bool) -> list[tuple[int, ...]]:
    """Each single component, then (with ``subsets``) every subset of size >= 2, smaller ones first."""
    sets = [(i,) for i in range(m)]
    if subsets:
        sets += [s for size in range(2, m + 1) for s in combinations(range(m), size)]
    return sets


def mask_threshold(loaded: LoadedModel, options: EvaluationOptions) -> float:
    """Where generated probabilities become masks: ``options.threshold``, else the model's calibrated one."""
    return loaded.threshold if options.threshold is None else options.threshold


def conditioned_scores(loaded: LoadedModel, split: Split, observed_sets: list[tuple[int, ...]],
                       options: EvaluationOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean IoU and Dice [len(observed_sets), M] of every component generated from each observed set, and the
    number of designs behind each mean: those that have the observed components and the target (NaN: none)."""
    bs = options.batch_size
    iou_sum = np.zeros((len(observed_sets), len(loaded.components)))
    dice_sum = np.zeros_like(iou_sum)
    scored = np.zeros(iou_sum.shape, dtype=np.int64)
    for r, observed in enumerate(observed_sets):
        rows = np.flatnonzero(split.available[:, list(observed)].all(axis=1))
        targets = split.available[rows]  # [n, M]: which generated components have a truth to be scored against
        scored[r] = targets.sum(axis=0)
        truth = binarize(split.images[rows])
        batches = complete(loaded, split.images[rows], split.conditions[rows], list(observed), options.joint,
                           options.use_mean, bs, options.seed, options.cross_prior) if len(rows) else []
        for start, probs in zip(range(0, len(rows), bs), batches):
            made, real = binarize(probs, mask_threshold(loaded, options)), truth[start: start + len(probs)]
            there = targets[start: start + len(probs)]
            iou_sum[r] += np.where(there, iou(made, real), 0).sum(axis=0)
            dice_sum[r] += np.where(there, dice(made, real), 0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return iou_sum / scored, dice_sum / scored, scored


def _generate(loaded: LoadedModel, raw_conditions: np.ndarray, options: EvaluationOptions) -> np.ndarray:
    """One unconditional design per row of conditions, thresholded as a whole design (metrics.design_masks)
    -> bool [N, M, H, W]."""
    threshold = mask_threshold(loaded, options)
    batches = generate(loaded, raw_conditions, options.batch_size, options.seed, options.latent_sampler,
                       options.candidates, threshold)
    return np.concatenate([design_masks(b, loaded.exclusive_components, threshold) for b in batches])


def design_features(masks: np.ndarray, components: list[str]) -> dict[str, np.ndarray]:
    """Per-design quantities whose distributions are compared: overlaps, centres of mass, piece counts, holes."""
    features = {}
    for a, b in combinations(range(len(components)), 2):
        features[f"overlap_iou/{components[a]}+{components[b]}"] = iou(masks[:, a], masks[:, b], empty=0.0)
    com = centre_of_mass(masks)  # [N, M, 2]
    for i, c in enumerate(components):
        features[f"com_y/{c}"] = com[:, i, 0]
        features[f"com_x/{c}"] = com[:, i, 1]
    features["union_pieces"] = piece_counts(masks.any(axis=1))
    pieces = np.stack([piece_counts(masks[:, i]) for i in range(len(components))], axis=1)
    features["union_one_piece"] = features["union_pieces"] == 1
    features["all_one_piece"] = (pieces == 1).all(axis=1)
    features["union_solid"] = ~holes(masks.any(axis=1)).any(axis=(1, 2))
    return features


def distribution_scores(generated: np.ndarray, real: np.ndarray, components: list[str], n_boot: int,
                        seed: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(metrics, bootstrap stds, real rates) for paired generated and real designs, both bool [N, M, H, W].

    Distances are 1-D Wasserstein between the per-design features; rates are shares of designs.
    """
    made, truth = design_features(generated, components), design_features(real, components)
    statistics = {}
    for name in made:
        if name in RATES:
            statistics[name] = lambda idx, name=name: float(made[name][idx].mean())
        else:
            statistics[f"w_{name}"] = lambda idx, name=name: wasserstein(made[name][idx], truth[name][idx])
    everything = np.arange(len(generated))
    metrics = {name: stat(everything) for name, stat in statistics.items()}
    stds = {name: bootstrap_std(stat, len(generated), n_boot, seed) for name, stat in statistics.items()} \
        if n_boot else {}
    return metrics, stds, {name: float(truth[name].mean()) for name in RATES}


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, equally large random halves (reference, query) of ``n`` examples, each sorted."""
    order = np.random.default_rng([seed, 2]).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2: 2 * (n // 2)])


def diversity_scores(generated: np.ndarray, real: np.ndarray, train: np.ndarray | None,
                     seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """(model, real vs real) diversity metrics of bool designs [N, M, H, W]; generated[i] has real[i]'s conditions.

    The test designs split into a reference half and a query half. The model's designs drawn with the query
    half's conditions and the query half's real designs are each measured against the reference half, so the
    real values are what a perfect model would score. ``train`` (bool designs) adds the memorisation shares.
    """
    reference, query = halves(len(real), seed)
    model: dict[str, float] = {}
    ceiling: dict[str, float] = {}
    if len(reference) > KNN:
        ref, fake, again = standardise(*(component_descriptors(d) for d in (real[reference], generated[query],
                                                                             real[query])))
        model.update(manifold_scores(ref, fake, KNN))
        ceiling.update(manifold_scores(ref, again, KNN))
    else:
        log.warning("precision, recall, density and coverage need more than %d designs in each half of the test "
                    "designs, got %d: not measured", KNN, len(reference))
        for out in (model, ceiling):
            out.update(dict.fromkeys(("precision", "recall", "density", "coverage"), float("nan")))
    model["pairwise_iou"] = mean_pairwise_iou(generated[query])
    ceiling["pairwise_iou"] = mean_pairwise_iou(real[query])
    if train is not None:
        for out, designs in ((model, generated[query]), (ceiling, real[query])):
            nearest = nearest_iou(designs, train)
            out["nearest_train_iou"] = float(nearest.mean()) if len(nearest) else float("nan")
            out["memorised"] = float((nearest >= MEMORISED_IOU).mean()) if len(nearest) else float("nan")
    return model, ceiling


def completion_diversity(loaded: LoadedModel, split: Split, train: Split | None,
                         options: EvaluationOptions) -> tuple[dict[str, float], dict[str, float]]:
    """(model, real) mean pairwise IoU among ``options.draws`` completions of the unobserved components of
    each of the first ``options.diversity_designs`` designs, per observed component and their mean.

    The real counterpart: the unobserved components of the ``draws`` training designs nearest to the design
    in the observed component and the conditions, the spread of real designs that look alike there.
    """
    if options.draws < 2:
        return {}, {}
    count, draws, m = min(options.diversity_designs, len(split)), options.draws, len(loaded.components)
    images, conditions = split.images[:count], split.conditions[:count]
    repeated, repeated_c = np.repeat(images, draws, axis=0), np.repeat(conditions, draws, axis=0)
    model: dict[str, float] = {}
    real: dict[str, float] = {}
    for o, name in enumerate(loaded.components):
        others = [t for t in range(m) if t != o]
        made = np.concatenate([binarize(b, mask_threshold(loaded, options))[:, others] for b in complete(
            loaded, repeated, repeated_c, [o], options.joint, options.use_mean, options.batch_size, options.seed,
            options.cross_prior)])
        model[f"completion_iou/{name}"] = mean_pairwise_iou_within(made.reshape(count, draws, *made.shape[1:]))
        if train is not None and len(train) >= draws:
            index = nearest_designs(train.images, train.conditions, images, conditions, [o], draws)
            real[f"completion_iou/{name}"] = mean_pairwise_iou_within(binarize(train.images[index][:, :, others]))
    for out in (model, real):
        if out:
            out["completion_iou"] = float(np.mean(list(out.values())))
    return model, real


def training_split(loaded: LoadedModel) -> Split | None:
    """The model's training designs (its data's whole train split), or None with a warning when they
    cannot be loaded: memorisation is then left out, the rest of the evaluation goes on."""
    cfg = loaded.config.data
    try:
        return load_split(resolve_root(cfg), "train", cfg)
    except (DatasetError, OSError) as err:
        log.warning("the training designs cannot be loaded (%s): the memorisation shares and the real spread of "
                    "completions are left out", err)
        return None


def dimension_errors(generated: np.ndarray, raw_conditions: np.ndarray, columns: list[str]) -> dict[str, float]:
    """Mean absolute error (px) between the measured width/height of each generated section and the request."""
    measured = dict(zip(DIMENSIONS, measure_dimensions(generated.any(axis=1))))
    return {f"{short}_mae": float(np.abs(measured[column] - raw_conditions[:, columns.index(column)]).mean())
            for column, short in DIMENSIONS.items() if column in columns}


def ood_conditions(normalizer: ConditionNormalizer, raw_conditions: np.ndarray, image_size,
                   margin: int) -> dict[str, np.ndarray]:
    """Per dimension column: the conditions with that column moved just outside the training range.

    The new values are those a section can measure within ``margin`` px below the lowest or above the highest
    training value; they are cycled over the examples, the other columns keep their test values. A column whose
    range leaves no such value (e.g. widths already reaching the image edge on both sides) is left out.
    """
    requests = {}
    for column, values in achievable_dimensions(image_size).items():
        if column not in normalizer.columns:
            continue
        i = normalizer.columns.index(column)
        low, high = normalizer.low[i], normalizer.high[i]
        chosen = values[((values >= low - margin) & (values < low)) | ((values > high) & (values <= high + margin))]
        if len(chosen) == 0:
            log.warning("no %s fits in the image within %d px outside the training range [%g, %g]; skipped",
                        column, margin, low, high)
            continue
        raw = np.array(raw_conditions, dtype=np.float32, copy=True)
        raw[:, i] = chosen[np.arange(len(raw)) % len(chosen)]
        requests[column] = raw
    return requests


# ------------------------------------------------------------------------------------------------ outputs


def default_output(loaded: LoadedModel) -> Path:
    """``<run_dir>/eval/metrics.json`` for a run checkpoint, else ``eval/metrics.json`` beside the file."""
    path = Path(loaded.path)
    base = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return base / "eval" / "metrics.json"


def write_evaluation(result: EvaluationResult, loaded: LoadedModel, split: Split, out: Path) -> list[Path]:
    """The JSON file and, beside it, two pictures: completions (rows: truth, then each observed component)
    and unconditional samples drawn with the first test conditions, each beside the real design."""
    out = Path(out)
    seed = result.info["options"]["seed"]
    atomic_write_json(out, result.to_json())
    completions = out.with_name(f"{out.stem}_completions.png")
    save_png(cross_matrix_image(loaded, split.images, split.conditions, seed, result.info["cross_prior"]), completions)
    samples = out.with_name(f"{out.stem}_samples.png")
    count = min(8, len(split))
    with torch.inference_mode():
        threshold = result.info["options"]["threshold"]
        (made,) = generate(loaded, split.conditions[:count], batch_size=count, seed=seed,
                           sampler=result.info.get("latent_sampler"), candidates=result.info.get("candidates"),
                           threshold=threshold)
    masks = design_masks(made, loaded.exclusive_components, threshold)  # as scored
    save_png(grid([[composite(split.images[i]), *made[i], composite(masks[i])] for i in range(count)]),
             samples)
    return [out, completions, samples]


def tracking_tables(result: EvaluationResult) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The observed x generated matrices as (columns, rows), for W&B tables, and the same numbers in long form
    (``eval/completion``: one row per observed set and generated component), which W&B's table panel stacks
    across runs, so several runs compare in one panel."""
    columns = ["observed", *result.components]
    tables = {f"{PREFIX}/{name}_matrix": (columns, [[label, *map(float, matrix[r])]
                                                    for r, label in enumerate(result.observed)])
              for name, matrix in (("iou", result.iou), ("dice", result.dice))}
    tables[f"{PREFIX}/completion"] = (
        ["run", "observed", "generated", "iou", "dice"],
        [[result.info.get("run"), label, target, float(result.iou[r, t]), float(result.dice[r, t])]
         for r, label in enumerate(result.observed) for t, target in enumerate(result.components)])
    return tables


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _best_of(candidates: int | None) -> str:
    return f", each design the best of {candidates} draws" if candidates and candidates > 1 else ""


def render_tables(result: EvaluationResult, console: Console) -> None:
    """The observed x generated matrix and a headline table of every other metric."""
    rule = {"prior": "p(w)", "aux": "r(w)"}.get(result.info.get("cross_prior"), "?")
    counts = result.scored is not None and (result.scored != result.info.get("examples")).any()
    matrix = Table(title=f"component-conditioned generation: IoU (Dice); rows observed, columns generated; "
                         f"unobserved private latents from {rule}"
                         + ("; n: designs scored (those with the observed and the generated component)" if counts
                            else ""))
    matrix.add_column("observed")
    for target in result.components:
        matrix.add_column(target, justify="right")
    for r, label in enumerate(result.observed):
        cells = []
        for t, target in enumerate(result.components):
            cell = f"{_fmt(result.iou[r, t])} ({_fmt(result.dice[r, t])})"
            if counts:
                cell += f" n={result.scored[r, t]}"
            cells.append(f"[bold]{cell}[/]" if label == target else cell)
        matrix.add_row(label, *cells)
    console.print(matrix)

    n = result.info.get("examples")
    sampler = {"prior": "the priors p(z) p(w)", "fitted": "the fitted prior"}.get(result.info.get("latent_sampler"), "?")
    table = Table(title=f"evaluation of {result.info.get('run')} on {n} examples (± bootstrap std); "
                        f"unconditional latents from {sampler}{_best_of(result.info.get('candidates'))}; masks above "
                        f"{result.info.get('options', {}).get('threshold', 0.5):g}")
    for column, justify in [("metric", "left"), ("value", "right"), ("± std", "right"), ("real data", "right")]:
        table.add_column(column, justify=justify)
    for name, value in result.headline().items():
        table.add_row(f"{PREFIX}/{name}", _fmt(value), "", "")
    for name, value in result.uncond.items():
        table.add_row(f"{PREFIX}/uncond/{name}", _fmt(value), _fmt(result.uncond_std.get(name)),
                      _fmt(result.real.get(name)))
    for name, value in result.dims.items():
        table.add_row(f"{PREFIX}/dims/{name}", _fmt(value, 2), "", _fmt(result.real.get(name), 2))
    for name, value in result.dims_ood.items():
        table.add_row(f"{PREFIX}/dims_ood/{name}", _fmt(value, 2), "", "")
    for name, value in result.diversity.items():
        table.add_row(f"{PREFIX}/diversity/{name}", _fmt(value), "", _fmt(result.real.get(name)))
    console.print(table)


# ------------------------------------------------------------------------------------------------ compare


def evaluation_path(source: str | Path) -> Path:
    """The evaluation JSON of ``source``: the file itself, or a run directory's ``eval/metrics.json``."""
    source = Path(source)
    return source / "eval" / "metrics.json" if source.is_dir() else source


def load_evaluation(source: str | Path) -> tuple[str, dict[str, float | None]]:
    """(label, flat metrics) from an evaluation JSON, or from a run directory's ``eval/metrics.json``."""
    source = Path(source)
    path = evaluation_path(source)
    if not path.is_file():
        hint = f" (run: epure evaluate --checkpoint {source})" if source.is_dir() else ""
        raise EvaluationError(f"{path}: evaluation file not found{hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvaluationError(f"{path}: not a readable evaluation JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise EvaluationError(f"{path}: not an epure evaluation (no 'metrics' mapping inside)")
    return str(data.get("run") or path.stem), data["metrics"]


def comparison_table(entries: list[tuple[str, dict[str, float | None]]], show_all: bool = False) -> Table:
    """One row per metric, one column per evaluation; matrix entries only with ``show_all``."""
    labels = [label for label, _ in entries]
    if len(set(labels)) < len(labels):  # the same run evaluated twice: number the columns
        labels = [f"{label} [{i + 1}]" for i, label in enumerate(labels)]
    names = list(dict.fromkeys(name for _, metrics in entries for name in metrics))
    std_prefix = f"{PREFIX}/uncond_std/"
    rows = [n for n in names if not n.startswith(std_prefix) and (show_all or "->" not in n)]
    table = Table(title="evaluations (± bootstrap std)")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for name in rows:
        std_name = name.replace(f"{PREFIX}/uncond/", std_prefix, 1) if name.startswith(f"{PREFIX}/uncond/") else None
        cells = []
        for _, metrics in entries:
            value, std = metrics.get(name), metrics.get(std_name) if std_name else None
            cells.append(_fmt(value) + (f" ± {_fmt(std)}" if std is not None else ""))
        table.add_row(name, *cells)
    return table


# The scores `compare --out` draws, with their short labels: all in [0, 1], higher is better.
COMPARED = {f"{PREFIX}/cross_iou": "cross IoU", f"{PREFIX}/self_iou": "self IoU", f"{PREFIX}/cross_dice": "cross Dice",
            f"{PREFIX}/self_dice": "self Dice", f"{PREFIX}/uncond/union_one_piece": "union in one piece",
            f"{PREFIX}/uncond/all_one_piece": "all in one piece"}


def comparison_picture(entries: list[tuple[str, dict[str, float | None]]],
                       grids: list[Path | None]) -> "Image.Image":
    """One picture of several evaluations: bars of the headline scores, then their sample grids side by side
    (``grids``: each evaluation's ``*_samples.png``, None where there is none, e.g. a W&B run)."""
    from PIL import Image

    from epure.viz import bar_chart, side_by_side, stack

    labels = [label for label, _ in entries]
    if len(set(labels)) < len(labels):
        labels = [f"{label} [{i + 1}]" for i, label in enumerate(labels)]
    series = [(label, [metrics.get(name) for name in COMPARED]) for label, (_, metrics) in zip(labels, entries)]
    pictures = [Image.open(path) if path is not None and path.is_file() else None for path in grids]
    samples = side_by_side(pictures, labels)
    chart = bar_chart(list(COMPARED.values()), series, "headline scores (cross/self: a component completed "
                      "from another one / from itself; one piece: share of generated designs)",
                      width=max(1000, samples.width))
    return stack([chart, samples])
