"""MMVAE+: one encoder/decoder per component, a shared latent z, a private latent w per component.

    >>> import torch
    >>> from epure.config import load_config
    >>> from epure.model import MMVAEPlus
    >>> cfg = load_config("small")
    >>> model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
    >>> post = model.encode(torch.zeros(2, 5, 64, 32), model.cond(torch.zeros(2, 2)))  # each component's posteriors

- q(w_m, z | x_m): each component's encoder gives a private and a shared posterior.
- q(z | x_1..M): the mixture of the components' shared posteriors (mixture of experts).
- p(z), p(w): fixed standard priors; r_m(w): an auxiliary prior per component with a learnable scale,
  which stands in for the private latent of component m in the training objective's cross terms (m decoded
  from another component's z).

The distributions are ``model.family`` (``latents``); the objectives are in ``objectives``, generation and
completion in ``generation``. Decoding is batched by target: every target component's decoder runs once on
the latents of all sources (M decoder calls instead of M^2), which gives the same numbers as one call per
(source, target) pair; ``reference`` computes the same model that straightforward way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epure.config import ModelConfig
from epure.model.latents import FAMILIES
from epure.model.networks import ConditionMLP, Decoder, Encoder


@dataclass
class Posteriors:
    """Per-component posterior parameters, each [B, M, dim]."""

    w_loc: torch.Tensor
    w_scale: torch.Tensor
    z_loc: torch.Tensor
    z_scale: torch.Tensor

    def detached(self) -> "Posteriors":
        return Posteriors(self.w_loc.detach(), self.w_scale.detach(), self.z_loc.detach(), self.z_scale.detach())


class MMVAEPlus(nn.Module):
    def __init__(self, cfg: ModelConfig, components: list[str], image_size: tuple[int, int] | list[int]):
        super().__init__()
        self.cfg = cfg
        self.components = list(components)
        self.image_size = tuple(image_size)
        self.family = FAMILIES[cfg.priorposterior]
        self.cond = ConditionMLP(cfg.cond_dim, cfg.cond_hidden)  # normalised conditions -> their embedding
        features = self.cond.out_features
        self.encoders = nn.ModuleList([Encoder(self.image_size, cfg.nf, cfg.nf_max, features, cfg.latent_dim_w,
                                               cfg.latent_dim_z) for _ in components])
        self.decoders = nn.ModuleList([Decoder(self.image_size, cfg.nf, cfg.nf_max, features, cfg.latent_dim_u)
                                       for _ in components])
        # Fixed standard priors p(w), p(z).
        self.register_buffer("prior_loc", torch.zeros(1))
        self.register_buffer("prior_scale", torch.ones(1))
        # Auxiliary priors r_m(w): zero location, learnable scale (raw values, one row per component), starting
        # at the priors' scale 1.
        self.aux_raw_scale = nn.Parameter(torch.full((len(components), cfg.latent_dim_w),
                                                     self.family.raw_scale_of_one))

    @property
    def num_components(self) -> int:
        return len(self.components)

    def aux_scale(self) -> torch.Tensor:
        """Scales of r_m(w), [M, dw]."""
        return self.family.scale(self.aux_raw_scale)

    def encode(self, x: torch.Tensor, cond_emb: torch.Tensor, which: list[int] | None = None) -> Posteriors:
        """x [B, M, H, W] in [0, 1] -> posteriors [B, len(which), dim] for the components in ``which``."""
        which = list(range(self.num_components)) if which is None else which
        outs = [self.encoders[m](x[:, m: m + 1], cond_emb) for m in which]
        w_loc, w_raw, z_loc, z_raw = (torch.stack(t, dim=1) for t in zip(*outs))
        return Posteriors(w_loc, self.family.scale(w_raw), z_loc, self.family.scale(z_raw))

    def decode(self, u: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """u [N, M, du] (one latent per target component), cond_emb [N, F] -> logits [N, M, H, W]."""
        return torch.stack([self.decoders[n](u[:, n], cond_emb) for n in range(self.num_components)], dim=1)

    def decode_pairs(self, u: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """u [K, B, M_source, M_target, du], cond_emb [B, F] -> logits [K, B, M_source, M_target, H, W].

        One decoder call per target on all (sample, example, source) latents at once; the condition's share
        of the first layer is computed once per example.
        """
        k, b, m, _, _ = u.shape
        cond = cond_emb[None, :, None]  # broadcasts over samples and sources
        per_target = [self.decoders[n](u[:, :, :, n], cond).view(k, b, m, *self.image_size) for n in range(m)]
        return torch.stack(per_target, dim=3)
