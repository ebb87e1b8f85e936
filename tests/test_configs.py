"""The shipped configs load, validate, and say what the README says they are."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from epure.config import EPURE_COMPONENTS, load_config

SHIPPED = sorted(p.stem for p in Path(str(resources.files("epure") / "configs")).glob("*.yaml"))


def test_every_shipped_config_loads() -> None:
    assert {"small", "synth", "toy", "mmvaeplus_default"} <= set(SHIPPED)
    for name in SHIPPED:
        cfg = load_config(name)
        assert cfg.model.latent_dim_u == cfg.model.latent_dim_w + cfg.model.latent_dim_z


@pytest.mark.parametrize("name", ["small", "synth"])
def test_five_component_configs_train_on_the_builtin_synthetic_set(name: str) -> None:
    cfg = load_config(name)
    assert cfg.data.root == "builtin:synthetic" and cfg.data.components == EPURE_COMPONENTS
    assert load_config(None).to_dict() == load_config("small").to_dict()  # what `epure train` trains


def test_synth_config_uses_the_benchmark_set() -> None:
    # benchmarks/synth_benchmark.py fixes 20,000 designs of seed 0; `epure train --config synth` uses the same
    cfg = load_config("synth")
    assert (cfg.data.synthetic_n, cfg.data.synthetic_seed) == (20_000, 0)


def test_encoder_input_is_checked_and_shapes_the_towers() -> None:
    """``model.encoder_input``: an unknown value names the key; ``pixel_unshuffle`` towers read 4 channels at half
    the resolution and halve it once fewer, to the same 8x4 features, so the heads keep their size."""
    import torch

    from epure.config import ConfigError, config_from_dict
    from epure.model import MMVAEPlus

    with pytest.raises(ConfigError, match="'model.encoder_input' must be one of"):
        config_from_dict({"model": {"encoder_input": "sideways"}})
    shapes = {}
    for value in ("full", "pixel_unshuffle"):
        cfg = load_config("small").updated({"model.encoder_input": value})
        tower = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size).encoders[0].w_tower
        shapes[value] = (tower.stem.in_channels, len(tower.blocks), tower.head.in_features)
    assert shapes["full"][:2] == (1, 3) and shapes["pixel_unshuffle"][:2] == (4, 2)
    assert shapes["full"][2] == shapes["pixel_unshuffle"][2]
    cfg = load_config("small")
    model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
    posteriors = model.encode(torch.zeros(3, 5, 64, 32), model.cond(torch.zeros(3, 2)))
    assert posteriors.w_loc.shape == (3, 5, cfg.model.latent_dim_w) and posteriors.z_loc.shape == (3, 5, 16)
