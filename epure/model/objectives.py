"""Training objectives of MMVAE+ by name (``model.objective``): the stratified mixture ELBO and its DReG version.

    >>> import torch
    >>> from epure.config import load_config
    >>> from epure.model import MMVAEPlus, forward_objective
    >>> cfg = load_config("small")
    >>> model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
    >>> out = forward_objective(model, torch.zeros(2, 5, 64, 32), torch.zeros(2, 2), "dreg", beta=2.5, k=4)
    >>> out.loss.backward()

For each source component m (a stratum), draw K samples (w_m, z) ~ q(w_m, z | x_m). Decode x_m from
(w_m, z) and every other component n from (w~r_n, z). The log weight of a sample is

    lw = sum_n log p(x_n | w_mn, z) + beta * (log p(z) + log p(w_m) - log q(z | x_1..M) - log q(w_m | x_m)),

with q(z | x_1..M) = 1/M sum_j q(z | x_j), the mixture of experts. Both objectives maximise the stratified
importance-weighted bound: the log-mean-exp of lw over the K samples of each stratum, averaged over the
strata (for K = 1 the ELBO itself). They differ in the gradient estimator:

- ``elbo``: plain reparameterised gradients of the bound.
- ``dreg``: doubly reparameterised gradients (Tucker et al. 2019), for any beta and for the mixture. The
  gradient of the bound is sum_k w~_k (path_k - beta score_k): w~ the normalised importance weights, path_k
  the gradient reaching the encoder through sample k, score_k that of log q at the fixed sample. The
  reparameterisation identity E[h score_k] = E[(dh / d sample_k) path_k] turns the score of the distribution
  a sample was drawn from into path gradients. The private w_m was drawn from q(w_m | x_m): its path weight
  becomes (1 - beta) w~ + beta w~^2 (w~^2 at beta = 1). The shared z of stratum m was drawn from its own
  expert q(z | x_m) but is weighed under the mixture, whose score splits by responsibility
  r_j(z) = q(z | x_j) / sum_i q(z | x_i): the own expert's share r_m score_m becomes the path weight
  w~ (1 - beta r_m (1 - w~)) plus the path gradient of -beta w~ r_m, and the other experts' shares are no
  scores (those experts did not draw z), so they keep their plain gradients. With one component (r_m = 1)
  the two weights agree. Detaching every expert and weighting z's path like w's (the MMVAE code's DReG) is
  exact only for K = 1 or identical experts; see docs/model.md (where the code departs from the paper).

Incomplete designs (an availability mask [B, M], as MultiVae trains MMVAE+ on incomplete data): for each
design, the mixture runs over its available components only, 1/|A| sum_{j in A} q(z | x_j) (so do the
responsibilities of DReG); only available components are strata, and the bound averages over those; only
available components are targets. A design's bound is then the complete-data bound of a model of its
available components alone. Missing images are zeros and never reach the loss. (The MMVAE+ paper assumes
complete data; see the README.) Training may estimate each design's bound from a random subset of its
available strata (``model.strata_per_design``, ``draw_strata``): the same bound in expectation, for a
fraction of the decoders.

An objective is a function of one ``Evaluation`` (the posteriors, the draws and every (source, target)
log-likelihood of a batch) registered with ``@register_objective("name")``; config validation lists the
registered names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from epure.model.likelihoods import log_likelihood
from epure.model.mmvae import MMVAEPlus, Posteriors
from epure.model.networks import at_least_float32


@dataclass
class LatentDraws:
    """All random draws of one objective evaluation, made once so every decoding path sees the same ones."""

    w: torch.Tensor  # [K, B, M, dw] posterior samples of each source's private latent
    z: torch.Tensor  # [K, B, M, dz] posterior samples of each source's shared latent
    w_aux: torch.Tensor  # [K, B, M, M, dw] r_n(w) draws for (source m, target n); diagonal unused


@dataclass
class Evaluation:
    """One pass of the model over a batch x [B, M, H, W]: what an objective turns into a loss."""

    model: MMVAEPlus
    x: torch.Tensor
    post: Posteriors
    draws: LatentDraws  # draws.z is a node of its own in front of the log weights (see ``evaluate``)
    z_drawn: torch.Tensor  # the shared draws themselves
    lpx: torch.Tensor  # [K, B, M_source, M_target] log p(x_n | u_mn)
    k: int
    available: torch.Tensor  # bool [B, M]: which components each design has
    strata: torch.Tensor  # bool [B, M]: the available sources whose strata the bound averages (``draw_strata``)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar to minimise
    bound: torch.Tensor  # scalar, per-example bound (nats), for reporting
    terms: dict[str, torch.Tensor]  # detached per-term means for logging


Objective = Callable[[Evaluation, float], ObjectiveOutput]  # (evaluation, beta) -> output
OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    def register(objective: Objective) -> Objective:
        OBJECTIVES[name] = objective
        return objective

    return register


def forward_objective(model: MMVAEPlus, x: torch.Tensor, conditions: torch.Tensor, objective: str = "elbo",
                      beta: float = 1.0, k: int = 1, share: tuple[int, int] | None = None,
                      available: torch.Tensor | None = None, strata: torch.Tensor | None = None) -> ObjectiveOutput:
    """The registered ``objective`` on a batch x [B, M, H, W] in [0, 1] with normalised conditions [B, C].

    ``share``: see ``draw_latents`` (distributed training). ``available``: bool [B, M], which components each
    design has (default: all); every design needs at least one. ``strata``: bool [B, M], the sources each design's
    bound averages (default: its available ones; see ``draw_strata``). ``model`` may be the straightforward view of a
    model (``reference.StraightforwardModel``): the same numbers, computed one (source, target) pair at a time.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; registered: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective](evaluate(model, x, conditions, k, share, available, strata), beta)


