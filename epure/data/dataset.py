"""Loading a tire dataset into memory: validate, decode each PNG once, cache the arrays on disk.

    epure data check data/synth   # loads and validates a dataset exactly as training does

Layout (the users' own): ``ROOT/{train,test}/{component}/{prefix}_{component}.png`` and a CSV
(``ROOT/dimensions.csv``) with an id column, condition columns and a boolean split column. A split is held as
one uint8 array ``images[N, M, H, W]`` plus ``conditions[N, C]`` (raw pixels, float32) and the ids.

Masks are read as 0/255 grayscale. A component whose images never exceed 1 holds 0/1 masks (what saving a
numpy 0/1 array as PNG gives): it is scaled to 0/255, with one log line saying so, instead of being read as an
almost black image. An all-black image fits both conventions and decides nothing. A component that mixes
0/1 images with 0/255 ones is an error that names a few files of each kind.

Incomplete designs (``data.missing: allow``): a design whose PNG is absent for some component is kept, with
that image all zeros and ``available[i, m]`` False. Each design still needs its CSV row (conditions) and at
least one component; each component needs at least one design per split. Only an absent file counts as
missing: a file that is there but cannot be decoded is an error in either mode. With ``data.missing: error``
(the default) one absent file is an error, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from epure.config import DataConfig
from epure.data.cache import cache_root
from epure.io import atomic_write

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FINGERPRINT_FORMAT = 1  # part of every run's data fingerprint: changing it makes every --resume see new data
# how a cached array was decoded (2: 0/1 masks scaled to 0/255; 3: the availability mask stored beside the
# images); part of the cache file's name
CACHE_FORMAT = 3
EXAMPLES = 3  # file names shown per kind in an error


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file, row or column."""


@dataclass
class Split:
    """One split held in memory."""

    images: np.ndarray  # uint8 [N, M, H, W], 0..255
    conditions: np.ndarray  # float32 [N, C], raw (pixels)
    ids: np.ndarray  # str [N]
    components: list[str]
    condition_columns: list[str]
    fingerprint: str = ""
    available: np.ndarray | None = None  # bool [N, M]: which components each design has; None: all of them

    def __post_init__(self) -> None:
        if self.available is None:
            self.available = np.ones(self.images.shape[:2], dtype=bool)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def complete(self) -> np.ndarray:
        """bool [N]: the designs that have every component."""
        return self.available.all(axis=1)

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.conditions[index], self.ids[index], self.components,
                     self.condition_columns, self.fingerprint, self.available[index])

    def availability(self) -> dict:
        """How many designs have each component, and how many have them all (plain values, for W&B and tables)."""
        return {"designs": len(self), "complete": int(self.complete.sum()),
                "components": {c: int(n) for c, n in zip(self.components, self.available.sum(axis=0))}}


@dataclass
class ConditionNormalizer:
    """Standardises conditions with statistics fitted on the train split only.

    It travels with every checkpoint, so users always pass raw ``width_px``/``height_px``.
    """

    columns: list[str]
    mean: list[float]
    std: list[float]
    low: list[float]  # observed training range, to warn on out-of-range requests
    high: list[float]

    @classmethod
    def fit(cls, train: Split) -> "ConditionNormalizer":
        c = train.conditions.astype(np.float64)
        std = np.where(c.std(0) > 1e-8, c.std(0), 1.0)
        return cls(list(train.condition_columns), c.mean(0).tolist(), std.tolist(), c.min(0).tolist(),
                   c.max(0).tolist())

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"columns": self.columns, "mean": self.mean, "std": self.std, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: dict) -> "ConditionNormalizer":
        return cls(list(d["columns"]), list(d["mean"]), list(d["std"]), list(d["low"]), list(d["high"]))


# ---------------------------------------------------------------------------------------------- CSV


def read_table(root: Path, cfg: DataConfig) -> pd.DataFrame:
    """Read and validate the CSV: required columns, numeric finite conditions, unique ids, boolean split."""
    csv_path = Path(cfg.csv) if Path(cfg.csv).is_absolute() else root / cfg.csv
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: CSV file not found (set data.csv to its path)")
    try:
        table = pd.read_csv(csv_path, dtype={cfg.id_column: str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"{csv_path}: cannot be read as CSV: {err}") from err
    required = [cfg.id_column, *cfg.condition_columns, cfg.split_column]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DatasetError(f"{csv_path}: missing required column(s) {missing}; columns present: {list(table.columns)}")
    if table.empty:
        raise DatasetError(f"{csv_path}: has no rows")
    ids = table[cfg.id_column]
    if ids.isna().any():
        row = int(np.flatnonzero(ids.isna().to_numpy())[0])
        raise DatasetError(f"{csv_path}: row {row + 2}: empty value in id column '{cfg.id_column}'")
    duplicated = ids[ids.duplicated(keep=False)]
    if len(duplicated):
        first = list(dict.fromkeys(duplicated.tolist()))[:10]
        raise DatasetError(f"{csv_path}: {duplicated.nunique()} duplicate id(s) in column '{cfg.id_column}', "
                           f"e.g. {first}")
    for column in cfg.condition_columns:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{csv_path}: row {row + 2} (id {ids.iloc[row]!r}): condition column '{column}' has "
                f"{table[column].iloc[row]!r}, not a finite number ({int(bad.sum())} such row(s))"
            )
        table[column] = values.astype(np.float32)
    table[cfg.split_column] = _parse_split(table, cfg, csv_path)
    return table


