"""The fitted prior: its conditional draws, its fit, how it travels in checkpoints, and sampling from it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from epure.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from epure.cli import app
from epure.config import ConfigError, config_from_dict
from epure.data import load_data, load_split
from epure.evaluate import EvaluationError, EvaluationOptions, evaluate
from epure.model.fitted_prior import FittedPrior, best_expert, design_latents, fit_prior, principal_basis
from epure.model.generation import latent_probabilities
from epure.sample import SamplingError, generate
from epure import train as train_module
from epure.train import train

from factories import synthetic_dataset, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COMPONENTS = ["group_nc", "group_km", "bt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, config) of a tiny model trained for 2 epochs on 120 synthetic designs."""
    base = tmp_path_factory.mktemp("fitted")
    root = synthetic_dataset(base / "data", n=120)
    cfg = tiny_config(root, base / "out", COMPONENTS, **{"train.epochs": 2})
    torch.manual_seed(0)
    return train(cfg).run_dir, cfg


def test_conditional_draws_follow_the_mixture_given_the_conditions() -> None:
    """Two Gaussians over (latent a, latent b, condition c): at c = 2 the second one is responsible for
    almost every draw, and the draws have that Gaussian's conditional mean and covariance."""
    cov1 = torch.tensor([[1.0, 0.3, 0.5], [0.3, 2.0, -0.4], [0.5, -0.4, 1.0]], dtype=torch.float64)
    cov0 = torch.eye(3, dtype=torch.float64) * 0.5
    means = torch.tensor([[5.0, 5.0, -2.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    prior = FittedPrior(torch.tensor([0.5, 0.5], dtype=torch.float64), means, torch.stack([cov0, cov1]), 2, 10)
    c = torch.full((40_000, 1), 2.5)
    drawn = prior.sample(c, torch.Generator().manual_seed(0)).double()
    gain = cov1[:2, 2:] / cov1[2, 2]
    mean = means[1, :2] + gain[:, 0] * (2.5 - 2.0)
    cov = cov1[:2, :2] - gain @ cov1[2:, :2]
    torch.testing.assert_close(drawn.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(drawn.T), cov, atol=0.05, rtol=0)
    # between the two means of c both Gaussians answer, each in proportion to its weight times its density at c
    middle = prior.sample(torch.zeros((20_000, 1)), torch.Generator().manual_seed(1))
    density = [torch.distributions.Normal(means[g, 2], cov[2, 2].sqrt()).log_prob(torch.tensor(0.0)).exp()
               for g, cov in enumerate((cov0, cov1))]
    share = (density[0] / (density[0] + density[1])).item()  # about 0.16
    assert (middle[:, 0] > 2.5).float().mean().item() == pytest.approx(share, abs=0.01)
    # the same generator seed gives the same draws
    again = prior.sample(c, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, drawn.float(), rtol=0, atol=0)


def test_a_gaussian_fit_is_the_latents_mean_and_covariance(trained) -> None:
    run_dir, cfg = trained
    loaded = load_model(run_dir)
    split = load_split(cfg.data.root, "train", cfg.data)
    x = torch.from_numpy(split.images)
    c = torch.from_numpy(loaded.normalizer.normalize(split.conditions))
    prior = fit_prior(loaded.model, x, c, components=1)
    # z comes from the expert whose z reconstructs whole designs best (Bernoulli log-likelihood, first 512 designs)
    with torch.no_grad():
        post = loaded.model.encode(x.float() / 255, loaded.model.cond(c))
        scores = [torch.distributions.Bernoulli(probs=latent_probabilities(
            loaded.model, torch.cat([post.z_loc[:, m], post.w_loc.flatten(1)], 1), c).clamp(1e-6, 1 - 1e-6)
        ).log_prob(x.float() / 255).sum().item() for m in range(3)]
    assert prior.expert == best_expert(loaded.model, x, c)
    assert scores[prior.expert] >= max(scores) - 1e-4 * abs(max(scores)) and len(set(scores)) == 3
    latents = design_latents(loaded.model, x, c, expert=prior.expert)
    assert latents.shape == (len(split), 4 + 3 * 4) and prior.latent_dim == 16
    joined = torch.cat([latents, c.double()], dim=1)
    torch.testing.assert_close(prior.means[0], joined.mean(0))
    torch.testing.assert_close(prior.covariances[0], torch.cov(joined.T) + 1e-4 * torch.eye(18, dtype=torch.float64))
    # the latents: that expert's z locations (or the experts' mean), then every component's w location
    torch.testing.assert_close(latents[:3, :4].float(), post.z_loc[:3, prior.expert])
    torch.testing.assert_close(latents[:3, 4:8].float(), post.w_loc[:3, 0])
    mean_of_experts = design_latents(loaded.model, x[:3], c[:3])
    torch.testing.assert_close(mean_of_experts[:, :4].float(), post.z_loc[:3].mean(1))
    assert FittedPrior.from_state(prior.to_state()).expert == prior.expert
    older = {k: v for k, v in prior.to_state().items() if k != "expert"}  # fits saved before the expert was chosen
    assert FittedPrior.from_state(older).expert is None
    # only complete designs are fitted (data.missing: allow); too few of them: no fit
    complete = torch.ones(len(x), dtype=torch.bool)
    complete[::2] = False
    partial = fit_prior(loaded.model, x, c, components=1, complete=complete)
    half = torch.cat([design_latents(loaded.model, x[1::2], c[1::2], expert=partial.expert), c[1::2].double()], 1)
    torch.testing.assert_close(partial.means[0], half.mean(0))
    assert partial.designs == len(x) // 2
    assert fit_prior(loaded.model, x, c, complete=torch.zeros(len(x), dtype=torch.bool)) is None
    mixture = fit_prior(loaded.model, x, c, components=2)
    assert mixture.weights.shape == (2,) and mixture.weights.sum().item() == pytest.approx(1.0)


def test_principal_basis_keeps_the_fewest_directions_holding_the_share() -> None:
    """Independent coordinates of variance 9, 4, 1 and 0.01 (shares 0.64, 0.93, 0.9993, 1): 0.95 keeps the first
    three axes, 0.9 two, 1.0 all four; the rows are orthonormal and the center is the mean."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((20_000, 4)) * np.sqrt([9.0, 4.0, 1.0, 0.01]) + [1.0, -2.0, 0.5, 3.0]
    basis, center = principal_basis(latents, 0.95)
    assert basis.shape == (3, 4)
    np.testing.assert_allclose(np.abs(basis), np.eye(4)[:3], atol=0.02)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(center, latents.mean(0))
    assert principal_basis(latents, 0.9)[0].shape == (2, 4) and principal_basis(latents, 1.0)[0].shape == (4, 4)


def test_draws_through_a_basis_stay_in_its_span() -> None:
    """A mixture over two fitted coordinates maps back to center + x basis: every draw lies in the plane the
    basis spans through the center, with the fitted coordinates' mean and spread along it."""
    basis = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    center = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    prior = FittedPrior(torch.ones(1, dtype=torch.float64), torch.tensor([[2.0, -1.0, 0.0]], dtype=torch.float64),
                        torch.diag(torch.tensor([0.25, 4.0, 1.0], dtype=torch.float64))[None], 2, 10,
                        basis=basis, center=center)
    assert prior.output_dim == 3
    drawn = prior.sample(torch.zeros(20_000, 1), torch.Generator().manual_seed(0)).double()
    normal = torch.tensor([0.8, -0.6, 0.0], dtype=torch.float64)  # orthogonal to both rows
    assert ((drawn - center) @ normal).abs().max().item() < 1e-5
    coords = (drawn - center) @ basis.T
    torch.testing.assert_close(coords.mean(0), torch.tensor([2.0, -1.0], dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(coords.std(0), torch.tensor([0.5, 2.0], dtype=torch.float64), atol=0.05, rtol=0)
    again = FittedPrior.from_state(prior.to_state())
    torch.testing.assert_close(again.basis, basis)
    torch.testing.assert_close(again.center, center)
    older = {k: v for k, v in prior.to_state().items() if k not in ("basis", "center", "own_z")}
    assert FittedPrior.from_state(older).basis is None and not FittedPrior.from_state(older).own_z
    with pytest.raises(ValueError, match="do not map 2 fitted dimensions back"):
        FittedPrior.from_state({**prior.to_state(), "center": torch.zeros(2)})


def test_own_z_fit_decodes_each_component_from_its_own_expert(trained, tmp_path) -> None:
    """``z_from: own``: the fit covers every expert's z location and every w location (in principal directions
    with kept_variance < 1), and a drawn design decodes component m from z_m, as the decoders saw in training."""
    run_dir, cfg = trained
    loaded = load_model(run_dir, prefer="last")
    split = load_split(cfg.data.root, "train", cfg.data)
    x = torch.from_numpy(split.images)
    c = torch.from_numpy(loaded.normalizer.normalize(split.conditions))
    model = loaded.model
    with torch.no_grad():
        post = model.encode(x.float() / 255, model.cond(c))
    latents = design_latents(model, x, c, own_z=True)
    assert latents.shape == (len(x), 3 * 4 + 3 * 4)
    torch.testing.assert_close(latents[:, :12].float(), post.z_loc.flatten(1))
    torch.testing.assert_close(latents[:, 12:].float(), post.w_loc.flatten(1))
    # one Gaussian over all of it: the joined vectors' mean; the expert is not chosen
    whole = fit_prior(model, x, c, components=1, z_from="own")
    assert whole.own_z and whole.expert is None and whole.basis is None and whole.latent_dim == 24
    torch.testing.assert_close(whole.means[0], torch.cat([latents, c.double()], 1).mean(0))
    # decoding: component m from (w_m, z_m), checked against the decoders called by hand
    with torch.no_grad():
        made = latent_probabilities(model, latents[:4].float(), c[:4])
        u = torch.cat([post.w_loc[:4], post.z_loc[:4]], dim=-1)
        by_hand = torch.sigmoid(model.decode(u, model.cond(c[:4]))).reshape(made.shape)
        shared = latent_probabilities(model, torch.cat([latents[:4, :4], latents[:4, 12:]], 1).float(), c[:4])
    torch.testing.assert_close(made, by_hand)
    assert (made[:, 1:] - shared[:, 1:]).abs().max().item() > 1e-3  # components 1, 2 no longer take expert 0's z
    with pytest.raises(ValueError, match="latents of 23 dimensions"):
        latent_probabilities(model, latents[:2, :23].float(), c[:2])
    # in principal directions: fewer fitted dimensions, draws of the full width, the fit travels in checkpoints
    flat = fit_prior(model, x, c, components=2, z_from="own", kept_variance=0.9)
    assert flat.latent_dim < 24 and flat.basis.shape == (flat.latent_dim, 24) and flat.output_dim == 24
    assert flat.sample(c[:5], torch.Generator().manual_seed(0)).shape == (5, 24)
    state = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    save_checkpoint(tmp_path / "own.pt", dict(state, fitted_prior=flat.to_state()))
    reloaded = load_model(tmp_path / "own.pt")
    assert reloaded.fitted_prior.own_z and reloaded.fitted_prior.latent_dim == flat.latent_dim
    (drawn,) = generate(reloaded, loaded.train_conditions[:4], batch_size=4, seed=0, sampler="fitted")
    assert drawn.shape == (4, 3, 64, 32)
    shared_fit = FittedPrior.from_state(state["fitted_prior"])
    shared_fit.own_z = True  # a shared-z fit read as an every-expert one has the wrong width
    save_checkpoint(tmp_path / "mixed.pt", dict(state, fitted_prior=shared_fit.to_state()))
    with pytest.raises(CheckpointError, match="covers 16 latent dimensions, the model has 24"):
        load_model(tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="z_from must be one of best, own"):
        fit_prior(model, x, c, z_from="mean")


def test_fitted_prior_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="model.fitted_prior_kept_variance must be in"):
        config_from_dict({"model": {"fitted_prior_kept_variance": 0.0}})
    with pytest.raises(ConfigError, match="model.fitted_prior_z"):
        config_from_dict({"model": {"fitted_prior_z": "mean"}})


def test_training_stores_the_fit_and_sampling_uses_it(trained, tmp_path, caplog) -> None:
    run_dir, cfg = trained
    path = run_dir / "checkpoints" / "last.pt"
    raw_state = torch.load(path, map_location="cpu", weights_only=True)  # the fit holds tensors and plain values only
    stored = raw_state["fitted_prior"]
    assert {type(v) for v in stored.values()} <= {torch.Tensor, int}
    state = read_checkpoint(path)
    designs = load_data(cfg.data).train  # the train split less the validation designs
    assert state["fitted_prior"]["designs"] == len(designs)
    loaded = load_model(run_dir, prefer="last")
    assert loaded.fitted_prior is not None and loaded.fitted_prior.latent_dim == 16
    # the loaded fit is the one the training wrote, and the weights it was fitted to give it again
    for key in ("weights", "means", "covariances"):
        torch.testing.assert_close(getattr(loaded.fitted_prior, key).float(), stored[key], rtol=0, atol=0)
    refit = fit_prior(loaded.model, torch.from_numpy(designs.images),
                      torch.from_numpy(loaded.normalizer.normalize(designs.conditions)),
                      cfg.model.fitted_prior_components, cfg.train.seed)
    torch.testing.assert_close(refit.means.float(), stored["means"], rtol=1e-4, atol=1e-5)
    raw = loaded.train_conditions[:6]
    (prior_made,) = generate(loaded, raw, batch_size=6, seed=0, sampler="prior")
    # a fitted prior squeezed onto one design's latents decodes every draw to that design's reconstruction
    x = torch.from_numpy(load_split(cfg.data.root, "train", cfg.data).images[:1])
    c = torch.from_numpy(loaded.normalizer.normalize(raw))
    point = design_latents(loaded.model, x, c[:1])
    d = point.shape[1]
    loaded.fitted_prior = FittedPrior(torch.ones(1, dtype=torch.float64),
                                      torch.cat([point, torch.zeros(1, 2, dtype=torch.float64)], 1),
                                      torch.eye(d + 2, dtype=torch.float64)[None] * 1e-10, d, 1)
    (fitted_made,) = generate(loaded, raw, batch_size=6, seed=0, sampler="fitted")
    expected = latent_probabilities(loaded.model, point.float().expand(6, -1), c).numpy()
    np.testing.assert_allclose(fitted_made, expected, atol=1e-4)
    assert np.abs(fitted_made - prior_made).max() > 0.1
    loaded.config.model.latent_sampler = "fitted"  # the config's choice is the default
    (by_config,) = generate(loaded, raw, batch_size=6, seed=0)
    np.testing.assert_array_equal(by_config, fitted_made)
    with pytest.raises(SamplingError, match="--latent-sampler"):
        next(generate(loaded, raw, sampler="gmm"))

    # a damaged fit is a clear error naming the file
    broken = dict(state, fitted_prior={**state["fitted_prior"], "means": torch.zeros(3)})
    save_checkpoint(tmp_path / "broken.pt", broken)
    with pytest.raises(CheckpointError, match="broken.pt: its fitted_prior is damaged"):
        load_model(tmp_path / "broken.pt")
    save_checkpoint(tmp_path / "unknown.pt", dict(state, whole_components=["group_nc", "tread"]))
    with pytest.raises(CheckpointError, match=r"unknown.pt: its whole_components \['group_nc', 'tread'\] are not"):
        load_model(tmp_path / "unknown.pt")
    assert loaded.whole_components == list(state["components"])  # the synthetic designs: none in pieces
    fit_for_another = FittedPrior.from_state(stored)
    fit_for_another.latent_dim = 15
    save_checkpoint(tmp_path / "other.pt", dict(state, fitted_prior=fit_for_another.to_state()))
    with pytest.raises(CheckpointError, match="other.pt: its fitted_prior covers 15 latent dimensions, the model has 16"):
        load_model(tmp_path / "other.pt")

    # a checkpoint without a fit (an older epure, or saved mid-epoch) warns and draws from the priors
    del state["fitted_prior"]
    save_checkpoint(tmp_path / "old.pt", state)
    old = load_model(tmp_path / "old.pt")
    assert old.fitted_prior is None
    with caplog.at_level(logging.WARNING):
        (fallback,) = generate(old, raw, batch_size=6, seed=0, sampler="fitted")
    assert "holds no fitted prior" in caplog.text
    (plain,) = generate(old, raw, batch_size=6, seed=0, sampler="prior")
    np.testing.assert_array_equal(fallback, plain)


def test_training_fits_only_for_pictures_and_at_the_end(tmp_path, monkeypatch) -> None:
    """A fit encodes every training design, so training skips it at epochs nothing uses it: epoch 2 draws
    pictures (fitted), epoch 3 ends the run; best.pt, saved at epoch 1 without a fit, is fitted to its own
    weights at the end."""
    root = synthetic_dataset(tmp_path / "data", n=120)
    cfg = tiny_config(root, tmp_path / "out", COMPONENTS, **{"train.epochs": 3, "wandb.images_every_epochs": 2,
                                                             "model.latent_sampler": "fitted"})
    losses = iter([5.0, 9.0, 7.0])  # validation losses by epoch: the first one stays the best
    monkeypatch.setattr(train_module, "validation_sums", lambda *args, **kwargs: [next(losses), 1.0])
    fitted_weights = []
    real_fit = train_module.fit_prior

    def counted_fit(model, *args, **kwargs):
        fitted_weights.append(next(model.parameters()).detach().clone())
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "fit_prior", counted_fit)
    pictured = []
    run_dir = train(cfg, images_fn=lambda loaded, data: pictured.append(loaded.fitted_prior) or {}).run_dir
    assert len(fitted_weights) == 3  # epoch 2 (pictures), epoch 3 (the end), best.pt's weights (epoch 1)
    assert len(pictured) == 2 and all(fit is not None for fit in pictured)
    best, last = (read_checkpoint(run_dir / "checkpoints" / name) for name in ("best.pt", "last.pt"))
    assert (best["epoch"], last["epoch"]) == (1, 3)
    assert last["exclusive_components"] is True  # the synthetic designs have one component per pixel
    assert last["whole_components"] == list(cfg.data.components)  # ... and none in pieces (best_of judges each)
    first_weight = next(iter(best["model"].values()))
    torch.testing.assert_close(fitted_weights[2], first_weight)  # the refit saw best.pt's weights...
    assert not torch.equal(fitted_weights[1], first_weight)
    loaded = load_model(run_dir)  # ...and the model's own weights came back afterwards
    designs = load_data(cfg.data).train
    refit = fit_prior(loaded.model, torch.from_numpy(designs.images),
                      torch.from_numpy(loaded.normalizer.normalize(designs.conditions)), 1, cfg.train.seed)
    torch.testing.assert_close(loaded.fitted_prior.means.float(), refit.means.float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(loaded.fitted_prior.means, FittedPrior.from_state(last["fitted_prior"]).means)
    final = load_model(run_dir, prefer="last")
    torch.testing.assert_close(next(final.model.parameters()), fitted_weights[1])


def test_evaluate_and_sample_take_the_sampler(trained, tmp_path) -> None:
    run_dir, cfg = trained
    loaded = load_model(run_dir)
    test = load_split(cfg.data.root, "test", cfg.data)
    # at 0.5: at its calibrated threshold this 2-epoch model draws nearly empty designs under both rules
    by_rule = {rule: evaluate(loaded, test, EvaluationOptions(bootstrap=0, draws=0, latent_sampler=rule, threshold=0.5))
               for rule in ("prior", "fitted")}
    assert by_rule["fitted"].info["latent_sampler"] == "fitted" and by_rule["prior"].info["latent_sampler"] == "prior"
    assert by_rule["fitted"].info["candidates"] == 1  # the model's model.sample_candidates
    np.testing.assert_array_equal(by_rule["fitted"].iou, by_rule["prior"].iou)  # completions do not change
    assert by_rule["fitted"].dims != by_rule["prior"].dims
    with pytest.raises(EvaluationError, match="--latent-sampler"):
        evaluate(loaded, test, EvaluationOptions(latent_sampler="gmm"))

    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(run_dir), "--bootstrap", "0", "--draws", "0",
                              "--latent-sampler", "fitted", "--candidates", "3", "--out", str(tmp_path / "e.json"),
                              "--device", "cpu"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "e.json").read_text())["info"]
    assert info["latent_sampler"] == "fitted" and info["candidates"] == 3
    assert info["whole_components"] == loaded.whole_components == list(cfg.data.components)
    assert "unconditional latents from the fitted prior, each design the best of 3 draws" in " ".join(res.output.split())
    for rule in ("prior", "fitted"):
        res = runner.invoke(app, ["sample", "--checkpoint", str(run_dir), "--num-samples", "3", "--seed", "1",
                                  "--latent-sampler", rule, "--out", str(tmp_path / rule), "--device", "cpu"])
        assert res.exit_code == 0, res.output
    made = {rule: sorted((tmp_path / rule / "unconditional" / "group_nc").glob("*.png")) for rule in ("prior", "fitted")}
    assert len(made["prior"]) == len(made["fitted"]) == 3
    assert [p.read_bytes() for p in made["prior"]] != [p.read_bytes() for p in made["fitted"]]
    res = runner.invoke(app, ["sample", "--checkpoint", str(run_dir), "--latent-sampler", "gmm",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "--latent-sampler must be one of prior, fitted" in res.output
