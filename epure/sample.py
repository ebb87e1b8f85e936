"""Sampling from a trained model: whole designs from the prior, or completions from observed components.

    epure sample --checkpoint outputs/mmvaeplus/<run> --mode inpainting --components group_nc

Generation runs in fixed-size batches and writes each batch before the next, so memory stays flat for any
number of samples. Files follow the users' own layout:

- unconditional: ``OUT/unconditional/<component>/<id>_<component>.png``, ``OUT/unconditional/composites/<id>.png``
  and ``OUT/unconditional/grid.png``;
- inpainting: ``OUT/<observed>/<target>/<id>_<target>.png`` (``<obs1>+<obs2>`` with ``--joint``), where
  observed == target is the reconstruction, and ``OUT/<observed>/grid.png``. On incomplete data only the
  designs that have the observed components are completed;
- inpainting from each design's own components (``--components available``): ``OUT/available/<component>/
  <id>_<component>.png``, one file per component: the reconstruction of a component the design has, the
  completion of one it lacks; ``OUT/available/observed.csv`` says which is which.

Each of those folders (``unconditional``, ``<observed>``, ``available``) is one run's record: it ends with
``samples.csv`` (one row per design: its id, the conditions asked for, the width and height the generated
design measures, the mode and the observed components) and ``sample.json`` (what made it: model, seed,
options, epure version), both written atomically after every image, so a folder without them is visibly
incomplete. A folder that already holds samples is never written into again unless asked (``Destination``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import shutil
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import epure
from epure.checkpoint import LoadedModel
from epure.data.dimensions import achievable_dimensions, measure_dimensions
from epure.io import atomic_write_json, atomic_write_text, claim_dir
from epure.metrics import design_masks, piece_counts
from epure.model.generation import LATENT_SAMPLERS, completion_probabilities, unconditional_probabilities
from epure.viz import composite, grid, save_png

log = logging.getLogger(__name__)


AVAILABLE = "available"  # --components available: complete each design from the components it has


class SamplingError(ValueError):
    """A sampling request that cannot be served; the message says what to change."""


def component_indices(names: list[str], components: list[str]) -> list[int]:
    """Positions of ``names`` in the model's components; an unknown name lists the valid ones."""
    unknown = [n for n in names if n not in components]
    if unknown:
        raise SamplingError(f"unknown component(s) {unknown}; this model's components are: {', '.join(components)}")
    return [components.index(n) for n in names]


def check_conditions(loaded: LoadedModel, raw: np.ndarray) -> None:
    """Warn once per column when requested conditions leave the training range (the model extrapolates there)."""
    norm = loaded.normalizer
    for i, column in enumerate(norm.columns):
        outside = (raw[:, i] < norm.low[i]) | (raw[:, i] > norm.high[i])
        if outside.any():
            log.warning("%d of %d requested %s values (%g to %g) lie outside the training range [%g, %g]; "
                        "the model extrapolates there", int(outside.sum()), len(raw), column,
                        raw[outside, i].min(), raw[outside, i].max(), norm.low[i], norm.high[i])


def check_request(count: int, batch_size: int) -> None:
    """Refuse requests that would otherwise fail deep inside numpy (no samples, a batch size of 0)."""
    if count <= 0:
        raise SamplingError(f"nothing to sample: {count} designs requested")
    if batch_size <= 0:
        raise SamplingError(f"--batch-size must be positive, got {batch_size}")


def id_problem(sample_id: str) -> str | None:
    """Why ``sample_id`` cannot name files inside the output folder, or None when it is a plain name."""
    if not sample_id.strip():
        return "is empty"
    if "/" in sample_id or "\\" in sample_id:
        return "contains a path separator"
    if ".." in sample_id:
        return "contains '..'"
    if any(unicodedata.category(ch) == "Cc" for ch in sample_id):
        return "contains a control character"
    return None


def check_ids(ids: list[str], source: str, rows: list[int] | None = None) -> None:
    """Ids become file names (``<id>_<component>.png``, ``<id>.png``): each must be a plain name, and unique.

    A bad one is an error naming ``source``, the row (when ``rows`` gives them) and the id, raised before
    anything is written.
    """
    first: dict[str, int] = {}
    for i, sample_id in enumerate(ids):
        row = rows[i] if rows else i + 1
        where = f"{source}: row {row}" if rows else f"{source}: design {row}"
        problem = id_problem(sample_id)
        if problem is None and sample_id in first:
            problem = f"repeats the id of {'row' if rows else 'design'} {first[sample_id]}"
        if problem:
            raise SamplingError(f"{where}: id {sample_id!r} {problem}; ids name the files written, so each must "
                                f"be a plain, unique file name (no '/', '\\', '..' or control characters)")
        first[sample_id] = row


