"""Convolutional building blocks: ResNet encoder towers, ResNet decoders and the condition MLP.

    >>> import torch
    >>> from epure.model.networks import Decoder
    >>> decoder = Decoder((64, 32), nf=8, nf_max=16, cond_features=32, latent_dim_u=8)
    >>> decoder(torch.randn(3, 5, 8), torch.randn(3, 1, 32)).shape  # cond broadcasts over the 5 sources
    torch.Size([15, 64, 32])

Channel width starts at ``nf`` and doubles at each of the three downsamplings, capped at ``nf_max``; a
64x32 mask becomes an 8x4 feature map. No normalisation layers: samples from different sources are
decoded in one batch, so nothing may depend on batch statistics. This is the one forward path; the
convolutions it uses are in ``convolutions`` and the straightforward computation of the same networks
(the equality tests' and the benchmark's yardstick) in ``reference``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from epure.model.convolutions import MaskConv2d, PointwiseConv2d, UpsampleConv2d, channels_last

DOWNSAMPLINGS = 3
MOMENTS = 7  # shape moments an encoder may see beside its convolutions (mask_moments)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """A network's output out of bf16 autocast (``train.precision: bf16``) back to float32; float32 and float64
    pass unchanged. The latents' densities and the likelihoods' sums over 2,048 pixels need float32's digits."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def stage_channels(nf: int, nf_max: int) -> list[int]:
    """Channels after the stem and after each downsampling: nf, 2nf, 4nf, 8nf, each capped at nf_max."""
    return [min(nf * 2**i, nf_max) for i in range(DOWNSAMPLINGS + 1)]


class ResBlock(nn.Module):
    """Pre-activation residual block that optionally halves (down) or doubles (up) the resolution.

    An up block runs its first convolution before upsampling, at the low resolution: half the cost of a
    decoder pass, where most of the training arithmetic goes (M^2 decoder passes per step, M encoder passes).
    Its second convolution upsamples (SiLU commutes with nearest upsampling, so it runs at the low resolution).
    """

    def __init__(self, c_in: int, c_out: int, resample: str | None = None):
        super().__init__()
        self.resample = resample
        stride = 2 if resample == "down" else 1
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = UpsampleConv2d(c_out, c_out) if resample == "up" else nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = PointwiseConv2d(c_in, c_out, stride) if (c_in != c_out or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.conv1(F.silu(x))))
        skip = self.skip(x)
        if self.resample == "up":
            skip = F.interpolate(skip, scale_factor=2.0, mode="nearest")
        return skip + h


def mask_moments(x: torch.Tensor) -> torch.Tensor:
    """Seven shape numbers of each mask x [B, 1, H, W] in [0, 1] -> [B, 7], in pixels: the square root of the
    area, the centre of mass (row, column), the spread about it along each axis (standard deviations) and
    their correlation (second moments), and the square root of the perimeter (pixel edges, as a total
    variation).

    Why: a small part's size and a band's thickness are sums over a few boundary pixels wherever the part
    sits; a narrow convolution tower learns to count them slowly, while these sums state them outright.
    """
    x = x.float()
    h, w = x.shape[-2:]
    rows = torch.arange(h, dtype=x.dtype, device=x.device)[:, None]
    cols = torch.arange(w, dtype=x.dtype, device=x.device)[None, :]
    area = x.sum(dim=(-2, -1))
    mass = area.clamp_min(1e-3)
    cy, cx = (x * rows).sum(dim=(-2, -1)) / mass, (x * cols).sum(dim=(-2, -1)) / mass
    dy, dx = rows - cy[..., None, None], cols - cx[..., None, None]
    vy, vx = (x * dy**2).sum(dim=(-2, -1)) / mass, (x * dx**2).sum(dim=(-2, -1)) / mass
    cov = (x * dy * dx).sum(dim=(-2, -1)) / mass
    padded = F.pad(x, (1, 1, 1, 1))
    edges = padded.diff(dim=-2).abs().sum(dim=(-2, -1)) + padded.diff(dim=-1).abs().sum(dim=(-2, -1))
    return torch.cat([area.sqrt(), cy, cx, (vy + 1e-6).sqrt(), (vx + 1e-6).sqrt(),
                      cov / ((vy * vx).sqrt() + 1e-6), edges.sqrt()], dim=-1)