def evaluate(model: MMVAEPlus, x: torch.Tensor, conditions: torch.Tensor, k: int,
             share: tuple[int, int] | None = None, available: torch.Tensor | None = None,
             strata: torch.Tensor | None = None) -> Evaluation:
    """Encode, draw K samples per stratum, decode every (source, target) pair and score it (also the pairs of
    sources that are not strata: this is the one-graph reference; ``backward`` decodes the strata alone)."""
    cond_emb = model.cond(conditions)
    post = model.encode(x, cond_emb)
    draws = draw_latents(model, post, k, share)
    z_drawn = draws.z
    # the log weights get a node of their own for z, so that DReG can reweight their path gradient alone
    draws = LatentDraws(draws.w, draws.z.clone(), draws.w_aux)
    # logits [K, B, M_src, M_tgt, H, W] against x [B, M_tgt, H, W]
    lpx = model_log_likelihood(model, model.decode_pairs(decoder_inputs(draws), cond_emb), x[None, :, None])
    available = all_available(x) if available is None else available
    return Evaluation(model, x, post, draws, z_drawn, lpx, k, available, available if strata is None else strata)


def model_log_likelihood(model: MMVAEPlus, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | logits) summed over pixels, with the model's likelihood and its settings; in float32 also when
    the decoders ran in bf16 (``train.precision``): the sum over 2,048 pixels needs float32's digits."""
    cfg = model.cfg
    return log_likelihood(at_least_float32(logits), x, cfg.likelihood, cfg.likelihood_scale, cfg.foreground_weight)


def draw_latents(model: MMVAEPlus, post: Posteriors, k: int, share: tuple[int, int] | None = None) -> LatentDraws:
    """Reparameterised samples from the posteriors and the auxiliary priors (global RNG).

    ``share = (offset, global_batch)``: this batch is rows offset.. of a larger global batch split across
    processes; the noise of the whole global batch is drawn and this share's rows kept, so several
    processes see exactly the noise one process would see for the combined batch.
    """
    family, device = model.family, post.z_loc.device
    b, m, dw = post.w_loc.shape
    offset, total = share if share is not None else (0, b)
    rows = slice(offset, offset + b)
    w = post.w_loc + post.w_scale * family.noise((k, total, m, dw), device)[:, rows]
    z = post.z_loc + post.z_scale * family.noise((k, total, *post.z_loc.shape[1:]), device)[:, rows]
    w_aux = family.noise((k, total, m, m, dw), device)[:, rows] * model.aux_scale()  # scale of target n
    return LatentDraws(w, z, w_aux)


