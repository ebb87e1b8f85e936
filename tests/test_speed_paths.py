"""The fast path (the default) and the straightforward reference path compute the same numbers.

The fast path batches decoding by target, runs channels-last, folds nearest upsampling into transposed
convolutions and projects the condition once per example (docs/performance.md); none of that may change
the loss or the gradients beyond float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from epure.model import build_model, forward_objective
from epure.model.mmvae import MMVAEPlus
from epure.model.networks import upsampled_conv3x3

from factories import tiny_config

TOLERANCE = 1e-5  # relative, float32


def small_model(m: int, family: str) -> MMVAEPlus:
    components = [f"c{i}" for i in range(m)]
    cfg = tiny_config(None, ".", components, **{"model.priorposterior": family})
    torch.manual_seed(0)
    return build_model(cfg.model, components, cfg.data.image_size)


def loss_and_gradients(model: MMVAEPlus, x, c, objective: str, k: int, batched: bool):
    torch.manual_seed(7)  # the same noise on both paths
    model.zero_grad()
    out = forward_objective(model, x, c, objective, beta=2.5, k=k, batched=batched)
    out.loss.backward()
    return out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("family", ["Laplace", "Normal"])
@pytest.mark.parametrize("objective,k", [("elbo", 1), ("dreg", 3)])
@pytest.mark.parametrize("m", [3, 5])
def test_fast_and_straightforward_paths_agree(m: int, objective: str, k: int, family: str) -> None:
    model = small_model(m, family)
    g = torch.Generator().manual_seed(m)
    x, c = (torch.rand(4, m, 64, 32, generator=g) > 0.6).float(), torch.randn(4, 2, generator=g)
    fast_loss, fast_grads = loss_and_gradients(model, x, c, objective, k, batched=True)
    ref_loss, ref_grads = loss_and_gradients(model, x, c, objective, k, batched=False)
    assert relative_error(fast_loss, ref_loss) < TOLERANCE
    assert relative_error(fast_grads, ref_grads) < TOLERANCE
    for p in model.parameters():  # no parameter's gradient may hide a large error inside the global norm
        assert p.grad is not None


def test_sampling_paths_agree() -> None:
    model = small_model(3, "Laplace").eval()
    g = torch.Generator().manual_seed(1)
    x, c = (torch.rand(4, 3, 64, 32, generator=g) > 0.6).float(), torch.randn(4, 2, generator=g)
    emb = model.embed(c)
    u = torch.randn(4, 3, model.cfg.latent_dim_u, generator=g)
    with torch.no_grad():
        assert relative_error(model.decode(u, emb), model.decode(u, emb, fast=False)) < TOLERANCE
        fast, ref = model.encode(x, emb), model.encode(x, emb, fast=False)
    for name in ("w_loc", "w_scale", "z_loc", "z_scale"):
        assert relative_error(getattr(fast, name), getattr(ref, name)) < TOLERANCE


def test_upsampled_convolution_is_convolution_of_the_upsampled_input() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).double()
    h = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    expected = conv(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(upsampled_conv3x3(h, conv), expected, rtol=1e-12, atol=1e-12)
