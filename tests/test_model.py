"""MMVAE+ model and objectives: shapes, learning, batched == straightforward decoding, the bounds and their
gradient estimators, completion rules."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Laplace

from epure.config import ConfigError, config_from_dict
from epure.model import MMVAEPlus, forward_objective, reference
from epure.model.generation import completion_probabilities, unconditional_probabilities
from epure.model.likelihoods import log_likelihood
from epure.model.mmvae import Posteriors
from epure.model.networks import MOMENTS, mask_moments
from epure.model.objectives import draw_latents, draw_strata
from epure.model.reference import StraightforwardModel

from factories import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(m: int, seed: int = 0, **model_overrides) -> MMVAEPlus:
    components = [f"c{i}" for i in range(m)]
    cfg = tiny_config(None, ".", components, **{f"model.{k}": v for k, v in model_overrides.items()})
    torch.manual_seed(seed)
    return MMVAEPlus(cfg.model, components, cfg.data.image_size)


def batch(m: int, b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, m, 64, 32, generator=g) > 0.6).float(), torch.randn(b, 2, generator=g)


@pytest.mark.parametrize("m", [3, 5])
def test_shapes(m: int) -> None:
    model = make_model(m)
    x, c = batch(m)
    emb = model.cond(c)
    post = model.encode(x, emb)
    assert post.w_loc.shape == (4, m, 4) and post.z_scale.shape == (4, m, 4)
    assert (post.w_scale > 0).all() and (post.z_scale > 0).all()
    assert model.decode(torch.randn(4, m, 8), emb).shape == (4, m, 64, 32)
    assert unconditional_probabilities(model, c).shape == (4, m, 64, 32)
    done = completion_probabilities(model, x, c, [0, m - 1], joint="product", use_mean=True)
    assert done.shape == (4, m, 64, 32) and 0 <= done.min() and done.max() <= 1
    for objective, k in [("elbo", 1), ("dreg", 3)]:
        out = forward_objective(model, x, c, objective, beta=2.5, k=k)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss)
        assert {f"recon/c{i}" for i in range(m)} <= set(out.terms)


def test_latent_sizes_must_add_up() -> None:
    with pytest.raises(ConfigError, match="latent_dim_u"):
        config_from_dict({"model": {"latent_dim_w": 4, "latent_dim_z": 4, "latent_dim_u": 9}})


def test_foreground_weight_moves_the_optimum_to_the_weighted_odds() -> None:
    # a pixel occupied in 1 of 3 designs: the plain likelihood's best probability is 1/3, with the occupied
    # pixels counted twice it is 2 * 1/3 / (2 * 1/3 + 2/3) = 0.5 (the threshold the metrics use)
    targets = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    for weight, expected in [(1.0, 1 / 3), (2.0, 0.5), (4.0, 2 / 3)]:
        logit = torch.zeros(1, 1, 1, requires_grad=True)
        optimizer = torch.optim.Adam([logit], lr=0.05)
        for _ in range(600):
            optimizer.zero_grad()
            (-log_likelihood(logit.expand(3, 1, 1), targets, "bernoulli", 0.75, weight).sum()).backward()
            optimizer.step()
        assert torch.sigmoid(logit).item() == pytest.approx(expected, abs=1e-3)


def test_mask_moments_of_a_rectangle() -> None:
    """An h x w block at (r, c): area h w, centre (r + (h-1)/2, c + (w-1)/2), spreads sqrt((h^2-1)/12) and
    sqrt((w^2-1)/12), no correlation, perimeter 2 (h + w); a tilted bar correlates; an empty mask is zero."""
    x = torch.zeros(3, 1, 64, 32)
    x[0, 0, 10:16, 4:7] = 1.0  # 6 x 3
    x[1, 0, torch.arange(20, 30), torch.arange(5, 15)] = 1.0  # a diagonal going down and right
    moments = mask_moments(x)
    expected = [math.sqrt(18), 12.5, 5.0, math.sqrt(35 / 12), math.sqrt(8 / 12), 0.0, math.sqrt(18)]
    torch.testing.assert_close(moments[0], torch.tensor(expected), atol=1e-3, rtol=0)
    assert moments.shape == (3, MOMENTS) and moments[1, 5] > 0.99
    assert torch.all(moments[2, [0, 6]] == 0)


def test_moment_standardisation_leaves_missing_components_out() -> None:
    """A missing component's blank mask is no design's shape: only the available masks set its moments."""
    components = ["a", "b"]
    cfg = tiny_config(None, ".", components, **{"model.encoder_moments": True})
    model = MMVAEPlus(cfg.model, components, cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    images = ((torch.rand(10, 2, 64, 32, generator=g) > 0.8) * 255).to(torch.uint8)
    available = torch.ones(10, 2, dtype=torch.bool)
    images[:4, 1], available[:4, 1] = 0, False
    model.standardise_moments(images, available)
    present = mask_moments(images[4:, 1:2].float() / 255)
    torch.testing.assert_close(model.encoders[1].moment_loc, present.mean(0))
    torch.testing.assert_close(model.encoders[1].moment_scale, present.std(0))
    torch.testing.assert_close(model.encoders[0].moment_loc, mask_moments(images[:, :1].float() / 255).mean(0))


def test_decoders_take_their_own_width() -> None:
    model = make_model(3, decoder_nf=12, decoder_nf_max=24)
    assert model.encoders[0].w_tower.stem.out_channels == 8 and model.decoders[0].out.in_channels == 12
    assert model.decoders[0].base_shape[0] == 24
    assert make_model(3).decoders[0].out.in_channels == 8  # 0: the encoders' width
    x, c = batch(3)
    assert torch.isfinite(forward_objective(model, x, c, "elbo", 1.0, 1).loss)
    with pytest.raises(ConfigError, match="model.decoder_nf' must be positive, or 0"):
        config_from_dict({"model": {"decoder_nf": -1}})


def test_foreground_weight_is_checked() -> None:
    with pytest.raises(ConfigError, match="model.foreground_weight must be positive"):
        config_from_dict({"model": {"foreground_weight": 0.0}})
    with pytest.raises(ConfigError, match="bernoulli likelihood only"):
        config_from_dict({"model": {"foreground_weight": 2.0, "likelihood": "normal"}})


def test_continuous_bernoulli_is_a_density_on_the_unit_interval() -> None:
    # unlike the Bernoulli cross-entropy, it integrates to 1 over grey values x in [0, 1] for any decoder output,
    # near logit 0 (where its normaliser needs care) as well as far from it
    x = torch.linspace(0, 1, 20_001, dtype=torch.float64).view(-1, 1, 1)
    for logit in [-6.0, -0.4, 0.0, 1e-4, 3.0]:
        logits = torch.full((1, 1, 1), logit, dtype=torch.float64)
        density = log_likelihood(logits, x, "continuous_bernoulli", 0.75).exp()
        assert torch.trapezoid(density, x.flatten()).item() == pytest.approx(1.0, abs=1e-4), logit
    bernoulli = log_likelihood(torch.full((1, 1, 1), 3.0), torch.ones(1, 1, 1), "bernoulli", 0.75)
    continuous = log_likelihood(torch.full((1, 1, 1), 3.0), torch.ones(1, 1, 1), "continuous_bernoulli", 0.75)
    assert continuous.item() > bernoulli.item()  # the normaliser adds log C(lambda) > 0


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "normal", "laplace"])
def test_loss_falls_within_a_few_dozen_steps(likelihood: str) -> None:
    model = make_model(3, likelihood=likelihood)
    x, c = batch(3, b=8)
    x[:, :, 10:40, 5:20] = 1.0  # a shared structure to learn
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = forward_objective(model, x, c, "elbo", beta=1.0, k=1)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # a fixed-scale normal/laplace likelihood carries a large constant per pixel: compare against it loosely
    assert last < (0.8 if "bernoulli" in likelihood else 0.97) * first, (first, last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("objective,k", [("elbo", 1), ("elbo", 2), ("dreg", 3)])
def test_batched_decoding_equals_one_call_per_pair(objective: str, k: int, dtype: torch.dtype) -> None:
    """The fast path (one decoder call per target) gives the straightforward path's loss and gradients.

    In float64 they agree to rounding (the same arithmetic); in float32 only the summation order of the
    bias gradients (sums over ~10^5 pixels) differs, which stays within 1e-5 (K = 1) / 3e-5 (K > 1, where the
    importance weights amplify it) relative.
    """
    model = make_model(3).to(dtype)
    x, c = (t.to(dtype) for t in batch(3))
    results = []
    for path in (model, StraightforwardModel(model)):
        torch.manual_seed(7)
        model.zero_grad()
        out = forward_objective(path, x, c, objective, beta=2.5, k=k)
        out.loss.backward()
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_a, grads_a), (loss_b, grads_b) = results
    tolerance = 1e-12 if dtype == torch.float64 else (1e-5 if k == 1 else 3e-5)
    assert abs(loss_a - loss_b) <= tolerance * abs(loss_b)
    assert torch.linalg.norm(grads_a - grads_b) <= tolerance * torch.linalg.norm(grads_b)


def small_float64_model(m: int = 3, seed: int = 0, **model_overrides) -> tuple[MMVAEPlus, torch.Tensor, torch.Tensor]:
    """A float64 model on 8x8 masks (one design, its conditions): the estimator tests run thousands of draws."""
    components = [f"c{i}" for i in range(m)]
    cfg = tiny_config(None, ".", components, **{"data.image_size": [8, 8], "model.nf": 4, "model.nf_max": 4,
                                                **{f"model.{k}": v for k, v in model_overrides.items()}})
    torch.manual_seed(seed)
    model = MMVAEPlus(cfg.model, components, cfg.data.image_size).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(1, m, 8, 8, generator=g, dtype=torch.float64) > 0.5).double()
    return model, x, torch.randn(1, 2, generator=g, dtype=torch.float64)


def brute_force_bound(model: MMVAEPlus, x: torch.Tensor, c: torch.Tensor, beta: float, k: int) -> torch.Tensor:
    """The stratified importance-weighted bound, one (example, stratum, draw, target) at a time with
    torch.distributions: mean over examples b and strata m of log 1/K sum_k exp lw[k, b, m]."""
    emb = model.cond(c)
    post = StraightforwardModel(model).encode(x, emb)
    draws = draw_latents(model, post, k)  # the noise forward_objective draws after the same seed
    n_ex, m = x.shape[:2]
    bounds = []
    for b in range(n_ex):
        for src in range(m):
            lw = []
            for s in range(k):
                z, w = draws.z[s, b, src], draws.w[s, b, src]
                lpx = 0.0
                for tgt in range(m):
                    u = torch.cat([w if tgt == src else draws.w_aux[s, b, src, tgt], z])
                    logits = reference.decoder(model.decoders[tgt], u[None], emb[b: b + 1])[0]
                    lpx = lpx + Bernoulli(logits=logits).log_prob(x[b, tgt]).sum()
                prior = Laplace(torch.zeros_like(z), torch.ones_like(z))
                lqz = torch.logsumexp(torch.stack([Laplace(post.z_loc[b, j], post.z_scale[b, j]).log_prob(z).sum()
                                                   for j in range(m)]), 0) - math.log(m)
                lqw = Laplace(post.w_loc[b, src], post.w_scale[b, src]).log_prob(w).sum()
                lw.append(lpx + beta * (prior.log_prob(z).sum() + prior.log_prob(w).sum() - lqz - lqw))
            bounds.append(torch.logsumexp(torch.stack(lw), 0) - math.log(k))
    return torch.stack(bounds).mean()


@pytest.mark.parametrize("k", [1, 3])
def test_elbo_is_the_stratified_importance_weighted_bound(k: int) -> None:
    """``elbo`` with K draws is log-mean-exp over the K draws of each stratum, averaged over the strata, with
    the plain reparameterised gradient of that bound (not the average of K single-draw bounds)."""
    model, x, c = small_float64_model()
    x, c = torch.cat([x, 1 - x]), torch.cat([c, -c])  # two examples
    params = list(model.parameters())
    torch.manual_seed(5)
    out = forward_objective(model, x, c, "elbo", beta=2.5, k=k)
    grads = torch.autograd.grad(out.loss, params)
    torch.manual_seed(5)
    expected = brute_force_bound(model, x, c, 2.5, k)
    expected_grads = torch.autograd.grad(-expected, params)
    assert out.bound.item() == pytest.approx(expected.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx(-expected.item(), rel=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_random_strata_are_uniform_among_the_available_components() -> None:
    """``draw_strata`` picks min(s, |A|) of a design's available components A, each equally often."""
    available = torch.tensor([[True] * 5, [True, False, True, True, False], [False, True, False, False, False]])
    torch.manual_seed(0)
    counts = torch.zeros(3, 5)
    for _ in range(4000):
        strata = draw_strata(available, 2)
        assert not (strata & ~available).any()
        assert strata.sum(1).tolist() == [2, 2, 1]
        counts += strata
    share = counts / 4000
    torch.testing.assert_close(share[0], torch.full((5,), 0.4), atol=0.03, rtol=0)
    torch.testing.assert_close(share[1, [0, 2, 3]], torch.full((3,), 2 / 3), atol=0.03, rtol=0)
    assert torch.equal(draw_strata(available, 0), available)  # 0: every available component
    with pytest.raises(ConfigError, match="model.strata_per_design"):
        config_from_dict({"model": {"strata_per_design": 6}})


