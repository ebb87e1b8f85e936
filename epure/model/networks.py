"""Convolutional building blocks: ResNet encoder towers, ResNet decoders and the condition MLP.

Channel width starts at ``nf`` and doubles at each of the three downsamplings, capped at ``nf_max``; a
64x32 mask becomes an 8x4 feature map. No normalisation layers: samples from different sources are
decoded in one batch, so nothing may depend on batch statistics.

Every forward takes ``fast``: True (the default) runs the convolutions in channels-last memory format and
computes "nearest upsample, then 3x3 convolution" as one stride-2 transposed convolution at the low
resolution; False is the straightforward reference (default memory format, upsampled copy, plain
convolution). Both give the same numbers up to float rounding, from the same parameters: the fast path
derives its weights from the stored ones on every call, so checkpoints do not depend on the path.
See docs/performance.md for what each measured.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DOWNSAMPLINGS = 3

# Which of the three taps of a 3x3 kernel (per axis) land on each of the four taps of the equivalent
# stride-2 transposed kernel when the input was nearest-upsampled by 2: [w2, w1 + w2, w0 + w1, w0].
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def upsampled_conv3x3(h: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest_upsample_2x(h))`` (3x3, padding 1) as one transposed convolution of h.

    Each output pixel then costs 4 multiply-adds per channel pair instead of 9, and the 4x larger upsampled
    input is never written: the decoders' high-resolution convolutions are most of the training arithmetic.
    """
    taps = torch.tensor(_UPSAMPLE_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)
    weight = torch.einsum("ka,oiab,lb->iokl", taps, conv.weight, taps)  # [c_in, c_out, 4, 4]
    return F.conv_transpose2d(h, weight, conv.bias, stride=2, padding=1)


def pointwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A (strided) 1x1 convolution as a matmul over the channels of a channels-last tensor.

    The same numbers as ``conv(x)``; it also sidesteps a oneDNN crash (segfault in the AVX2 1x1
    backward-weights kernel, torch 2.13 CPU) on channels-last inputs with few channels, e.g. nf 4.
    """
    stride = conv.stride[0]
    x = x[:, :, ::stride, ::stride] if stride > 1 else x
    return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


def stage_channels(nf: int, nf_max: int) -> list[int]:
    """Channels after the stem and after each downsampling: nf, 2nf, 4nf, 8nf, each capped at nf_max."""
    return [min(nf * 2**i, nf_max) for i in range(DOWNSAMPLINGS + 1)]


class ResBlock(nn.Module):
    """Pre-activation residual block that optionally halves (down) or doubles (up) the resolution.

    An up block runs its first convolution before upsampling, at the low resolution: half the cost of a
    decoder pass, where most of the training arithmetic goes (M^2 decoder passes per step, M encoder passes).
    """

    def __init__(self, c_in: int, c_out: int, resample: str | None = None):
        super().__init__()
        self.resample = resample
        stride = 2 if resample == "down" else 1
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if (c_in != c_out or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor, fast: bool = True) -> torch.Tensor:
        h = self.conv1(F.silu(x))
        skip = pointwise_conv(x, self.skip) if fast and isinstance(self.skip, nn.Conv2d) else self.skip(x)
        if self.resample != "up":
            return skip + self.conv2(F.silu(h))
        skip = F.interpolate(skip, scale_factor=2.0, mode="nearest")
        if fast:  # silu commutes with nearest upsampling, so it runs at the low resolution too
            return skip + upsampled_conv3x3(F.silu(h), self.conv2)
        return skip + self.conv2(F.silu(F.interpolate(h, scale_factor=2.0, mode="nearest")))


class EncoderTower(nn.Module):
    """One mask -> (loc, raw scale) of a latent, with the condition embedding joined before the head."""

    def __init__(self, image_size: tuple[int, int], nf: int, nf_max: int, cond_features: int, latent_dim: int):
        super().__init__()
        channels = stage_channels(nf, nf_max)
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(channels[i], channels[i + 1], "down") for i in range(DOWNSAMPLINGS)])
        flat = channels[-1] * (image_size[0] >> DOWNSAMPLINGS) * (image_size[1] >> DOWNSAMPLINGS)
        self.head = nn.Linear(flat + cond_features, 2 * latent_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.blocks(self.stem(x))).flatten(1)
        loc, raw_scale = self.head(torch.cat([h, cond], dim=1)).chunk(2, dim=1)
        return loc, raw_scale


class Encoder(nn.Module):
    """Per component: two towers, one for the private latent w and one for the shared latent z."""

    def __init__(self, image_size, nf, nf_max, cond_features, latent_dim_w, latent_dim_z):
        super().__init__()
        self.w_tower = EncoderTower(image_size, nf, nf_max, cond_features, latent_dim_w)
        self.z_tower = EncoderTower(image_size, nf, nf_max, cond_features, latent_dim_z)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, fast: bool = True):
        """x [B, 1, H, W] -> (w_loc, w_raw_scale, z_loc, z_raw_scale)."""
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        return (*self.w_tower(x, cond), *self.z_tower(x, cond))


class Decoder(nn.Module):
    """u = [w, z] joined with the condition embedding -> Bernoulli logits (or means) of one mask."""

    def __init__(self, image_size: tuple[int, int], nf: int, nf_max: int, cond_features: int, latent_dim_u: int):
        super().__init__()
        channels = stage_channels(nf, nf_max)
        self.base_shape = (channels[-1], image_size[0] >> DOWNSAMPLINGS, image_size[1] >> DOWNSAMPLINGS)
        self.fc = nn.Linear(latent_dim_u + cond_features, channels[-1] * self.base_shape[1] * self.base_shape[2])
        self.blocks = nn.Sequential(*[ResBlock(channels[i + 1], channels[i], "up")
                                      for i in reversed(range(DOWNSAMPLINGS))])
        self.out = nn.Conv2d(channels[0], 1, 3, padding=1)

    def forward(self, u: torch.Tensor, cond: torch.Tensor, fast: bool = True) -> torch.Tensor:
        """u [..., latent_dim_u], cond [..., cond_features] -> [N, H, W], N the rows of the leading dims.

        Fast: cond only needs to broadcast against u's leading dims (e.g. [1, B, 1, F] against
        [K, B, M, du]), so the condition's share of the first layer is computed once per example, not once
        per (sample, source) row. Straightforward: cond has u's leading dims and joins u before the layer.
        """
        if fast:
            du = u.shape[-1]
            h = F.linear(u, self.fc.weight[:, :du]) + F.linear(cond, self.fc.weight[:, du:], self.fc.bias)
            h = h.reshape(-1, *self.base_shape).contiguous(memory_format=torch.channels_last)
        else:
            h = self.fc(torch.cat([u, cond], dim=-1)).reshape(-1, *self.base_shape)
        for block in self.blocks:
            h = block(h, fast)
        if fast:  # the bias apart: its gradient, a sum over every pixel, is summed more exactly this way
            return F.conv2d(F.silu(h), self.out.weight, padding=1).squeeze(1) + self.out.bias
        return self.out(F.silu(h)).squeeze(1)


class ConditionMLP(nn.Module):
    """Normalised dimensions (width_px, height_px) -> an embedding shared by every encoder and decoder."""

    def __init__(self, cond_dim: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = cond_dim
        for i, h in enumerate(hidden):
            layers.append(nn.Linear(width, h))
            if i < len(hidden) - 1:
                layers.append(nn.GELU())
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(c)
