"""The straightforward computation of the model: the yardstick of the equality tests and the benchmarks.

    >>> import torch
    >>> from epure.config import load_config
    >>> from epure.model import MMVAEPlus, forward_objective
    >>> from epure.model.reference import StraightforwardModel
    >>> cfg = load_config("small")
    >>> model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
    >>> out = forward_objective(StraightforwardModel(model), torch.zeros(2, 5, 64, 32), torch.zeros(2, 2))

``StraightforwardModel(model)`` is the same model (its parameters, config and everything else) whose encoders
and decoders run the plain way: default (NCHW) memory format, one decoder call per (source, target) pair,
the condition embedding concatenated to u, nearest upsampling then a 3x3 convolution, 1x1 skips and the
last convolution as plain convolutions (the last one pixel-shuffled after it, for ``model.decoder_output:
pixel_shuffle``). The objectives and the generation functions run on it unchanged, so
gradients reach the model's parameters exactly as on the one forward path, which must agree with it up to
float rounding (tests/test_speed_paths.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from epure.model.mmvae import MMVAEPlus, Posteriors
from epure.model.networks import Decoder, EncoderTower, ResBlock, at_least_float32


class StraightforwardModel:
    """A view of ``model`` whose ``encode``, ``decode`` and ``decode_pairs`` compute the plain way."""

    def __init__(self, model: MMVAEPlus):
        self.model = model

    def __getattr__(self, name: str):  # everything else is the model's own
        return getattr(self.model, name)

    def encode(self, x: torch.Tensor, cond_emb: torch.Tensor, which: list[int] | None = None) -> Posteriors:
        which = list(range(self.model.num_components)) if which is None else which
        outs = []
        for m in which:
            encoder = self.model.encoders[m]
            moments = encoder.standardised_moments(x[:, m: m + 1])
            mask = F.pixel_unshuffle(x[:, m: m + 1], 2) if encoder.unshuffled else x[:, m: m + 1]
            outs.append((*tower(encoder.w_tower, mask, cond_emb, moments),
                         *tower(encoder.z_tower, mask, cond_emb, moments)))
        w_loc, w_raw, z_loc, z_raw = (at_least_float32(torch.stack(t, dim=1)) for t in zip(*outs))
        family = self.model.family
        return Posteriors(w_loc, family.scale(w_raw), z_loc, family.scale(z_raw))

    def decode(self, u: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        return torch.stack([decoder(self.model.decoders[n], u[:, n], cond_emb)
                            for n in range(self.model.num_components)], dim=1)

    def decode_pairs(self, u: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """One decoder call per (source, target) pair, each on [K * B] rows."""
        k, b, m, _, du = u.shape
        cond = cond_emb[None].expand(k, b, -1).reshape(k * b, -1)
        rows = [torch.stack([decoder(self.model.decoders[n], u[:, :, src, n].reshape(k * b, du), cond)
                             .view(k, b, *self.model.image_size) for n in range(m)], dim=2) for src in range(m)]
        return torch.stack(rows, dim=2)


def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The plain convolution of any of the networks' convolution layers, whatever its forward does."""
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)


def res_block(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    h = conv(block.conv1, F.silu(x))
    skip = x if isinstance(block.skip, nn.Identity) else conv(block.skip, x)
    if block.resample == "up":
        skip = F.interpolate(skip, scale_factor=2.0, mode="nearest")
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
    return skip + conv(block.conv2, F.silu(h))


def tower(encoder_tower: EncoderTower, x: torch.Tensor, cond: torch.Tensor,
          moments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = conv(encoder_tower.stem, x)
    for block in encoder_tower.blocks:
        h = res_block(block, h)
    joined = [F.silu(h).flatten(1), cond] + ([] if moments is None else [moments])
    loc, raw_scale = encoder_tower.head(torch.cat(joined, dim=1)).chunk(2, dim=1)
    return loc, raw_scale


def decoder(net: Decoder, u: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """u [N, du], cond [N, F] -> logits [N, H, W]."""
    h = net.fc(torch.cat([u, cond], dim=-1)).reshape(-1, *net.base_shape)
    for block in net.blocks:
        h = res_block(block, h)
    return F.pixel_shuffle(conv(net.out, F.silu(h)), net.out.upscale).squeeze(1)