def draw_strata(available: torch.Tensor, per_design: int, share: tuple[int, int] | None = None) -> torch.Tensor:
    """bool [B, M]: ``per_design`` of each design's available components, uniformly at random (global RNG), as
    the strata its bound averages this step; 0, or a design with no more available: all of them.

    The bound is the mean over a design's available strata, so the mean over a uniform random subset of them
    is an unbiased estimate of it; its gradient costs the decoders of ``per_design`` sources instead of all M
    (``model.strata_per_design``; a departure from the paper, docs/model.md). ``share``: as ``draw_latents``.
    """
    b, m = available.shape
    if per_design == 0 or per_design >= m:
        return available
    offset, total = share if share is not None else (0, b)
    scores = torch.rand((total, m), device=available.device)[offset: offset + b]
    scores = torch.where(available, scores, -1.0)  # never chosen before an available component
    chosen = torch.zeros_like(available).scatter_(1, scores.topk(per_design, dim=1).indices, True)
    return chosen & available


def decoder_inputs(draws: LatentDraws) -> torch.Tensor:
    """u [K, B, M_source, M_target, du]: own posterior w on the diagonal, r_n(w) draws off it, z from source."""
    k, b, m, dw = draws.w.shape
    eye = torch.eye(m, dtype=torch.bool, device=draws.w.device)[None, None, :, :, None]
    w = torch.where(eye, draws.w[:, :, :, None, :].expand(k, b, m, m, dw), draws.w_aux)
    z = draws.z[:, :, :, None, :].expand(k, b, m, m, draws.z.shape[-1])
    return torch.cat([w, z], dim=-1)


def expert_log_densities(model: MMVAEPlus, post: Posteriors, z: torch.Tensor) -> torch.Tensor:
    """log q(z_m | x_j) [K, B, M_src, M_j]: each source's shared samples under every component's expert."""
    # z [K, B, M_src, 1, dz] against parameters [1, B, 1, M_j, dz]
    return model.family.log_density(z[:, :, :, None], post.z_loc[None, :, None], post.z_scale[None, :, None]).sum(-1)


def all_available(x: torch.Tensor) -> torch.Tensor:
    """The availability mask of complete designs: bool [B, M], all True."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (broadcast to them) holds; NaN when it holds nowhere."""
    mask = mask.expand_as(values)
    return torch.where(mask, values, 0).sum() / mask.sum()


def over_strata(values: torch.Tensor, strata: torch.Tensor) -> torch.Tensor:
    """[B, M] per-stratum values -> [B], each design's mean over its strata (bool [B, M])."""
    return torch.where(strata, values, 0).sum(-1) / strata.sum(-1).to(values.dtype)