@pytest.mark.parametrize("objective,k", [("elbo", 1), ("dreg", 3)])
def test_the_bound_is_the_mean_of_the_one_stratum_bounds(objective: str, k: int) -> None:
    """With the same draws, the bound of every stratum is the mean of the bounds of each stratum alone, so a
    uniformly drawn subset of strata (``model.strata_per_design``) estimates it without bias."""
    model, x, c = small_float64_model()
    bounds = []
    for strata in [None, *torch.eye(3, dtype=torch.bool)[:, None]]:
        torch.manual_seed(5)
        bounds.append(forward_objective(model, x, c, objective, beta=2.5, k=k, strata=strata).bound.item())
    assert bounds[0] == pytest.approx(sum(bounds[1:]) / 3, rel=1e-12)
    assert len(set(bounds[1:])) == 3  # the strata differ, so the check above could fail


def posterior_gradients(model: MMVAEPlus, x: torch.Tensor, c: torch.Tensor, objective: str, beta: float, k: int,
                        draws: int, seed: int) -> torch.Tensor:
    """``draws`` independent estimates [draws, D] of the gradient of -bound with respect to the posterior
    parameters (w loc and scale, z loc and scale of every component) of one design.

    The design is repeated ``draws`` times in one batch: each row draws its own noise and only its own
    posterior parameters affect its bound, so one backward pass gives every row's estimate.
    """
    with torch.no_grad():
        post = model.encode(x, model.cond(c))
    leaves = [t.expand(draws, *t.shape[1:]).clone().requires_grad_(True)
              for t in (post.w_loc, post.w_scale, post.z_loc, post.z_scale)]
    encode = model.encode
    model.encode = lambda *args, **kwargs: Posteriors(*leaves)
    try:
        torch.manual_seed(seed)
        out = forward_objective(model, x.expand(draws, -1, -1, -1), c.expand(draws, -1), objective, beta, k)
        grads = torch.autograd.grad(out.loss * draws, leaves)
    finally:
        model.encode = encode
    return torch.cat([g.flatten(1) for g in grads], dim=1)


