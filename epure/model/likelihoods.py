"""Decoder likelihoods p(x | decoder output), by name: the registry ``model.likelihood`` chooses from.

    >>> import torch
    >>> from epure.model.likelihoods import log_likelihood
    >>> log_likelihood(torch.zeros(2, 64, 32), torch.ones(2, 64, 32), "bernoulli").shape  # summed per mask
    torch.Size([2])

Every decoder outputs logits; images are sigmoid(logits) whatever the likelihood. A new likelihood is one
function registered with ``@register_likelihood("name")``; config validation lists the registered names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions import ContinuousBernoulli
from torch.nn import functional as F

from epure.model.latents import FAMILIES

LogProb = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


@dataclass(frozen=True)
class Likelihood:
    log_prob: LogProb  # (logits [..., H, W], x broadcastable, scale, foreground weight) -> summed over pixels
    foreground_weight: bool = False  # whether model.foreground_weight applies


LIKELIHOODS: dict[str, Likelihood] = {}


def register_likelihood(name: str, foreground_weight: bool = False) -> Callable[[LogProb], LogProb]:
    def register(log_prob: LogProb) -> LogProb:
        LIKELIHOODS[name] = Likelihood(log_prob, foreground_weight)
        return log_prob

    return register


def log_likelihood(logits: torch.Tensor, x: torch.Tensor, kind: str, scale: float = 0.75,
                   foreground_weight: float = 1.0) -> torch.Tensor:
    """log p(x | logits) of the likelihood named ``kind``, summed over pixels; x in [0, 1]."""
    return LIKELIHOODS[kind].log_prob(logits, x, scale, foreground_weight)


@register_likelihood("bernoulli", foreground_weight=True)
def bernoulli(logits: torch.Tensor, x: torch.Tensor, scale: float, foreground_weight: float) -> torch.Tensor:
    """Binary cross-entropy. A foreground weight w > 1 counts occupied pixels w times: the decoder then
    answers about w p / (w p + 1 - p) where p is the true chance that a pixel is occupied, so a pixel occupied
    in a third of the plausible designs crosses the 0.5 threshold at w = 2. Thin parts (one-pixel flank tips)
    that a calibrated decoder leaves just under 0.5 are kept, which keeps sections in one piece and at their
    requested height (measured on the toy benchmark, see the README)."""
    weight = None if foreground_weight == 1.0 else 1.0 + (foreground_weight - 1.0) * x  # broadcasts
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), weight, reduction="none").sum((-2, -1))


@register_likelihood("continuous_bernoulli")
def continuous_bernoulli(logits: torch.Tensor, x: torch.Tensor, scale: float,
                         foreground_weight: float) -> torch.Tensor:
    """Bernoulli's cross-entropy plus the normaliser that makes it a density on [0, 1]. Images stay
    sigmoid(logits): it exceeds 0.5 exactly where this distribution's mean does, so masks are the same."""
    return ContinuousBernoulli(logits=logits, validate_args=False).log_prob(x).sum((-2, -1))


def _fixed_scale(family: str) -> LogProb:
    def log_prob(logits: torch.Tensor, x: torch.Tensor, scale: float, foreground_weight: float) -> torch.Tensor:
        scale_t = torch.as_tensor(scale, dtype=logits.dtype, device=logits.device)
        return FAMILIES[family].log_density(x, torch.sigmoid(logits), scale_t).sum((-2, -1))

    log_prob.__doc__ = f"{family} around sigmoid(logits) with the fixed scale model.likelihood_scale."
    return log_prob


register_likelihood("normal")(_fixed_scale("Normal"))
register_likelihood("laplace")(_fixed_scale("Laplace"))