@dataclass
class Destination:
    """Where a sampling run writes.

    ``out`` None: a new folder ``default_parent/<YYYY-MM-DD_HH-MM-SS>`` for every run (``_1``, ``_2``, ... when
    taken), claimed with an exclusive ``mkdir``, so two runs never mix. An explicit ``out`` whose mode folder
    (``unconditional`` or ``<observed>``) already holds files is an error that names ``--overwrite``; with
    ``overwrite`` that mode folder is emptied first.
    """

    out: Path | None
    default_parent: Path | None = None
    overwrite: bool = False

    def claim(self, mode_folders: list[str]) -> Path:
        """The folder to write into, checked (and, with ``overwrite``, the mode folders emptied)."""
        if self.out is None:
            return claim_dir(Path(self.default_parent) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SamplingError(f"--out {out} is a file, not a folder")
        taken = [out / name for name in mode_folders if (out / name).is_dir() and any((out / name).iterdir())]
        if taken and not self.overwrite:
            raise SamplingError(f"{', '.join(map(str, taken))} already holds samples of an earlier run; writing "
                                f"into it would mix two runs. Choose another --out, leave --out out (every run "
                                f"then gets a new folder), or pass --overwrite to empty it first")
        for folder in taken:
            log.info("--overwrite: emptying %s", folder)
            shutil.rmtree(folder)
        return out


def _destination(out_dir: Path | Destination) -> Destination:
    return out_dir if isinstance(out_dir, Destination) else Destination(Path(out_dir))


def _to_tensor(loaded: LoadedModel, raw_conditions: np.ndarray) -> torch.Tensor:
    device = next(loaded.model.parameters()).device
    return torch.from_numpy(loaded.normalizer.normalize(raw_conditions)).to(device)


def latent_sampler(loaded: LoadedModel, requested: str | None = None) -> str:
    """The sampler unconditional designs use: ``requested``, or None for the model's ``model.latent_sampler``.
    ``fitted`` on a checkpoint without a fitted prior (an older epure's, or one saved before its run ended) warns and
    draws from the priors."""
    rule = requested or loaded.config.model.latent_sampler
    if rule not in LATENT_SAMPLERS:
        raise SamplingError(f"--latent-sampler must be one of {', '.join(LATENT_SAMPLERS)}, got {rule!r}")
    if rule == "fitted" and loaded.fitted_prior is None:
        log.warning("%s holds no fitted prior (saved by an older epure, or before its run ended): "
                    "unconditional designs are drawn from the priors p(z) p(w)", loaded.path)
        return "prior"
    return rule


BROKEN = 1e6  # best_of's penalty for a design in pieces: larger than any miss in px, so it loses to a whole one
PIECES = 1e3  # ... for each component in pieces that no training design has in pieces: below BROKEN, above any miss


def sample_candidates(loaded: LoadedModel, requested: int | None = None) -> int:
    """How many draws each unconditional design is chosen from: ``requested``, or None for the model's
    ``model.sample_candidates``."""
    count = loaded.config.model.sample_candidates if requested is None else requested
    if count < 1:
        raise SamplingError(f"--candidates must be at least 1 (1: every draw as it comes), got {count}")
    return count


def best_of(candidates: list[np.ndarray], raw_conditions: np.ndarray, columns: list[str], exclusive: bool,
            threshold: float, whole: np.ndarray | None = None) -> np.ndarray:
    """Per row, the candidate design (each of ``candidates`` probabilities [N, M, H, W]) whose masks, as
    ``design_masks`` makes them, are one piece, then with the fewest components in pieces among those ``whole``
    marks (bool [M]: one piece in every training design, ``metrics.components_whole``; None: none judged), then
    nearest the requested ``width_px`` and ``height_px`` of ``raw_conditions`` (the columns it has; their
    absolute misses in px, summed); ties go to the earliest draw.

    A rejection step on what every real design satisfies: the fitted prior draws latents near the training
    designs', but not exactly on the few pixels that decide a design's height or whether its bead touches its
    carcass; the decoders draw those pixels precisely once given the right latents (docs/model.md).
    """
    scores = []
    for probabilities in candidates:
        masks = design_masks(probabilities, exclusive, threshold)
        union = masks.any(axis=1)
        width, height = measure_dimensions(union)
        score = np.where(piece_counts(union) == 1, 0.0, BROKEN)
        if whole is not None and whole.any():
            judged = masks[:, whole]
            n, m = judged.shape[:2]
            score += PIECES * (piece_counts(judged.reshape(n * m, *judged.shape[2:])).reshape(n, m) > 1).sum(axis=1)
        for column, measured in (("width_px", width), ("height_px", height)):
            if column in columns:
                score += np.abs(measured - raw_conditions[:, columns.index(column)])
        scores.append(score)
    pick = np.argmin(np.stack(scores), axis=0)  # argmin keeps the first of equal scores
    chosen = candidates[0].copy()
    for k in range(1, len(candidates)):  # row by row, without stacking every candidate batch into one more copy
        chosen[pick == k] = candidates[k][pick == k]
    return chosen


@torch.no_grad()
def generate(loaded: LoadedModel, raw_conditions: np.ndarray, batch_size: int = 256,
             seed: int = 0, sampler: str | None = None, candidates: int | None = None,
             threshold: float | None = None) -> Iterator[np.ndarray]:
    """Unconditional designs for each row of raw conditions, yielded as float32 [b, M, H, W] batches.

    ``sampler``: ``prior`` draws the latents from p(z) p(w) (the paper), ``fitted`` from the density fitted to
    the training designs' latents, given the conditions (``epure.model.fitted_prior``); None: the model's
    ``model.latent_sampler`` (see ``latent_sampler``). ``candidates`` (None: the model's
    ``model.sample_candidates``): each design is the ``best_of`` that many draws, judged on its masks at
    ``threshold`` (None: the model's calibrated one).
    """
    fitted = loaded.fitted_prior if latent_sampler(loaded, sampler) == "fitted" else None
    count = sample_candidates(loaded, candidates)
    threshold = loaded.threshold if threshold is None else threshold
    whole = np.array([name in loaded.whole_components for name in loaded.components])
    generator = torch.Generator(device=next(loaded.model.parameters()).device).manual_seed(seed)
    for start in range(0, len(raw_conditions), batch_size):
        raw = raw_conditions[start: start + batch_size]
        cond = _to_tensor(loaded, raw)
        drawn = [unconditional_probabilities(loaded.model, cond, generator, fitted).cpu().numpy()
                 for _ in range(count)]
        yield drawn[0] if count == 1 else best_of(drawn, np.asarray(raw, dtype=float), loaded.normalizer.columns,
                                                  loaded.exclusive_components, threshold, whole)


@torch.no_grad()
def complete(loaded: LoadedModel, images: np.ndarray, raw_conditions: np.ndarray, observed: list[int],
             joint: str = "mixture", use_mean: bool = False, batch_size: int = 256, seed: int = 0,
             cross_prior: str | None = None) -> Iterator[np.ndarray]:
    """Every component generated from the ``observed`` ones of uint8 designs [N, M, H, W], in batches.

    ``cross_prior`` (``prior`` | ``aux``; None: the model's ``model.cross_prior``): see
    ``epure.model.generation.completion_probabilities``.
    """
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start: start + batch_size]).to(device).float().div_(255)
        cond = _to_tensor(loaded, raw_conditions[start: start + batch_size])
        yield completion_probabilities(loaded.model, x, cond, observed, joint, use_mean, generator,
                                       cross_prior).cpu().numpy()