def posterior_jacobian(model: MMVAEPlus, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """d(posterior parameters) / d(encoder parameters) [D, P] for one design: maps the estimates above to
    the encoder parameters' gradients (the condition embedding held fixed)."""
    params = [p for encoder in model.encoders for p in encoder.parameters()]
    post = model.encode(x, model.cond(c).detach())
    outputs = torch.cat([t.flatten() for t in (post.w_loc, post.w_scale, post.z_loc, post.z_scale)])
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(o, params, retain_graph=True)]) for o in outputs]
    return torch.stack(rows)


@pytest.mark.parametrize("beta,k,experts", [(0.5, 2, "alike"), (0.5, 8, "alike"), (2.5, 2, "alike"),
                                            (2.5, 8, "alike"), (2.5, 8, "apart")])
def test_dreg_is_unbiased_for_the_weighted_bound_with_lower_variance(beta: float, k: int, experts: str) -> None:
    """DReG's encoder gradient has the mean of the plain reparameterised gradient of the same bound, for
    beta != 1 and for a mixture of unlike experts too, and a lower variance.

    Means are compared per posterior parameter (every encoder parameter's gradient is a fixed linear map of
    these): each difference within a few standard errors. The test can fail: weighting the paths by w~^2
    (right only at beta = 1) fails the beta 2.5 and K 8 cases (largest |z| 4.6 to 10.6 with fewer draws),
    and the MMVAE code's mixture rule (every expert detached, z's path weighted like w's) fails "apart",
    where the three experts' shared locations are moved apart (mean z^2 3.4, against 1.2 here). Variances are
    summed over the encoder parameters (measured ratios about 0.2 alike, 0.5 apart).
    """
    model, x, c = small_float64_model(m=2 if experts == "alike" else 3, seed=2)
    if experts == "apart":
        torch.manual_seed(11)
        with torch.no_grad():
            for encoder in model.encoders:
                encoder.z_tower.head.bias[: model.cfg.latent_dim_z] += 2 * torch.randn(model.cfg.latent_dim_z,
                                                                                        dtype=torch.float64)
    draws = 400 if k == 8 and experts == "alike" else 1000  # "apart" needs 1000 to show the MMVAE rule's bias
    dreg = posterior_gradients(model, x, c, "dreg", beta, k, draws, seed=1)
    plain = posterior_gradients(model, x, c, "elbo", beta, k, draws, seed=2)
    z = (dreg.mean(0) - plain.mean(0)) / (dreg.var(0) / draws + plain.var(0) / draws).sqrt()
    assert z.abs().max() < 4.5 and (z**2).mean() < 2.0, z
    jacobian = posterior_jacobian(model, x, c)
    var_dreg, var_plain = (dreg @ jacobian).var(0).sum(), (plain @ jacobian).var(0).sum()
    assert var_dreg < 0.7 * var_plain, (var_dreg, var_plain)