def log_weights(ev: Evaluation, beta: float, fixed_proposals: bool = False) -> tuple[torch.Tensor, dict]:
    """lw [K, B, M] for each sample of each stratum, and its terms (detached, for logging).

    ``fixed_proposals`` (DReG): the parameters of the distribution each sample was drawn from (q(w_m | x_m) and
    the stratum's own expert q(z | x_m)) are held fixed, so no score term reaches them; the other experts of
    the mixture keep theirs, which enter the density at a point they did not draw (a plain dependence).
    A design's missing components are neither experts of its mixture nor targets; their strata, and those of
    sources that are not strata this step, still get a (meaningless) lw, which the bound leaves out.
    """
    model, post, draws, lpx, available = ev.model, ev.post, ev.draws, ev.lpx, ev.available
    family, m = model.family, model.num_components
    eye = torch.eye(m, dtype=torch.bool, device=lpx.device)
    targets = available[None, :, None, :]  # [1, B, 1, M_tgt]: also the experts j of each mixture
    strata = ev.strata[None]  # [1, B, M_src]
    zero, one = model.prior_loc, model.prior_scale
    lpz = family.log_density(draws.z, zero, one).sum(-1)  # [K, B, M]
    lpw = family.log_density(draws.w, zero, one).sum(-1)
    lqz_each = expert_log_densities(model, post, draws.z)
    fixed = post.detached() if fixed_proposals else post
    if fixed_proposals:
        lqz_each = torch.where(eye, expert_log_densities(model, fixed, draws.z), lqz_each)
    # the mixture over the available experts A: log 1/|A| sum_{j in A} q(z_m | x_j)
    lqz = torch.logsumexp(torch.where(targets, lqz_each, -math.inf), dim=-1) - \
        available.sum(-1).to(lqz_each.dtype).log()[None, :, None]
    lqw = family.log_density(draws.w, fixed.w_loc, fixed.w_scale).sum(-1)
    lw = torch.where(targets, lpx, 0).sum(-1) + beta * (lpz + lpw - lqz - lqw)
    pairs = strata[..., None] & targets  # [1, B, M_src, M_tgt]: both components there
    terms = {
        "recon_self": -masked_mean(lpx.diagonal(dim1=-2, dim2=-1), strata),
        "recon_cross": -masked_mean(lpx, pairs & ~eye),
        "kl_z": masked_mean(lqz - lpz, strata),
        "kl_w": masked_mean(lqw - lpw, strata),
    }
    for n, name in enumerate(model.components):  # reconstruction of target n, averaged over sources
        terms[f"recon/{name}"] = -masked_mean(lpx[..., n], pairs[..., n])
    return lw, {key: value.detach() for key, value in terms.items()}


def stratified_bound(lw: torch.Tensor, ev: Evaluation) -> torch.Tensor:
    """[B]: the log-mean-exp of lw [K, B, M] over the K samples of each stratum, averaged over each design's
    available strata."""
    return over_strata(torch.logsumexp(lw, 0) - math.log(ev.k), ev.strata)


@register_objective("elbo")
def elbo(ev: Evaluation, beta: float) -> ObjectiveOutput:
    """Plain reparameterised gradients of the stratified bound."""
    lw, terms = log_weights(ev, beta)
    bound = stratified_bound(lw, ev)
    return ObjectiveOutput(-bound.mean(), bound.mean().detach(), terms)


@register_objective("dreg")
def dreg(ev: Evaluation, beta: float) -> ObjectiveOutput:
    """Doubly reparameterised gradients of the stratified bound (see the module's docstring)."""
    lw, terms = log_weights(ev, beta, fixed_proposals=True)
    bound = stratified_bound(lw, ev)
    # responsibility r of each stratum's own expert among the available ones, parameters fixed: r = 1 when M = 1
    experts = torch.where(ev.available[None, :, None, :],
                          expert_log_densities(ev.model, ev.post.detached(), ev.z_drawn), -math.inf)
    own = torch.softmax(experts, dim=-1).diagonal(dim1=-2, dim2=-1)
    with torch.no_grad():
        weights = torch.softmax(lw, dim=0)  # normalised over the K samples of each stratum
        w_path = ((1.0 - beta) + beta * weights)[..., None]  # times the surrogate's own w~, below
        z_path = (1.0 - beta * own * (1.0 - weights))[..., None]
    if ev.draws.w.requires_grad:
        ev.draws.w.register_hook(lambda g: g * w_path)
        ev.draws.z.register_hook(lambda g: g * z_path)
    # gradients: sum_k w~_k d lw_k (decoders, r(w), the other experts) with the paths reweighted, and the
    # responsibility's own path; its value is the bound's
    surrogate = over_strata((weights * (lw - beta * own)).sum(0), ev.strata)  # [B]
    return ObjectiveOutput(-(bound.detach() + surrogate - surrogate.detach()).mean(), bound.mean().detach(), terms)
