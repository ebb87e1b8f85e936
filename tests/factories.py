"""Tiny configurations and datasets shared by the model, training and sampling tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb

from epure.config import Config, config_from_dict
from epure.data.synth import write_synthetic_dataset

TOY_COMPONENTS = ["group_nc", "group_km", "fpu"]


def tiny_config(root: Path | str | None, output_dir: Path, components: list[str] | None = None, **overrides) -> Config:
    """A model small enough to train for a few dozen steps in seconds on a busy 2-core CPU."""
    tree = {
        "data": {"root": str(root) if root else None, "components": components or TOY_COMPONENTS,
                 "val_fraction": 0.1},
        "model": {"latent_dim_w": 4, "latent_dim_z": 4, "latent_dim_u": 8, "nf": 8, "nf_max": 16,
                  "cond_hidden": [32, 32]},
        "train": {"epochs": 1, "batch_size": 16, "lr": 2e-3, "output_dir": str(output_dir),
                  "checkpoint_every_minutes": 0.0},
        "wandb": {"mode": "off", "images_every_epochs": 0},
    }
    cfg = config_from_dict(tree)
    return cfg.updated(overrides) if overrides else cfg


def synthetic_dataset(folder: Path, n: int = 120, seed: int = 0) -> Path:
    """The built-in synthetic generator's dataset (5 components), written once into ``folder``."""
    if not (folder / "dimensions.csv").is_file():
        write_synthetic_dataset(folder, n=n, seed=seed)
    return folder


def sandbox_wandb(monkeypatch: pytest.MonkeyPatch, base: Path) -> Path:
    """Keep every wandb folder (staging, cache, settings) under ``base``, with no login; return WANDB_DIR.

    wandb reads its environment once per process, so its singleton is reset to see these values.
    """
    for name, sub in {"WANDB_DIR": "wandb", "WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache",
                      "WANDB_CONFIG_DIR": "config", "WANDB_ARTIFACT_DIR": "artifacts"}.items():
        (base / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(base / sub))
    monkeypatch.setenv("NETRC", str(base / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()
    return base / "wandb"