def decoded_latents(model: MMVAEPlus, x: torch.Tensor, c: torch.Tensor, observed: list[int], **options):
    """The latents u [N, M, du] that completion hands to the decoders, and the posteriors of ``observed``."""
    seen = []
    decode = model.decode
    model.decode = lambda u, cond: seen.append(u) or decode(u, cond)
    try:
        completion_probabilities(model, x, c, observed, generator=torch.Generator().manual_seed(4), **options)
    finally:
        del model.decode  # the class's method again
    return seen[0], model.encode(x, model.cond(c), observed)


def test_completion_draws_unobserved_private_latents_from_the_prior_or_r() -> None:
    """The paper's rule (default, ``model.cross_prior: prior``): unobserved w ~ p(w); ``aux``: w ~ r_m(w).
    Same generator seed, so the same noise: the two differ by r's scale exactly, on the unobserved rows only."""
    model = make_model(3, seed=4)
    assert model.cfg.cross_prior == "prior"
    with torch.no_grad():
        model.aux_raw_scale.copy_(torch.randn_like(model.aux_raw_scale))  # scales far from the prior's 1
    x, c = batch(3, b=5)
    dw = model.cfg.latent_dim_w
    prior_u, _ = decoded_latents(model, x, c, [1])
    aux_u, _ = decoded_latents(model, x, c, [1], cross_prior="aux")
    torch.testing.assert_close(aux_u[:, [0, 2], :dw], prior_u[:, [0, 2], :dw] * model.aux_scale()[[0, 2]])
    torch.testing.assert_close(aux_u[:, 1], prior_u[:, 1])  # the observed w and every z: untouched
    model.cfg.cross_prior = "aux"  # the stored config's rule when none is passed
    torch.testing.assert_close(decoded_latents(model, x, c, [1])[0], aux_u)
    with pytest.raises(ValueError, match="cross_prior"):
        completion_probabilities(model, x, c, [1], cross_prior="posterior")