def _parse_split(table: pd.DataFrame, cfg: DataConfig, csv_path: Path) -> pd.Series:
    truthy = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    parsed = table[cfg.split_column].map(lambda v: truthy.get(str(v).strip().lower()))
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise DatasetError(f"{csv_path}: row {row + 2}: split column '{cfg.split_column}' has "
                           f"{table[cfg.split_column].iloc[row]!r}; expected True or False")
    return parsed.astype(bool)


# ------------------------------------------------------------------------------------------- images


def _component_dirs(root: Path, split: str, cfg: DataConfig) -> dict[str, Path]:
    """The split's component folders, with clear errors for names not on disk."""
    dirs = {}
    for component in cfg.components:
        folder = root / split / component
        if folder.is_dir():
            dirs[component] = folder
            continue
        anywhere = any((root / s / component).is_dir() for s in SPLITS)
        if anywhere:
            raise DatasetError(f"{folder}: missing component folder for '{component}' in split '{split}'")
        on_disk = sorted({p.name for s in SPLITS if (root / s).is_dir() for p in (root / s).iterdir() if p.is_dir()})
        raise DatasetError(f"component '{component}' (data.components) is not on disk under {root}/{{train,test}}/; "
                           f"components found: {on_disk or 'none'}")
    return dirs


def _fingerprint(root: Path, split: str, cfg: DataConfig, dirs: dict[str, Path], csv_path: Path) -> str:
    """Hash of the layout settings and every file's name, size and mtime: a changed file changes it."""
    digest = hashlib.sha256()
    layout = {k: getattr(cfg, k) for k in ("components", "filename_pattern", "id_column", "condition_columns",
                                           "split_column", "image_size")}
    digest.update(json.dumps([FINGERPRINT_FORMAT, str(root.resolve()), split, layout], sort_keys=True).encode())
    for path in [csv_path]:
        st = path.stat()
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for component, folder in dirs.items():
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder))
        digest.update(component.encode())
        digest.update(json.dumps(entries).encode())
    return digest.hexdigest()[:32]


def _decode(path: Path, expected: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            gray = image.convert("L")
    except Exception as err:  # decoders raise a zoo of types for damaged files (OSError, zlib.error, SyntaxError...)
        raise DatasetError(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})") from err
    array = np.asarray(gray, dtype=np.uint8)
    if array.shape != expected:
        raise DatasetError(f"{path}: image is {array.shape[0]}x{array.shape[1]} (rows x columns), "
                           f"expected {expected[0]}x{expected[1]} (data.image_size)")
    return array


def _availability(split: str, cfg: DataConfig, rows: pd.DataFrame, dirs: dict[str, Path],
                  csv_path: Path) -> np.ndarray:
    """Which designs of the split have a file for each component -> bool [N, M], from the folder listings.

    Every rule about absent files is checked here, before any image is decoded or any cache read.
    """
    ids = rows[cfg.id_column].astype(str).tolist()
    available = np.empty((len(ids), len(dirs)), dtype=bool)
    for m, (component, folder) in enumerate(dirs.items()):
        present = set(os.listdir(folder))
        names = [cfg.filename_pattern.format(prefix=i, component=component) for i in ids]
        available[:, m] = [n in present for n in names]
        missing = [n for n, there in zip(names, available[:, m]) if not there]
        if missing and cfg.missing == "error":
            raise DatasetError(f"{folder}: {len(missing)} image(s) missing for split '{split}', "
                               f"first {min(10, len(missing))}: {missing[:10]} (set data.missing: allow to "
                               "train on designs that lack some components)")
        if not available[:, m].any():
            raise DatasetError(f"{folder}: component '{component}' has no image for any of the {len(ids)} "
                               f"designs of split '{split}'; a split needs at least one design with each "
                               "component (remove it from data.components, or add its images)")
    empty = np.flatnonzero(~available.any(axis=1))
    if len(empty):
        lines = (rows.index[empty] + 2).tolist()  # the CSV's line numbers (header is line 1)
        first = ", ".join(f"row {line} (id {ids[i]!r})" for line, i in zip(lines[:10], empty[:10]))
        raise DatasetError(f"{csv_path}: {len(empty)} design(s) of split '{split}' have no image for any component "
                           f"({', '.join(dirs)}), e.g. {first}; a design needs at least one component")
    return available


