"""Latent families: everything MMVAE+ asks of the distribution of its latents, in one object per family.

    >>> import torch
    >>> from epure.model.latents import FAMILIES
    >>> laplace = FAMILIES["Laplace"]
    >>> scale = laplace.scale(torch.zeros(2, 4))  # a zero logit is scale 1 (the prior's)
    >>> z = laplace.draw(torch.zeros(2, 4), scale)  # reparameterised: gradients reach loc and scale

``model.priorposterior`` names the family of the priors, the posteriors and the auxiliary priors r_m(w). A
new family is a subclass registered in ``FAMILIES``; nothing else in epure branches on the name.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

SCALE_FLOOR = 1e-6  # keeps every scale positive when a network saturates


class LatentFamily:
    """Location-scale family with a reparameterised draw: x = loc + scale * noise."""

    name = ""
    raw_scale_of_one = 0.0  # the raw network output whose scale is 1 (where the auxiliary priors start)
    variance_per_squared_scale = 1.0  # variance = this * scale^2

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        """Positive scale from a raw network output."""
        raise NotImplementedError

    def noise(self, shape: torch.Size | tuple, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard noise e (location 0, scale 1), so that loc + scale * e is a draw."""
        raise NotImplementedError

    def log_density(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Elementwise log density (not summed)."""
        raise NotImplementedError

    def draw(self, loc: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return loc + scale * self.noise(loc.shape, loc.device, generator)

    def mean(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return loc

    def product(self, loc: torch.Tensor, scale: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of the Gaussian whose precision is the sum of the experts' along ``dim``: the
        precision-weighted product of experts (exact for Normal experts, a Gaussian approximation otherwise).
        Draw from it with ``FAMILIES["Normal"]``."""
        precision = 1.0 / (scale**2 * self.variance_per_squared_scale)
        return (loc * precision).sum(dim) / precision.sum(dim), (1.0 / precision.sum(dim)).sqrt()


class Laplace(LatentFamily):
    """MMVAE+'s family; the scale is a softmax over the latent dimensions times their number."""

    name = "Laplace"
    raw_scale_of_one = 0.0
    variance_per_squared_scale = 2.0

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softmax(raw, dim=-1) * raw.shape[-1] + SCALE_FLOOR

    def noise(self, shape, device, generator=None) -> torch.Tensor:
        u = torch.rand(shape, device=device, generator=generator) - 0.5
        u = u.clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        return -torch.sign(u) * torch.log1p(-2 * u.abs())

    def log_density(self, x, loc, scale) -> torch.Tensor:
        return -torch.log(2 * scale) - (x - loc).abs() / scale


class Normal(LatentFamily):
    """Gaussian latents; the scale is a softplus."""

    name = "Normal"
    raw_scale_of_one = math.log(math.e - 1)  # softplus^-1(1)
    variance_per_squared_scale = 1.0

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) + SCALE_FLOOR

    def noise(self, shape, device, generator=None) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=generator)

    def log_density(self, x, loc, scale) -> torch.Tensor:
        return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)


FAMILIES: dict[str, LatentFamily] = {family.name: family for family in (Laplace(), Normal())}