class EncoderTower(nn.Module):
    """One mask -> (loc, raw scale) of a latent, with the condition embedding (and ``moments`` more inputs, the
    mask's standardised shape moments, when the encoder is given them) joined before the head.
    ``encode_together`` runs every narrow tower of a model at once; ``reference.tower`` runs one the plain way.

    ``unshuffled``: the mask arrives as its 2x2 pixel blocks (``F.pixel_unshuffle``, 4 channels at half the
    resolution), so the stem runs at 32x16 and one downsampling fewer follows: the mirror of the decoders'
    ``pixel_shuffle`` output (``model.encoder_input``, README "Pixel-unshuffled encoders").
    """

    def __init__(self, image_size: tuple[int, int], nf: int, nf_max: int, cond_features: int, latent_dim: int,
                 moments: int = 0, unshuffled: bool = False):
        super().__init__()
        channels = stage_channels(nf, nf_max)
        first = 1 if unshuffled else 0  # the stage the stem writes
        self.stem = nn.Conv2d(4 if unshuffled else 1, channels[first], 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(channels[i], channels[i + 1], "down")
                                      for i in range(first, DOWNSAMPLINGS)])
        flat = channels[-1] * (image_size[0] >> DOWNSAMPLINGS) * (image_size[1] >> DOWNSAMPLINGS)
        self.head = nn.Linear(flat + cond_features + moments, 2 * latent_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                moments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.blocks(self.stem(x))).flatten(1)
        joined = [h, cond] if moments is None else [h, cond, moments.to(h.dtype)]
        loc, raw_scale = self.head(torch.cat(joined, dim=1)).chunk(2, dim=1)
        return loc, raw_scale