def to_png_array(probs: np.ndarray, binary: bool, exclusive: bool = False, threshold: float = 0.5) -> np.ndarray:
    """Probabilities [N, M, H, W] -> uint8 pixels: with ``binary`` 0/255, each component thresholded at
    ``threshold`` (the model's calibrated one, LoadedModel.threshold) and, for ``exclusive`` components, the
    pixels between them decided as metrics.design_masks does; else grey levels."""
    if binary:
        return np.where(design_masks(probs, exclusive, threshold), 255, 0).astype(np.uint8)
    return (np.clip(probs, 0, 1) * 255).round().astype(np.uint8)


def design_composites(probs: np.ndarray, threshold: float, exclusive: bool = False) -> list[np.ndarray]:
    """Each design's colour composite drawn from its masks as ``--binary`` writes them (metrics.design_masks):
    drawn from the probabilities, or from each component thresholded alone, the boundary two components share
    shows as a pale or white seam wherever both decoders are unsure which of them owns a pixel, a seam the
    design itself does not have."""
    return [composite(masks) for masks in design_masks(probs, exclusive, threshold)]


def written_designs(probs: np.ndarray, binary: bool, exclusive: bool, threshold: float,
                    pictures: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The uint8 masks as written (``to_png_array``) and the colour composites of the first ``pictures``
    designs, each design's masks decided once: with ``binary`` the written masks are the design's, so the
    composites are drawn from them (design_masks labels holes, which is not free)."""
    if binary:
        pixels = to_png_array(probs, True, exclusive, threshold)
        return pixels, [composite(design) for design in pixels[:pictures]]
    return to_png_array(probs, False), design_composites(probs[:pictures], threshold, exclusive)


def _write_pngs(jobs: list[tuple[Path, np.ndarray]]) -> None:
    def write(job: tuple[Path, np.ndarray]) -> None:
        path, array = job
        Image.fromarray(array).save(path, format="PNG")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, jobs))


@dataclass
class SampleReport:
    out_dir: Path
    count: int
    folders: list[Path]
    records: list[Path] = field(default_factory=list)  # the mode folders, each with samples.csv and sample.json


MANIFEST, RECORD = "samples.csv", "sample.json"


def measured_dimensions(pixels: np.ndarray) -> np.ndarray:
    """[N, 2] width_px, height_px of uint8 designs [N, M, H, W] as written, measured on their union the way the
    dataset defines them (a pixel above 127.5 is occupied, as when the PNGs are read back)."""
    return np.stack(measure_dimensions(pixels.max(axis=1)), axis=1)


def manifest_rows(loaded: LoadedModel, ids: list[str], raw_conditions: np.ndarray, measured: np.ndarray,
                  mode: str, observed: str | list[str]) -> Iterator[list[Any]]:
    """samples.csv: the header, then one row per design (made as written, so memory stays flat). The id and
    requested conditions keep the data's column names, so ``--conditions`` reads the file back as it is.
    ``observed``: the observed components (``a+b``), the same for every design or one entry per design."""
    yield [loaded.config.data.id_column, *loaded.normalizer.columns, "measured_width_px", "measured_height_px",
           "mode", "observed"]
    for i, sample_id in enumerate(ids):
        yield [sample_id, *map(float, raw_conditions[i]), int(measured[i, 0]), int(measured[i, 1]), mode,
               observed if isinstance(observed, str) else observed[i]]


def write_record(folder: Path, rows: Iterator[list[Any]], loaded: LoadedModel, info: dict[str, Any]) -> None:
    """samples.csv (``rows``: header first) then sample.json, each atomically: the last files of a finished
    folder. ``info``: what sample.json adds to the model's provenance (mode, seed, options, ...)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    count = -1
    for row in rows:
        writer.writerow(row)
        count += 1
    atomic_write_text(folder / MANIFEST, buffer.getvalue())
    record = {"epure_version": epure.__version__, "created": datetime.now().astimezone().isoformat(timespec="seconds"),
              "checkpoint": str(Path(loaded.path).resolve()),
              "run": loaded.run_name,
              "data_fingerprint": loaded.meta.get("data_fingerprint"), "count": count, **info}
    atomic_write_json(folder / RECORD, record)


def write_unconditional(loaded: LoadedModel, out_dir: Path | Destination, raw_conditions: np.ndarray, ids: list[str],
                        binary: bool = False, batch_size: int = 256, seed: int = 0,
                        grid_count: int = 16, record: dict[str, Any] | None = None,
                        sampler: str | None = None, candidates: int | None = None) -> SampleReport:
    """One PNG per component per sample, a colour composite per sample and a grid of the first samples, then
    samples.csv and sample.json (``record``: what else sample.json should say, e.g. the command's options).
    ``sampler``: where the latents come from; ``candidates``: how many draws each design is chosen from (see
    ``generate``).

    Each batch is written before the next is generated, so memory does not grow with the number of samples.
    """
    check_request(len(ids), batch_size)
    check_ids(ids, "the requested samples")
    check_conditions(loaded, raw_conditions)
    out = _destination(out_dir).claim(["unconditional"])
    root = out / "unconditional"
    folders = [root / c for c in loaded.components] + [root / "composites"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    preview, measured, sampler = [], [], latent_sampler(loaded, sampler)
    candidates = sample_candidates(loaded, candidates)
    for start, batch in zip(range(0, len(ids), batch_size), generate(loaded, raw_conditions, batch_size, seed,
                                                                    sampler, candidates)):
        pixels, pictures = written_designs(batch, binary, loaded.exclusive_components, loaded.threshold, len(batch))
        jobs = []
        for j, design in enumerate(pixels):
            sample_id = ids[start + j]
            jobs += [(root / c / f"{sample_id}_{c}.png", design[m]) for m, c in enumerate(loaded.components)]
            jobs.append((root / "composites" / f"{sample_id}.png", pictures[j]))
        _write_pngs(jobs)
        measured.append(measured_dimensions(pixels))
        preview += [[*pixels[j], pictures[j]] for j in range(min(len(pixels), grid_count - len(preview)))]
    save_png(grid(preview), root / "grid.png")
    rows = manifest_rows(loaded, ids, raw_conditions, np.concatenate(measured), "unconditional", "")
    write_record(root, rows, loaded, {"mode": "unconditional", "observed": None, "seed": seed, "binary": binary,
                                      "threshold": loaded.threshold,
                                      "exclusive_components": loaded.exclusive_components,
                                      "whole_components": loaded.whole_components, "batch_size": batch_size,
                                      "latent_sampler": sampler, "candidates": candidates, **(record or {})})
    return SampleReport(out, len(ids), folders, [root])


def write_completions(loaded: LoadedModel, out_dir: Path | Destination, images: np.ndarray,
                      raw_conditions: np.ndarray, ids: list[str], observed_sets: list[list[str]], binary: bool = False,
                      joint: str = "mixture", use_mean: bool = False, batch_size: int = 256, seed: int = 0,
                      grid_count: int = 8, cross_prior: str | None = None, available: np.ndarray | None = None,
                      record: dict[str, Any] | None = None) -> SampleReport:
    """For each observed set, every target component generated from it, one folder per (observed, target);
    each observed set's folder ends with its samples.csv and sample.json.

    ``available`` bool [N, M] (default: every design has every component): each set completes only the designs
    that have all of its components.
    """
    check_request(len(ids), batch_size)
    check_ids(ids, "the designs to complete")
    check_conditions(loaded, raw_conditions)
    available = np.ones(images.shape[:2], dtype=bool) if available is None else available
    observed_idx = [component_indices(names, loaded.components) for names in observed_sets]
    labels = ["+".join(names) for names in observed_sets]
    chosen = [np.flatnonzero(available[:, observed].all(axis=1)) for observed in observed_idx]
    for names, rows in zip(observed_sets, chosen):
        if len(rows) == 0:
            raise SamplingError(f"no design of the data has {' and '.join(names)}, so none can be completed from "
                                f"{'them' if len(names) > 1 else 'it'}; try --components available")
    out = _destination(out_dir).claim(labels)
    folders, records, count = [], [], 0
    for names, observed, label, rows in zip(observed_sets, observed_idx, labels, chosen):
        if len(rows) < len(ids):
            log.info("%s: completing the %d of %d designs that have it", label, len(rows), len(ids))
        targets = {c: out / label / c for c in loaded.components}
        for folder in targets.values():
            folder.mkdir(parents=True, exist_ok=True)
        preview_rows: list[list[np.ndarray]] = []
        measured = []
        batches = complete(loaded, images[rows], raw_conditions[rows], observed, joint, use_mean, batch_size, seed,
                           cross_prior)
        for start, batch in zip(range(0, len(rows), batch_size), batches):
            pixels, pictures = written_designs(batch, binary, loaded.exclusive_components, loaded.threshold,
                                               grid_count - len(preview_rows))
            _write_pngs([(targets[c] / f"{ids[rows[start + j]]}_{c}.png", design[m])
                         for j, design in enumerate(pixels) for m, c in enumerate(loaded.components)])
            measured.append(measured_dimensions(pixels))
            for j, picture in enumerate(pictures):
                truth = images[rows[start + j]]
                preview_rows.append([*truth, composite(truth), *pixels[j], picture])
        save_png(grid(preview_rows), out / label / "grid.png")
        manifest = manifest_rows(loaded, [ids[i] for i in rows], raw_conditions[rows], np.concatenate(measured),
                                 "inpainting", label)
        write_record(out / label, manifest, loaded, {
            "mode": "inpainting", "observed": names, "seed": seed, "binary": binary, "threshold": loaded.threshold,
            "exclusive_components": loaded.exclusive_components, "batch_size": batch_size,
            "joint_rule": joint, "mean": use_mean, "cross_prior": cross_prior or loaded.config.model.cross_prior,
            **(record or {})})
        folders += list(targets.values())
        records.append(out / label)
        count = max(count, len(rows))
    return SampleReport(out, count, folders, records)


def write_available_completions(loaded: LoadedModel, out_dir: Path | Destination, images: np.ndarray,
                                raw_conditions: np.ndarray, ids: list[str], available: np.ndarray,
                                binary: bool = False, joint: str = "mixture", use_mean: bool = False,
                                batch_size: int = 256, seed: int = 0, grid_count: int = 8,
                                cross_prior: str | None = None, record: dict[str, Any] | None = None) -> SampleReport:
    """Complete each design from the components it has: one file per component (the reconstruction of a
    component the design has, the completion of one it lacks) under ``OUT/available``, then its samples.csv
    (``observed``: each design's own components) and sample.json.

    Designs are completed in groups that have the same components, each group from all of them together
    (``joint``: how their posteriors combine).
    """
    check_request(len(ids), batch_size)
    check_ids(ids, "the designs to complete")
    check_conditions(loaded, raw_conditions)
    out = _destination(out_dir).claim([AVAILABLE])
    root = out / AVAILABLE
    folders = [root / c for c in loaded.components]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    patterns, group_of = np.unique(available, axis=0, return_inverse=True)
    preview: dict[int, list[np.ndarray]] = {}
    measured = np.zeros((len(ids), 2), dtype=np.int64)
    for g, pattern in enumerate(patterns):
        rows = np.flatnonzero(group_of.ravel() == g)
        observed = np.flatnonzero(pattern).tolist()
        batches = complete(loaded, images[rows], raw_conditions[rows], observed, joint, use_mean, batch_size, seed,
                           cross_prior)
        for start, batch in zip(range(0, len(rows), batch_size), batches):
            batch_rows = rows[start:start + len(batch)]  # ascending: those shown in the grid come first
            pixels, pictures = written_designs(batch, binary, loaded.exclusive_components, loaded.threshold,
                                               int((batch_rows < grid_count).sum()))
            _write_pngs([(folders[m] / f"{ids[i]}_{c}.png", design[m])
                         for i, design in zip(batch_rows, pixels) for m, c in enumerate(loaded.components)])
            measured[batch_rows] = measured_dimensions(pixels)
            for j, picture in enumerate(pictures):
                i = batch_rows[j]
                preview[int(i)] = [*images[i], composite(images[i]), *pixels[j], picture]
    save_png(grid([preview[i] for i in sorted(preview)]), root / "grid.png")
    table = "\n".join([",".join(["id", *loaded.components])] +
                       [",".join([str(i), *("1" if a else "0" for a in row)]) for i, row in zip(ids, available)])
    atomic_write_text(root / "observed.csv", table + "\n")
    own = ["+".join(c for c, has in zip(loaded.components, row) if has) for row in available]
    write_record(root, manifest_rows(loaded, ids, raw_conditions, measured, "inpainting", own), loaded, {
        "mode": "inpainting", "observed": AVAILABLE, "seed": seed, "binary": binary, "threshold": loaded.threshold,
        "exclusive_components": loaded.exclusive_components, "batch_size": batch_size,
        "joint_rule": joint, "mean": use_mean, "cross_prior": cross_prior or loaded.config.model.cross_prior,
        **(record or {})})
    return SampleReport(out, len(ids), folders, [root])


TABLE_IMAGES = 1000  # composites shown in a W&B table; rows past this many carry no picture


def record_table(loaded: LoadedModel, folder: Path,
                 images: int = TABLE_IMAGES) -> tuple[list[str], list[list[Any]]]:
    """A finished folder's samples.csv as (columns, rows) with one more column, each design's colour composite
    (uint8 [H, 2W, 3]) for the first ``images`` rows, None after: read back from the folder's own PNGs, so a
    table shows what was written: its composites/, else (completion folders) the composites of its component
    masks decided as the folder's grid draws them (``design_composites``), so no seam shows that the grid lacks."""
    import pandas as pd

    text = {loaded.config.data.id_column: str, "mode": str, "observed": str}
    table = pd.read_csv(folder / MANIFEST, dtype=text, keep_default_na=False)
    rows = []
    for i, values in enumerate(table.itertuples(index=False)):
        picture = None
        if i < images:
            sample_id = values[0]
            drawn = folder / "composites" / f"{sample_id}.png"
            if drawn.is_file():
                picture = np.asarray(Image.open(drawn).convert("RGB"))
            else:
                masks = np.stack([np.asarray(Image.open(folder / c / f"{sample_id}_{c}.png").convert("L"))
                                  for c in loaded.components])
                (picture,) = design_composites(masks[None] / 255.0, loaded.threshold,
                                               loaded.exclusive_components)
        rows.append([*values, picture])
    return [*table.columns, "composite"], rows


def cross_matrix_image(loaded: LoadedModel, images: np.ndarray, raw_conditions: np.ndarray,
                       seed: int = 0, cross_prior: str | None = None) -> Image.Image:
    """For a few examples: row = observed component, column = generated component, ground truth first."""
    rows = []
    for i in range(min(len(images), 4)):
        rows.append([*images[i], composite(images[i])])
        for m in range(len(loaded.components)):
            (batch,) = complete(loaded, images[i: i + 1], raw_conditions[i: i + 1], [m], seed=seed,
                                cross_prior=cross_prior)
            rows.append([*batch[0], *design_composites(batch[:1], loaded.threshold, loaded.exclusive_components)])
    return grid(rows)


def progress_images(loaded: LoadedModel, images: np.ndarray, raw_conditions: np.ndarray,
                    count: int = 8, seed: int = 0) -> dict[str, Image.Image]:
    """The pictures logged while training: prior samples, the cross-component matrix, colour composites."""
    (samples,) = generate(loaded, raw_conditions[:count], batch_size=count, seed=seed)
    pictures = design_composites(samples, loaded.threshold, loaded.exclusive_components)
    return {"samples/unconditional": grid([[*s, picture] for s, picture in zip(samples, pictures)]),
            "samples/cross_matrix": cross_matrix_image(loaded, images, raw_conditions, seed),
            "samples/composites": grid([pictures])}


NEAREST_ROWS = 16  # a fixed condition draws the free ones from this many nearest training rows (and ties)


def fixed_conditions(pairs: list[str], shortcuts: dict[str, tuple[str, float | None]]) -> dict[str, float]:
    """``--condition NAME=VALUE`` options (and the ``--width``/``--height`` short forms) -> {column: value}."""
    fixed: dict[str, float] = {}
    given = [(f"--condition {pair}", *pair.partition("=")) for pair in pairs]
    given += [(f"--{option}", column, "=", str(value)) for option, (column, value) in shortcuts.items()
              if value is not None]
    for option, name, sep, text in given:
        try:
            value = float(text)
        except ValueError:
            value = None
        if not sep or not name or value is None or not np.isfinite(value):
            raise SamplingError(f"{option}: expected NAME=VALUE with a finite number, e.g. width_px=58")
        if name in fixed:
            raise SamplingError(f"{option}: {name} is given twice")
        fixed[name] = value
    return fixed


def draw_conditions(loaded: LoadedModel, count: int, fixed: dict[str, float], seed: int) -> np.ndarray:
    """Raw conditions [count, C] for unconditional designs, drawn from the training conditions' joint distribution.

    Each request is a training row drawn at random (the checkpoint stores the train split's condition rows),
    so width and height keep their correlation. A fixed column conditions the others on it: they come from
    one of the ``NEAREST_ROWS`` training rows nearest to the fixed values (distance in standard deviations,
    every row tied with the last one included), and the fixed columns take the requested values.
    Checkpoints saved before the rows were stored draw each free column independently, with a warning.
    """
    norm = loaded.normalizer
    unknown = [name for name in fixed if name not in norm.columns]
    if unknown:
        raise SamplingError(f"unknown condition(s) {unknown}; this model's condition columns are: "
                            f"{', '.join(norm.columns)}")
    rng = np.random.default_rng(seed)
    held = [norm.columns.index(name) for name in fixed]
    target = np.array(list(fixed.values()), dtype=np.float64)
    rows = loaded.train_conditions
    if rows is None:
        log.warning("%s holds no training conditions (saved by an older epure): each condition is drawn on its own "
                    "from a normal around the training mean, which loses their correlation; retrain to store them",
                    loaded.path)
        drawn = rng.normal(norm.mean, norm.std, (count, len(norm.columns))).round()
        chosen = np.clip(drawn, norm.low, norm.high)
    else:
        pool = np.arange(len(rows))
        if held:
            distance = np.linalg.norm((rows[:, held] - target) / np.asarray(norm.std)[held], axis=1)
            nearest = min(NEAREST_ROWS, len(rows))
            pool = np.flatnonzero(distance <= np.partition(distance, nearest - 1)[nearest - 1])
        chosen = rows[rng.choice(pool, count)].astype(np.float64)
    chosen[:, held] = target
    return chosen.astype(np.float32)


def unconditional_requests(loaded: LoadedModel, num_samples: int, fixed: dict[str, float],
                           conditions_csv: Path | None, seed: int) -> tuple[np.ndarray, list[str]]:
    """Raw conditions and ids for unconditional sampling.

    From a CSV (one sample per row, named by its id column), else ``num_samples`` requests from
    ``draw_conditions`` with the ``fixed`` columns (``--condition NAME=VALUE``) held at their values.
    """
    import pandas as pd

    norm = loaded.normalizer
    if conditions_csv is not None:
        if fixed:
            raise SamplingError(f"--conditions {conditions_csv} gives every condition of every sample; leave out "
                                f"--condition/--width/--height (given: {', '.join(fixed)})")
        id_column = loaded.config.data.id_column
        try:  # ids as written (0042 stays 0042), an empty cell an empty id
            table = pd.read_csv(conditions_csv, dtype={id_column: str}, keep_default_na=False)
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise SamplingError(f"{conditions_csv}: cannot read the conditions CSV ({err})") from err
        if table.empty:
            raise SamplingError(f"{conditions_csv}: no rows, so nothing to sample")
        missing = [c for c in [id_column, *norm.columns] if c not in table.columns]
        if missing:
            raise SamplingError(f"{conditions_csv}: missing column(s) {missing}; columns present: {list(table.columns)}")
        raw = table[norm.columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
        bad = ~np.isfinite(raw).all(1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SamplingError(f"{conditions_csv}: row {row + 2}: conditions {norm.columns} must be finite numbers")
        ids = table[id_column].astype(str).tolist()
        check_ids(ids, str(conditions_csv), rows=list(range(2, len(ids) + 2)))
        return raw, ids
    if num_samples <= 0:
        raise SamplingError(f"--num_samples must be positive, got {num_samples}")
    warn_unmeasurable(fixed, loaded.config.data.image_size)
    return draw_conditions(loaded, num_samples, fixed, seed), [f"sample_{i:05d}" for i in range(num_samples)]


def warn_unmeasurable(fixed: dict[str, float], image_size: list[int] | tuple[int, int]) -> None:
    """Warn when a held width or height is one no design of this image size can measure (a mirrored half-section
    is an odd number of pixels wide unless it fills the image): the designs come out at the nearest ones."""
    for column, achievable in achievable_dimensions(image_size).items():
        if column in fixed and fixed[column] not in achievable:
            miss = np.abs(achievable - fixed[column])
            log.warning("%s=%g cannot be measured on a %dx%d section (see epure.data.dimensions); the designs will "
                        "measure the nearest: %s", column, fixed[column], *image_size,
                        " or ".join(str(int(v)) for v in achievable[miss == miss.min()]))


def completion_split(loaded: LoadedModel, data_root: str | None, limit: int | None):
    """The test split to complete: of ``data_root`` if given (same components), else of the training data.

    Designs that lack some components are loaded too (``data.missing: allow``): completion and evaluation use
    only the components a design has.
    """
    from epure.data import load_split, resolve_root

    cfg = dataclasses.replace(loaded.config.data, missing="allow")
    if data_root is not None:
        cfg.root = data_root
    split = load_split(resolve_root(cfg), "test", cfg)
    return split.subset(np.arange(min(limit, len(split)))) if limit else split
