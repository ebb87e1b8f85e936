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
from epure.model.networks import (GROUPED_MAX_WIDTH, ConditionMLP, Decoder, Encoder, at_least_float32, encode_together,
                                   mask_moments)


# The networks run on chunks of rows: on the CPU a chunk's feature maps stay in the caches and its allocations
# are reused, where a whole batch's 64x32 feature map (one decoder's at the default config and batch 128:
# 210 MB) is written to fresh memory; measured, docs/performance.md. Training holds one chunk's graph at a time (``backward``).
ENCODER_CHUNK_ROWS = 32  # CPU: examples per encoder call
DECODER_CHUNK_ROWS = 80  # CPU: (sample, example, source) rows per decoder call
# GPUs: not measured (none lent). Chunks this large keep a GPU's kernels as wide as before chunking (at batch 128
# one decoder call per target, the encoders' graph kept) while training still holds one target's graph at a time.
ACCELERATOR_CHUNK_ROWS = 4096


def chunk_rows(device: torch.device) -> tuple[int, int]:
    """(examples per encoder call, rows per decoder call) on ``device``."""
    if device.type == "cpu":
        return ENCODER_CHUNK_ROWS, DECODER_CHUNK_ROWS
    return ACCELERATOR_CHUNK_ROWS, ACCELERATOR_CHUNK_ROWS


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
                                               cfg.latent_dim_z, cfg.encoder_moments, cfg.encoder_input)
                                       for _ in components])
        decoder_nf, decoder_nf_max = cfg.decoder_nf or cfg.nf, cfg.decoder_nf_max or cfg.nf_max
        self.decoders = nn.ModuleList([Decoder(self.image_size, decoder_nf, decoder_nf_max, features, cfg.latent_dim_u,
                                               cfg.decoder_output) for _ in components])
        # Fixed standard priors p(w), p(z).
        self.register_buffer("prior_loc", torch.zeros(1))
        self.register_buffer("prior_scale", torch.ones(1))
        # Auxiliary priors r_m(w): zero location, learnable scale (raw values, one row per component), starting
        # at the priors' scale 1.
        self.aux_raw_scale = nn.Parameter(torch.full((len(components), cfg.latent_dim_w),
                                                     self.family.raw_scale_of_one))

    @torch.no_grad()
    def standardise_moments(self, images: torch.Tensor, available: torch.Tensor | None = None) -> None:
        """With ``model.encoder_moments``, each encoder's moment standardisation from the training designs
        ``images`` (uint8 [N, M, H, W]), counting only a component's ``available`` [N, M] masks (None: all);
        set once, before the first step, and saved with the weights. 256 designs at a time: the moments' float
        temporaries of a whole split would outweigh the training step's memory."""
        if not self.cfg.encoder_moments:
            return
        moments = torch.cat([mask_moments(images[start: start + 256].flatten(0, 1)[:, None].float().div(255))
                             .unflatten(0, (-1, self.num_components)) for start in range(0, len(images), 256)])
        for m, encoder in enumerate(self.encoders):
            rows = moments[:, m] if available is None else moments[available[:, m], m]
            if len(rows) > 1:  # a component (almost) never present keeps the moments as they are
                encoder.standardise_moments(rows)

    @property
    def num_components(self) -> int:
        return len(self.components)

    def aux_scale(self) -> torch.Tensor:
        """Scales of r_m(w), [M, dw]."""
        return self.family.scale(self.aux_raw_scale)

    def encode(self, x: torch.Tensor, cond_emb: torch.Tensor, which: list[int] | None = None) -> Posteriors:
        """x [B, M, H, W] in [0, 1] -> posteriors [B, len(which), dim] for the components in ``which``."""
        return self.posteriors(*self.encoder_outputs(x, cond_emb, which))

    def encoder_outputs(self, x: torch.Tensor, cond_emb: torch.Tensor,
                        which: list[int] | None = None) -> list[torch.Tensor]:
        """The encoders of ``which`` on x [B, M, H, W]: [w_loc, w_raw_scale, z_loc, z_raw_scale], each
        [B, len(which), dim], in float32 also when the encoders ran in bf16 (the latents' densities need it)."""
        which = list(range(self.num_components)) if which is None else which
        chunks = []
        for rows in row_chunks(x.shape[0], chunk_rows(x.device)[0]):
            if self.cfg.nf_max <= GROUPED_MAX_WIDTH:  # narrow towers: one grouped network
                chunks.append(encode_together([self.encoders[m] for m in which], x[rows][:, which], cond_emb[rows]))
            else:
                outs = [self.encoders[m](x[rows, m: m + 1], cond_emb[rows]) for m in which]
                chunks.append([torch.stack(t, dim=1) for t in zip(*outs)])
        return [at_least_float32(torch.cat(parts)) for parts in zip(*chunks)]

    def posteriors(self, w_loc: torch.Tensor, w_raw: torch.Tensor, z_loc: torch.Tensor,
                   z_raw: torch.Tensor) -> Posteriors:
        """The encoders' outputs (locations and raw scales, each [B, M, dim]) as posteriors."""
        return Posteriors(w_loc, self.family.scale(w_raw), z_loc, self.family.scale(z_raw))

    def decode(self, u: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """u [N, M, du] (one latent per target component), cond_emb [N, F] -> logits [N, M, H, W]."""
        return torch.cat([torch.stack([self.decoders[n](u[rows, n], cond_emb[rows]) for n in range(self.num_components)],
                                      dim=1) for rows in row_chunks(u.shape[0], chunk_rows(u.device)[1])])

    def decode_pairs(self, u: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """u [K, B, M_source, M_target, du], cond_emb [B, F] -> logits [K, B, M_source, M_target, H, W].

        One decoder call per target on all (sample, example, source) latents of a chunk of examples at once; the
        condition's share of the first layer is computed once per example.
        """
        k, b, m, _, _ = u.shape
        rows_per_chunk = max(1, chunk_rows(u.device)[1] // (k * m))
        return torch.cat([torch.stack([self.decode_target(n, u[:, rows, :, n], cond_emb[rows]) for n in range(m)],
                                      dim=3) for rows in row_chunks(b, rows_per_chunk)], dim=1)

    def decode_target(self, n: int, u: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """Target n's decoder on u [K, B, M_source, du], cond_emb [B, F] -> logits [K, B, M_source, H, W]."""
        k, _, m, _ = u.shape
        return self.decoders[n](u, cond_emb[None, :, None]).view(k, -1, m, *self.image_size)


def row_chunks(rows: int, per_chunk: int) -> list[slice]:
    """Slices of at most ``per_chunk`` rows covering ``rows``."""
    return [slice(start, min(start + per_chunk, rows)) for start in range(0, rows, per_chunk)]