class Encoder(nn.Module):
    """Per component: two towers, one for the private latent w and one for the shared latent z; with
    ``moments``, both also see the mask's shape moments (``mask_moments``), standardised by the training
    designs' mean and spread (``standardise_moments``)."""

    def __init__(self, image_size, nf, nf_max, cond_features, latent_dim_w, latent_dim_z, moments: bool = False,
                 encoder_input: str = "full"):
        super().__init__()
        self.moments = moments
        self.unshuffled = encoder_input == "pixel_unshuffle"
        extra = MOMENTS if moments else 0
        self.w_tower = EncoderTower(image_size, nf, nf_max, cond_features, latent_dim_w, extra, self.unshuffled)
        self.z_tower = EncoderTower(image_size, nf, nf_max, cond_features, latent_dim_z, extra, self.unshuffled)
        if moments:
            self.register_buffer("moment_loc", torch.zeros(MOMENTS))
            self.register_buffer("moment_scale", torch.ones(MOMENTS))

    @torch.no_grad()
    def standardise_moments(self, moments: torch.Tensor) -> None:
        """Standardise by the mean and spread of ``moments`` [N, MOMENTS] (``mask_moments`` of the training
        masks): each then varies by about one, as the head's other inputs do, so a part's size is used from the
        first steps instead of after the head's weights have grown for thousands."""
        self.moment_loc.copy_(moments.mean(0))
        self.moment_scale.copy_(moments.std(0).clamp_min(1e-3))

    def standardised_moments(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [B, 1, H, W] -> its standardised moments [B, MOMENTS], or None without ``moments``."""
        return (mask_moments(x) - self.moment_loc) / self.moment_scale if self.moments else None

    def towers_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> what the towers read: x, or its 2x2 pixel blocks as channels [B, 4C, H/2, W/2]."""
        return F.pixel_unshuffle(x, 2) if self.unshuffled else x

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        """x [B, 1, H, W] -> (w_loc, w_raw_scale, z_loc, z_raw_scale): the per-encoder path, for towers wider
        than ``GROUPED_MAX_WIDTH`` (``encode_together`` runs narrower ones all at once)."""
        moments = self.standardised_moments(x)
        x = channels_last(self.towers_input(x))
        return (*self.w_tower(x, cond, moments), *self.z_tower(x, cond, moments))


GROUPED_MAX_WIDTH = 16  # encoders of at most this many channels (model.nf_max) run as one network


def _grouped(layers: list[nn.Conv2d], x: torch.Tensor, groups: int) -> torch.Tensor:
    """``layers`` (one per group, alike) as one grouped convolution of x, their weights concatenated."""
    first = layers[0]
    return F.conv2d(x, torch.cat([layer.weight for layer in layers]), torch.cat([layer.bias for layer in layers]),
                    first.stride, first.padding, groups=groups)


def encode_together(encoders: list[Encoder], x: torch.Tensor,
                    cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``encoders`` (one per channel of x [B, M, H, W]) as one network -> (w_loc, w_raw_scale, z_loc,
    z_raw_scale), each [B, M, dim]: what each tower computes on its mask (``reference.tower``: the stem, the down
    blocks, SiLU, then the head on the flattened features joined with the condition embedding and the mask's
    standardised moments), up to float rounding.

    Why: narrow towers (``small``'s nf 4 / 16) on a small batch make many small convolutions. Their weights are
    concatenated into grouped convolutions (one group per tower, in NCHW: oneDNN's channels-last grouped kernels
    were far slower) and their heads into two batched matmuls: the towers run as 7 convolutions instead of
    7 x 2M, with the Encoders' own parameters. Measured against the per-tower calls (``Encoder.forward``,
    channels-last): a whole step 1.04x to 1.17x for ``small``, 1.08x ``synth``, 0.99x ``toy`` (nf 16 / 64) and
    0.71x ``mmvaeplus_default`` (nf 40 / 128), hence ``GROUPED_MAX_WIDTH`` (README, "Pixel-unshuffled encoders,
    all towers as one network").
    """
    m = len(encoders)
    towers = [tower for encoder in encoders for tower in (encoder.w_tower, encoder.z_tower)]
    groups = len(towers)
    # the stem: each mask (or its 4 pixel-block channels) feeds its own encoder's two towers
    h = _grouped([t.stem for t in towers], encoders[0].towers_input(x).contiguous(), groups=m)
    for index in range(len(towers[0].blocks)):
        blocks = [t.blocks[index] for t in towers]
        h_out = _grouped([b.conv2 for b in blocks], F.silu(_grouped([b.conv1 for b in blocks], F.silu(h), groups)),
                         groups)
        stride = blocks[0].skip.stride[0]  # down blocks: a strided 1x1 skip, as a batched matmul per tower
        skip = torch.einsum("btihw,toi->btohw", h[:, :, ::stride, ::stride].unflatten(1, (groups, -1)),
                            torch.stack([b.skip.weight.flatten(1) for b in blocks]))
        skip = skip + torch.stack([b.skip.bias for b in blocks])[None, :, :, None, None]
        h = skip.flatten(1, 2) + h_out
    features = F.silu(h).unflatten(1, (groups, -1)).flatten(2).unflatten(1, (m, 2))  # [B, M, 2 towers, C*h*w]
    moments = [encoder.standardised_moments(x[:, i: i + 1]) for i, encoder in enumerate(encoders)]
    outputs = []
    for which in (0, 1):  # the w towers' heads, then the z towers'
        heads = [towers[2 * i + which].head for i in range(m)]
        joined = torch.stack([torch.cat([features[:, i, which], cond] + ([] if moments[i] is None else
                                                                           [moments[i].to(features.dtype)]), dim=1)
                              for i in range(m)])  # [M, B, inputs]
        out = torch.baddbmm(torch.stack([head.bias for head in heads])[:, None], joined,
                            torch.stack([head.weight for head in heads]).transpose(1, 2))  # [M, B, 2 dim]
        outputs.extend(out.transpose(0, 1).chunk(2, dim=-1))
    w_loc, w_raw_scale, z_loc, z_raw_scale = outputs
    return w_loc, w_raw_scale, z_loc, z_raw_scale


class Decoder(nn.Module):
    """u = [w, z] joined with the condition embedding -> Bernoulli logits (or means) of one mask.

    ``output``: ``upsample`` (three up blocks to the mask's resolution, then a 3x3 convolution to one channel) or
    ``pixel_shuffle`` (two up blocks to half the resolution, then a 3x3 convolution to 4 channels, each output
    pixel one of them: nothing runs at the full resolution, where the upsample decoder's narrowest and slowest
    convolutions are; ``model.decoder_output``, README).
    """

    def __init__(self, image_size: tuple[int, int], nf: int, nf_max: int, cond_features: int, latent_dim_u: int,
                 output: str = "upsample"):
        super().__init__()
        channels = stage_channels(nf, nf_max)
        self.base_shape = (channels[-1], image_size[0] >> DOWNSAMPLINGS, image_size[1] >> DOWNSAMPLINGS)
        self.fc = nn.Linear(latent_dim_u + cond_features, channels[-1] * self.base_shape[1] * self.base_shape[2])
        last = 0 if output == "upsample" else 1  # the stage the output convolution reads
        self.blocks = nn.Sequential(*[ResBlock(channels[i + 1], channels[i], "up")
                                      for i in reversed(range(last, DOWNSAMPLINGS))])
        self.out = MaskConv2d(channels[last], upscale=1 << last)

    def forward(self, u: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """u [..., latent_dim_u], cond [..., cond_features] -> [N, H, W], N the rows of u's leading dims.

        cond only needs to broadcast against u's leading dims (e.g. [1, B, 1, F] against [K, B, M, du]): the
        first layer is linear, so the condition's share of it is computed once per example, not once per
        (sample, source) row, and u and cond are never concatenated.
        """
        du = u.shape[-1]
        h = F.linear(u, self.fc.weight[:, :du]) + F.linear(cond, self.fc.weight[:, du:], self.fc.bias)
        h = channels_last(h.reshape(-1, *self.base_shape))
        return self.out(F.silu(self.blocks(h)))


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
        """In float32 also under bf16 autocast: the embedding's gradient sums every encoder's and decoder's."""
        return at_least_float32(self.net(c))
