"""Where a dataset comes from: a folder of the user's, the built-in synthetic set, or the public toy set.

    epure train --data builtin:toy --max-steps 20

``data.root`` may name a folder, ``builtin:synthetic`` (also what an empty root means) or ``builtin:toy``.
Built-in sets are materialised once into the cache and reused. Each is built in a folder of its own process
and renamed into place, so processes that materialise the same set at the same time never see half of it:
the first rename wins, and the others drop their copy and use the winner's (the same files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import epure
from epure.config import DataConfig
from epure.data.cache import cache_root
from epure.data.dataset import ConditionNormalizer, DatasetError, Split, load_split

log = logging.getLogger(__name__)

SYNTHETIC = "builtin:synthetic"
TOY = "builtin:toy"
TOY_ARCHIVE_SHA256 = "80f74d242df524a812bf40bf69bc131c854ced3cc9ea06ce201f9a46627bd44d"


def resolve_root(cfg: DataConfig) -> Path:
    """The folder to load ``cfg`` from, generating or unpacking a built-in set on first use."""
    root = cfg.root or SYNTHETIC
    if root == SYNTHETIC:
        return synthetic_root(cfg.synthetic_n, cfg.synthetic_seed)
    if root == TOY:
        return toy_root()
    return Path(root).expanduser()


def synthetic_root(n: int, seed: int) -> Path:
    """The built-in synthetic dataset of ``n`` designs for ``seed``, generated once into the cache."""
    from epure.data.synth import write_synthetic_dataset

    folder = cache_root() / "builtin" / f"synthetic-n{n}-seed{seed}"
    if not (folder / "dimensions.csv").is_file():
        log.info("generating the built-in synthetic dataset (%d designs) into %s", n, folder)
        try:
            write_synthetic_dataset(folder, n=n, seed=seed)
        except OSError:  # FileExistsError, or the final rename refused: another process got there first
            if not (folder / "dimensions.csv").is_file():
                raise
    return folder


def toy_archive() -> Path | None:
    """The public toy archive: ``$EPURE_TOY_ARCHIVE``, else ``shared/data/toy_epure.tar.gz`` beside the clone."""
    candidates = []
    if os.environ.get("EPURE_TOY_ARCHIVE"):
        candidates.append(Path(os.environ["EPURE_TOY_ARCHIVE"]))
    repo = Path(epure.__file__).resolve().parents[1]
    candidates += [repo.parent / "shared" / "data" / "toy_epure.tar.gz",
                   Path.cwd().parent / "shared" / "data" / "toy_epure.tar.gz"]
    return next((p for p in candidates if p.is_file()), None)


def toy_root() -> Path:
    """Unpack the public toy set into the cache once (never into ``shared/``) and return its folder."""
    folder = cache_root() / "builtin" / "toy"
    if (folder / "toy_epure" / "dimensions.csv").is_file():
        return folder / "toy_epure"
    archive = toy_archive()
    if archive is None:
        raise DatasetError("the public toy set was not found: put ../shared/data/toy_epure.tar.gz beside the clone "
                           "or set EPURE_TOY_ARCHIVE to its path")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != TOY_ARCHIVE_SHA256:
        raise DatasetError(f"{archive}: sha256 {digest} does not match the published {TOY_ARCHIVE_SHA256}")
    tmp = folder.parent / f".toy.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacking %s into %s", archive, folder)
    try:
        tmp.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp, folder)  # replaces an empty folder only
        except OSError:
            if not (folder / "toy_epure" / "dimensions.csv").is_file():
                raise DatasetError(f"{folder}: exists but is not a complete copy of the toy set; remove it and "
                                   "run again") from None
            shutil.rmtree(tmp)  # another process unpacked it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "toy_epure"


@dataclass
class DataBundle:
    """Everything training needs: train/validation/test splits and the train-fitted normaliser."""

    root: Path
    train: Split
    val: Split
    test: Split
    normalizer: ConditionNormalizer

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.train.fingerprint}:{self.test.fingerprint}".encode()).hexdigest()[:16]


def load_data(cfg: DataConfig) -> DataBundle:
    """Load both splits and hold out ``cfg.val_fraction`` of train for validation.

    Which designs are held out depends on ``data.val_seed`` only, never on ``train.seed``: trials of a sweep
    over seeds are scored on the same validation designs. The hold-out and the rest are disjoint, and each
    must keep at least one design.
    """
    root = resolve_root(cfg)
    full_train = load_split(root, "train", cfg)
    test = load_split(root, "test", cfg)
    n = len(full_train)
    n_val = int(round(cfg.val_fraction * n))
    if n_val < 1 or n_val >= n:
        fix = f"set data.val_fraction between {1 / n:.3g} and {(n - 1) / n:.3g}" if n > 1 else "add designs"
        raise DatasetError(f"data.val_fraction {cfg.val_fraction} of the {n} training designs of {root} leaves "
                           f"{n_val} for validation and {n - n_val} for training; each needs at least one ({fix})")
    order = np.random.default_rng(cfg.val_seed).permutation(n)
    train, val = full_train.subset(np.sort(order[n_val:])), full_train.subset(np.sort(order[:n_val]))
    return DataBundle(root, train, val, test, ConditionNormalizer.fit(train))
