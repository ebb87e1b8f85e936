"""Training objectives of MMVAE+: the stratified mixture ELBO and its importance-weighted DReG version.

For each source component m (a stratum), draw K samples (w_m, z) ~ q(w_m, z | x_m). Decode x_m from
(w_m, z) and every other component n from (w~r_n, z). The log weight of a sample is

    lw = sum_n log p(x_n | w_mn, z) + beta * (log p(z) + log p(w_m) - log q(z | x_1..M) - log q(w_m | x_m)),

with q(z | x_1..M) = 1/M sum_j q(z | x_j), the mixture of experts. ``elbo`` averages lw over samples and
strata; ``dreg`` averages log-mean-exp over the K samples of each stratum (the stratified IWAE bound) and
uses doubly reparameterised gradients: posterior parameters are detached inside the log weights, and the
gradient reaching each posterior sample is scaled by its normalised weight once more (weight squared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import ContinuousBernoulli
from torch.nn import functional as F

from epure.model.mmvae import MMVAEPlus, Posteriors, log_density, standard_noise


@dataclass
class LatentDraws:
    """All random draws of one objective evaluation, made once so every decoding path sees the same ones."""

    w: torch.Tensor  # [K, B, M, dw] posterior samples of each source's private latent
    z: torch.Tensor  # [K, B, M, dz] posterior samples of each source's shared latent
    w_aux: torch.Tensor  # [K, B, M, M, dw] r_n(w) draws for (source m, target n); diagonal unused


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar to minimise
    bound: torch.Tensor  # scalar, per-example bound (nats), for reporting
    terms: dict[str, torch.Tensor]  # detached per-term means for logging


def draw_latents(model: MMVAEPlus, post: Posteriors, k: int, share: tuple[int, int] | None = None) -> LatentDraws:
    """Reparameterised samples from the posteriors and the auxiliary priors (global RNG).

    ``share = (offset, global_batch)``: this batch is rows offset.. of a larger global batch split across
    processes; the noise of the whole global batch is drawn and this share's rows kept, so several
    processes see exactly the noise one process would see for the combined batch.
    """
    fam, device = model.family, post.z_loc.device
    b, m, dw = post.w_loc.shape
    offset, total = share if share is not None else (0, b)
    rows = slice(offset, offset + b)
    w = post.w_loc + post.w_scale * standard_noise((k, total, m, dw), fam, device)[:, rows]
    z = post.z_loc + post.z_scale * standard_noise((k, total, *post.z_loc.shape[1:]), fam, device)[:, rows]
    w_aux = standard_noise((k, total, m, m, dw), fam, device)[:, rows] * model.aux_scale()  # scale of target n
    return LatentDraws(w, z, w_aux)


def decoder_inputs(draws: LatentDraws) -> torch.Tensor:
    """u [K, B, M_source, M_target, du]: own posterior w on the diagonal, r_n(w) draws off it, z from source."""
    k, b, m, dw = draws.w.shape
    eye = torch.eye(m, dtype=torch.bool, device=draws.w.device)[None, None, :, :, None]
    w = torch.where(eye, draws.w[:, :, :, None, :].expand(k, b, m, m, dw), draws.w_aux)
    z = draws.z[:, :, :, None, :].expand(k, b, m, m, draws.z.shape[-1])
    return torch.cat([w, z], dim=-1)


def decode_all(model: MMVAEPlus, u: torch.Tensor, cond_emb: torch.Tensor, batched: bool = True) -> torch.Tensor:
    """Logits [K, B, M_source, M_target, H, W].

    ``batched`` (the fast path): one decoder call per target on all (sample, example, source) latents at once,
    the condition's share of the first layer computed once per example. Otherwise one call per (source,
    target) pair on the straightforward path, kept for the benchmark and the equality tests.
    """
    k, b, m, _, du = u.shape
    h, w = model.image_size
    if batched:
        cond = cond_emb[None, :, None]  # broadcasts over samples and sources
        per_target = [model.decode_target(n, u[:, :, :, n], cond).view(k, b, m, h, w) for n in range(m)]
        return torch.stack(per_target, dim=3)
    cond = cond_emb[None].expand(k, b, -1).reshape(k * b, -1)
    rows = [torch.stack([model.decode_target(n, u[:, :, src, n].reshape(k * b, du), cond, fast=False).view(k, b, h, w)
                         for n in range(m)], dim=2) for src in range(m)]
    return torch.stack(rows, dim=2)


def log_likelihood(logits: torch.Tensor, x: torch.Tensor, kind: str, scale: float,
                   foreground_weight: float = 1.0) -> torch.Tensor:
    """log p(x | decoder output), summed over pixels. logits [..., H, W], x broadcastable, values in [0, 1].

    ``foreground_weight`` w > 1 (bernoulli only) counts occupied pixels w times: the decoder then answers
    about w p / (w p + 1 - p) where p is the true chance that a pixel is occupied, so a pixel occupied in a
    third of the plausible designs crosses the 0.5 threshold at w = 2. Thin parts (one-pixel flank tips)
    that a calibrated decoder leaves just under 0.5 are kept, which keeps sections in one piece and at their
    requested height (measured on the toy benchmark, see the README).
    """
    if kind == "bernoulli":
        weight = None if foreground_weight == 1.0 else 1.0 + (foreground_weight - 1.0) * x  # broadcasts
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), weight,
                                                   reduction="none").sum((-2, -1))
    if kind == "continuous_bernoulli":
        # Bernoulli's cross-entropy plus the normaliser that makes it a density on [0, 1]. Images stay
        # sigmoid(logits): it exceeds 0.5 exactly where this distribution's mean does, so masks are the same.
        return ContinuousBernoulli(logits=logits, validate_args=False).log_prob(x).sum((-2, -1))
    mean = torch.sigmoid(logits)
    scale_t = torch.as_tensor(scale, dtype=logits.dtype, device=logits.device)
    family = "Normal" if kind == "normal" else "Laplace"
    return log_density(x, mean, scale_t, family).sum((-2, -1))


def log_weights(model: MMVAEPlus, x: torch.Tensor, post: Posteriors, draws: LatentDraws, logits: torch.Tensor,
                beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lw [K, B, M] for each sample of each stratum, and its terms."""
    fam, cfg = model.family, model.cfg
    m = model.num_components
    # log p(x_n | u_mn): logits [K, B, M_src, M_tgt, H, W] against x [B, M_tgt, H, W]
    lpx = log_likelihood(logits, x[None, :, None], cfg.likelihood, cfg.likelihood_scale,
                         cfg.foreground_weight)  # [K, B, M, M]
    zero, one = model.prior_loc, model.prior_scale
    lpz = log_density(draws.z, zero, one, fam).sum(-1)  # [K, B, M]
    lpw = log_density(draws.w, zero, one, fam).sum(-1)
    # mixture posterior: log 1/M sum_j q(z_m | x_j); z [K,B,M_src,1,dz] vs params [1,B,1,M_j,dz]
    lqz_each = log_density(draws.z[:, :, :, None], post.z_loc[None, :, None], post.z_scale[None, :, None], fam)
    lqz = torch.logsumexp(lqz_each.sum(-1), dim=-1) - math.log(m)
    lqw = log_density(draws.w, post.w_loc, post.w_scale, fam).sum(-1)
    lw = lpx.sum(-1) + beta * (lpz + lpw - lqz - lqw)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    terms = {
        "recon_self": -lpx.diagonal(dim1=-2, dim2=-1).mean(),
        "recon_cross": -(lpx.masked_fill(eye, 0).sum((-2, -1)) / max(1, m * (m - 1))).mean(),
        "kl_z": (lqz - lpz).mean(),
        "kl_w": (lqw - lpw).mean(),
    }
    for n, name in enumerate(model.components):  # reconstruction of target n, averaged over sources
        terms[f"recon/{name}"] = -lpx[..., n].mean()
    return lw, {k: v.detach() for k, v in terms.items()}


