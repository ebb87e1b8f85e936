"""MMVAE+: one encoder/decoder per component, a shared latent z, a private latent w per component.

- q(w_m, z | x_m): each component's encoder gives a private and a shared posterior.
- q(z | x_1..M): the mixture of the components' shared posteriors (mixture of experts).
- p(z), p(w): fixed standard priors; r_m(w): an auxiliary prior per component with a learnable scale,
  which stands in for the private latent of component m in the training objective's cross terms (m decoded
  from another component's z).
- Completion (cross-component generation) draws an unobserved component's private latent from p(w), as the
  paper does (``model.cross_prior: prior``); ``aux`` draws it from r_m(w) instead.

Decoding is batched by target: every target component's decoder runs once on the latents of all sources
(M decoder calls instead of M^2), which gives the same numbers as one call per (source, target) pair.
``fast=False`` everywhere selects the straightforward reference path (see ``networks``), kept for the
benchmark and the equality tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from epure.config import ModelConfig
from epure.model.networks import ConditionMLP, Decoder, Encoder

SCALE_FLOOR = 1e-6


# ------------------------------------------------------------------------------------- distributions


def make_scale(raw: torch.Tensor, family: str) -> torch.Tensor:
    """Positive scale from a raw network output: softmax x dimension (Laplace, as MMVAE+) or softplus (Normal)."""
    if family == "Laplace":
        return F.softmax(raw, dim=-1) * raw.shape[-1] + SCALE_FLOOR
    return F.softplus(raw) + SCALE_FLOOR


def log_density(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: str) -> torch.Tensor:
    """Elementwise log density of Laplace or Normal (not summed)."""
    if family == "Laplace":
        return -torch.log(2 * scale) - (x - loc).abs() / scale
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)


def standard_noise(shape: torch.Size | tuple, family: str, device, generator: torch.Generator | None = None):
    """Noise e such that loc + scale * e is a reparameterised draw."""
    if family == "Laplace":
        u = torch.rand(shape, device=device, generator=generator) - 0.5
        u = u.clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    return torch.randn(shape, device=device, generator=generator)


@dataclass
class Posteriors:
    """Per-component posterior parameters, each [B, M, dim]."""

    w_loc: torch.Tensor
    w_scale: torch.Tensor
    z_loc: torch.Tensor
    z_scale: torch.Tensor

    def detached(self) -> "Posteriors":
        return Posteriors(self.w_loc.detach(), self.w_scale.detach(), self.z_loc.detach(), self.z_scale.detach())


# ------------------------------------------------------------------------------------------- model


class MMVAEPlus(nn.Module):
    def __init__(self, cfg: ModelConfig, components: list[str], image_size: tuple[int, int] | list[int]):
        super().__init__()
        if cfg.latent_dim_u != cfg.latent_dim_w + cfg.latent_dim_z:
            raise ValueError(f"latent_dim_u ({cfg.latent_dim_u}) must equal latent_dim_w + latent_dim_z "
                             f"({cfg.latent_dim_w} + {cfg.latent_dim_z})")
        self.cfg = cfg
        self.components = list(components)
        self.image_size = tuple(image_size)
        self.family = cfg.priorposterior
        self.cond = ConditionMLP(cfg.cond_dim, cfg.cond_hidden)
        features = self.cond.out_features
        self.encoders = nn.ModuleList([Encoder(self.image_size, cfg.nf, cfg.nf_max, features, cfg.latent_dim_w,
                                               cfg.latent_dim_z) for _ in components])
        self.decoders = nn.ModuleList([Decoder(self.image_size, cfg.nf, cfg.nf_max, features, cfg.latent_dim_u)
                                       for _ in components])
        # Fixed standard priors p(w), p(z); with the Laplace softmax parameterisation a zero logit is scale 1.
        self.register_buffer("prior_loc", torch.zeros(1))
        self.register_buffer("prior_scale", torch.ones(1))
        # Auxiliary priors r_m(w): zero location, learnable scale (raw values, one row per component), starting
        # at the priors' scale 1: a zero logit for Laplace's softmax, softplus^-1(1) = log(e - 1) for Normal.
        start = 0.0 if self.family == "Laplace" else math.log(math.e - 1)
        self.aux_raw_scale = nn.Parameter(torch.full((len(components), cfg.latent_dim_w), start))

    @property
    def num_components(self) -> int:
        return len(self.components)

    def aux_scale(self) -> torch.Tensor:
        """Scales of r_m(w), [M, dw]."""
        return make_scale(self.aux_raw_scale, self.family)

    # --------------------------------------------------------------------------------- encode / decode

    def embed(self, conditions: torch.Tensor) -> torch.Tensor:
        return self.cond(conditions)

    def encode(self, x: torch.Tensor, cond_emb: torch.Tensor, which: list[int] | None = None,
               fast: bool = True) -> Posteriors:
        """x [B, M, H, W] in [0, 1] -> posteriors [B, len(which), dim] for the components in ``which``."""
        which = list(range(self.num_components)) if which is None else which
        outs = [self.encoders[m](x[:, m: m + 1], cond_emb, fast) for m in which]
        w_loc, w_raw, z_loc, z_raw = (torch.stack(t, dim=1) for t in zip(*outs))
        return Posteriors(w_loc, make_scale(w_raw, self.family), z_loc, make_scale(z_raw, self.family))

    def decode(self, u: torch.Tensor, cond_emb: torch.Tensor, fast: bool = True) -> torch.Tensor:
        """u [N, M, du] (one latent per target component), cond_emb [N, F] -> logits [N, M, H, W]."""
        return torch.stack([self.decoders[n](u[:, n], cond_emb, fast) for n in range(self.num_components)], dim=1)

    def decode_target(self, n: int, u: torch.Tensor, cond_emb: torch.Tensor, fast: bool = True) -> torch.Tensor:
        """All latents in u [..., du] through decoder n -> [rows, H, W]; cond_emb: see ``Decoder.forward``."""
        return self.decoders[n](u, cond_emb, fast)

    # ----------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, cond_emb: torch.Tensor, generator: torch.Generator | None = None,
                 fast: bool = True) -> torch.Tensor:
        """Unconditional designs: z ~ p(z), w_m ~ p(w) -> probabilities [N, M, H, W]."""
        n, m = cond_emb.shape[0], self.num_components
        z = standard_noise((n, 1, self.cfg.latent_dim_z), self.family, cond_emb.device, generator)
        w = standard_noise((n, m, self.cfg.latent_dim_w), self.family, cond_emb.device, generator)
        u = torch.cat([w, z.expand(n, m, -1)], dim=-1)
        return torch.sigmoid(self.decode(u, cond_emb, fast))

    @torch.no_grad()
    def complete(self, x: torch.Tensor, cond_emb: torch.Tensor, observed: list[int], joint: str = "mixture",
                 use_mean: bool = False, generator: torch.Generator | None = None, fast: bool = True,
                 cross_prior: str | None = None) -> torch.Tensor:
        """Generate every component from the observed ones -> probabilities [N, M, H, W].

        The shared z comes from the observed components' posteriors. ``joint``: ``mixture`` is their mixture
        of experts (a draw picks one observed expert per example; its mean is the average of the observed
        experts' locations), ``product`` combines them by precision (a Gaussian approximation of the product;
        its mean is the precision-weighted average of the locations). An observed component keeps its own
        posterior w (reconstruction); the others draw w from p(w) (``cross_prior`` ``prior``, the paper's
        rule) or from r_m(w) (``aux``); None takes ``model.cross_prior``. ``use_mean`` takes the means of z's
        and the observed w's posteriors instead of draws; the unobserved w are drawn either way.
        """
        n, m, device = x.shape[0], self.num_components, x.device
        post = self.encode(x, cond_emb, observed, fast)
        noise = lambda shape: standard_noise(shape, self.family, device, generator)  # noqa: E731
        if joint == "product" and len(observed) > 1:
            var = post.z_scale**2 * (2.0 if self.family == "Laplace" else 1.0)
            precision = 1.0 / var
            loc = (post.z_loc * precision).sum(1) / precision.sum(1)
            scale = (1.0 / precision.sum(1)).sqrt()
            z = loc if use_mean else loc + scale * torch.randn(loc.shape, device=device, generator=generator)
        elif use_mean:
            z = post.z_loc.mean(1)  # the mixture's mean: every observed expert weighs 1/len(observed)
        else:
            pick = torch.randint(len(observed), (n,), device=device, generator=generator)
            loc, scale = post.z_loc[torch.arange(n), pick], post.z_scale[torch.arange(n), pick]
            z = loc + scale * noise(loc.shape)
        rule = cross_prior or self.cfg.cross_prior
        if rule not in ("prior", "aux"):
            raise ValueError(f"cross_prior must be 'prior' or 'aux', got {rule!r}")
        w = noise((n, m, self.cfg.latent_dim_w))
        if rule == "aux":
            w = w * self.aux_scale()
        own_w = post.w_loc if use_mean else post.w_loc + post.w_scale * noise(post.w_loc.shape)
        w[:, observed] = own_w
        u = torch.cat([w, z[:, None].expand(n, m, -1)], dim=-1)
        return torch.sigmoid(self.decode(u, cond_emb, fast))


def build_model(cfg: ModelConfig, components: list[str], image_size) -> MMVAEPlus:
    return MMVAEPlus(cfg, components, image_size)