def test_mean_completion_uses_the_mean_of_the_joint_rule() -> None:
    """--mean: the mixture's mean is the average of the observed experts' locations; the product's is their
    precision-weighted average; the observed w keep their posterior locations."""
    model = make_model(3, seed=5)
    x, c = batch(3, b=4)
    dw = model.cfg.latent_dim_w
    u, post = decoded_latents(model, x, c, [0, 2], use_mean=True)
    torch.testing.assert_close(u[:, 1, dw:], post.z_loc.mean(1))
    torch.testing.assert_close(u[:, [0, 2], :dw], post.w_loc)
    u, post = decoded_latents(model, x, c, [0, 2], joint="product", use_mean=True)
    precision = 1 / (2 * post.z_scale**2)  # Laplace variance 2 b^2
    torch.testing.assert_close(u[:, 1, dw:], (precision * post.z_loc).sum(1) / precision.sum(1))
    assert not torch.allclose(post.z_loc[:, 0], post.z_loc[:, 1])  # so the averages differ from either expert


@pytest.mark.parametrize("family", ["Laplace", "Normal"])
def test_auxiliary_priors_start_at_the_priors_scale(family: str) -> None:
    model = make_model(3, priorposterior=family)
    torch.testing.assert_close(model.aux_scale(), torch.ones(3, model.cfg.latent_dim_w), atol=1e-5, rtol=0)