def forward_objective(model: MMVAEPlus, x: torch.Tensor, conditions: torch.Tensor, objective: str = "elbo",
                      beta: float = 1.0, k: int = 1, batched: bool = True,
                      share: tuple[int, int] | None = None) -> ObjectiveOutput:
    """Evaluate ``elbo`` or ``dreg`` on a batch x [B, M, H, W] in [0, 1] with normalised conditions [B, C].

    ``batched``: the fast path (default); False is the straightforward reference (see ``decode_all``).
    ``share``: see ``draw_latents`` (distributed training).
    """
    cond_emb = model.embed(conditions)
    post = model.encode(x, cond_emb, fast=batched)
    draws = draw_latents(model, post, k, share)
    logits = decode_all(model, decoder_inputs(draws), cond_emb, batched=batched)
    if objective == "elbo":
        lw, terms = log_weights(model, x, post, draws, logits, beta)
        bound = lw.mean(0).mean(-1)  # [B]
        return ObjectiveOutput(-bound.mean(), bound.mean().detach(), terms)
    if objective == "dreg":
        lw, terms = log_weights(model, x, post.detached(), draws, logits, beta)
        with torch.no_grad():
            weights = torch.softmax(lw, dim=0)  # normalised over the K samples of each stratum
        if draws.w.requires_grad:
            draws.w.register_hook(lambda g: g * weights[..., None])
            draws.z.register_hook(lambda g: g * weights[..., None])
        surrogate = (weights * lw).sum(0).mean(-1)  # [B]
        bound = (torch.logsumexp(lw.detach(), 0) - math.log(k)).mean(-1)
        return ObjectiveOutput(-surrogate.mean(), bound.mean(), terms)
    raise ValueError(f"unknown objective {objective!r}; expected 'elbo' or 'dreg'")


def iwae_objective(model: MMVAEPlus, x: torch.Tensor, conditions: torch.Tensor, beta: float, k: int) -> torch.Tensor:
    """Plain stratified IWAE loss (no DReG), the reference the DReG estimator is tested against."""
    cond_emb = model.embed(conditions)
    post = model.encode(x, cond_emb)
    draws = draw_latents(model, post, k)
    logits = decode_all(model, decoder_inputs(draws), cond_emb)
    lw, _ = log_weights(model, x, post, draws, logits, beta)
    return -(torch.logsumexp(lw, 0) - math.log(k)).mean(-1).mean()