def _decode_split(cfg: DataConfig, ids: list[str], dirs: dict[str, Path],
                  available: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The split's images [N, M, H, W] (0/1 components scaled to 0/255, absent ones all zeros) and the names of
    the scaled components."""
    expected = (cfg.image_size[0], cfg.image_size[1])
    paths = [[folder / cfg.filename_pattern.format(prefix=i, component=component) for i in ids]
             for component, folder in dirs.items()]
    images = np.zeros((len(ids), len(dirs), *expected), dtype=np.uint8)
    flat = [(i, m, p) for m, column in enumerate(paths) for i, p in enumerate(column) if available[i, m]]

    def work(item: tuple[int, int, Path]) -> None:
        i, m, p = item
        images[i, m] = _decode(p, expected)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        list(pool.map(work, flat, chunksize=256))
    return images, _scale_binary_masks(images, list(dirs), paths)


def _scale_binary_masks(images: np.ndarray, components: list[str], paths: list[list[Path]]) -> list[str]:
    """Scale (in place) each component whose images all peak at 1 or 0 to 0/255; return those components.

    ``paths[m][i]`` is the file of ``images[i, m]``, for the error when a component mixes the two kinds.
    """
    peaks = images.max(axis=(2, 3))  # [N, M]; 0 is an all-black image, which fits either kind
    scaled = []
    for m, component in enumerate(components):
        binary, full = np.flatnonzero(peaks[:, m] == 1), np.flatnonzero(peaks[:, m] > 1)
        if len(binary) and len(full):
            binary_files = [paths[m][i].name for i in binary[:EXAMPLES]]
            full_files = [paths[m][i].name for i in full[:EXAMPLES]]
            raise DatasetError(
                f"{paths[m][0].parent}: component '{component}' mixes 0/1 masks ({len(binary)} images whose "
                f"brightest pixel is 1, e.g. {binary_files}) with 0/255 masks ({len(full)} images, e.g. "
                f"{full_files}); write every mask of a component the same way (0/255 is the usual)")
        if len(binary):
            images[:, m] *= 255
            scaled.append(component)
    return scaled


def _report_scaled(folder: Path, split: str, components: list[str]) -> None:
    for component in components:
        log.info("%s/%s/%s: every mask's pixels are 0 or 1: read as 0/1 masks and scaled to 0/255",
                 folder, split, component)


def cache_path(split: str, fingerprint: str) -> Path:
    """Where the decoded images of a split with this fingerprint are cached."""
    return cache_root() / "datasets" / f"{split}-{fingerprint}-v{CACHE_FORMAT}.npz"


def load_split(root: str | Path, split: str, cfg: DataConfig, use_cache: bool = True) -> Split:
    """Load one split (``train`` or ``test``), from the on-disk cache when nothing changed.

    Every check runs before any cache is written, so a bad dataset never leaves a cache behind.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    table = read_table(root, cfg)
    csv_path = Path(cfg.csv) if Path(cfg.csv).is_absolute() else root / cfg.csv
    rows = table[table[cfg.split_column] == (split == "train")]
    if rows.empty:
        raise DatasetError(f"{csv_path}: split '{split}' is empty (no row with {cfg.split_column} = "
                           f"{split == 'train'})")
    dirs = _component_dirs(root, split, cfg)
    # the fingerprint hashes every folder's listing: which files exist (the availability) is part of it
    key = _fingerprint(root, split, cfg, dirs, csv_path)
    cache_file = cache_path(split, key)
    ids = rows[cfg.id_column].astype(str).to_numpy()
    conditions = rows[cfg.condition_columns].to_numpy(dtype=np.float32)
    available = _availability(split, cfg, rows, dirs, csv_path)
    components, columns = list(cfg.components), list(cfg.condition_columns)
    if not available.all():
        log.info("%s/%s: %d of %d designs lack some component(s); designs with each component: %s", root, split,
                 int((~available.all(axis=1)).sum()), len(ids),
                 ", ".join(f"{c} {n}" for c, n in zip(components, available.sum(axis=0))))
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as cached:
                images, scaled = cached["images"], [str(c) for c in cached["scaled"]]
                cached_available = cached["available"]
            if images.shape[0] == len(ids) and np.array_equal(cached_available, available):
                _report_scaled(root, split, scaled)
                return Split(images, conditions, ids, components, columns, key, available)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            log.warning("dataset cache %s is unreadable; decoding the images again", cache_file)
    images, scaled = _decode_split(cfg, list(ids), dirs, available)
    _report_scaled(root, split, scaled)
    if use_cache:  # concurrent loads of one dataset each write a whole file and rename it: the last one stays
        atomic_write(cache_file, lambda tmp: _save_npz(tmp, images, scaled, available))
    return Split(images, conditions, ids, components, columns, key, available)


def _save_npz(path: Path, images: np.ndarray, scaled: list[str], available: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, images=images, scaled=np.array(scaled, dtype=str), available=available)
    pause = float(os.environ.get("EPURE_TEST_PAUSE_CACHE_WRITE", "0") or 0)
    if pause:  # tests only: holds the half-written cache in place, so a signal can be sent right then
        time.sleep(pause)
