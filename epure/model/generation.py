"""Generation from a model, on tensors: whole designs from the prior, or completions of observed components.

    >>> import torch
    >>> from epure.config import load_config
    >>> from epure.model import MMVAEPlus
    >>> from epure.model.generation import unconditional_probabilities
    >>> cfg = load_config("small")
    >>> model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size).eval()
    >>> unconditional_probabilities(model, torch.zeros(4, 2)).shape  # [N, M, H, W], from normalised conditions
    torch.Size([4, 5, 64, 32])

Unconditional designs may instead draw their latents from a density fitted to the training designs' latents
(``fitted``, ``epure.model.fitted_prior``): a departure from the paper, see docs/model.md.

``epure.sample`` serves requests with these (batches, numpy, files). ``model`` may also be the
straightforward view of a model (``reference.StraightforwardModel``): both run the code below.
"""

from __future__ import annotations

import torch

from epure.model.fitted_prior import FittedPrior
from epure.model.latents import FAMILIES
from epure.model.mmvae import MMVAEPlus, Posteriors

JOINT_RULES = ("mixture", "product")
CROSS_PRIORS = ("prior", "aux")
LATENT_SAMPLERS = ("prior", "fitted")  # unconditional latents: the priors (paper) or the fitted prior


@torch.no_grad()
def unconditional_probabilities(model: MMVAEPlus, conditions: torch.Tensor, generator: torch.Generator | None = None,
                                fitted: FittedPrior | None = None) -> torch.Tensor:
    """Unconditional designs for normalised conditions -> probabilities [N, M, H, W]: z ~ p(z), w_m ~ p(w)
    (the paper), or, given ``fitted``, the latents drawn from that fitted prior given the conditions."""
    if fitted is not None:
        return latent_probabilities(model, fitted.sample(conditions, generator), conditions)
    cond_emb = model.cond(conditions)
    n, m, cfg, device = cond_emb.shape[0], model.num_components, model.cfg, cond_emb.device
    z = model.family.noise((n, 1, cfg.latent_dim_z), device, generator)
    w = model.family.noise((n, m, cfg.latent_dim_w), device, generator)
    u = torch.cat([w, z.expand(n, m, -1)], dim=-1)
    return torch.sigmoid(model.decode(u, cond_emb))


@torch.no_grad()
def latent_probabilities(model: MMVAEPlus, latents: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Whole designs from latents (``fitted_prior``'s layouts) -> probabilities [N, M, H, W]: [N, dz + M dw] laid
    out as [z, w_1, ..., w_M] decodes every component from the one z; [N, M dz + M dw] as [z_1, ..., z_M, w_1,
    ..., w_M] decodes component m from z_m."""
    n, m, dz, dw = latents.shape[0], model.num_components, model.cfg.latent_dim_z, model.cfg.latent_dim_w
    if latents.shape[1] not in (dz + m * dw, m * (dz + dw)):
        raise ValueError(f"latents of {latents.shape[1]} dimensions: the model decodes {dz + m * dw} "
                         f"([z, w_1..w_M]) or {m * (dz + dw)} ([z_1..z_M, w_1..w_M])")
    zs = m * dz if latents.shape[1] == m * (dz + dw) else dz
    z, w = latents[:, :zs].reshape(n, -1, dz), latents[:, zs:].reshape(n, m, dw)
    u = torch.cat([w, z.expand(n, m, dz)], dim=-1)
    return torch.sigmoid(model.decode(u, model.cond(conditions)))


@torch.no_grad()
def self_reconstructions(model: MMVAEPlus, x: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Every component of x [N, M, H, W] in [0, 1] reconstructed from its own posterior means alone (its w and
    its expert's z: the self IoU's rule, means instead of draws) -> probabilities [N, M, H, W], one decode."""
    cond_emb = model.cond(conditions)
    post = model.encode(x, cond_emb)
    family = model.family
    u = torch.cat([family.mean(post.w_loc, post.w_scale), family.mean(post.z_loc, post.z_scale)], dim=-1)
    return torch.sigmoid(model.decode(u, cond_emb))


@torch.no_grad()
def completion_probabilities(model: MMVAEPlus, x: torch.Tensor, conditions: torch.Tensor, observed: list[int],
                             joint: str = "mixture", use_mean: bool = False,
                             generator: torch.Generator | None = None,
                             cross_prior: str | None = None) -> torch.Tensor:
    """Every component generated from the ``observed`` ones of x [N, M, H, W] in [0, 1] -> probabilities.

    The shared z comes from the observed components' posteriors, combined by ``joint`` (see
    ``shared_latent``). An observed component keeps its own posterior w (a reconstruction); the others draw w
    from p(w) (``cross_prior`` ``prior``, the paper's rule) or from r_m(w) (``aux``); None takes
    ``model.cross_prior``. ``use_mean`` takes the means of z's and the observed w's posteriors instead of
    draws; the unobserved w are drawn either way.
    """
    rule = cross_prior or model.cfg.cross_prior
    if rule not in CROSS_PRIORS:
        raise ValueError(f"cross_prior must be one of {CROSS_PRIORS}, got {rule!r}")
    if joint not in JOINT_RULES:
        raise ValueError(f"joint must be one of {JOINT_RULES}, got {joint!r}")
    cond_emb = model.cond(conditions)
    post = model.encode(x, cond_emb, observed)
    z = shared_latent(model, post, joint, use_mean, generator)
    n, m, family = x.shape[0], model.num_components, model.family
    w = family.noise((n, m, model.cfg.latent_dim_w), x.device, generator)
    if rule == "aux":
        w = w * model.aux_scale()
    w[:, observed] = family.mean(post.w_loc, post.w_scale) if use_mean else family.draw(post.w_loc, post.w_scale,
                                                                                         generator)
    u = torch.cat([w, z[:, None].expand(n, m, -1)], dim=-1)
    return torch.sigmoid(model.decode(u, cond_emb))


def shared_latent(model: MMVAEPlus, post: Posteriors, joint: str, use_mean: bool,
                  generator: torch.Generator | None) -> torch.Tensor:
    """z [N, dz] from the observed experts' posteriors [N, O, dz].

    ``mixture``: their mixture of experts; a draw picks one observed expert per example, the mean is the
    average of the experts' means. ``product``: their precision-weighted product (a Gaussian approximation for
    Laplace experts); its mean is the precision-weighted average of the locations.
    """
    n, observed = post.z_loc.shape[:2]
    family = model.family
    if joint == "product" and observed > 1:
        loc, scale = family.product(post.z_loc, post.z_scale, dim=1)
        return loc if use_mean else FAMILIES["Normal"].draw(loc, scale, generator)
    if use_mean:
        return family.mean(post.z_loc, post.z_scale).mean(1)  # every observed expert weighs 1/O
    pick = torch.randint(observed, (n,), device=post.z_loc.device, generator=generator)
    rows = torch.arange(n, device=post.z_loc.device)
    return family.draw(post.z_loc[rows, pick], post.z_scale[rows, pick], generator)
