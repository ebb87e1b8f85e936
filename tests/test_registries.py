"""Latent families, likelihoods and objectives are registries: adding one touches one module (here: this file).

Config validation reads its allowed values and its error messages from the registries, and training, the
objectives and generation look everything up there, so a family, a likelihood or an objective registered
from outside the package trains like the built-in ones.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from epure.config import ConfigError
from epure.data import load_data
from epure.model import MMVAEPlus, forward_objective
from epure.model import likelihoods, objectives
from epure.model.generation import completion_probabilities, unconditional_probabilities
from epure.model.latents import FAMILIES, Normal
from epure.tracking import NullTracker
from epure.train import train

from conftest import write_tiny_dataset
from factories import tiny_config

COMPONENTS = ["c0", "c1", "c2"]


class LossRecorder(NullTracker):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "train/loss" in metrics:
            self.losses.append(float(metrics["train/loss"]))


def one_step_loss(tmp_path, name: str, **overrides) -> float:
    """The loss of one training step of ``epure.train.train`` from seed 0 on a tiny dataset."""
    root = tmp_path / "data"
    if not root.is_dir():
        write_tiny_dataset(root, n=20, components=COMPONENTS, seed=1)
    cfg = tiny_config(root, tmp_path / name, COMPONENTS, **{"train.max_steps": 1, "wandb.log_every_steps": 1,
                                                            **overrides})
    recorder = LossRecorder()
    result = train(cfg, data=load_data(cfg.data), tracker=recorder)
    assert result.step == 1 and result.status == "budget"
    return recorder.losses[0]


@pytest.fixture
def half_elbo(monkeypatch: pytest.MonkeyPatch):
    """An objective registered from this test file: half the ELBO's loss, its own term logged."""

    def objective(ev: objectives.Evaluation, beta: float) -> objectives.ObjectiveOutput:
        out = objectives.OBJECTIVES["elbo"](ev, beta)
        return objectives.ObjectiveOutput(0.5 * out.loss, out.bound, {**out.terms, "half": 0.5 * out.loss.detach()})

    monkeypatch.setitem(objectives.OBJECTIVES, "half_elbo", objective)  # removed again after the test
    return objective


def test_a_registered_objective_is_a_valid_choice_and_trains(half_elbo, tmp_path) -> None:
    with pytest.raises(ConfigError, match="half_elbo"):  # the allowed values listed are the registry's
        tiny_config(None, tmp_path, COMPONENTS, **{"model.objective": "half_ebo"})
    elbo = one_step_loss(tmp_path, "elbo")
    half = one_step_loss(tmp_path, "half", **{"model.objective": "half_elbo"})
    assert math.isfinite(elbo) and half == pytest.approx(0.5 * elbo, rel=1e-6)


def test_forward_objective_names_the_registered_objectives() -> None:
    cfg = tiny_config(None, ".", COMPONENTS)
    model = MMVAEPlus(cfg.model, COMPONENTS, cfg.data.image_size)
    with pytest.raises(ValueError, match="registered: elbo, dreg"):
        forward_objective(model, torch.zeros(2, 3, 64, 32), torch.zeros(2, 2), "iwae")


def test_a_registered_likelihood_is_used_by_the_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    def shifted(logits, x, scale, foreground_weight):  # the bernoulli likelihood minus one nat per mask
        return likelihoods.LIKELIHOODS["bernoulli"].log_prob(logits, x, scale, foreground_weight) - 1.0

    monkeypatch.setitem(likelihoods.LIKELIHOODS, "shifted", likelihoods.Likelihood(shifted))
    losses = {}
    for name in ("bernoulli", "shifted"):
        cfg = tiny_config(None, ".", COMPONENTS, **{"model.likelihood": name})
        torch.manual_seed(0)
        model = MMVAEPlus(cfg.model, COMPONENTS, cfg.data.image_size)
        x, c = (torch.rand(4, 3, 64, 32, generator=torch.Generator().manual_seed(1)) > 0.5).float(), torch.zeros(4, 2)
        torch.manual_seed(2)
        losses[name] = forward_objective(model, x, c, "elbo", beta=1.0).loss.item()
    # every (source, target) pair loses one nat: M targets per stratum
    assert losses["shifted"] == pytest.approx(losses["bernoulli"] + len(COMPONENTS), rel=1e-5)
    with pytest.raises(ConfigError, match="applies to the bernoulli likelihood only"):  # not a weighted one
        tiny_config(None, ".", COMPONENTS, **{"model.likelihood": "shifted", "model.foreground_weight": 2.0})


class Logistic(Normal):
    """A family defined outside the package: logistic latents with a softplus scale."""

    name = "Logistic"
    variance_per_squared_scale = math.pi**2 / 3

    def noise(self, shape, device, generator=None) -> torch.Tensor:
        u = torch.rand(shape, device=device, generator=generator).clamp(1e-6, 1 - 1e-6)
        return torch.log(u) - torch.log1p(-u)

    def log_density(self, x, loc, scale) -> torch.Tensor:
        t = (x - loc) / scale
        return -t - 2 * torch.nn.functional.softplus(-t) - torch.log(scale)


def test_a_new_latent_family_trains_and_generates(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="must be one of \\['Laplace', 'Normal'\\]"):
        tiny_config(None, ".", COMPONENTS, **{"model.priorposterior": "Logistic"})
    monkeypatch.setitem(FAMILIES, "Logistic", Logistic())
    cfg = tiny_config(None, ".", COMPONENTS, **{"model.priorposterior": "Logistic"})
    torch.manual_seed(0)
    model = MMVAEPlus(cfg.model, COMPONENTS, cfg.data.image_size)
    assert model.family is FAMILIES["Logistic"]
    torch.testing.assert_close(model.aux_scale(), torch.ones(3, 4) + 1e-6)  # starts at the prior's scale
    x = (torch.rand(4, 3, 64, 32, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    c = torch.zeros(4, 2)
    out = forward_objective(model, x, c, "dreg", beta=1.0, k=2)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.aux_raw_scale.grad.abs().sum() > 0
    # the density the bound used is the family's own: the same draws under Normal give another bound
    monkeypatch.setattr(model, "family", FAMILIES["Normal"])
    torch.manual_seed(0)
    normal_bound = forward_objective(model, x, c, "elbo", beta=1.0).bound
    monkeypatch.setattr(model, "family", FAMILIES["Logistic"])
    torch.manual_seed(0)
    assert forward_objective(model, x, c, "elbo", beta=1.0).bound != normal_bound
    with torch.no_grad():
        assert unconditional_probabilities(model, c).shape == (4, 3, 64, 32)
        assert completion_probabilities(model, x, c, [0, 1], joint="product").shape == (4, 3, 64, 32)
