"""`epure data check`: validate a dataset by loading it exactly as training would, and summarise it.

    epure data check data/synth
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epure.config import DataConfig
from epure.data.dataset import Split, load_split


@dataclass
class SplitSummary:
    split: str
    count: int
    condition_ranges: dict[str, tuple[float, float, float]]  # column -> (min, mean, max)
    coverage: dict[str, float]  # component -> mean share of pixels occupied, over the designs that have it
    nonempty: dict[str, float]  # component -> share of its images with any occupied pixel
    available: dict[str, int]  # component -> number of designs that have its image
    complete: int  # designs that have every component


def summarize_split(split_name: str, split: Split) -> SplitSummary:
    occupied = split.images > 127
    have = np.maximum(split.available.sum(axis=0), 1)  # every component has >= 1 image (the loader checks)
    coverage = occupied.mean(axis=(2, 3)).sum(axis=0) / have  # absent images are zeros: they add nothing
    nonempty = occupied.any(axis=(2, 3)).sum(axis=0) / have
    ranges = {c: (float(split.conditions[:, i].min()), float(split.conditions[:, i].mean()),
                  float(split.conditions[:, i].max())) for i, c in enumerate(split.condition_columns)}
    counts = split.availability()
    return SplitSummary(split_name, len(split), ranges, dict(zip(split.components, coverage.tolist())),
                        dict(zip(split.components, nonempty.tolist())), counts["components"], counts["complete"])


def check_dataset(root: str | Path, cfg: DataConfig) -> list[SplitSummary]:
    """Load both splits (every validation runs) and summarise them; raises DatasetError on bad input."""
    return [summarize_split(name, load_split(root, name, cfg)) for name in ("train", "test")]


def example_designs(root: str | Path, cfg: DataConfig, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A few random train designs [count, M, H, W] and their ids, for pictures."""
    split = load_split(root, "train", cfg)
    pick = np.sort(np.random.default_rng(seed).choice(len(split), size=min(count, len(split)), replace=False))
    return split.images[pick], split.ids[pick]
