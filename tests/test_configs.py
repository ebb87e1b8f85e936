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
